//! Lab tests of several uplinks: a pool that names the second uplink has its
//! flows leave (redirected) through it and its replies restored there, while
//! other pools keep leaving through the routed uplink; a pool naming an
//! interface that is not an uplink is refused at start and at reload.

use std::{net::IpAddr, time::Duration};

use nix::sys::signal::Signal;

use super::{nat_lab::policy_set, prog_test_run::require_root, steer_e2e::tcx_programs};
use crate::{
    agent::Agent,
    lab::{
        DEDICATED_PRIMARY, LAN, Lab, PROVIDER2_EGRESS, PROVIDER2_LINK, SERVER_PARTNER,
        SERVER_PUBLIC, UPLINK, UPLINK2, servers,
    },
    netns::NetNs,
    probe::{self, Servers, pattern, sa},
    tempdir::TempDir,
};

/// Pool `home` (203.0.113.10, no interface) for the public server, pool
/// `far` (the second provider's address, leaving from up1) for the partner
/// server.
fn two_uplink_policies(far_interface: &str) -> String {
    policy_set(
        &format!(
            r#""home": {{ "ipv4": ["203.0.113.10"] }},
               "far": {{ "ipv4": ["{PROVIDER2_EGRESS}"], "interface": "{far_interface}" }}"#
        ),
        &[
            r#"{ "name": "partner via far", "selector": { "dst": ["192.0.2.10/32"] }, "action": { "egress": "far" } }"#,
            r#"{ "name": "public via home", "selector": { "dst": ["198.51.100.10/32"] }, "action": { "egress": "home" } }"#,
        ],
        "",
    )
}

/// An interface's byte counter (`tx_bytes`, `rx_bytes`) inside `ns`.
fn bytes(ns: &NetNs, iface: &'static str, counter: &'static str) -> u64 {
    let path = format!("/sys/class/net/{iface}/statistics/{counter}");
    // sysfs shows the reading thread's namespace only when it mounts its
    // own; `ip netns exec` does, a setns'd thread does not.
    ns.exec("cat", &[&path])
        .unwrap_or_else(|e| panic!("reading {path}: {e:#}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path} is not a number: {e}"))
}

/// Bytes sent on each uplink while `f` runs: (up0, up1).
fn uplink_tx<T>(gw: &NetNs, f: impl FnOnce() -> T) -> (T, u64, u64) {
    let (up0, up1) = (
        bytes(gw, UPLINK, "tx_bytes"),
        bytes(gw, UPLINK2, "tx_bytes"),
    );
    let out = f();
    (
        out,
        bytes(gw, UPLINK, "tx_bytes") - up0,
        bytes(gw, UPLINK2, "tx_bytes") - up1,
    )
}

/// `name=value` from the agent's final `counters:` line (0 when absent).
fn counter(lines: &[String], name: &str) -> u64 {
    let line = lines
        .iter()
        .rev()
        .find_map(|l| l.split_once("counters: ").map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("the agent logged no counters:\n{}", lines.join("\n")));
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map_or(0, |(_, v)| v.parse().expect("numeric counter"))
}

#[test]
fn uplinks_pool_interface_flows_leave_and_return_through_named_uplink() {
    require_root();
    let lab = Lab::with_second_uplink(0).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("uplinks");
    let config = dir.write("policies.json", &two_uplink_policies(UPLINK2));
    let mut agent = Agent::steering(&lab, &config, &["--uplink", UPLINK2])
        .expect("the agent must start steering on both uplinks");
    for iface in [UPLINK, UPLINK2] {
        assert_eq!(
            tcx_programs(&lab.gw, iface),
            2,
            "egress and ingress programs attached on {iface}"
        );
    }

    const SIZE: usize = 512 * 1024;
    let payload = pattern(SIZE, 7);
    let reply_rx = bytes(&lab.gw, UPLINK2, "rx_bytes");
    let provider2_rx = bytes(&lab.inet, PROVIDER2_LINK, "rx_bytes");
    let (seen, up0, up1) = uplink_tx(&lab.gw, || {
        probe::tcp(&lab.client, None, sa(SERVER_PARTNER, 443), payload.clone())
            .unwrap_or_else(|e| panic!("TCP to the partner server: {e:#}"))
    });
    assert_eq!(
        seen.src.ip(),
        IpAddr::V4(PROVIDER2_EGRESS),
        "the partner server must see the second provider's address"
    );
    assert!(
        seen.intact,
        "512 KiB must come back intact through the second uplink"
    );
    assert!(
        up1 >= SIZE as u64,
        "the flow's packets must leave through {UPLINK2} ({up1} bytes sent there)"
    );
    assert!(
        up0 < 16 * 1024,
        "the flow must not leave through {UPLINK} ({up0} bytes sent there)"
    );
    assert!(
        bytes(&lab.inet, PROVIDER2_LINK, "rx_bytes") - provider2_rx >= SIZE as u64,
        "the second provider must receive the flow"
    );
    assert!(
        bytes(&lab.gw, UPLINK2, "rx_bytes") - reply_rx >= SIZE as u64,
        "the echo must come back through {UPLINK2}"
    );

    let seen = probe::udp(&lab.client, None, sa(SERVER_PARTNER, 443), pattern(1200, 8))
        .unwrap_or_else(|e| panic!("UDP to the partner server: {e:#}"));
    assert_eq!(
        seen.src.ip(),
        IpAddr::V4(PROVIDER2_EGRESS),
        "UDP of the pool must leave from the second provider's address too"
    );
    assert!(seen.intact, "the UDP answer must come back intact");

    let (seen, up0, up1) = uplink_tx(&lab.gw, || {
        probe::tcp(&lab.client, None, sa(SERVER_PUBLIC, 443), payload.clone())
            .unwrap_or_else(|e| panic!("TCP to the public server: {e:#}"))
    });
    assert_eq!(
        seen.src.ip(),
        IpAddr::V4(DEDICATED_PRIMARY),
        "a pool without an interface keeps its address"
    );
    assert!(
        seen.intact,
        "512 KiB must come back intact through {UPLINK}"
    );
    assert!(
        up0 >= SIZE as u64,
        "a pool without an interface leaves through the routed uplink {UPLINK} ({up0} bytes)"
    );
    assert!(
        up1 < 16 * 1024,
        "a pool without an interface must not be redirected ({up1} bytes sent on {UPLINK2})"
    );

    let status = agent.stop().unwrap();
    assert!(status.success(), "the agent must exit cleanly: {status}");
    for iface in [UPLINK, UPLINK2] {
        assert_eq!(
            tcx_programs(&lab.gw, iface),
            0,
            "nothing may stay attached to {iface} after the agent stops"
        );
    }
    let lines = agent.lines();
    let policy_out = lines
        .iter()
        .find_map(|l| l.split_once("policy \"partner via far\": "))
        .and_then(|(_, rest)| {
            rest.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == "packets_out")
                .map(|(_, v)| v.parse::<u64>().expect("numeric counter"))
        })
        .unwrap_or_else(|| panic!("no counters of the policy:\n{}", lines.join("\n")));
    assert!(policy_out > 2, "the policy counted its flows' packets");
    assert_eq!(
        counter(&lines, "redirected"),
        policy_out,
        "every outgoing packet of the pool's flows is redirected, not only the first"
    );
    assert_eq!(
        counter(&lines, "flows_local"),
        0,
        "a redirected packet seen again on {UPLINK2} is not mistaken for the gateway's own flow"
    );
    assert_eq!(
        counter(&lines, "port_collisions"),
        0,
        "a redirected packet seen again on {UPLINK2} claims no second port"
    );
}

#[test]
fn uplinks_pool_interface_not_an_uplink_refused_at_start_and_reload() {
    require_root();
    let lab = Lab::with_second_uplink(0).unwrap();
    let dir = TempDir::new("uplinks-refused");
    let config = dir.write("policies.json", &two_uplink_policies(UPLINK2));

    let mut refused = Agent::start_gateway(&crate::agent::binary(), &lab, &config, &[])
        .expect("starting the agent");
    let line = refused
        .wait_for("egress_pools.far.interface", Duration::from_secs(20))
        .expect("the agent must name the pool's interface field");
    assert!(
        line.contains("\"up1\" is not one of the agent's uplinks (up0)"),
        "the error says why: {line}"
    );
    let status = refused.stop().expect("the agent exits by itself");
    assert!(
        !status.success(),
        "a refused file stops the agent: {status}"
    );
    assert_eq!(
        tcx_programs(&lab.gw, UPLINK),
        0,
        "a refused file attaches nothing"
    );

    // Waits for log lines rather than counting reloads: an agent that
    // also reloads on file changes may log an outcome twice.
    let agent = Agent::steering(&lab, &config, &["--uplink", UPLINK2])
        .expect("the agent must start steering on both uplinks");
    dir.write("policies.json", &two_uplink_policies(LAN));
    agent.signal(Signal::SIGHUP).unwrap();
    let line = agent
        .wait_for("reload rejected", Duration::from_secs(10))
        .expect("a pool naming a non-uplink interface must be refused");
    assert!(
        line.contains(&format!(
            "egress_pools.far.interface: \"{LAN}\" is not one of the agent's uplinks (up0, up1)"
        )),
        "the refusal names the field and the uplinks: {line}"
    );
    dir.write("policies.json", &two_uplink_policies(UPLINK2));
    agent.signal(Signal::SIGHUP).unwrap();
    agent
        .wait_for("reloaded ", Duration::from_secs(10))
        .expect("the file naming an uplink is accepted again");
}
