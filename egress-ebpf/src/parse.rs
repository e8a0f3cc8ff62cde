// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Header parsing: the only place that turns packet pointers into values.
//! Every access goes through [`ptr_at`], which bounds-checks against
//! `data_end` the way the verifier requires.

use core::mem::{offset_of, size_of};

use aya_ebpf::programs::TcContext;
use egress_common::flow::{Tuple4, proto};
use network_types::{eth::EthHdr, icmp::Icmpv4Hdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::error::Error;

/// The uplink is an Ethernet device: IP starts right after the MAC header.
pub const L3_OFF: usize = EthHdr::LEN;
pub const IP_CSUM_OFF: usize = L3_OFF + offset_of!(Ipv4Hdr, check);
pub const IP_SRC_OFF: usize = L3_OFF + offset_of!(Ipv4Hdr, src_addr);
pub const IP_DST_OFF: usize = L3_OFF + offset_of!(Ipv4Hdr, dst_addr);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFF: usize = 13;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
/// Bytes that must be in the linear part of the skb for the widest header
/// chain parsed here: Ethernet, IPv4 with maximal options, TCP.
const PULL_LEN: u32 = (EthHdr::LEN + 60 + TcpHdr::LEN) as u32;

/// A pointer to a `T` at `off` bytes into the packet, if the packet is long enough.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, off: usize) -> Result<*const T, Error> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return Err(Error::Malformed);
    }
    Ok((start + off) as *const T)
}

/// Which way a packet crosses the uplink; decides which ICMP echo type opens
/// a flow and on which side of the tuple its identifier goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Egress,
    Ingress,
}

/// The L4 shape of a packet, which decides how (and whether) it translates.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
    /// ICMP echo in the direction that carries the flow's identifier.
    IcmpEcho,
    /// Any other ICMP message; not translatable here.
    IcmpOther,
    /// Any other protocol; not translatable.
    Other,
}

/// What the programs need to know about an IPv4 packet.
pub struct Ipv4Packet {
    pub tuple: Tuple4,
    pub l4: L4,
    /// Offset of the L4 header from the start of the packet.
    pub l4_off: usize,
    /// IP total length, for byte counters.
    pub len: u32,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
}

impl Ipv4Packet {
    /// Offset of the L4 checksum, and whether it covers the IP pseudo-header.
    #[inline(always)]
    pub fn l4_csum(&self) -> Option<(usize, bool)> {
        match self.l4 {
            L4::Tcp => Some((self.l4_off + offset_of!(TcpHdr, check), true)),
            L4::Udp => Some((self.l4_off + offset_of!(UdpHdr, check), true)),
            L4::IcmpEcho => Some((self.l4_off + offset_of!(Icmpv4Hdr, check), false)),
            L4::IcmpOther | L4::Other => None,
        }
    }

    /// Offset of the translated "port": the source port on egress, the
    /// destination port on ingress; the echo identifier for ICMP either way.
    #[inline(always)]
    pub fn port_off(&self, direction: Direction) -> usize {
        match (self.l4, direction) {
            (L4::IcmpEcho, _) => self.l4_off + offset_of!(Icmpv4Hdr, data),
            (_, Direction::Egress) => self.l4_off,
            (_, Direction::Ingress) => self.l4_off + 2,
        }
    }

    pub fn translatable(&self) -> bool {
        matches!(self.l4, L4::Tcp | L4::Udp | L4::IcmpEcho)
    }
}

/// The network-layer protocol of a frame.
pub enum Frame {
    Ipv4(Ipv4Packet),
    Ipv6,
    NotIp,
}

/// Parse the headers of a frame on the uplink.
#[inline(always)]
pub fn frame(ctx: &TcContext, direction: Direction) -> Result<Frame, Error> {
    // Headers may sit in paged data on some drivers; make the part we parse
    // linear so direct packet access can reach it. Cheap when already linear.
    if ctx.data() + (PULL_LEN as usize) > ctx.data_end() {
        let want = if ctx.len() < PULL_LEN {
            ctx.len()
        } else {
            PULL_LEN
        };
        // Failure is not fatal: the bounds checks below decide.
        let _ = ctx.pull_data(want);
    }
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked that a whole EthHdr lies before data_end.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    match ether_type {
        ETH_P_IP => ipv4(ctx, direction).map(Frame::Ipv4),
        ETH_P_IPV6 => Ok(Frame::Ipv6),
        _ => Ok(Frame::NotIp),
    }
}

#[inline(always)]
fn ipv4(ctx: &TcContext, direction: Direction) -> Result<Ipv4Packet, Error> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, L3_OFF)?;
    // SAFETY: ptr_at checked that a whole Ipv4Hdr lies before data_end.
    let ip = unsafe { &*ip };
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Error::Malformed);
    }
    let len = u16::from_be_bytes(ip.tot_len);
    if usize::from(len) < ihl {
        return Err(Error::Malformed);
    }
    if u16::from_be_bytes(ip.frags) & (IP_MF | IP_OFFSET) != 0 {
        return Err(Error::Fragment);
    }
    let src_be = u32::from_ne_bytes(ip.src_addr);
    let dst_be = u32::from_ne_bytes(ip.dst_addr);
    let l4_off = L3_OFF + ihl;
    let protocol = ip.proto;

    let (l4, sport_be, dport_be, tcp_flags) = match protocol {
        proto::TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, l4_off)?;
            // SAFETY: ptr_at checked that a whole TcpHdr lies before data_end.
            let tcp = unsafe { &*tcp };
            let flags: *const u8 = ptr_at(ctx, l4_off + TCP_FLAGS_OFF)?;
            // SAFETY: ptr_at checked the byte lies before data_end.
            let flags = unsafe { *flags };
            (
                L4::Tcp,
                u16::from_ne_bytes(tcp.source),
                u16::from_ne_bytes(tcp.dest),
                flags,
            )
        }
        proto::UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, l4_off)?;
            // SAFETY: ptr_at checked that a whole UdpHdr lies before data_end.
            let udp = unsafe { &*udp };
            (
                L4::Udp,
                u16::from_ne_bytes(udp.src),
                u16::from_ne_bytes(udp.dst),
                0,
            )
        }
        proto::ICMP => {
            let icmp: *const Icmpv4Hdr = ptr_at(ctx, l4_off)?;
            // SAFETY: ptr_at checked that a whole Icmpv4Hdr lies before data_end.
            let icmp = unsafe { &*icmp };
            let id = u16::from_ne_bytes([icmp.data[0], icmp.data[1]]);
            match (icmp.type_, direction) {
                (ICMP_ECHO_REQUEST, Direction::Egress) => (L4::IcmpEcho, id, 0, 0),
                (ICMP_ECHO_REPLY, Direction::Ingress) => (L4::IcmpEcho, 0, id, 0),
                _ => (L4::IcmpOther, 0, 0, 0),
            }
        }
        _ => (L4::Other, 0, 0, 0),
    };

    Ok(Ipv4Packet {
        tuple: Tuple4::new(src_be, dst_be, sport_be, dport_be, protocol),
        l4,
        l4_off,
        len: u32::from(len),
        tcp_flags,
    })
}
