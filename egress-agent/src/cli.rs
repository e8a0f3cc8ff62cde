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
    /// Show which policy a flow would match, why each earlier one does not,
    /// and the egress address it would leave from.
    ///
    /// Example: egress-agent explain --config policies.json --src 10.10.0.2 --dst 192.0.2.10 --proto tcp --dst-port 443 --group finance
    Explain(ExplainArgs),
    /// Convert policies exported from another product into a policy file.
    #[command(subcommand)]
    Import(ImportCommand),
}

#[derive(Subcommand, Debug)]
pub enum ImportCommand {
    /// Zero-trust gateway egress rules (a JSON list, or an API response with
    /// a "result" list) with `traffic`, `identity`, `device_posture`
    /// expressions and `rule_settings.egress` addresses. Rules are ordered by
    /// precedence; each distinct address triple becomes a pool; an egress of
    /// 0.0.0.0 means the shared default. The result is checked like any
    /// policy file before it is written.
    ///
    /// Example: egress-agent import gateway-rules rules.json --default-ipv4 203.0.113.1 -o policies.json
    GatewayRules(ImportArgs),
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The exported rules (JSON).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// The shared default egress address (the rules only say "0.0.0.0").
    #[arg(long, value_name = "IPV4")]
    pub default_ipv4: std::net::Ipv4Addr,
    /// The shared default IPv6 egress address.
    #[arg(long, value_name = "IPV6")]
    pub default_ipv6: Option<std::net::Ipv6Addr>,
    /// Where to write the policy file (standard output by default).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Policy file (JSON).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,

    /// Interface flows leave from; the TC programs attach here.
    #[arg(long, value_name = "IFACE")]
    pub uplink: String,

    /// Flows the connection tables hold (each direction); overrides the
    /// policy file's nat.max_flows.
    #[arg(long, value_name = "N")]
    pub max_flows: Option<u32>,

    /// Classifier classes per policy generation (each takes 520 bytes).
    #[arg(long, value_name = "N", default_value_t = egress_common::maps::DEFAULT_CLASSES_PER_GEN)]
    pub max_classes: u32,

    /// Prefixes each classifier trie holds (both generations together).
    #[arg(long, value_name = "N", default_value_t = egress_common::maps::DEFAULT_PREFIXES)]
    pub max_prefixes: u32,

    /// How to attach the TC programs.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,

    /// On reload, also re-evaluate established flows and end those the new
    /// policies would send out of another address (by default established
    /// flows keep their translation unless their address was removed).
    #[arg(long)]
    pub reclassify_on_reload: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Policy file (JSON).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// Policy file (JSON).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Source address of the flow.
    #[arg(long)]
    pub src: std::net::IpAddr,
    /// Destination address of the flow.
    #[arg(long)]
    pub dst: std::net::IpAddr,
    /// Protocol: tcp, udp, icmp, icmpv6, or an IP protocol number.
    #[arg(long, default_value = "tcp")]
    pub proto: String,
    /// Destination port (TCP and UDP).
    #[arg(long, default_value_t = 0)]
    pub dst_port: u16,
    /// The user behind the source (e-mail); with --group/--posture, the
    /// flow has an identity.
    #[arg(long)]
    pub user: Option<String>,
    /// A group of the user (repeatable).
    #[arg(long = "group")]
    pub groups: Vec<String>,
    /// A posture check the device passes (repeatable).
    #[arg(long = "posture")]
    pub posture: Vec<String>,
    /// Destination country (ISO 3166-1 alpha-2).
    #[arg(long)]
    pub country: Option<String>,
}
