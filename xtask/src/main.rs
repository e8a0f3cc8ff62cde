//! `cargo xtask`: the one entry point for setting up the toolchain, building
//! the eBPF object, running the tests and the lab demo.

mod bench;
mod build;
mod fuzz;
mod run;
mod setup;
mod soak;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and run the egress steering dataplane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the build needs (Debian packages, bpf-linker); idempotent.
    Setup,
    /// Build the eBPF object for bpfel-unknown-none.
    BuildEbpf,
    /// Build the eBPF object and the agent.
    Build(build::BuildArgs),
    /// Run every test: host unit tests, BPF_PROG_TEST_RUN packet tests and
    /// network-namespace lab tests (the last two as root).
    Test(test::TestArgs),
    /// Start a throw-away lab (client, gateway, internet namespaces), run the
    /// agent on the gateway with examples/policies.json and show which egress
    /// address each sample flow left from. Ctrl-C tears everything down.
    Run(run::RunArgs),
    /// Measure the dataplane (per-packet cost, and end to end beside
    /// nftables and plain forwarding) and write docs/BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Fuzz every parser (policy file, expressions, identities file,
    /// country CSV/MMDB, API bodies, import input) with cargo-fuzz for
    /// --seconds N each (default 60); fails on any crash, hang or outsized
    /// allocation and prints the executions per target.
    Fuzz(fuzz::FuzzArgs),
    /// Soak: mixed IPv4/IPv6 TCP, UDP and ICMP traffic under policy reloads
    /// and session churn for --minutes N (default 10); prints flows, bytes
    /// verified, peak table fill, agent memory and what the sweeper left.
    Soak(soak::SoakArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::setup().map(|_| ()),
        Command::BuildEbpf => {
            setup::setup().and_then(|tools| build::build_ebpf(&tools).map(|_| ()))
        }
        Command::Build(args) => build::build(&args).map(|_| ()),
        Command::Test(args) => test::test(&args),
        Command::Run(args) => run::run(&args),
        Command::Bench(args) => bench::bench(&args),
        Command::Fuzz(args) => fuzz::fuzz(&args),
        Command::Soak(args) => soak::soak(&args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
