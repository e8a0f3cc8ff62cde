// SPDX-License-Identifier: GPL-2.0 OR MIT
//! First-packet classification: per-dimension lookups in the active
//! generation, AND of the class rows, first set bit -> the policy's action.
//! Never touches the packet.

use aya_ebpf::maps::lpm_trie::Key;
use egress_common::{
    classify::{
        Action, GEN_PREFIX_BITS, GenPrefix4, Pool, Settings, action_slot, country_slot,
        first_match, identity_slot, pool_slot, port_slot,
    },
    flow::Tuple4,
};

use crate::{
    error::Error,
    maps::{
        EG_ACTIONS, EG_CLASSES, EG_DST4, EG_GEN, EG_GEO_CLASS, EG_GEO4, EG_ID_CLASS, EG_ID4,
        EG_POOLS, EG_PORTS, EG_SETTINGS, EG_SRC4,
    },
};

/// The policy set a new flow is classified against, read once per flow so
/// that every lookup below sees the same generation.
#[derive(Clone, Copy)]
pub struct Generation(u32);

impl Generation {
    #[inline(always)]
    pub fn active() -> Result<Self, Error> {
        EG_GEN.get(0).map(|g| Self(*g & 1)).ok_or(Error::NoTables)
    }

    pub fn id(self) -> u32 {
        self.0
    }

    #[inline(always)]
    pub fn settings(self) -> Result<&'static Settings, Error> {
        EG_SETTINGS.get(self.0).ok_or(Error::NoTables)
    }

    #[inline(always)]
    pub fn pool(self, pool: u32) -> Result<&'static Pool, Error> {
        EG_POOLS.get(pool_slot(self.0, pool)).ok_or(Error::NoTables)
    }
}

#[inline(always)]
fn prefix_class(
    trie: &aya_ebpf::maps::LpmTrie<GenPrefix4, u32>,
    generation: Generation,
    addr_be: u32,
) -> Result<u32, Error> {
    let key = Key::new(
        GEN_PREFIX_BITS + 32,
        GenPrefix4 {
            generation: generation.0 as u8,
            addr: addr_be.to_ne_bytes(),
        },
    );
    // Every generation holds a /0 entry, so a miss means the tables are not
    // (or no longer) loaded.
    trie.get(&key).copied().ok_or(Error::NoTables)
}

/// The identity id behind a source address (0: none known).
#[inline(always)]
fn identity_v4(addr_be: u32) -> u32 {
    EG_ID4
        .get(&Key::new(32, addr_be.to_ne_bytes()))
        .copied()
        .unwrap_or(0)
}

/// The country id of a destination address (0: unknown).
#[inline(always)]
fn country_v4(addr_be: u32) -> u32 {
    EG_GEO4
        .get(&Key::new(32, addr_be.to_ne_bytes()))
        .copied()
        .unwrap_or(0)
}

/// The action of the first rule, in list order, that matches the flow: one
/// lookup per dimension (source prefix, destination prefix, protocol+port,
/// identity, country), then the AND of the five class rows.
#[inline(always)]
pub fn classify_v4(generation: Generation, tuple: &Tuple4) -> Result<&'static Action, Error> {
    let settings = generation.settings()?;
    let src = prefix_class(&EG_SRC4, generation, tuple.src_be)?;
    let dst = prefix_class(&EG_DST4, generation, tuple.dst_be)?;
    let port = *EG_PORTS
        .get(port_slot(
            generation.0,
            tuple.proto,
            u16::from_be(tuple.dport_be),
        ))
        .ok_or(Error::NoTables)?;
    // An identity id beyond the table (written before the tables grew) is
    // treated as no identity rather than indexing another generation.
    let mut identity = identity_v4(tuple.src_be);
    if identity >= settings.identity_slots {
        identity = 0;
    }
    let identity = *EG_ID_CLASS
        .get(identity_slot(
            generation.0,
            settings.identity_slots,
            identity,
        ))
        .ok_or(Error::NoTables)?;
    let country = *EG_GEO_CLASS
        .get(country_slot(generation.0, country_v4(tuple.dst_be)))
        .ok_or(Error::NoTables)?;
    let rows = [
        EG_CLASSES.get(src).ok_or(Error::NoTables)?,
        EG_CLASSES.get(dst).ok_or(Error::NoTables)?,
        EG_CLASSES.get(port).ok_or(Error::NoTables)?,
        EG_CLASSES.get(identity).ok_or(Error::NoTables)?,
        EG_CLASSES.get(country).ok_or(Error::NoTables)?,
    ];
    let rule = first_match(&rows);
    EG_ACTIONS
        .get(action_slot(generation.0, rule))
        .ok_or(Error::NoTables)
}
