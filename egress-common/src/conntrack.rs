// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Values of the connection table (keyed by the original outgoing tuple) and
//! the reverse-NAT table (keyed by the translated outgoing tuple).
//!
//! Each direction keeps its own timestamps, flags and counters so that a
//! packet touches exactly one entry; the sweeper combines both.

use crate::flow::{Addr4, Addr6};

/// The flow is not translated (a `bypass` policy): the entry only exists so
/// later packets skip classification.
pub const CT_F_PASS: u16 = 1 << 0;
/// The flow is the gateway's own (its source is a gateway address); the entry
/// reserves the tuple so no client flow is ever given the same one.
pub const CT_F_LOCAL: u16 = 1 << 1;
/// Set the packet mark (`CtEntry::mark`) on every packet of the flow.
pub const CT_F_MARK: u16 = 1 << 2;
/// A TCP FIN was seen in this entry's direction.
pub const CT_F_FIN: u16 = 1 << 3;
/// A TCP RST was seen in this entry's direction.
pub const CT_F_RST: u16 = 1 << 4;
/// A TCP SYN was seen in this entry's direction.
pub const CT_F_SYN: u16 = 1 << 5;

/// Connection table value: how an outgoing flow is translated.
///
/// `P` makes the tail padding explicit: `[u8; 0]` for IPv4, `[u8; 4]` for
/// IPv6 (a type, not a const generic, so family-generic kernel code can
/// name it through an associated type).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry<A, P> {
    /// `bpf_ktime_get_ns()` when the flow was created.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the last outgoing packet.
    pub last_seen_ns: u64,
    /// Outgoing packets and bytes (L3 length).
    pub packets: u64,
    pub bytes: u64,
    /// Translated source address, network byte order.
    pub nat_addr: A,
    /// Translated source port (or ICMP identifier), network byte order.
    pub nat_port_be: u16,
    /// `CT_F_*`.
    pub flags: u16,
    /// Policy counter slot the flow's packets are counted in.
    pub stats_slot: u32,
    /// Packet mark to set when `CT_F_MARK` is present.
    pub mark: u32,
    /// Policy index (in the generation that created the flow), or
    /// `NO_MATCH` for the implicit default.
    pub policy: u16,
    /// Egress pool index that provided `nat_addr` (0 = default egress).
    pub pool: u16,
    /// Egress-address counter slot of `nat_addr`.
    pub addr_slot: u16,
    /// Generation that classified the flow.
    pub generation: u16,
    /// Identity id of the source when the flow was classified (0 = none).
    pub identity: u32,
    /// Uplink every packet of the flow leaves from, copied from its pool
    /// when the flow was created (0: whichever uplink routing chooses).
    pub ifindex: u32,
    pub _reserved: P,
}

pub type CtEntry4 = CtEntry<Addr4, [u8; 0]>;
pub type CtEntry6 = CtEntry<Addr6, [u8; 4]>;
const _: () = assert!(size_of::<CtEntry4>() == 64);
const _: () = assert!(size_of::<CtEntry6>() == 80);
#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, padding explicit (sizes asserted above).
unsafe impl aya::Pod for CtEntry4 {}
#[cfg(feature = "user")]
// SAFETY: as for CtEntry4.
unsafe impl aya::Pod for CtEntry6 {}

/// Reverse-NAT table value: where replies to a translated flow go back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevEntry<A, P> {
    /// `bpf_ktime_get_ns()` of the last reply.
    pub last_seen_ns: u64,
    /// Reply packets and bytes (L3 length).
    pub packets: u64,
    pub bytes: u64,
    /// Original (client) source address, network byte order.
    pub orig_addr: A,
    /// Original source port (or ICMP identifier), network byte order.
    pub orig_port_be: u16,
    /// `CT_F_*` seen on replies.
    pub flags: u16,
    /// Policy counter slot replies are counted in.
    pub stats_slot: u32,
    /// Egress-address counter slot of the translated address.
    pub addr_slot: u16,
    pub _reserved: P,
}

pub type RevEntry4 = RevEntry<Addr4, [u8; 2]>;
pub type RevEntry6 = RevEntry<Addr6, [u8; 6]>;
const _: () = assert!(size_of::<RevEntry4>() == 40);
const _: () = assert!(size_of::<RevEntry6>() == 56);
#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, padding explicit (sizes asserted above).
unsafe impl aya::Pod for RevEntry4 {}
#[cfg(feature = "user")]
// SAFETY: as for RevEntry4.
unsafe impl aya::Pod for RevEntry6 {}

/// Key of the fragment tables: a datagram (RFC 791 identification plus the
/// addresses and protocol), in the direction its fragments travel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey<A> {
    pub src: A,
    pub dst: A,
    /// IPv4 identification (16 bits) or IPv6 fragment identification.
    pub id: u32,
    pub proto: u8,
    /// `FRAG_EGRESS` or `FRAG_INGRESS`.
    pub direction: u8,
    pub _reserved: [u8; 2],
}

pub type FragKey4 = FragKey<Addr4>;
pub type FragKey6 = FragKey<Addr6>;
const _: () = assert!(size_of::<FragKey4>() == 16);
const _: () = assert!(size_of::<FragKey6>() == 40);
#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, no implicit padding (sizes asserted above).
unsafe impl aya::Pod for FragKey4 {}
#[cfg(feature = "user")]
// SAFETY: as for FragKey4.
unsafe impl aya::Pod for FragKey6 {}

pub const FRAG_EGRESS: u8 = 0;
pub const FRAG_INGRESS: u8 = 1;

/// How the later fragments of a datagram are translated: the address that
/// replaces the source (egress) or the destination (ingress).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragEntry<A> {
    pub addr: A,
}
#[cfg(feature = "user")]
// SAFETY: a single integer field.
unsafe impl aya::Pod for FragEntry<Addr4> {}
#[cfg(feature = "user")]
// SAFETY: a single integer array field.
unsafe impl aya::Pod for FragEntry<Addr6> {}

/// Per-CPU scratch space for setting up a new flow: the entries and key are
/// built here rather than on the 512-byte BPF stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scratch<A, PC, PR> {
    pub ct: CtEntry<A, PC>,
    pub rev: RevEntry<A, PR>,
    pub rev_key: crate::flow::Tuple<A>,
}

pub type Scratch4 = Scratch<Addr4, [u8; 0], [u8; 2]>;
pub type Scratch6 = Scratch<Addr6, [u8; 4], [u8; 6]>;
const _: () = assert!(size_of::<Scratch4>() == 64 + 40 + 16);
const _: () = assert!(size_of::<Scratch6>() == 80 + 56 + 40);
#[cfg(feature = "user")]
// SAFETY: repr(C) of Pod parts, no implicit padding (sizes asserted above).
unsafe impl aya::Pod for Scratch4 {}
#[cfg(feature = "user")]
// SAFETY: as for Scratch4.
unsafe impl aya::Pod for Scratch6 {}
