//! Servers that report the source address they saw, and probes that drive
//! TCP, UDP and ICMP echo flows and check the data came back intact.
//!
//! TCP: the server writes `SEEN <ip>:<port>\n`, then echoes until EOF.
//! UDP: every datagram is answered with `SEEN <ip>:<port>\n` + the datagram.
//! ICMP: a raw socket in the server namespace records each echo request's
//! source; the kernel there answers it.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    mem::MaybeUninit,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU16, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use etherparse::{
    IcmpEchoHeader, Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type, Ipv4HeaderSlice,
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::NetNs;

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What a server reported about a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Source address and port (ICMP: echo identifier) the server saw.
    pub src: SocketAddr,
    /// The payload came back unchanged.
    pub intact: bool,
}

fn parse_seen(line: &str) -> anyhow::Result<SocketAddr> {
    line.trim()
        .strip_prefix("SEEN ")
        .with_context(|| format!("unexpected server greeting {line:?}"))?
        .parse()
        .with_context(|| format!("bad address in {line:?}"))
}

/// An echo request an ICMP recorder saw: source, identifier, payload.
type EchoSeen = (IpAddr, u16, Vec<u8>);

/// The echo servers of one namespace; stopped on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    icmp: Arc<Mutex<Vec<EchoSeen>>>,
}

impl Servers {
    /// TCP and UDP echo servers on `ports` of every address in `addrs`, plus
    /// the ICMP and ICMPv6 echo recorders, inside `ns`. UDP sockets are
    /// bound per address so that answers leave from the address that was
    /// asked, as a real server's would (a wildcard-bound one answers from
    /// the routing source, which no NAT would accept as a reply).
    pub fn start(ns: &NetNs, addrs: &[IpAddr], ports: &[u16]) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let icmp = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for &port in ports {
            for any in [
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ] {
                let listener = ns.run(move || Ok(listen(SocketAddr::new(any, port), 1024)?))?;
                let stop_tcp = Arc::clone(&stop);
                threads.push(std::thread::spawn(move || {
                    tcp_server(&listener, &stop_tcp, IO_TIMEOUT);
                }));
            }
            for &addr in addrs {
                let socket = ns.run(move || {
                    let s = UdpSocket::bind((addr, port))?;
                    s.set_read_timeout(Some(Duration::from_millis(50)))?;
                    Ok(s)
                })?;
                let stop_udp = Arc::clone(&stop);
                threads.push(std::thread::spawn(move || udp_server(&socket, &stop_udp)));
            }
        }
        for v6 in [false, true] {
            let raw = ns.run(move || Ok(icmp_socket(v6, Duration::from_millis(50))?))?;
            let (stop_icmp, seen) = (Arc::clone(&stop), Arc::clone(&icmp));
            threads.push(std::thread::spawn(move || {
                icmp_recorder(&raw, v6, &stop_icmp, &seen)
            }));
        }
        Ok(Self {
            stop,
            threads,
            icmp,
        })
    }

    /// Source address and echo identifier of the echo request carrying `token`.
    fn icmp_seen(&self, token: &[u8]) -> Option<(IpAddr, u16)> {
        self.icmp
            .lock()
            .unwrap()
            .iter()
            .find(|(_, _, payload)| payload.as_slice() == token)
            .map(|(src, id, _)| (*src, *id))
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A non-blocking TCP listener on `addr`; an IPv6 one takes IPv6 only, so
/// that the IPv4 wildcard can be bound beside it. Call it inside the
/// server's namespace.
pub fn listen(addr: SocketAddr, backlog: i32) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog)?;
    let l: TcpListener = s.into();
    l.set_nonblocking(true)?;
    Ok(l)
}

/// One connection of a TCP echo server: the `SEEN` greeting, then every
/// byte back until EOF, an error or `timeout` of silence.
fn serve_echo(mut conn: TcpStream, peer: SocketAddr, timeout: Duration) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(timeout));
    let _ = conn.set_write_timeout(Some(timeout));
    if writeln!(conn, "SEEN {peer}").is_err() {
        return;
    }
    let mut buf = [0u8; 16384];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// A TCP echo server on a [`listen`]er until `stop`: every connection is
/// served on a thread of its own (small stacks, as a test may hold
/// thousands open) and closed after `idle` of silence.
pub fn tcp_server(listener: &TcpListener, stop: &AtomicBool, idle: Duration) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, peer)) => {
                let _ = std::thread::Builder::new()
                    .stack_size(128 * 1024)
                    .spawn(move || serve_echo(conn, peer, idle));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn udp_server(socket: &UdpSocket, stop: &AtomicBool) {
    let mut buf = [0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let mut reply = format!("SEEN {peer}\n").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, peer);
        }
    }
}

/// A raw ICMP (`v6`: ICMPv6) socket whose reads give up after
/// `read_timeout`. Call it inside the namespace it is for.
pub fn icmp_socket(v6: bool, read_timeout: Duration) -> std::io::Result<Socket> {
    let s = if v6 {
        Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?
    } else {
        Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?
    };
    s.set_read_timeout(Some(read_timeout))?;
    Ok(s)
}

fn recv_raw(socket: &Socket, buf: &mut [u8]) -> std::io::Result<(usize, Option<IpAddr>)> {
    // SAFETY: u8 and MaybeUninit<u8> have the same layout; recv only writes.
    let uninit = unsafe { &mut *(std::ptr::from_mut(buf) as *mut [MaybeUninit<u8>]) };
    let (n, from) = socket.recv_from(uninit)?;
    Ok((n, from.as_socket().map(|a| a.ip())))
}

/// An echo request or reply in a raw socket's data: IPv4 raw sockets get
/// the IP header, IPv6 ones only the ICMPv6 message (the source comes from
/// the socket address). Returns (source, request?, identifier, payload).
fn parse_echo(buf: &[u8], v6: bool, from: Option<IpAddr>) -> Option<(IpAddr, bool, u16, Vec<u8>)> {
    if v6 {
        let (icmp, payload) = Icmpv6Header::from_slice(buf).ok()?;
        let (request, echo) = match icmp.icmp_type {
            Icmpv6Type::EchoRequest(e) => (true, e),
            Icmpv6Type::EchoReply(e) => (false, e),
            _ => return None,
        };
        Some((from?, request, echo.id, payload.to_vec()))
    } else {
        let ip = Ipv4HeaderSlice::from_slice(buf).ok()?;
        let (icmp, payload) = Icmpv4Header::from_slice(&buf[ip.slice().len()..]).ok()?;
        let (request, echo) = match icmp.icmp_type {
            Icmpv4Type::EchoRequest(e) => (true, e),
            Icmpv4Type::EchoReply(e) => (false, e),
            _ => return None,
        };
        Some((
            IpAddr::V4(ip.source_addr()),
            request,
            echo.id,
            payload.to_vec(),
        ))
    }
}

fn icmp_recorder(socket: &Socket, v6: bool, stop: &AtomicBool, seen: &Mutex<Vec<EchoSeen>>) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = recv_raw(socket, &mut buf) else {
            continue;
        };
        if let Some((src, true, id, payload)) = parse_echo(&buf[..n], v6, from) {
            seen.lock().unwrap().push((src, id, payload));
        }
    }
}

/// `ip:port`, whatever the family.
pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// A payload with a recognisable pattern, different per `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64 * 7 + i as u64 / 251 + seed * 131) as u8)
        .collect()
}

/// A unique payload so a probe can be found among concurrent ones.
pub fn token(label: &str) -> Vec<u8> {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    format!(
        "{label}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
    .into_bytes()
}

/// A client connection that has read its server's report.
pub struct Conn {
    reader: BufReader<TcpStream>,
    /// The source address and port the server saw.
    pub seen: SocketAddr,
}

/// Connect (from `from`, when given) to an echo server and read its
/// report. Call it inside the client's namespace.
pub fn open(
    from: Option<SocketAddr>,
    to: SocketAddr,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> anyhow::Result<Conn> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(from) = from {
        socket.set_reuse_address(true)?;
        socket
            .bind(&from.into())
            .with_context(|| format!("binding {from}"))?;
    }
    socket
        .connect_timeout(&to.into(), connect_timeout)
        .with_context(|| format!("connecting to {to}"))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(io_timeout))?;
    stream.set_write_timeout(Some(io_timeout))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .context("reading the server report")?;
    let seen = parse_seen(&line)?;
    Ok(Conn { reader, seen })
}

/// Send `payload` (from a second thread, so that large payloads cannot
/// deadlock against the echo), close the sending side and read the echo
/// to EOF. Returns whether it came back unchanged.
pub fn exchange(conn: Conn, payload: &[u8]) -> anyhow::Result<bool> {
    let Conn { mut reader, .. } = conn;
    let mut writer = reader.get_ref().try_clone()?;
    std::thread::scope(|s| {
        let sender = s.spawn(move || -> std::io::Result<()> {
            writer.write_all(payload)?;
            writer.shutdown(std::net::Shutdown::Write)
        });
        let mut echoed = Vec::with_capacity(payload.len());
        let read = reader.read_to_end(&mut echoed);
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))?
            .context("sending the payload")?;
        read.context("reading the echo")?;
        Ok(echoed == payload)
    })
}

/// Open a TCP connection from `ns` (optionally from a given local address),
/// read the server's report, send `payload` and check it is echoed back.
pub fn tcp(
    ns: &NetNs,
    from: Option<SocketAddr>,
    to: SocketAddr,
    payload: Vec<u8>,
) -> anyhow::Result<Seen> {
    ns.run(move || {
        let conn = open(from, to, IO_TIMEOUT, IO_TIMEOUT)?;
        let src = conn.seen;
        Ok(Seen {
            src,
            intact: exchange(conn, &payload)?,
        })
    })
}

/// Send one UDP datagram from `ns` and read the server's answer.
pub fn udp(
    ns: &NetNs,
    from: Option<SocketAddr>,
    to: SocketAddr,
    payload: Vec<u8>,
) -> anyhow::Result<Seen> {
    ns.run(move || {
        let any = if to.is_ipv4() {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
        } else {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
        };
        let socket = UdpSocket::bind(from.unwrap_or(any))?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buf = [0u8; 65536];
        // UDP may lose the very first datagram while ARP/NDP resolves: retry.
        for _ in 0..6 {
            socket.send_to(&payload, to)?;
            if let Ok((n, _)) = socket.recv_from(&mut buf) {
                let reply = &buf[..n];
                let split = reply
                    .iter()
                    .position(|&b| b == b'\n')
                    .context("server reply without a report line")?;
                let src = parse_seen(std::str::from_utf8(&reply[..split])?)?;
                return Ok(Seen {
                    src,
                    intact: &reply[split + 1..] == payload.as_slice(),
                });
            }
        }
        bail!("no UDP answer from {to}")
    })
}

/// Ping `to` from `ns` with a unique payload; the servers' recorder tells
/// which source address and identifier arrived.
pub fn ping(ns: &NetNs, servers: &Servers, to: IpAddr, id: u16) -> anyhow::Result<Seen> {
    let payload = token("ping");
    let sent = payload.clone();
    let replied = ns.run(move || {
        let v6 = to.is_ipv6();
        let socket = icmp_socket(v6, Duration::from_millis(200))?;
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut seq = 0u16;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            seq += 1;
            let echo = IcmpEchoHeader { id, seq };
            let mut packet = if v6 {
                // The kernel fills in the ICMPv6 checksum of raw sockets.
                Icmpv6Header::new(Icmpv6Type::EchoRequest(echo))
                    .to_bytes()
                    .to_vec()
            } else {
                Icmpv4Header::with_checksum(Icmpv4Type::EchoRequest(echo), &sent)
                    .to_bytes()
                    .to_vec()
            };
            packet.extend_from_slice(&sent);
            socket.send_to(&packet, &SocketAddr::new(to, 0).into())?;
            let wait = Instant::now() + Duration::from_millis(300);
            while Instant::now() < wait {
                let Ok((n, from)) = recv_raw(&socket, &mut buf) else {
                    continue;
                };
                if let Some((src, false, echo_id, body)) = parse_echo(&buf[..n], v6, from)
                    && body == sent
                {
                    return Ok(src == to && echo_id == id);
                }
            }
        }
        bail!("no echo reply from {to}")
    })?;
    // The server's kernel answers before its recorder thread has read the
    // request off the raw socket: give the recorder a moment.
    let recorded = Instant::now() + Duration::from_secs(1);
    let (src, seen_id) = loop {
        if let Some(seen) = servers.icmp_seen(&payload) {
            break seen;
        }
        if Instant::now() >= recorded {
            bail!("the server never saw the echo request");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Seen {
        src: SocketAddr::new(src, seen_id),
        intact: replied,
    })
}
