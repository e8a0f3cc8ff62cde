//! Per-packet cost of the dataplane via BPF_PROG_TEST_RUN (run by
//! `cargo xtask bench`, as root). Prints one markdown table.
//!
//! BPF_PROG_TEST_RUN runs the program `repeat` times on the same buffer, so a
//! translated packet would no longer be the packet that was measured. Two
//! policies make every repetition alike: flows from the client C leave from
//! X, flows from X leave from C. The packet alternates between C and X,
//! taking the same path each time.
//!
//! The established-flow figures repeat packets of flows already in the
//! tables. A new-flow figure needs the slow path on every repetition: those
//! dataplanes are loaded with the load-time constant `BENCH_MODE` = 2 (each
//! flow is recorded and then removed again: classification, port claim,
//! both inserts, the rewrite, plus the two removals) or = 1 (classification
//! and rewrite only, no table writes).

#[path = "shared/decoys.rs"]
mod decoys;
#[path = "../src/tests/packet.rs"]
#[expect(
    dead_code,
    reason = "the benchmark uses a subset of the test packet builders"
)]
mod packet;

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
};

use aya::programs::{TestRun as _, TestRunOptions};
use egress_agent::{
    geoip::{self, GeoTables, GeoWriter},
    identity::{
        Claim, Origin, SessionSpec,
        dataplane::{IdentityTries, class_rows},
        registry::{Limits, Registry},
    },
    loader::{Dataplane, LoadOptions},
    policy::{self, PolicySet},
    tables::{self, Tables},
};
use egress_common::maps;
use egress_tests::geodb;
use egress_tests::rng::Rng;

/// The client, and the address its flows are translated to (and back).
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
const SWAP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 200);
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// The same for IPv6: each swap pool is one address (a /128 range).
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 2);
const SWAP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xe0, 0, 0, 0, 0, 0x200);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);

struct Bench {
    dataplane: Dataplane,
    tables: Tables,
    tries: IdentityTries,
    set: Option<PolicySet>,
}

impl Bench {
    fn new(bench_mode: u8) -> Self {
        Self::with_countries(bench_mode, None)
    }

    /// A dataplane with the country tables reserved and `countries` written.
    fn with_countries(bench_mode: u8, countries: Option<&GeoTables>) -> Self {
        let mut dataplane = Dataplane::load(&LoadOptions {
            bench_mode,
            geo: countries.is_some(),
            ..LoadOptions::default()
        })
        .unwrap_or_else(|e| panic!("loading the dataplane: {e}"));
        if let Some(countries) = countries {
            GeoWriter::new(dataplane.ebpf_mut())
                .and_then(|mut w| w.apply(countries))
                .unwrap_or_else(|e| panic!("writing the country tables: {e}"));
        }
        tables::set_local_addrs(
            dataplane.ebpf_mut(),
            &[Ipv4Addr::new(203, 0, 113, 1).into()],
        )
        .unwrap();
        let tables = Tables::new(dataplane.ebpf_mut()).unwrap();
        let tries = IdentityTries::new(dataplane.ebpf_mut()).unwrap();
        Self {
            dataplane,
            tables,
            tries,
            set: None,
        }
    }

    fn apply(&mut self, json: &str) {
        let set = policy::parse(json).unwrap_or_else(|e| panic!("bench policy: {e}"));
        self.tables
            .apply(&set, &policy::compile(&set, &[]))
            .unwrap_or_else(|e| panic!("applying: {e}"));
        self.set = Some(set);
    }

    /// `n` sessions, one address each in 10.64.0.0/10 plus the client's,
    /// users in the groups the bench policies name. Returns the load time.
    fn sessions(&mut self, n: u32) -> std::time::Duration {
        let started = std::time::Instant::now();
        let mut registry = Registry::new(Limits {
            max_sessions: n as usize + 1,
            max_identities: n + 1,
            max_prefixes: n as usize + 1,
        });
        let spec = |user: String, group: String, addr: Ipv4Addr| SessionSpec {
            user,
            groups: [group].into(),
            posture: ["compliant".to_string()].into(),
            addresses: vec![Claim(std::net::IpAddr::V4(addr).into())],
            expires_at: None,
        };
        let mut upserts: Vec<_> = (0..n - 1)
            .map(|i| {
                let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + i);
                let s = spec(
                    format!("user{i}@example.com"),
                    format!("team-{}", i % 40),
                    addr,
                );
                (format!("s{i}"), s, Origin::Api)
            })
            .collect();
        let mut client = spec("client@example.com".into(), "team-1".into(), CLIENT);
        client
            .addresses
            .push(Claim(std::net::IpAddr::V6(CLIENT6).into()));
        upserts.push(("client".into(), client, Origin::Api));
        let pending = registry
            .prepare(upserts, vec![], jiff::Timestamp::now(), true)
            .unwrap_or_else(|e| panic!("bench sessions: {e}"));
        let change = registry.commit(pending);
        let set = self.set.as_ref().expect("policies applied first");
        let classes = class_rows(set, &change);
        self.tries
            .apply(&mut self.tables, &classes, &change)
            .unwrap_or_else(|e| panic!("writing sessions: {e}"));
        started.elapsed()
    }

    /// Nanoseconds per run of `program` over `repeat` repetitions of `input`.
    fn ns(&mut self, program: &'static str, input: &[u8], repeat: u32) -> f64 {
        let mut out = vec![0u8; input.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        };
        let result = self
            .dataplane
            .program(program)
            .unwrap()
            .test_run(opts)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"));
        if result.return_value != 0 {
            let counters = egress_agent::counters::read(self.dataplane.ebpf_mut()).unwrap();
            panic!(
                "the benchmarked packet must pass (TC_ACT_OK), got verdict {}; counters: {counters:?}",
                result.return_value
            );
        }
        // The kernel reports the mean duration per repetition.
        result.duration.as_nanos() as f64
    }
}

/// A policy set of `n` policies shaped like real ones: destination prefixes
/// of partners, protocols and ports, some for groups, a catch-all last.
fn policies(n: usize) -> String {
    let mut rng = Rng::new(0x2545_f491_4f6c_dd1d);
    // Destinations inside 198.18.0.0/15 (the benchmarking range).
    let within: ipnet::Ipv4Net = "198.18.0.0/15".parse().expect("a prefix");
    let mut out = Vec::with_capacity(n);
    for i in 0..n.saturating_sub(3) {
        let r = rng.u64();
        let mut extra = String::new();
        if r.is_multiple_of(5) {
            let _ = write!(extra, ", \"groups\": [\"team-{}\"]", r % 40);
        }
        let mut selector = decoys::selector(&mut rng, r, within, &[16, 20, 24, 28], &extra);
        // A third also name an IPv6 destination in 2001:2::/48 (the IPv6
        // benchmarking range).
        if r.is_multiple_of(3) {
            let v = rng.u64();
            let len = [56, 60, 64][(v % 3) as usize];
            let addr = u128::from(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0))
                | (u128::from((v >> 8) as u16) << 64);
            let net = ipnet::Ipv6Net::new(Ipv6Addr::from(addr), len)
                .unwrap()
                .trunc();
            selector = selector.replacen("\"dst\": [", &format!("\"dst\": [\"{net}\", "), 1);
        }
        out.push(format!(
            r#"{{ "name": "p{i}", "selector": {{ {selector} }}, "action": {{ "egress": "pool{}" }} }}"#,
            i % 4
        ));
    }
    // The pair that makes repetitions alike (see the module comment), last
    // before the catch-all so classification has to reach the end.
    out.push(format!(r#"{{ "name": "bench-c", "selector": {{ "src": ["{CLIENT}", "{CLIENT6}"] }}, "action": {{ "egress": "to-x" }} }}"#));
    out.push(format!(r#"{{ "name": "bench-x", "selector": {{ "src": ["{SWAP}", "{SWAP6}"] }}, "action": {{ "egress": "to-c" }} }}"#));
    out.push(
        r#"{ "name": "catch-all", "selector": {}, "action": { "egress": "default" } }"#.to_owned(),
    );
    format!(
        r#"{{ "egress_pools": {{ "pool0": {{ "ipv4": ["203.0.113.10"] }}, "pool1": {{ "ipv4": ["203.0.113.11"] }},
             "pool2": {{ "ipv4": ["203.0.113.12"] }}, "pool3": {{ "ipv4": ["203.0.113.13"] }},
             "to-x": {{ "ipv4": ["{SWAP}"], "ipv6": "{SWAP6}/128" }},
             "to-c": {{ "ipv4": ["{CLIENT}"], "ipv6": "{CLIENT6}/128" }} }},
           "default_egress": {{ "ipv4": "203.0.113.1", "ipv6": "2001:db8:ff::1" }},
           "policies": [{}] }}"#,
        out.join(",\n")
    )
}

/// An address in the middle of the IPv6 /16 that holds the most country
/// ranges.
fn busiest_v6_bucket(countries: &GeoTables) -> Ipv6Addr {
    let (_, bucket) = countries
        .buckets
        .iter()
        .enumerate()
        .max_by_key(|(_, b)| b.count)
        .expect("the IPv6 bucket index has 65 536 entries");
    let range = &countries.ranges6[(bucket.first + bucket.count / 2) as usize];
    Ipv6Addr::from((u128::from(range.start_hi) << 64 | u128::from(range.start_lo)) + 1)
}

struct Row {
    what: String,
    runs: Vec<f64>,
}

impl Row {
    fn median(&self) -> f64 {
        let mut v = self.runs.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the dataplane benchmark loads BPF programs: run it as root (cargo xtask bench)");
        std::process::exit(1);
    }
    let repeat: u32 = std::env::var("EGRESS_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let runs: usize = std::env::var("EGRESS_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let client = SocketAddrV4::new(CLIENT, 40000);
    let swapped = SocketAddrV4::new(SWAP, 40000);
    let server = SocketAddrV4::new(SERVER, 443);
    let client6 = SocketAddrV6::new(CLIENT6, 40000, 0, 0);
    let swapped6 = SocketAddrV6::new(SWAP6, 40000, 0, 0);
    let server6 = SocketAddrV6::new(SERVER6, 443, 0, 0);
    let mut rows: Vec<Row> = Vec::new();
    let mut measure = |what: String, bench: &mut Bench, program: &'static str, input: &[u8]| {
        let runs: Vec<f64> = (0..runs)
            .map(|_| bench.ns(program, input, repeat))
            .collect();
        rows.push(Row { what, runs });
    };

    // Established flows: C -> S leaves as X; X -> S leaves as C. One packet
    // of each direction creates the four entries the repetitions then hit.
    {
        let mut bench = Bench::new(0);
        bench.apply(&policies(256));
        let out = packet::tcp(client, server, false, &[0u8; 64]);
        bench.ns(maps::PROG_EGRESS, &out, 1);
        bench.ns(
            maps::PROG_EGRESS,
            &packet::tcp(swapped, server, false, &[0u8; 64]),
            1,
        );
        measure(
            "established flow, egress (IPv4 TCP)".into(),
            &mut bench,
            maps::PROG_EGRESS,
            &out,
        );
        let reply = packet::tcp(server, swapped, false, &[0u8; 64]);
        measure(
            "established flow, reply on ingress (IPv4 TCP)".into(),
            &mut bench,
            maps::PROG_INGRESS,
            &reply,
        );
        let stray = packet::tcp(
            server,
            SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 1), 22),
            false,
            &[0u8; 64],
        );
        measure(
            "ingress packet of no translated flow (passed)".into(),
            &mut bench,
            maps::PROG_INGRESS,
            &stray,
        );
        // The same pair of flows over IPv6.
        let out6 = packet::tcp6(client6, server6, false, &[0u8; 64]);
        bench.ns(maps::PROG_EGRESS, &out6, 1);
        bench.ns(
            maps::PROG_EGRESS,
            &packet::tcp6(swapped6, server6, false, &[0u8; 64]),
            1,
        );
        measure(
            "established flow, egress (IPv6 TCP)".into(),
            &mut bench,
            maps::PROG_EGRESS,
            &out6,
        );
        let reply6 = packet::tcp6(server6, swapped6, false, &[0u8; 64]);
        measure(
            "established flow, reply on ingress (IPv6 TCP)".into(),
            &mut bench,
            maps::PROG_INGRESS,
            &reply6,
        );
    }

    // New flows at growing policy counts, taken by a rule at the end of the list.
    for v6 in [false, true] {
        for mode in [2u8, 1] {
            for n in [10usize, 256, 4096] {
                let mut bench = Bench::new(mode);
                bench.apply(&policies(n));
                let (syn, family) = if v6 {
                    (packet::tcp6(client6, server6, true, &[0u8; 64]), "IPv6, ")
                } else {
                    (packet::tcp(client, server, true, &[0u8; 64]), "")
                };
                let what = if mode == 2 {
                    format!("new flow: classify, claim, insert, rewrite ({family}{n} policies)")
                } else {
                    format!("new flow: classify and rewrite only ({family}{n} policies)")
                };
                measure(what, &mut bench, maps::PROG_EGRESS, &syn);
            }
        }
    }

    // The same at 4096 policies with 100 000 sessions loaded (the client
    // among them), then also with the full public country database.
    let mut notes = Vec::new();
    let db = match geodb::fetch() {
        Ok(db) => {
            let started = std::time::Instant::now();
            let (tables, _) =
                geoip::load(&db.csv()).unwrap_or_else(|e| panic!("country database: {e}"));
            notes.push(format!(
                "country database {} (CSV) read and converted in {:.2?}",
                geodb::VERSION,
                started.elapsed()
            ));
            Some(tables)
        }
        Err(e) => {
            notes.push(format!("country database rows skipped: {e:#}"));
            None
        }
    };
    // Sessions alone first, then sessions and countries.
    for countries in std::iter::once(None).chain(db.as_ref().map(Some)) {
        let label = if countries.is_some() {
            "4096 policies, 100 000 sessions, country database"
        } else {
            "4096 policies, 100 000 sessions"
        };
        for mode in [2u8, 1] {
            let mut bench = Bench::with_countries(mode, countries);
            bench.apply(&policies(4096));
            let took = bench.sessions(100_000);
            if mode == 2 && countries.is_none() {
                notes.push(format!("100 000 sessions written in {took:.2?}"));
            }
            let syn = packet::tcp(client, server, true, &[0u8; 64]);
            let what = if mode == 2 {
                format!("new flow: classify, claim, insert, rewrite ({label})")
            } else {
                format!("new flow: classify and rewrite only ({label})")
            };
            measure(what, &mut bench, maps::PROG_EGRESS, &syn);
            // IPv6: with countries, a destination in the /16 holding the
            // most ranges, so the binary search takes its longest path.
            let dst6 = countries.map_or(SERVER6, busiest_v6_bucket);
            let syn6 = packet::tcp6(
                client6,
                SocketAddrV6::new(dst6, 443, 0, 0),
                true,
                &[0u8; 64],
            );
            let what = if mode == 2 {
                format!("new flow: classify, claim, insert, rewrite (IPv6, {label})")
            } else {
                format!("new flow: classify and rewrite only (IPv6, {label})")
            };
            measure(what, &mut bench, maps::PROG_EGRESS, &syn6);
        }
    }

    println!("| path | median ns/packet | min | max |");
    println!("|---|---:|---:|---:|");
    for row in &rows {
        let min = row.runs.iter().copied().fold(f64::INFINITY, f64::min);
        let max = row.runs.iter().copied().fold(0.0, f64::max);
        println!(
            "| {} | {:.0} | {:.0} | {:.0} |",
            row.what,
            row.median(),
            min,
            max
        );
    }
    println!();
    println!(
        "BPF_PROG_TEST_RUN, {repeat} repetitions per run, {runs} runs per row; the kernel reports the mean per repetition of each run."
    );
    for note in notes {
        println!("{note}.");
    }
}
