// SPDX-License-Identifier: GPL-2.0 OR MIT
//! What the dataplane reports besides counters: flow events (new
//! translations, their ends, port-allocation failures) through the
//! [`crate::maps::EVENTS`] ring buffer, and the runtime switches in
//! [`crate::maps::CONFIG`] that turn them (and kernel log records) on.
//!
//! Both are off unless the agent switches them on, so the per-packet path
//! pays one array read per new flow and nothing per established packet.

use crate::flow::{Addr4, Addr6};

/// Slot of [`crate::maps::CONFIG`] holding the `CONFIG_F_*` bits.
pub const CONFIG_FLAGS: u32 = 0;
/// Slots of [`crate::maps::CONFIG`] (room for later switches).
pub const CONFIG_SLOTS: u32 = 4;
/// Emit flow events into the ring buffer (the agent runs a flow log).
pub const CONFIG_F_FLOWLOG: u32 = 1 << 0;
/// Emit kernel log records (aya-log) for rare events: drops of new flows,
/// rewrite failures, packets of kinds that cannot be handled.
pub const CONFIG_F_KLOG: u32 = 1 << 1;

/// `FlowEvent::kind`: a flow was translated (its first packet).
pub const EVENT_NEW: u8 = 1;
/// `FlowEvent::kind`: a translated flow ended.
pub const EVENT_END: u8 = 2;
/// `FlowEvent::kind`: a new flow could not be translated and was dropped.
pub const EVENT_FAILED: u8 = 3;

/// `FlowEvent::reason` of `EVENT_NEW`.
pub const REASON_TRANSLATED: u8 = 1;
/// `FlowEvent::reason` of `EVENT_END` from the dataplane: the first TCP FIN
/// of the flow, in either direction.
pub const REASON_FIN: u8 = 2;
/// ... the first TCP RST of the flow, in either direction.
pub const REASON_RST: u8 = 3;
/// ... from the agent: the flow was idle past its timeout.
pub const REASON_EXPIRED: u8 = 4;
/// ... from the agent: the flow was ended on purpose (its egress address
/// went down or was removed, or a reload moved its policy elsewhere).
pub const REASON_FLUSHED: u8 = 5;
/// `FlowEvent::reason` of `EVENT_FAILED`: no free port towards the
/// destination after the bounded search.
pub const REASON_PORT_EXHAUSTED: u8 = 6;

/// One flow event. Fixed size, one layout for both families: IPv4
/// addresses use the first word (network byte order) and leave the other
/// three zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when it happened.
    pub time_ns: u64,
    /// Outgoing packets and bytes of the flow so far (ends only).
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Reply packets and bytes so far (ends only).
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Original tuple, network byte order.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Translated source address, network byte order.
    pub nat_addr: [u32; 4],
    pub sport_be: u16,
    pub dport_be: u16,
    /// Translated source port, network byte order (0 for `EVENT_FAILED`).
    pub nat_port_be: u16,
    /// `CT_F_*` of the outgoing entry.
    pub flags: u16,
    /// Policy counter slot: names the policy (stable across reloads).
    pub stats_slot: u32,
    /// Identity id of the source (0: none).
    pub identity: u32,
    /// Egress-address counter slot of `nat_addr`.
    pub addr_slot: u16,
    /// `EVENT_*`.
    pub kind: u8,
    /// `REASON_*`.
    pub reason: u8,
    /// IP protocol number.
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    pub _reserved: [u8; 2],
}
const _: () = assert!(size_of::<FlowEvent>() == 112);
#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, no implicit padding (size asserted above).
unsafe impl aya::Pod for FlowEvent {}

/// An address as the four words of an event.
pub trait EventAddr: Copy {
    /// `FlowEvent::family`.
    const FAMILY: u8;
    fn words(self) -> [u32; 4];
}

impl EventAddr for Addr4 {
    const FAMILY: u8 = 4;
    #[inline(always)]
    fn words(self) -> [u32; 4] {
        [self, 0, 0, 0]
    }
}

impl EventAddr for Addr6 {
    const FAMILY: u8 = 6;
    #[inline(always)]
    fn words(self) -> [u32; 4] {
        self
    }
}

/// The `EVENT_END` reason for the TCP flags (`CT_F_*`) that ended a flow:
/// a reset wins over a FIN in the same packet.
#[inline(always)]
pub const fn closing_reason(flags: u16) -> u8 {
    if flags & crate::conntrack::CT_F_RST != 0 {
        REASON_RST
    } else {
        REASON_FIN
    }
}

/// Whether a flow with these `CT_F_*` (either direction) has been reported
/// closed by the dataplane: its end is not reported again when it expires.
#[inline(always)]
pub const fn closed(flags: u16) -> bool {
    flags & (crate::conntrack::CT_F_FIN | crate::conntrack::CT_F_RST) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::{CT_F_FIN, CT_F_RST, CT_F_SYN};

    #[test]
    fn event_addr_ipv4_first_word_rest_zero() {
        assert_eq!(0x0a00_0002u32.words(), [0x0a00_0002, 0, 0, 0]);
        assert_eq!([1, 2, 3, 4].words(), [1, 2, 3, 4]);
        assert_eq!(<Addr4 as EventAddr>::FAMILY, 4);
        assert_eq!(<Addr6 as EventAddr>::FAMILY, 6);
    }

    #[test]
    fn closing_reason_rst_wins_over_fin() {
        assert_eq!(closing_reason(CT_F_FIN), REASON_FIN);
        assert_eq!(closing_reason(CT_F_RST), REASON_RST);
        assert_eq!(closing_reason(CT_F_FIN | CT_F_RST), REASON_RST);
        assert!(closed(CT_F_SYN | CT_F_FIN));
        assert!(!closed(CT_F_SYN));
    }
}
