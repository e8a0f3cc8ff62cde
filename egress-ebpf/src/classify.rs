// SPDX-License-Identifier: GPL-2.0 OR MIT
//! First-packet classification: per-dimension lookups in the active
//! generation, AND of the class rows, first set bit -> the rule's action.
//! Never touches the packet.

use egress_common::{
    classify::{
        Action, IdentityRef, Pool, Settings, action_slot, country_slot, first_match, identity_slot,
        pool_slot, port_slot,
    },
    flow::Tuple,
};

use crate::{
    error::Error,
    family::Family,
    maps::{
        EG_ACTIONS, EG_CLASSES, EG_GEN, EG_GEO_CLASS, EG_ID_CLASS, EG_POOLS, EG_PORTS, EG_SETTINGS,
    },
};

/// The policy set a new flow is classified against, read once per flow so
/// that every lookup below sees the same generation.
#[derive(Clone, Copy)]
pub struct Generation(u32);

impl Generation {
    #[inline(always)]
    pub fn active() -> Result<Self, Error> {
        EG_GEN
            .get(egress_common::geo::GEN_SLOT_POLICY)
            .map(|g| Self(*g & 1))
            .ok_or(Error::NoTables)
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

/// The action of the first rule, in list order, that matches the flow: one
/// lookup per dimension (source prefix, destination prefix, protocol+port,
/// identity, country), then the AND of the five class rows. The identity
/// behind the source is written to `identity` (id 0: none). `None` means the
/// active generation's tables are missing.
///
/// A separate BPF function with a register-sized result, so its lookup keys
/// live in their own stack frame.
#[inline(never)]
pub fn classify<F: Family>(
    generation: Generation,
    tuple: &Tuple<F::Addr>,
    identity: &mut IdentityRef,
) -> Option<&'static Action> {
    let settings = generation.settings().ok()?;
    // Every generation holds a /0 in each trie, so a miss means the tables
    // are not (or no longer) loaded.
    let (src, dst) = F::prefix_classes(generation.0 as u8, tuple)?;
    let port = *EG_PORTS.get(port_slot(
        generation.0,
        tuple.proto,
        u16::from_be(tuple.dport_be),
    ))?;
    let found = F::identity(&tuple.src);
    // An identity id beyond the table (written before the tables grew) is
    // treated as no identity rather than indexing another generation.
    let id = if found.id < settings.identity_slots {
        found.id
    } else {
        0
    };
    *identity = IdentityRef { id, key: found.key };
    let identity_class =
        *EG_ID_CLASS.get(identity_slot(generation.0, settings.identity_slots, id))?;
    let country = *EG_GEO_CLASS.get(country_slot(generation.0, F::country(&tuple.dst)))?;
    let rows = [
        EG_CLASSES.get(src)?,
        EG_CLASSES.get(dst)?,
        EG_CLASSES.get(port)?,
        EG_CLASSES.get(identity_class)?,
        EG_CLASSES.get(country)?,
    ];
    let rule = first_match(&rows);
    EG_ACTIONS.get(action_slot(generation.0, rule))
}
