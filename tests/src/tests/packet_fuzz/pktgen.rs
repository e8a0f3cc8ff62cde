//! Packet generation for the fuzz run: a seeded PRNG, a byte-level builder
//! (Ethernet, IPv4 with options, IPv6 with extension headers, TCP, UDP,
//! ICMP and ICMPv6 echo and errors, fragments) that writes valid checksums
//! unless told otherwise, the generator classes, and a mutator.

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::verify::{
    Dir, ETH_IPV4, ETH_IPV6, ETH_LEN, ICMP, ICMPV6, TCP, UDP, fold, outer_view, pseudo_sum, sum16,
};

pub use crate::rng::Rng;

/// One direction of a flow. For ICMP echo, `sport` holds a request's
/// identifier and `dport` a reply's (the two are equal when built here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

impl Flow {
    pub fn v6(&self) -> bool {
        self.src.is_ipv6()
    }
}

fn octets(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The ICMP protocol of a family.
pub fn icmp_of(v6: bool) -> u8 {
    if v6 { ICMPV6 } else { ICMP }
}

// ---- builders -----------------------------------------------------------

/// What BPF_PROG_TEST_RUN takes: frames from an Ethernet header up to
/// `max_len` bytes, and for the IP Ethernet types at least `min_ipv4` or
/// `min_ipv6` bytes after the Ethernet header (the kernel checks that much
/// of the network header is there before it runs the program).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_len: usize,
    pub min_ipv4: usize,
    pub min_ipv6: usize,
}

impl Limits {
    pub fn takes(&self, frame: &[u8]) -> bool {
        if frame.len() < ETH_LEN || frame.len() > self.max_len {
            return false;
        }
        let l3 = frame.len() - ETH_LEN;
        match u16::from_be_bytes([frame[12], frame[13]]) {
            ETH_IPV4 => l3 >= self.min_ipv4,
            ETH_IPV6 => l3 >= self.min_ipv6,
            _ => true,
        }
    }

    /// `frame` cut to the longest, or grown with random bytes to the
    /// shortest frame the kernel takes.
    fn fit(&self, rng: &mut Rng, mut frame: Vec<u8>) -> Vec<u8> {
        frame.truncate(self.max_len);
        if frame.len() < ETH_LEN {
            let n = ETH_LEN - frame.len();
            frame.extend_from_slice(&rng.bytes(n));
        }
        let min = match u16::from_be_bytes([frame[12], frame[13]]) {
            ETH_IPV4 => self.min_ipv4,
            ETH_IPV6 => self.min_ipv6,
            _ => 0,
        };
        if frame.len() < ETH_LEN + min {
            let n = ETH_LEN + min - frame.len();
            frame.extend_from_slice(&rng.bytes(n));
        }
        frame
    }
}

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

pub fn ether(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ETH_LEN + payload.len());
    out.extend_from_slice(&GW_MAC);
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&ethertype.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An IP packet in an Ethernet frame of the type its version names.
pub fn frame(ip: &[u8]) -> Vec<u8> {
    let ethertype = if ip.first().is_some_and(|b| b >> 4 == 6) {
        ETH_IPV6
    } else {
        ETH_IPV4
    };
    ether(ethertype, ip)
}

/// Fill in the checksum of an L4 segment: TCP, UDP and ICMPv6 with the
/// pseudo-header, ICMP without. Other protocols have none.
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, seg: &mut [u8]) {
    let (field, pseudo) = match proto {
        TCP => (16, true),
        UDP => (6, true),
        ICMP => (2, false),
        ICMPV6 => (2, true),
        _ => return,
    };
    if seg.len() < field + 2 {
        return;
    }
    seg[field..field + 2].fill(0);
    let mut sum = sum16(seg);
    if pseudo {
        sum += pseudo_sum(&octets(src), &octets(dst), proto, seg.len());
    }
    let mut csum = !fold(sum);
    if proto == UDP && csum == 0 {
        csum = 0xffff;
    }
    seg[field..field + 2].copy_from_slice(&csum.to_be_bytes());
}

/// TCP flags a flow's packets carry, from opening to closing.
const TCP_FLAGS: [u8; 8] = [0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14, 0x19];

/// A transport segment of `flow` with a valid checksum. ICMP is an echo
/// request (`request`) or reply.
pub fn transport(rng: &mut Rng, flow: &Flow, request: bool, payload: &[u8]) -> Vec<u8> {
    let mut seg = match flow.proto {
        TCP => {
            let words = if rng.chance(15) { rng.range(6, 15) } else { 5 };
            let mut h = vec![0u8; words * 4];
            h[0..2].copy_from_slice(&flow.sport.to_be_bytes());
            h[2..4].copy_from_slice(&flow.dport.to_be_bytes());
            h[4..8].copy_from_slice(&(rng.u64() as u32).to_be_bytes());
            h[8..12].copy_from_slice(&(rng.u64() as u32).to_be_bytes());
            h[12] = (words as u8) << 4;
            h[13] = if rng.chance(5) {
                rng.u8()
            } else {
                rng.pick(&TCP_FLAGS)
            };
            h[14..16].copy_from_slice(&64240u16.to_be_bytes());
            // Options: NOPs, or random bytes.
            if rng.chance(50) {
                h[20..].fill(1);
            } else {
                let n = h.len() - 20;
                h[20..].copy_from_slice(&rng.bytes(n));
            }
            h
        }
        UDP => {
            let mut h = vec![0u8; 8];
            h[0..2].copy_from_slice(&flow.sport.to_be_bytes());
            h[2..4].copy_from_slice(&flow.dport.to_be_bytes());
            h[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            h
        }
        ICMP | ICMPV6 => {
            let kind = match (flow.proto, request) {
                (ICMP, true) => 8,
                (ICMP, false) => 0,
                (_, true) => 128,
                (_, false) => 129,
            };
            let id = if request { flow.sport } else { flow.dport };
            let mut h = vec![kind, 0, 0, 0];
            h.extend_from_slice(&id.to_be_bytes());
            h.extend_from_slice(&rng.u16().to_be_bytes());
            h
        }
        _ => Vec::new(),
    };
    seg.extend_from_slice(payload);
    l4_checksum(flow.src, flow.dst, flow.proto, &mut seg);
    // IPv4 UDP may go without a checksum.
    if flow.proto == UDP && !flow.v6() && rng.chance(10) {
        seg[6..8].fill(0);
    }
    seg
}

/// An IPv4 header's variable parts.
#[derive(Clone, Debug)]
pub struct V4Hdr {
    pub id: u16,
    /// Flags and fragment offset.
    pub frag: u16,
    pub ttl: u8,
    pub options: Vec<u8>,
}

impl V4Hdr {
    pub fn plain(rng: &mut Rng) -> Self {
        Self {
            id: rng.u16(),
            frag: if rng.chance(50) { 0x4000 } else { 0 },
            ttl: 64,
            options: Vec::new(),
        }
    }
}

/// Recompute the header checksum of the IPv4 header at the start of `ip`
/// (over the length its IHL claims, as far as present).
pub fn ipv4_fix_checksum(ip: &mut [u8]) {
    if ip.len() < 20 {
        return;
    }
    let ihl = (usize::from(ip[0] & 0x0f) * 4).clamp(20, ip.len());
    ip[10..12].fill(0);
    let csum = !fold(sum16(&ip[..ihl]));
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, hdr: &V4Hdr, payload: &[u8]) -> Vec<u8> {
    let ihl = 20 + hdr.options.len();
    assert!(
        ihl.is_multiple_of(4) && ihl <= 60,
        "IPv4 options must fill whole words, at most 40 bytes"
    );
    let mut b = vec![0u8; ihl];
    b[0] = 0x40 | (ihl / 4) as u8;
    b[2..4].copy_from_slice(&((ihl + payload.len()) as u16).to_be_bytes());
    b[4..6].copy_from_slice(&hdr.id.to_be_bytes());
    b[6..8].copy_from_slice(&hdr.frag.to_be_bytes());
    b[8] = hdr.ttl;
    b[9] = proto;
    b[12..16].copy_from_slice(&src.octets());
    b[16..20].copy_from_slice(&dst.octets());
    b[20..].copy_from_slice(&hdr.options);
    ipv4_fix_checksum(&mut b);
    b.extend_from_slice(payload);
    b
}

pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0x60, 0, 0, 0];
    b.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    b.extend_from_slice(&[next, 64]);
    b.extend_from_slice(&src.octets());
    b.extend_from_slice(&dst.octets());
    b.extend_from_slice(payload);
    b
}

/// An IP packet of either family around `payload`.
pub fn ip(src: IpAddr, dst: IpAddr, proto: u8, hdr: &V4Hdr, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s, d, proto, hdr, payload),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, proto, payload),
        _ => panic!("a packet's addresses must be of one family: {src} -> {dst}"),
    }
}

/// A whole, valid datagram of `flow`.
pub fn datagram(rng: &mut Rng, flow: &Flow, request: bool, payload: &[u8]) -> Vec<u8> {
    let seg = transport(rng, flow, request, payload);
    ip(flow.src, flow.dst, flow.proto, &V4Hdr::plain(rng), &seg)
}

/// Random IPv4 options filling `words` words: well-formed ones (NOP, end,
/// record route, timestamp) or arbitrary bytes.
pub fn ipv4_options(rng: &mut Rng, words: usize) -> Vec<u8> {
    let len = words * 4;
    let mut out = Vec::with_capacity(len);
    if rng.chance(30) {
        return rng.bytes(len);
    }
    while out.len() < len {
        let room = len - out.len();
        match rng.below(4) {
            0 => out.push(1),
            1 if room >= 3 => {
                // Record route: type, length, pointer, slots.
                let n = (room - 3) / 4;
                let n = if n == 0 { 0 } else { rng.range(0, n) };
                out.extend_from_slice(&[7, (3 + 4 * n) as u8, 4]);
                out.extend_from_slice(&rng.bytes(4 * n));
            }
            2 if room >= 4 => {
                let n = (room - 4) / 4;
                let n = if n == 0 { 0 } else { rng.range(0, n) };
                out.extend_from_slice(&[68, (4 + 4 * n) as u8, 5, 0]);
                out.extend_from_slice(&rng.bytes(4 * n));
            }
            _ => out.push(0),
        }
    }
    out
}

/// One IPv6 extension header of `kind` whose next header is `next`,
/// no longer than `budget` bytes when that is possible.
fn ext_header(rng: &mut Rng, kind: u8, next: u8, budget: usize) -> Vec<u8> {
    let units = |rng: &mut Rng| {
        let max = (budget / 8).saturating_sub(1).min(255);
        if max == 0 {
            0
        } else if rng.chance(80) {
            rng.range(0, max.min(3))
        } else {
            rng.range(0, max)
        }
    };
    match kind {
        44 => {
            // An atomic fragment or a first fragment.
            let field: u16 = if rng.chance(50) { 1 } else { 0 };
            let mut h = vec![next, 0];
            h.extend_from_slice(&field.to_be_bytes());
            h.extend_from_slice(&(rng.u64() as u32).to_be_bytes());
            h
        }
        51 => {
            // Authentication header: length in 4-byte words minus 2.
            let words = 2 * units(rng) + 4;
            let mut h = vec![next, words as u8, 0, 0];
            h.extend_from_slice(&rng.bytes((words + 2) * 4 - 4));
            h
        }
        43 => {
            let n = units(rng);
            let mut h = vec![next, n as u8, rng.pick(&[0, 2, 3, 4]), rng.below(4) as u8];
            h.extend_from_slice(&[0; 4]);
            h.extend_from_slice(&rng.bytes(n * 8));
            h
        }
        _ => {
            // Hop-by-hop and destination options: one PadN, or garbage.
            let n = units(rng);
            let len = (n + 1) * 8;
            let mut h = vec![next, n as u8];
            if rng.chance(70) {
                h.extend_from_slice(&[1, (len - 4) as u8]);
                h.resize(len, 0);
            } else {
                h.extend_from_slice(&rng.bytes(len - 2));
            }
            h
        }
    }
}

/// `kinds` as a chain of extension headers in front of an upper-layer
/// header of `proto`: the first "next header" value and the bytes.
pub fn ext_chain(rng: &mut Rng, kinds: &[u8], proto: u8, budget: usize) -> (u8, Vec<u8>) {
    let mut out = Vec::new();
    for (i, &kind) in kinds.iter().enumerate() {
        let next = kinds.get(i + 1).copied().unwrap_or(proto);
        let room = budget.saturating_sub(out.len()) / (kinds.len() - i);
        out.extend_from_slice(&ext_header(rng, kind, next, room));
    }
    (kinds.first().copied().unwrap_or(proto), out)
}

/// An ICMP error (either family) from `from` to `to` quoting `quoted`.
pub fn icmp_error(rng: &mut Rng, from: IpAddr, to: IpAddr, quoted: &[u8]) -> Vec<u8> {
    let v6 = from.is_ipv6();
    let (kind, code, rest): (u8, u8, u32) = if v6 {
        match rng.below(4) {
            0 => (1, rng.range(0, 6) as u8, 0),
            1 => (2, 0, 1280),
            2 => (3, rng.range(0, 1) as u8, 0),
            _ => (4, rng.range(0, 2) as u8, rng.range(0, 60) as u32),
        }
    } else {
        match rng.below(3) {
            0 => {
                let code = rng.range(0, 15) as u8;
                (3, code, if code == 4 { 1400 } else { 0 })
            }
            1 => (11, rng.range(0, 1) as u8, 0),
            _ => (12, 0, (rng.range(0, 40) as u32) << 24),
        }
    };
    let proto = icmp_of(v6);
    let mut seg = vec![kind, code, 0, 0];
    seg.extend_from_slice(&rest.to_be_bytes());
    seg.extend_from_slice(quoted);
    l4_checksum(from, to, proto, &mut seg);
    ip(from, to, proto, &V4Hdr::plain(rng), &seg)
}

/// What an ICMP error quotes of `flow`'s packet: the IP header and the
/// first 8 bytes of L4 (RFC 792), the whole L4 header, all of it, or
/// somewhere in between. IPv4 quotes sometimes carry options.
pub fn quote(rng: &mut Rng, flow: &Flow, request: bool) -> Vec<u8> {
    let payload_len = rng.range(0, 64);
    let payload = rng.bytes(payload_len);
    let seg = transport(rng, flow, request, &payload);
    let mut hdr = V4Hdr::plain(rng);
    if !flow.v6() && rng.chance(15) {
        let words = rng.range(1, 10);
        hdr.options = ipv4_options(rng, words);
    }
    let whole = ip(flow.src, flow.dst, flow.proto, &hdr, &seg);
    let head = whole.len() - seg.len();
    let l4_head = match flow.proto {
        TCP => usize::from(seg[12] >> 4) * 4,
        _ => 8,
    };
    let cut = match rng.below(4) {
        0 => head + 8,
        1 => head + l4_head,
        2 => whole.len(),
        _ => rng.range(head, whole.len()),
    };
    whole[..cut.min(whole.len())].to_vec()
}

/// The pieces of a whole IPv4 datagram (no options) cut at `first_len`
/// bytes of payload (a multiple of 8), then in pieces of `rest_len`.
pub fn fragments4(whole: &[u8], first_len: usize, rest_len: usize) -> Vec<Vec<u8>> {
    let ihl = usize::from(whole[0] & 0x0f) * 4;
    let payload = &whole[ihl..];
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < payload.len() {
        let len = if offset == 0 { first_len } else { rest_len }.min(payload.len() - offset);
        let more = offset + len < payload.len();
        let mut piece = whole[..ihl].to_vec();
        piece[2..4].copy_from_slice(&((ihl + len) as u16).to_be_bytes());
        let field = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
        piece[6..8].copy_from_slice(&field.to_be_bytes());
        ipv4_fix_checksum(&mut piece);
        piece.extend_from_slice(&payload[offset..offset + len]);
        out.push(piece);
        offset += len;
    }
    out
}

/// The pieces of a whole IPv6 datagram (no extension headers), each with a
/// Fragment header of identification `id`.
pub fn fragments6(whole: &[u8], id: u32, first_len: usize, rest_len: usize) -> Vec<Vec<u8>> {
    let payload = &whole[40..];
    let proto = whole[6];
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < payload.len() {
        let len = if offset == 0 { first_len } else { rest_len }.min(payload.len() - offset);
        let more = offset + len < payload.len();
        let mut piece = whole[..40].to_vec();
        piece[4..6].copy_from_slice(&((8 + len) as u16).to_be_bytes());
        piece[6] = 44;
        piece.extend_from_slice(&[proto, 0]);
        piece.extend_from_slice(&(offset as u16 | u16::from(more)).to_be_bytes());
        piece.extend_from_slice(&id.to_be_bytes());
        piece.extend_from_slice(&payload[offset..offset + len]);
        out.push(piece);
        offset += len;
    }
    out
}

/// Random edits of a frame: bit flips, byte and word overwrites (mostly in
/// the headers), truncation, insertion, deletion, trailing bytes. The
/// result stays within `min..=max` bytes.
pub fn mutate(rng: &mut Rng, mut b: Vec<u8>, min: usize, max: usize) -> Vec<u8> {
    let edits = rng.range(1, 4);
    for _ in 0..edits {
        let len = b.len();
        if len <= min {
            b.extend_from_slice(&rng.bytes(8));
            continue;
        }
        // Most edits land in the first 100 bytes, where the headers are.
        let pos = if rng.chance(75) {
            12 + rng.below(len.min(114) - 12)
        } else {
            rng.below(len)
        };
        match rng.below(8) {
            0 => b[pos] ^= 1 << rng.below(8),
            1 => b[pos] = rng.u8(),
            2 => b[pos] = rng.pick(&[0, 0xff, 0x80, 0x7f]),
            3 => b.truncate(rng.range(min, len)),
            4 => {
                let n = rng.range(1, 16);
                let bytes = rng.bytes(n);
                b.splice(pos..pos, bytes);
            }
            5 => {
                let n = rng.range(1, 16).min(len - min);
                let start = pos.min(len - n);
                b.drain(start..start + n);
            }
            6 => {
                let at = pos & !1;
                if at + 2 <= len {
                    let random = rng.u16();
                    let word: u16 = rng.pick(&[0, 0xffff, random, 0x0001]);
                    b[at..at + 2].copy_from_slice(&word.to_be_bytes());
                }
            }
            _ => {
                let n = rng.range(1, 64);
                let bytes = rng.bytes(n);
                b.extend_from_slice(&bytes);
            }
        }
    }
    b.truncate(max);
    if b.len() < min {
        b.resize(min, 0);
    }
    b
}

// ---- classes --------------------------------------------------------------

/// Kinds of generated packets; each row of the report is one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// Well-formed first packets of each epoch's flows (egress only).
    Seed,
    Flow4,
    Flow6,
    IcmpError4,
    IcmpError6,
    Ipv4Options,
    Ipv4BadHeader,
    Ipv6ExtChain,
    Fragment4,
    Fragment6,
    Truncated,
    SizeEdge,
    CrossFamily,
    NonIp,
    Mutated,
    Garbage,
    /// Outside what BPF_PROG_TEST_RUN accepts (shorter than Ethernet, or
    /// longer than its limit): the kernel must refuse them.
    Refused,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Self::Seed => "seed flows",
            Self::Flow4 => "tcp/udp/icmp v4",
            Self::Flow6 => "tcp/udp/icmpv6 v6",
            Self::IcmpError4 => "icmp errors v4",
            Self::IcmpError6 => "icmpv6 errors",
            Self::Ipv4Options => "ipv4 options",
            Self::Ipv4BadHeader => "ipv4 bad ihl/len/ver",
            Self::Ipv6ExtChain => "ipv6 ext chains",
            Self::Fragment4 => "fragments v4",
            Self::Fragment6 => "fragments v6",
            Self::Truncated => "truncated headers",
            Self::SizeEdge => "zero/max length",
            Self::CrossFamily => "wrong-family icmp/proto",
            Self::NonIp => "vlan/non-ip",
            Self::Mutated => "byte mutations",
            Self::Garbage => "random bytes",
            Self::Refused => "outside test-run limits",
        }
    }

    /// Classes and their weights (per mille) in the generated stream.
    pub const MIX: &[(Class, usize)] = &[
        (Class::Flow4, 110),
        (Class::Flow6, 100),
        (Class::IcmpError4, 55),
        (Class::IcmpError6, 50),
        (Class::Ipv4Options, 40),
        (Class::Ipv4BadHeader, 50),
        (Class::Ipv6ExtChain, 60),
        (Class::Fragment4, 45),
        (Class::Fragment6, 45),
        (Class::Truncated, 45),
        (Class::SizeEdge, 30),
        (Class::CrossFamily, 30),
        (Class::NonIp, 15),
        (Class::Mutated, 260),
        (Class::Garbage, 60),
        (Class::Refused, 5),
    ];

    pub fn choose(rng: &mut Rng) -> Class {
        let total: usize = Self::MIX.iter().map(|(_, w)| w).sum();
        let mut at = rng.below(total);
        for &(class, weight) in Self::MIX {
            if at < weight {
                return class;
            }
            at -= weight;
        }
        unreachable!("the weights add up to the total")
    }
}

/// The addresses and ports packets are made of.
pub struct World {
    pub clients: Vec<IpAddr>,
    /// The gateway's own addresses (also its default egress).
    pub locals: Vec<IpAddr>,
    /// Destinations, covering every policy of the test's set.
    pub servers: Vec<IpAddr>,
    /// Routers that send ICMP errors.
    pub routers: Vec<IpAddr>,
    /// Egress addresses replies are sent to when they are not for a live
    /// flow.
    pub egress: Vec<IpAddr>,
    pub client_ports: Vec<u16>,
    pub server_ports: Vec<u16>,
    pub echo_ids: Vec<u16>,
}

/// A flow the dataplane has translated (or passed): what the client sent,
/// and the source it left with.
#[derive(Clone, Copy, Debug)]
pub struct Mapping {
    pub orig: Flow,
    pub nat: IpAddr,
    pub nat_port: u16,
}

/// Live flows remembered per family, at most.
const LIVE_MAX: usize = 512;
/// Later fragments waiting to be sent, at most.
const PENDING_MAX: usize = 64;

/// The world's addresses of one family.
struct Family {
    clients: Vec<IpAddr>,
    locals: Vec<IpAddr>,
    servers: Vec<IpAddr>,
    routers: Vec<IpAddr>,
    egress: Vec<IpAddr>,
}

impl Family {
    fn of(world: &World, v6: bool) -> Self {
        let pick = |addrs: &[IpAddr]| -> Vec<IpAddr> {
            addrs
                .iter()
                .copied()
                .filter(|a| a.is_ipv6() == v6)
                .collect()
        };
        Self {
            clients: pick(&world.clients),
            locals: pick(&world.locals),
            servers: pick(&world.servers),
            routers: pick(&world.routers),
            egress: pick(&world.egress),
        }
    }
}

/// The generator: the world, the flows known to be live in the dataplane
/// (per family), and later fragments of datagrams whose first fragment was
/// sent.
pub struct Gen {
    world: World,
    families: [Family; 2],
    live: [Vec<Mapping>; 2],
    pending: VecDeque<(Dir, Vec<u8>)>,
    limits: Limits,
}

impl Gen {
    pub fn new(world: World, limits: Limits) -> Self {
        Self {
            families: [Family::of(&world, false), Family::of(&world, true)],
            world,
            live: [Vec::new(), Vec::new()],
            pending: VecDeque::new(),
            limits,
        }
    }

    fn fam(&self, v6: bool) -> &Family {
        &self.families[usize::from(v6)]
    }

    /// Forget every flow (the dataplane's tables were emptied).
    pub fn forget(&mut self) {
        self.live.iter_mut().for_each(Vec::clear);
        self.pending.clear();
    }

    /// Remember the translation of a well-formed egress packet that passed.
    pub fn learn(&mut self, rng: &mut Rng, input: &[u8], out: &[u8]) {
        let (Some(flow), Some(left)) = (flow_of(input), flow_of(out)) else {
            return;
        };
        let mapping = Mapping {
            orig: flow,
            nat: left.src,
            nat_port: left.sport,
        };
        // Duplicates are not looked for: a flow seen often is simply more
        // likely to be picked again.
        let live = &mut self.live[usize::from(flow.v6())];
        if live.len() < LIVE_MAX {
            live.push(mapping);
        } else {
            live[rng.below(LIVE_MAX)] = mapping;
        }
    }

    fn live_of(&self, rng: &mut Rng, v6: bool) -> Option<Mapping> {
        let live = &self.live[usize::from(v6)];
        (!live.is_empty()).then(|| live[rng.below(live.len())])
    }

    /// The first packets of an epoch: every source (clients and the
    /// gateway) to every destination, in each protocol.
    pub fn seeds(&self, rng: &mut Rng) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let w = &self.world;
        for src in w.clients.iter().chain(&w.locals) {
            for &dst in &self.fam(src.is_ipv6()).servers {
                for proto in [TCP, UDP, icmp_of(src.is_ipv6())] {
                    let (sport, dport) = if proto == TCP || proto == UDP {
                        (rng.pick(&w.client_ports), rng.pick(&w.server_ports))
                    } else {
                        let id = rng.pick(&w.echo_ids);
                        (id, id)
                    };
                    let flow = Flow {
                        src: *src,
                        dst,
                        proto,
                        sport,
                        dport,
                    };
                    let n = rng.range(0, 32);
                    let payload = rng.bytes(n);
                    out.push(frame(&datagram(rng, &flow, true, &payload)));
                }
            }
        }
        out
    }

    /// A flow leaving through the uplink: a live one again (55%), or a new
    /// one from a client or the gateway itself, with ports from small sets
    /// so that tuples collide (the gateway's sometimes on a port a live
    /// translation holds).
    fn egress_flow(&self, rng: &mut Rng, v6: bool) -> Flow {
        if rng.chance(55)
            && let Some(m) = self.live_of(rng, v6)
        {
            return m.orig;
        }
        let w = &self.world;
        let src = if rng.chance(88) {
            rng.pick(&self.fam(v6).clients)
        } else {
            rng.pick(&self.fam(v6).locals)
        };
        let dst = rng.pick(&self.fam(v6).servers);
        let proto = rng.pick(&[TCP, UDP, icmp_of(v6)]);
        let mut sport = rng.pick(&w.client_ports);
        if w.locals.contains(&src)
            && rng.chance(50)
            && let Some(m) = self.live_of(rng, v6)
        {
            sport = m.nat_port;
        }
        let (sport, dport) = if proto == TCP || proto == UDP {
            (sport, rng.pick(&w.server_ports))
        } else {
            let id = if rng.chance(50) {
                sport
            } else {
                rng.pick(&w.echo_ids)
            };
            (id, id)
        };
        Flow {
            src,
            dst,
            proto,
            sport,
            dport,
        }
    }

    /// A packet arriving on the uplink: a reply to a live flow (75%,
    /// sometimes one field off), or from a server to an egress address.
    fn ingress_flow(&self, rng: &mut Rng, v6: bool) -> Flow {
        let w = &self.world;
        if rng.chance(75)
            && let Some(m) = self.live_of(rng, v6)
        {
            let mut f = Flow {
                src: m.orig.dst,
                dst: m.nat,
                proto: m.orig.proto,
                sport: m.orig.dport,
                dport: m.nat_port,
            };
            if m.orig.proto != TCP && m.orig.proto != UDP {
                f.sport = m.nat_port;
            }
            if rng.chance(15) {
                match rng.below(3) {
                    0 => f.dport = f.dport.wrapping_add(1),
                    1 => f.src = rng.pick(&self.fam(v6).servers),
                    _ => f.sport = rng.pick(&w.server_ports),
                }
            }
            return f;
        }
        let proto = rng.pick(&[TCP, UDP, icmp_of(v6)]);
        let dport = rng.pick(&w.client_ports);
        Flow {
            src: rng.pick(&self.fam(v6).servers),
            dst: rng.pick(&self.fam(v6).egress),
            proto,
            sport: if proto == TCP || proto == UDP {
                rng.pick(&w.server_ports)
            } else {
                dport
            },
            dport,
        }
    }

    fn flow(&self, rng: &mut Rng, dir: Dir, v6: bool) -> Flow {
        match dir {
            Dir::Egress => self.egress_flow(rng, v6),
            Dir::Ingress => self.ingress_flow(rng, v6),
        }
    }

    fn payload(&self, rng: &mut Rng) -> Vec<u8> {
        let len = match rng.below(10) {
            0..=6 => rng.range(0, 48),
            7 | 8 => rng.range(49, 600),
            _ => rng.range(601, 1400),
        };
        rng.bytes(len)
    }

    /// A well-formed transport datagram (no Ethernet header).
    fn flow_datagram(&self, rng: &mut Rng, dir: Dir, v6: bool) -> Vec<u8> {
        let flow = self.flow(rng, dir, v6);
        let payload = self.payload(rng);
        datagram(rng, &flow, dir == Dir::Egress, &payload)
    }

    /// An ICMP error about a live flow (80%) or about anything, quoting
    /// well-formed headers or garbage.
    fn icmp_error(&self, rng: &mut Rng, dir: Dir, v6: bool) -> Vec<u8> {
        let live = if rng.chance(80) {
            self.live_of(rng, v6)
        } else {
            None
        };
        let (from, to, quoted, request) = match (dir, live) {
            // A client about a reply it received: the reply as it arrived.
            (Dir::Egress, Some(m)) => {
                let reply = Flow {
                    src: m.orig.dst,
                    dst: m.orig.src,
                    proto: m.orig.proto,
                    sport: m.orig.dport,
                    dport: m.orig.sport,
                };
                (m.orig.src, m.orig.dst, reply, false)
            }
            // A router about a packet that left translated.
            (Dir::Ingress, Some(m)) => {
                let left = Flow {
                    src: m.nat,
                    dst: m.orig.dst,
                    proto: m.orig.proto,
                    sport: m.nat_port,
                    dport: m.orig.dport,
                };
                let router = if rng.chance(70) {
                    rng.pick(&self.fam(v6).routers)
                } else {
                    m.orig.dst
                };
                (router, m.nat, left, true)
            }
            // A client about anything that came in.
            (Dir::Egress, None) => {
                let f = self.ingress_flow(rng, v6);
                (rng.pick(&self.fam(v6).clients), f.src, f, false)
            }
            // A router about anything that left.
            (Dir::Ingress, None) => {
                let f = self.egress_flow(rng, v6);
                let router = rng.pick(&self.fam(v6).routers);
                (router, rng.pick(&self.fam(v6).egress), f, true)
            }
        };
        let quoted_bytes = if rng.chance(90) {
            quote(rng, &quoted, request)
        } else {
            // Garbage, sometimes with the right version nibble.
            let n = rng.range(0, 80);
            let mut g = rng.bytes(n);
            if let Some(first) = g.first_mut()
                && rng.chance(60)
            {
                *first = if v6 { 0x60 } else { 0x45 };
            }
            g
        };
        icmp_error(rng, from, to, &quoted_bytes)
    }

    fn fragment(&mut self, rng: &mut Rng, dir: Dir, v6: bool) -> Vec<u8> {
        // A waiting later fragment of this direction and family.
        if rng.chance(45)
            && let Some(at) = self
                .pending
                .iter()
                .position(|(d, p)| *d == dir && (p[0] >> 4 == 6) == v6)
        {
            let (_, piece) = self.pending.remove(at).expect("the position was found");
            return piece;
        }
        let mut flow = self.flow(rng, dir, v6);
        if rng.chance(70) {
            flow.proto = UDP;
            if flow.sport == flow.dport {
                flow.dport = rng.pick(&self.world.server_ports);
            }
        }
        let payload_len = rng.range(16, 900);
        let payload = rng.bytes(payload_len);
        let whole = datagram(rng, &flow, dir == Dir::Egress, &payload);
        let first_len = 8 * rng.range(1, 40);
        let rest_len = 8 * rng.range(1, 60);
        let mut pieces = if v6 {
            fragments6(&whole, rng.u64() as u32 % 8, first_len, rest_len)
        } else {
            fragments4(&whole, first_len, rest_len)
        };
        match rng.below(10) {
            // A later fragment of a datagram whose first was never seen.
            0 | 1 if pieces.len() > 1 => pieces.swap_remove(1),
            // Out of order: a later one first, the first one kept for later.
            2 if pieces.len() > 1 => {
                let later = pieces.remove(1);
                self.queue(dir, pieces);
                later
            }
            _ => {
                let first = pieces.remove(0);
                self.queue(dir, pieces);
                first
            }
        }
    }

    fn queue(&mut self, dir: Dir, pieces: Vec<Vec<u8>>) {
        for p in pieces {
            if self.pending.len() == PENDING_MAX {
                self.pending.pop_front();
            }
            self.pending.push_back((dir, p));
        }
    }

    fn ipv4_options(&self, rng: &mut Rng, dir: Dir) -> Vec<u8> {
        let flow = self.flow(rng, dir, false);
        let payload = self.payload(rng);
        let seg = transport(rng, &flow, dir == Dir::Egress, &payload);
        let mut hdr = V4Hdr::plain(rng);
        let words = rng.range(1, 10);
        hdr.options = ipv4_options(rng, words);
        frame(&ip(flow.src, flow.dst, flow.proto, &hdr, &seg))
    }

    fn ipv4_bad_header(&self, rng: &mut Rng, dir: Dir) -> Vec<u8> {
        let mut ip = self.flow_datagram(rng, dir, false);
        let total = ip.len();
        let fix = rng.chance(70);
        match rng.below(6) {
            0 => ip[0] = 0x40 | rng.range(0, 4) as u8,
            1 => ip[0] = 0x40 | rng.range(6, 15) as u8,
            2 => {
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                let len = match rng.below(6) {
                    0 => 0,
                    1 => rng.range(1, ihl - 1),
                    2 => ihl,
                    3 => ihl + rng.range(1, 7),
                    4 => total + rng.range(1, 2000),
                    _ => 0xffff,
                };
                ip[2..4].copy_from_slice(&(len.min(0xffff) as u16).to_be_bytes());
            }
            3 => ip[0] = rng.pick(&[0x05, 0x15, 0x55, 0x65, 0x75, 0xf5]),
            4 => ip[10] ^= 1 << rng.below(8),
            _ => {
                // Flags and offsets: reserved bit, DF with MF, odd offsets.
                let field: u16 = rng.pick(&[0x8000, 0x6000, 0x2001, 0x1fff, 0x3fff, 0xffff]);
                ip[6..8].copy_from_slice(&field.to_be_bytes());
            }
        }
        if fix {
            ipv4_fix_checksum(&mut ip);
        }
        frame(&ip)
    }

    fn ipv6_ext_chain(&self, rng: &mut Rng, dir: Dir) -> Vec<u8> {
        let flow = self.flow(rng, dir, true);
        let payload_len = rng.range(0, 64);
        let payload = rng.bytes(payload_len);
        let seg = transport(rng, &flow, dir == Dir::Egress, &payload);
        let n = match rng.below(10) {
            0..=5 => rng.range(1, 3),
            6..=8 => rng.range(4, 12),
            _ => rng.range(13, 60),
        };
        let mut kinds: Vec<u8> = (0..n)
            .map(|_| rng.pick(&[43, 60, 44, 51, 60, 135]))
            .collect();
        if rng.chance(40) {
            kinds[0] = 0;
        }
        if rng.chance(25) {
            kinds[0] = 44;
        }
        let budget = if rng.chance(10) {
            self.limits.max_len.saturating_sub(ETH_LEN + 40 + seg.len())
        } else {
            rng.range(8 * n, 64 * n)
        };
        let (next, chain) = ext_chain(rng, &kinds, flow.proto, budget);
        let (IpAddr::V6(src), IpAddr::V6(dst)) = (flow.src, flow.dst) else {
            unreachable!("an IPv6 flow");
        };
        let mut body = chain;
        body.extend_from_slice(&seg);
        let mut f = frame(&ipv6(src, dst, next, &body));
        f.truncate(self.limits.max_len);
        f
    }

    fn truncated(&mut self, rng: &mut Rng, dir: Dir) -> Vec<u8> {
        let v6 = rng.chance(50);
        let ip = match rng.below(4) {
            0 => self.icmp_error(rng, dir, v6),
            1 => self.fragment(rng, dir, v6),
            _ => self.flow_datagram(rng, dir, v6),
        };
        let f = frame(&ip);
        // Cut inside the headers: at most 28 bytes past the IP header.
        let head = ETH_LEN
            + if v6 {
                40
            } else {
                usize::from(ip[0] & 0x0f) * 4
            };
        let cut = rng.range(ETH_LEN, (head + 28).min(f.len()));
        // Shorter than the kernel takes, `fit` grows it again with random
        // bytes: a frame with a cut header and garbage after the cut.
        f[..cut].to_vec()
    }

    fn size_edge(&self, rng: &mut Rng, dir: Dir) -> Vec<u8> {
        let v6 = rng.chance(50);
        let ethertype = if v6 { ETH_IPV6 } else { ETH_IPV4 };
        match rng.below(5) {
            // Nothing after the Ethernet header.
            0 => ether(ethertype, &[]),
            // An IP header and nothing else, its length saying so.
            1 => {
                let flow = self.flow(rng, dir, v6);
                frame(&ip(flow.src, flow.dst, flow.proto, &V4Hdr::plain(rng), &[]))
            }
            // The smallest complete segments.
            2 => {
                let flow = self.flow(rng, dir, v6);
                frame(&datagram(rng, &flow, dir == Dir::Egress, &[]))
            }
            // As long as a test run takes (or a few bytes less).
            _ => {
                let flow = self.flow(rng, dir, v6);
                let request = dir == Dir::Egress;
                let short = if rng.chance(50) { 0 } else { rng.range(1, 7) };
                // The same draws as the real build: the same header size.
                let head = ETH_LEN + datagram(&mut rng.clone(), &flow, request, &[]).len();
                let len = self.limits.max_len.saturating_sub(head + short);
                let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
                frame(&datagram(rng, &flow, request, &payload))
            }
        }
    }

    fn cross_family(&self, rng: &mut Rng, dir: Dir) -> Vec<u8> {
        let v6 = rng.chance(50);
        let mut flow = self.flow(rng, dir, v6);
        match rng.below(4) {
            // ICMP of the other family (echo, or an error) in this one.
            0 | 1 => {
                flow.proto = icmp_of(!v6);
                let kind = match (v6, rng.below(3)) {
                    (false, 0) => 128,
                    (false, 1) => 129,
                    (false, _) => 1,
                    (true, 0) => 8,
                    (true, 1) => 0,
                    (true, _) => 3,
                };
                let mut seg = vec![kind, 0, 0, 0];
                seg.extend_from_slice(&flow.sport.to_be_bytes());
                seg.extend_from_slice(&rng.u16().to_be_bytes());
                let n = rng.range(0, 48);
                seg.extend_from_slice(&rng.bytes(n));
                // Its own family's checksum rule, as a sender of that
                // family would have written it.
                l4_checksum(flow.src, flow.dst, flow.proto, &mut seg);
                frame(&ip(
                    flow.src,
                    flow.dst,
                    flow.proto,
                    &V4Hdr::plain(rng),
                    &seg,
                ))
            }
            // Another protocol number.
            2 => {
                let proto = rng.pick(&[0, 2, 4, 41, 47, 50, 51, 59, 132, 136, 255]);
                let n = rng.range(0, 64);
                let body = rng.bytes(n);
                frame(&ip(flow.src, flow.dst, proto, &V4Hdr::plain(rng), &body))
            }
            // The Ethernet type of one family, the packet of the other.
            _ => {
                let n = rng.range(0, 32);
                let payload = rng.bytes(n);
                let ip = datagram(rng, &flow, dir == Dir::Egress, &payload);
                ether(if v6 { ETH_IPV4 } else { ETH_IPV6 }, &ip)
            }
        }
    }

    fn non_ip(&self, rng: &mut Rng, dir: Dir) -> Vec<u8> {
        let v6 = rng.chance(50);
        let ip = self.flow_datagram(rng, dir, v6);
        let inner_type = if v6 { ETH_IPV6 } else { ETH_IPV4 };
        match rng.below(4) {
            0 | 1 => {
                // 802.1Q (or 802.1ad) tag, then the IP packet.
                let mut tagged = vec![0, rng.range(1, 4094) as u8];
                tagged.extend_from_slice(&inner_type.to_be_bytes());
                tagged.extend_from_slice(&ip);
                ether(rng.pick(&[0x8100, 0x88a8]), &tagged)
            }
            2 => ether(0x0806, &rng.bytes(28)),
            _ => {
                let n = rng.range(0, 100);
                let random = rng.u16();
                let ethertype = rng.pick(&[0x88cc, 0x8847, 0x9000, random]);
                ether(ethertype, &rng.bytes(n))
            }
        }
    }

    fn garbage(&self, rng: &mut Rng, dir: Dir) -> Vec<u8> {
        let v6 = rng.chance(50);
        let n = rng.range(0, 200);
        let mut body = rng.bytes(n);
        if !body.is_empty() && rng.chance(70) {
            body[0] = if v6 { 0x60 } else { 0x40 | (body[0] & 0x0f) };
        }
        // Real addresses, so that lookups sometimes hit.
        let flow = self.flow(rng, dir, v6);
        let (src, dst) = if v6 { (8, 24) } else { (12, 16) };
        let alen = if v6 { 16 } else { 4 };
        if rng.chance(50) && body.len() >= dst + alen {
            body[src..src + alen].copy_from_slice(&octets(flow.src));
            body[dst..dst + alen].copy_from_slice(&octets(flow.dst));
        }
        ether(if v6 { ETH_IPV6 } else { ETH_IPV4 }, &body)
    }

    /// Shorter than an Ethernet header, longer than the limit, or an IP
    /// header shorter than the kernel takes.
    fn refused(&self, rng: &mut Rng) -> Vec<u8> {
        let v6 = rng.chance(50);
        let (ethertype, min) = if v6 {
            (ETH_IPV6, self.limits.min_ipv6)
        } else {
            (ETH_IPV4, self.limits.min_ipv4)
        };
        match rng.below(3) {
            0 => {
                let n = rng.range(0, ETH_LEN - 1);
                rng.bytes(n)
            }
            1 if min > 0 => {
                let n = rng.range(0, min - 1);
                let mut body = rng.bytes(n);
                if let Some(first) = body.first_mut() {
                    *first = if v6 { 0x60 } else { 0x45 };
                }
                ether(ethertype, &body)
            }
            _ => {
                let n = self.limits.max_len + rng.range(1, 100);
                let mut f = ether(ethertype, &[]);
                f.extend_from_slice(&rng.bytes(n - ETH_LEN));
                f
            }
        }
    }

    /// A frame of `class` crossing the uplink in `dir`.
    pub fn generate(&mut self, rng: &mut Rng, class: Class, dir: Dir) -> Vec<u8> {
        let f = match class {
            Class::Seed => panic!("seed packets come from `seeds`"),
            Class::Flow4 => frame(&self.flow_datagram(rng, dir, false)),
            Class::Flow6 => frame(&self.flow_datagram(rng, dir, true)),
            Class::IcmpError4 => frame(&self.icmp_error(rng, dir, false)),
            Class::IcmpError6 => frame(&self.icmp_error(rng, dir, true)),
            Class::Ipv4Options => self.ipv4_options(rng, dir),
            Class::Ipv4BadHeader => self.ipv4_bad_header(rng, dir),
            Class::Ipv6ExtChain => self.ipv6_ext_chain(rng, dir),
            Class::Fragment4 => frame(&self.fragment(rng, dir, false)),
            Class::Fragment6 => frame(&self.fragment(rng, dir, true)),
            Class::Truncated => self.truncated(rng, dir),
            Class::SizeEdge => self.size_edge(rng, dir),
            Class::CrossFamily => self.cross_family(rng, dir),
            Class::NonIp => self.non_ip(rng, dir),
            Class::Mutated => {
                let base = match rng.below(8) {
                    0 => self.generate(rng, Class::IcmpError4, dir),
                    1 => self.generate(rng, Class::IcmpError6, dir),
                    2 => self.generate(rng, Class::Fragment4, dir),
                    3 => self.generate(rng, Class::Fragment6, dir),
                    4 => self.ipv4_options(rng, dir),
                    5 => self.ipv6_ext_chain(rng, dir),
                    6 => self.generate(rng, Class::Flow6, dir),
                    _ => self.generate(rng, Class::Flow4, dir),
                };
                mutate(rng, base, ETH_LEN, self.limits.max_len)
            }
            Class::Garbage => self.garbage(rng, dir),
            Class::Refused => return self.refused(rng),
        };
        self.limits.fit(rng, f)
    }
}

/// The flow of a well-formed TCP, UDP or ICMP echo packet.
pub fn flow_of(frame: &[u8]) -> Option<Flow> {
    let ip = outer_view(frame)?;
    let l4 = ip.l4?;
    let src = ip.addr(frame, ip.src)?;
    let dst = ip.addr(frame, ip.dst)?;
    let word = |off: usize| -> Option<u16> {
        Some(u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]))
    };
    let (sport, dport) = match ip.proto {
        TCP | UDP => (word(l4)?, word(l4 + 2)?),
        p if p == ip.icmp_proto() => {
            let id = word(l4 + 4)?;
            (id, id)
        }
        _ => return None,
    };
    Some(Flow {
        src,
        dst,
        proto: ip.proto,
        sport,
        dport,
    })
}
