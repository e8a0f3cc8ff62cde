//! Control-plane scale (run by `cargo xtask bench`, as root): an agent on
//! the lab gateway started with 4096 policies, 100 000 sessions and the full
//! country database; how long it takes to start steering, how much kernel
//! memory its maps hold, how long a reload takes, and how long a one-policy
//! change on disk takes to reach new flows. Prints one markdown table.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

#[path = "shared/decoys.rs"]
mod decoys;

use egress_tests::rng::Rng;
use egress_tests::{
    agent::{self, Agent},
    geodb,
    lab::{DEDICATED_PRIMARY, DEDICATED_SECONDARY, Lab, SERVER_PUBLIC, servers},
    netns,
    probe::{self, Servers, sa},
    tempdir::TempDir,
};

const POLICIES: usize = 4096;
const SESSIONS: u32 = 100_000;
/// One-policy changes timed (alternating between the two pools).
const CHANGES: usize = 7;

/// `n` policies shaped like real ones (destination prefixes in
/// 198.18.0.0/15, protocols, ports, a fifth for a group, some for
/// countries), then the probed policy sending the public server through
/// pool `probe_pool`, then a catch-all.
fn policies(n: usize, probe_pool: &str) -> String {
    let mut rng = Rng::new(0x2545_f491_4f6c_dd1d);
    let within: ipnet::Ipv4Net = "198.18.0.0/15".parse().expect("a prefix");
    let mut out = Vec::with_capacity(n);
    for i in 0..n - 2 {
        let r = rng.u64();
        let mut extra = String::new();
        if r.is_multiple_of(5) {
            let _ = write!(extra, ", \"groups\": [\"team-{}\"]", r % 40);
        }
        if r.is_multiple_of(7) {
            let _ = write!(extra, ", \"dst_countries\": [\"PT\", \"ES\"]");
        }
        let selector = decoys::selector(&mut rng, r, within, &[16, 20, 24, 28], &extra);
        out.push(format!(
            r#"{{ "name": "p{i}", "selector": {{ {selector} }}, "action": {{ "egress": "{}" }} }}"#,
            if i % 2 == 0 { "a" } else { "b" }
        ));
    }
    out.push(format!(
        r#"{{ "name": "probe", "selector": {{ "dst": ["{SERVER_PUBLIC}/32"], "protocols": ["tcp"], "dst_ports": ["443"] }}, "action": {{ "egress": "{probe_pool}" }} }}"#
    ));
    out.push(
        r#"{ "name": "catch-all", "selector": {}, "action": { "egress": "default" } }"#.into(),
    );
    format!(
        r#"{{ "egress_pools": {{ "a": {{ "ipv4": ["{DEDICATED_PRIMARY}"] }}, "b": {{ "ipv4": ["{DEDICATED_SECONDARY}"] }} }},
  "default_egress": {{ "ipv4": "203.0.113.1" }},
  "policies": [
    {}
  ] }}"#,
        out.join(",\n    ")
    )
}

/// `n` sessions, one address each in 10.64.0.0/10, users in 40 groups.
fn identities(n: u32) -> String {
    let base = u32::from(Ipv4Addr::new(10, 64, 0, 0));
    let sessions: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"id":"s{i}","user":"user{i}@example.com","groups":["team-{}"],"posture":["compliant"],"addresses":["{}"]}}"#,
                i % 40,
                Ipv4Addr::from(base + i)
            )
        })
        .collect();
    format!("{{\"sessions\": [{}]}}", sessions.join(",\n"))
}

/// Kernel memory charged to the agent's maps: the `memlock` of every
/// distinct map among its open file descriptors, by map name.
fn map_memory(pid: u32) -> anyhow::Result<Vec<(String, u64)>> {
    let mut seen = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            seen.insert(id, memlock);
        }
    }
    let mut named: Vec<(String, u64)> = seen
        .into_iter()
        .map(|(id, memlock)| {
            let name = aya::maps::MapInfo::from_id(id as u32)
                .ok()
                .and_then(|info| info.name_as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("map {id}"));
            (name, memlock)
        })
        .collect();
    named.sort_by_key(|(_, memlock)| std::cmp::Reverse(*memlock));
    Ok(named)
}

/// Milliseconds from writing the file until a new flow to the public
/// server leaves from `expected`.
fn change_reaches_flows(lab: &Lab, dir: &TempDir, text: &str, expected: Ipv4Addr) -> f64 {
    let started = Instant::now();
    dir.write("policies.json", text);
    for attempt in 0u32.. {
        let seen = probe::tcp(
            &lab.client,
            None,
            sa(SERVER_PUBLIC, 443),
            probe::token(&format!("change-{attempt}")),
        )
        .unwrap_or_else(|e| panic!("probe flow: {e:#}"));
        if seen.src.ip() == IpAddr::from(expected) {
            return started.elapsed().as_secs_f64() * 1e3;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the changed policy never reached new flows"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    unreachable!()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn log_line<'a>(lines: &'a [String], needle: &str) -> &'a str {
    lines.iter().find(|l| l.contains(needle)).map_or("", |l| {
        l.split_once("] ").map_or(l.as_str(), |(_, rest)| rest)
    })
}

fn main() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "the control-plane benchmark builds a lab: run it as root (cargo xtask bench)"
        );
    }
    let bin = agent::binary();
    netns::remove_stale()?;
    let db = geodb::fetch()?;
    let lab = Lab::new(0)?;
    let _servers = Servers::start(&lab.inet, &servers(), &[443])?;
    let dir = TempDir::new("bench-control");
    let config = dir.write("policies.json", &policies(POLICIES, "a"));
    let ids = dir.write("identities.json", &identities(SESSIONS));
    let mmdb: PathBuf = db.mmdb.clone();
    let args: Vec<String> = [
        "--identities",
        path(&ids),
        "--geoip",
        path(&mmdb),
        "--max-sessions",
        "131071",
        // 4096 overlapping generated policies may need more than the
        // default 16 384 classes, as a large real set may.
        "--max-classes",
        "32768",
    ]
    .map(str::to_owned)
    .to_vec();
    let extra: Vec<&str> = args.iter().map(String::as_str).collect();

    let started = Instant::now();
    let agent = Agent::start_gateway(&bin, &lab, &config, &extra)?;
    agent.wait_ready()?;
    let start_ms = started.elapsed().as_secs_f64() * 1e3;
    let lines = agent.lines();
    let pid = agent.pid().expect("the agent runs");
    let memory = map_memory(pid)?;
    let total: u64 = memory.iter().map(|(_, m)| m).sum();

    // A reload of the whole set (nothing changed: every table rewritten).
    let mut reloads: Vec<f64> = (0..3)
        .map(|_| {
            let t = Instant::now();
            agent.cli(&["reload"]).expect("reload");
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();

    let mut changes: Vec<f64> = (0..CHANGES)
        .map(|i| {
            let (pool, addr) = if i % 2 == 0 {
                ("b", DEDICATED_SECONDARY)
            } else {
                ("a", DEDICATED_PRIMARY)
            };
            let ms = change_reaches_flows(&lab, &dir, &policies(POLICIES, pool), addr);
            // Let the next change be a change of its own.
            std::thread::sleep(Duration::from_millis(600));
            ms
        })
        .collect();

    println!(
        "| control plane ({POLICIES} policies, {SESSIONS} sessions, full country database) | value |"
    );
    println!("|---|---:|");
    println!("| agent start until steering (compile, load, attach) | {start_ms:.0} ms |");
    println!(
        "| kernel memory of the maps ({} maps, memlock) | {:.1} MiB |",
        memory.len(),
        total as f64 / 1048576.0
    );
    println!(
        "| reload of the policy file (`egress-agent reload`, median of 3) | {:.0} ms |",
        median(&mut reloads)
    );
    println!(
        "| one-policy change on disk until new flows use it (median of {CHANGES}; min {:.0}, max {:.0}) | {:.0} ms |",
        changes.iter().copied().fold(f64::INFINITY, f64::min),
        changes.iter().copied().fold(0.0, f64::max),
        median(&mut changes)
    );
    let largest: Vec<String> = memory
        .iter()
        .take(8)
        .map(|(name, m)| format!("{name} {:.1}", *m as f64 / 1048576.0))
        .collect();
    println!();
    println!("Largest maps (MiB): {}.", largest.join(", "));
    println!();
    println!(
        "Agent: {} (release build when `cargo xtask bench` runs it). From its log:",
        bin.display()
    );
    for needle in ["identities file", "country databases:", "steering on "] {
        let line = log_line(&lines, needle);
        if !line.is_empty() {
            println!("- `{line}`");
        }
    }
    println!(
        "- The change is noticed by the file watch (polled every 0.5 s, applied after 0.5 s of stillness), so about a second of the change time is that debounce."
    );
    Ok(())
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}
