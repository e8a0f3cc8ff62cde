// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Connection tracking and translation, for either address family: the
//! established-flow fast path, new-flow creation (classification, address
//! choice, port claim, table inserts) and the header rewrites.
//!
//! A translated flow owns two entries: `CT[original tuple]` on the way out
//! and `NAT[translated tuple]` for replies. The reverse entry is inserted
//! first with BPF_NOEXIST, which is what claims a translated tuple: two CPUs
//! racing for the same port cannot both win, and a live mapping is never
//! overwritten.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_NOEXIST, TC_ACT_OK},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
    programs::TcContext,
};
use aya_log_ebpf::error;
use egress_common::{
    classify::{
        ACTION_BYPASS, ACTION_F_MARK, ACTION_TRANSLATE, DEFAULT_POOL, IdentityRef,
        POOL_DOWN_DEFAULT, Settings, mix64,
    },
    conntrack::{
        CT_F_FIN, CT_F_LOCAL, CT_F_MARK, CT_F_PASS, CT_F_RST, CT_F_SYN, CtEntry, FRAG_EGRESS,
        FRAG_INGRESS, RevEntry, Scratch,
    },
    events::{EVENT_FAILED, EVENT_NEW, REASON_PORT_EXHAUSTED, REASON_TRANSLATED, closed},
    flow::Tuple,
    stats::{Counter, DEFAULT_STATS_SLOT, Side},
};

use crate::{
    classify::{Generation, classify},
    error::Error,
    events::{self, code},
    family::{Csums, Family, Ipv4, Ipv6, outer},
    frag, icmp, klog,
    parse::{self, Direction, Frag, Frame, L3_OFF, L4, Packet, TCP_FIN, TCP_RST, TCP_SYN},
    redirect,
    stats::{count, count_exhausted, count_flow_packet},
};

pub const PASS: i32 = TC_ACT_OK as i32;
/// Attempts at finding a free translated port once the original one is taken.
/// Each attempt is one hash insert; the bound keeps the verifier (and the
/// worst-case first-packet latency) in check.
const MAX_PORT_TRIES: u32 = 32;
/// Consecutive ports tried before jumping to a new random place in a range
/// larger than `MAX_PORT_TRIES`.
const PORT_RUN: u32 = 8;
const EEXIST: i32 = 17;

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

/// CLOCK_MONOTONIC at tick resolution: flow timestamps only need to be
/// good to a few milliseconds against timeouts of seconds, and the coarse
/// clock reads a stored value where `bpf_ktime_get_ns` reads the hardware
/// clock (on a VM, a sixth of an established packet's cost). It never runs
/// ahead of the agent's CLOCK_MONOTONIC, so idle times never underflow.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: no preconditions; reads CLOCK_MONOTONIC_COARSE.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn tcp_bits<F: Family>(pkt: &Packet<F>) -> u16 {
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
    match parse::frame(ctx)? {
        Frame::Ipv4 => Ok(egress_packet::<Ipv4>(ctx)),
        Frame::Ipv6 => Ok(egress_packet::<Ipv6>(ctx)),
        Frame::NotIp => {
            count(Counter::PassNonIp);
            Ok(PASS)
        }
    }
}

// Stack budget: the kernel allows 512 bytes for a whole chain of BPF
// function calls, each frame rounded up to 32 bytes. So the parsed packet
// lives in the entry program's frame and every heavier path (new flows,
// ICMP errors, fragments, the rewrite itself) is one BPF function below it,
// with its own frame. Only r0 survives a BPF call, so each such function
// turns its own error into a verdict (through error.rs) and returns that.
#[inline(always)]
fn egress_packet<F: Family>(ctx: &TcContext) -> i32 {
    egress_flow::<F>(ctx).unwrap_or_else(|err| klog::egress_drop(ctx, err))
}

#[inline(always)]
fn egress_flow<F: Family>(ctx: &TcContext) -> Result<i32, Error> {
    let mut pkt = Packet::<F>::default();
    parse::packet(ctx, L3_OFF, Direction::Egress, &mut pkt)?;
    let pkt = &pkt;
    if pkt.frag == Frag::Later {
        return Ok(frag::egress_later::<F>(ctx, pkt));
    }
    if pkt.l4 == L4::IcmpError {
        return Ok(icmp::egress_error::<F>(ctx, pkt));
    }
    let now = now();
    match F::ct().get_ptr_mut(&pkt.tuple) {
        Some(entry) => {
            // SAFETY: a hash map value stays valid for the program's run
            // (RCU); concurrent writers only bump counters and timestamps.
            let entry = unsafe { &mut *entry };
            let left_as = established(ctx, pkt, entry, now)?;
            record_first_fragment(FRAG_EGRESS, pkt, left_as);
            Ok(redirect::leave(ctx, entry.ifindex))
        }
        None => Ok(new_flow(ctx, pkt, now)),
    }
}

/// A first fragment's outcome (the address that replaced its source on
/// egress, or its destination on ingress), for the datagram's later ones.
#[inline(always)]
fn record_first_fragment<F: Family>(direction: u8, pkt: &Packet<F>, addr: F::Addr) {
    if pkt.frag == Frag::First {
        frag::record::<F>(direction, &pkt.tuple, pkt.frag_id, &addr);
    }
}

/// Fast path: a packet of a flow already in the connection table. Returns
/// the source address the packet leaves with.
#[inline(always)]
fn established<F: Family>(
    ctx: &TcContext,
    pkt: &Packet<F>,
    entry: &mut CtEntry<F::Addr, F::CtPad>,
    now: u64,
) -> Result<F::Addr, Error> {
    entry.last_seen_ns = now;
    entry.packets += 1;
    entry.bytes += u64::from(pkt.len);
    let bits = tcp_bits(pkt);
    // The flow's first FIN or RST: its end, for the flow log.
    let closing = closed(bits) && !closed(entry.flags);
    entry.flags |= bits;
    if closing {
        events::closing_out::<F>(&pkt.tuple, entry, bits);
    }
    let (nat_addr, nat_port, flags, mark) =
        (entry.nat_addr, entry.nat_port_be, entry.flags, entry.mark);
    count_flow_packet(entry.stats_slot, entry.addr_slot, Side::Out, pkt.len, false);
    if flags & CT_F_MARK != 0 {
        ctx.set_mark(mark);
    }
    if flags & CT_F_PASS != 0 {
        return Ok(pkt.tuple.src);
    }
    rewrite_source(ctx, pkt, nat_addr, nat_port)?;
    Ok(nat_addr)
}

/// The hash that spreads a flow over a pool's addresses.
#[inline(always)]
fn flow_hash<F: Family>(tuple: &Tuple<F::Addr>) -> u64 {
    mix64(
        F::digest(&tuple.src)
            ^ F::digest(&tuple.dst)
            ^ (u64::from(tuple.sport_be) << 16 | u64::from(tuple.dport_be)),
    )
}

/// Slow path: the first packet of a flow.
#[inline(never)]
fn new_flow<F: Family>(ctx: &TcContext, pkt: &Packet<F>, now: u64) -> i32 {
    first_packet(ctx, pkt, now).unwrap_or_else(|err| klog::egress_drop(ctx, err))
}

#[inline(always)]
fn first_packet<F: Family>(ctx: &TcContext, pkt: &Packet<F>, now: u64) -> Result<i32, Error> {
    // The gateway's own link-scoped packets (IPv6 duplicate address
    // detection and listener reports from ::, neighbour and router
    // discovery from link-local addresses, multicast) are never flows to
    // steer: left untouched, and not tracked.
    if F::link_scoped(&pkt.tuple) {
        count(Counter::PassLinkScoped);
        return Ok(PASS);
    }
    // Translated and redirected here by another uplink's run: its tuple is
    // a translated one, so it misses the connection table.
    if redirect::marked(ctx) && F::rev().get_ptr(&pkt.tuple).is_some() {
        redirect::unmark(ctx);
        return Ok(PASS);
    }
    count(Counter::FlowsNew);
    let src = pkt.tuple.src;
    // Built in per-CPU scratch space: the stack cannot also hold it.
    let scratch = F::scratch().ok_or(Error::NoTables)?;
    // SAFETY: this CPU's slot of a per-CPU array, used only by this run
    // (preemption is disabled, nothing else on this CPU can interleave).
    let scratch = unsafe { &mut *scratch };
    let entry = &mut scratch.ct;
    *entry = CtEntry::<F::Addr, F::CtPad> {
        nat_addr: src,
        nat_port_be: pkt.tuple.sport_be,
        flags: tcp_bits(pkt),
        created_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: u64::from(pkt.len),
        ..CtEntry::default()
    };

    // The gateway's own traffic is never steered by policy. It still claims
    // its tuple (translating to another port of its own address only if a
    // client flow already holds it), so that replies are never confused.
    if F::is_local(&src) {
        count(Counter::FlowsLocal);
        if pkt.translatable() {
            entry.flags |= CT_F_LOCAL;
            entry.stats_slot = DEFAULT_STATS_SLOT;
            let settings = Generation::active()?.settings()?;
            translate(ctx, pkt, scratch, settings, now)?;
        }
        record_first_fragment(FRAG_EGRESS, pkt, scratch.ct.nat_addr);
        return Ok(PASS);
    }

    let generation = Generation::active()?;
    let mut identity = IdentityRef::default();
    let action = classify::<F>(generation, &pkt.tuple, &mut identity).ok_or(Error::NoTables)?;
    entry.stats_slot = action.stats_slot;
    entry.policy = action.policy as u16;
    entry.pool = action.pool as u16;
    entry.generation = generation.id() as u16;
    entry.identity = identity.id;
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
            let _ = F::ct().insert(&pkt.tuple, &*entry, u64::from(BPF_NOEXIST));
            count(Counter::FlowsBypassed);
            count_flow_packet(entry.stats_slot, 0, Side::Out, pkt.len, true);
        }
        ACTION_TRANSLATE => {
            if !pkt.translatable() {
                return Err(Error::Unsupported);
            }
            // The same user (or, without identity, the same source) keeps
            // the same IPv6 address of a range.
            let key = if identity.id != 0 {
                mix64(u64::from(identity.key))
            } else {
                F::digest(&src)
            };
            let hash = flow_hash::<F>(&pkt.tuple);
            let pool = generation.pool(action.pool)?;
            entry.addr_slot = match F::pick(pool, hash, key, &mut entry.nat_addr) {
                Some(slot) => {
                    entry.ifindex = pool.ifindex;
                    slot
                }
                None if pool.when_down == POOL_DOWN_DEFAULT => {
                    entry.pool = DEFAULT_POOL as u16;
                    F::pick(
                        generation.pool(DEFAULT_POOL)?,
                        hash,
                        key,
                        &mut entry.nat_addr,
                    )
                    .ok_or(Error::NoEgress)?
                }
                None => return Err(Error::NoEgress),
            };
            translate(ctx, pkt, scratch, generation.settings()?, now)?;
        }
        _ => return Err(Error::NoTables),
    }
    record_first_fragment(FRAG_EGRESS, pkt, scratch.ct.nat_addr);
    Ok(redirect::leave(ctx, scratch.ct.ifindex))
}

/// Claim a translated tuple for a new flow (`scratch.ct.nat_addr` chosen),
/// record both directions, and rewrite the packet. On return `scratch.ct`
/// holds the translation the packet left with.
#[inline(never)]
fn translate<F: Family>(
    ctx: &TcContext,
    pkt: &Packet<F>,
    scratch: &mut Scratch<F::Addr, F::CtPad, F::RevPad>,
    settings: &Settings,
    now: u64,
) -> Result<(), Error> {
    if bench_mode() == 1 {
        count(Counter::FlowsTranslated);
        return rewrite_source(ctx, pkt, scratch.ct.nat_addr, scratch.ct.nat_port_be);
    }
    if let Err(err) = claim_port(pkt, scratch, settings, now) {
        if matches!(err, Error::PortExhausted) {
            events::report::<F>(
                code(EVENT_FAILED, REASON_PORT_EXHAUSTED),
                &pkt.tuple,
                &scratch.ct,
            );
        }
        return Err(err);
    }
    let entry = &mut scratch.ct;
    entry.nat_port_be = scratch.rev_key.sport_be;
    if let Err(err) = F::ct().insert(&pkt.tuple, &*entry, u64::from(BPF_NOEXIST)) {
        // Give the claimed tuple back before anything else can see it.
        let _ = F::rev().remove(&scratch.rev_key);
        if err != -EEXIST {
            return Err(Error::TableFull);
        }
        // Another CPU created this very flow since our lookup: use its
        // translation so both packets leave with the same tuple.
        count(Counter::FlowRaces);
        let winner = F::ct().get_ptr_mut(&pkt.tuple).ok_or(Error::TableFull)?;
        // SAFETY: as in `egress_packet`: a map value valid for this run.
        entry.nat_addr = established(ctx, pkt, unsafe { &mut *winner }, now)?;
        return Ok(());
    }
    count(Counter::FlowsTranslated);
    count_flow_packet(entry.stats_slot, entry.addr_slot, Side::Out, pkt.len, true);
    events::report::<F>(code(EVENT_NEW, REASON_TRANSLATED), &pkt.tuple, entry);
    rewrite_source(ctx, pkt, entry.nat_addr, entry.nat_port_be)?;
    if bench_mode() == 2 {
        let _ = F::ct().remove(&pkt.tuple);
        let _ = F::rev().remove(&scratch.rev_key);
    }
    Ok(())
}

/// Insert the reverse entry for the chosen address and a free port: the
/// original source port when free, otherwise the range's ports in runs of
/// consecutive ports from random starts. A range no larger than the bound is
/// one run, so it is searched completely; a large one gets several short
/// runs, because client stacks hand out ephemeral ports in blocks and one
/// long run that starts inside a fully used block would never leave it.
/// The claimed key is left in `scratch.rev_key`.
#[inline(always)]
fn claim_port<F: Family>(
    pkt: &Packet<F>,
    scratch: &mut Scratch<F::Addr, F::CtPad, F::RevPad>,
    settings: &Settings,
    now: u64,
) -> Result<(), Error> {
    let tuple = &pkt.tuple;
    let entry = &scratch.ct;
    scratch.rev = RevEntry::<F::Addr, F::RevPad> {
        orig_addr: tuple.src,
        orig_port_be: tuple.sport_be,
        stats_slot: entry.stats_slot,
        addr_slot: entry.addr_slot,
        flags: entry.flags & (CT_F_LOCAL | CT_F_PASS),
        last_seen_ns: now,
        ..RevEntry::default()
    };
    scratch.rev_key = Tuple::new(
        entry.nat_addr,
        tuple.dst,
        tuple.sport_be,
        tuple.dport_be,
        tuple.proto,
    );
    let span = u32::from(settings.port_max.saturating_sub(settings.port_min)) + 1;
    let reseed = span > MAX_PORT_TRIES;
    // SAFETY: no preconditions.
    let mut offset = unsafe { bpf_get_prandom_u32() } % span;
    let mut attempt = 0;
    while attempt < MAX_PORT_TRIES {
        match F::rev().insert(&scratch.rev_key, &scratch.rev, u64::from(BPF_NOEXIST)) {
            Ok(()) => return Ok(()),
            Err(err) if err == -EEXIST => {
                count(Counter::PortCollisions);
                let port = u32::from(settings.port_min) + offset;
                scratch.rev_key.sport_be = (port as u16).to_be();
                offset = if reseed && (attempt + 1) % PORT_RUN == 0 {
                    // SAFETY: no preconditions.
                    (unsafe { bpf_get_prandom_u32() }) % span
                } else if offset + 1 == span {
                    0
                } else {
                    offset + 1
                };
            }
            Err(_) => return Err(Error::TableFull),
        }
        attempt += 1;
    }
    count_exhausted(scratch.ct.addr_slot);
    Err(Error::PortExhausted)
}

/// TC ingress on the uplink.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> Result<i32, Error> {
    count(Counter::IngressPackets);
    match parse::frame(ctx)? {
        Frame::Ipv4 => Ok(ingress_packet::<Ipv4>(ctx)),
        Frame::Ipv6 => Ok(ingress_packet::<Ipv6>(ctx)),
        Frame::NotIp => {
            count(Counter::IngressNotOurs);
            Ok(PASS)
        }
    }
}

/// An ingress packet that belongs to no translated flow: passed to the stack.
#[inline(always)]
pub fn not_ours() -> Result<i32, Error> {
    count(Counter::IngressNotOurs);
    Ok(PASS)
}

#[inline(always)]
fn ingress_packet<F: Family>(ctx: &TcContext) -> i32 {
    ingress_flow::<F>(ctx).unwrap_or_else(Error::ingress_action)
}

#[inline(always)]
fn ingress_flow<F: Family>(ctx: &TcContext) -> Result<i32, Error> {
    let mut pkt = Packet::<F>::default();
    if parse::packet(ctx, L3_OFF, Direction::Ingress, &mut pkt).is_err() {
        // Not parseable: not a reply to anything we translated; the stack
        // validates it itself.
        return not_ours();
    }
    let pkt = &pkt;
    if pkt.frag == Frag::Later {
        return Ok(frag::ingress_later::<F>(ctx, pkt));
    }
    if pkt.l4 == L4::IcmpError {
        return Ok(icmp::ingress_error::<F>(ctx, pkt));
    }
    if !pkt.translatable() {
        return not_ours();
    }
    let Some(rev) = F::rev().get_ptr_mut(&pkt.tuple.reversed()) else {
        return not_ours();
    };
    // SAFETY: a hash map value stays valid for the program's run (RCU);
    // concurrent writers only bump counters and timestamps.
    let rev = unsafe { &mut *rev };
    rev.last_seen_ns = now();
    rev.packets += 1;
    rev.bytes += u64::from(pkt.len);
    let bits = tcp_bits(pkt);
    let closing = closed(bits) && !closed(rev.flags);
    rev.flags |= bits;
    if closing {
        events::closing_in::<F>(&pkt.tuple, rev, bits);
    }
    let (orig_addr, orig_port) = (rev.orig_addr, rev.orig_port_be);
    count_flow_packet(rev.stats_slot, rev.addr_slot, Side::In, pkt.len, false);
    rewrite(ctx, pkt, Direction::Ingress, &orig_addr, orig_port)?;
    record_first_fragment(FRAG_INGRESS, pkt, orig_addr);
    count(Counter::IngressTranslated);
    Ok(PASS)
}

#[inline(always)]
fn rewrite_source<F: Family>(
    ctx: &TcContext,
    pkt: &Packet<F>,
    addr: F::Addr,
    port_be: u16,
) -> Result<(), Error> {
    rewrite(ctx, pkt, Direction::Egress, &addr, port_be)?;
    count(Counter::EgressTranslated);
    Ok(())
}

/// Replace the source (egress) or destination (ingress) address and port
/// of the packet's own headers, fixing the IPv4 header checksum and the L4
/// checksum (pseudo-header included where the protocol has one) through the
/// kernel helpers, which also handle CHECKSUM_PARTIAL skbs from offloading
/// devices (after samples/bpf/tcbpf1_kern.c). A failure drops the packet,
/// so a half-rewritten header never leaves.
///
/// Its own BPF function: the checksum scratch it needs stays out of the
/// callers' frames.
#[inline(never)]
fn rewrite<F: Family>(
    ctx: &TcContext,
    pkt: &Packet<F>,
    direction: Direction,
    new_addr: &F::Addr,
    new_port: u16,
) -> Result<(), Error> {
    let (field, old_addr, old_port) = match direction {
        Direction::Egress => (F::SRC, pkt.tuple.src, pkt.tuple.sport_be),
        Direction::Ingress => (F::DST, pkt.tuple.dst, pkt.tuple.dport_be),
    };
    let (csum_off, pseudo) = pkt.l4_csum().ok_or(Error::Unsupported)?;
    // A real UDP checksum must never become zero: zero means "none" in
    // IPv4 and is invalid in IPv6 (RFC 8200), so a sum that folds to zero is
    // written as 0xffff. A zero one is left as it is: "none" stays "none",
    // and an IPv6 one was invalid already.
    let mangled = if pkt.l4 == L4::Udp {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    if old_addr != *new_addr {
        let csums = Csums {
            ip: ip_csum::<F>(L3_OFF),
            pseudo: if pseudo { csum_off } else { 0 },
            pseudo_flags: mangled,
            payload: [0, 0],
        };
        F::rewrite_addr(ctx, outer(field), old_addr, *new_addr, csums)
            .map_err(|e| failed(ctx, e))?;
    }
    if old_port != new_port {
        let port_off = pkt.port_off(direction);
        ctx.store(port_off, &new_port, 0)
            .map_err(|_| failed(ctx, Error::Rewrite))?;
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_port),
            u64::from(new_port),
            mangled | 2,
        )
        .map_err(|_| failed(ctx, Error::Rewrite))?;
    }
    Ok(())
}

/// Offset of the IPv4 header checksum of the IP header at `l3` (0 for IPv6).
#[inline(always)]
pub fn ip_csum<F: Family>(l3: usize) -> usize {
    if F::IP_CSUM == 0 { 0 } else { l3 + F::IP_CSUM }
}

/// A rewrite helper failed: rare enough (it means the skb could not be made
/// writable) to be worth a log line next to the drop counter, when the
/// agent switched kernel log records on.
///
/// Inlined: as its own BPF function it would add a stack frame to chains
/// already near the 512-byte limit; and not `#[cold]`, which would move it
/// to `.text.unlikely.`, whose calls from `.text` aya 0.14 mis-relocates.
#[inline(always)]
pub fn failed(ctx: &TcContext, err: Error) -> Error {
    if events::klog_on() {
        error!(ctx, "packet rewrite helper failed");
    }
    err
}
