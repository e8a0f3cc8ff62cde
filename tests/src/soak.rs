//! The soak driver's traffic and its oracle: workers in the lab's client
//! namespace open short and long TCP connections, UDP exchanges and pings,
//! both families, from many client addresses to several servers; every
//! echoed byte is compared with what was sent, and every flow's source as
//! the server saw it is checked against the egress the policy model gives
//! for the policy files and sessions in force while the flow started.
//!
//! The model ([`expected`]) is written independently of the agent's
//! compiler and evaluator, from the policy files [`policy_file`] writes.

use std::{
    collections::HashMap,
    fmt::{self, Write as _},
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    mem::MaybeUninit,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use etherparse::{IcmpEchoHeader, Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type};
use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};

use crate::rng::Rng;
use crate::{
    lab::{
        DEDICATED_PRIMARY, GW_UPLINK, GW_UPLINK6, Lab, SERVER_INTERNAL, SERVER_PARTNER,
        SERVER_PUBLIC, SERVER6_A, SERVER6_B,
    },
    netns::NetNs,
    probe::{icmp_socket, pattern},
};

/// Pool `east`'s addresses: failover, so new flows take the first.
pub const EAST: [Ipv4Addr; 2] = [DEDICATED_PRIMARY, Ipv4Addr::new(203, 0, 113, 11)];
/// Pool `west`'s address.
pub const WEST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 12);
/// Pool `fin`'s address (finance sessions).
pub const FIN: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 13);
/// Egress addresses beyond the lab's own: the driver assigns them to the
/// gateway's uplink so the agent's address check finds them usable.
pub const EXTRA_EGRESS: [Ipv4Addr; 2] = [WEST, FIN];

/// An IPv6 prefix (the pools' ranges, all inside the lab's routed pool /64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix6 {
    pub addr: Ipv6Addr,
    pub len: u8,
}

impl Prefix6 {
    pub fn contains(self, a: Ipv6Addr) -> bool {
        let mask = u128::MAX
            .checked_shl(128 - u32::from(self.len))
            .unwrap_or(0);
        u128::from(a) & mask == u128::from(self.addr) & mask
    }
}

impl fmt::Display for Prefix6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

pub const EAST6: Prefix6 = Prefix6 {
    addr: Ipv6Addr::new(0x2001, 0xdb8, 0xe0, 0, 0, 0, 0, 0),
    len: 80,
};
pub const WEST6: Prefix6 = Prefix6 {
    addr: Ipv6Addr::new(0x2001, 0xdb8, 0xe0, 0, 1, 0, 0, 0),
    len: 80,
};
pub const FIN6: Prefix6 = Prefix6 {
    addr: Ipv6Addr::new(0x2001, 0xdb8, 0xe0, 0, 2, 0, 0, 0),
    len: 80,
};

/// The group a session needs for the `finance` policy.
pub const FINANCE: &str = "finance";

/// Which of the two policy files is in force. They differ in where two
/// classes of flows go: B swaps the pools of `partner` and `public udp`, so
/// every reload changes the translation of new flows of both classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    A,
    B,
}

impl Variant {
    pub fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }
}

/// Idle timeouts both policy files set: short, so flows expire during the
/// soak and the final drain is quick.
pub const TIMEOUTS_JSON: &str = r#"{ "tcp_established": "30s", "tcp_transitory": "10s", "tcp_closed": "5s", "udp": "10s", "icmp": "5s" }"#;

/// The policy file of `variant`:
/// 1. `internal bypass`: 10.99.0.0/16 is left untranslated;
/// 2. `finance`: sessions in group finance leave from pool `fin`;
/// 3. `partner`: 192.0.2.0/24 and 2001:db8:2::/48 (any protocol) leave from
///    `east` (A) or `west` (B);
/// 4. `public udp`: UDP to 198.51.100.0/24 and 2001:db8:3::/48 leaves from
///    `west` (A) or `east` (B);
/// 5. `catch-all`: the default egress.
pub fn policy_file(variant: Variant) -> String {
    let (partner, public_udp) = match variant {
        Variant::A => ("east", "west"),
        Variant::B => ("west", "east"),
    };
    format!(
        r#"{{
  "egress_pools": {{
    "east": {{ "ipv4": ["{e0}", "{e1}"], "ipv6": "{EAST6}" }},
    "west": {{ "ipv4": ["{WEST}"], "ipv6": "{WEST6}" }},
    "fin": {{ "ipv4": ["{FIN}"], "ipv6": "{FIN6}" }}
  }},
  "default_egress": {{ "ipv4": "{GW_UPLINK}", "ipv6": "{GW_UPLINK6}" }},
  "policies": [
    {{ "name": "internal bypass", "selector": {{ "dst": ["10.99.0.0/16"] }}, "action": {{ "egress": "bypass" }} }},
    {{ "name": "finance", "selector": {{ "groups": ["{FINANCE}"] }}, "action": {{ "egress": "fin" }} }},
    {{ "name": "partner", "selector": {{ "dst": ["192.0.2.0/24", "2001:db8:2::/48"] }}, "action": {{ "egress": "{partner}" }} }},
    {{ "name": "public udp", "selector": {{ "dst": ["198.51.100.0/24", "2001:db8:3::/48"], "protocols": ["udp"] }}, "action": {{ "egress": "{public_udp}" }} }},
    {{ "name": "catch-all", "selector": {{}}, "action": {{ "egress": "default" }} }}
  ],
  "timeouts": {TIMEOUTS_JSON}
}}"#,
        e0 = EAST[0],
        e1 = EAST[1],
    )
}

/// What the gateway was told: the policy file and which client addresses
/// (by index, [`Lab::client_addr`]) have a finance session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct State {
    pub variant: Variant,
    /// Bit `i`: client `i` (both its addresses) has a session.
    pub sessions: u64,
}

impl State {
    pub fn has_session(self, client: u8) -> bool {
        client < 64 && self.sessions & (1 << client) != 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

/// The source a server may see for a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Addr(IpAddr),
    /// Any address of the range (pools hash users over their IPv6 range).
    Range(Prefix6),
    /// The flow has no egress of its family: it must not get through.
    Nothing,
}

impl Expect {
    pub fn admits(self, seen: IpAddr) -> bool {
        match (self, seen) {
            (Self::Addr(a), seen) => a == seen,
            (Self::Range(p), IpAddr::V6(a)) => p.contains(a),
            _ => false,
        }
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(a) => write!(f, "{a}"),
            Self::Range(p) => write!(f, "an address of {p}"),
            Self::Nothing => f.write_str("nothing"),
        }
    }
}

/// Which client (index) an address of the client namespace is.
pub fn client_index(src: IpAddr) -> Option<u8> {
    let last = match src {
        IpAddr::V4(a) if a.octets()[..3] == [10, 10, 0] => u16::from(a.octets()[3]),
        IpAddr::V6(a) if a.segments()[..7] == Lab::client_addr6(0).segments()[..7] => {
            a.segments()[7]
        }
        _ => return None,
    };
    last.checked_sub(2).and_then(|i| u8::try_from(i).ok())
}

fn pool(name: &str, v6: bool) -> Expect {
    match (name, v6) {
        ("east", false) => Expect::Addr(EAST[0].into()),
        ("east", true) => Expect::Range(EAST6),
        ("west", false) => Expect::Addr(WEST.into()),
        ("west", true) => Expect::Range(WEST6),
        ("fin", false) => Expect::Addr(FIN.into()),
        ("fin", true) => Expect::Range(FIN6),
        _ => Expect::Nothing,
    }
}

/// The source the server must see for a flow from `src` to `dst` under
/// `state` (the model of [`policy_file`]).
pub fn expected(state: State, src: IpAddr, dst: IpAddr, proto: Proto) -> Expect {
    let v6 = dst.is_ipv6();
    let in_net = |net: [u8; 3]| matches!(dst, IpAddr::V4(a) if a.octets()[..3] == net);
    let in_net6 =
        |third: u16| matches!(dst, IpAddr::V6(a) if a.segments()[..3] == [0x2001, 0x0db8, third]);
    let swap = |a: &'static str, b: &'static str| match state.variant {
        Variant::A => a,
        Variant::B => b,
    };
    if matches!(dst, IpAddr::V4(a) if a.octets()[..2] == [10, 99]) {
        return Expect::Addr(src);
    }
    if client_index(src).is_some_and(|i| state.has_session(i)) {
        return pool("fin", v6);
    }
    if in_net([192, 0, 2]) || in_net6(2) {
        return pool(swap("east", "west"), v6);
    }
    if proto == Proto::Udp && (in_net([198, 51, 100]) || in_net6(3)) {
        return pool(swap("west", "east"), v6);
    }
    Expect::Addr(if v6 {
        GW_UPLINK6.into()
    } else {
        GW_UPLINK.into()
    })
}

/// Every state the gateway has been told of, in order, and how far it is
/// known to have applied them. One driver thread makes the changes, one at
/// a time, so the dataplane is always at the applied state or the next.
pub struct Timeline {
    inner: Mutex<(Vec<State>, usize)>,
}

impl Timeline {
    pub fn new(initial: State) -> Self {
        Self {
            inner: Mutex::new((vec![initial], 0)),
        }
    }

    /// The newest state (applied or about to be).
    pub fn latest(&self) -> State {
        *self.inner.lock().unwrap().0.last().expect("never empty")
    }

    /// A change is about to be sent: from now on new flows may see it.
    /// Returns its index for [`Timeline::applied`].
    pub fn announce(&self, state: State) -> usize {
        let mut inner = self.inner.lock().unwrap();
        assert_eq!(
            inner.1 + 1,
            inner.0.len(),
            "one change at a time: the previous one must be applied first"
        );
        inner.0.push(state);
        inner.0.len() - 1
    }

    /// The agent has confirmed change `index`: every new flow sees it.
    pub fn applied(&self, index: usize) {
        self.inner.lock().unwrap().1 = index;
    }

    /// Index of the state every flow starting now sees at least.
    fn start(&self) -> usize {
        self.inner.lock().unwrap().1
    }

    /// The states a flow started at `start` (a [`Timeline::start`]) and
    /// classified by now may have been given.
    fn since(&self, start: usize) -> Vec<State> {
        self.inner.lock().unwrap().0[start..].to_vec()
    }
}

/// The kinds of flows, as reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    TcpShort,
    TcpLong,
    Udp,
    Icmp,
}

const KINDS: [Kind; 4] = [Kind::TcpShort, Kind::TcpLong, Kind::Udp, Kind::Icmp];

impl Kind {
    fn label(self, v6: bool) -> &'static str {
        match (self, v6) {
            (Self::TcpShort, false) => "tcp4 short",
            (Self::TcpShort, true) => "tcp6 short",
            (Self::TcpLong, false) => "tcp4 long",
            (Self::TcpLong, true) => "tcp6 long",
            (Self::Udp, false) => "udp4",
            (Self::Udp, true) => "udp6",
            (Self::Icmp, false) => "icmp4",
            (Self::Icmp, true) => "icmp6",
        }
    }

    fn proto(self) -> Proto {
        match self {
            Self::TcpShort | Self::TcpLong => Proto::Tcp,
            Self::Udp => Proto::Udp,
            Self::Icmp => Proto::Icmp,
        }
    }

    fn slot(self, v6: bool) -> usize {
        self as usize * 2 + usize::from(v6)
    }
}

#[derive(Default)]
struct Counters {
    flows: AtomicU64,
    failed: AtomicU64,
    verified: AtomicU64,
    corrupted: AtomicU64,
    /// Sources checked against one state (no change in flight).
    exact: AtomicU64,
    /// Sources checked against the states of a change in flight.
    window: AtomicU64,
    wrong_source: AtomicU64,
}

/// One kind's totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindReport {
    /// Flows completed, every byte echoed.
    pub flows: u64,
    /// Flows that failed (connection error, timeout, bytes missing).
    pub failed: u64,
    /// Bytes echoed back identical to what was sent.
    pub verified: u64,
    /// Bytes echoed back different from what was sent.
    pub corrupted: u64,
    pub exact_checks: u64,
    pub window_checks: u64,
    /// Flows whose server saw a source their policy does not give.
    pub wrong_source: u64,
}

impl std::ops::AddAssign for KindReport {
    fn add_assign(&mut self, o: Self) {
        self.flows += o.flows;
        self.failed += o.failed;
        self.verified += o.verified;
        self.corrupted += o.corrupted;
        self.exact_checks += o.exact_checks;
        self.window_checks += o.window_checks;
        self.wrong_source += o.wrong_source;
    }
}

/// What the traffic did, by kind.
#[derive(Clone, Debug)]
pub struct TrafficReport {
    /// (label, totals) per kind and family.
    pub kinds: Vec<(&'static str, KindReport)>,
    pub total: KindReport,
    /// The first problems, each naming its flow.
    pub problems: Vec<String>,
}

impl fmt::Display for TrafficReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  {:<11} {:>8} {:>7} {:>15} {:>10} {:>12} {:>12} {:>10}",
            "kind",
            "flows",
            "failed",
            "bytes verified",
            "corrupted",
            "exact src",
            "window src",
            "wrong src"
        )?;
        let row = |f: &mut fmt::Formatter<'_>, label: &str, r: &KindReport| {
            writeln!(
                f,
                "  {label:<11} {:>8} {:>7} {:>15} {:>10} {:>12} {:>12} {:>10}",
                r.flows,
                r.failed,
                r.verified,
                r.corrupted,
                r.exact_checks,
                r.window_checks,
                r.wrong_source
            )
        };
        for (label, r) in &self.kinds {
            row(f, label, r)?;
        }
        row(f, "total", &self.total)
    }
}

/// Echo requests the servers' namespace received, by the token that opens
/// their payload: (source, identifier). Entries are taken by the pinger
/// that sent them.
struct IcmpRecorder {
    seen: Mutex<HashMap<Vec<u8>, (IpAddr, u16)>>,
}

/// Every soak ping payload opens with this and a 12-byte counter.
const PING_TAG: &[u8; 4] = b"soak";
const TOKEN_LEN: usize = 16;

/// Receive a datagram and its sender from a raw socket.
fn recv_from_raw(socket: &Socket, buf: &mut [u8]) -> std::io::Result<(usize, Option<IpAddr>)> {
    // SAFETY: u8 and MaybeUninit<u8> have the same layout, and recv_from
    // only writes into the buffer, never de-initialises it.
    let uninit = unsafe { &mut *(std::ptr::from_mut(buf) as *mut [MaybeUninit<u8>]) };
    let (n, from) = socket.recv_from(uninit)?;
    Ok((n, from.as_socket().map(|a| a.ip())))
}

/// An ICMP echo message in raw-socket data (IPv4 sockets deliver the IP
/// header first, IPv6 ones the ICMPv6 message only): (request?, id, payload).
fn echo_of(buf: &[u8], v6: bool) -> Option<(bool, u16, &[u8])> {
    if v6 {
        let (icmp, payload) = Icmpv6Header::from_slice(buf).ok()?;
        match icmp.icmp_type {
            Icmpv6Type::EchoRequest(e) => Some((true, e.id, payload)),
            Icmpv6Type::EchoReply(e) => Some((false, e.id, payload)),
            _ => None,
        }
    } else {
        let ihl = usize::from(*buf.first()? & 0x0f) * 4;
        let (icmp, payload) = Icmpv4Header::from_slice(buf.get(ihl..)?).ok()?;
        match icmp.icmp_type {
            Icmpv4Type::EchoRequest(e) => Some((true, e.id, payload)),
            Icmpv4Type::EchoReply(e) => Some((false, e.id, payload)),
            _ => None,
        }
    }
}

/// The source of an IPv4 packet in raw-socket data.
fn ipv4_source(buf: &[u8]) -> Option<IpAddr> {
    let src: [u8; 4] = buf.get(12..16)?.try_into().ok()?;
    Some(IpAddr::V4(Ipv4Addr::from(src)))
}

impl IcmpRecorder {
    fn record(&self, socket: &Socket, v6: bool, stop: &AtomicBool) {
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, from)) = recv_from_raw(socket, &mut buf) else {
                continue;
            };
            let data = &buf[..n];
            let src = if v6 { from } else { ipv4_source(data) };
            if let (Some(src), Some((true, id, payload))) = (src, echo_of(data, v6))
                && payload.starts_with(PING_TAG)
                && payload.len() >= TOKEN_LEN
            {
                self.seen
                    .lock()
                    .unwrap()
                    .entry(payload[..TOKEN_LEN].to_vec())
                    .or_insert((src, id));
            }
        }
    }

    /// Wait (a second at most) for the request carrying `token`.
    fn take(&self, token: &[u8]) -> Option<(IpAddr, u16)> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            if let Some(seen) = self.seen.lock().unwrap().remove(token) {
                return Some(seen);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// How many workers of each kind and how hard they push.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// Short TCP connection workers per family.
    pub tcp_short: usize,
    /// Long TCP connections open at any time, per family.
    pub tcp_long: usize,
    /// How long a long connection lives before it closes and reopens.
    pub long_life: Duration,
    pub udp: usize,
    pub icmp: usize,
    /// Pause after each short flow (per worker).
    pub gap: Duration,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            tcp_short: 2,
            tcp_long: 2,
            long_life: Duration::from_secs(20),
            udp: 1,
            icmp: 1,
            gap: Duration::from_millis(10),
        }
    }
}

struct Shared {
    stop: AtomicBool,
    timeline: Arc<Timeline>,
    clients: u8,
    counters: Vec<Counters>,
    problems: Mutex<Vec<String>>,
    recorder: IcmpRecorder,
    load: Load,
}

/// At most this many problems are kept word for word.
const KEEP_PROBLEMS: usize = 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const TCP_PORTS: [u16; 2] = [443, 8000];
/// Short TCP payloads, cycled through: one segment to a few hundred.
const TCP_SIZES: [usize; 6] = [64, 1400, 4000, 16_384, 65_536, 200_000];
const LONG_CHUNK: usize = 16 * 1024;

impl Shared {
    fn counters(&self, kind: Kind, v6: bool) -> &Counters {
        &self.counters[kind.slot(v6)]
    }

    fn problem(&self, what: String) {
        let mut problems = self.problems.lock().unwrap();
        if problems.len() < KEEP_PROBLEMS {
            problems.push(what);
        }
    }

    fn failed(&self, kind: Kind, v6: bool, flow: &str, err: &anyhow::Error) {
        self.counters(kind, v6)
            .failed
            .fetch_add(1, Ordering::Relaxed);
        self.problem(format!("{} {flow} failed: {err:#}", kind.label(v6)));
    }

    fn bytes(&self, kind: Kind, v6: bool, flow: &str, verified: u64, corrupted: u64) {
        let c = self.counters(kind, v6);
        c.verified.fetch_add(verified, Ordering::Relaxed);
        if corrupted > 0 {
            c.corrupted.fetch_add(corrupted, Ordering::Relaxed);
            self.problem(format!(
                "{} {flow}: {corrupted} bytes came back altered",
                kind.label(v6)
            ));
        }
    }

    /// Check the source the server saw for a flow started at timeline
    /// index `start` (and classified by now).
    fn check_source(
        &self,
        kind: Kind,
        flow: (IpAddr, SocketAddr),
        start: usize,
        seen: IpAddr,
    ) -> bool {
        let (src, dst) = flow;
        let v6 = dst.is_ipv6();
        let states = self.timeline.since(start);
        let c = self.counters(kind, v6);
        let counter = if states.len() == 1 {
            &c.exact
        } else {
            &c.window
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let expect: Vec<Expect> = states
            .iter()
            .map(|s| expected(*s, src, dst.ip(), kind.proto()))
            .collect();
        if expect.iter().any(|e| e.admits(seen)) {
            return true;
        }
        c.wrong_source.fetch_add(1, Ordering::Relaxed);
        let mut expect: Vec<String> = expect.iter().map(ToString::to_string).collect();
        expect.dedup();
        self.problem(format!(
            "{} {src} -> {dst}: the server saw {seen}, the policy gives {}",
            kind.label(v6),
            expect.join(" or ")
        ));
        false
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleep `d`, waking early when asked to stop.
    fn pause(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stopped() && Instant::now() < end {
            std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
        }
    }

    fn client(&self, n: u64, v6: bool) -> IpAddr {
        let i = (n % u64::from(self.clients)) as u8;
        if v6 {
            Lab::client_addr6(i).into()
        } else {
            Lab::client_addr(i).into()
        }
    }
}

/// Byte-for-byte comparison: (equal, different) over the common length.
fn compare(sent: &[u8], got: &[u8]) -> (u64, u64) {
    let same = sent.iter().zip(got).filter(|(a, b)| a == b).count() as u64;
    let common = sent.len().min(got.len()) as u64;
    (
        same,
        common - same + got.len().saturating_sub(sent.len()) as u64,
    )
}

/// Connect from `src` (the kernel picks the port: never one whose earlier
/// connection to the same server is still in TIME_WAIT, so no flow reuses
/// a live entry of the gateway's tables) and read the server's report.
fn connect(src: IpAddr, dst: SocketAddr) -> anyhow::Result<(BufReader<TcpStream>, IpAddr)> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    socket
        .bind(&SocketAddr::new(src, 0).into())
        .with_context(|| format!("binding {src}"))?;
    socket
        .connect_timeout(&dst.into(), CONNECT_TIMEOUT)
        .with_context(|| format!("connecting to {dst}"))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .context("reading the server report")?;
    Ok((reader, seen_in(&line)?.ip()))
}

/// The address in a server's `SEEN <addr>` line.
fn seen_in(line: &str) -> anyhow::Result<SocketAddr> {
    line.trim()
        .strip_prefix("SEEN ")
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("unexpected server report {line:?}"))
}

/// One short connection (its source checked once the server reported
/// it): send `payload` while reading the echo to EOF. Returns (verified,
/// The servers a worker of the family talks to.
fn servers(v6: bool) -> Vec<IpAddr> {
    if v6 {
        vec![SERVER6_A.into(), SERVER6_B.into()]
    } else {
        vec![
            SERVER_PARTNER.into(),
            SERVER_PUBLIC.into(),
            SERVER_INTERNAL.into(),
        ]
    }
}

/// corrupted, missing) bytes.
fn tcp_short(
    shared: &Shared,
    src: IpAddr,
    dst: SocketAddr,
    payload: &[u8],
) -> anyhow::Result<(u64, u64, u64)> {
    let start = shared.timeline.start();
    let (mut reader, seen) = connect(src, dst)?;
    shared.check_source(Kind::TcpShort, (src, dst), start, seen);
    let mut writer = reader.get_ref().try_clone()?;
    let echoed = std::thread::scope(|s| {
        let sender = s.spawn(move || -> std::io::Result<()> {
            writer.write_all(payload)?;
            writer.shutdown(Shutdown::Write)
        });
        let mut echoed = Vec::with_capacity(payload.len());
        let read = reader.read_to_end(&mut echoed);
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))?
            .context("sending the payload")?;
        read.context("reading the echo")?;
        anyhow::Ok(echoed)
    })?;
    let (verified, corrupted) = compare(payload, &echoed);
    let missing = payload.len().saturating_sub(echoed.len()) as u64;
    Ok((verified, corrupted, missing))
}

fn tcp_short_worker(shared: &Shared, worker: u64, v6: bool) {
    let servers = servers(v6);
    let mut rng = Rng::new(worker.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut n = worker;
    while !shared.stopped() {
        n += 1;
        let src = shared.client(n, v6);
        let dst = SocketAddr::new(
            servers[rng.below(servers.len())],
            TCP_PORTS[rng.below(TCP_PORTS.len())],
        );
        let payload = pattern(TCP_SIZES[rng.below(TCP_SIZES.len())], n);
        let flow = format!("{src} -> {dst}");
        match tcp_short(shared, src, dst, &payload) {
            Ok((verified, corrupted, missing)) => {
                shared.bytes(Kind::TcpShort, v6, &flow, verified, corrupted);
                if missing > 0 {
                    let err =
                        anyhow::anyhow!("{missing} of {} bytes never came back", payload.len());
                    shared.failed(Kind::TcpShort, v6, &flow, &err);
                } else {
                    shared
                        .counters(Kind::TcpShort, v6)
                        .flows
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => shared.failed(Kind::TcpShort, v6, &flow, &e),
        }
        shared.pause(shared.load.gap);
    }
}

/// One long connection: checked chunks until its life ends or the soak
/// stops, then an orderly close.
fn tcp_long(shared: &Shared, src: IpAddr, dst: SocketAddr, seed: u64) -> anyhow::Result<()> {
    let start = shared.timeline.start();
    let (mut reader, seen) = connect(src, dst)?;
    shared.check_source(Kind::TcpLong, (src, dst), start, seen);
    let v6 = dst.is_ipv6();
    let flow = format!("{src} -> {dst}");
    let mut writer = reader.get_ref().try_clone()?;
    let end = Instant::now() + shared.load.long_life;
    let mut echo = vec![0u8; LONG_CHUNK];
    let mut round = 0u64;
    while !shared.stopped() && Instant::now() < end {
        let chunk = pattern(LONG_CHUNK, seed.wrapping_add(round));
        writer
            .write_all(&chunk)
            .with_context(|| format!("sending chunk {round}"))?;
        reader
            .read_exact(&mut echo)
            .with_context(|| format!("reading the echo of chunk {round}"))?;
        let (verified, corrupted) = compare(&chunk, &echo);
        shared.bytes(Kind::TcpLong, v6, &flow, verified, corrupted);
        round += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    writer.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    reader
        .read_to_end(&mut rest)
        .context("reading to the server's close")?;
    if !rest.is_empty() {
        bail!("{} bytes arrived after the last echo", rest.len());
    }
    Ok(())
}

fn tcp_long_worker(shared: &Shared, worker: u64, v6: bool) {
    let servers = servers(v6);
    let mut rng = Rng::new(worker.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut n = worker;
    while !shared.stopped() {
        n += 1;
        let src = shared.client(n, v6);
        let dst = SocketAddr::new(
            servers[rng.below(servers.len())],
            TCP_PORTS[rng.below(TCP_PORTS.len())],
        );
        // Seeds stay small: `pattern` multiplies them.
        match tcp_long(shared, src, dst, rng.u64() >> 40) {
            Ok(()) => {
                shared
                    .counters(Kind::TcpLong, v6)
                    .flows
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                shared.failed(Kind::TcpLong, v6, &format!("{src} -> {dst}"), &e);
                shared.pause(Duration::from_millis(200));
            }
        }
    }
}

/// Local ports (ICMP: echo identifiers) a UDP or ICMP worker cycles
/// through, a block per worker of its kind and family, below the ephemeral
/// range so they never meet the TCP workers' ports.
const PORT_BLOCK: u16 = 2000;
const PORT_BASE: u16 = 20_000;
/// Workers of one kind and family at most (their port blocks).
const MAX_LANES: usize = 4;
/// The port of a worker's (`lane`'s) n-th flow, whose client is `n mod
/// clients`: the port moves on once every client has used it, so a
/// (client, port) pair comes back only after `clients x PORT_BLOCK` flows,
/// long after the gateway expired its entry.
fn port_of(shared: &Shared, lane: u64, n: u64) -> u16 {
    let step = (n / u64::from(shared.clients)) % u64::from(PORT_BLOCK);
    PORT_BASE + lane as u16 * PORT_BLOCK + step as u16
}

/// A UDP payload: the flow and datagram number, then a pattern.
fn datagram(n: u64, k: u64, len: usize) -> Vec<u8> {
    let mut d = format!("{n:016x}{k:04x}").into_bytes();
    d.extend(pattern(len, n ^ (k << 32)));
    d
}

/// One UDP flow of `count` datagrams from `src`:`port`, each resent up to
/// three times until its echo comes back.
fn udp_flow(
    shared: &Shared,
    (src, port): (IpAddr, u16),
    dst: SocketAddr,
    n: u64,
    sizes: &[usize],
) -> anyhow::Result<(u64, u64)> {
    let socket = UdpSocket::bind((src, port)).with_context(|| format!("binding {src}:{port}"))?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    let start = shared.timeline.start();
    let mut buf = vec![0u8; 65_536];
    let (mut verified, mut corrupted) = (0, 0);
    let mut first_seen: Option<IpAddr> = None;
    for (k, &len) in sizes.iter().enumerate() {
        let payload = datagram(n, k as u64, len);
        let mut answered = false;
        'tries: for _ in 0..3 {
            socket.send_to(&payload, dst)?;
            let wait = Instant::now() + Duration::from_secs(1);
            while Instant::now() < wait {
                let Ok(got) = socket.recv(&mut buf) else {
                    continue;
                };
                let reply = &buf[..got];
                let split = reply
                    .iter()
                    .position(|&b| b == b'\n')
                    .context("a reply without a report line")?;
                let seen = seen_in(std::str::from_utf8(&reply[..split])?)?.ip();
                let body = &reply[split + 1..];
                // A late echo of an earlier datagram (resent) is no answer.
                if body.len() < 20 || body[..20] != payload[..20] {
                    continue;
                }
                match first_seen {
                    None => {
                        shared.check_source(Kind::Udp, (src, dst), start, seen);
                        first_seen = Some(seen);
                    }
                    Some(first) if first != seen => {
                        bail!("the server saw {first} and then {seen} within one flow")
                    }
                    Some(_) => {}
                }
                let (v, c) = compare(&payload, body);
                verified += v;
                corrupted += c;
                if body.len() < payload.len() {
                    bail!(
                        "datagram {k} came back {} bytes short",
                        payload.len() - body.len()
                    );
                }
                answered = true;
                break 'tries;
            }
        }
        if !answered {
            bail!(
                "datagram {k} ({} bytes) unanswered after 3 tries",
                payload.len()
            );
        }
    }
    Ok((verified, corrupted))
}

fn udp_worker(shared: &Shared, (worker, lane): (u64, u64), v6: bool) {
    let servers = servers(v6);
    let mut rng = Rng::new(worker.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut n = 0;
    while !shared.stopped() {
        n += 1;
        let src = shared.client(n, v6);
        let port = port_of(shared, lane, n);
        let dst = SocketAddr::new(
            servers[rng.below(servers.len())],
            TCP_PORTS[rng.below(TCP_PORTS.len())],
        );
        // One to four datagrams; one in eight is fragmented on the way.
        let sizes: Vec<usize> = (0..1 + rng.below(4))
            .map(|_| {
                if rng.below(8) == 0 {
                    3000
                } else {
                    1 + rng.below(1400)
                }
            })
            .collect();
        let flow = format!("{src}:{port} -> {dst}");
        match udp_flow(shared, (src, port), dst, n, &sizes) {
            Ok((verified, corrupted)) => {
                shared.bytes(Kind::Udp, v6, &flow, verified, corrupted);
                shared
                    .counters(Kind::Udp, v6)
                    .flows
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => shared.failed(Kind::Udp, v6, &flow, &e),
        }
        shared.pause(shared.load.gap);
    }
}

/// One ping from `src` with echo identifier `id`: up to three requests
/// until the reply carrying its payload comes back. Returns (seen source,
/// verified, corrupted).
fn ping(
    shared: &Shared,
    src: IpAddr,
    dst: IpAddr,
    id: u16,
    payload: &[u8],
) -> anyhow::Result<(IpAddr, u64, u64)> {
    let v6 = dst.is_ipv6();
    let socket = icmp_socket(v6, Duration::from_millis(100))?;
    socket
        .bind(&SocketAddr::new(src, 0).into())
        .with_context(|| format!("binding a raw socket to {src}"))?;
    let mut buf = vec![0u8; 4096];
    for seq in 1..=3u16 {
        let echo = IcmpEchoHeader { id, seq };
        let mut packet = if v6 {
            // The kernel fills in the ICMPv6 checksum of raw sockets.
            Icmpv6Header::new(Icmpv6Type::EchoRequest(echo))
                .to_bytes()
                .to_vec()
        } else {
            Icmpv4Header::with_checksum(Icmpv4Type::EchoRequest(echo), payload)
                .to_bytes()
                .to_vec()
        };
        packet.extend_from_slice(payload);
        socket.send_to(&packet, &SocketAddr::new(dst, 0).into())?;
        let wait = Instant::now() + Duration::from_secs(1);
        while Instant::now() < wait {
            let Ok(n) = (&socket).read(&mut buf) else {
                continue;
            };
            let Some((false, reply_id, body)) = echo_of(&buf[..n], v6) else {
                continue;
            };
            if reply_id != id || !body.starts_with(&payload[..TOKEN_LEN]) {
                continue;
            }
            let (verified, corrupted) = compare(payload, body);
            if body.len() < payload.len() {
                bail!(
                    "the echo reply came back {} bytes short",
                    payload.len() - body.len()
                );
            }
            let (seen, _) = shared
                .recorder
                .take(&payload[..TOKEN_LEN])
                .context("the server's recorder never saw the echo request")?;
            return Ok((seen, verified, corrupted));
        }
    }
    bail!("no echo reply from {dst} after 3 requests")
}

fn icmp_worker(shared: &Shared, (worker, lane): (u64, u64), v6: bool) {
    let servers = servers(v6);
    let mut rng = Rng::new(worker.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut n = 0;
    while !shared.stopped() {
        n += 1;
        let src = shared.client(n, v6);
        let id = port_of(shared, lane, n);
        let dst = servers[rng.below(servers.len())];
        let mut payload = Vec::with_capacity(1024);
        payload.extend_from_slice(PING_TAG);
        payload.extend(format!("{worker:02x}{n:010x}").bytes());
        payload.extend(pattern(40 + rng.below(400), n));
        let flow = format!("{src} -> {dst} id {id}");
        let start = shared.timeline.start();
        match ping(shared, src, dst, id, &payload) {
            Ok((seen, verified, corrupted)) => {
                shared.check_source(Kind::Icmp, (src, SocketAddr::new(dst, 0)), start, seen);
                shared.bytes(Kind::Icmp, v6, &flow, verified, corrupted);
                shared
                    .counters(Kind::Icmp, v6)
                    .flows
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => shared.failed(Kind::Icmp, v6, &flow, &e),
        }
        shared.pause(shared.load.gap * 2);
    }
}

/// Run `f` on a new thread that has entered the namespace `ns` (by name).
fn spawn_in(
    ns: &NetNs,
    name: String,
    f: impl FnOnce() + Send + 'static,
) -> anyhow::Result<JoinHandle<()>> {
    let path = format!("/run/netns/{}", ns.name());
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let entered = File::open(&path)
                .with_context(|| format!("opening {path}"))
                .and_then(|file| {
                    setns(&file, CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("entering {path}"))
                });
            match entered {
                Ok(()) => f(),
                Err(e) => panic!("soak worker: {e:#}"),
            }
        })
        .context("starting a soak worker")
}

/// The running workers; stopped on [`Traffic::finish`] or drop.
pub struct Traffic {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Traffic {
    /// Start the workers in `lab`'s client namespace, from client
    /// addresses `0..clients` of both families, and the echo recorder in
    /// its internet namespace (beside [`crate::probe::Servers`], which must
    /// serve TCP and UDP on ports 443 and 8000 of every server address).
    pub fn start(
        lab: &Lab,
        clients: u8,
        timeline: Arc<Timeline>,
        load: Load,
    ) -> anyhow::Result<Self> {
        assert!((1..=64).contains(&clients), "1 to 64 client addresses");
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            timeline,
            clients,
            counters: (0..KINDS.len() * 2).map(|_| Counters::default()).collect(),
            problems: Mutex::new(Vec::new()),
            recorder: IcmpRecorder {
                seen: Mutex::new(HashMap::new()),
            },
            load,
        });
        let mut traffic = Self {
            shared: Arc::clone(&shared),
            threads: Vec::new(),
        };
        for v6 in [false, true] {
            let socket = lab
                .inet
                .run(move || Ok(icmp_socket(v6, Duration::from_millis(50))?))?;
            let s = Arc::clone(&shared);
            traffic.threads.push(
                std::thread::Builder::new()
                    .name(format!("soak-icmp-recorder-{v6}"))
                    .spawn(move || s.recorder.record(&socket, v6, &s.stop))?,
            );
        }
        let mut worker = 0u64;
        for v6 in [false, true] {
            let kinds: [(Kind, usize); 4] = [
                (Kind::TcpShort, load.tcp_short),
                (Kind::TcpLong, load.tcp_long),
                (Kind::Udp, load.udp),
                (Kind::Icmp, load.icmp),
            ];
            for (kind, count) in kinds {
                assert!(count <= MAX_LANES, "at most {MAX_LANES} workers of a kind");
                for lane in 0..count as u64 {
                    worker += 1;
                    let (s, w) = (Arc::clone(&shared), worker);
                    let run: Box<dyn FnOnce() + Send> = match kind {
                        Kind::TcpShort => Box::new(move || tcp_short_worker(&s, w, v6)),
                        Kind::TcpLong => Box::new(move || tcp_long_worker(&s, w, v6)),
                        Kind::Udp => Box::new(move || udp_worker(&s, (w, lane), v6)),
                        Kind::Icmp => Box::new(move || icmp_worker(&s, (w, lane), v6)),
                    };
                    traffic.threads.push(spawn_in(
                        &lab.client,
                        format!("soak-{}-{w}", kind.label(v6).replace(' ', "-")),
                        run,
                    )?);
                }
            }
        }
        Ok(traffic)
    }

    /// Totals so far.
    pub fn report(&self) -> TrafficReport {
        let mut kinds = Vec::new();
        let mut total = KindReport::default();
        for v6 in [false, true] {
            for kind in KINDS {
                let c = self.shared.counters(kind, v6);
                let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
                let r = KindReport {
                    flows: get(&c.flows),
                    failed: get(&c.failed),
                    verified: get(&c.verified),
                    corrupted: get(&c.corrupted),
                    exact_checks: get(&c.exact),
                    window_checks: get(&c.window),
                    wrong_source: get(&c.wrong_source),
                };
                total += r;
                kinds.push((kind.label(v6), r));
            }
        }
        TrafficReport {
            kinds,
            total,
            problems: self.shared.problems.lock().unwrap().clone(),
        }
    }

    /// One line of progress.
    pub fn progress(&self) -> String {
        let r = self.report();
        let mut line = format!(
            "{} flows, {} failed, {} bytes verified",
            r.total.flows, r.total.failed, r.total.verified
        );
        if r.total.corrupted + r.total.wrong_source > 0 {
            let _ = write!(
                line,
                ", {} corrupted, {} wrong sources",
                r.total.corrupted, r.total.wrong_source
            );
        }
        line
    }

    /// Stop every worker (long connections close in order) and report.
    pub fn finish(mut self) -> TrafficReport {
        self.stop();
        self.report()
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod model_tests {
    use super::*;

    #[test]
    fn soak_model_follows_policy_order_and_variants() {
        let c0: IpAddr = Lab::client_addr(0).into();
        let c0v6: IpAddr = Lab::client_addr6(0).into();
        let a = State {
            variant: Variant::A,
            sessions: 0,
        };
        let b = State {
            variant: Variant::B,
            sessions: 0,
        };
        let fin = State {
            variant: Variant::A,
            sessions: 1,
        };
        let partner: IpAddr = SERVER_PARTNER.into();
        let public: IpAddr = SERVER_PUBLIC.into();
        let internal: IpAddr = SERVER_INTERNAL.into();
        assert_eq!(
            expected(a, c0, partner, Proto::Tcp),
            Expect::Addr(EAST[0].into())
        );
        assert_eq!(
            expected(b, c0, partner, Proto::Icmp),
            Expect::Addr(WEST.into())
        );
        assert_eq!(
            expected(a, c0, public, Proto::Udp),
            Expect::Addr(WEST.into())
        );
        assert_eq!(
            expected(b, c0, public, Proto::Udp),
            Expect::Addr(EAST[0].into())
        );
        assert_eq!(
            expected(a, c0, public, Proto::Tcp),
            Expect::Addr(GW_UPLINK.into())
        );
        assert_eq!(
            expected(fin, c0, public, Proto::Tcp),
            Expect::Addr(FIN.into())
        );
        assert_eq!(expected(fin, c0, internal, Proto::Tcp), Expect::Addr(c0));
        let c1: IpAddr = Lab::client_addr(1).into();
        assert_eq!(
            expected(fin, c1, public, Proto::Tcp),
            Expect::Addr(GW_UPLINK.into())
        );
        assert_eq!(
            expected(a, c0v6, SERVER6_A.into(), Proto::Tcp),
            Expect::Range(EAST6)
        );
        assert_eq!(
            expected(b, c0v6, SERVER6_B.into(), Proto::Udp),
            Expect::Range(EAST6)
        );
        assert_eq!(
            expected(fin, c0v6, SERVER6_B.into(), Proto::Icmp),
            Expect::Range(FIN6)
        );
        assert_eq!(
            expected(a, c0v6, SERVER6_B.into(), Proto::Tcp),
            Expect::Addr(GW_UPLINK6.into())
        );
        assert!(Expect::Range(WEST6).admits("2001:db8:e0:0:1:ab:cd:ef".parse().unwrap()));
        assert!(!Expect::Range(WEST6).admits("2001:db8:e0:0:2::1".parse().unwrap()));
        assert_eq!(client_index(Lab::client_addr6(15).into()), Some(15));
        assert_eq!(client_index("10.10.1.2".parse().unwrap()), None);
    }
}
