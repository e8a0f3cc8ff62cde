//! Lab tests: the real agent on the gateway namespace, real sockets in the
//! client and internet namespaces, and servers reporting the source address
//! they saw.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use aya::programs::{SchedClassifier, TcAttachType};

use super::prog_test_run::require_root;
use crate::{
    agent::Agent,
    lab::{
        CLIENT, DEDICATED_PRIMARY, GW_UPLINK, Lab, SERVER_INTERNAL, SERVER_PARTNER, SERVER_PUBLIC,
        SERVERS, UPLINK,
    },
    netns::NetNs,
    probe::{self, Servers},
};

fn example() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/policies.json")
        .canonicalize()
        .unwrap()
        .display()
        .to_string()
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// A payload large enough to span many segments, with a recognisable pattern.
fn bulk(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Program ids attached to `iface` through tcx, seen from inside `ns`.
fn tcx_programs(ns: &NetNs, iface: &'static str) -> usize {
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
    let servers = Servers::start(&lab.inet, &SERVERS, &[443, 8080, 9000]).unwrap();
    let config = example();
    let mut agent = Agent::start(
        &lab.gw,
        "agent",
        &["run", "--config", &config, "--uplink", UPLINK],
    )
    .unwrap();
    agent.wait_ready().unwrap();
    assert_eq!(
        tcx_programs(&lab.gw, UPLINK),
        2,
        "egress and ingress programs attached"
    );

    let payload = bulk(256 * 1024);
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
            *seen.src.ip(),
            expected,
            "TCP to {server}:{port} must leave from {why}"
        );
        assert!(
            seen.intact,
            "TCP to {server}:{port}: 256 KiB must come back intact"
        );

        let seen = probe::udp(&lab.client, None, sa(server, port), bulk(1200))
            .unwrap_or_else(|e| panic!("UDP to {server}:{port}: {e:#}"));
        assert_eq!(
            *seen.src.ip(),
            expected,
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
        let seen = probe::ping(&lab.client, &servers, server, 0x5151)
            .unwrap_or_else(|e| panic!("ping {server}: {e:#}"));
        assert_eq!(
            *seen.src.ip(),
            expected,
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
    let _servers = Servers::start(&lab.inet, &SERVERS, &[443]).unwrap();
    let config = example();
    let mut agent = Agent::start(
        &lab.gw,
        "agent",
        &[
            "run", "--config", &config, "--uplink", UPLINK, "--attach", "netlink",
        ],
    )
    .unwrap();
    agent.wait_ready().unwrap();
    let filters = lab
        .gw
        .exec("tc", &["filter", "show", "dev", UPLINK, "egress"])
        .unwrap();
    assert!(
        filters.contains("egress_steer"),
        "netlink mode installs a tc filter: {filters}"
    );
    let seen = probe::tcp(&lab.client, None, sa(SERVER_PUBLIC, 443), bulk(4096)).unwrap();
    assert_eq!(
        *seen.src.ip(),
        GW_UPLINK,
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
    let dir = std::env::temp_dir().join(format!("egress-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.json");
    let text = std::fs::read_to_string(example())
        .unwrap()
        .replace("\"10.0.0.0/8\"", "\"10.0.0.0/33\"");
    std::fs::write(&bad, text).unwrap();
    let mut agent = Agent::start(
        &lab.gw,
        "agent",
        &["run", "--config", bad.to_str().unwrap(), "--uplink", UPLINK],
    )
    .unwrap();
    let err = agent
        .wait_for(
            "policies[1].selector.dst[0]",
            std::time::Duration::from_secs(10),
        )
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
    std::fs::remove_dir_all(&dir).unwrap();
}
