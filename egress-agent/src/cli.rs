//! Command-line interface: every argument structure, with its help text.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};

use crate::loader::AttachMode;

/// Egress steering dataplane: makes every flow leave the gateway from the
/// egress address its policy chooses, with replies translated back.
#[derive(Parser, Debug)]
#[command(name = "egress-agent", version)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides it.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach the dataplane to an uplink and steer traffic until SIGINT or
    /// SIGTERM; SIGHUP reloads the policy file (a bad file is rejected and
    /// the running policies stay in force).
    ///
    /// Example: egress-agent run --config /etc/egress/policies.json --uplink eth0
    Run(RunArgs),
    /// Validate a policy file and print what it compiles to. Nothing is
    /// loaded or attached.
    ///
    /// Example: egress-agent check /etc/egress/policies.json
    Check(CheckArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Policy file (JSON).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,

    /// Interface flows leave from; the TC programs attach here.
    #[arg(long, value_name = "IFACE")]
    pub uplink: String,

    /// Flows the connection tables hold (each direction).
    #[arg(long, value_name = "N", default_value_t = egress_common::maps::DEFAULT_MAX_FLOWS)]
    pub max_flows: u32,

    /// Classifier classes per policy generation (each takes 520 bytes).
    #[arg(long, value_name = "N", default_value_t = egress_common::maps::DEFAULT_CLASSES_PER_GEN)]
    pub max_classes: u32,

    /// Prefixes each classifier trie holds (both generations together).
    #[arg(long, value_name = "N", default_value_t = egress_common::maps::DEFAULT_PREFIXES)]
    pub max_prefixes: u32,

    /// How to attach the TC programs.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Policy file (JSON).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}
