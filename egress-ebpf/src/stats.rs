// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Counting into the per-CPU maps: the dataplane's only way of reporting.

use egress_common::stats::{AddrStats, Counter, PolicyStats, Side};

use crate::maps::{EG_ADDR_STATS, EG_POLICY_STATS, EG_STATS};

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = EG_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot of a preallocated array; this program is the
        // only writer on this CPU and runs with preemption disabled.
        unsafe { *slot += 1 };
    }
}

/// Count a packet against its policy and its egress address.
#[inline(always)]
pub fn count_flow_packet(policy_slot: u32, addr_slot: u16, side: Side, bytes: u32, new_flow: bool) {
    if let Some(stats) = EG_POLICY_STATS.get_ptr_mut(policy_slot) {
        // SAFETY: per-CPU slot of a preallocated array, see `count`.
        let stats: &mut PolicyStats = unsafe { &mut *stats };
        stats.flows += u64::from(new_flow);
        stats.traffic.record(side, bytes);
    }
    if let Some(stats) = EG_ADDR_STATS.get_ptr_mut(u32::from(addr_slot)) {
        // SAFETY: per-CPU slot of a preallocated array, see `count`.
        let stats: &mut AddrStats = unsafe { &mut *stats };
        stats.flows += u64::from(new_flow);
        stats.traffic.record(side, bytes);
    }
}

/// A new flow found no free port on this egress address (the drop itself
/// is counted where the error becomes a verdict).
#[inline(always)]
pub fn count_exhausted(addr_slot: u16) {
    if let Some(stats) = EG_ADDR_STATS.get_ptr_mut(u32::from(addr_slot)) {
        // SAFETY: per-CPU slot of a preallocated array, see `count`.
        unsafe { (*stats).exhausted += 1 };
    }
}
