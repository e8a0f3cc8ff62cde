//! Observing the agent: the metrics endpoint against known lab traffic,
//! `flows`, `maps`, `stats` and `policies` reading the pinned maps while the
//! agent runs and after it stopped with `--keep-dataplane`, and counting a
//! full connection table.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use aya::maps::HashMap;
use egress_agent::{
    conntrack::Conntrack,
    loader::{Dataplane, LoadOptions},
};
use egress_common::{
    conntrack::CtEntry4,
    flow::{Tuple4, proto},
    maps,
};
use serde_json::Value;

use super::{nat_lab::policy_set, prog_test_run::require_root};
use crate::{
    agent::{Agent, binary},
    lab::{DEDICATED_PRIMARY, DEDICATED_SECONDARY, Lab, SERVER_PARTNER, SERVER_PUBLIC, servers},
    pins::PinPath,
    probe::{self, Servers, pattern, sa},
    tempdir::TempDir,
};

const TCP_FLOWS: u64 = 3;
const UDP_FLOWS: u64 = 4;
/// Bytes each TCP exchange sends (and gets echoed): two segments each way.
const TCP_PAYLOAD: usize = 2000;
const UDP_PAYLOAD: usize = 300;
const TCP_POLICY: &str = "partner tcp";
const UDP_POLICY: &str = "public udp";
/// Connection table capacity the agent is started with.
const MAX_FLOWS: u64 = 4096;

fn config(dir: &TempDir) -> std::path::PathBuf {
    dir.write(
        "policies.json",
        &policy_set(
            r#""p1": { "ipv4": ["203.0.113.10"] }, "p2": { "ipv4": ["203.0.113.11"] }"#,
            &[
                &format!(
                    r#"{{ "name": "{TCP_POLICY}", "selector": {{ "dst": ["192.0.2.10/32"] }}, "action": {{ "egress": "p1" }} }}"#
                ),
                &format!(
                    r#"{{ "name": "{UDP_POLICY}", "selector": {{ "dst": ["198.51.100.10/32"] }}, "action": {{ "egress": "p2" }} }}"#
                ),
            ],
            "",
        ),
    )
}

/// `GET /metrics` over HTTP/1.0 from inside the gateway namespace, where
/// the endpoint listens on the loopback; returns the body.
fn scrape(lab: &Lab, addr: SocketAddr) -> String {
    let response = lab
        .gw
        .run(move || {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(20)))?;
            stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .unwrap_or_else(|e| panic!("scraping http://{addr}/metrics: {e:#}"));
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    assert!(
        head.lines().next().is_some_and(|l| l.contains(" 200 ")),
        "the metrics endpoint must answer 200: {head}"
    );
    body.to_owned()
}

/// The value of the sample `series` (`name{labels}` exactly as rendered).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in the metrics:\n{text}"))
        .parse()
        .unwrap_or_else(|e| panic!("sample {series}: {e}"))
}

fn in_range(what: &str, value: f64, low: u64, high: u64) {
    assert!(
        (low as f64..=high as f64).contains(&value),
        "{what} must be within {low}..={high}, is {value}"
    );
}

/// `egress-agent <args>` without `--api` (for commands that have none).
fn cli(args: &[&str]) -> String {
    let out = Command::new(binary())
        .args(args)
        .output()
        .expect("running the egress-agent CLI");
    assert!(
        out.status.success(),
        "egress-agent {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The flows of `list` (`flows --json`) whose original destination is `dst`.
fn flows_to(list: &Value, dst: SocketAddr) -> Vec<&Value> {
    list.as_array()
        .expect("flows --json is a list")
        .iter()
        .filter(|f| {
            f["original"]["dst"] == dst.ip().to_string() && f["original"]["dport"] == dst.port()
        })
        .collect()
}

/// Every flow of `flows` has the policy and translated source address expected.
fn check_flows(flows: &[&Value], count: u64, policy: &str, egress: &str) {
    assert_eq!(
        flows.len() as u64,
        count,
        "flows must list every flow to the server: {flows:#?}"
    );
    for f in flows {
        assert_eq!(f["policy"], policy, "policy of {f}");
        assert_eq!(f["kind"], "translated", "{f}");
        assert_eq!(f["egress"], egress, "egress address of {f}");
        assert_eq!(
            f["translated"]["src"], egress,
            "{f} must be translated to {egress}"
        );
        assert!(f["packets_out"].as_u64().unwrap() >= 1, "{f}");
    }
}

#[test]
fn observe_metrics_and_flows_match_lab_traffic() {
    require_root();
    let lab = Lab::new(0).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("observe");
    let config = config(&dir);
    let pins = PinPath::new().unwrap();
    let max_flows = MAX_FLOWS.to_string();
    let mut agent = Agent::steering(
        &lab,
        &config,
        &[
            "--metrics",
            "127.0.0.1:0",
            "--pin-path",
            pins.arg(),
            "--max-flows",
            &max_flows,
            "--keep-dataplane",
        ],
    )
    .expect("the agent must start steering");
    let line = agent
        .wait_for("metrics at http://", Duration::from_secs(5))
        .unwrap();
    let addr: SocketAddr = line
        .split_once("http://")
        .and_then(|(_, rest)| rest.strip_suffix("/metrics"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in {line:?}"));
    agent
        .cli(&[
            "session",
            "add",
            "ana-laptop",
            "--user",
            "ana@example.com",
            "--address",
            "10.10.0.2",
        ])
        .unwrap();

    // TRAFFIC: each exchange is a new flow (a new source port).
    for i in 0..TCP_FLOWS {
        let seen = probe::tcp(
            &lab.client,
            None,
            sa(SERVER_PARTNER, 443),
            pattern(TCP_PAYLOAD, i),
        )
        .unwrap_or_else(|e| panic!("TCP exchange {i}: {e:#}"));
        assert!(seen.intact, "TCP exchange {i} must come back intact");
        assert_eq!(seen.src.ip(), DEDICATED_PRIMARY, "TCP leaves from p1");
    }
    for i in 0..UDP_FLOWS {
        let seen = probe::udp(
            &lab.client,
            None,
            sa(SERVER_PUBLIC, 443),
            pattern(UDP_PAYLOAD, i),
        )
        .unwrap_or_else(|e| panic!("UDP exchange {i}: {e:#}"));
        assert!(seen.intact, "UDP exchange {i} must come back intact");
        assert_eq!(seen.src.ip(), DEDICATED_SECONDARY, "UDP leaves from p2");
    }
    // A reload keeps each policy's counter slot (same names).
    agent.reload(1).unwrap();

    // METRICS
    let text = scrape(&lab, addr);
    let policy = |metric: &str, name: &str, extra: &str| {
        sample(
            &text,
            &format!(r#"egress_{metric}{{policy="{name}"{extra}}}"#),
        )
    };
    assert_eq!(
        policy("policy_flows_total", TCP_POLICY, ""),
        TCP_FLOWS as f64
    );
    assert_eq!(
        policy("policy_flows_total", UDP_POLICY, ""),
        UDP_FLOWS as f64
    );
    assert_eq!(
        policy("policy_active_flows", TCP_POLICY, ""),
        TCP_FLOWS as f64
    );
    assert_eq!(
        policy("policy_active_flows", UDP_POLICY, ""),
        UDP_FLOWS as f64
    );
    // TCP: SYN, ACK, two data segments and FIN out at least, a SYN-ACK,
    // the greeting, two echoed segments and FIN back; with ACKs and echoes
    // in smaller pieces a flow takes about 17 each way, retransmissions
    // stay well below 40.
    let out = r#",direction="out""#;
    let back = r#",direction="in""#;
    in_range(
        "TCP packets out",
        policy("policy_packets_total", TCP_POLICY, out),
        5 * TCP_FLOWS,
        40 * TCP_FLOWS,
    );
    in_range(
        "TCP packets in",
        policy("policy_packets_total", TCP_POLICY, back),
        5 * TCP_FLOWS,
        40 * TCP_FLOWS,
    );
    // Headers take 52 bytes a packet (IPv4, TCP with timestamps).
    in_range(
        "TCP bytes out",
        policy("policy_bytes_total", TCP_POLICY, out),
        TCP_FLOWS * TCP_PAYLOAD as u64,
        TCP_FLOWS * (TCP_PAYLOAD as u64 + 40 * 60),
    );
    // UDP: one datagram each way, up to six sends while ARP resolves.
    let udp_out = policy("policy_packets_total", UDP_POLICY, out);
    in_range("UDP packets out", udp_out, UDP_FLOWS, 6 * UDP_FLOWS);
    in_range(
        "UDP packets in",
        policy("policy_packets_total", UDP_POLICY, back),
        UDP_FLOWS,
        udp_out as u64,
    );
    in_range(
        "UDP bytes out",
        policy("policy_bytes_total", UDP_POLICY, out),
        UDP_FLOWS * (UDP_PAYLOAD as u64 + 28),
        6 * UDP_FLOWS * (UDP_PAYLOAD as u64 + 28),
    );
    let address =
        |metric: &str, a: &str| sample(&text, &format!(r#"egress_{metric}{{address="{a}"}}"#));
    assert_eq!(
        address("address_flows_total", "203.0.113.10"),
        TCP_FLOWS as f64
    );
    assert_eq!(
        address("address_flows_total", "203.0.113.11"),
        UDP_FLOWS as f64
    );
    assert_eq!(
        address("address_active_flows", "203.0.113.11"),
        UDP_FLOWS as f64
    );
    assert_eq!(address("address_port_exhausted_total", "203.0.113.10"), 0.0);
    assert!(
        sample(&text, r#"egress_active_flows_by_family{family="ipv4"}"#)
            >= (TCP_FLOWS + UDP_FLOWS) as f64
    );
    assert_eq!(
        sample(
            &text,
            r#"egress_dataplane_drops_total{reason="table_full"}"#
        ),
        0.0
    );
    assert!(
        sample(&text, "egress_dataplane_flows_translated_total") >= (TCP_FLOWS + UDP_FLOWS) as f64
    );
    assert_eq!(
        sample(&text, r#"egress_reloads_total{result="success"}"#),
        1.0
    );
    assert_eq!(
        sample(&text, r#"egress_reloads_total{result="failure"}"#),
        0.0
    );
    assert!(
        sample(&text, "egress_last_reload_success_timestamp_seconds") > 1.7e9,
        "the reload time is Unix time"
    );
    assert_eq!(sample(&text, "egress_sessions"), 1.0);
    assert_eq!(
        sample(&text, r#"egress_map_capacity{map="EG_CT4"}"#),
        MAX_FLOWS as f64
    );
    assert_eq!(
        sample(&text, r#"egress_map_entries{map="EG_ID4_HOST"}"#),
        1.0,
        "the session's address is one exact-match identity entry"
    );

    // FLOWS, while the agent runs: users come from its sessions.
    let list = json(
        &agent
            .cli(&["flows", "--json", "--pin-path", pins.arg()])
            .unwrap(),
    );
    let tcp = flows_to(&list, sa(SERVER_PARTNER, 443));
    let udp = flows_to(&list, sa(SERVER_PUBLIC, 443));
    check_flows(&tcp, TCP_FLOWS, TCP_POLICY, "203.0.113.10");
    check_flows(&udp, UDP_FLOWS, UDP_POLICY, "203.0.113.11");
    assert!(
        tcp.iter()
            .chain(&udp)
            .all(|f| f["user"] == "ana@example.com"),
        "every flow comes from ana's address: {list:#}"
    );
    let ana = json(
        &agent
            .cli(&[
                "flows",
                "--json",
                "--pin-path",
                pins.arg(),
                "--user",
                "ANA@example.com",
                "--egress",
                "203.0.113.11",
            ])
            .unwrap(),
    );
    assert_eq!(
        ana.as_array().unwrap().len() as u64,
        UDP_FLOWS,
        "--user and --egress select ana's flows from 203.0.113.11: {ana:#}"
    );

    let table = agent.cli(&["flows", "--pin-path", pins.arg()]).unwrap();
    eprintln!("{table}");
    assert_eq!(
        table.lines().filter(|l| l.contains(TCP_POLICY)).count() as u64,
        TCP_FLOWS,
        "the table shows one line per flow with its policy:\n{table}"
    );

    // MAPS
    eprintln!("{}", cli(&["maps", "--pin-path", pins.arg()]));
    let listed = json(&cli(&["maps", "--json", "--pin-path", pins.arg()]));
    let ct4 = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == maps::CT4)
        .unwrap_or_else(|| panic!("maps must list {}: {listed:#}", maps::CT4));
    assert_eq!(ct4["type"], "hash");
    assert_eq!(ct4["capacity"], MAX_FLOWS);
    assert!(ct4["entries"].as_u64().unwrap() >= TCP_FLOWS + UDP_FLOWS);

    // STOPPED with --keep-dataplane: the pins still answer.
    let status = agent.stop().unwrap();
    assert!(status.success(), "the agent must stop cleanly: {status}");
    let list = json(
        &agent
            .cli(&["flows", "--json", "--pin-path", pins.arg()])
            .unwrap(),
    );
    check_flows(
        &flows_to(&list, sa(SERVER_PARTNER, 443)),
        TCP_FLOWS,
        TCP_POLICY,
        "203.0.113.10",
    );
    eprintln!(
        "{}",
        agent.cli(&["policies", "--pin-path", pins.arg()]).unwrap()
    );
    let stats = json(
        &agent
            .cli(&["stats", "--json", "--pin-path", pins.arg()])
            .unwrap(),
    );
    let p2 = stats["egress_addresses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["address"] == "203.0.113.11")
        .unwrap_or_else(|| panic!("stats from the pins must list 203.0.113.11: {stats:#}"));
    assert_eq!(p2["flows"], UDP_FLOWS);
    assert!(stats["counters"]["flows_translated"].as_u64().unwrap() >= TCP_FLOWS + UDP_FLOWS);
    let policies = json(
        &agent
            .cli(&["policies", "--json", "--pin-path", pins.arg()])
            .unwrap(),
    );
    let tcp_policy = policies
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == TCP_POLICY)
        .unwrap_or_else(|| panic!("policies from the pins must list {TCP_POLICY}: {policies:#}"));
    assert_eq!(tcp_policy["flows"], TCP_FLOWS);
    cli(&["down", "--pin-path", pins.arg()]);
}

#[test]
fn metrics_census_full_table_counts_every_flow_by_slot() {
    require_root();
    let flows: u32 = 1 << 20;
    let mut dataplane = Dataplane::load(&LoadOptions {
        max_flows: flows,
        ..LoadOptions::default()
    })
    .unwrap_or_else(|e| panic!("loading the dataplane: {e}"));
    {
        let mut ct: HashMap<_, Tuple4, CtEntry4> =
            HashMap::try_from(dataplane.ebpf_mut().map_mut(maps::CT4).unwrap()).unwrap();
        for i in 0..flows {
            let key = Tuple4::new(i.to_be(), 0x0a00_0001u32.to_be(), 1000, 443, proto::TCP);
            let entry = CtEntry4 {
                addr_slot: (i % 4) as u16,
                stats_slot: i % 3,
                ..CtEntry4::default()
            };
            ct.insert(key, entry, 0).unwrap();
        }
    }
    let conntrack = Conntrack::new(dataplane.ebpf_mut()).unwrap();
    let started = Instant::now();
    let census = conntrack.census().unwrap();
    eprintln!("census of {flows} flows: {:?}", started.elapsed());
    let started = Instant::now();
    let listed = conntrack.flows();
    eprintln!("listing {flows} flows: {:?}", started.elapsed());
    assert_eq!(census.flows4, flows as usize, "every flow is counted");
    assert_eq!(census.tables[0].capacity, flows);
    assert_eq!(census.by_addr_slot[1], u64::from(flows / 4));
    assert_eq!(census.by_policy_slot[2], u64::from(flows / 3));
    assert_eq!(listed.len(), flows as usize, "every flow is listed");
}
