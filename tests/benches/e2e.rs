//! End-to-end cost through the lab gateway (run by `cargo xtask bench`, as
//! root), four ways in the same run: (a) this dataplane; (b1) nftables with
//! the policies as a linear NAT chain; (b2) nftables as well as it allows
//! (interval and verdict maps, `snat ... map`, a flowtable where the kernel
//! has one); (c) plain forwarding. Both nftables rulesets are generated from
//! the policy file the agent runs. Prints markdown tables.
//!
//! The headline is the gateway's CPU time per packet: the run time of the
//! NAPI threads of its two interfaces (where all its packet work happens,
//! see `e2e/rig.rs`) plus the agent process, divided by the packets the
//! gateway received. Raw rates follow; on a small machine they are bounded
//! by the load generators, which share the CPUs.
//!
//! Settings (environment): EGRESS_E2E_SECONDS (measured seconds per run,
//! default 5), EGRESS_E2E_RUNS (runs per figure, 3), EGRESS_E2E_POLICIES
//! (policy counts, "10,256,4096"), EGRESS_E2E_UDP_PPS (UDP datagrams per
//! second, 50000; 0 for as fast as iperf3 sends). EGRESS_E2E_RULESETS=FILE
//! (a policy file, or a count for the bench's generated file) only prints
//! both nftables rulesets and exits.

#[path = "shared/decoys.rs"]
mod decoys;
#[path = "e2e/load.rs"]
mod load;
#[path = "e2e/nft.rs"]
mod nft;
#[path = "e2e/policies.rs"]
mod policies;
#[path = "e2e/rig.rs"]
mod rig;

use std::{fmt::Write as _, net::IpAddr, time::Duration};

use anyhow::{Context as _, bail};
use egress_agent::policy::{self, PolicySet};
use egress_tests::{
    lab::{CLIENT, GW_UPLINK, LAN, SERVER_PARTNER, UPLINK},
    probe,
    tempdir::TempDir,
};

use crate::{
    load::Load,
    policies::{MEASURED_EGRESS, PROBE_PORT, SERVER},
    rig::{NftTable, Rig},
};

/// Warm-up before the counters are read, so that connection set-up and
/// ramp-up stay out of the figures.
const WARMUP: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Agent,
    Linear,
    Best,
    Plain,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Agent => "(a) this dataplane",
            Mode::Linear => "(b1) nftables, linear chain + conntrack SNAT",
            Mode::Best => "(b2) nftables, maps + `snat ... map`",
            Mode::Plain => "(c) plain forwarding",
        }
    }
}

struct Settings {
    seconds: f64,
    runs: usize,
    counts: Vec<usize>,
    udp_pps: u64,
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid value")),
        Err(_) => Ok(default),
    }
}

impl Settings {
    fn from_env() -> anyhow::Result<Self> {
        let counts = std::env::var("EGRESS_E2E_POLICIES").unwrap_or_else(|_| "10,256,4096".into());
        let counts = counts
            .split(',')
            .map(|c| {
                c.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .with_context(|| format!("EGRESS_E2E_POLICIES: {c:?} is not a count >= 1"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let s = Self {
            seconds: env("EGRESS_E2E_SECONDS", 5.0)?,
            runs: env("EGRESS_E2E_RUNS", 3)?,
            counts,
            udp_pps: env("EGRESS_E2E_UDP_PPS", 50_000)?,
        };
        if s.seconds < 1.0 || s.runs < 1 {
            bail!("EGRESS_E2E_SECONDS must be at least 1 and EGRESS_E2E_RUNS at least 1");
        }
        Ok(s)
    }
}

/// One figure's runs.
#[derive(Default, Clone)]
struct Runs(Vec<f64>);

impl Runs {
    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    fn cell(&self, decimals: usize) -> String {
        if self.0.is_empty() {
            return "-".into();
        }
        let min = self.0.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if self.0.len() == 1 {
            format!("{:.*}", decimals, self.median())
        } else {
            format!(
                "{:.*} ({:.*}–{:.*})",
                decimals,
                self.median(),
                decimals,
                min,
                decimals,
                max
            )
        }
    }
}

/// All figures of one configuration at one policy count.
#[derive(Default, Clone)]
struct Cell {
    udp_cpu: Runs,
    udp_pps: Runs,
    tcp_cpu: Runs,
    tcp_mbps: Runs,
    conn_cpu: Runs,
    conn_rate: Runs,
}

/// Run `load` and read the counters over the measured window.
fn measure(rig: &Rig, load: Load, seconds: f64) -> anyhow::Result<rig::Delta> {
    let total = WARMUP.as_secs_f64() + seconds + 0.5;
    let process = load.start(&rig.lab.client, total)?;
    std::thread::sleep(WARMUP);
    let before = rig.snapshot()?;
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let after = rig.snapshot()?;
    process.finish(Duration::from_secs_f64(total + 30.0))?;
    Ok(after.since(&before))
}

fn measure_cell(rig: &Rig, settings: &Settings, mode: Mode) -> anyhow::Result<Cell> {
    let _servers = load::Servers::start(&rig.lab.inet)?;
    let mut cell = Cell::default();
    for run in 0..settings.runs {
        eprintln!("e2e:   {} run {}/{}", mode.label(), run + 1, settings.runs);
        let d = measure(
            rig,
            Load::Udp {
                pps: settings.udp_pps,
            },
            settings.seconds,
        )?;
        if d.packets == 0.0 {
            bail!("no UDP packet crossed the gateway");
        }
        cell.udp_cpu.0.push(d.cpu_ns / d.packets);
        cell.udp_pps.0.push(d.packets / d.seconds);
        let d = measure(rig, Load::Tcp, settings.seconds)?;
        if d.packets == 0.0 {
            bail!("no TCP packet crossed the gateway");
        }
        cell.tcp_cpu.0.push(d.cpu_ns / d.packets);
        cell.tcp_mbps.0.push(d.up_bytes * 8.0 / d.seconds / 1e6);
        let d = measure(rig, Load::Connections, settings.seconds)?;
        if d.accepted == 0.0 {
            bail!("the server accepted no connection");
        }
        cell.conn_cpu.0.push(d.cpu_ns / d.accepted / 1000.0);
        cell.conn_rate.0.push(d.accepted / d.seconds);
    }
    Ok(cell)
}

/// Check the configuration does what it should before measuring it: the
/// measured flow (TCP and UDP) leaves from `measured`, a flow no policy
/// takes from `fallback`.
fn verify(rig: &Rig, measured: IpAddr, fallback: IpAddr) -> anyhow::Result<()> {
    let lab = &rig.lab;
    let _servers = probe::Servers::start(
        &lab.inet,
        &[SERVER.into(), SERVER_PARTNER.into()],
        &[PROBE_PORT],
    )?;
    for (to, want) in [(SERVER, measured), (SERVER_PARTNER, fallback)] {
        let tcp = probe::tcp(
            &lab.client,
            None,
            probe::sa(to, PROBE_PORT),
            probe::token("e2e"),
        )?;
        let udp = probe::udp(
            &lab.client,
            None,
            probe::sa(to, PROBE_PORT),
            probe::token("e2e"),
        )?;
        for (proto, seen) in [("TCP", tcp), ("UDP", udp)] {
            if seen.src.ip() != want || !seen.intact {
                bail!(
                    "a {proto} flow to {to} must leave from {want} intact, the server saw {} (intact: {})",
                    seen.src,
                    seen.intact
                );
            }
        }
    }
    Ok(())
}

struct Prepared {
    n: usize,
    dir: TempDir,
    config: std::path::PathBuf,
    linear: String,
    best: String,
}

fn prepare(n: usize, flowtable: bool) -> anyhow::Result<Prepared> {
    let json = policies::generate(n);
    let set: PolicySet = policy::parse(&json).context("the generated policy file")?;
    let linear = nft::linear(&set, UPLINK).map_err(anyhow::Error::msg)?;
    let started = std::time::Instant::now();
    let plan = nft::Plan::build(&set).map_err(anyhow::Error::msg)?;
    nft::self_check(&set, &plan, 5_000).map_err(|e| anyhow::anyhow!("{n} policies: {e}"))?;
    let (elements, classes) = plan.size();
    eprintln!(
        "e2e: {n} policies: (b2) has {elements} destination intervals and {classes} classes (built and checked against the agent's evaluator in {:.1?})",
        started.elapsed()
    );
    let best = plan.render(UPLINK, LAN, flowtable);
    let dir = TempDir::new("e2e");
    let config = dir.write("policies.json", &json);
    Ok(Prepared {
        n,
        dir,
        config,
        linear,
        best,
    })
}

fn run_mode(settings: &Settings, prepared: Option<&Prepared>, mode: Mode) -> anyhow::Result<Cell> {
    let mut rig = Rig::new()?;
    let measured: IpAddr = MEASURED_EGRESS.into();
    let fallback: IpAddr = GW_UPLINK.into();
    match (mode, prepared) {
        (Mode::Plain, _) => {
            verify(&rig, CLIENT.into(), CLIENT.into())?;
            measure_cell(&rig, settings, mode)
        }
        (Mode::Agent, Some(p)) => {
            let _agent = rig.start_agent(&p.config)?;
            verify(&rig, measured, fallback)?;
            measure_cell(&rig, settings, mode)
        }
        (Mode::Linear | Mode::Best, Some(p)) => {
            let started = std::time::Instant::now();
            let (name, ruleset) = if mode == Mode::Linear {
                ("linear.nft", &p.linear)
            } else {
                ("best.nft", &p.best)
            };
            let _table = NftTable::load(&rig.lab.gw, p.dir.path(), name, ruleset)?;
            eprintln!(
                "e2e:   {} loaded {} policies in {:.1?}",
                mode.label(),
                p.n,
                started.elapsed()
            );
            verify(&rig, measured, fallback)?;
            measure_cell(&rig, settings, mode)
        }
        _ => unreachable!("only plain forwarding runs without a policy file"),
    }
}

fn ratio_row(out: &mut String, label: &str, a: &[f64], b: &[f64]) {
    let cells: Vec<String> = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            if *y > 0.0 {
                format!("{:.2}", x / y)
            } else {
                "-".into()
            }
        })
        .collect();
    let _ = writeln!(out, "| {label} | {} |", cells.join(" | "));
}

fn table(
    out: &mut String,
    title: &str,
    counts: &[usize],
    cells: &[(Mode, Vec<Cell>)],
    pick: impl Fn(&Cell) -> &Runs,
    decimals: usize,
) {
    let _ = writeln!(out, "{title}\n");
    let head: Vec<String> = counts.iter().map(|n| format!("{n} policies")).collect();
    let _ = writeln!(out, "| configuration | {} |", head.join(" | "));
    let _ = writeln!(out, "|---|{}", "---:|".repeat(counts.len()));
    for (mode, row) in cells {
        let v: Vec<String> = row.iter().map(|c| pick(c).cell(decimals)).collect();
        let _ = writeln!(out, "| {} | {} |", mode.label(), v.join(" | "));
    }
    let medians = |m: Mode| -> Vec<f64> {
        cells
            .iter()
            .find(|(mode, _)| *mode == m)
            .map(|(_, row)| {
                row.iter()
                    .map(|c| {
                        let r = pick(c);
                        if r.0.is_empty() { 0.0 } else { r.median() }
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let a = medians(Mode::Agent);
    for (m, label) in [
        (Mode::Linear, "(a) / (b1)"),
        (Mode::Best, "(a) / (b2)"),
        (Mode::Plain, "(a) / (c)"),
    ] {
        ratio_row(out, label, &a, &medians(m));
    }
    out.push('\n');
}

fn main() {
    if let Err(e) = run() {
        eprintln!("e2e bench: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    if let Ok(what) = std::env::var("EGRESS_E2E_RULESETS") {
        // A policy file, or a count: the bench's own generated file.
        let set = match what.parse::<usize>() {
            Ok(n) => policy::parse(&policies::generate(n.max(1)))?,
            Err(_) => policy::load(std::path::Path::new(&what))?,
        };
        let started = std::time::Instant::now();
        let plan = nft::Plan::build(&set).map_err(anyhow::Error::msg)?;
        eprintln!("e2e: built in {:.1?}", started.elapsed());
        nft::self_check(&set, &plan, 5_000).map_err(anyhow::Error::msg)?;
        eprintln!("e2e: built and checked in {:.1?}", started.elapsed());
        println!(
            "# (b1)\n{}",
            nft::linear(&set, UPLINK).map_err(anyhow::Error::msg)?
        );
        println!("# (b2)\n{}", plan.render(UPLINK, LAN, true));
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the end-to-end benchmark builds network namespaces: run it as root (cargo xtask bench)"
        );
    }
    for tool in ["iperf3", "nginx", "wrk", "nft", "ethtool", "ss"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            bail!("{tool} is not installed: run `cargo xtask setup`");
        }
    }
    let settings = Settings::from_env()?;
    let flowtable = rig::flowtable_supported();
    let prepared = settings
        .counts
        .iter()
        .map(|&n| prepare(n, flowtable))
        .collect::<anyhow::Result<Vec<_>>>()?;

    // Plain forwarding does not depend on the policies: measured once.
    eprintln!("e2e: {}", Mode::Plain.label());
    let plain = run_mode(&settings, None, Mode::Plain)?;
    let mut rows: Vec<(Mode, Vec<Cell>)> = vec![
        (Mode::Agent, Vec::new()),
        (Mode::Linear, Vec::new()),
        (Mode::Best, Vec::new()),
    ];
    for p in &prepared {
        for (mode, row) in &mut rows {
            eprintln!("e2e: {} with {} policies", mode.label(), p.n);
            row.push(
                run_mode(&settings, Some(p), *mode)
                    .with_context(|| format!("{} with {} policies", mode.label(), p.n))?,
            );
        }
    }
    rows.push((Mode::Plain, vec![plain; prepared.len()]));

    let mut out = String::new();
    let udp = if settings.udp_pps == 0 {
        "as fast as iperf3 sends".to_owned()
    } else {
        format!("offered at {} datagrams/s", settings.udp_pps)
    };
    let counts = &settings.counts;
    table(
        &mut out,
        &format!(
            "#### Gateway CPU per packet, UDP with 64-byte payloads {udp} (ns; lower is better)"
        ),
        counts,
        &rows,
        |c| &c.udp_cpu,
        0,
    );
    table(
        &mut out,
        "#### Gateway CPU per packet, TCP bulk, one iperf3 stream (ns; lower is better)",
        counts,
        &rows,
        |c| &c.tcp_cpu,
        0,
    );
    table(
        &mut out,
        "#### Gateway CPU per new TCP connection, wrk `Connection: close` to nginx (µs; lower is better)",
        counts,
        &rows,
        |c| &c.conn_cpu,
        1,
    );
    table(
        &mut out,
        "#### New TCP connections per second (higher is better; bounded by the load generators)",
        counts,
        &rows,
        |c| &c.conn_rate,
        0,
    );
    table(
        &mut out,
        "#### TCP bulk throughput, Mbit/s (higher is better; bounded by the load generators)",
        counts,
        &rows,
        |c| &c.tcp_mbps,
        0,
    );
    table(
        &mut out,
        &format!("#### UDP packets per second through the gateway, both directions ({udp})"),
        counts,
        &rows,
        |c| &c.udp_pps,
        0,
    );
    let _ = writeln!(
        out,
        "{} measured seconds per run after {} s of warm-up, {} runs per figure: median (min–max). (c) has no policies and is measured once; its figures repeat in every column. {}",
        settings.seconds,
        WARMUP.as_secs(),
        settings.runs,
        if flowtable {
            "(b2) includes the flowtable fast path (`flow add @ft`)."
        } else {
            "This kernel has no nftables flowtable (CONFIG_NF_FLOW_TABLE is not set), so (b2) runs without the fast path: established flows take the same conntrack path as (b1)."
        }
    );
    print!("{out}");
    Ok(())
}
