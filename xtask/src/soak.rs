//! `cargo xtask soak`: build, then run the soak lab test
//! (tests/src/tests/soak_lab.rs) as root for the time asked and print its
//! report. The test's own output (progress, the agent's log) goes to
//! standard error; standard output carries the report only.

use std::process::Stdio;

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{
    build::{self, BuildArgs},
    util::{self, cargo, target_dir},
};

/// The soak driver: a lab test that reads `EGRESS_SOAK_SECONDS`.
const SOAK_TEST: &str =
    "tests::soak_lab::soak_mixed_traffic_under_reloads_and_session_churn_intact_and_swept";
/// The test's shortest run.
const MIN_SECONDS: f64 = 5.0;

#[derive(Args)]
pub struct SoakArgs {
    /// How long the traffic runs, in minutes; fractions are fine.
    ///
    /// Example: --minutes 0.5
    #[arg(long, value_name = "N", default_value_t = 10.0)]
    pub minutes: f64,
    /// How long the traffic runs, in seconds (instead of --minutes).
    ///
    /// Example: --seconds 60
    #[arg(long, value_name = "N", conflicts_with = "minutes")]
    pub seconds: Option<f64>,
}

pub fn soak(args: &SoakArgs) -> anyhow::Result<()> {
    let seconds = args.seconds.unwrap_or(args.minutes * 60.0);
    if !seconds.is_finite() || seconds < MIN_SECONDS {
        bail!("a soak runs for at least {MIN_SECONDS} s; asked for {seconds} s");
    }
    let agent = build::build(&BuildArgs::default())?;
    let object = build::ebpf_object();
    let report = target_dir().join("soak").join("report.txt");
    std::fs::create_dir_all(report.parent().expect("the report has a directory"))
        .with_context(|| format!("creating {}", report.parent().unwrap_or(&report).display()))?;
    match std::fs::remove_file(&report) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", report.display())),
    }

    let mut cmd = cargo();
    cmd.args(["test", "--package", "egress-tests", "--lib"])
        .env("EGRESS_EBPF_OBJ", &object)
        .env("EGRESS_AGENT_BIN", &agent)
        .env("EGRESS_SOAK_SECONDS", format!("{seconds}"))
        .env("EGRESS_SOAK_REPORT", &report)
        .env("RUST_BACKTRACE", "1")
        // The report is printed below, once; everything else is a log.
        .stdout(Stdio::from(std::io::stderr()));
    if util::is_root() {
        let stale = egress_tests::netns::remove_stale()?;
        if !stale.is_empty() {
            eprintln!(
                "xtask: removed lab namespaces left by an interrupted run: {}",
                stale.join(" ")
            );
        }
    } else {
        util::run_binaries_with_sudo(&mut cmd)?;
    }
    cmd.args([
        "--",
        SOAK_TEST,
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ]);
    eprintln!("xtask: soak for {seconds} s of traffic, as root");
    let result = util::run(&mut cmd).context("the soak failed; its report and errors are above");
    match std::fs::read_to_string(&report) {
        Ok(text) => print!("{text}"),
        Err(e) if result.is_ok() => {
            return Err(e).with_context(|| format!("reading the soak report {}", report.display()));
        }
        // The test failed before it could write one: its errors say why.
        Err(_) => {}
    }
    result
}
