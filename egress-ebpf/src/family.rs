// SPDX-License-Identifier: GPL-2.0 OR MIT
//! What differs between IPv4 and IPv6: tables, header offsets, address
//! lookups and how an address rewrite fixes checksums. The NAT logic is
//! written once over [`Family`].

use crate::{
    error::Error,
    maps::{
        EG_CT4, EG_CT6, EG_DST4, EG_DST6, EG_FRAG4, EG_FRAG6, EG_GEN, EG_GEO4, EG_GEO4_SPLIT,
        EG_GEO6, EG_GEO6_BKT, EG_ID4, EG_ID4_HOST, EG_ID6, EG_ID6_HOST, EG_LOCAL4, EG_LOCAL6,
        EG_NAT4, EG_NAT6, EG_SCRATCH4, EG_SCRATCH6, EG_SRC4, EG_SRC6,
    },
    parse::{self, Direction, L3_OFF, Packet},
};
use aya_ebpf::{
    bindings::BPF_F_PSEUDO_HDR,
    helpers::bpf_csum_diff,
    maps::{HashMap, LruHashMap, lpm_trie::Key},
    programs::TcContext,
};
use egress_common::{
    classify::{GEN_PREFIX_BITS, GenPrefix4, GenPrefix6, IdentityRef, Pool, mix64},
    conntrack::{CtEntry, FragEntry, FragKey, RevEntry, Scratch},
    csum,
    events::EventAddr,
    flow::{Addr4, Addr6, Tuple},
    geo,
};

/// The active generation of the country tables (they reload on their own).
#[inline(always)]
fn geo_generation() -> u32 {
    EG_GEN.get(geo::GEN_SLOT_GEO).map_or(0, |g| *g & 1)
}

/// Checksum bookkeeping for an address rewrite. Offsets are absolute;
/// 0 means "none" (no checksum lives at offset 0). Plain integers rather
/// than `Option`s: LLVM may spill the undefined payload of a `None`, and the
/// verifier rejects reading an uninitialised register.
#[derive(Clone, Copy, Default)]
pub struct Csums {
    /// The IPv4 header checksum covering the address.
    pub ip: usize,
    /// The packet's own L4 checksum, when the address is in its
    /// pseudo-header, and extra helper flags (BPF_F_MARK_MANGLED_0).
    pub pseudo: usize,
    pub pseudo_flags: u64,
    /// Checksums that cover the address as plain payload (in an ICMP error:
    /// the quoted packet's pseudo-header checksum and the ICMP checksum):
    /// updated unconditionally.
    pub payload: [usize; 2],
}

pub trait Family: Sized + 'static {
    type Addr: Copy + PartialEq + Default + EventAddr;
    type CtPad: Copy + Default;
    type RevPad: Copy + Default;
    /// Whether this family's ICMP checksum covers the pseudo-header.
    const ICMP_PSEUDO: bool;
    /// Offsets of the source and destination address in an IP header.
    const SRC: usize;
    const DST: usize;
    /// Offset of the header checksum in an IP header (0: none, IPv6).
    const IP_CSUM: usize;
    /// Whether a zero UDP checksum means "none" (IPv4) rather than an error.
    const UDP_CSUM_OPTIONAL: bool;

    /// Parse an IP header of this family at `l3` into `out`.
    fn parse(
        ctx: &TcContext,
        l3: usize,
        direction: Direction,
        out: &mut Packet<Self>,
    ) -> Result<(), Error>;

    fn ct() -> &'static HashMap<Tuple<Self::Addr>, CtEntry<Self::Addr, Self::CtPad>>;
    fn rev() -> &'static HashMap<Tuple<Self::Addr>, RevEntry<Self::Addr, Self::RevPad>>;
    fn frags() -> &'static LruHashMap<FragKey<Self::Addr>, FragEntry<Self::Addr>>;
    /// This CPU's scratch space for setting up a new flow.
    fn scratch() -> Option<*mut Scratch<Self::Addr, Self::CtPad, Self::RevPad>>;
    fn is_local(addr: &Self::Addr) -> bool;
    /// Link-scoped traffic that is never a forwarded client flow: from the
    /// unspecified address (DAD, DHCP) or a link-local one, or to multicast
    /// (or the IPv4 limited broadcast).
    fn link_scoped(tuple: &Tuple<Self::Addr>) -> bool;
    /// Class rows of the two prefix dimensions in `generation`.
    fn prefix_classes(generation: u8, tuple: &Tuple<Self::Addr>) -> Option<(u32, u32)>;
    fn identity(src: &Self::Addr) -> IdentityRef;
    fn country(dst: &Self::Addr) -> u32;
    /// A pool address for a new flow, written to `out`, and its counter
    /// slot: `hash` spreads flows, `key` keeps an identity (or source) on
    /// one IPv6 address.
    fn pick(pool: &Pool, hash: u64, key: u64, out: &mut Self::Addr) -> Option<u16>;
    /// A stable 64-bit digest of an address.
    fn digest(addr: &Self::Addr) -> u64;
    /// Replace the address at `off` and fix every checksum in `csums`.
    fn rewrite_addr(
        ctx: &TcContext,
        off: usize,
        old: Self::Addr,
        new: Self::Addr,
        csums: Csums,
    ) -> Result<(), Error>;
}

pub struct Ipv4;
pub struct Ipv6;

#[inline(always)]
fn helper<T>(r: Result<T, i64>) -> Result<T, Error> {
    r.map_err(|_| Error::Rewrite)
}

/// Replace the IPv4 address at `off` by direct packet access and update
/// the header checksum at `csum_off` to match. Fails, writing nothing, when
/// either lies outside the linear data.
#[inline(always)]
fn write_in_header(
    ctx: &TcContext,
    off: usize,
    csum_off: usize,
    old: Addr4,
    new: Addr4,
) -> Result<(), Error> {
    let addr: *mut Addr4 = parse::ptr_at_mut(ctx, off)?;
    let check: *mut u16 = parse::ptr_at_mut(ctx, csum_off)?;
    // SAFETY: ptr_at_mut checked both lie before data_end; a TC program
    // with direct writes gets a private (uncloned) skb from the kernel's
    // prologue, and packet data may be unaligned.
    unsafe {
        let sum = check.read_unaligned();
        addr.write_unaligned(new);
        check.write_unaligned(csum::replace4(sum, old, new));
    }
    Ok(())
}

impl Family for Ipv4 {
    type Addr = Addr4;
    type CtPad = [u8; 0];
    type RevPad = [u8; 2];
    const ICMP_PSEUDO: bool = false;
    const SRC: usize = 12;
    const DST: usize = 16;
    const IP_CSUM: usize = 10;
    const UDP_CSUM_OPTIONAL: bool = true;

    #[inline(always)]
    fn parse(
        ctx: &TcContext,
        l3: usize,
        direction: Direction,
        out: &mut Packet<Self>,
    ) -> Result<(), Error> {
        parse::ipv4(ctx, l3, direction, out)
    }

    fn ct() -> &'static HashMap<Tuple<Addr4>, CtEntry<Addr4, [u8; 0]>> {
        &EG_CT4
    }
    fn rev() -> &'static HashMap<Tuple<Addr4>, RevEntry<Addr4, [u8; 2]>> {
        &EG_NAT4
    }
    fn frags() -> &'static LruHashMap<FragKey<Addr4>, FragEntry<Addr4>> {
        &EG_FRAG4
    }
    #[inline(always)]
    fn scratch() -> Option<*mut Scratch<Addr4, [u8; 0], [u8; 2]>> {
        EG_SCRATCH4.get_ptr_mut(0)
    }
    #[inline(always)]
    fn is_local(addr: &Addr4) -> bool {
        EG_LOCAL4.get_ptr(addr).is_some()
    }
    #[inline(always)]
    fn link_scoped(tuple: &Tuple<Addr4>) -> bool {
        let src = u32::from_be(tuple.src);
        let dst = u32::from_be(tuple.dst);
        src == 0 || src >> 16 == 0xa9fe || dst >> 28 == 0xe || dst == u32::MAX
    }
    #[inline(always)]
    fn prefix_classes(generation: u8, tuple: &Tuple<Addr4>) -> Option<(u32, u32)> {
        let key = |addr: Addr4| {
            Key::new(
                GEN_PREFIX_BITS + 32,
                GenPrefix4 {
                    generation,
                    addr: addr.to_ne_bytes(),
                },
            )
        };
        Some((
            *EG_SRC4.get(&key(tuple.src))?,
            *EG_DST4.get(&key(tuple.dst))?,
        ))
    }
    #[inline(always)]
    fn identity(src: &Addr4) -> IdentityRef {
        // SAFETY: the value is copied out at once; the agent replaces
        // entries whole.
        if let Some(found) = unsafe { EG_ID4_HOST.get(src) } {
            return *found;
        }
        EG_ID4
            .get(&Key::new(32, src.to_ne_bytes()))
            .copied()
            .unwrap_or_default()
    }
    #[inline(always)]
    fn country(dst: &Addr4) -> u32 {
        let addr = u32::from_be(*dst);
        geo::country4(
            geo_generation(),
            addr,
            |i| EG_GEO4.get(i).copied(),
            // SAFETY: the block is read at once, by value; the agent only
            // rewrites split blocks of the inactive generation.
            |key| unsafe { EG_GEO4_SPLIT.get(&key) }.map(|b| b.country(addr)),
        )
    }
    #[inline(always)]
    fn pick(pool: &Pool, hash: u64, _key: u64, out: &mut Addr4) -> Option<u16> {
        let (addr, slot) = pool.pick_v4(hash)?;
        *out = addr;
        Some(slot)
    }
    #[inline(always)]
    fn digest(addr: &Addr4) -> u64 {
        mix64(u64::from(*addr))
    }
    #[inline(always)]
    fn rewrite_addr(
        ctx: &TcContext,
        off: usize,
        old: Addr4,
        new: Addr4,
        csums: Csums,
    ) -> Result<(), Error> {
        // The outer header is in the linear data the program parsed it
        // from: written in place, checksum included, that spares two helper
        // calls on every translated packet. Anything else (a quoted header
        // deep in an ICMP error) goes through the helpers.
        if csums.ip == 0 || write_in_header(ctx, off, csums.ip, old, new).is_err() {
            helper(ctx.store(off, &new, 0))?;
            if csums.ip != 0 {
                helper(ctx.l3_csum_replace(csums.ip, u64::from(old), u64::from(new), 4))?;
            }
        }
        let (old, new) = (u64::from(old), u64::from(new));
        if csums.pseudo != 0 {
            helper(ctx.l4_csum_replace(
                csums.pseudo,
                old,
                new,
                u64::from(BPF_F_PSEUDO_HDR) | csums.pseudo_flags | 4,
            ))?;
        }
        for payload in csums.payload {
            if payload != 0 {
                helper(ctx.l3_csum_replace(payload, old, new, 4))?;
            }
        }
        Ok(())
    }
}

impl Family for Ipv6 {
    type Addr = Addr6;
    type CtPad = [u8; 4];
    type RevPad = [u8; 6];
    const ICMP_PSEUDO: bool = true;
    const SRC: usize = 8;
    const DST: usize = 24;
    const IP_CSUM: usize = 0;
    const UDP_CSUM_OPTIONAL: bool = false;

    #[inline(always)]
    fn parse(
        ctx: &TcContext,
        l3: usize,
        direction: Direction,
        out: &mut Packet<Self>,
    ) -> Result<(), Error> {
        parse::ipv6(ctx, l3, direction, out)
    }

    fn ct() -> &'static HashMap<Tuple<Addr6>, CtEntry<Addr6, [u8; 4]>> {
        &EG_CT6
    }
    fn rev() -> &'static HashMap<Tuple<Addr6>, RevEntry<Addr6, [u8; 6]>> {
        &EG_NAT6
    }
    fn frags() -> &'static LruHashMap<FragKey<Addr6>, FragEntry<Addr6>> {
        &EG_FRAG6
    }
    #[inline(always)]
    fn scratch() -> Option<*mut Scratch<Addr6, [u8; 4], [u8; 6]>> {
        EG_SCRATCH6.get_ptr_mut(0)
    }
    #[inline(always)]
    fn is_local(addr: &Addr6) -> bool {
        EG_LOCAL6.get_ptr(addr).is_some()
    }
    #[inline(always)]
    fn link_scoped(tuple: &Tuple<Addr6>) -> bool {
        let src0 = u32::from_be(tuple.src[0]);
        let unspecified = tuple.src[0] | tuple.src[1] | tuple.src[2] | tuple.src[3] == 0;
        unspecified || src0 >> 22 == 0x3fa || u32::from_be(tuple.dst[0]) >> 24 == 0xff
    }
    #[inline(always)]
    fn prefix_classes(generation: u8, tuple: &Tuple<Addr6>) -> Option<(u32, u32)> {
        let key = |addr: Addr6| {
            Key::new(
                GEN_PREFIX_BITS + 128,
                GenPrefix6 {
                    generation,
                    addr: bytes6(addr),
                },
            )
        };
        Some((
            *EG_SRC6.get(&key(tuple.src))?,
            *EG_DST6.get(&key(tuple.dst))?,
        ))
    }
    #[inline(always)]
    fn identity(src: &Addr6) -> IdentityRef {
        // SAFETY: as for IPv4.
        if let Some(found) = unsafe { EG_ID6_HOST.get(src) } {
            return *found;
        }
        EG_ID6
            .get(&Key::new(128, bytes6(*src)))
            .copied()
            .unwrap_or_default()
    }
    #[inline(always)]
    fn country(dst: &Addr6) -> u32 {
        let hi = u64::from(u32::from_be(dst[0])) << 32 | u64::from(u32::from_be(dst[1]));
        let lo = u64::from(u32::from_be(dst[2])) << 32 | u64::from(u32::from_be(dst[3]));
        let Some(bucket) = EG_GEO6_BKT.get(geo::bucket6_index(geo_generation(), hi)) else {
            return 0;
        };
        geo::country6(*bucket, hi, lo, |i| EG_GEO6.get(i).copied())
    }
    #[inline(always)]
    fn pick(pool: &Pool, _hash: u64, key: u64, out: &mut Addr6) -> Option<u16> {
        pool.pick_v6(key, out)
    }
    #[inline(always)]
    fn digest(addr: &Addr6) -> u64 {
        mix64(
            (u64::from(addr[0]) << 32 | u64::from(addr[1]))
                ^ mix64(u64::from(addr[2]) << 32 | u64::from(addr[3])),
        )
    }
    #[inline(always)]
    fn rewrite_addr(
        ctx: &TcContext,
        off: usize,
        old: Addr6,
        new: Addr6,
        csums: Csums,
    ) -> Result<(), Error> {
        helper(ctx.store(off, &new, 0))?;
        let mut from = old;
        let mut to = new;
        // SAFETY: both buffers are 16-byte stack arrays, sizes given in bytes.
        let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
        if diff < 0 {
            return Err(Error::Rewrite);
        }
        let diff = diff as u64;
        if csums.pseudo != 0 {
            // Size 0: `to` is a checksum difference, not a field value.
            helper(ctx.l4_csum_replace(
                csums.pseudo,
                0,
                diff,
                u64::from(BPF_F_PSEUDO_HDR) | csums.pseudo_flags,
            ))?;
        }
        for payload in csums.payload {
            if payload != 0 {
                helper(ctx.l3_csum_replace(payload, 0, diff, 0))?;
            }
        }
        Ok(())
    }
}

/// An IPv6 address (four words in network order) as the 16 bytes of an LPM
/// trie key.
#[inline(always)]
fn bytes6(addr: Addr6) -> [u8; 16] {
    // SAFETY: [u32; 4] and [u8; 16] have the same size; any bytes are valid.
    unsafe { core::mem::transmute(addr) }
}

/// The absolute offset of a field of the packet's own IP header.
pub const fn outer(off: usize) -> usize {
    L3_OFF + off
}
