// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Connection tracking and translation: the established-flow fast path,
//! new-flow creation (classification, port claim, table inserts) and the
//! header rewrites with their checksum fix-ups.
//!
//! A translated flow owns two entries: `EG_CT4[original tuple]` on the way
//! out and `EG_NAT4[translated tuple]` for replies. The reverse entry is
//! inserted first with BPF_NOEXIST, which is what claims a translated tuple:
//! two CPUs racing for the same port cannot both win, and a live mapping is
//! never overwritten.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::TcContext,
};
use aya_log_ebpf::error;
use egress_common::{
    classify::{ACTION_BYPASS, ACTION_F_MARK, ACTION_TRANSLATE, Settings},
    conntrack::{
        CT_F_FIN, CT_F_LOCAL, CT_F_MARK, CT_F_PASS, CT_F_RST, CT_F_SYN, CtEntry4, RevEntry4,
    },
    flow::Tuple4,
    stats::{Counter, DEFAULT_STATS_SLOT},
};

use crate::{
    classify::{Generation, classify_v4},
    error::Error,
    maps::{EG_CT4, EG_LOCAL4, EG_NAT4},
    parse::{
        self, Direction, Frame, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, Ipv4Packet, L4, TCP_FIN,
        TCP_RST, TCP_SYN,
    },
    stats::{Side, count, count_policy},
};

const PASS: i32 = TC_ACT_OK as i32;

/// Benchmarks only (set at load time; 0 in production, where the verifier
/// sees the constant and removes the branches): 1 = translate new flows
/// without recording them, 2 = record them and remove them again, so that
/// every repeat of one packet takes the new-flow path.
#[unsafe(no_mangle)]
static BENCH_MODE: u8 = 0;

#[inline(always)]
fn bench_mode() -> u8 {
    // SAFETY: a plain read of a load-time constant; volatile keeps the
    // compiler from folding the default value in.
    unsafe { core::ptr::read_volatile(&BENCH_MODE) }
}
/// Attempts at finding a free translated port once the original one is taken.
/// Each attempt is one hash insert; the bound keeps the verifier (and the
/// worst-case first-packet latency) in check.
const MAX_PORT_TRIES: u32 = 32;
const EEXIST: i32 = 17;

#[inline(always)]
fn now() -> u64 {
    // SAFETY: no preconditions; reads CLOCK_MONOTONIC.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn tcp_bits(pkt: &Ipv4Packet) -> u16 {
    if pkt.l4 != L4::Tcp {
        return 0;
    }
    let mut bits = 0;
    if pkt.tcp_flags & TCP_SYN != 0 {
        bits |= CT_F_SYN;
    }
    if pkt.tcp_flags & TCP_FIN != 0 {
        bits |= CT_F_FIN;
    }
    if pkt.tcp_flags & TCP_RST != 0 {
        bits |= CT_F_RST;
    }
    bits
}

/// TC egress on the uplink.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> Result<i32, Error> {
    count(Counter::EgressPackets);
    let pkt = match parse::frame(ctx, Direction::Egress)? {
        Frame::Ipv4(pkt) => pkt,
        Frame::Ipv6 => {
            count(Counter::PassIpv6);
            return Ok(PASS);
        }
        Frame::NotIp => {
            count(Counter::PassNonIp);
            return Ok(PASS);
        }
    };
    let now = now();
    match EG_CT4.get_ptr_mut(&pkt.tuple) {
        // SAFETY: a hash map value stays valid for the program's run (RCU);
        // concurrent writers only bump counters and timestamps.
        Some(entry) => established(ctx, &pkt, unsafe { &mut *entry }, now),
        None => new_flow(ctx, &pkt, now),
    }
}

/// Fast path: a packet of a flow already in the connection table.
#[inline(always)]
fn established(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    entry: &mut CtEntry4,
    now: u64,
) -> Result<i32, Error> {
    entry.last_seen_ns = now;
    entry.packets += 1;
    entry.bytes += u64::from(pkt.len);
    entry.flags |= tcp_bits(pkt);
    let CtEntry4 {
        nat_addr_be,
        nat_port_be,
        flags,
        stats_slot,
        mark,
        ..
    } = *entry;
    count_policy(stats_slot, Side::Out, pkt.len, false);
    if flags & CT_F_MARK != 0 {
        ctx.set_mark(mark);
    }
    if flags & CT_F_PASS != 0 {
        return Ok(PASS);
    }
    rewrite_source(ctx, pkt, nat_addr_be, nat_port_be)?;
    Ok(PASS)
}

/// Slow path: the first packet of a flow.
#[inline(always)]
fn new_flow(ctx: &TcContext, pkt: &Ipv4Packet, now: u64) -> Result<i32, Error> {
    count(Counter::FlowsNew);
    let mut entry = CtEntry4 {
        nat_addr_be: pkt.tuple.src_be,
        nat_port_be: pkt.tuple.sport_be,
        flags: tcp_bits(pkt),
        created_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: u64::from(pkt.len),
        ..CtEntry4::default()
    };

    // The gateway's own traffic is never steered by policy. It still claims
    // its tuple (translating to another port of its own address only if a
    // client flow already holds it), so that replies are never confused.
    if EG_LOCAL4.get_ptr(&pkt.tuple.src_be).is_some() {
        count(Counter::FlowsLocal);
        if !pkt.translatable() {
            return Ok(PASS);
        }
        entry.flags |= CT_F_LOCAL;
        entry.stats_slot = DEFAULT_STATS_SLOT;
        let settings = Generation::active()?.settings()?;
        return translate(ctx, pkt, entry, settings, now);
    }

    let generation = Generation::active()?;
    let action = classify_v4(generation, &pkt.tuple)?;
    entry.stats_slot = action.stats_slot;
    entry.policy = action.policy as u16;
    entry.pool = action.pool as u16;
    entry.generation = generation.id();
    if action.flags & ACTION_F_MARK != 0 {
        entry.flags |= CT_F_MARK;
        entry.mark = action.mark;
        ctx.set_mark(action.mark);
    }

    match action.kind {
        ACTION_BYPASS => {
            entry.flags |= CT_F_PASS;
            // A full table only costs this flow its fast path: every packet
            // is classified again, with the same answer.
            let _ = EG_CT4.insert(&pkt.tuple, &entry, u64::from(BPF_NOEXIST));
            count(Counter::FlowsBypassed);
            count_policy(entry.stats_slot, Side::Out, pkt.len, true);
            Ok(PASS)
        }
        ACTION_TRANSLATE => {
            if !pkt.translatable() {
                return Err(Error::Unsupported);
            }
            entry.nat_addr_be = generation
                .pool(action.pool)?
                .pick_v4()
                .ok_or(Error::NoEgress)?;
            translate(ctx, pkt, entry, generation.settings()?, now)
        }
        _ => Err(Error::NoTables),
    }
}

/// Claim a translated tuple for a new flow (`entry.nat_addr_be` chosen),
/// record both directions, and rewrite the packet.
#[inline(always)]
fn translate(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    mut entry: CtEntry4,
    settings: &Settings,
    now: u64,
) -> Result<i32, Error> {
    if bench_mode() == 1 {
        count(Counter::FlowsTranslated);
        return rewrite_source(ctx, pkt, entry.nat_addr_be, entry.nat_port_be).map(|()| PASS);
    }
    let rev_key = claim_port(pkt, entry.nat_addr_be, entry.stats_slot, settings, now)?;
    entry.nat_port_be = rev_key.sport_be;
    if let Err(err) = EG_CT4.insert(&pkt.tuple, &entry, u64::from(BPF_NOEXIST)) {
        // Give the claimed tuple back before anything else can see it.
        let _ = EG_NAT4.remove(&rev_key);
        if err != -EEXIST {
            return Err(Error::TableFull);
        }
        // Another CPU created this very flow since our lookup: use its
        // translation so both packets leave with the same tuple.
        count(Counter::FlowRaces);
        let winner = EG_CT4.get_ptr_mut(&pkt.tuple).ok_or(Error::TableFull)?;
        // SAFETY: as in `egress`: a map value valid for this run.
        return established(ctx, pkt, unsafe { &mut *winner }, now);
    }
    count(Counter::FlowsTranslated);
    count_policy(entry.stats_slot, Side::Out, pkt.len, true);
    rewrite_source(ctx, pkt, entry.nat_addr_be, entry.nat_port_be)?;
    if bench_mode() == 2 {
        let _ = EG_CT4.remove(&pkt.tuple);
        let _ = EG_NAT4.remove(&rev_key);
    }
    Ok(PASS)
}

/// Insert the reverse entry for `nat_addr_be` and a free port: the original
/// source port when free, otherwise random ones from the settings' range.
#[inline(always)]
fn claim_port(
    pkt: &Ipv4Packet,
    nat_addr_be: u32,
    stats_slot: u32,
    settings: &Settings,
    now: u64,
) -> Result<Tuple4, Error> {
    let tuple = &pkt.tuple;
    let rev = RevEntry4 {
        orig_addr_be: tuple.src_be,
        orig_port_be: tuple.sport_be,
        stats_slot,
        last_seen_ns: now,
        ..RevEntry4::default()
    };
    let mut key = Tuple4::new(
        nat_addr_be,
        tuple.dst_be,
        tuple.sport_be,
        tuple.dport_be,
        tuple.proto,
    );
    let span = u32::from(settings.port_max.saturating_sub(settings.port_min)) + 1;
    let mut attempt = 0;
    while attempt < MAX_PORT_TRIES {
        match EG_NAT4.insert(&key, &rev, u64::from(BPF_NOEXIST)) {
            Ok(()) => return Ok(key),
            Err(err) if err == -EEXIST => {
                count(Counter::PortCollisions);
                // SAFETY: no preconditions.
                let random = unsafe { bpf_get_prandom_u32() };
                let port = u32::from(settings.port_min) + random % span;
                key.sport_be = (port as u16).to_be();
            }
            Err(_) => return Err(Error::TableFull),
        }
        attempt += 1;
    }
    Err(Error::PortExhausted)
}

/// TC ingress on the uplink.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> Result<i32, Error> {
    count(Counter::IngressPackets);
    let pkt = match parse::frame(ctx, Direction::Ingress)? {
        Frame::Ipv4(pkt) if pkt.translatable() => pkt,
        _ => {
            count(Counter::IngressNotOurs);
            return Ok(PASS);
        }
    };
    let Some(rev) = EG_NAT4.get_ptr_mut(&pkt.tuple.reversed()) else {
        count(Counter::IngressNotOurs);
        return Ok(PASS);
    };
    // SAFETY: a hash map value stays valid for the program's run (RCU);
    // concurrent writers only bump counters and timestamps.
    let rev = unsafe { &mut *rev };
    rev.last_seen_ns = now();
    rev.packets += 1;
    rev.bytes += u64::from(pkt.len);
    rev.flags |= tcp_bits(&pkt);
    let RevEntry4 {
        orig_addr_be,
        orig_port_be,
        stats_slot,
        ..
    } = *rev;
    count_policy(stats_slot, Side::In, pkt.len, false);
    rewrite(
        ctx,
        &pkt,
        IP_DST_OFF,
        pkt.tuple.dst_be,
        orig_addr_be,
        pkt.port_off(Direction::Ingress),
        pkt.tuple.dport_be,
        orig_port_be,
    )?;
    count(Counter::IngressTranslated);
    Ok(PASS)
}

#[inline(always)]
fn rewrite_source(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    addr_be: u32,
    port_be: u16,
) -> Result<(), Error> {
    rewrite(
        ctx,
        pkt,
        IP_SRC_OFF,
        pkt.tuple.src_be,
        addr_be,
        pkt.port_off(Direction::Egress),
        pkt.tuple.sport_be,
        port_be,
    )?;
    count(Counter::EgressTranslated);
    Ok(())
}

/// Replace one address and one port, fixing the IP checksum and the L4
/// checksum (pseudo-header included for TCP/UDP) through the kernel helpers,
/// which also handle CHECKSUM_PARTIAL skbs from offloading devices (after
/// samples/bpf/tcbpf1_kern.c). A failure drops the packet, so a
/// half-rewritten header never leaves.
#[expect(
    clippy::too_many_arguments,
    reason = "one call per direction, all offsets explicit"
)]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    addr_off: usize,
    old_addr: u32,
    new_addr: u32,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), Error> {
    let (csum_off, pseudo) = pkt.l4_csum().ok_or(Error::Unsupported)?;
    // A zero UDP checksum means "none" in IPv4: keep it zero, and never turn
    // a real one into zero.
    let mangled = if pkt.l4 == L4::Udp {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    if old_addr != new_addr {
        ctx.store(addr_off, &new_addr, 0)
            .map_err(|e| failed(ctx, e))?;
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old_addr), u64::from(new_addr), 4)
            .map_err(|e| failed(ctx, e))?;
        if pseudo {
            ctx.l4_csum_replace(
                csum_off,
                u64::from(old_addr),
                u64::from(new_addr),
                u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
            )
            .map_err(|e| failed(ctx, e))?;
        }
    }
    if old_port != new_port {
        ctx.store(port_off, &new_port, 0)
            .map_err(|e| failed(ctx, e))?;
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_port),
            u64::from(new_port),
            mangled | 2,
        )
        .map_err(|e| failed(ctx, e))?;
    }
    Ok(())
}

/// A rewrite helper failed: rare enough (it means the skb could not be made
/// writable) to be worth a log line next to the drop counter.
#[cold]
fn failed(ctx: &TcContext, errno: i64) -> Error {
    error!(ctx, "packet rewrite helper failed: {}", errno);
    Error::Rewrite
}
