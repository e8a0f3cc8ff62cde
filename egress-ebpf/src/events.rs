// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Flow events for the agent's flow log: a new translation, the first FIN or
//! RST of a translated flow (either direction), a new flow dropped for want
//! of a port. Only while the agent has the flow log switched on: otherwise a
//! new flow pays one array read and an established packet nothing.
//!
//! Events are written field by field straight into the reserved ring-buffer
//! record, so none of them is ever built on the BPF stack.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use egress_common::{
    conntrack::{CT_F_LOCAL, CT_F_PASS, CtEntry, RevEntry},
    events::{
        CONFIG_F_FLOWLOG, CONFIG_F_KLOG, CONFIG_FLAGS, EVENT_END, EVENT_FAILED, EventAddr,
        FlowEvent, closed, closing_reason,
    },
    flow::Tuple,
    stats::Counter,
};

use crate::{
    family::Family,
    maps::{EG_CONFIG, EG_EVENTS},
    stats::count,
};

/// The agent's switches (`CONFIG_F_*`).
#[inline(always)]
fn switches() -> u32 {
    EG_CONFIG.get(CONFIG_FLAGS).map_or(0, |f| *f)
}

/// Whether the agent runs a flow log.
#[inline(always)]
pub fn flow_log_on() -> bool {
    switches() & CONFIG_F_FLOWLOG != 0
}

/// Whether the agent wants kernel log records of rare events.
#[inline(always)]
pub fn klog_on() -> bool {
    switches() & CONFIG_F_KLOG != 0
}

/// An event's kind and reason in one register (see [`write`]).
#[inline(always)]
pub const fn code(kind: u8, reason: u8) -> u32 {
    (kind as u32) << 8 | reason as u32
}

/// Report a flow (`tuple`, its outgoing entry as it stands) if the flow log
/// is on. The gateway's own flows and bypassed ones are not translations
/// and are never reported.
#[inline(always)]
pub fn report<F: Family>(code: u32, tuple: &Tuple<F::Addr>, entry: &CtEntry<F::Addr, F::CtPad>) {
    if entry.flags & (CT_F_PASS | CT_F_LOCAL) == 0 && flow_log_on() {
        write::<F>(code, tuple, entry, None);
    }
}

/// The outgoing side of a flow saw its first FIN or RST (`bits`, `CT_F_*`):
/// report the end, unless the replies' side already did.
///
/// A BPF function of its own: the lookup key stays out of the fast path's frame.
#[inline(never)]
pub fn closing_out<F: Family>(
    tuple: &Tuple<F::Addr>,
    entry: &CtEntry<F::Addr, F::CtPad>,
    bits: u16,
) {
    if entry.flags & (CT_F_PASS | CT_F_LOCAL) != 0 || !flow_log_on() {
        return;
    }
    let key = Tuple::new(
        entry.nat_addr,
        tuple.dst,
        entry.nat_port_be,
        tuple.dport_be,
        tuple.proto,
    );
    // SAFETY: the value is read at once; concurrent writers only bump
    // counters, timestamps and flags.
    let rev = unsafe { F::rev().get(&key) };
    if rev.is_some_and(|r| closed(r.flags)) {
        return;
    }
    write::<F>(code(EVENT_END, closing_reason(bits)), tuple, entry, rev);
}

/// The replies' side of a translated flow saw its first FIN or RST (`bits`):
/// report the end (with the outgoing entry's identity and policy), unless
/// the outgoing side already did. `reply` is the reply packet's tuple.
#[inline(never)]
pub fn closing_in<F: Family>(
    reply: &Tuple<F::Addr>,
    rev: &RevEntry<F::Addr, F::RevPad>,
    bits: u16,
) {
    if rev.flags & (CT_F_PASS | CT_F_LOCAL) != 0 || !flow_log_on() {
        return;
    }
    let key = Tuple::new(
        rev.orig_addr,
        reply.src,
        rev.orig_port_be,
        reply.sport_be,
        reply.proto,
    );
    // SAFETY: as above.
    let Some(entry) = (unsafe { F::ct().get(&key) }) else {
        return;
    };
    if closed(entry.flags) {
        return;
    }
    write::<F>(
        code(EVENT_END, closing_reason(bits)),
        &key,
        entry,
        Some(rev),
    );
}

/// Write one event. A full ring buffer (the agent reads too slowly) only
/// costs the event, which is counted.
///
/// Its own BPF function, called only while the flow log is on; `code`
/// packs kind and reason so that every argument is one register.
#[inline(never)]
fn write<F: Family>(
    code: u32,
    tuple: &Tuple<F::Addr>,
    entry: &CtEntry<F::Addr, F::CtPad>,
    rev: Option<&RevEntry<F::Addr, F::RevPad>>,
) {
    let Some(mut record) = EG_EVENTS.reserve::<FlowEvent>(0) else {
        count(Counter::FlowLogLost);
        return;
    };
    let kind = (code >> 8) as u8;
    let ev = record.as_mut_ptr();
    let (packets_in, bytes_in) = match rev {
        Some(rev) => (rev.packets, rev.bytes),
        None => (0, 0),
    };
    // SAFETY: `ev` points at the reserved record, `size_of::<FlowEvent>()`
    // writable bytes that are ours until submitted; every field (padding
    // included) is written, so the agent never reads stale ring memory.
    unsafe {
        (*ev).time_ns = bpf_ktime_get_ns();
        (*ev).packets_out = if kind == EVENT_END { entry.packets } else { 0 };
        (*ev).bytes_out = if kind == EVENT_END { entry.bytes } else { 0 };
        (*ev).packets_in = packets_in;
        (*ev).bytes_in = bytes_in;
        (*ev).src = tuple.src.words();
        (*ev).dst = tuple.dst.words();
        (*ev).nat_addr = entry.nat_addr.words();
        (*ev).sport_be = tuple.sport_be;
        (*ev).dport_be = tuple.dport_be;
        (*ev).nat_port_be = if kind == EVENT_FAILED {
            0
        } else {
            entry.nat_port_be
        };
        (*ev).flags = entry.flags;
        (*ev).stats_slot = entry.stats_slot;
        (*ev).identity = entry.identity;
        (*ev).addr_slot = entry.addr_slot;
        (*ev).kind = kind;
        (*ev).reason = code as u8;
        (*ev).proto = tuple.proto;
        (*ev).family = <F::Addr as EventAddr>::FAMILY;
        (*ev)._reserved = [0; 2];
    }
    record.submit(0);
}
