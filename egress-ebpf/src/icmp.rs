// SPDX-License-Identifier: GPL-2.0 OR MIT
//! ICMP errors about translated flows (destination unreachable, including
//! fragmentation needed, time exceeded, parameter problem; for IPv6 also
//! packet too big). They quote the packet that caused them, so the quoted
//! headers are translated too; otherwise path-MTU discovery and traceroute
//! break behind the gateway.
//!
//! Checksums: the outer IP header (IPv4) and, for ICMPv6, the pseudo-header
//! part of the ICMP checksum cover the outer address. The ICMP checksum
//! also covers every quoted byte as plain payload, including the quoted
//! headers' own checksums, so each quoted change is applied to the quoted
//! checksum and then, together with that checksum's own change, to the
//! ICMP checksum. Those updates use `l3_csum_replace`, which applies
//! unconditionally (they are not the skb's L4 checksum).

use aya_ebpf::programs::TcContext;
use egress_common::{conntrack::CT_F_PASS, flow::proto, stats::Counter};

use crate::{
    error::Error,
    family::{Csums, Family, outer},
    klog,
    nat::{PASS, failed, ip_csum, not_ours},
    parse::{self, Direction, L3_OFF, Packet, l4_csum_at},
    stats::count,
};

#[inline(always)]
fn helper<T>(ctx: &TcContext, r: Result<T, i64>) -> Result<T, Error> {
    r.map_err(|_| failed(ctx, Error::Rewrite))
}

/// The quoted packet's L4 checksum field, when the error quoted it (0: not
/// quoted, or a zero IPv4 UDP checksum, which means "none" and stays so).
#[inline(always)]
fn quoted_csum<F: Family>(ctx: &TcContext, inner: &Packet<F>) -> usize {
    let Some((off, _)) = l4_csum_at(
        inner.tuple.proto,
        usize::from(inner.l4_off),
        inner.l4,
        F::ICMP_PSEUDO,
    ) else {
        return 0;
    };
    match parse::load::<u16>(ctx, off) {
        Err(_) => 0,
        Ok(0) if inner.tuple.proto == proto::UDP && F::UDP_CSUM_OPTIONAL => 0,
        Ok(_) => off,
    }
}

/// Apply `old -> new` (2 or 4 bytes, or a difference when `size` is 0) to
/// the quoted checksum at `field`, and carry that change into the ICMP
/// checksum at `icmp_csum` (the caller carries the changed field itself).
#[inline(always)]
fn quoted_update(
    ctx: &TcContext,
    field: usize,
    icmp_csum: usize,
    old: u64,
    new: u64,
    size: u64,
) -> Result<(), Error> {
    let before: u16 = parse::load(ctx, field)?;
    helper(ctx, ctx.l3_csum_replace(field, old, new, size))?;
    carry(ctx, field, icmp_csum, before)
}

/// The quoted checksum at `field` changed from `before`: it is ICMP payload
/// too, so carry its own change into the ICMP checksum at `icmp_csum`.
#[inline(always)]
fn carry(ctx: &TcContext, field: usize, icmp_csum: usize, before: u16) -> Result<(), Error> {
    let after: u16 = parse::load(ctx, field)?;
    helper(
        ctx,
        ctx.l3_csum_replace(icmp_csum, u64::from(before), u64::from(after), 2),
    )
}

/// Translate an address of the quoted packet (at `field` within it).
#[inline(always)]
fn quoted_addr<F: Family>(
    ctx: &TcContext,
    inner: &Packet<F>,
    inner_l3: usize,
    field: usize,
    old: F::Addr,
    new: F::Addr,
    icmp_csum: usize,
) -> Result<(), Error> {
    // The quoted L4 checksum covers the address through its pseudo-header
    // (TCP, UDP, ICMPv6); the ICMP checksum covers it as payload.
    let quoted_l4 = if inner.l4_csum().is_some_and(|(_, pseudo)| pseudo) {
        quoted_csum(ctx, inner)
    } else {
        0
    };
    let before: u16 = if quoted_l4 != 0 {
        parse::load(ctx, quoted_l4)?
    } else {
        0
    };
    let csums = Csums {
        payload: [quoted_l4, icmp_csum],
        ..Csums::default()
    };
    F::rewrite_addr(ctx, inner_l3 + field, old, new, csums)?;
    if quoted_l4 != 0 {
        carry(ctx, quoted_l4, icmp_csum, before)?;
    }
    // The quoted IPv4 header checksum covers the address too.
    if F::IP_CSUM != 0 {
        let (o, n) = addr_words::<F>(old, new);
        quoted_update(ctx, inner_l3 + F::IP_CSUM, icmp_csum, o, n, 4)?;
    }
    Ok(())
}

/// IPv4 addresses as checksum-helper arguments (the IPv6 path never asks).
#[inline(always)]
fn addr_words<F: Family>(old: F::Addr, new: F::Addr) -> (u64, u64) {
    // SAFETY: only called when F::IP_CSUM is set, i.e. F::Addr is a u32.
    unsafe {
        (
            u64::from(core::mem::transmute_copy::<F::Addr, u32>(&old)),
            u64::from(core::mem::transmute_copy::<F::Addr, u32>(&new)),
        )
    }
}

/// Translate the quoted packet's port (or echo identifier) at `field`.
#[inline(always)]
fn quoted_port<F: Family>(
    ctx: &TcContext,
    inner: &Packet<F>,
    field: usize,
    old: u16,
    new: u16,
    icmp_csum: usize,
) -> Result<(), Error> {
    if old == new {
        return Ok(());
    }
    helper(ctx, ctx.store(field, &new, 0))?;
    helper(
        ctx,
        ctx.l3_csum_replace(icmp_csum, u64::from(old), u64::from(new), 2),
    )?;
    let l4 = quoted_csum(ctx, inner);
    if l4 != 0 {
        quoted_update(ctx, l4, icmp_csum, u64::from(old), u64::from(new), 2)?;
    }
    Ok(())
}

/// The outer address change: the IPv4 header checksum, or for ICMPv6 the
/// pseudo-header part of the ICMP checksum.
#[inline(always)]
fn outer_addr<F: Family>(
    ctx: &TcContext,
    field: usize,
    old: F::Addr,
    new: F::Addr,
    icmp_csum: usize,
) -> Result<(), Error> {
    let csums = Csums {
        ip: ip_csum::<F>(L3_OFF),
        pseudo: if F::ICMP_PSEUDO { icmp_csum } else { 0 },
        ..Csums::default()
    };
    F::rewrite_addr(ctx, outer(field), old, new, csums)
}

/// An ICMP error arriving for one of our egress addresses, about a packet a
/// client sent through us: point it (and what it quotes) back at the client.
#[inline(never)]
pub fn ingress_error<F: Family>(ctx: &TcContext, pkt: &Packet<F>) -> i32 {
    ingress(ctx, pkt, usize::from(pkt.inner)).unwrap_or_else(Error::ingress_action)
}

#[inline(always)]
fn ingress<F: Family>(ctx: &TcContext, pkt: &Packet<F>, inner_l3: usize) -> Result<i32, Error> {
    // The quoted packet left through us, so it parses as egress traffic.
    let mut inner = Packet::<F>::default();
    if parse::packet(ctx, inner_l3, Direction::Egress, &mut inner).is_err() || !inner.translatable()
    {
        return not_ours();
    }
    let Some(rev) = F::rev().get_ptr(&inner.tuple) else {
        return not_ours();
    };
    // SAFETY: a map value valid for this run; only read.
    let (client, client_port) = unsafe { ((*rev).orig_addr, (*rev).orig_port_be) };
    let icmp_csum = usize::from(pkt.l4_off) + 2;
    outer_addr::<F>(ctx, F::DST, pkt.tuple.dst, client, icmp_csum)?;
    quoted_addr::<F>(
        ctx,
        &inner,
        inner_l3,
        F::SRC,
        inner.tuple.src,
        client,
        icmp_csum,
    )?;
    quoted_port::<F>(
        ctx,
        &inner,
        inner.port_off(Direction::Egress),
        inner.tuple.sport_be,
        client_port,
        icmp_csum,
    )?;
    count(Counter::IcmpErrorsTranslated);
    Ok(PASS)
}

/// An ICMP error a client sends about a reply it received through us: make
/// it come from the flow's egress address and quote the reply as it was
/// before we translated it back.
#[inline(never)]
pub fn egress_error<F: Family>(ctx: &TcContext, pkt: &Packet<F>) -> i32 {
    egress(ctx, pkt, usize::from(pkt.inner)).unwrap_or_else(|err| klog::egress_drop(ctx, err))
}

#[inline(always)]
fn egress<F: Family>(ctx: &TcContext, pkt: &Packet<F>, inner_l3: usize) -> Result<i32, Error> {
    // The quoted packet came in through us: it parses as ingress traffic.
    let mut quoted = Packet::<F>::default();
    let inner = parse::packet(ctx, inner_l3, Direction::Ingress, &mut quoted)
        .ok()
        .map(|()| quoted)
        .filter(|i| i.translatable());
    let entry = inner
        .as_ref()
        .and_then(|i| F::ct().get_ptr(&i.tuple.reversed()));
    let (Some(inner), Some(entry)) = (inner, entry) else {
        // Not about a flow we track: the gateway's own errors pass; a
        // client's would leak its address, so they are dropped.
        if F::is_local(&pkt.tuple.src) {
            return Ok(PASS);
        }
        return Err(Error::Unsupported);
    };
    // SAFETY: a map value valid for this run; only read.
    let (nat, nat_port, flags) =
        unsafe { ((*entry).nat_addr, (*entry).nat_port_be, (*entry).flags) };
    if flags & CT_F_PASS != 0 {
        return Ok(PASS);
    }
    let icmp_csum = usize::from(pkt.l4_off) + 2;
    outer_addr::<F>(ctx, F::SRC, pkt.tuple.src, nat, icmp_csum)?;
    quoted_addr::<F>(
        ctx,
        &inner,
        inner_l3,
        F::DST,
        inner.tuple.dst,
        nat,
        icmp_csum,
    )?;
    quoted_port::<F>(
        ctx,
        &inner,
        inner.port_off(Direction::Ingress),
        inner.tuple.dport_be,
        nat_port,
        icmp_csum,
    )?;
    count(Counter::IcmpErrorsTranslated);
    Ok(PASS)
}
