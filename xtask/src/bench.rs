//! `cargo xtask bench`: measure the dataplane and write docs/BENCHMARKS.md.
//! A benchmark, never a timed test: nothing here passes or fails on speed.

use std::{
    fmt::Write as _,
    process::{Command, Stdio},
};

use anyhow::Context as _;
use clap::Args;

use crate::{
    build::{self, BuildArgs},
    util::{self, cargo, workspace_root},
};

#[derive(Args)]
pub struct BenchArgs {
    /// BPF_PROG_TEST_RUN repetitions per run.
    #[arg(long, default_value_t = 1_000_000)]
    pub repeat: u32,
    /// Runs per measurement (the table shows the median and the spread).
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
    /// Print only; do not rewrite docs/BENCHMARKS.md.
    #[arg(long)]
    pub no_write: bool,
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or_else(String::new, |kb| format!(", {} GiB RAM", kb / 1024 / 1024));
    format!(
        "{cpu}, {cpus} CPUs{mem}; kernel {}; {}",
        first_line("uname", &["-r"]),
        first_line("rustc", &["--version"])
    )
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    build::build(&BuildArgs::default())?;
    let object = build::ebpf_object();
    let mut cmd = cargo();
    cmd.args(["bench", "--package", "egress-tests", "--bench", "dataplane"])
        .env("EGRESS_EBPF_OBJ", &object)
        .env("EGRESS_BENCH_REPEAT", args.repeat.to_string())
        .env("EGRESS_BENCH_RUNS", args.runs.to_string())
        // Progress and errors show as they happen; the table is the output.
        .stderr(Stdio::inherit());
    if !util::is_root() {
        util::run_binaries_with_sudo(&mut cmd)?;
    }
    let output = cmd.output().context("running the dataplane benchmark")?;
    if !output.status.success() {
        anyhow::bail!(
            "the dataplane benchmark failed ({}); its errors are above",
            output.status
        );
    }
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    let date = first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let mut doc = String::new();
    let _ = writeln!(doc, "# Benchmarks\n");
    let _ = writeln!(doc, "Written by `cargo xtask bench` on {date}.\n");
    let _ = writeln!(doc, "Machine: {}.\n", machine());
    let _ = writeln!(doc, "## Per-packet cost (BPF_PROG_TEST_RUN)\n");
    let _ = writeln!(
        doc,
        "Command: `cargo xtask bench --repeat {} --runs {}`. Packets are realistic Ethernet/IPv4/TCP frames with a 64-byte payload. The policy sets are generated: each policy names 1-3 destination prefixes, TCP/UDP, a port and a port range, a fifth of them a group, and the measured flow is taken by a rule at the end of the list. See `tests/benches/dataplane.rs` for how each repetition is kept on the same path.\n",
        args.repeat, args.runs
    );
    doc.push_str(&table);
    print!("{table}");
    if !args.no_write {
        let path = workspace_root().join("docs").join("BENCHMARKS.md");
        std::fs::create_dir_all(path.parent().expect("docs/ has a parent"))?;
        std::fs::write(&path, doc).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("xtask: wrote {}", path.display());
    }
    Ok(())
}
