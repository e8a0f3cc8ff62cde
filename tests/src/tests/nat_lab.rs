//! Lab tests of the translator itself: IPv6 end to end, many concurrent
//! flows sharing one egress address, port exhaustion, ICMP errors (path-MTU
//! discovery and TTL exceeded) through the NAT, failover of a dedicated
//! address, UDP expiry and reload flushes. The real agent runs on the
//! gateway namespace; sockets live in the client, internet and far
//! namespaces.

use std::{
    collections::HashSet,
    io::Read as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use socket2::{Domain, Protocol, Socket, Type};

use super::prog_test_run::require_root;
use crate::{
    agent::Agent,
    lab::{
        CLIENT, CLIENT6, DEDICATED_PRIMARY, DEDICATED_SECONDARY, FAR_MTU, FAR_SERVER, FAR_SERVER6,
        GW_UPLINK, GW_UPLINK6, Lab, SERVER_PARTNER, SERVER_PUBLIC, SERVER6_A, SERVER6_B, UPLINK,
        servers,
    },
    netns::NetNs,
    probe::{self, Conn, Servers, exchange, open, pattern, sa},
    tempdir::TempDir,
};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A policy file: `pools` (the inside of "egress_pools"), `policies`
/// (placed before a final catch-all to the default egress) and `extra`
/// top-level members (each starting with a comma).
pub(crate) fn policy_set(pools: &str, policies: &[&str], extra: &str) -> String {
    let mut all: Vec<&str> = policies.to_vec();
    let catch_all = r#"{ "name": "catch-all", "selector": {}, "action": { "egress": "default" } }"#;
    all.push(catch_all);
    format!(
        r#"{{
  "egress_pools": {{ {pools} }},
  "default_egress": {{ "ipv4": "{GW_UPLINK}", "ipv6": "{GW_UPLINK6}" }},
  "policies": [
    {}
  ]{extra}
}}"#,
        all.join(",\n    ")
    )
}

/// The pool `far` (203.0.113.10 and 2001:db8:e0::/64) for the far server,
/// both families.
fn far_via_pool() -> String {
    policy_set(
        r#""far": { "ipv4": ["203.0.113.10"], "ipv6": "2001:db8:e0::/64" }"#,
        &[
            r#"{ "name": "far via pool", "selector": { "dst": ["192.0.2.200/32", "2001:db8:f::10/128"] }, "action": { "egress": "far" } }"#,
        ],
        "",
    )
}

/// Stop the agent (it logs its counters then) and return its whole log.
fn stop_agent(agent: &mut Agent) -> Vec<String> {
    let status = agent.stop().expect("stopping the agent");
    assert!(
        status.success(),
        "the agent must exit cleanly on SIGTERM: {status}"
    );
    agent.lines()
}

/// The numeric `name=value` among the words of `kvs`.
fn field(kvs: &str, name: &str) -> Option<u64> {
    kvs.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.parse().expect("numeric counter"))
}

/// `name=value` from the agent's final `counters:` line (0 when absent:
/// only non-zero counters are logged).
fn counter(lines: &[String], name: &str) -> u64 {
    let line = lines
        .iter()
        .rev()
        .find_map(|l| l.split_once("counters: ").map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("the agent logged no counters:\n{}", lines.join("\n")));
    field(line, name).unwrap_or(0)
}

/// `name=value` of the `egress <addr>: ...` line the agent logs at stop.
fn addr_counter(lines: &[String], addr: IpAddr, name: &str) -> Option<u64> {
    let prefix = format!("egress {addr}: ");
    let line = lines
        .iter()
        .find_map(|l| l.split_once(&prefix).map(|(_, rest)| rest))?;
    field(line, name)
}

/// Send SIGHUP and wait for the agent to apply the `nth` (1-based) reload;
/// returns its log line.
fn reload(agent: &Agent, nth: usize) -> String {
    agent.reload(nth).unwrap_or_else(|e| {
        panic!(
            "the reload must be accepted within 10 s: {e:#}\n{}",
            agent.lines().join("\n")
        )
    })
}

/// A TCP echo server with its own listener: it writes `SEEN <peer>\n`, then
/// echoes until EOF. Unlike the fixture's servers it takes a listen backlog
/// and keeps idle connections open for a minute, for tests that hold many
/// connections open or pause between connecting and talking.
struct Echo {
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Echo {
    fn start(ns: &NetNs, addr: SocketAddr, backlog: i32) -> Self {
        let listener = ns
            .run(move || Ok(probe::listen(addr, backlog)?))
            .unwrap_or_else(|e| panic!("echo server on {addr}: {e:#}"));
        let stop = Arc::new(AtomicBool::new(false));
        let stop_accept = Arc::clone(&stop);
        let accept = std::thread::spawn(move || {
            probe::tcp_server(&listener, &stop_accept, Duration::from_secs(60));
        });
        Self {
            stop,
            accept: Some(accept),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// A fresh TCP connection from the client namespace with short timeouts:
/// the source address its server saw, or `None` when it did not complete.
fn quick_source(ns: &NetNs, to: SocketAddr) -> Option<IpAddr> {
    ns.run(move || {
        open(
            None,
            to,
            Duration::from_millis(400),
            Duration::from_millis(400),
        )
    })
    .ok()
    .map(|c| c.seen.ip())
}

/// A route-cache line of the client for `to` (to see the path MTU it learned).
fn client_route(lab: &Lab, to: IpAddr) -> String {
    let to = to.to_string();
    let mut args = vec!["route", "get", to.as_str()];
    if to.contains(':') {
        args.insert(0, "-6");
    }
    lab.client.ip(&args).unwrap_or_else(|e| format!("{e:#}"))
}

// ---------------------------------------------------------------------------
// 1. IPv6 end to end
// ---------------------------------------------------------------------------

#[test]
fn ipv6_pool_and_default_flows_leave_from_their_addresses_intact() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("ipv6");
    let config = dir.write(
        "policies.json",
        &policy_set(
            r#""v6pool": { "ipv6": "2001:db8:e0::/64" }"#,
            &[
                r#"{ "name": "v6 via pool", "selector": { "dst": ["2001:db8:2::/48"] }, "action": { "egress": "v6pool" } }"#,
            ],
            "",
        ),
    );
    let mut agent = Agent::steering(&lab, &config, &[]).expect("the agent must start steering");
    // Pings come from an unbound raw socket: make the kernel pick the first
    // client address for it too (it would prefer the newest, fd00:10::3).
    lab.client
        .ip(&[
            "-6",
            "route",
            "replace",
            "default",
            "via",
            "fd00:10::1",
            "src",
            &CLIENT6.to_string(),
        ])
        .unwrap();

    let pool: ipnet::Ipv6Net = "2001:db8:e0::/64".parse().unwrap();
    let in_pool = |ip: IpAddr| matches!(ip, IpAddr::V6(a) if pool.contains(&a));
    let to = sa(SERVER6_A, 443);

    // Several flows of each kind from the first client address: every one
    // leaves from one address of the range, the same for all of them.
    let mut sources = Vec::new();
    for round in 0..3 {
        let seen = probe::tcp(
            &lab.client,
            Some(sa(CLIENT6, 0)),
            to,
            pattern(64 * 1024, round),
        )
        .unwrap_or_else(|e| panic!("TCP over IPv6 to {to}: {e:#}"));
        assert!(
            in_pool(seen.src.ip()),
            "TCP to {to} must leave from an address inside {pool}, left from {}",
            seen.src
        );
        assert!(seen.intact, "TCP over IPv6: 64 KiB must come back intact");
        sources.push(("tcp", seen.src.ip()));

        let seen = probe::udp(&lab.client, Some(sa(CLIENT6, 0)), to, pattern(1200, round))
            .unwrap_or_else(|e| panic!("UDP over IPv6 to {to}: {e:#}"));
        assert!(
            in_pool(seen.src.ip()),
            "UDP to {to} must leave from an address inside {pool}, left from {}",
            seen.src
        );
        assert!(
            seen.intact,
            "UDP over IPv6: the datagram must come back intact"
        );
        sources.push(("udp", seen.src.ip()));

        let seen = probe::ping(
            &lab.client,
            &servers,
            SERVER6_A.into(),
            0x6a00 + round as u16,
        )
        .unwrap_or_else(|e| panic!("ping6 {SERVER6_A}: {e:#}"));
        assert!(
            in_pool(seen.src.ip()),
            "ping6 to {SERVER6_A} must leave from an address inside {pool}, left from {}",
            seen.src
        );
        assert!(
            seen.intact,
            "the echo reply must reach the client with its identifier"
        );
        sources.push(("icmpv6", seen.src.ip()));
    }
    let first = sources[0].1;
    assert!(
        sources.iter().all(|(_, s)| *s == first),
        "every flow from {CLIENT6} must leave from the same pool address: {sources:?}"
    );
    assert_ne!(
        first,
        IpAddr::V6(GW_UPLINK6),
        "pool flows must not leave from the default egress"
    );

    // A second client address also gets an address of the range.
    let other = Lab::client_addr6(1);
    let seen = probe::tcp(&lab.client, Some(sa(other, 0)), to, pattern(4096, 9))
        .unwrap_or_else(|e| panic!("TCP over IPv6 from {other}: {e:#}"));
    assert!(
        in_pool(seen.src.ip()) && seen.intact,
        "TCP from {other} must leave from inside {pool} intact, saw {seen:?}"
    );

    // Flows only the catch-all matches leave from default_egress.ipv6.
    let to_b = sa(SERVER6_B, 443);
    let seen = probe::tcp(
        &lab.client,
        Some(sa(CLIENT6, 0)),
        to_b,
        pattern(64 * 1024, 3),
    )
    .unwrap_or_else(|e| panic!("TCP over IPv6 to {to_b}: {e:#}"));
    assert_eq!(
        seen.src.ip(),
        IpAddr::V6(GW_UPLINK6),
        "a default-policy IPv6 TCP flow must leave from {GW_UPLINK6}"
    );
    assert!(seen.intact, "default IPv6 TCP: data must come back intact");
    let seen = probe::udp(&lab.client, Some(sa(CLIENT6, 0)), to_b, pattern(1200, 4))
        .unwrap_or_else(|e| panic!("UDP over IPv6 to {to_b}: {e:#}"));
    assert_eq!(
        seen.src.ip(),
        IpAddr::V6(GW_UPLINK6),
        "a default-policy IPv6 UDP flow must leave from {GW_UPLINK6}"
    );
    assert!(seen.intact, "default IPv6 UDP: data must come back intact");
    let seen = probe::ping(&lab.client, &servers, SERVER6_B.into(), 0x6b01)
        .unwrap_or_else(|e| panic!("ping6 {SERVER6_B}: {e:#}"));
    assert_eq!(
        seen.src.ip(),
        IpAddr::V6(GW_UPLINK6),
        "a default-policy ping6 must leave from {GW_UPLINK6}"
    );
    assert!(seen.intact, "the default ping6 reply must reach the client");

    let lines = stop_agent(&mut agent);
    assert!(
        counter(&lines, "flows_translated") >= 10,
        "the IPv6 flows must have been translated (counters):\n{}",
        lines.join("\n")
    );
}

// ---------------------------------------------------------------------------
// 2. Many concurrent flows sharing one egress address
// ---------------------------------------------------------------------------

#[test]
fn concurrency_2000_flows_sharing_source_ports_get_distinct_translated_ports() {
    const ADDRS: u8 = 20;
    const PORTS: u16 = 100;
    const FIRST_PORT: u16 = 50000;
    require_root();
    let lab = Lab::new(ADDRS - 1).unwrap();
    let to = sa(SERVER_PUBLIC, 8443);
    let _echo = Echo::start(&lab.inet, to, 4096);
    let dir = TempDir::new("concurrency");
    let config = dir.write("policies.json", &policy_set("", &[], ""));
    let mut agent = Agent::steering(&lab, &config, &[]).expect("the agent must start steering");

    // Phase 1: open every connection (one thread per client address, each
    // reusing the same 100 source ports) and keep them all open.
    let started = Instant::now();
    let opened: Vec<Vec<(SocketAddr, anyhow::Result<Conn>)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..ADDRS)
            .map(|i| {
                let ns = &lab.client;
                s.spawn(move || {
                    ns.run(move || {
                        let addr = Lab::client_addr(i);
                        Ok((0..PORTS)
                            .map(|p| {
                                let from = sa(addr, FIRST_PORT + p);
                                let conn = open(
                                    Some(from),
                                    to,
                                    Duration::from_secs(20),
                                    Duration::from_secs(60),
                                );
                                (from, conn)
                            })
                            .collect::<Vec<_>>())
                    })
                    .expect("client thread")
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let connect_time = started.elapsed();

    let mut failures = Vec::new();
    let mut batches = Vec::new();
    for batch in opened {
        let mut conns = Vec::new();
        for (from, conn) in batch {
            match conn {
                Ok(c) => conns.push((from, c)),
                Err(e) => failures.push(format!("{from}: {e:#}")),
            }
        }
        batches.push(conns);
    }
    assert!(
        failures.is_empty(),
        "all {} connections must open; {} failed, e.g. {:?}",
        usize::from(ADDRS) * usize::from(PORTS),
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let seen: Vec<SocketAddr> = batches.iter().flatten().map(|(_, c)| c.seen).collect();
    assert_eq!(seen.len(), 2000, "2000 connections open at once");
    assert!(
        seen.iter().all(|s| s.ip() == IpAddr::V4(GW_UPLINK)),
        "every flow must leave from the default egress {GW_UPLINK}"
    );
    let distinct: HashSet<SocketAddr> = seen.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        seen.len(),
        "the server must see 2000 distinct (address, port) pairs, saw {} distinct",
        distinct.len()
    );

    // Phase 2: every connection echoes its own payload, all batches at once.
    let results: Vec<(SocketAddr, anyhow::Result<bool>)> = std::thread::scope(|s| {
        let workers: Vec<_> = batches
            .into_iter()
            .map(|conns| {
                s.spawn(move || {
                    conns
                        .into_iter()
                        .map(|(from, conn)| {
                            let seed = match from.ip() {
                                IpAddr::V4(a) => u64::from(u32::from(a)) << 16,
                                IpAddr::V6(_) => 0,
                            } | u64::from(from.port());
                            (from, exchange(conn, &pattern(2048, seed)))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let total = started.elapsed();
    let bad: Vec<String> = results
        .iter()
        .filter_map(|(from, r)| match r {
            Ok(true) => None,
            Ok(false) => Some(format!("{from}: echo differs")),
            Err(e) => Some(format!("{from}: {e:#}")),
        })
        .collect();
    assert!(
        bad.is_empty(),
        "every one of the 2000 connections must echo its data intact; {} did not, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    eprintln!(
        "2000 concurrent connections: all open after {connect_time:?}, all echoed after {total:?}"
    );

    let lines = stop_agent(&mut agent);
    assert!(
        counter(&lines, "flows_translated") >= 2000,
        "the agent must have translated the 2000 flows"
    );
    assert_eq!(
        counter(&lines, "drop_port_exhausted"),
        0,
        "no flow may have run out of ports"
    );
}

// ---------------------------------------------------------------------------
// 3. Port exhaustion
// ---------------------------------------------------------------------------

#[test]
fn nat_port_range_exhausted_drops_new_flows_keeps_established_intact() {
    const CLIENTS: u8 = 10;
    const SPORT: u16 = 45000;
    require_root();
    let lab = Lab::new(CLIENTS - 1).unwrap();
    let to = sa(SERVER_PUBLIC, 8443);
    let _echo = Echo::start(&lab.inet, to, 128);
    let dir = TempDir::new("exhaustion");
    let config = dir.write(
        "policies.json",
        &policy_set("", &[], r#", "nat": { "port_range": "40000-40003" }"#),
    );
    let mut agent = Agent::steering(&lab, &config, &[]).expect("the agent must start steering");

    let connect = |i: u8, timeout: Duration| {
        let from = sa(Lab::client_addr(i), SPORT);
        lab.client
            .run(move || open(Some(from), to, timeout, Duration::from_secs(60)))
    };
    // The original port plus the range's four: five flows fit.
    let mut open_conns = Vec::new();
    for i in 0..5 {
        let conn = connect(i, Duration::from_secs(5)).unwrap_or_else(|e| {
            panic!(
                "client {} (connection {}) must connect while ports are free: {e:#}",
                Lab::client_addr(i),
                i + 1
            )
        });
        open_conns.push((i, conn));
    }
    // The rest find no free port: their SYNs are dropped.
    let rest: Vec<(u8, anyhow::Result<Conn>)> = std::thread::scope(|s| {
        let tries: Vec<_> = (5..CLIENTS)
            .map(|i| {
                let connect = &connect;
                s.spawn(move || (i, connect(i, Duration::from_millis(2500))))
            })
            .collect();
        tries.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for (i, r) in &rest {
        assert!(
            r.is_err(),
            "client {} must fail to connect once the 5 ports towards {to} are taken, but the server saw {:?}",
            Lab::client_addr(*i),
            r.as_ref().map(|c| c.seen).ok()
        );
    }

    let ports: HashSet<u16> = open_conns.iter().map(|(_, c)| c.seen.port()).collect();
    assert!(
        open_conns
            .iter()
            .all(|(_, c)| c.seen.ip() == IpAddr::V4(GW_UPLINK)),
        "all flows leave from the default egress"
    );
    assert_eq!(
        ports,
        HashSet::from([SPORT, 40000, 40001, 40002, 40003]),
        "the five flows must use the original port and the four range ports"
    );

    // The established flows still carry their own data, concurrently.
    let results: Vec<(u8, anyhow::Result<bool>)> = std::thread::scope(|s| {
        let workers: Vec<_> = open_conns
            .into_iter()
            .map(|(i, conn)| {
                s.spawn(move || (i, exchange(conn, &pattern(256 * 1024, u64::from(i)))))
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    for (i, r) in results {
        assert!(
            matches!(r, Ok(true)),
            "the established flow of {} must still echo its own 256 KiB intact (no cross-talk): {r:?}",
            Lab::client_addr(i)
        );
    }

    let lines = stop_agent(&mut agent);
    let dropped = counter(&lines, "drop_port_exhausted");
    assert!(
        dropped >= u64::from(CLIENTS - 5),
        "drop_port_exhausted must count the refused SYNs (at least {}), got {dropped}",
        CLIENTS - 5
    );
    let exhausted = addr_counter(&lines, IpAddr::V4(GW_UPLINK), "exhausted");
    assert!(
        exhausted.is_some_and(|n| n >= u64::from(CLIENTS - 5)),
        "the egress {GW_UPLINK} line must count exhaustion (at least {}), got {exhausted:?}:\n{}",
        CLIENTS - 5,
        lines.join("\n")
    );
    let flows = addr_counter(&lines, IpAddr::V4(GW_UPLINK), "flows");
    assert!(
        flows.is_some_and(|n| n >= 5),
        "the egress {GW_UPLINK} line must count the 5 flows, got {flows:?}"
    );
}

// ---------------------------------------------------------------------------
// 4. Path-MTU discovery through the NAT
// ---------------------------------------------------------------------------

/// The far server advertises the MSS of a 1500-byte link (as a server on
/// an Ethernet segment behind a smaller hop would), so the client sends
/// full-size segments and the small-MTU hop has to send "fragmentation
/// needed" / "packet too big" towards the egress address.
fn far_advertises_full_mss(lab: &Lab) {
    let far = lab.far();
    far.ip(&[
        "route",
        "replace",
        "default",
        "via",
        "10.254.0.1",
        "advmss",
        "1460",
    ])
    .unwrap();
    far.ip(&[
        "-6",
        "route",
        "replace",
        "default",
        "via",
        "fd00:254::1",
        "advmss",
        "1440",
    ])
    .unwrap();
}

fn pmtud_transfer(v6: bool) {
    require_root();
    let lab = Lab::with_far(0).unwrap();
    far_advertises_full_mss(&lab);
    let (server, from): (IpAddr, IpAddr) = if v6 {
        (FAR_SERVER6.into(), CLIENT6.into())
    } else {
        (FAR_SERVER.into(), CLIENT.into())
    };
    let to = sa(server, 443);
    let _echo = Echo::start(lab.far(), to, 16);
    let dir = TempDir::new("pmtud");
    let config = dir.write("policies.json", &far_via_pool());
    let mut agent = Agent::steering(&lab, &config, &[]).expect("the agent must start steering");

    let payload = pattern(2 << 20, 42);
    let (seen, intact, connected, took) = lab
        .client
        .run(move || {
            let started = Instant::now();
            let conn = open(
                Some(sa(from, 0)),
                to,
                Duration::from_secs(5),
                Duration::from_secs(30),
            )?;
            let connected = started.elapsed();
            let seen = conn.seen;
            let started = Instant::now();
            let intact = exchange(conn, &payload)?;
            Ok((seen, intact, connected, started.elapsed()))
        })
        .unwrap_or_else(|e| panic!("2 MiB over TCP to {to} through a {FAR_MTU}-byte hop: {e:#}"));
    eprintln!("PMTUD {to}: connected in {connected:?}, 2 MiB echoed in {took:?}, left as {seen}");
    assert!(
        intact,
        "2 MiB echoed through the {FAR_MTU}-byte hop must come back intact"
    );
    let expected_pool = if v6 {
        let pool: ipnet::Ipv6Net = "2001:db8:e0::/64".parse().unwrap();
        matches!(seen.ip(), IpAddr::V6(a) if pool.contains(&a))
    } else {
        seen.ip() == IpAddr::V4(DEDICATED_PRIMARY)
    };
    assert!(
        expected_pool,
        "the flow must be translated to the pool, left as {seen}"
    );
    let route = client_route(&lab, server);
    assert!(
        route.contains(&format!("mtu {FAR_MTU}")),
        "the client must have learned the path MTU {FAR_MTU} from the translated ICMP error: {route}"
    );

    let lines = stop_agent(&mut agent);
    let translated = counter(&lines, "icmp_errors_translated");
    assert!(
        translated > 0,
        "the gateway must have translated the {} back to the client (icmp_errors_translated={translated})",
        if v6 {
            "packet too big"
        } else {
            "fragmentation needed"
        }
    );
}

#[test]
fn pmtud_ipv4_frag_needed_through_nat_large_transfer_completes() {
    pmtud_transfer(false);
}

#[test]
fn pmtud_ipv6_packet_too_big_through_nat_large_transfer_completes() {
    pmtud_transfer(true);
}

// ---------------------------------------------------------------------------
// 5. Traceroute-style TTL exceeded
// ---------------------------------------------------------------------------

/// A time-exceeded message in what a raw socket read: the quoted packet's
/// (source, source port, destination) when it quotes UDP. IPv4 raw sockets
/// get the IP header; IPv6 ones start at the ICMPv6 header.
fn time_exceeded(buf: &[u8], v6: bool) -> Option<(IpAddr, u16, IpAddr)> {
    if v6 {
        // type 3 = time exceeded; 4 bytes unused; then the quoted header.
        if buf.len() < 8 + 40 + 8 || buf[0] != 3 {
            return None;
        }
        let q = &buf[8..];
        if q[6] != 17 {
            return None;
        }
        let src: [u8; 16] = q[8..24].try_into().ok()?;
        let dst: [u8; 16] = q[24..40].try_into().ok()?;
        let sport = u16::from_be_bytes([q[40], q[41]]);
        Some((
            Ipv6Addr::from(src).into(),
            sport,
            Ipv6Addr::from(dst).into(),
        ))
    } else {
        let ihl = usize::from(*buf.first()? & 0x0f) * 4;
        let icmp = buf.get(ihl..)?;
        if icmp.len() < 8 + 20 + 8 || icmp[0] != 11 {
            return None;
        }
        let q = &icmp[8..];
        let qihl = usize::from(q[0] & 0x0f) * 4;
        if q[9] != 17 || q.len() < qihl + 8 {
            return None;
        }
        let src = Ipv4Addr::new(q[12], q[13], q[14], q[15]);
        let dst = Ipv4Addr::new(q[16], q[17], q[18], q[19]);
        let sport = u16::from_be_bytes([q[qihl], q[qihl + 1]]);
        Some((src.into(), sport, dst.into()))
    }
}

/// The outer destination of an IPv4 packet a raw socket read.
fn outer_dst_v4(buf: &[u8]) -> Option<Ipv4Addr> {
    let b = buf.get(16..20)?;
    Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

/// Send UDP with hop limit 2 from the client to the far server; return the
/// (quoted source, quoted port, quoted destination) of the time-exceeded
/// message the client's raw socket received, and the port the UDP socket had.
fn ttl_probe(
    lab: &Lab,
    from: IpAddr,
    to: SocketAddr,
) -> anyhow::Result<((IpAddr, u16, IpAddr), u16)> {
    lab.client.run(move || {
        let v6 = to.is_ipv6();
        let raw = probe::icmp_socket(v6, Duration::from_millis(200))?;
        let udp = Socket::new(Domain::for_address(to), Type::DGRAM, Some(Protocol::UDP))?;
        // The gateway forwards it with 1 left; the internet router drops it.
        if v6 {
            udp.set_unicast_hops_v6(2)?;
        } else {
            udp.set_ttl_v4(2)?;
        }
        udp.bind(&sa(from, 0).into())?;
        let port = udp
            .local_addr()?
            .as_socket()
            .context("UDP local address")?
            .port();
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut other = Vec::new();
        while Instant::now() < deadline {
            udp.send_to(b"traceroute-probe", &to.into())?;
            let wait = Instant::now() + Duration::from_millis(500);
            while Instant::now() < wait {
                let Ok(n) = (&raw).read(&mut buf) else {
                    continue;
                };
                let packet = &buf[..n];
                if let Some(quoted) = time_exceeded(packet, v6) {
                    if !v6 {
                        let dst = outer_dst_v4(packet);
                        anyhow::ensure!(
                            dst == Some(CLIENT),
                            "the time-exceeded message must be addressed to the client, was to {dst:?}"
                        );
                    }
                    return Ok((quoted, port));
                }
                other.push(n);
            }
        }
        anyhow::bail!(
            "no time-exceeded message reached the client within 5 s ({} other ICMP messages)",
            other.len()
        )
    })
}

fn ttl_exceeded(v6: bool) {
    require_root();
    let lab = Lab::with_far(0).unwrap();
    let dir = TempDir::new("ttl");
    let config = dir.write("policies.json", &far_via_pool());
    let mut agent = Agent::steering(&lab, &config, &[]).expect("the agent must start steering");
    let (from, to): (IpAddr, SocketAddr) = if v6 {
        (CLIENT6.into(), sa(FAR_SERVER6, 33434))
    } else {
        (CLIENT.into(), sa(FAR_SERVER, 33434))
    };
    let ((src, sport, dst), port) =
        ttl_probe(&lab, from, to).unwrap_or_else(|e| panic!("hop-limit-2 UDP to {to}: {e:#}"));
    assert_eq!(
        (src, sport),
        (from, port),
        "the time-exceeded message must quote the client's own address and port"
    );
    assert_eq!(
        dst,
        to.ip(),
        "the quoted packet's destination stays the server"
    );
    let lines = stop_agent(&mut agent);
    assert!(
        counter(&lines, "icmp_errors_translated") > 0,
        "the gateway must count the translated time-exceeded message"
    );
}

#[test]
fn ttl_ipv4_time_exceeded_through_nat_quotes_client_address_and_port() {
    ttl_exceeded(false);
}

#[test]
fn ttl_ipv6_time_exceeded_through_nat_quotes_client_address_and_port() {
    ttl_exceeded(true);
}

// ---------------------------------------------------------------------------
// 6. Failover of a dedicated address
// ---------------------------------------------------------------------------

/// Poll with fresh connections until one leaves from `want`; the time it took.
fn time_until_source(
    lab: &Lab,
    to: SocketAddr,
    want: Ipv4Addr,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if quick_source(&lab.client, to) == Some(IpAddr::V4(want)) {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    None
}

#[test]
fn failover_removed_primary_moves_new_flows_to_secondary_within_2s_and_back() {
    require_root();
    let lab = Lab::new(0).unwrap();
    let to = sa(SERVER_PARTNER, 443);
    let _echo = Echo::start(&lab.inet, to, 256);
    let dir = TempDir::new("failover");
    let config = dir.write(
        "policies.json",
        &policy_set(
            r#""dual": { "ipv4": ["203.0.113.10", "203.0.113.11"] }"#,
            &[
                r#"{ "name": "partner via dual", "selector": { "dst": ["192.0.2.10/32"] }, "action": { "egress": "dual" } }"#,
            ],
            r#", "health": { "interval": "500ms" }"#,
        ),
    );
    let mut agent = Agent::steering(&lab, &config, &[]).expect("the agent must start steering");

    for _ in 0..3 {
        assert_eq!(
            quick_source(&lab.client, to),
            Some(IpAddr::V4(DEDICATED_PRIMARY)),
            "while both are up, new flows leave from the primary {DEDICATED_PRIMARY}"
        );
    }

    lab.gw
        .ip(&["addr", "del", "203.0.113.10/32", "dev", UPLINK])
        .unwrap();
    let limit = Duration::from_secs(2);
    let down = time_until_source(&lab, to, DEDICATED_SECONDARY, Duration::from_secs(5));
    eprintln!("failover: new flows left from {DEDICATED_SECONDARY} after {down:?}");
    assert!(
        down.is_some_and(|t| t < limit),
        "after {DEDICATED_PRIMARY} is removed, new flows must leave from {DEDICATED_SECONDARY} within {limit:?}; measured {down:?}"
    );
    agent
        .wait_for(
            &format!("egress address {DEDICATED_PRIMARY} is down"),
            Duration::from_secs(2),
        )
        .expect("the agent must log the address as down");
    for _ in 0..3 {
        assert_eq!(
            quick_source(&lab.client, to),
            Some(IpAddr::V4(DEDICATED_SECONDARY)),
            "while the primary is down, every new flow leaves from {DEDICATED_SECONDARY}"
        );
    }

    lab.gw
        .ip(&["addr", "add", "203.0.113.10/32", "dev", UPLINK])
        .unwrap();
    let back = time_until_source(&lab, to, DEDICATED_PRIMARY, Duration::from_secs(5));
    eprintln!("failback: new flows left from {DEDICATED_PRIMARY} again after {back:?}");
    assert!(
        back.is_some_and(|t| t < limit),
        "after {DEDICATED_PRIMARY} is re-added, new flows must move back to it within {limit:?}; measured {back:?}"
    );
    stop_agent(&mut agent);
}

// ---------------------------------------------------------------------------
// 7. UDP expiry
// ---------------------------------------------------------------------------

/// One UDP exchange of the client's `from` with `to`, labelled in failures.
fn udp(lab: &Lab, from: SocketAddr, to: SocketAddr, label: &str) -> probe::Seen {
    probe::udp(&lab.client, Some(from), to, probe::token(label))
        .unwrap_or_else(|e| panic!("UDP {from} -> {to} ({label}): {e:#}"))
}

fn dedicated_for_partner() -> &'static str {
    r#"{ "name": "partner via ded", "selector": { "dst": ["192.0.2.10/32"] }, "action": { "egress": "ded" } }"#
}

#[test]
fn udp_idle_flow_expires_after_timeout_then_follows_reloaded_policy() {
    require_root();
    let lab = Lab::new(0).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("udp-expiry");
    let pools = r#""ded": { "ipv4": ["203.0.113.10"] }"#;
    let timeouts = r#", "timeouts": { "udp": "2s" }"#;
    let config = dir.write("policies.json", &policy_set(pools, &[], timeouts));
    let mut agent = Agent::steering(&lab, &config, &[]).expect("the agent must start steering");

    let from = sa(CLIENT, 41000);
    let to = sa(SERVER_PARTNER, 443);
    let seen = udp(&lab, from, to, "before");
    assert_eq!(
        seen.src.ip(),
        IpAddr::V4(GW_UPLINK),
        "before the reload the flow leaves from the default egress"
    );

    dir.write(
        "policies.json",
        &policy_set(pools, &[dedicated_for_partner()], timeouts),
    );
    reload(&agent, 1);
    let seen = udp(&lab, from, to, "established");
    assert_eq!(
        seen.src.ip(),
        IpAddr::V4(GW_UPLINK),
        "right after the reload the established flow keeps its translation"
    );
    assert!(
        seen.intact,
        "the established flow's data must come back intact"
    );

    // Idle for the timeout (2 s) plus a sweep interval (1 s) and a margin.
    std::thread::sleep(Duration::from_millis(4000));
    let seen = udp(&lab, from, to, "after-expiry");
    assert_eq!(
        seen.src.ip(),
        IpAddr::V4(DEDICATED_PRIMARY),
        "once idle past the UDP timeout, the same client port starts a new flow under the reloaded policy"
    );
    assert!(seen.intact, "the new flow's data must come back intact");
    stop_agent(&mut agent);
}

// ---------------------------------------------------------------------------
// 8. Reload ends flows whose pool was removed
// ---------------------------------------------------------------------------

#[test]
fn reload_removing_pool_ends_its_flows_next_packet_leaves_from_default() {
    require_root();
    let lab = Lab::new(0).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("reload-flush");
    let config = dir.write(
        "policies.json",
        &policy_set(
            r#""ded": { "ipv4": ["203.0.113.10"] }"#,
            &[dedicated_for_partner()],
            "",
        ),
    );
    let mut agent = Agent::steering(&lab, &config, &[]).expect("the agent must start steering");

    let from = sa(CLIENT, 41001);
    let to = sa(SERVER_PARTNER, 443);
    let seen = udp(&lab, from, to, "pool");
    assert_eq!(
        seen.src.ip(),
        IpAddr::V4(DEDICATED_PRIMARY),
        "before the reload the flow leaves from the pool"
    );

    dir.write("policies.json", &policy_set("", &[], ""));
    let line = reload(&agent, 1);
    let ended: u64 = line
        .split_once("; ended ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected reload line {line:?}"));
    assert!(
        ended >= 1,
        "the reload must end the flow whose egress address was removed: {line}"
    );
    let seen = udp(&lab, from, to, "after");
    assert_eq!(
        seen.src.ip(),
        IpAddr::V4(GW_UPLINK),
        "the next packet of the same 5-tuple must leave from the default egress, not the removed pool address"
    );
    assert!(seen.intact, "its data must come back intact");
    stop_agent(&mut agent);
}

/// One refused packet must count once in drop_port_exhausted, as it does
/// in the address's `exhausted` count.
#[test]
fn nat_port_exhausted_refused_packet_counted_once() {
    const SPORT: u16 = 45001;
    require_root();
    let lab = Lab::new(2).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("exhausted-count");
    let config = dir.write(
        "policies.json",
        &policy_set("", &[], r#", "nat": { "port_range": "40000-40000" }"#),
    );
    let mut agent = Agent::steering(&lab, &config, &[]).expect("the agent must start steering");
    let to = sa(SERVER_PUBLIC, 443);
    // The original port, then the range's only port.
    for i in 0..2 {
        let from = sa(Lab::client_addr(i), SPORT);
        probe::udp(&lab.client, Some(from), to, probe::token("fits"))
            .unwrap_or_else(|e| panic!("UDP from {from} must get a port: {e:#}"));
    }
    // Exactly one datagram from a third client: no port is left for it.
    let from = sa(Lab::client_addr(2), SPORT);
    let answered = lab
        .client
        .run(move || {
            let socket = std::net::UdpSocket::bind(from)?;
            socket.set_read_timeout(Some(Duration::from_millis(1000)))?;
            socket.send_to(b"no-port-left", to)?;
            let mut buf = [0u8; 512];
            Ok(socket.recv_from(&mut buf).is_ok())
        })
        .unwrap();
    assert!(
        !answered,
        "the third flow must find no free port and be dropped"
    );
    let lines = stop_agent(&mut agent);
    let exhausted = addr_counter(&lines, IpAddr::V4(GW_UPLINK), "exhausted");
    assert_eq!(
        exhausted,
        Some(1),
        "the egress address counts the one refused flow"
    );
    assert_eq!(
        counter(&lines, "drop_port_exhausted"),
        1,
        "one refused packet must count once in drop_port_exhausted"
    );
}

/// Whether an Ethernet frame is a DAD neighbor solicitation (source ::)
/// for `target`.
fn is_dad_probe(frame: &[u8], target: Ipv6Addr) -> bool {
    let Some(ip) = frame.get(14..) else {
        return false;
    };
    ip.len() >= 40 + 24
        && frame[12..14] == [0x86, 0xdd]
        && ip[6] == 58
        && ip[8..24] == [0u8; 16]
        && ip[40] == 135
        && ip[48..64] == target.octets()
}

/// The gateway's own IPv6 packets with the unspecified source (duplicate
/// address detection, MLD reports sent before an address is usable) are
/// its own traffic, not a client's: they must leave the uplink untouched.
#[test]
fn local_ipv6_dad_probe_from_unspecified_source_reaches_the_uplink() {
    require_root();
    let lab = Lab::new(0).unwrap();
    let dir = TempDir::new("dad");
    let config = dir.write("policies.json", &policy_set("", &[], ""));
    let mut agent = Agent::steering(&lab, &config, &[]).expect("the agent must start steering");
    let target: Ipv6Addr = "2001:db8:ff::77".parse().unwrap();
    let capture = lab
        .inet
        .run(|| {
            let proto = Protocol::from(i32::from((libc::ETH_P_IPV6 as u16).to_be()));
            let s = Socket::new(Domain::PACKET, Type::RAW, Some(proto))?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            Ok(s)
        })
        .unwrap();
    // An address with duplicate address detection (no "nodad").
    lab.gw
        .ip(&["-6", "addr", "add", "2001:db8:ff::77/64", "dev", UPLINK])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut buf = [0u8; 2048];
    let mut seen = false;
    while !seen && Instant::now() < deadline {
        if let Ok(n) = (&capture).read(&mut buf) {
            seen = is_dad_probe(&buf[..n], target);
        }
    }
    let lines = stop_agent(&mut agent);
    assert!(
        seen,
        "the gateway's DAD probe for {target} (source ::) must reach the internet side; drop_unsupported={}",
        counter(&lines, "drop_unsupported")
    );
}
