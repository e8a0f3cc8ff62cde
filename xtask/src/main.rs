//! `cargo xtask`: the one entry point for setting up the toolchain, building
//! the eBPF object, running the tests and the lab demo.

mod bench;
mod build;
mod run;
mod setup;
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
    /// Measure the dataplane's per-packet cost and write docs/BENCHMARKS.md.
    Bench(bench::BenchArgs),
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
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
