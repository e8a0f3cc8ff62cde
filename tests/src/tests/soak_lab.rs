//! The soak: mixed IPv4/IPv6 TCP, UDP and ICMP traffic from many client
//! addresses for `EGRESS_SOAK_SECONDS` (60 by default, the CI smoke run;
//! `cargo xtask soak --minutes N` for long ones) while the policy file
//! flips between two variants and finance sessions come and go; then the
//! traffic stops and the sweeper must empty the tables. Reports flows,
//! bytes verified, peak table fill, the agent's memory and what the
//! sweeper left, and writes the report to `EGRESS_SOAK_REPORT` if set.

use std::{
    fmt::Write as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use egress_agent::{
    conntrack::{self, Flow, TableFill},
    inspect::Pinned,
    policy::{self, model::Timeouts},
};

use super::prog_test_run::require_root;
use crate::rng::Rng;
use crate::{
    agent::Agent,
    lab::{Lab, UPLINK, servers},
    pins::PinPath,
    probe::Servers,
    soak::{EXTRA_EGRESS, FINANCE, Load, State, Timeline, Traffic, Variant, policy_file},
    tempdir::TempDir,
};

/// Client addresses per family (10.10.0.2-17, fd00:10::2-11).
const CLIENTS: u8 = 16;
/// Connection table capacity (each direction, each family).
const MAX_FLOWS: u32 = 32_768;
/// How much the agent's resident memory may grow between the end of the
/// warm-up and the end of the traffic.
const RSS_GROWTH_BOUND: u64 = 16 << 20;
const RELOAD_EVERY: Duration = Duration::from_secs(3);
const SESSION_CHANGE_EVERY: Duration = Duration::from_secs(1);
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Dataplane counters the report shows.
const DATAPLANE_FIGURES: [&str; 6] = [
    "flows_new",
    "flows_translated",
    "flows_bypassed",
    "fragments_translated",
    "port_collisions",
    "flow_races",
];
/// Allowance beyond timeout + sweep interval: the interval runs from the
/// end of one walk to the start of the next, and a walk of a few thousand
/// flows (three lookups each, in a debug build, on a shared machine) takes
/// a good part of a second.
const SWEEP_SLACK: Duration = Duration::from_secs(2);

/// The pid of the agent listening on `api` (its command line names it).
fn agent_pid(api: &Path) -> u32 {
    let api = api.to_str().expect("API paths are UTF-8");
    std::fs::read_dir("/proc")
        .expect("reading /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| {
                let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
                args.first().is_some_and(|a| a.ends_with(b"egress-agent"))
                    && args.contains(&api.as_bytes())
            })
        })
        .unwrap_or_else(|| panic!("no egress-agent process with --api {api}"))
}

/// VmRSS of `pid` in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// Flows idle longer than their timeout plus one sweep interval (and the
/// slack): ones the sweeper should have removed. Returns how many and how
/// far past its timeout the idlest flow is.
fn overdue(flows: &[Flow], t: &Timeouts, sweep: Duration) -> (usize, Duration) {
    let now = conntrack::now_ns();
    let mut count = 0;
    let mut worst = Duration::ZERO;
    for f in flows {
        let limit = conntrack::timeout(t, f.protocol, f.flags, f.traffic.packets_in > 0);
        let idle = Duration::from_nanos(now.saturating_sub(f.last_seen_ns));
        worst = worst.max(idle.saturating_sub(limit));
        if idle > limit + sweep + SWEEP_SLACK {
            count += 1;
        }
    }
    (count, worst)
}

/// What the sampler saw while the traffic ran.
#[derive(Default)]
struct Samples {
    count: usize,
    /// Peak entries of EG_CT4, EG_NAT4, EG_CT6, EG_NAT6.
    peak: [TableFill; 4],
    peak_flows: usize,
    peak_rss: u64,
    /// The most overdue flows seen in one walk, and the worst overshoot of
    /// a timeout seen at all.
    max_overdue: usize,
    worst_overshoot: Duration,
}

impl Samples {
    fn take(&mut self, pinned: &Pinned, pid: u32, t: &Timeouts, sweep: Duration) {
        let census = pinned
            .census()
            .unwrap_or_else(|e| panic!("counting the connection tables: {e:#}"));
        for (peak, now) in self.peak.iter_mut().zip(census.tables) {
            if now.entries >= peak.entries {
                *peak = now;
            }
        }
        self.peak_flows = self.peak_flows.max(census.flows4 + census.flows6);
        let flows = pinned
            .flows()
            .unwrap_or_else(|e| panic!("reading the connection tables: {e:#}"));
        let (n, worst) = overdue(&flows, t, sweep);
        self.max_overdue = self.max_overdue.max(n);
        self.worst_overshoot = self.worst_overshoot.max(worst);
        self.peak_rss = self.peak_rss.max(rss(pid));
        self.count += 1;
    }
}

/// Clears its flag when dropped: a failing soak stops its sampler too.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// The duration asked for in `EGRESS_SOAK_SECONDS` (fractions allowed).
fn soak_duration() -> Duration {
    match std::env::var("EGRESS_SOAK_SECONDS") {
        Ok(s) => {
            let secs: f64 = s
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("EGRESS_SOAK_SECONDS={s:?}: {e}"));
            assert!(
                secs.is_finite() && secs >= 5.0,
                "EGRESS_SOAK_SECONDS must be at least 5, is {s}"
            );
            Duration::from_secs_f64(secs)
        }
        Err(_) => Duration::from_secs(60),
    }
}

/// Add (`present`) or remove the finance session of client `i` through the
/// CLI (which asks the agent's control API).
fn set_session(agent: &Agent, i: u8, present: bool) {
    let id = format!("soak-{i}");
    let result = if present {
        let user = format!("user{i}@example.com");
        let addresses = format!("{},{}", Lab::client_addr(i), Lab::client_addr6(i));
        agent.cli(&[
            "session",
            "add",
            &id,
            "--user",
            &user,
            "--group",
            FINANCE,
            "--address",
            &addresses,
        ])
    } else {
        agent.cli(&["session", "rm", &id])
    };
    result.unwrap_or_else(|e| panic!("session change for client {i} must be accepted: {e:#}"));
}

#[test]
fn soak_mixed_traffic_under_reloads_and_session_churn_intact_and_swept() {
    require_root();
    let duration = soak_duration();
    let warm_up = (duration / 4).min(Duration::from_secs(10));
    let lab = Lab::new(CLIENTS - 1).unwrap();
    for addr in EXTRA_EGRESS {
        lab.gw
            .ip(&["addr", "add", &format!("{addr}/32"), "dev", UPLINK])
            .unwrap();
    }
    let _servers = Servers::start(&lab.inet, &servers(), &[443, 8000]).unwrap();
    let dir = TempDir::new("soak");
    let config = dir.write("policies.json", &policy_file(Variant::A));
    let timeouts = policy::parse::parse(&policy_file(Variant::A))
        .expect("the soak's policy file is valid")
        .timeouts;
    let sweep = conntrack::sweep_interval(&timeouts);
    let pins = PinPath::new().unwrap();
    let max_flows = MAX_FLOWS.to_string();
    let mut agent = Agent::steering(
        &lab,
        &config,
        &[
            "--pin-path",
            pins.arg(),
            "--max-flows",
            &max_flows,
            // Reloads happen when the driver asks, never on its own.
            "--no-watch",
        ],
    )
    .expect("the agent must start steering");
    let pid = agent_pid(agent.api());
    let pinned = Pinned::new(pins.path());

    let timeline = Arc::new(Timeline::new(State {
        variant: Variant::A,
        sessions: 0,
    }));
    let traffic = Traffic::start(&lab, CLIENTS, Arc::clone(&timeline), Load::default()).unwrap();
    let started = Instant::now();

    // The sampler: table fill, overdue flows and memory every two seconds.
    let sampling = Arc::new(AtomicBool::new(true));
    let _stop_sampling = StopOnDrop(Arc::clone(&sampling));
    let sampler = {
        let (sampling, pinned) = (Arc::clone(&sampling), pinned.clone());
        std::thread::spawn(move || {
            let mut samples = Samples::default();
            while sampling.load(Ordering::Relaxed) {
                samples.take(&pinned, pid, &timeouts, sweep);
                std::thread::sleep(SAMPLE_EVERY);
            }
            samples
        })
    };

    // The churn: one change at a time, each confirmed by the agent.
    let mut rng = Rng::new(0x5eed);
    let (mut reloads, mut adds, mut removes) = (0u64, 0u64, 0u64);
    let mut rss_start = None;
    let mut next_reload = started + RELOAD_EVERY;
    let mut next_session = started + SESSION_CHANGE_EVERY;
    let mut next_progress = started + Duration::from_secs(10);
    while started.elapsed() < duration {
        let now = Instant::now();
        if rss_start.is_none() && now >= started + warm_up {
            rss_start = Some(rss(pid));
        }
        if now >= next_reload {
            let mut state = timeline.latest();
            state.variant = state.variant.other();
            dir.write("policies.json", &policy_file(state.variant));
            let index = timeline.announce(state);
            agent
                .cli(&["reload"])
                .unwrap_or_else(|e| panic!("reload {} must be applied: {e:#}", reloads + 1));
            timeline.applied(index);
            reloads += 1;
            next_reload += RELOAD_EVERY;
        } else if now >= next_session {
            let i = rng.below(usize::from(CLIENTS)) as u8;
            let mut state = timeline.latest();
            let present = !state.has_session(i);
            state.sessions ^= 1 << i;
            let index = timeline.announce(state);
            set_session(&agent, i, present);
            timeline.applied(index);
            if present {
                adds += 1;
            } else {
                removes += 1;
            }
            next_session += SESSION_CHANGE_EVERY;
        } else if now >= next_progress {
            eprintln!(
                "soak: {:.0?} of {duration:?}: {}, {reloads} reloads, {} session changes",
                started.elapsed(),
                traffic.progress(),
                adds + removes
            );
            next_progress += Duration::from_secs(10);
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let traffic_time = started.elapsed();
    let rss_start = rss_start.unwrap_or_else(|| rss(pid));
    let report = traffic.finish();
    let rss_end = rss(pid);
    sampling.store(false, Ordering::Relaxed);
    let samples = sampler.join().expect("the sampler must not panic");

    // The drain: every flow has ended; after its timeout and a sweep the
    // tables must be empty.
    let longest = timeouts
        .tcp_established
        .max(timeouts.tcp_transitory)
        .max(timeouts.tcp_closed)
        .max(timeouts.udp)
        .max(timeouts.icmp);
    let drain_started = Instant::now();
    let drain_limit = longest + 2 * sweep + SWEEP_SLACK;
    let entries = |p: &Pinned| {
        p.census()
            .unwrap_or_else(|e| panic!("counting the connection tables: {e:#}"))
            .tables
    };
    let mut left = entries(&pinned);
    while left.iter().any(|t| t.entries > 0) && drain_started.elapsed() < drain_limit {
        std::thread::sleep(Duration::from_millis(250));
        left = entries(&pinned);
    }
    let drained_in = drain_started.elapsed();
    let flows_left = pinned.flows().expect("reading the connection tables");
    let (expired_left, _) = overdue(&flows_left, &timeouts, sweep);
    let entries_left: usize = left.iter().map(|t| t.entries).sum();
    let rss_drained = rss(pid);
    let drops: Vec<(&str, u64)> = pinned
        .counters()
        .expect("reading the dataplane counters")
        .into_iter()
        .filter(|(name, value)| name.starts_with("drop_") && *value > 0)
        .collect();
    let dataplane: Vec<(&str, u64)> = pinned
        .counters()
        .expect("reading the dataplane counters")
        .into_iter()
        .filter(|(name, _)| DATAPLANE_FIGURES.contains(name))
        .collect();
    let status = agent.stop().expect("stopping the agent");

    // REPORT
    let mut out = String::new();
    let _ = writeln!(out, "== egress soak report ==");
    let _ = writeln!(
        out,
        "traffic        {traffic_time:.1?} from {CLIENTS} IPv4 + {CLIENTS} IPv6 client addresses; warm-up {warm_up:?}"
    );
    let _ = writeln!(
        out,
        "flows by kind (exact/window src: sources checked against one policy state / against the states of a change in flight)"
    );
    let _ = write!(out, "{report}");
    let _ = writeln!(
        out,
        "dataplane      {}",
        dataplane
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = writeln!(
        out,
        "corrupted      {} bytes; wrong sources {}",
        report.total.corrupted, report.total.wrong_source
    );
    let _ = writeln!(
        out,
        "churn          {reloads} reloads (policy files A/B alternating, every {RELOAD_EVERY:?}); {} session changes ({adds} added, {removes} removed, every {SESSION_CHANGE_EVERY:?})",
        adds + removes
    );
    let _ = writeln!(
        out,
        "peak map fill  {} (peak flows {}; {} samples every {SAMPLE_EVERY:?})",
        samples
            .peak
            .iter()
            .map(|t| format!(
                "{} {}/{} ({:.2}%)",
                t.name,
                t.entries,
                t.capacity,
                100.0 * t.entries as f64 / f64::from(t.capacity.max(1))
            ))
            .collect::<Vec<_>>()
            .join(", "),
        samples.peak_flows,
        samples.count
    );
    let _ = writeln!(
        out,
        "agent RSS      start {} (after warm-up), end {} (end of traffic), peak {}, after drain {}; bound: end <= start + {}",
        mib(rss_start),
        mib(rss_end),
        mib(samples.peak_rss.max(rss_end)),
        mib(rss_drained),
        mib(RSS_GROWTH_BOUND)
    );
    let _ = writeln!(
        out,
        "sweeper        timeouts tcp {:?}/{:?}/{:?} (established/transitory/closed), udp {:?}, icmp {:?}; sweep every {sweep:?}",
        timeouts.tcp_established,
        timeouts.tcp_transitory,
        timeouts.tcp_closed,
        timeouts.udp,
        timeouts.icmp
    );
    let _ = writeln!(
        out,
        "               during traffic: at most {} flows overdue (idle > timeout + sweep + {SWEEP_SLACK:?}) in one walk, idlest {:.1?} past its timeout",
        samples.max_overdue, samples.worst_overshoot
    );
    let _ = writeln!(
        out,
        "               after traffic: tables empty in {drained_in:.1?}; entries left {entries_left} ({}), expired entries left {expired_left}",
        left.iter()
            .map(|t| format!("{} {}", t.name, t.entries))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        out,
        "drops          {}",
        if drops.is_empty() {
            "none".to_owned()
        } else {
            drops
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        }
    );
    for p in &report.problems {
        let _ = writeln!(out, "problem        {p}");
    }
    println!("{out}");
    if let Some(path) = std::env::var_os("EGRESS_SOAK_REPORT") {
        std::fs::write(&path, &out).unwrap_or_else(|e| {
            panic!("writing the report to {}: {e}", Path::new(&path).display())
        });
    }

    // CHECK
    assert!(status.success(), "the agent must exit cleanly: {status}");
    for (kind, r) in &report.kinds {
        assert!(r.flows > 0, "{kind} flows must have run during the soak");
    }
    assert_eq!(report.total.corrupted, 0, "no byte may come back altered");
    assert_eq!(
        report.total.wrong_source, 0,
        "every flow must leave from the egress its policy gives"
    );
    assert_eq!(
        report.total.failed, 0,
        "every flow must complete with every byte echoed: {:#?}",
        report.problems
    );
    assert!(
        reloads > 0 && adds > 0 && removes > 0,
        "the soak must reload and add and remove sessions"
    );
    assert!(
        rss_end <= rss_start + RSS_GROWTH_BOUND,
        "the agent's memory must not grow by more than {} (from {} to {})",
        mib(RSS_GROWTH_BOUND),
        mib(rss_start),
        mib(rss_end)
    );
    assert_eq!(
        samples.max_overdue, 0,
        "the sweeper must remove every flow within its timeout and one sweep"
    );
    assert_eq!(
        expired_left, 0,
        "the sweeper must leave no expired entries: {flows_left:#?}"
    );
    assert_eq!(
        entries_left, 0,
        "with the traffic stopped, every entry expires and the tables end empty: {left:?}"
    );
    assert!(
        drops.is_empty(),
        "the dataplane must drop nothing of this traffic: {drops:?}"
    );
}
