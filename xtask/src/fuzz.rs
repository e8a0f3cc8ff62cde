//! `cargo xtask fuzz`: coverage-guided fuzzing (cargo-fuzz, libFuzzer with
//! AddressSanitizer) of every parser of the agent, each target for a time
//! budget with limits that turn a hang or an outsized allocation into a
//! failure, and the executions each target managed.
//!
//! The targets live in `fuzz/`, a workspace of its own: cargo-fuzz needs the
//! nightly toolchain and sanitizer flags, which must not reach the main
//! workspace. Seeds are `fuzz/corpus/<target>/` (read only); what the
//! fuzzer finds accumulates in `target/fuzz/corpus/<target>/`, crashes in
//! `fuzz/artifacts/<target>/`.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{
    build, setup,
    util::{self, workspace_root},
};

pub const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// cargo-fuzz needs `-Z` flags (sanitizers, sancov): a nightly rustc.
const TOOLCHAIN: &str = "nightly";

/// A fuzz target: `fuzz/fuzz_targets/<name>.rs`, with the dictionary
/// `fuzz/dict/<dict>.dict`.
pub struct Target {
    pub name: &'static str,
    dict: &'static str,
    /// The parser it feeds, for the progress lines.
    parser: &'static str,
}

/// One target per parser of the agent.
pub const TARGETS: &[Target] = &[
    Target {
        name: "policy_file",
        dict: "policy_file",
        parser: "policy::parse",
    },
    Target {
        name: "expression",
        dict: "expression",
        parser: "policy::expr::parse",
    },
    Target {
        name: "identities_file",
        dict: "sessions",
        parser: "identity::file::parse, also the saved sessions",
    },
    Target {
        name: "geoip_csv",
        dict: "geoip_csv",
        parser: "geoip::source::parse, CSV",
    },
    Target {
        name: "geoip_mmdb",
        dict: "geoip_mmdb",
        parser: "geoip::source::parse, MaxMind DB",
    },
    Target {
        name: "api_body",
        dict: "sessions",
        parser: "api::body and session ids",
    },
    Target {
        name: "import_rules",
        dict: "import_rules",
        parser: "cmd::import::convert",
    },
];

/// Largest input, in bytes. The parsers' own bounds (64 KiB expressions,
/// 4096 policies) are covered by unit tests; larger inputs only slow the
/// search down.
const MAX_LEN: u32 = 65536;
/// An input running longer than this many seconds is a hang.
const TIMEOUT_S: u32 = 10;
/// Memory of the whole process, and of any one allocation, in MiB: a
/// parser that allocates out of proportion to a 64 KiB input fails here.
const RSS_LIMIT_MB: u32 = 2048;
const MALLOC_LIMIT_MB: u32 = 512;

#[derive(Args)]
pub struct FuzzArgs {
    /// Seconds to fuzz each target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Only this target (policy_file, expression, identities_file,
    /// geoip_csv, geoip_mmdb, api_body, import_rules).
    #[arg(long)]
    pub target: Option<String>,
}

/// Install cargo-fuzz into `<tools_root>/bin` unless that version is there.
pub fn install_cargo_fuzz(tools_root: &Path) -> anyhow::Result<()> {
    let present = Command::new(tools_root.join("bin").join("cargo-fuzz"))
        .args(["fuzz", "--version"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains(CARGO_FUZZ_VERSION))
        .unwrap_or(false);
    if present {
        return Ok(());
    }
    eprintln!(
        "setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} into {} (about a minute)",
        tools_root.display()
    );
    util::run(
        util::cargo()
            .args([
                "install",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
                "--locked",
                "--root",
            ])
            .arg(tools_root)
            .env_remove("RUSTC")
            .env_remove("RUSTFLAGS"),
    )
    .context("installing cargo-fuzz (retry with `cargo xtask setup`)")
}

pub fn fuzz(args: &FuzzArgs) -> anyhow::Result<()> {
    let targets: Vec<&Target> = match &args.target {
        None => TARGETS.iter().collect(),
        Some(name) => match TARGETS.iter().find(|t| t.name == name) {
            Some(target) => vec![target],
            None => bail!(
                "no fuzz target {name:?}; the targets are {}",
                TARGETS
                    .iter()
                    .map(|t| t.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    };
    run(&targets, args.seconds)
}

/// Build every target, then fuzz each of `targets` for `seconds`; fails on
/// the first crash, hang or memory limit, naming the input that caused it.
pub fn run(targets: &[&Target], seconds: u64) -> anyhow::Result<()> {
    let tools = setup::setup()?;
    // The agent embeds the eBPF object at compile time; the targets never
    // load it, but the agent crate does not build without it.
    let object = build::build_ebpf(&tools)?;
    check_nightly()?;

    let started = Instant::now();
    eprintln!("xtask: building the fuzz targets (release, debug assertions, ASan)");
    util::run(
        cargo_fuzz(&tools.bin_dir, &object)
            .arg("build")
            .args(build_flags()),
    )
    .context("building the fuzz targets")?;
    eprintln!(
        "xtask: fuzz targets built in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let mut results = Vec::new();
    for target in targets {
        let stats = run_target(&tools.bin_dir, &object, target, seconds)?;
        results.push((target.name, stats));
    }
    eprintln!(
        "xtask: fuzzing done ({seconds} s per target, {:.0} s in all)",
        started.elapsed().as_secs_f64()
    );
    eprintln!(
        "  {:<16} {:>12} {:>9} {:>6} {:>7} {:>9}",
        "target", "executions", "execs/s", "cov", "corpus", "peak RSS"
    );
    for (target, s) in &results {
        eprintln!(
            "  {target:<16} {:>12} {:>9} {:>6} {:>7} {:>6} MB",
            s.executions, s.per_second, s.coverage, s.corpus, s.peak_rss_mb
        );
    }
    Ok(())
}

/// cargo-fuzz's flags for both `build` and `run` (they must match, or `run`
/// rebuilds): optimised, with debug assertions and overflow checks on.
fn build_flags() -> Vec<String> {
    vec![
        "--fuzz-dir".into(),
        workspace_root().join("fuzz").display().to_string(),
        "--release".into(),
        "--debug-assertions".into(),
        "--target-dir".into(),
        util::target_dir()
            .join("fuzz")
            .join("build")
            .display()
            .to_string(),
    ]
}

/// `cargo fuzz` on the nightly toolchain, from the workspace root.
fn cargo_fuzz(bin_dir: &Path, object: &Path) -> Command {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![bin_dir.to_path_buf()];
    paths.extend(std::env::split_paths(&path));
    // rustup's `cargo` proxy (not $CARGO, which is the stable cargo itself)
    // so that RUSTUP_TOOLCHAIN picks nightly.
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .arg("fuzz")
        .env("RUSTUP_TOOLCHAIN", TOOLCHAIN)
        .env("EGRESS_EBPF_OBJ", object)
        .env(
            "PATH",
            std::env::join_paths(paths).expect("PATH entries have no separator"),
        );
    for var in [
        "CARGO",
        "CARGO_TARGET_DIR",
        "RUSTC",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn check_nightly() -> anyhow::Result<()> {
    let out = Command::new("rustc")
        .arg("--version")
        .env("RUSTUP_TOOLCHAIN", TOOLCHAIN)
        .env_remove("RUSTC")
        .output()
        .context("running rustc")?;
    let version = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !version.contains("nightly") {
        bail!(
            "fuzzing needs rustup's nightly toolchain (cargo-fuzz uses -Z sanitizer flags); install it with `rustup toolchain install nightly --profile minimal`"
        );
    }
    Ok(())
}

/// What libFuzzer reported at the end of a run.
#[derive(Default)]
struct Stats {
    executions: u64,
    per_second: u64,
    /// Coverage points (`cov:`) and corpus entries at the end.
    coverage: u64,
    corpus: u64,
    peak_rss_mb: u64,
}

fn run_target(
    bin_dir: &Path,
    object: &Path,
    target: &Target,
    seconds: u64,
) -> anyhow::Result<Stats> {
    let root = workspace_root();
    let dict = root
        .join("fuzz")
        .join("dict")
        .join(format!("{}.dict", target.dict));
    let Target {
        name: target,
        parser,
        ..
    } = *target;
    let work = util::target_dir().join("fuzz").join("corpus").join(target);
    let seeds = root.join("fuzz").join("corpus").join(target);
    let logs = util::target_dir().join("fuzz").join("logs");
    for dir in [&work, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log_path = logs.join(format!("{target}.log"));
    let mut log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;

    eprintln!(
        "xtask: fuzzing {target} ({}) for {seconds} s (log: {})",
        parser,
        log_path.display()
    );
    let mut cmd = cargo_fuzz(bin_dir, object);
    cmd.arg("run")
        .args(build_flags())
        .arg(target)
        // New inputs go to the first directory; the seeds stay as written.
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={MAX_LEN}"))
        .arg(format!("-timeout={TIMEOUT_S}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"))
        .arg(format!("-dict={}", dict.display()))
        .arg("-print_final_stats=1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting cargo fuzz run {target}"))?;
    // libFuzzer writes to stderr, cargo-fuzz's reproduction hints to stdout:
    // both go to the log, merged in arrival order by a reader thread.
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out_tx = tx.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = out_tx.send(line);
        }
    });
    let stderr = child.stderr.take().expect("stderr is piped");
    let err_reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });

    let mut stats = Stats::default();
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    for line in rx {
        writeln!(log, "{line}").with_context(|| format!("writing {}", log_path.display()))?;
        parse_stat(&line, &mut stats);
        if tail.len() == 80 {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let _ = reader.join();
    let _ = err_reader.join();
    let status = child.wait().context("waiting for cargo fuzz")?;
    if !status.success() {
        for line in &tail {
            eprintln!("  | {line}");
        }
        let binary = std::fs::read_dir(util::target_dir().join("fuzz").join("build"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|triple| triple.path().join("release").join(target))
            .find(|path| path.is_file());
        bail!(
            "fuzz target {target} failed ({status}): a crash, hang or memory limit; the input is in {} (full log {}); replay it with `{} <input>`",
            root.join("fuzz").join("artifacts").join(target).display(),
            log_path.display(),
            binary.map_or_else(|| target.to_owned(), |b| b.display().to_string())
        );
    }
    if stats.executions == 0 {
        bail!(
            "fuzz target {target} reported no executions (see {})",
            log_path.display()
        );
    }
    Ok(stats)
}

/// Pick the numbers out of libFuzzer's status lines
/// (`#123 DONE cov: 456 ft: 789 corp: 12/3Kb ...`) and final stats
/// (`stat::number_of_executed_units: 123`).
fn parse_stat(line: &str, stats: &mut Stats) {
    let number = |text: &str| text.trim().parse::<u64>().ok();
    if let Some((key, value)) = line.strip_prefix("stat::").and_then(|l| l.split_once(':')) {
        let Some(value) = number(value) else {
            return;
        };
        match key {
            "number_of_executed_units" => stats.executions = value,
            "average_exec_per_sec" => stats.per_second = value,
            "peak_rss_mb" => stats.peak_rss_mb = value,
            _ => {}
        }
        return;
    }
    if line.starts_with('#') {
        let mut words = line.split_whitespace();
        while let Some(word) = words.next() {
            match word {
                "cov:" => stats.coverage = words.next().and_then(number).unwrap_or(stats.coverage),
                "corp:" => {
                    stats.corpus = words
                        .next()
                        .and_then(|c| c.split('/').next())
                        .and_then(number)
                        .unwrap_or(stats.corpus)
                }
                _ => {}
            }
        }
    }
}
