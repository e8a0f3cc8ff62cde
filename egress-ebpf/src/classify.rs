// SPDX-License-Identifier: GPL-2.0 OR MIT
//! First-packet classification: per-dimension lookups in the active
//! generation, AND of the class rows, first set bit -> the policy's action.
//! Never touches the packet.

use aya_ebpf::maps::lpm_trie::Key;
use egress_common::{
    classify::{
        Action, GEN_PREFIX_BITS, GenPrefix4, Pool, Settings, action_slot, first_match, pool_slot,
        port_slot,
    },
    flow::Tuple4,
};

use crate::{
    error::Error,
    maps::{EG_ACTIONS, EG_CLASSES, EG_DST4, EG_GEN, EG_POOLS, EG_PORTS, EG_SETTINGS, EG_SRC4},
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

/// The action of the first policy, in list order, that matches the flow.
#[inline(always)]
pub fn classify_v4(generation: Generation, tuple: &Tuple4) -> Result<&'static Action, Error> {
    let src = prefix_class(&EG_SRC4, generation, tuple.src_be)?;
    let dst = prefix_class(&EG_DST4, generation, tuple.dst_be)?;
    let port = *EG_PORTS
        .get(port_slot(
            generation.0,
            tuple.proto,
            u16::from_be(tuple.dport_be),
        ))
        .ok_or(Error::NoTables)?;
    let rows = [
        EG_CLASSES.get(src).ok_or(Error::NoTables)?,
        EG_CLASSES.get(dst).ok_or(Error::NoTables)?,
        EG_CLASSES.get(port).ok_or(Error::NoTables)?,
    ];
    let policy = first_match(&rows);
    EG_ACTIONS
        .get(action_slot(generation.0, policy))
        .ok_or(Error::NoTables)
}
