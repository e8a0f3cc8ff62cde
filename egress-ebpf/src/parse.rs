// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Header parsing: the only place that turns packet pointers into values.
//! Every access goes through [`ptr_at`], which bounds-checks against
//! `data_end` the way the verifier requires.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use egress_common::flow::{Addr4, Tuple, proto};
use network_types::eth::EthHdr;

use crate::{
    error::Error,
    family::{Family, Ipv4, Ipv6},
};

/// The uplink is an Ethernet device: IP starts right after the MAC header.
pub const L3_OFF: usize = EthHdr::LEN;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFF: usize = 13;
const UDP_HEADER_LEN: usize = 8;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
/// IPv6 Fragment extension header.
const IPPROTO_FRAGMENT: u8 = 44;
/// Bytes that must be in the linear part of the skb for the widest header
/// chain parsed here (IPv6 with extension headers, or an ICMP error quoting
/// one); the rest is read only if present.
const PULL_LEN: u32 = 256;

/// Deepest offset any header is read at. Restating it here gives the
/// verifier a bound for offsets that travelled through memory or a
/// function argument, where it loses track of their range.
const MAX_HEADER_OFF: usize = 2048;

/// A pointer to a `T` at `off` bytes into the packet, if the packet is long enough.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, off: usize) -> Result<*const T, Error> {
    if off > MAX_HEADER_OFF {
        return Err(Error::Malformed);
    }
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return Err(Error::Malformed);
    }
    Ok((start + off) as *const T)
}

/// A writable pointer to a `T` at `off`, checked as [`ptr_at`] checks. The
/// verifier gives a program with direct writes a prologue that makes the
/// skb's data private first.
#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &TcContext, off: usize) -> Result<*mut T, Error> {
    ptr_at::<T>(ctx, off).map(|p| p.cast_mut())
}

/// A copy of the `T` at `off` through `bpf_skb_load_bytes`: no direct
/// packet access, so nothing for LLVM to reorder past a bounds check. For
/// rare paths that read at offsets computed from other headers.
///
/// No range check here (the helper checks against the skb itself): a
/// comparison the verifier can decide would make `off` precise again and
/// undo the point of using the helper.
#[inline(always)]
pub fn load<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, Error> {
    ctx.load::<T>(off).map_err(|_| Error::Malformed)
}

/// A copy of the `T` at `off` (packet data may be unaligned).
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, Error> {
    let p: *const T = ptr_at(ctx, off)?;
    // SAFETY: ptr_at checked that a whole T lies before data_end.
    Ok(unsafe { p.read_unaligned() })
}

/// Which way a packet crosses the uplink; decides which ICMP echo type opens
/// a flow and on which side of the tuple its identifier goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Egress,
    Ingress,
}

/// The L4 shape of a packet, which decides how (and whether) it translates.
///
/// Fieldless on purpose, like [`Frag`]: copying an enum whose inactive
/// variant's payload is undefined makes LLVM store whatever register it
/// likes, and the verifier rejects such stores (of packet pointers, say).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
    /// ICMP echo in the direction that carries the flow's identifier.
    IcmpEcho,
    /// An ICMP error; the quoted packet starts at `Packet::inner`.
    IcmpError,
    /// Any other ICMP message; not translatable.
    IcmpOther,
    /// Any other protocol (or a fragment without its L4 header).
    Other,
}

/// Where a packet stands in its datagram (its id is `Packet::frag_id`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    Whole,
    /// The first fragment: it carries the L4 header.
    First,
    /// A later fragment: no L4 header; the first one's translation applies.
    Later,
}

/// What the programs need to know about a packet.
#[derive(Clone, Copy)]
pub struct Packet<F: Family> {
    pub tuple: Tuple<F::Addr>,
    pub l4: L4,
    /// Offset of the L4 header from the start of the packet.
    pub l4_off: u16,
    /// IP length (header included), for byte counters.
    pub len: u32,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
    pub frag: Frag,
    /// Datagram id of a fragment (IPv4 identification, IPv6 fragment id).
    pub frag_id: u32,
    /// Offset of the packet an ICMP error quotes (0 otherwise).
    pub inner: u16,
}

impl<F: Family> Default for Packet<F> {
    fn default() -> Self {
        Self {
            tuple: Tuple::default(),
            l4: L4::Other,
            l4_off: 0,
            len: 0,
            tcp_flags: 0,
            frag: Frag::Whole,
            frag_id: 0,
            inner: 0,
        }
    }
}

impl<F: Family> Packet<F> {
    /// Offset of the L4 checksum, and whether it covers the IP pseudo-header.
    #[inline(always)]
    pub fn l4_csum(&self) -> Option<(usize, bool)> {
        l4_csum_at(
            self.tuple.proto,
            usize::from(self.l4_off),
            self.l4,
            F::ICMP_PSEUDO,
        )
    }

    /// Offset of the translated "port": the source port on egress, the
    /// destination port on ingress; the echo identifier for ICMP either way.
    #[inline(always)]
    pub fn port_off(&self, direction: Direction) -> usize {
        let l4 = usize::from(self.l4_off);
        match (self.l4, direction) {
            (L4::IcmpEcho, _) => l4 + 4,
            (_, Direction::Egress) => l4,
            (_, Direction::Ingress) => l4 + 2,
        }
    }

    /// Whether the flow can be translated (has ports or an echo identifier).
    pub fn translatable(&self) -> bool {
        matches!(self.l4, L4::Tcp | L4::Udp | L4::IcmpEcho)
    }
}

/// The checksum of an L4 header at `l4_off`: its offset, and whether it
/// covers the pseudo-header (ICMPv4's does not, ICMPv6's does).
#[inline(always)]
pub fn l4_csum_at(protocol: u8, l4_off: usize, l4: L4, icmp_pseudo: bool) -> Option<(usize, bool)> {
    match (protocol, l4) {
        (proto::TCP, L4::Tcp) => Some((l4_off + 16, true)),
        (proto::UDP, L4::Udp) => Some((l4_off + 6, true)),
        (_, L4::IcmpEcho | L4::IcmpError) => Some((l4_off + 2, icmp_pseudo)),
        _ => None,
    }
}

/// The network-layer protocol of a frame.
pub enum Frame {
    Ipv4,
    Ipv6,
    NotIp,
}

/// The network-layer protocol of a frame on the uplink.
#[inline(always)]
pub fn frame(ctx: &TcContext) -> Result<Frame, Error> {
    // Headers may sit in paged data on some drivers; make the part we parse
    // linear so direct packet access can reach it. The helper is not free
    // (it may unclone the skb and always recomputes the data pointers), so
    // it is called only when the linear part is really short of it.
    let want = if ctx.len() < PULL_LEN {
        ctx.len()
    } else {
        PULL_LEN
    };
    if ctx.data() + (want as usize) > ctx.data_end() {
        // Failure is not fatal: the bounds checks decide.
        let _ = ctx.pull_data(want);
    }
    Ok(match u16::from_be(read::<u16>(ctx, 12)?) {
        ETH_P_IP => Frame::Ipv4,
        ETH_P_IPV6 => Frame::Ipv6,
        _ => Frame::NotIp,
    })
}

/// Parse the IP packet (or quoted packet) at `l3` into `out`.
///
/// A separate BPF function writing through a pointer: the parsed packet
/// lives in the caller's frame and the parser's temporaries in its own,
/// which keeps every frame of the call chain small.
#[inline(never)]
pub fn packet<F: Family>(
    ctx: &TcContext,
    l3: usize,
    direction: Direction,
    out: &mut Packet<F>,
) -> Result<(), Error> {
    F::parse(ctx, l3, direction, out)
}

/// How header bytes past the fixed IP header are read. `Direct` is packet
/// access (cheapest). `Helper` goes through `bpf_skb_load_bytes`: offsets
/// given to a helper are not tracked precisely by the verifier, so paths
/// that reach the same point at different offsets (IPv6 extension-header
/// chains) merge instead of multiplying.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reads {
    Direct,
    Helper,
}

#[inline(always)]
fn get<T: Copy>(ctx: &TcContext, off: usize, reads: Reads) -> Result<T, Error> {
    match reads {
        Reads::Direct => read(ctx, off),
        Reads::Helper => load(ctx, off),
    }
}

/// The L4 part of a packet once the IP header (and options/extensions)
/// is behind: kind, ports or echo identifier, TCP flags.
///
/// `icmp` is the ICMP protocol of the packet's family: ICMP in IPv6 or
/// ICMPv6 in IPv4 is no ICMP message (its checksum rules differ), just
/// another protocol.
#[inline(always)]
fn l4(
    ctx: &TcContext,
    protocol: u8,
    l4_off: usize,
    direction: Direction,
    reads: Reads,
    quoted: bool,
    icmp: u8,
) -> Result<(L4, u16, u16, u8), Error> {
    let (echo_request, echo_reply, first_error, last_error) = match protocol {
        proto::ICMP => (8, 0, 0, 0),
        _ => (128, 129, 1, 4),
    };
    Ok(match protocol {
        proto::TCP => {
            let ports: [u16; 2] = get(ctx, l4_off, reads)?;
            // A packet quoted by an ICMP error may keep only the first 8 bytes
            // of its TCP header; a packet of our own must have all 20.
            let flags: u8 = if quoted {
                get(ctx, l4_off + TCP_FLAGS_OFF, reads).unwrap_or(0)
            } else {
                get::<[u8; 20]>(ctx, l4_off, reads)?[TCP_FLAGS_OFF]
            };
            (L4::Tcp, ports[0], ports[1], flags)
        }
        proto::UDP => {
            let ports: [u16; 2] = get(ctx, l4_off, reads)?;
            // A packet of our own must have the whole header: its checksum
            // is rewritten with the port. A quoted one may stop after the
            // ports. (Checked against the length, not read: no stack.)
            if !quoted && l4_off + UDP_HEADER_LEN > ctx.len() as usize {
                return Err(Error::Malformed);
            }
            (L4::Udp, ports[0], ports[1], 0)
        }
        p if p == icmp => {
            let head: [u8; 8] = get(ctx, l4_off, reads)?;
            let id = u16::from_ne_bytes([head[4], head[5]]);
            let kind = head[0];
            let is_error = if protocol == proto::ICMP {
                // Destination unreachable, time exceeded, parameter problem.
                kind == 3 || kind == 11 || kind == 12
            } else {
                kind >= first_error && kind <= last_error
            };
            if is_error {
                (L4::IcmpError, 0, 0, 0)
            } else if kind == echo_request && direction == Direction::Egress {
                (L4::IcmpEcho, id, 0, 0)
            } else if kind == echo_reply && direction == Direction::Ingress {
                (L4::IcmpEcho, 0, id, 0)
            } else {
                (L4::IcmpOther, 0, 0, 0)
            }
        }
        _ => (L4::Other, 0, 0, 0),
    })
}

/// Parse an IPv4 header at `l3` (the packet itself, or one quoted in an
/// ICMP error) into `out`, in place (no temporary copy on the stack).
#[inline(always)]
pub fn ipv4(
    ctx: &TcContext,
    l3: usize,
    direction: Direction,
    out: &mut Packet<Ipv4>,
) -> Result<(), Error> {
    let head: [u8; 20] = read(ctx, l3)?;
    let ihl = usize::from(head[0] & 0x0f) * 4;
    if head[0] >> 4 != 4 || ihl < 20 {
        return Err(Error::Malformed);
    }
    let len = u16::from_be_bytes([head[2], head[3]]);
    if usize::from(len) < ihl {
        return Err(Error::Malformed);
    }
    let frags = u16::from_be_bytes([head[6], head[7]]);
    out.frag = if frags & IP_OFFSET != 0 {
        Frag::Later
    } else if frags & IP_MF != 0 {
        Frag::First
    } else {
        Frag::Whole
    };
    out.frag_id = u32::from(u16::from_be_bytes([head[4], head[5]]));
    let protocol = head[9];
    let src: Addr4 = u32::from_ne_bytes([head[12], head[13], head[14], head[15]]);
    let dst: Addr4 = u32::from_ne_bytes([head[16], head[17], head[18], head[19]]);
    let l4_off = l3 + ihl;
    let (l4, sport, dport, tcp_flags) = if out.frag == Frag::Later {
        (L4::Other, 0, 0, 0)
    } else {
        l4(
            ctx,
            protocol,
            l4_off,
            direction,
            Reads::Direct,
            l3 != L3_OFF,
            proto::ICMP,
        )?
    };
    out.tuple = Tuple::new(src, dst, sport, dport, protocol);
    out.l4 = l4;
    out.l4_off = l4_off as u16;
    out.len = u32::from(len);
    out.tcp_flags = tcp_flags;
    out.inner = if l4 == L4::IcmpError {
        (l4_off + 8) as u16
    } else {
        0
    };
    Ok(())
}

/// Parse an IPv6 header at `l3` (and a Fragment header after it) into
/// `out`, in place.
#[inline(always)]
pub fn ipv6(
    ctx: &TcContext,
    l3: usize,
    direction: Direction,
    out: &mut Packet<Ipv6>,
) -> Result<(), Error> {
    // The fixed header as ten words read through the one checked pointer,
    // straight into registers (a copy would cost 40 bytes of stack).
    let p: *const [u32; 10] = ptr_at(ctx, l3)?;
    // SAFETY: ptr_at checked that 40 bytes lie before data_end; every read
    // below is an unaligned read of one of those ten words.
    let word = |i: usize| unsafe { p.cast::<u32>().add(i).read_unaligned() };
    let first = u32::from_be(word(0));
    if first >> 28 != 6 {
        return Err(Error::Malformed);
    }
    let second = u32::from_be(word(1));
    let len = (second >> 16) + 40;
    let mut next = (second >> 8) as u8;
    // Into `out` at once: kept in registers across the helper calls below
    // they would be spilled to (scarce) stack.
    out.tuple.src = [word(2), word(3), word(4), word(5)];
    out.tuple.dst = [word(6), word(7), word(8), word(9)];
    let mut off = l3 + 40;
    out.frag = Frag::Whole;
    out.frag_id = 0;
    // Only a Fragment header is walked. Other extension headers (hop-by-hop,
    // routing, destination options, AH) are rare in forwarded client
    // traffic, and every header allowed here multiplies what the verifier
    // has to explore; such packets count as an untranslatable protocol
    // (passed under "bypass", dropped and counted under translation).
    if next == IPPROTO_FRAGMENT {
        let h: [u8; 8] = load(ctx, off)?;
        next = h[0];
        let offset_flags = u16::from_be_bytes([h[2], h[3]]);
        out.frag_id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        out.frag = if offset_flags & 0xfff8 != 0 {
            Frag::Later
        } else if offset_flags & 1 != 0 {
            Frag::First
        } else {
            // An atomic fragment: a whole datagram.
            Frag::Whole
        };
        off += 8;
    }
    let (l4, sport, dport, tcp_flags) = if out.frag == Frag::Later {
        (L4::Other, 0, 0, 0)
    } else {
        l4(
            ctx,
            next,
            off,
            direction,
            Reads::Helper,
            l3 != L3_OFF,
            proto::ICMPV6,
        )?
    };
    out.tuple.sport_be = sport;
    out.tuple.dport_be = dport;
    out.tuple.proto = next;
    out.l4 = l4;
    out.l4_off = off as u16;
    out.len = len;
    out.tcp_flags = tcp_flags;
    out.inner = if l4 == L4::IcmpError {
        (off + 8) as u16
    } else {
        0
    };
    Ok(())
}
