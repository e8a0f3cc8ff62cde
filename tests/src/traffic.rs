//! Traffic that keeps flowing while a test disrupts the gateway (reloads,
//! restarts): one long TCP connection exchanging checked chunks and one
//! UDP flow of numbered datagrams, each answered by the lab's echo servers.
//! Both report what got through, so a test can assert "nothing lost,
//! nothing corrupted, the same translated tuple throughout".

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{netns::NetNs, probe};

/// What the TCP connection carried.
#[derive(Debug)]
pub struct TcpReport {
    /// The source the server saw when the connection opened.
    pub seen: SocketAddr,
    /// Bytes sent and echoed back unchanged.
    pub bytes: u64,
}

/// What the UDP flow carried.
#[derive(Debug)]
pub struct UdpReport {
    pub sent: u64,
    /// Datagrams whose echo came back unchanged.
    pub answered: u64,
    /// Every source address the server reported seeing.
    pub seen: BTreeSet<SocketAddr>,
}

/// Both flows, running until [`Stream::finish`].
pub struct Stream {
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
    tcp: Option<JoinHandle<anyhow::Result<TcpReport>>>,
    udp: Option<JoinHandle<anyhow::Result<UdpReport>>>,
}

const CHUNK: usize = 16 * 1024;
const GAP: Duration = Duration::from_millis(2);

fn tcp_loop(
    mut stream: TcpStream,
    mut reader: BufReader<TcpStream>,
    stop: &AtomicBool,
    progress: &AtomicU64,
) -> anyhow::Result<u64> {
    let mut bytes = 0u64;
    let mut echo = vec![0u8; CHUNK];
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let chunk = probe::pattern(CHUNK, round);
        stream
            .write_all(&chunk)
            .with_context(|| format!("sending chunk {round} after {bytes} bytes"))?;
        reader
            .read_exact(&mut echo)
            .with_context(|| format!("reading the echo of chunk {round} after {bytes} bytes"))?;
        if echo != chunk {
            bail!("chunk {round} came back altered after {bytes} good bytes");
        }
        bytes += CHUNK as u64;
        progress.fetch_add(1, Ordering::Relaxed);
        round += 1;
        std::thread::sleep(GAP);
    }
    Ok(bytes)
}

fn udp_loop(socket: &UdpSocket, to: SocketAddr, stop: &AtomicBool) -> anyhow::Result<UdpReport> {
    let mut report = UdpReport {
        sent: 0,
        answered: 0,
        seen: BTreeSet::new(),
    };
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let payload = format!("datagram {}", report.sent).into_bytes();
        socket.send_to(&payload, to)?;
        report.sent += 1;
        // One answer per datagram, in order: a missing one is a loss.
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            let reply = &buf[..n];
            if let Some(split) = reply.iter().position(|&b| b == b'\n') {
                let line = std::str::from_utf8(&reply[..split]).unwrap_or_default();
                if let Some(src) = line.strip_prefix("SEEN ").and_then(|s| s.parse().ok()) {
                    report.seen.insert(src);
                }
                if reply[split + 1..] == payload[..] {
                    report.answered += 1;
                }
            }
        }
        std::thread::sleep(GAP);
    }
    Ok(report)
}

impl Stream {
    /// Open both flows from the client namespace `ns` (UDP from a fixed
    /// local port) and start exchanging.
    pub fn start(ns: &NetNs, tcp_to: SocketAddr, udp_to: SocketAddr) -> anyhow::Result<Self> {
        let conn = ns.run(move || {
            let s = TcpStream::connect_timeout(&tcp_to, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            Ok(s)
        })?;
        let udp = ns.run(move || {
            let any = if udp_to.is_ipv4() {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            };
            let s = UdpSocket::bind((any, 0))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(s)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let tcp = {
            let (stop, progress) = (Arc::clone(&stop), Arc::clone(&progress));
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone()?);
                let mut line = String::new();
                reader
                    .read_line(&mut line)
                    .context("reading the server report")?;
                let seen = line
                    .trim()
                    .strip_prefix("SEEN ")
                    .and_then(|s| s.parse().ok())
                    .with_context(|| format!("unexpected greeting {line:?}"))?;
                let bytes = tcp_loop(conn, reader, &stop, &progress)?;
                Ok(TcpReport { seen, bytes })
            })
        };
        let udp = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || udp_loop(&udp, udp_to, &stop))
        };
        Ok(Self {
            stop,
            progress,
            tcp: Some(tcp),
            udp: Some(udp),
        })
    }

    /// TCP chunks echoed so far.
    pub fn progress(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }

    /// Wait until at least `chunks` more TCP chunks have been echoed (fails
    /// after `timeout`): proof that traffic is flowing right now.
    pub fn advance(&self, chunks: u64, timeout: Duration) -> anyhow::Result<()> {
        let target = self.progress() + chunks;
        let deadline = std::time::Instant::now() + timeout;
        while self.progress() < target {
            if std::time::Instant::now() > deadline {
                bail!(
                    "the TCP stream stalled: {} of {chunks} chunks in {timeout:?}",
                    chunks + self.progress() - target
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Stop both flows and report.
    pub fn finish(mut self) -> anyhow::Result<(TcpReport, UdpReport)> {
        self.stop.store(true, Ordering::Relaxed);
        let tcp = self.tcp.take().expect("joined once").join();
        let udp = self.udp.take().expect("joined once").join();
        let tcp = tcp.map_err(|_| anyhow::anyhow!("TCP thread panicked"))??;
        let udp = udp.map_err(|_| anyhow::anyhow!("UDP thread panicked"))??;
        Ok((tcp, udp))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // A failing test still stops its threads.
        self.stop.store(true, Ordering::Relaxed);
        for t in [
            self.tcp.take().map(|t| t.join().map(|_| ())),
            self.udp.take().map(|t| t.join().map(|_| ())),
        ]
        .into_iter()
        .flatten()
        {
            let _ = t;
        }
    }
}
