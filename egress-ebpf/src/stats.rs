// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Counting into the per-CPU maps: the dataplane's only way of reporting.

use egress_common::stats::{Counter, PolicyStats};

use crate::maps::{EG_POLICY_STATS, EG_STATS};

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = EG_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot of a preallocated array; this program is the
        // only writer on this CPU and runs with preemption disabled.
        unsafe { *slot += 1 };
    }
}

/// Which side of a flow a packet belongs to, for per-policy counters.
#[derive(Clone, Copy)]
pub enum Side {
    Out,
    In,
}

#[inline(always)]
pub fn count_policy(slot: u32, side: Side, bytes: u32, new_flow: bool) {
    let Some(stats) = EG_POLICY_STATS.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: per-CPU slot of a preallocated array, see `count`.
    let stats: &mut PolicyStats = unsafe { &mut *stats };
    if new_flow {
        stats.flows += 1;
    }
    match side {
        Side::Out => {
            stats.packets_out += 1;
            stats.bytes_out += u64::from(bytes);
        }
        Side::In => {
            stats.packets_in += 1;
            stats.bytes_in += u64::from(bytes);
        }
    }
}
