// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Leaving from the uplink a flow's pool names. Routing chose the uplink the
//! packet is on; a flow whose pool names another one is moved there with a
//! neighbour-aware redirect (bpf_redirect_neigh without next-hop
//! parameters): the kernel looks the route up again, limited to the target
//! uplink and keyed by the packet's translated source, and fills in the
//! link-layer address of that route's next hop.
//!
//! A redirected packet then passes the egress program of its new uplink as
//! well, already translated: that run must let it go untouched. The redirect
//! marks the packet in `skb->tc_index` (read only by TC classifiers; nothing
//! between the two egress hooks writes it), and the second run trusts the
//! mark only once the packet's tuple is found in the reverse-NAT table, so a
//! stray value (another TC user's class id) can never let an untranslated
//! packet out.

use aya_ebpf::{helpers::bpf_redirect_neigh, programs::TcContext};
use egress_common::stats::Counter;

use crate::{nat::PASS, stats::count};

/// `skb->tc_index` of a packet this program redirected (an arbitrary
/// value: the reverse-NAT lookup, not the mark, is what decides).
const MARK: u32 = 0xeb9f;

/// The verdict for a translated packet of a flow that must leave from
/// `ifindex` (0: from whichever uplink routing chose). Costs one compare for
/// flows whose pool names no interface, or the uplink the packet is on.
#[inline(always)]
pub fn leave(ctx: &TcContext, ifindex: u32) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: the program's context, valid for the whole run; a plain read
    // of a field TC programs may read.
    if ifindex == 0 || ifindex == unsafe { (*skb).ifindex } {
        return PASS;
    }
    // SAFETY: as above; TC programs may write tc_index.
    unsafe { (*skb).tc_index = MARK };
    count(Counter::Redirected);
    // SAFETY: no next-hop parameters (null, length 0) and no flags: the
    // kernel does the route lookup itself. The helper only records the
    // target; the redirect happens once the program has returned its
    // result (TC_ACT_REDIRECT, or TC_ACT_SHOT for invalid arguments).
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// Whether the packet carries the redirect mark. The caller confirms it
/// (the translated tuple has a reverse-NAT entry) before trusting it.
#[inline(always)]
pub fn marked(ctx: &TcContext) -> bool {
    // SAFETY: the program's context, valid for the whole run.
    unsafe { (*ctx.skb.skb).tc_index == MARK }
}

/// Remove the mark of a confirmed redirected packet, so nothing after this
/// hook sees our value.
#[inline(always)]
pub fn unmark(ctx: &TcContext) {
    // SAFETY: the program's context; TC programs may write tc_index.
    unsafe { (*ctx.skb.skb).tc_index = 0 };
}
