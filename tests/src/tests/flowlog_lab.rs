//! Lab tests of the flow log: the agent run with `--flow-log FILE` writes a
//! JSON line for each new TCP and UDP translation (policy, translated
//! tuple, the user of a session), an end for the TCP close and for the UDP
//! flow's expiry, and a failure line for a flow refused for want of a port,
//! which the kernel log, once switched on, also reports, as the port-use
//! warning does.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{nat_lab::policy_set, prog_test_run::require_root};
use crate::{
    agent::Agent,
    lab::{DEDICATED_PRIMARY, GW_UPLINK, Lab, SERVER_PARTNER, SERVER_PUBLIC, servers},
    probe::{self, Servers, sa},
    tempdir::TempDir,
};

/// The lines of the flow log so far, parsed (a line still being written
/// is left for the next read).
fn read_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Wait (at most `timeout`) until `done` holds for the flow log's lines;
/// returns them either way, for the assertions to explain.
fn wait_lines(path: &Path, timeout: Duration, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let lines = read_lines(path);
        if done(&lines) || Instant::now() >= deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The line of `event` for the flow from `src` to `dst` (by protocol).
fn line_of<'a>(
    lines: &'a [Value],
    event: &str,
    protocol: &str,
    src: SocketAddr,
    dst: SocketAddr,
) -> Option<&'a Value> {
    lines.iter().find(|l| {
        l["event"] == event
            && l["protocol"] == protocol
            && l["original"]["src"] == src.ip().to_string()
            && l["original"]["sport"] == src.port()
            && l["original"]["dst"] == dst.ip().to_string()
            && l["original"]["dport"] == dst.port()
    })
}

fn show(lines: &[Value]) -> String {
    lines
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn flowlog_lab_tcp_and_udp_flows_logged_with_policy_user_and_expiry() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("flowlog");
    let config = dir.write(
        "policies.json",
        &policy_set(
            r#""p": { "ipv4": ["203.0.113.10"] }"#,
            &[
                r#"{ "name": "partner via p", "selector": { "dst": ["192.0.2.10/32"] }, "action": { "egress": "p" } }"#,
            ],
            r#", "timeouts": { "udp": "2s" }"#,
        ),
    );
    let flow_log = dir.path().join("flows.jsonl");
    let agent = Agent::steering(&lab, &config, &["--flow-log", flow_log.to_str().unwrap()])
        .expect("the agent must start steering");
    let ana = Lab::client_addr(0);
    agent
        .cli(&[
            "session",
            "add",
            "ana-laptop",
            "--user",
            "ana@example.com",
            "--address",
            &ana.to_string(),
        ])
        .unwrap();

    // TCP from ana's device to the partner: the pool, then closed.
    let tcp_from = sa(ana, 42001);
    let tcp_to = sa(SERVER_PARTNER, 443);
    let seen = probe::tcp(&lab.client, Some(tcp_from), tcp_to, probe::token("tcp")).unwrap();
    assert_eq!(seen.src.ip(), IpAddr::V4(DEDICATED_PRIMARY));
    // UDP from a source without session to the public server: the default.
    let udp_from = sa(Lab::client_addr(1), 42002);
    let udp_to = sa(SERVER_PUBLIC, 443);
    let seen = probe::udp(&lab.client, Some(udp_from), udp_to, probe::token("udp")).unwrap();
    assert_eq!(seen.src.ip(), IpAddr::V4(GW_UPLINK));

    // The UDP flow expires after 2 s idle, found by a sweep (every second).
    let lines = wait_lines(&flow_log, Duration::from_secs(15), |lines| {
        line_of(lines, "end", "udp", udp_from, udp_to).is_some()
            && line_of(lines, "end", "tcp", tcp_from, tcp_to).is_some()
    });
    let all = show(&lines);
    eprintln!("flow log:\n{all}");

    let new_tcp = line_of(&lines, "new", "tcp", tcp_from, tcp_to)
        .unwrap_or_else(|| panic!("a line for the new TCP flow; the log:\n{all}"));
    assert_eq!(new_tcp["reason"], "translated");
    assert_eq!(
        new_tcp["policy"], "partner via p",
        "the line names the policy: {new_tcp}"
    );
    assert_eq!(
        new_tcp["user"], "ana@example.com",
        "and the session's user: {new_tcp}"
    );
    assert_eq!(
        new_tcp["translated"]["src"],
        DEDICATED_PRIMARY.to_string(),
        "and the translated source: {new_tcp}"
    );
    assert_eq!(
        new_tcp["translated"]["sport"],
        tcp_from.port(),
        "its port was free, so the flow kept it: {new_tcp}"
    );
    assert!(
        new_tcp["time"]
            .as_str()
            .is_some_and(|t| t.parse::<jiff::Timestamp>().is_ok()),
        "an RFC 3339 time: {new_tcp}"
    );

    let end_tcp = line_of(&lines, "end", "tcp", tcp_from, tcp_to)
        .unwrap_or_else(|| panic!("an end line for the closed TCP flow; the log:\n{all}"));
    assert!(
        end_tcp["reason"] == "fin" || end_tcp["reason"] == "rst",
        "the TCP flow ended by its close: {end_tcp}"
    );
    assert_eq!(end_tcp["policy"], "partner via p");
    assert_eq!(end_tcp["user"], "ana@example.com");

    let new_udp = line_of(&lines, "new", "udp", udp_from, udp_to)
        .unwrap_or_else(|| panic!("a line for the new UDP flow; the log:\n{all}"));
    assert_eq!(new_udp["policy"], "catch-all");
    assert_eq!(new_udp["translated"]["src"], GW_UPLINK.to_string());
    assert!(
        new_udp.get("user").is_none(),
        "no session, no user: {new_udp}"
    );

    let end_udp = line_of(&lines, "end", "udp", udp_from, udp_to)
        .unwrap_or_else(|| panic!("an end line for the idle UDP flow; the log:\n{all}"));
    assert_eq!(end_udp["reason"], "expired", "{end_udp}");
    assert!(
        end_udp["packets_out"].as_u64().is_some_and(|n| n >= 1)
            && end_udp["packets_in"].as_u64().is_some_and(|n| n >= 1),
        "the end carries the flow's counts: {end_udp}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["event"] == "end"
                && l["original"]["src"] == tcp_from.ip().to_string()
                && l["original"]["sport"] == tcp_from.port())
            .count(),
        1,
        "one end per flow; the log:\n{all}"
    );
    let mode = std::fs::metadata(&flow_log).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600,
        "the flow log is readable by root only"
    );
}

#[test]
fn flowlog_lab_port_exhausted_failed_line_and_kernel_log_warning() {
    const SPORT: u16 = 45002;
    require_root();
    let lab = Lab::new(2).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("flowlog-exhausted");
    let config = dir.write(
        "policies.json",
        // UDP flows idle for 6 s expire; the sweeper walks every 1.5 s.
        &policy_set(
            "",
            &[],
            r#", "nat": { "port_range": "40000-40000" }, "timeouts": { "udp": "6s" }"#,
        ),
    );
    let flow_log = dir.path().join("flows.jsonl");
    let agent = Agent::steering(&lab, &config, &["--flow-log", flow_log.to_str().unwrap()])
        .expect("the agent must start steering");
    assert_eq!(
        agent.cli(&["log", "kernel", "on"]).unwrap().trim(),
        "kernel log records: on"
    );
    let to = sa(SERVER_PUBLIC, 443);
    // The original port, then the range's only port.
    for i in 0..2 {
        let from = sa(Lab::client_addr(i), SPORT);
        probe::udp(&lab.client, Some(from), to, probe::token("fits"))
            .unwrap_or_else(|e| panic!("UDP from {from} must get a port: {e:#}"));
    }
    let late = sa(Lab::client_addr(2), SPORT);
    let answered = lab
        .client
        .run(move || {
            let socket = std::net::UdpSocket::bind(late)?;
            socket.set_read_timeout(Some(Duration::from_millis(1000)))?;
            socket.send_to(b"no-port-left", to)?;
            let mut buf = [0u8; 512];
            Ok(socket.recv_from(&mut buf).is_ok())
        })
        .unwrap();
    assert!(!answered, "the third flow finds no free port");

    let lines = wait_lines(&flow_log, Duration::from_secs(5), |lines| {
        line_of(lines, "failed", "udp", late, to).is_some()
    });
    let failed = line_of(&lines, "failed", "udp", late, to)
        .unwrap_or_else(|| panic!("a failure line; the log:\n{}", show(&lines)));
    assert_eq!(failed["reason"], "port_exhausted");
    assert_eq!(failed["translated"]["src"], GW_UPLINK.to_string());
    assert!(
        failed["translated"].get("sport").is_none(),
        "no port was given: {failed}"
    );
    agent
        .wait_for("no free port on its egress address", Duration::from_secs(5))
        .expect("with kernel log records on, the dataplane's warning reaches the agent's log");
    // The range's one port is taken towards the server: 100 % of it.
    agent
        .wait_for(
            "translated ports 203.0.113.1 -> 198.51.100.10:443 (udp): 1 of the 1",
            Duration::from_secs(5),
        )
        .expect("a sweep warns about the full port range");
    let stats: Value = serde_json::from_str(&agent.cli(&["stats", "--json"]).unwrap()).unwrap();
    let usage = &stats["flow_log"]["port_usage"];
    assert_eq!(
        (
            &usage[0]["egress"],
            &usage[0]["in_use"],
            &usage[0]["range"],
            &usage[0]["spaces_over"]
        ),
        (
            &Value::from("203.0.113.1"),
            &Value::from(1),
            &Value::from(1),
            &Value::from(1)
        ),
        "the figure is kept for export: {usage}"
    );
    assert_eq!(
        agent.cli(&["log", "kernel", "off"]).unwrap().trim(),
        "kernel log records: off"
    );
}
