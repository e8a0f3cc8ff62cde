//! Lab tests of identities: sessions from the identities file and the
//! control API steer their users' flows; posture changes and removals
//! switch new flows at once.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use super::{nat_lab::policy_set, prog_test_run::require_root};
use crate::{
    agent::Agent,
    lab::{DEDICATED_PRIMARY, DEDICATED_SECONDARY, GW_UPLINK, Lab, SERVER_PUBLIC, servers},
    probe::{self, Servers, sa},
    tempdir::TempDir,
};

/// finance on compliant devices -> 203.0.113.10; any staff -> .11; the
/// rest (anonymous sources included) -> the default 203.0.113.1.
fn identity_policies() -> String {
    policy_set(
        r#""fin": { "ipv4": ["203.0.113.10"] }, "staff": { "ipv4": ["203.0.113.11"] }"#,
        &[
            r#"{ "name": "finance compliant", "selector": { "groups": ["finance"], "posture": ["compliant"] }, "action": { "egress": "fin" } }"#,
            r#"{ "name": "staff", "selector": { "groups": ["finance", "eng"] }, "action": { "egress": "staff" } }"#,
        ],
        "",
    )
}

/// `egress-agent session add <id> --user <user> ...` against `agent`.
fn add_session(
    agent: &Agent,
    id: &str,
    user: &str,
    group: &str,
    extra: &[&str],
    addr: Ipv4Addr,
) -> anyhow::Result<String> {
    let addr = addr.to_string();
    let mut args = vec!["session", "add", id, "--user", user, "--group", group];
    args.extend_from_slice(extra);
    args.extend(["--address", addr.as_str()]);
    agent.cli(&args)
}

/// The source address the public server sees for a TCP connection from
/// client address `i`.
fn seen_from(lab: &Lab, i: u8) -> IpAddr {
    let seen = probe::tcp(
        &lab.client,
        Some(sa(Lab::client_addr(i), 0)),
        sa(SERVER_PUBLIC, 443),
        probe::token("who"),
    )
    .expect("the connection must be served");
    assert!(seen.intact, "the echo must come back intact");
    seen.src.ip()
}

#[test]
fn identity_sessions_posture_and_removal_switch_new_flows() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("identity");
    let config = dir.write("policies.json", &identity_policies());
    let identities = dir.write(
        "identities.json",
        &format!(
            r#"{{"sessions": [
                {{"id": "ana-laptop", "user": "ana@example.com", "groups": ["finance"], "posture": ["compliant"], "addresses": ["{}"]}},
                {{"id": "bo-laptop", "user": "bo@example.com", "groups": ["eng"], "addresses": ["{}"]}}
            ]}}"#,
            Lab::client_addr(0),
            Lab::client_addr(1)
        ),
    );
    let agent = Agent::steering(
        &lab,
        &config,
        &["--identities", identities.to_str().unwrap()],
    )
    .unwrap();

    assert_eq!(
        seen_from(&lab, 0),
        IpAddr::V4(DEDICATED_PRIMARY),
        "finance on a compliant device leaves from the finance address"
    );
    assert_eq!(
        seen_from(&lab, 1),
        IpAddr::V4(DEDICATED_SECONDARY),
        "another user behind the same gateway, same destination, leaves from the staff address"
    );

    // The device falls out of compliance: its next flow moves.
    let started = Instant::now();
    agent.cli(&["posture", "set", "ana-laptop"]).unwrap();
    let moved = seen_from(&lab, 0);
    let took = started.elapsed();
    assert_eq!(
        moved,
        IpAddr::V4(DEDICATED_SECONDARY),
        "without the compliant tag, finance is only staff"
    );
    eprintln!("posture change to a new flow using it: {took:.1?} (CLI process included)");

    // A second session cannot claim an address a live session holds.
    let err = add_session(
        &agent,
        "intruder",
        "eve@example.com",
        "finance",
        &[],
        Lab::client_addr(1),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("addresses[0]") && err.contains("bo-laptop"),
        "the conflict names the field and the owner: {err}"
    );
    assert_eq!(
        seen_from(&lab, 1),
        IpAddr::V4(DEDICATED_SECONDARY),
        "the rejected session changed nothing"
    );

    // Removing the session returns the address to the anonymous path.
    agent.cli(&["session", "rm", "ana-laptop"]).unwrap();
    assert_eq!(
        seen_from(&lab, 0),
        IpAddr::V4(GW_UPLINK),
        "a source without identity matches only policies without identity selectors"
    );
    // And a new session for it through the API takes effect at once.
    add_session(
        &agent,
        "carol-phone",
        "carol@example.com",
        "finance",
        &["--posture", "compliant"],
        Lab::client_addr(0),
    )
    .unwrap();
    assert_eq!(seen_from(&lab, 0), IpAddr::V4(DEDICATED_PRIMARY));
    let listed = agent.cli(&["session", "ls", "--json"]).unwrap();
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let ids: Vec<&str> = listed
        .as_array()
        .expect("a list of sessions")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids, ["bo-laptop", "carol-phone"], "the live sessions");

    // A session that expires is removed by the agent.
    agent.cli(&["session", "rm", "carol-phone"]).unwrap();
    add_session(
        &agent,
        "short",
        "dan@example.com",
        "eng",
        &["--ttl", "2s"],
        Lab::client_addr(0),
    )
    .unwrap();
    assert_eq!(seen_from(&lab, 0), IpAddr::V4(DEDICATED_SECONDARY));
    agent
        .wait_for("sessions expired: short", Duration::from_secs(10))
        .expect("the agent removes the session when it expires");
    assert_eq!(
        seen_from(&lab, 0),
        IpAddr::V4(GW_UPLINK),
        "after expiry the address is anonymous again"
    );

    // Reloading the identities file replaces the file's sessions.
    dir.write(
        "identities.json",
        &format!(
            r#"{{"sessions": [{{"id": "bo-laptop", "user": "bo@example.com", "groups": ["finance"], "posture": ["compliant"], "addresses": ["{}"]}}]}}"#,
            Lab::client_addr(1)
        ),
    );
    agent.cli(&["reload"]).unwrap();
    assert_eq!(
        seen_from(&lab, 1),
        IpAddr::V4(DEDICATED_PRIMARY),
        "bo's new groups and posture from the reloaded file apply to new flows"
    );
    // A broken identities file is rejected whole, naming the field.
    dir.write(
        "identities.json",
        r#"{"sessions": [{"id": "bo-laptop", "user": "bo@example.com", "addresses": ["10.10.0.300"]}]}"#,
    );
    let err = agent.cli(&["reload"]).unwrap_err().to_string();
    assert!(
        err.contains("sessions[0].addresses[0]"),
        "the rejection names the field: {err}"
    );
    assert_eq!(
        seen_from(&lab, 1),
        IpAddr::V4(DEDICATED_PRIMARY),
        "a rejected reload keeps the running sessions"
    );
}

#[test]
fn identity_batch_of_100k_sessions_loads_and_steers() {
    require_root();
    let lab = Lab::new(0).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("identity-100k");
    let config = dir.write("policies.json", &identity_policies());
    let agent = Agent::steering(&lab, &config, &[]).unwrap();

    // 99 999 users in 10.64.0.0/10, each with a few groups, plus the lab
    // client as the last one.
    let mut batch = String::from("[");
    for i in 0..99_999u32 {
        let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + i);
        let group = ["eng", "sales", "finance", "support"][i as usize % 4];
        let _ = write!(
            batch,
            r#"{{"id":"s{i}","user":"user{i}@example.com","groups":["{group}","all"],"posture":["compliant"],"addresses":["{addr}"]}},"#
        );
    }
    let _ = write!(
        batch,
        r#"{{"id":"lab","user":"ana@example.com","groups":["finance"],"posture":["compliant"],"addresses":["{}"]}}]"#,
        Lab::client_addr(0)
    );
    let file = dir.write("batch.json", &batch);
    let started = Instant::now();
    let report = agent
        .cli(&["session", "load", file.to_str().unwrap(), "--json"])
        .unwrap();
    let took = started.elapsed();
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(
        report["added"], 100_000,
        "every session was added: {report}"
    );
    eprintln!(
        "100 000 sessions: {took:.2?} end to end through the CLI, {} ms inside the agent",
        report["elapsed_ms"]
    );
    assert_eq!(
        seen_from(&lab, 0),
        IpAddr::V4(DEDICATED_PRIMARY),
        "the lab client's session from the batch steers its flows"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&agent.cli(&["stats", "--json"]).unwrap()).unwrap();
    assert_eq!(stats["sessions"], 100_000);
    assert_eq!(
        stats["identities"], 100_000,
        "every user is a distinct identity"
    );
    // A batch is one all-or-nothing change: the same 100 000 again plus
    // one entry claiming an address of another leaves everything as it was.
    let bad = format!(
        r#"{}, {{"id":"dup","user":"x@example.com","addresses":["10.64.0.5"]}}]"#,
        batch.trim_end_matches(']')
    );
    let bad_file = dir.write("bad.json", &bad);
    let err = agent
        .cli(&["session", "load", bad_file.to_str().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[100000].addresses[0]") && err.contains("s5"),
        "the agent names the entry, the field and the owner: {err}"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&agent.cli(&["stats", "--json"]).unwrap()).unwrap();
    assert_eq!(
        stats["sessions"], 100_000,
        "the rejected batch changed nothing"
    );
}

#[test]
fn identity_api_sessions_survive_agent_restart() {
    require_root();
    let lab = Lab::new(0).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("identity-restart");
    let config = dir.write("policies.json", &identity_policies());
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let mut agent = Agent::steering(&lab, &config, &["--state-dir", state]).unwrap();
    add_session(
        &agent,
        "ana-laptop",
        "ana@example.com",
        "finance",
        &["--posture", "compliant"],
        Lab::client_addr(0),
    )
    .unwrap();
    assert_eq!(seen_from(&lab, 0), IpAddr::V4(DEDICATED_PRIMARY));
    assert!(agent.stop().unwrap().success(), "clean stop");

    let agent = Agent::steering(&lab, &config, &["--state-dir", state]).unwrap();
    agent
        .wait_for("restored 1 of 1 saved API sessions", Duration::from_secs(5))
        .unwrap();
    assert_eq!(
        seen_from(&lab, 0),
        IpAddr::V4(DEDICATED_PRIMARY),
        "the restarted agent still knows who is behind the address"
    );
}
