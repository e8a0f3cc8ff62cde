// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Fragments of translated datagrams. Only the first fragment carries the
//! ports, so its outcome (the address the datagram leaves with, or comes
//! back to) is recorded by datagram id, and later fragments take the same
//! address. A later fragment whose first was not seen (out of order, or
//! evicted) cannot be translated: it is dropped and counted on egress, and
//! passed untouched on ingress (it belongs to no translated flow we know).

use aya_ebpf::programs::TcContext;
use egress_common::{
    conntrack::{FRAG_EGRESS, FRAG_INGRESS, FragEntry, FragKey},
    flow::Tuple,
    stats::Counter,
};

use crate::{
    error::Error,
    family::{Csums, Family, outer},
    klog,
    nat::{PASS, failed, ip_csum, not_ours},
    parse::{L3_OFF, Packet},
    stats::count,
};

#[inline(always)]
fn key<F: Family>(direction: u8, tuple: &Tuple<F::Addr>, id: u32) -> FragKey<F::Addr> {
    FragKey {
        src: tuple.src,
        dst: tuple.dst,
        id,
        proto: tuple.proto,
        direction,
        _reserved: [0; 2],
    }
}

/// Remember how a first fragment was translated: `addr` replaces the source
/// (egress) or the destination (ingress) of the datagram's other fragments.
/// Its own BPF function, so the key's bytes stay out of callers' frames.
#[inline(never)]
pub fn record<F: Family>(direction: u8, tuple: &Tuple<F::Addr>, id: u32, addr: &F::Addr) {
    // An LRU map: under pressure the oldest datagrams are forgotten, and
    // their late fragments are counted as untranslatable.
    let _ = F::frags().insert(
        &key::<F>(direction, tuple, id),
        &FragEntry { addr: *addr },
        0,
    );
}

/// A later fragment leaving through the uplink (a BPF function: returns
/// the verdict, see nat.rs).
#[inline(never)]
pub fn egress_later<F: Family>(ctx: &TcContext, pkt: &Packet<F>) -> i32 {
    egress(ctx, pkt, pkt.frag_id).unwrap_or_else(|err| klog::egress_drop(ctx, err))
}

#[inline(always)]
fn egress<F: Family>(ctx: &TcContext, pkt: &Packet<F>, id: u32) -> Result<i32, Error> {
    let Some(entry) = F::frags().get_ptr(&key::<F>(FRAG_EGRESS, &pkt.tuple, id)) else {
        // The gateway's own datagrams are not translated.
        if F::is_local(&pkt.tuple.src) {
            return Ok(PASS);
        }
        return Err(Error::Fragment);
    };
    // SAFETY: a map value valid for this run; only read.
    let addr = unsafe { (*entry).addr };
    if addr != pkt.tuple.src {
        let csums = Csums {
            ip: ip_csum::<F>(L3_OFF),
            ..Csums::default()
        };
        F::rewrite_addr(ctx, outer(F::SRC), pkt.tuple.src, addr, csums)
            .map_err(|e| failed(ctx, e))?;
        count(Counter::FragmentsTranslated);
    }
    Ok(PASS)
}

/// A later fragment of a reply arriving on the uplink.
#[inline(never)]
pub fn ingress_later<F: Family>(ctx: &TcContext, pkt: &Packet<F>) -> i32 {
    ingress(ctx, pkt, pkt.frag_id).unwrap_or_else(Error::ingress_action)
}

#[inline(always)]
fn ingress<F: Family>(ctx: &TcContext, pkt: &Packet<F>, id: u32) -> Result<i32, Error> {
    let Some(entry) = F::frags().get_ptr(&key::<F>(FRAG_INGRESS, &pkt.tuple, id)) else {
        return not_ours();
    };
    // SAFETY: a map value valid for this run; only read.
    let addr = unsafe { (*entry).addr };
    let csums = Csums {
        ip: ip_csum::<F>(L3_OFF),
        ..Csums::default()
    };
    F::rewrite_addr(ctx, outer(F::DST), pkt.tuple.dst, addr, csums).map_err(|e| failed(ctx, e))?;
    count(Counter::FragmentsTranslated);
    Ok(PASS)
}
