// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Values of the connection table (keyed by the original outgoing tuple) and
//! the reverse-NAT table (keyed by the translated outgoing tuple).
//!
//! Each direction keeps its own timestamps, flags and counters so that a
//! packet touches exactly one entry; the sweeper combines both.

/// The flow is not translated (a `bypass` policy or the gateway's own traffic):
/// the entry only exists so later packets skip classification.
pub const CT_F_PASS: u16 = 1 << 0;
/// The flow is the gateway's own (its source is a gateway address); the entry
/// reserves the tuple so no client flow is ever given the same one.
pub const CT_F_LOCAL: u16 = 1 << 1;
/// Set the packet mark (`CtEntry4::mark`) on every packet of the flow.
pub const CT_F_MARK: u16 = 1 << 2;
/// A TCP FIN was seen in this entry's direction.
pub const CT_F_FIN: u16 = 1 << 3;
/// A TCP RST was seen in this entry's direction.
pub const CT_F_RST: u16 = 1 << 4;
/// A TCP SYN was seen in this entry's direction.
pub const CT_F_SYN: u16 = 1 << 5;

/// Connection table value: how an outgoing IPv4 flow is translated.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry4 {
    /// Translated source address, network byte order.
    pub nat_addr_be: u32,
    /// Translated source port (or ICMP identifier), network byte order.
    pub nat_port_be: u16,
    /// `CT_F_*`.
    pub flags: u16,
    /// Policy counter slot the flow's packets are counted in.
    pub stats_slot: u32,
    /// Packet mark to set when `CT_F_MARK` is present.
    pub mark: u32,
    /// Policy index (in the generation that created the flow) that chose it.
    pub policy: u16,
    /// Egress pool index that provided `nat_addr_be` (0 = default egress).
    pub pool: u16,
    /// Generation that classified the flow.
    pub generation: u32,
    /// `bpf_ktime_get_ns()` when the flow was created.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the last outgoing packet.
    pub last_seen_ns: u64,
    /// Outgoing packets and bytes (L3 length).
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<CtEntry4>() == 56);
#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, no implicit padding (size asserted above).
unsafe impl aya::Pod for CtEntry4 {}

/// Reverse-NAT table value: where replies to a translated flow go back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevEntry4 {
    /// Original (client) source address, network byte order.
    pub orig_addr_be: u32,
    /// Original source port (or ICMP identifier), network byte order.
    pub orig_port_be: u16,
    /// `CT_F_*` seen on replies.
    pub flags: u16,
    /// Policy counter slot replies are counted in.
    pub stats_slot: u32,
    pub _reserved: u32,
    /// `bpf_ktime_get_ns()` of the last reply.
    pub last_seen_ns: u64,
    /// Reply packets and bytes (L3 length).
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<RevEntry4>() == 40);
#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, no implicit padding (size asserted above).
unsafe impl aya::Pod for RevEntry4 {}
