//! Lab tests of faults under traffic: the uplink losing its carrier or
//! being taken down, a dedicated egress address removed and re-added, the
//! connection table full, a port range exhausted, the agent killed at
//! random moments of a reload, and the flow log's file system full. Each
//! test injects the fault while a TCP connection and a UDP flow run,
//! checks what a user would see meanwhile, removes the fault and measures
//! how long the gateway takes to work again by itself, printed as
//! `recovery: <fault>: <ms> ms` (a figure, never asserted beyond a
//! generous liveness bound).

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::maps::{Array, LpmTrie, Map, MapData};
use egress_common::{
    classify::{GEN_PREFIX_BITS, GenPrefix4},
    geo::GEN_SLOT_POLICY,
    maps,
};
use nix::sys::signal::Signal;
use serde_json::Value;

use super::{nat_lab::policy_set, prog_test_run::require_root, steer_e2e::tcx_programs};
use crate::rng::Rng;
use crate::{
    agent::{self, Agent},
    lab::{
        DEDICATED_PRIMARY, DEDICATED_SECONDARY, GW_UPLINK, Lab, SERVER_INTERNAL, SERVER_PARTNER,
        SERVER_PUBLIC, UPLINK, servers,
    },
    netns::{NetNs, sh},
    pins::PinPath,
    probe::{self, Servers, sa},
    tempdir::TempDir,
    traffic::Stream,
};

/// How long the gateway may take to recover before the test calls it
/// stuck: a liveness bound, not a performance claim.
const RECOVERY_LIMIT: Duration = Duration::from_secs(30);
/// Connect and reply timeout of a probe while a fault may still be in
/// force: short, so polling sees the recovery soon after it happens.
const QUICK: Duration = Duration::from_millis(400);
const POLL: Duration = Duration::from_millis(20);
/// Traffic must keep moving (or move again) within this.
const STREAM_WAIT: Duration = Duration::from_secs(10);

/// Poll `check` until it yields, and return that with the time since
/// `since` (the moment the fault was removed). Fails when the gateway has
/// not recovered within [`RECOVERY_LIMIT`].
fn recover<T>(what: &str, since: Instant, mut check: impl FnMut() -> Option<T>) -> (T, Duration) {
    loop {
        if let Some(value) = check() {
            return (value, since.elapsed());
        }
        assert!(
            since.elapsed() < RECOVERY_LIMIT,
            "{what}: the gateway must recover by itself within {RECOVERY_LIMIT:?}"
        );
        std::thread::sleep(POLL);
    }
}

/// Print a recovery figure where `--nocapture` shows it.
fn report(fault: &str, took: Duration) {
    eprintln!("recovery: {fault}: {} ms", took.as_millis());
}

/// A TCP flow from `ns` (from `from`, when given) to an echo server,
/// tried once with short timeouts: the source the server saw, when the
/// connection was served and its echo came back intact.
fn tcp_seen(ns: &NetNs, from: Option<SocketAddr>, to: SocketAddr) -> Option<SocketAddr> {
    let payload = probe::token("fault");
    ns.run(move || {
        let conn = probe::open(from, to, QUICK, QUICK)?;
        let seen = conn.seen;
        anyhow::ensure!(
            probe::exchange(conn, &payload)?,
            "the echo came back altered"
        );
        Ok(seen)
    })
    .ok()
}

/// One UDP datagram from `from` to an echo server, waiting `wait` for the
/// answer: the source the server saw, when it answered intact.
fn udp_seen(ns: &NetNs, from: SocketAddr, to: SocketAddr, wait: Duration) -> Option<SocketAddr> {
    let payload = probe::token("fault-udp");
    ns.run(move || {
        let socket = UdpSocket::bind(from)?;
        socket.set_read_timeout(Some(wait))?;
        socket.send_to(&payload, to)?;
        let mut buf = [0u8; 2048];
        let (n, _) = socket.recv_from(&mut buf)?;
        let reply = &buf[..n];
        let split = reply
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| anyhow::anyhow!("an answer without a report line"))?;
        let line = std::str::from_utf8(&reply[..split])?;
        let seen: SocketAddr = line
            .strip_prefix("SEEN ")
            .ok_or_else(|| anyhow::anyhow!("unexpected report {line:?}"))?
            .parse()?;
        anyhow::ensure!(reply[split + 1..] == payload[..], "the answer was altered");
        Ok(seen)
    })
    .ok()
}

/// `egress-agent stats --json` of a running agent.
fn stats(agent: &Agent) -> Value {
    let out = agent
        .cli(&["stats", "--json"])
        .unwrap_or_else(|e| panic!("egress-agent stats: {e:#}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("stats JSON: {e}: {out}"))
}

fn counter(stats: &Value, name: &str) -> u64 {
    stats["counters"][name].as_u64().unwrap_or(0)
}

/// Run the agent's CLI (`egress-agent <args>`) on the host, as an
/// operator would; its standard output, or its error output as the error.
fn cli(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(agent::binary())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running egress-agent {}: {e}", args.join(" ")));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(text(&out.stderr))
    }
}

/// The stream's report once stopped: the UDP flow kept one translated
/// tuple and was answered, the TCP connection carried data intact.
fn finish(stream: Stream, fault: &str) {
    let (tcp, udp) = stream
        .finish()
        .unwrap_or_else(|e| panic!("{fault}: the TCP connection must survive intact: {e:#}"));
    assert!(tcp.bytes > 0, "{fault}: the TCP connection carried data");
    assert!(
        udp.answered > 0,
        "{fault}: the UDP flow was answered ({} of {})",
        udp.answered,
        udp.sent
    );
    assert_eq!(
        udp.seen.len(),
        1,
        "{fault}: the UDP flow kept one translated tuple throughout: {:?}",
        udp.seen
    );
    eprintln!(
        "{fault}: {} TCP bytes echoed intact from {}; {} of {} UDP datagrams answered, tuple {:?}",
        tcp.bytes, tcp.seen, udp.answered, udp.sent, udp.seen
    );
}

/// Flows to the partner server leave from the pool `pair` (primary
/// 203.0.113.10, secondary .11); the rest from the default 203.0.113.1.
fn pair_policies(extra: &str) -> String {
    policy_set(
        r#""pair": { "ipv4": ["203.0.113.10", "203.0.113.11"] }"#,
        &[
            r#"{ "name": "partner via pair", "selector": { "dst": ["192.0.2.10/32"] }, "action": { "egress": "pair" } }"#,
        ],
        extra,
    )
}

/// How the uplink goes away.
#[derive(Clone, Copy, Debug)]
enum UplinkDown {
    /// The provider's side goes down: the gateway's uplink loses its
    /// carrier (a pulled cable); its routes stay.
    Carrier,
    /// The gateway's uplink is set administratively down and up again;
    /// the kernel drops its routes on the way down, and the network
    /// configuration adds the default route back on the way up.
    Admin,
}

impl UplinkDown {
    fn down(self, lab: &Lab) {
        match self {
            Self::Carrier => lab.inet.ip(&["link", "set", "eth0", "down"]),
            Self::Admin => lab.gw.ip(&["link", "set", UPLINK, "down"]),
        }
        .unwrap_or_else(|e| panic!("taking the uplink down ({self:?}): {e:#}"));
    }

    fn up(self, lab: &Lab) {
        match self {
            Self::Carrier => lab.inet.ip(&["link", "set", "eth0", "up"]),
            Self::Admin => lab.gw.ip(&["link", "set", UPLINK, "up"]).and_then(|_| {
                lab.gw
                    .ip(&["route", "replace", "default", "via", "203.0.113.254"])
            }),
        }
        .unwrap_or_else(|e| panic!("bringing the uplink back ({self:?}): {e:#}"));
    }
}

fn uplink_down_up(how: UplinkDown, fault: &str) {
    require_root();
    let lab = Lab::new(0).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("faults-uplink");
    let config = dir.write("policies.json", &pair_policies(""));
    let pins = PinPath::new().unwrap();
    let agent = Agent::steering(&lab, &config, &["--pin-path", pins.arg()]).unwrap();
    let to = sa(SERVER_PARTNER, 443);
    let stream = Stream::start(&lab.client, to, to).unwrap();
    stream.advance(20, STREAM_WAIT).unwrap();
    // A UDP flow of its own, probed before and after: it must come back
    // under the translated tuple it had.
    let udp_from = sa(Lab::client_addr(0), 47001);
    let udp_tuple = udp_seen(&lab.client, udp_from, to, Duration::from_secs(2))
        .expect("the UDP flow is answered before the fault");

    how.down(&lab);
    // What a user sees meanwhile: nothing gets through (after the chunk
    // in flight when the link went).
    std::thread::sleep(Duration::from_millis(300));
    let stalled_at = stream.progress();
    assert!(
        tcp_seen(&lab.client, None, to).is_none(),
        "{fault}: no new connection gets through while the uplink is down"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        stream.progress(),
        stalled_at,
        "{fault}: the TCP stream stalls while the uplink is down"
    );
    assert_eq!(
        tcx_programs(&lab.gw, UPLINK),
        2,
        "{fault}: the programs stay attached while the link is down"
    );

    how.up(&lab);
    let back = Instant::now();
    // Recovered: the established TCP connection moves again, the UDP flow
    // is answered again, and a new connection is served.
    let (seen, took) = recover(fault, back, || {
        if stream.progress() <= stalled_at {
            return None;
        }
        let again = udp_seen(&lab.client, udp_from, to, QUICK)?;
        assert_eq!(
            again, udp_tuple,
            "{fault}: the UDP flow keeps its translated tuple across the outage"
        );
        tcp_seen(&lab.client, None, to)
    });
    report(fault, took);
    assert_eq!(
        seen.ip(),
        IpAddr::V4(DEDICATED_PRIMARY),
        "{fault}: new flows leave from the pool's primary address again"
    );
    stream.advance(20, STREAM_WAIT).unwrap();
    finish(stream, fault);
    assert!(
        !agent.lines().iter().any(|l| l.contains(" ERROR ")),
        "{fault}: the agent logged no error:\n{}",
        agent.lines().join("\n")
    );
}

#[test]
fn faults_uplink_carrier_lost_and_back_recovers() {
    uplink_down_up(UplinkDown::Carrier, "uplink carrier lost and back");
}

#[test]
fn faults_uplink_admin_down_up_recovers() {
    uplink_down_up(UplinkDown::Admin, "uplink set down and up");
}

#[test]
fn faults_egress_address_removed_readded_fails_over_and_back() {
    require_root();
    let lab = Lab::new(0).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("faults-address");
    let config = dir.write("policies.json", &pair_policies(""));
    let pins = PinPath::new().unwrap();
    let agent = Agent::steering(&lab, &config, &["--pin-path", pins.arg()]).unwrap();
    // The stream leaves from the default egress: the fault is not its own.
    let public = sa(SERVER_PUBLIC, 443);
    let partner = sa(SERVER_PARTNER, 443);
    let stream = Stream::start(&lab.client, public, public).unwrap();
    stream.advance(20, STREAM_WAIT).unwrap();
    let first = probe::tcp(&lab.client, None, partner, probe::token("before")).unwrap();
    assert_eq!(first.src.ip(), IpAddr::V4(DEDICATED_PRIMARY));

    let primary = format!("{DEDICATED_PRIMARY}/32");
    lab.gw
        .ip(&["addr", "del", &primary, "dev", UPLINK])
        .unwrap();
    let removed = Instant::now();
    let (_, failover) = recover("primary address removed", removed, || {
        tcp_seen(&lab.client, None, partner).filter(|s| s.ip() == IpAddr::V4(DEDICATED_SECONDARY))
    });
    report(
        "egress address removed (new flows on the secondary)",
        failover,
    );
    agent
        .wait_for(
            &format!("egress address {DEDICATED_PRIMARY} is down"),
            Duration::from_secs(5),
        )
        .expect("the agent says the primary is down");
    // Every new flow now leaves from the secondary, none from the primary.
    for _ in 0..5 {
        let seen = probe::tcp(&lab.client, None, partner, probe::token("failed-over")).unwrap();
        assert_eq!(
            seen.src.ip(),
            IpAddr::V4(DEDICATED_SECONDARY),
            "while the primary is unassigned, the server sees the secondary"
        );
        assert!(seen.intact);
    }
    stream
        .advance(20, STREAM_WAIT)
        .expect("flows of other egress addresses are untouched");

    lab.gw
        .ip(&["addr", "add", &primary, "dev", UPLINK])
        .unwrap();
    let readded = Instant::now();
    let (_, back) = recover("primary address re-added", readded, || {
        tcp_seen(&lab.client, None, partner).filter(|s| s.ip() == IpAddr::V4(DEDICATED_PRIMARY))
    });
    report("egress address re-added (new flows on the primary)", back);
    agent
        .wait_for(
            &format!("egress address {DEDICATED_PRIMARY} is up again"),
            Duration::from_secs(5),
        )
        .expect("the agent says the primary is back");
    for _ in 0..5 {
        let seen = probe::tcp(&lab.client, None, partner, probe::token("back")).unwrap();
        assert_eq!(
            seen.src.ip(),
            IpAddr::V4(DEDICATED_PRIMARY),
            "once the primary is back, new flows leave from it again"
        );
    }
    stream.advance(20, STREAM_WAIT).unwrap();
    finish(stream, "egress address removed and re-added");
}

/// Short-lived UDP flows expire quickly, so a table filled by them frees
/// itself soon after the load stops.
const UDP_IDLE: &str = r#", "timeouts": { "udp": "2s" }"#;

#[test]
fn faults_connection_table_full_new_flows_dropped_counted_then_recovers() {
    const MAX_FLOWS: u32 = 64;
    require_root();
    let lab = Lab::new(0).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("faults-table-full");
    let config = dir.write("policies.json", &pair_policies(UDP_IDLE));
    let pins = PinPath::new().unwrap();
    let max_flows = MAX_FLOWS.to_string();
    let agent = Agent::steering(
        &lab,
        &config,
        &["--pin-path", pins.arg(), "--max-flows", &max_flows],
    )
    .unwrap();
    let public = sa(SERVER_PUBLIC, 443);
    let stream = Stream::start(&lab.client, public, public).unwrap();
    stream.advance(20, STREAM_WAIT).unwrap();

    // Fill the table with short UDP flows (each retried on its own tuple,
    // so a first datagram lost to address resolution adds no entry) until
    // one finds no room.
    let mut filled = 0u32;
    let mut last_answered = Instant::now();
    let refused_port = loop {
        let port = 50000 + filled as u16;
        let from = sa(Lab::client_addr(0), port);
        if !(0..3).any(|_| udp_seen(&lab.client, from, public, QUICK).is_some()) {
            break port;
        }
        last_answered = Instant::now();
        filled += 1;
        assert!(
            filled <= MAX_FLOWS,
            "the table of {MAX_FLOWS} flows must fill up ({filled} answered)"
        );
    };
    let full = stats(&agent);
    assert!(
        counter(&full, "drop_table_full") > 0,
        "a new flow finding the table full is counted as drop_table_full: {}",
        full["counters"]
    );
    let pinned: Value = serde_json::from_str(
        &cli(&["maps", "--pin-path", pins.arg(), "--json"]).expect("egress-agent maps"),
    )
    .unwrap();
    let ct4 = pinned
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == maps::CT4)
        .unwrap_or_else(|| panic!("maps lists {}: {pinned}", maps::CT4));
    assert_eq!(
        (ct4["entries"].as_u64(), ct4["capacity"].as_u64()),
        (Some(u64::from(MAX_FLOWS)), Some(u64::from(MAX_FLOWS))),
        "`egress-agent maps` shows the connection table full: {ct4}"
    );
    assert!(
        tcp_seen(&lab.client, None, sa(SERVER_PARTNER, 443)).is_none(),
        "a new TCP flow is refused while the table is full"
    );
    stream
        .advance(20, STREAM_WAIT)
        .expect("established flows keep working while the table is full");
    eprintln!(
        "connection table full after {filled} short flows beside the stream; drop_table_full={}",
        counter(&full, "drop_table_full")
    );

    // The load stops (it already has: the fillers are idle); the flows
    // expire and new ones get room again.
    let (seen, took) = recover("connection table full", last_answered, || {
        udp_seen(
            &lab.client,
            sa(Lab::client_addr(0), refused_port),
            public,
            QUICK,
        )
    });
    report(
        "connection table full (load stopped; idle UDP timeout 2 s)",
        took,
    );
    assert_eq!(seen.ip(), IpAddr::V4(GW_UPLINK));
    let seen = tcp_seen(&lab.client, None, sa(SERVER_PARTNER, 443))
        .expect("new TCP flows are served again");
    assert_eq!(seen.ip(), IpAddr::V4(DEDICATED_PRIMARY));
    stream.advance(20, STREAM_WAIT).unwrap();
    finish(stream, "connection table full");
}

#[test]
fn faults_port_range_exhausted_counted_then_recovers() {
    // Five client addresses fit: one keeps its port, four take the range's.
    const SPORT: u16 = 45002;
    const RANGE: std::ops::RangeInclusive<u16> = 40000..=40003;
    require_root();
    let lab = Lab::new(5).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("faults-ports");
    let config = dir.write(
        "policies.json",
        &pair_policies(&format!(
            r#", "nat": {{ "port_range": "{}-{}" }}{UDP_IDLE}"#,
            RANGE.start(),
            RANGE.end()
        )),
    );
    let pins = PinPath::new().unwrap();
    let agent = Agent::steering(&lab, &config, &["--pin-path", pins.arg()]).unwrap();
    let public = sa(SERVER_PUBLIC, 443);
    // The stream goes elsewhere: another destination, another port space.
    let partner = sa(SERVER_PARTNER, 443);
    let stream = Stream::start(&lab.client, partner, partner).unwrap();
    stream.advance(20, STREAM_WAIT).unwrap();
    // The internet side resolves the default egress address before the
    // flows below count (from a port outside the ones they use).
    probe::udp(
        &lab.client,
        Some(sa(Lab::client_addr(0), 45999)),
        public,
        probe::token("warm"),
    )
    .unwrap();

    let mut ports = Vec::new();
    let mut last_sent = Instant::now();
    for i in 0..5 {
        let from = sa(Lab::client_addr(i), SPORT);
        let seen = (0..3)
            .find_map(|_| udp_seen(&lab.client, from, public, QUICK))
            .unwrap_or_else(|| panic!("UDP from {from} gets a port"));
        last_sent = Instant::now();
        assert_eq!(seen.ip(), IpAddr::V4(GW_UPLINK));
        ports.push(seen.port());
    }
    ports.sort_unstable();
    let mut wanted: Vec<u16> = RANGE.collect();
    wanted.push(SPORT);
    assert_eq!(
        ports, wanted,
        "the first flow keeps its port, the others take the whole range"
    );
    let late = sa(Lab::client_addr(5), SPORT);
    assert!(
        udp_seen(&lab.client, late, public, Duration::from_secs(1)).is_none(),
        "a sixth flow finds no free port"
    );
    let exhausted = stats(&agent);
    assert!(
        counter(&exhausted, "drop_port_exhausted") > 0,
        "the refused flow is counted as drop_port_exhausted: {}",
        exhausted["counters"]
    );
    let uplink = exhausted["egress_addresses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["address"] == GW_UPLINK.to_string())
        .unwrap_or_else(|| panic!("stats lists {GW_UPLINK}: {exhausted}"));
    assert!(
        uplink["exhausted"].as_u64().is_some_and(|n| n > 0),
        "and as exhausted on its egress address: {uplink}"
    );
    stream
        .advance(20, STREAM_WAIT)
        .expect("flows towards other destinations are untouched");

    let (seen, took) = recover("port range exhausted", last_sent, || {
        udp_seen(&lab.client, late, public, QUICK)
    });
    report(
        "port range exhausted (load stopped; idle UDP timeout 2 s)",
        took,
    );
    assert_eq!(seen.ip(), IpAddr::V4(GW_UPLINK));
    assert!(
        RANGE.contains(&seen.port()) || seen.port() == SPORT,
        "the late flow gets a port of the range: {seen}"
    );
    stream.advance(20, STREAM_WAIT).unwrap();
    finish(stream, "port range exhausted");
}

/// A tmpfs of a few pages mounted on a fresh directory, unmounted (lazily,
/// so an open file cannot keep it) and removed on drop.
struct TinyFs {
    _dir: TempDir,
    mount: PathBuf,
}

impl TinyFs {
    fn new(label: &str, size: &str) -> Self {
        let dir = TempDir::new(label);
        let mount = dir.path().join("fs");
        std::fs::create_dir(&mount).unwrap();
        let path = mount.to_str().expect("temp paths are UTF-8");
        sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
                path,
            ],
        )
        .unwrap_or_else(|e| panic!("mounting a tmpfs on {path}: {e:#}"));
        Self { _dir: dir, mount }
    }

    fn path(&self) -> &Path {
        &self.mount
    }

    /// Fill the file system with `name` until a write fails for want of
    /// space.
    fn fill(&self, name: &str) {
        let mut file = std::fs::File::create(self.mount.join(name)).unwrap();
        let block = vec![0u8; 4096];
        loop {
            if let Err(err) = file.write_all(&block).and_then(|()| file.sync_all()) {
                assert_eq!(
                    err.raw_os_error(),
                    Some(libc::ENOSPC),
                    "filling the tmpfs stops at ENOSPC: {err}"
                );
                return;
            }
        }
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        if let Some(path) = self.mount.to_str()
            && let Err(err) = sh("umount", &["-l", path])
        {
            eprintln!("warning: unmounting {path}: {err:#}");
        }
    }
}

/// Every line of the flow log, parsed or not.
fn log_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Whether the flow log has a `new` line for the TCP flow from `src`.
fn logged_new(path: &Path, src: SocketAddr) -> bool {
    log_lines(path).iter().any(|line| {
        serde_json::from_str::<Value>(line).is_ok_and(|l| {
            l["event"] == "new"
                && l["original"]["src"] == src.ip().to_string()
                && l["original"]["sport"] == src.port()
        })
    })
}

#[test]
fn faults_flow_log_disk_full_traffic_flows_lost_counted_then_resumes() {
    require_root();
    let lab = Lab::new(0).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("faults-flowlog");
    let config = dir.write("policies.json", &pair_policies(""));
    let fs = TinyFs::new("faults-flowlog-fs", "64k");
    let flow_log = fs.path().join("flows.jsonl");
    let pins = PinPath::new().unwrap();
    let agent = Agent::steering(
        &lab,
        &config,
        &[
            "--pin-path",
            pins.arg(),
            "--flow-log",
            flow_log.to_str().unwrap(),
        ],
    )
    .unwrap();
    let partner = sa(SERVER_PARTNER, 443);
    let stream = Stream::start(&lab.client, partner, partner).unwrap();
    stream.advance(20, STREAM_WAIT).unwrap();
    let mut port = 41000u16;
    let mut next_from = || {
        port += 1;
        sa(Lab::client_addr(0), port)
    };
    let from = next_from();
    probe::tcp(&lab.client, Some(from), partner, probe::token("logged")).unwrap();
    let (_, _) = recover("the first flow-log line", Instant::now(), || {
        logged_new(&flow_log, from).then_some(())
    });

    // The file system fills up: flows keep being translated, their lines
    // are lost and counted.
    fs.fill("filler");
    let lost_before = stats(&agent)["flow_log"]["lost"].as_u64().unwrap();
    let mut unlogged = Vec::new();
    for _ in 0..20 {
        let from = next_from();
        let seen = probe::tcp(&lab.client, Some(from), partner, probe::token("full"))
            .expect("flows are translated while the flow log cannot be written");
        assert_eq!(seen.src.ip(), IpAddr::V4(DEDICATED_PRIMARY));
        assert!(seen.intact);
        unlogged.push(from);
    }
    let (lost, _) = recover("lost lines counted", Instant::now(), || {
        let lost = stats(&agent)["flow_log"]["lost"].as_u64().unwrap();
        (lost > lost_before).then_some(lost)
    });
    agent
        .wait_for("lines are lost (and counted)", Duration::from_secs(5))
        .expect("the agent warns once that flow-log lines are lost");
    stream
        .advance(20, STREAM_WAIT)
        .expect("traffic flows while the flow log is unwritable");
    let missing = unlogged
        .iter()
        .filter(|from| !logged_new(&flow_log, **from))
        .count();
    assert!(
        missing > 0,
        "with the file system full, flows go unlogged (all {} were logged)",
        unlogged.len()
    );

    // Space is freed: lines resume without a restart.
    std::fs::remove_file(fs.path().join("filler")).unwrap();
    let freed = Instant::now();
    let (from, took) = recover("flow log writable again", freed, || {
        let from = next_from();
        tcp_seen(&lab.client, Some(from), partner)?;
        // The line is written within moments of the flow.
        let logged = Instant::now() + Duration::from_millis(300);
        while Instant::now() < logged {
            if logged_new(&flow_log, from) {
                return Some(from);
            }
            std::thread::sleep(POLL);
        }
        None
    });
    report("flow log file system full (space freed)", took);
    agent
        .wait_for("is writable again", Duration::from_secs(5))
        .expect("the agent says the flow log works again and how many lines were lost");
    let after = stats(&agent);
    assert!(
        after["flow_log"]["lost"].as_u64().unwrap() >= lost,
        "the lost-line counter never goes back"
    );
    // Lines written after the outage are whole JSON lines, each on its own.
    let lines = log_lines(&flow_log);
    let resumed = lines
        .iter()
        .position(|l| l.contains(&format!("\"sport\":{}", from.port())))
        .expect("the resumed flow's line is in the file");
    for line in &lines[resumed..] {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "every line after the outage is whole JSON: {line:?}"
        );
    }
    // A line cut short when the disk filled is lost, but no later line
    // may be glued to it.
    let broken: Vec<&String> = lines
        .iter()
        .filter(|l| serde_json::from_str::<Value>(l).is_err())
        .collect();
    for line in &broken {
        assert_eq!(
            line.matches("{\"time\":").count(),
            1,
            "a line torn by the full disk stands alone, nothing appended to it: {line}"
        );
    }
    let broken = broken.len();
    eprintln!(
        "flow log: {} lines lost while full ({missing} of {} flows unlogged), {broken} torn lines in the file",
        after["flow_log"]["lost"],
        unlogged.len()
    );
    stream.advance(20, STREAM_WAIT).unwrap();
    finish(stream, "flow log disk full");
}

/// A fourth server address, added to the internet namespace.
const SERVER_EXTRA: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 30);
/// Bypassed prefixes that differ between the sets: they tell in the pinned
/// tries which set each generation holds, and how far a reload got.
const FILLER: u32 = 3000;

/// The two policy sets the agent is killed between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Set {
    A,
    B,
}

impl Set {
    fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }

    /// The egress each probed destination leaves from under this set:
    /// every destination changes between A and B.
    fn expected(self) -> BTreeMap<Ipv4Addr, Ipv4Addr> {
        let [partner, public, internal, extra] = match self {
            Self::A => [
                DEDICATED_PRIMARY,
                DEDICATED_SECONDARY,
                GW_UPLINK,
                DEDICATED_SECONDARY,
            ],
            Self::B => [
                DEDICATED_SECONDARY,
                GW_UPLINK,
                DEDICATED_PRIMARY,
                DEDICATED_PRIMARY,
            ],
        };
        [
            (SERVER_PARTNER, partner),
            (SERVER_PUBLIC, public),
            (SERVER_INTERNAL, internal),
            (SERVER_EXTRA, extra),
        ]
        .into()
    }

    /// Second octet of this set's filler prefixes (198.18.0.0/15 halves).
    fn filler_octet(self) -> u8 {
        match self {
            Self::A => 18,
            Self::B => 19,
        }
    }

    fn policies(self) -> String {
        let name = format!("{self:?}");
        let pool = |addr: Ipv4Addr| {
            if addr == DEDICATED_PRIMARY {
                "ten"
            } else if addr == DEDICATED_SECONDARY {
                "eleven"
            } else {
                "default"
            }
        };
        let mut policies: Vec<String> = self
            .expected()
            .into_iter()
            .map(|(dst, egress)| {
                format!(
                    r#"{{ "name": "{name} to {dst}", "selector": {{ "dst": ["{dst}/32"] }}, "action": {{ "egress": "{}" }} }}"#,
                    pool(egress)
                )
            })
            .collect();
        let filler: Vec<String> = (0..FILLER)
            .map(|i| {
                format!(
                    r#""198.{}.{}.{}/32""#,
                    self.filler_octet(),
                    i / 256,
                    i % 256
                )
            })
            .collect();
        policies.push(format!(
            r#"{{ "name": "{name} filler", "selector": {{ "dst": [{}] }}, "action": {{ "egress": "bypass" }} }}"#,
            filler.join(", ")
        ));
        let policies: Vec<&str> = policies.iter().map(String::as_str).collect();
        policy_set(
            r#""ten": { "ipv4": ["203.0.113.10"] }, "eleven": { "ipv4": ["203.0.113.11"] }"#,
            &policies,
            "",
        )
    }
}

/// What the pinned tables hold: the generation the programs read, and per
/// generation how many filler prefixes of A and of B its trie holds.
#[derive(Debug)]
struct PinnedTables {
    live: u8,
    fillers: [(usize, usize); 2],
}

impl PinnedTables {
    fn read(pins: &PinPath) -> Self {
        let dir = pins.path().join("maps");
        let generation = MapData::from_pin(dir.join(maps::GEN)).unwrap();
        let generation: Array<MapData, u32> = Array::try_from(Map::Array(generation)).unwrap();
        let live = (generation.get(&GEN_SLOT_POLICY, 0).unwrap() & 1) as u8;
        let dst4 = MapData::from_pin(dir.join(maps::DST4)).unwrap();
        let dst4: LpmTrie<MapData, GenPrefix4, u32> =
            LpmTrie::try_from(Map::LpmTrie(dst4)).unwrap();
        let mut fillers = [(0, 0); 2];
        for key in dst4.keys() {
            let key = key.unwrap();
            let data = key.data();
            let full = key.prefix_len() == GEN_PREFIX_BITS + 32;
            let Some(count) = fillers.get_mut(usize::from(data.generation)) else {
                continue;
            };
            match (full, data.addr[0], data.addr[1]) {
                (true, 198, 18) => count.0 += 1,
                (true, 198, 19) => count.1 += 1,
                _ => {}
            }
        }
        Self { live, fillers }
    }

    /// The set generation `generation` holds: all of one set's fillers
    /// and none of the other's (`None`: part of a set, or a mix).
    fn set_in(&self, generation: u8) -> Option<Set> {
        let whole = FILLER as usize;
        match self.fillers[usize::from(generation)] {
            (n, 0) if n == whole => Some(Set::A),
            (0, n) if n == whole => Some(Set::B),
            _ => None,
        }
    }

    /// The set the programs read.
    fn live_set(&self) -> Option<Set> {
        self.set_in(self.live)
    }

    /// The set the generation the programs do not read holds.
    fn other_set(&self) -> Option<Set> {
        self.set_in(1 - self.live)
    }
}

/// The egress address every destination's new flow leaves from now.
fn egress_now(lab: &Lab) -> BTreeMap<Ipv4Addr, Ipv4Addr> {
    Set::A
        .expected()
        .into_keys()
        .map(|dst| {
            let seen = probe::tcp(&lab.client, None, sa(dst, 443), probe::token("which"))
                .unwrap_or_else(|e| panic!("a new flow to {dst} is served: {e:#}"));
            assert!(seen.intact, "the echo from {dst} came back intact");
            let IpAddr::V4(src) = seen.src.ip() else {
                panic!("an IPv4 source for {dst}: {}", seen.src)
            };
            (dst, src)
        })
        .collect()
}

/// Which set `seen` follows for every destination, or a panic naming the
/// mix.
fn follows(seen: &BTreeMap<Ipv4Addr, Ipv4Addr>, context: &str) -> Set {
    [Set::A, Set::B]
        .into_iter()
        .find(|set| set.expected() == *seen)
        .unwrap_or_else(|| {
            panic!(
                "{context}: new flows must follow exactly set A or exactly set B, never a mix: saw {seen:?}, A is {:?}, B is {:?}",
                Set::A.expected(),
                Set::B.expected()
            )
        })
}

#[test]
fn faults_agent_killed_mid_reload_dataplane_on_one_set_then_recovers() {
    const KILLS: usize = 20;
    const SEED: u64 = 0x00fa_017e_d5ee_d5ee;
    require_root();
    let lab = Lab::new(0).unwrap();
    lab.inet
        .ip(&["addr", "add", &format!("{SERVER_EXTRA}/32"), "dev", "lo"])
        .unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("faults-kill");
    let config = dir.write("policies.json", &Set::A.policies());
    let pins = PinPath::new().unwrap();
    let args = ["--pin-path", pins.arg(), "--no-watch"];

    // How long one reload takes (SIGHUP to its log line): the kill delays
    // below are spread over it. Each agent below is fresh, so its reload is
    // its first write into that generation, as this one's is.
    let mut agent = Agent::steering(&lab, &config, &args).unwrap();
    let stream_to = sa(SERVER_PUBLIC, 443);
    let stream = Stream::start(&lab.client, stream_to, stream_to).unwrap();
    stream.advance(20, STREAM_WAIT).unwrap();
    assert_eq!(follows(&egress_now(&lab), "after the start"), Set::A);
    dir.write("policies.json", &Set::B.policies());
    let started = Instant::now();
    let line = agent.reload(1).unwrap();
    let reload_took = started.elapsed();
    eprintln!("one reload between A and B ({line}): {reload_took:.1?}, SIGHUP to log line");
    assert_eq!(follows(&egress_now(&lab), "after a reload"), Set::B);
    // Killed, as all the others: a plain stop would take the dataplane
    // (and the stream's translation) with it.
    agent.signal(Signal::SIGKILL).unwrap();
    assert!(!agent.stop().unwrap().success());

    let mut rng = Rng::new(SEED);
    let mut current = Set::B;
    // Kill moments spread over the whole reload and as long again, so
    // that kills land before it writes, while it writes and after the
    // switch.
    let window = reload_took.as_millis() as u64 * 2 + 1;
    // Kills that left the old set in force before the reload had written
    // the other generation's prefixes, while it was writing them (the
    // other generation holds part of the new set or all of it), and kills
    // after the switch.
    let (mut before, mut during, mut after) = (0, 0, 0);
    let dead_api = TempDir::new("faults-kill-api");
    let dead_api = dead_api.path().join("none.sock");
    let dead_api = dead_api.to_str().unwrap();
    for kill in 1..=KILLS {
        dir.write("policies.json", &current.policies());
        let mut agent = Agent::steering(&lab, &config, &args).unwrap();
        let target = current.other();
        dir.write("policies.json", &target.policies());
        let delay = Duration::from_millis(rng.below(window as usize) as u64);
        agent.signal(Signal::SIGHUP).unwrap();
        std::thread::sleep(delay);
        agent.signal(Signal::SIGKILL).unwrap();
        let status = agent.stop().unwrap();
        assert!(!status.success(), "kill {kill}: the agent was killed");
        let finished = agent.lines().iter().any(|l| l.contains("reloaded "));

        // No agent runs: the pinned state and the traffic tell which set
        // the dataplane follows.
        let context = format!("kill {kill} ({delay:?} after SIGHUP, {current:?} -> {target:?})");
        let tables = PinnedTables::read(&pins);
        let live = tables.live_set().unwrap_or_else(|| {
            panic!("{context}: the live generation holds exactly one set's prefixes: {tables:?}")
        });
        let seen = follows(&egress_now(&lab), &context);
        assert_eq!(
            seen, live,
            "{context}: new flows follow the set the live generation holds"
        );
        assert!(
            seen == current || seen == target,
            "{context}: the dataplane is on the old or the new set"
        );
        if finished {
            assert_eq!(
                seen, target,
                "{context}: a reload the agent logged as done is in force"
            );
        }
        if seen == target {
            after += 1;
        } else if tables.other_set() == Some(current) {
            before += 1;
        } else {
            during += 1;
        }
        // The inspection commands read the pins without an agent.
        let policies = cli(&[
            "policies",
            "--pin-path",
            pins.arg(),
            "--api",
            dead_api,
            "--json",
        ])
        .unwrap_or_else(|e| panic!("{context}: `policies` reads the pins: {e}"));
        let live_name = format!("{seen:?} filler");
        assert!(
            policies.contains(&live_name),
            "{context}: `policies` lists the live set's policies ({live_name}): {policies}"
        );
        cli(&["flows", "--pin-path", pins.arg(), "--api", dead_api])
            .unwrap_or_else(|e| panic!("{context}: `flows` reads the pins: {e}"));
        stream
            .advance(5, STREAM_WAIT)
            .unwrap_or_else(|e| panic!("{context}: traffic flows with no agent running: {e:#}"));
        current = seen;
    }
    eprintln!(
        "{KILLS} kills 0-{window} ms after SIGHUP: {before} before the reload wrote the prefixes, {during} while it wrote them (old set in force), {after} after the switch (new set in force); never a mix"
    );

    // A new agent on the same pins takes over and applies the file.
    let file_set = current.other();
    dir.write("policies.json", &file_set.policies());
    let restarted = Instant::now();
    let agent = Agent::start_gateway(&agent::binary(), &lab, &config, &args).unwrap();
    let (_, took) = recover("agent restarted after the kills", restarted, || {
        let ready = agent.lines().iter().any(|l| l.contains(agent::READY));
        (ready && follows(&egress_now(&lab), "after the restart") == file_set).then_some(())
    });
    report(
        "agent killed mid-reload (restart on its pins until new flows follow the file)",
        took,
    );
    assert_eq!(PinnedTables::read(&pins).live_set(), Some(file_set));
    stream.advance(20, STREAM_WAIT).unwrap();
    finish(stream, "agent killed mid-reload");
    drop(agent);
}
