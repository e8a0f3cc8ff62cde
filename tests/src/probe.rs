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
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU16, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use etherparse::{IcmpEchoHeader, Icmpv4Header, Icmpv4Type, Ipv4HeaderSlice};
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::NetNs;

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What a server reported about a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Source address and port (ICMP: echo identifier) the server saw.
    pub src: SocketAddrV4,
    /// The payload came back unchanged.
    pub intact: bool,
}

fn parse_seen(line: &str) -> anyhow::Result<SocketAddrV4> {
    line.trim()
        .strip_prefix("SEEN ")
        .with_context(|| format!("unexpected server greeting {line:?}"))?
        .parse()
        .with_context(|| format!("bad address in {line:?}"))
}

/// An echo request the ICMP recorder saw: source, identifier, payload.
type EchoSeen = (Ipv4Addr, u16, Vec<u8>);

/// The echo servers of one namespace; stopped on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    icmp: Arc<Mutex<Vec<EchoSeen>>>,
}

impl Servers {
    /// TCP and UDP echo servers on `ports` of every address in `addrs`, plus
    /// the ICMP echo recorder, inside `ns`. UDP sockets are bound per address
    /// so that answers leave from the address that was asked, as a real
    /// server's would (a wildcard-bound one answers from the routing
    /// source, which no NAT would accept as a reply).
    pub fn start(ns: &NetNs, addrs: &[Ipv4Addr], ports: &[u16]) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let icmp = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for &port in ports {
            let listener = ns.run(move || {
                let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })?;
            let stop_tcp = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || tcp_server(&listener, &stop_tcp)));
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
        let raw = ns.run(|| {
            let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            Ok(s)
        })?;
        let (stop_icmp, seen) = (Arc::clone(&stop), Arc::clone(&icmp));
        threads.push(std::thread::spawn(move || {
            icmp_recorder(&raw, &stop_icmp, &seen)
        }));
        Ok(Self {
            stop,
            threads,
            icmp,
        })
    }

    /// Source address and echo identifier of the echo request carrying `token`.
    fn icmp_seen(&self, token: &[u8]) -> Option<(Ipv4Addr, u16)> {
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

fn tcp_server(listener: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut conn, peer)) => {
                std::thread::spawn(move || {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
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
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
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

fn recv_raw(socket: &Socket, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: u8 and MaybeUninit<u8> have the same layout; recv only writes.
    let uninit = unsafe { &mut *(std::ptr::from_mut(buf) as *mut [MaybeUninit<u8>]) };
    socket.recv(uninit)
}

fn icmp_recorder(socket: &Socket, stop: &AtomicBool, seen: &Mutex<Vec<EchoSeen>>) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let Ok(n) = recv_raw(socket, &mut buf) else {
            continue;
        };
        let Ok(ip) = Ipv4HeaderSlice::from_slice(&buf[..n]) else {
            continue;
        };
        let rest = &buf[ip.slice().len()..n];
        if let Ok((icmp, payload)) = Icmpv4Header::from_slice(rest)
            && let Icmpv4Type::EchoRequest(echo) = icmp.icmp_type
        {
            seen.lock()
                .unwrap()
                .push((ip.source_addr(), echo.id, payload.to_vec()));
        }
    }
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

/// Open a TCP connection from `ns` (optionally from a given local address),
/// read the server's report, send `payload` and check it is echoed back.
pub fn tcp(
    ns: &NetNs,
    from: Option<SocketAddrV4>,
    to: SocketAddrV4,
    payload: Vec<u8>,
) -> anyhow::Result<Seen> {
    ns.run(move || {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        if let Some(from) = from {
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::V4(from).into())?;
        }
        socket
            .connect_timeout(&SocketAddr::V4(to).into(), IO_TIMEOUT)
            .with_context(|| format!("connecting to {to}"))?;
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .context("reading the server report")?;
        let src = parse_seen(&line)?;
        let mut writer = stream;
        writer.write_all(&payload)?;
        writer.shutdown(std::net::Shutdown::Write)?;
        let mut echoed = Vec::new();
        reader
            .read_to_end(&mut echoed)
            .context("reading the echo")?;
        Ok(Seen {
            src,
            intact: echoed == payload,
        })
    })
}

/// Send one UDP datagram from `ns` and read the server's answer.
pub fn udp(
    ns: &NetNs,
    from: Option<SocketAddrV4>,
    to: SocketAddrV4,
    payload: Vec<u8>,
) -> anyhow::Result<Seen> {
    ns.run(move || {
        let socket = UdpSocket::bind(from.unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)))?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buf = [0u8; 65536];
        // UDP may lose the very first datagram while ARP resolves: retry.
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
pub fn ping(ns: &NetNs, servers: &Servers, to: Ipv4Addr, id: u16) -> anyhow::Result<Seen> {
    let payload = token("ping");
    let sent = payload.clone();
    let replied = ns.run(move || {
        let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut seq = 0u16;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            seq += 1;
            let header = Icmpv4Header::with_checksum(
                Icmpv4Type::EchoRequest(IcmpEchoHeader { id, seq }),
                &sent,
            );
            let mut packet = header.to_bytes().to_vec();
            packet.extend_from_slice(&sent);
            socket.send_to(&packet, &SocketAddr::V4(SocketAddrV4::new(to, 0)).into())?;
            let wait = Instant::now() + Duration::from_millis(300);
            while Instant::now() < wait {
                let Ok(n) = recv_raw(&socket, &mut buf) else {
                    continue;
                };
                let Ok(ip) = Ipv4HeaderSlice::from_slice(&buf[..n]) else {
                    continue;
                };
                let rest = &buf[ip.slice().len()..n];
                if let Ok((icmp, body)) = Icmpv4Header::from_slice(rest)
                    && let Icmpv4Type::EchoReply(echo) = icmp.icmp_type
                    && body == sent.as_slice()
                {
                    return Ok(ip.source_addr() == to && echo.id == id);
                }
            }
        }
        bail!("no echo reply from {to}")
    })?;
    let (src, seen_id) = servers
        .icmp_seen(&payload)
        .context("the server never saw the echo request")?;
    Ok(Seen {
        src: SocketAddrV4::new(src, seen_id),
        intact: replied,
    })
}
