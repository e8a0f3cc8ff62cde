//! Lab test of operating under traffic: a long TCP connection and a UDP
//! flow keep flowing, unchanged, while the policies are reloaded again and
//! again (by signal, API and file change), a broken file is written, and
//! the agent is killed and started again.

use std::time::Duration;

use nix::sys::signal::Signal;

use super::{nat_lab::policy_set, prog_test_run::require_root};
use crate::{
    agent::Agent,
    lab::{DEDICATED_PRIMARY, Lab, SERVER_PARTNER, SERVER_PUBLIC, servers},
    pins::PinPath,
    probe::{self, Servers, sa},
    tempdir::TempDir,
    traffic::Stream,
};

/// The stream's flows (to the public server) leave from the dedicated
/// address; `variant` adds unrelated policies so every reload changes the
/// tables.
fn policies(variant: usize) -> String {
    let extra: Vec<String> = (0..variant % 7)
        .map(|i| {
            format!(
                r#"{{ "name": "unrelated {i}", "selector": {{ "dst": ["198.18.{i}.0/24"] }}, "action": {{ "egress": "bypass" }} }}"#
            )
        })
        .collect();
    let mut all: Vec<&str> = extra.iter().map(String::as_str).collect();
    all.push(
        r#"{ "name": "public via pool", "selector": { "dst": ["198.51.100.0/24"] }, "action": { "egress": "pool" } }"#,
    );
    policy_set(r#""pool": { "ipv4": ["203.0.113.10"] }"#, &all, "")
}

#[test]
fn reload_50_times_broken_file_and_sigkill_under_traffic_nothing_lost_tuple_unchanged() {
    require_root();
    let lab = Lab::new(0).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("reload-traffic");
    let config = dir.write("policies.json", &policies(0));
    let pins = PinPath::new().unwrap();
    let mut agent = Agent::steering(&lab, &config, &["--pin-path", pins.arg()]).unwrap();
    let stream =
        Stream::start(&lab.client, sa(SERVER_PUBLIC, 443), sa(SERVER_PUBLIC, 443)).unwrap();
    stream.advance(20, Duration::from_secs(10)).unwrap();

    // 50 reloads: signals and API calls, each confirmed applied, traffic
    // checked to be moving in between.
    for n in 1..=50 {
        dir.write("policies.json", &policies(n));
        if n % 2 == 0 {
            agent.cli(&["reload"]).unwrap();
        } else {
            let reloads = agent
                .lines()
                .iter()
                .filter(|l| l.contains("reloaded "))
                .count();
            agent.reload(reloads + 1).unwrap();
        }
        stream.advance(2, Duration::from_secs(10)).unwrap();
    }

    // A change on disk reloads by itself (debounced)...
    let before = agent
        .lines()
        .iter()
        .filter(|l| l.contains("reloaded "))
        .count();
    dir.write("policies.json", &policies(3));
    agent
        .wait_for_count("reloaded ", before + 1, Duration::from_secs(10))
        .expect("a changed file is reloaded without a signal");
    // ...and a broken one is rejected, the running policies staying.
    dir.write("policies.json", "{ \"policies\": [ { \"name\": ");
    agent
        .wait_for("reload rejected", Duration::from_secs(10))
        .expect("the broken file is rejected");
    stream.advance(20, Duration::from_secs(10)).unwrap();
    let err = agent.cli(&["reload"]).unwrap_err().to_string();
    assert!(
        err.contains("policies.json"),
        "the API's rejection names the file: {err}"
    );
    let fresh = probe::tcp(
        &lab.client,
        None,
        sa(SERVER_PARTNER, 443),
        probe::token("after"),
    )
    .unwrap();
    assert!(fresh.intact);
    let fresh = probe::tcp(
        &lab.client,
        None,
        sa(SERVER_PUBLIC, 443),
        probe::token("after"),
    )
    .unwrap();
    assert_eq!(
        fresh.src.ip(),
        std::net::IpAddr::from(DEDICATED_PRIMARY),
        "new flows still follow the last good policies"
    );

    // The agent is killed outright; the dataplane carries on, and a new
    // agent on the same pins takes over.
    agent.signal(Signal::SIGKILL).unwrap();
    assert!(!agent.stop().unwrap().success(), "the agent was killed");
    stream
        .advance(20, Duration::from_secs(10))
        .expect("traffic flows while no agent runs");
    dir.write("policies.json", &policies(5));
    let _agent = Agent::steering(&lab, &config, &["--pin-path", pins.arg()]).unwrap();
    stream.advance(20, Duration::from_secs(10)).unwrap();

    let (tcp, udp) = stream.finish().unwrap();
    assert_eq!(
        tcp.seen.ip(),
        std::net::IpAddr::from(DEDICATED_PRIMARY),
        "the TCP connection left from the pool"
    );
    assert!(tcp.bytes > 0, "the TCP connection carried data");
    assert_eq!(
        udp.answered, udp.sent,
        "every UDP datagram was answered intact ({} of {})",
        udp.answered, udp.sent
    );
    assert_eq!(
        udp.seen.len(),
        1,
        "the UDP flow kept one translated tuple throughout: {:?}",
        udp.seen
    );
    eprintln!(
        "under 52 reloads, a broken file and a SIGKILL restart: {} TCP bytes intact, {} UDP datagrams all answered",
        tcp.bytes, udp.sent
    );
}
