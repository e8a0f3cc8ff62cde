//! `cargo xtask test`: lint, host unit tests, a fuzz smoke of every parser,
//! then the privileged tiers (BPF_PROG_TEST_RUN packet tests and
//! network-namespace lab tests) as root.

use anyhow::Context as _;
use clap::Args;

use crate::{
    build::{self, BuildArgs},
    fuzz,
    util::{self, cargo},
};

#[derive(Args)]
pub struct TestArgs {
    /// Only run tests whose name contains this string.
    pub filter: Option<String>,
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    pub no_lint: bool,
    /// Host unit tests only (no root, no kernel).
    #[arg(long)]
    pub unit_only: bool,
    /// Skip the fuzz smoke (each parser's fuzz target for a few seconds).
    #[arg(long)]
    pub no_fuzz: bool,
}

/// Seconds each fuzz target runs in the smoke: enough to replay the seeds
/// and the corpus found so far and to try some thousands of new inputs.
const FUZZ_SMOKE_SECONDS: u64 = 10;

pub fn test(args: &TestArgs) -> anyhow::Result<()> {
    let agent = build::build(&BuildArgs::default())?;
    let object = build::ebpf_object();

    if !args.no_lint {
        eprintln!("xtask: lint (rustfmt, clippy -D warnings)");
        util::run(cargo().args(["fmt", "--all", "--check"]))
            .context("rustfmt found unformatted code; run `cargo fmt --all`")?;
        util::run(
            cargo()
                .args([
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "egress-ebpf",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ])
                .env("EGRESS_EBPF_OBJ", &object),
        )
        .context("clippy")?;
    }

    eprintln!("xtask: host unit tests");
    let mut unit = cargo();
    unit.args([
        "test",
        "--workspace",
        "--exclude",
        "egress-ebpf",
        "--exclude",
        "egress-tests",
    ])
    .env("EGRESS_EBPF_OBJ", &object);
    if let Some(filter) = &args.filter {
        unit.args(["--", filter]);
    }
    util::run(&mut unit).context("host unit tests")?;
    if args.unit_only {
        return Ok(());
    }

    // A filter picks tests by name; the fuzz smoke has none to match.
    if !args.no_fuzz && args.filter.is_none() {
        eprintln!("xtask: fuzz smoke ({FUZZ_SMOKE_SECONDS} s per parser)");
        let targets: Vec<&fuzz::Target> = fuzz::TARGETS.iter().collect();
        fuzz::run(&targets, FUZZ_SMOKE_SECONDS).context("fuzz smoke")?;
    }

    eprintln!("xtask: packet (BPF_PROG_TEST_RUN) and lab (network namespace) tests, as root");
    let mut privileged = cargo();
    privileged
        .args(["test", "--package", "egress-tests"])
        .env("EGRESS_EBPF_OBJ", &object)
        .env("EGRESS_AGENT_BIN", &agent)
        .env("RUST_BACKTRACE", "1");
    if util::is_root() {
        let stale = egress_tests::netns::remove_stale()?;
        if !stale.is_empty() {
            eprintln!(
                "xtask: removed lab namespaces left by an interrupted run: {}",
                stale.join(" ")
            );
        }
    } else {
        // Build as the user, run the test binary as root.
        util::run_binaries_with_sudo(&mut privileged)?;
    }
    privileged.arg("--");
    if let Some(filter) = &args.filter {
        privileged.arg(filter);
    }
    // One at a time: the lab tests measure real traffic on a small machine.
    privileged.arg("--test-threads=1");
    util::run(&mut privileged).context("privileged tests")
}
