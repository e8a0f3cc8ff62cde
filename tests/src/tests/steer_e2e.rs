//! Lab tests: the real agent on the gateway namespace, real sockets in the
//! client and internet namespaces, and servers reporting the source address
//! they saw.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};

use super::prog_test_run::require_root;
use crate::{
    agent::{self, Agent},
    lab::{
        CLIENT, DEDICATED_PRIMARY, GW_UPLINK, Lab, SERVER_INTERNAL, SERVER_PARTNER, SERVER_PUBLIC,
        UPLINK, servers,
    },
    netns::NetNs,
    probe::{self, Servers, pattern, sa},
    tempdir::TempDir,
};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/policies.json")
        .canonicalize()
        .unwrap()
}

/// Program ids attached to `iface` through tcx, seen from inside `ns`.
pub(super) fn tcx_programs(ns: &NetNs, iface: &'static str) -> usize {
    ns.run(move || {
        let mut n = 0;
        for attach in [TcAttachType::Ingress, TcAttachType::Egress] {
            n += SchedClassifier::query_tcx(iface, attach)
                .map(|(_, programs)| programs.len())
                .unwrap_or(0);
        }
        Ok(n)
    })
    .unwrap()
}

#[test]
fn steer_example_policies_each_flow_leaves_from_its_policy_address() {
    require_root();
    let lab = Lab::new(0).unwrap();
    let servers = Servers::start(&lab.inet, &servers(), &[443, 8080, 9000]).unwrap();
    let mut agent = Agent::steering(&lab, &example(), &[]).unwrap();
    assert_eq!(
        tcx_programs(&lab.gw, UPLINK),
        2,
        "egress and ingress programs attached"
    );

    let payload = pattern(256 * 1024, 0);
    let cases = [
        (
            SERVER_PARTNER,
            443,
            DEDICATED_PRIMARY,
            "dedicated pool (dst 192.0.2.0/24, port 443)",
        ),
        (
            SERVER_PARTNER,
            8080,
            DEDICATED_PRIMARY,
            "dedicated pool (port range 8000-8100)",
        ),
        (
            SERVER_PARTNER,
            9000,
            GW_UPLINK,
            "default egress (port outside the policy)",
        ),
        (SERVER_PUBLIC, 443, GW_UPLINK, "default egress (catch-all)"),
        (
            SERVER_INTERNAL,
            443,
            CLIENT,
            "the client's own address (bypass)",
        ),
    ];
    for (server, port, expected, why) in cases {
        let seen = probe::tcp(&lab.client, None, sa(server, port), payload.clone())
            .unwrap_or_else(|e| panic!("TCP to {server}:{port}: {e:#}"));
        assert_eq!(
            seen.src.ip(),
            IpAddr::V4(expected),
            "TCP to {server}:{port} must leave from {why}"
        );
        assert!(
            seen.intact,
            "TCP to {server}:{port}: 256 KiB must come back intact"
        );

        let seen = probe::udp(&lab.client, None, sa(server, port), pattern(1200, 0))
            .unwrap_or_else(|e| panic!("UDP to {server}:{port}: {e:#}"));
        assert_eq!(
            seen.src.ip(),
            IpAddr::V4(expected),
            "UDP to {server}:{port} must leave from {why}"
        );
        assert!(
            seen.intact,
            "UDP to {server}:{port}: the datagram must come back intact"
        );
    }
    for (server, expected, why) in [
        (
            SERVER_PARTNER,
            GW_UPLINK,
            "default egress (icmp is not in the dedicated policy)",
        ),
        (SERVER_INTERNAL, CLIENT, "the client's own address (bypass)"),
    ] {
        let seen = probe::ping(&lab.client, &servers, server.into(), 0x5151)
            .unwrap_or_else(|e| panic!("ping {server}: {e:#}"));
        assert_eq!(
            seen.src.ip(),
            IpAddr::V4(expected),
            "ping to {server} must leave from {why}"
        );
        assert!(
            seen.intact,
            "the echo reply must reach the client with its identifier"
        );
    }

    let status = agent.stop().unwrap();
    assert!(
        status.success(),
        "the agent must exit cleanly on SIGTERM: {status}"
    );
    assert_eq!(
        tcx_programs(&lab.gw, UPLINK),
        0,
        "nothing may stay attached after the agent stops"
    );
    let logs = agent.lines().join("\n");
    assert!(
        logs.contains("policy \"third-party via Portugal\": flows=4"),
        "the dedicated policy must have counted its 2 TCP and 2 UDP flows:\n{logs}"
    );
}

#[test]
fn steer_netlink_attach_mode_removes_its_qdisc_on_exit() {
    require_root();
    let lab = Lab::new(0).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let mut agent = Agent::steering(&lab, &example(), &["--attach", "netlink"]).unwrap();
    let filters = lab
        .gw
        .exec("tc", &["filter", "show", "dev", UPLINK, "egress"])
        .unwrap();
    assert!(
        filters.contains("egress_steer"),
        "netlink mode installs a tc filter: {filters}"
    );
    let seen = probe::tcp(&lab.client, None, sa(SERVER_PUBLIC, 443), pattern(4096, 0)).unwrap();
    assert_eq!(
        seen.src.ip(),
        IpAddr::V4(GW_UPLINK),
        "netlink-attached programs translate too"
    );
    assert!(seen.intact);

    assert!(agent.stop().unwrap().success());
    let qdiscs = lab
        .gw
        .exec("tc", &["qdisc", "show", "dev", UPLINK])
        .unwrap();
    assert!(
        !qdiscs.contains("clsact"),
        "the clsact qdisc the agent added must be gone: {qdiscs}"
    );
}

#[test]
fn steer_bad_policy_file_exits_with_path_and_attaches_nothing() {
    require_root();
    let lab = Lab::new(0).unwrap();
    let dir = TempDir::new("bad-policy");
    let text = std::fs::read_to_string(example())
        .unwrap()
        .replace("\"10.0.0.0/8\"", "\"10.0.0.0/33\"");
    let bad = dir.write("bad.json", &text);
    let mut agent = Agent::start_gateway(&agent::binary(), &lab, &bad, &[]).unwrap();
    let err = agent
        .wait_for("policies[1].selector.dst[0]", Duration::from_secs(10))
        .unwrap();
    assert!(
        err.contains("invalid CIDR \"10.0.0.0/33\""),
        "the error names the value: {err}"
    );
    let status = agent
        .stop()
        .unwrap_or_else(|_| std::process::ExitStatus::default());
    assert!(!status.success(), "a bad policy file must fail the agent");
    assert_eq!(tcx_programs(&lab.gw, UPLINK), 0, "nothing may be attached");
}

/// Two policy sets that agree on everything except a pair of flows, chosen
/// so that mixing them would misroute a third kind of flow: set A sends
/// 10.10.0.2 -> 192.0.2.10 to the dedicated pool, set B sends
/// 10.10.0.3 -> 198.51.100.10 there. In both, 10.10.0.2 -> 198.51.100.10
/// and 10.10.0.3 -> 192.0.2.10 leave from the default; a packet classified
/// with A's source table and B's destination table (or the reverse) would
/// pick the dedicated pool instead.
fn swap_set(src: Ipv4Addr, dst: Ipv4Addr) -> String {
    format!(
        r#"{{ "egress_pools": {{ "p": {{ "ipv4": ["203.0.113.10"] }} }},
             "default_egress": {{ "ipv4": "203.0.113.1" }},
             "policies": [
               {{ "name": "pair", "selector": {{ "src": ["{src}"], "dst": ["{dst}"] }}, "action": {{ "egress": "p" }} }},
               {{ "name": "catch-all", "selector": {{}}, "action": {{ "egress": "default" }} }} ] }}"#
    )
}

/// Threads that run until told to stop. Dropping them (also when the test
/// panics) tells and joins them, so they cannot keep sending through, and
/// keeping alive, the lab of a failed test.
struct Senders<T> {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<T>>,
}

impl<T> Senders<T> {
    /// Stop the threads and collect what they returned (a thread's panic
    /// fails the test).
    fn finish(mut self) -> Vec<T> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .drain(..)
            .map(|t| t.join().expect("a sender thread failed"))
            .collect()
    }
}

impl<T> Drop for Senders<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn reload_swapping_sets_under_traffic_never_mixes_tables() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("swap");
    let set_a = swap_set(Lab::client_addr(0), SERVER_PARTNER);
    let set_b = swap_set(Lab::client_addr(1), SERVER_PUBLIC);
    let config = dir.write("policies.json", &set_a);
    let agent = Agent::steering(&lab, &config, &[]).unwrap();

    // Continuous new flows of the two kinds a mix would misroute.
    let stop = Arc::new(AtomicBool::new(false));
    let lab = Arc::new(lab);
    let senders = Senders {
        stop: Arc::clone(&stop),
        threads: [(0u8, SERVER_PUBLIC), (1, SERVER_PARTNER)]
            .into_iter()
            .map(|(client, server)| {
                let (lab, stop) = (Arc::clone(&lab), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut seen = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let from = sa(Lab::client_addr(client), 0);
                        match probe::udp(
                            &lab.client,
                            Some(from),
                            sa(server, 443),
                            probe::token("swap"),
                        ) {
                            Ok(s) => seen.push(s),
                            Err(e) => panic!("flow from {from} to {server} failed: {e:#}"),
                        }
                    }
                    seen
                })
            })
            .collect(),
    };

    // Swap the sets back and forth while the flows run, each swap applied
    // before the next.
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut reloads = 0;
    while Instant::now() < deadline {
        let next = if reloads % 2 == 0 { &set_b } else { &set_a };
        dir.write("policies.json", next);
        reloads += 1;
        agent
            .reload(reloads)
            .unwrap_or_else(|e| panic!("swap {reloads} must be applied: {e:#}"));
        std::thread::sleep(Duration::from_millis(40));
    }
    let seen: Vec<probe::Seen> = senders.finish().into_iter().flatten().collect();

    let applied = agent
        .lines()
        .iter()
        .filter(|l| l.contains("reloaded"))
        .count();
    assert_eq!(
        applied, reloads,
        "the agent must have applied every reload ({applied} of {reloads})"
    );
    assert!(
        seen.len() >= 200,
        "enough flows must have crossed the swaps, got {}",
        seen.len()
    );
    let misrouted: Vec<_> = seen
        .iter()
        .filter(|s| s.src.ip() != IpAddr::V4(GW_UPLINK))
        .collect();
    assert!(
        misrouted.is_empty(),
        "every flow must leave from the default egress in both sets; {} of {} did not (a mixed classification): {:?}",
        misrouted.len(),
        seen.len(),
        &misrouted[..misrouted.len().min(5)]
    );
    assert!(
        seen.iter().all(|s| s.intact),
        "every answer must come back intact"
    );
}
