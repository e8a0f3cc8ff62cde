//! Placing a compiled policy set into the dataplane's maps.
//!
//! Tables exist once per generation. `apply` writes the inactive generation
//! (only the entries that differ from what that generation last held), then
//! flips `EG_GEN` with one write: a new flow is classified entirely by the
//! old set or entirely by the new one. Established flows never consult these
//! tables, so a reload never moves them.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{Array, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key},
};
use egress_common::{
    classify::{
        ACTION_F_MARK, ACTIONS_PER_GEN, Action, ClassRow, GEN_PREFIX_BITS, GENERATIONS, GenPrefix4,
        MAX_POOLS, NO_MATCH, PORT_SLOTS_PER_GEN, Pool, Settings, action_slot, pool_slot,
    },
    maps,
    stats::{DEFAULT_STATS_SLOT, POLICY_STAT_SLOTS, PolicyStats},
};
use ipnet::Ipv4Net;

use crate::policy::{compile::Compiled, model::PolicySet};

#[derive(Debug, thiserror::Error)]
pub enum TablesError {
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("map {name} has an unexpected type or layout: {source}")]
    MapType {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("writing map {name}: {source}")]
    Write {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot size per-CPU counters: {source}")]
    Cpus {
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the policy set needs {needed} classifier classes but the dataplane holds {capacity} per generation (start the agent with a larger --max-classes)"
    )]
    TooManyClasses { needed: usize, capacity: u32 },
    #[error(
        "the policy set needs {needed} classifier prefixes but {map} holds {capacity} (start the agent with a larger --max-prefixes)"
    )]
    TooManyPrefixes {
        map: &'static str,
        needed: usize,
        capacity: u32,
    },
}

fn take<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, MapError>,
) -> Result<T, TablesError> {
    let map = ebpf
        .take_map(name)
        .ok_or(TablesError::MissingMap { name })?;
    convert(map).map_err(|source| TablesError::MapType { name, source })
}

fn write_err(name: &'static str) -> impl FnOnce(MapError) -> TablesError {
    move |source| TablesError::Write { name, source }
}

/// What one generation of the maps currently holds, so the next write to it
/// can be limited to the entries that change.
#[derive(Default)]
struct Shadow {
    src4: HashMap<Ipv4Net, u32>,
    dst4: HashMap<Ipv4Net, u32>,
    ports: Vec<u32>,
    classes: Vec<ClassRow>,
    actions: HashMap<u32, Action>,
    pools: Vec<Pool>,
    settings: Option<Settings>,
}

/// Entries written by the last `apply`, for the caller's log line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub generation: u32,
    pub writes: usize,
    pub deletes: usize,
    pub classes: usize,
}

/// A policy and the counter slot it counts into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActivePolicy {
    pub name: String,
    pub stats_slot: u32,
}

/// Writer for the classifier, action, pool and settings maps.
pub struct Tables {
    src4: LpmTrie<MapData, GenPrefix4, u32>,
    dst4: LpmTrie<MapData, GenPrefix4, u32>,
    ports: Array<MapData, u32>,
    classes: Array<MapData, ClassRow>,
    actions: Array<MapData, Action>,
    pools: Array<MapData, Pool>,
    settings: Array<MapData, Settings>,
    generation: Array<MapData, u32>,
    policy_stats: PerCpuArray<MapData, PolicyStats>,
    classes_per_gen: u32,
    prefix_capacity: u32,
    shadow: [Shadow; GENERATIONS as usize],
    active: Option<u32>,
    /// Counter slot per policy name, stable across reloads.
    slots: HashMap<String, u32>,
    active_policies: Vec<ActivePolicy>,
    last_flip: Option<Instant>,
}

/// Packets classified against a generation finish within microseconds (TC
/// programs run in softirq context, without preemption). Waiting this long
/// after a flip before rewriting the now-inactive generation means no packet
/// can still be reading it.
const GRACE: Duration = Duration::from_millis(20);

impl Tables {
    /// Take the policy maps out of a loaded object.
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, TablesError> {
        let classes: Array<MapData, ClassRow> = take(ebpf, maps::CLASSES, Array::try_from)?;
        let classes_per_gen = classes.len() / GENERATIONS;
        let src4: LpmTrie<MapData, GenPrefix4, u32> = take(ebpf, maps::SRC4, LpmTrie::try_from)?;
        let prefix_capacity = aya::maps::IterableMap::map(&src4)
            .info()
            .map_err(|source| TablesError::MapType {
                name: maps::SRC4,
                source,
            })?
            .max_entries();
        Ok(Self {
            src4,
            dst4: take(ebpf, maps::DST4, LpmTrie::try_from)?,
            ports: take(ebpf, maps::PORTS, Array::try_from)?,
            classes,
            actions: take(ebpf, maps::ACTIONS, Array::try_from)?,
            pools: take(ebpf, maps::POOLS, Array::try_from)?,
            settings: take(ebpf, maps::SETTINGS, Array::try_from)?,
            generation: take(ebpf, maps::GEN, Array::try_from)?,
            policy_stats: take(ebpf, maps::POLICY_STATS, PerCpuArray::try_from)?,
            classes_per_gen,
            prefix_capacity,
            shadow: Default::default(),
            active: None,
            slots: HashMap::new(),
            active_policies: Vec::new(),
            last_flip: None,
        })
    }

    /// The generation new flows are classified against, once one was applied.
    pub fn active_generation(&self) -> Option<u32> {
        self.active
    }

    /// Policies of the active set with their counter slots, in list order.
    pub fn active_policies(&self) -> &[ActivePolicy] {
        &self.active_policies
    }

    /// Check that a compiled set fits the maps, without writing anything.
    pub fn check_fits(&self, compiled: &Compiled) -> Result<(), TablesError> {
        if compiled.classes.len() > self.classes_per_gen as usize {
            return Err(TablesError::TooManyClasses {
                needed: compiled.classes.len(),
                capacity: self.classes_per_gen,
            });
        }
        // Both generations share one trie; the inactive one must fit beside
        // the active one.
        for (map, entries) in [(maps::SRC4, &compiled.src4), (maps::DST4, &compiled.dst4)] {
            let active = self
                .active
                .map(|g| {
                    let s = &self.shadow[g as usize];
                    if map == maps::SRC4 {
                        s.src4.len()
                    } else {
                        s.dst4.len()
                    }
                })
                .unwrap_or(0);
            if active + entries.len() > self.prefix_capacity as usize {
                return Err(TablesError::TooManyPrefixes {
                    map,
                    needed: active + entries.len(),
                    capacity: self.prefix_capacity,
                });
            }
        }
        Ok(())
    }

    /// Assign counter slots: a policy keeps its slot across reloads by name;
    /// a new name gets a slot used by neither the active nor the new set,
    /// with its counters zeroed.
    fn assign_slots(&mut self, set: &PolicySet) -> Result<Vec<u32>, TablesError> {
        let in_use: std::collections::HashSet<u32> =
            self.active_policies.iter().map(|p| p.stats_slot).collect();
        let mut taken: std::collections::HashSet<u32> = in_use.clone();
        taken.insert(DEFAULT_STATS_SLOT);
        for p in &set.policies {
            if let Some(&slot) = self.slots.get(&p.name) {
                taken.insert(slot);
            }
        }
        let mut next_free = 1..POLICY_STAT_SLOTS;
        let mut out = Vec::with_capacity(set.policies.len());
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| TablesError::Cpus { source })?;
        for p in &set.policies {
            let slot = match self.slots.get(&p.name) {
                Some(&slot) => slot,
                None => {
                    let slot = next_free
                        .find(|s| !taken.contains(s))
                        .expect("two policy sets never need more than POLICY_STAT_SLOTS slots");
                    taken.insert(slot);
                    let zero = PerCpuValues::try_from(vec![PolicyStats::default(); cpus])
                        .map_err(|source| TablesError::Cpus { source })?;
                    self.policy_stats
                        .set(slot, zero, 0)
                        .map_err(write_err(maps::POLICY_STATS))?;
                    self.slots.insert(p.name.clone(), slot);
                    slot
                }
            };
            out.push(slot);
        }
        // Forget names that are in neither set, so their slots can be reused.
        let keep: std::collections::HashSet<u32> = in_use
            .union(&out.iter().copied().collect())
            .copied()
            .collect();
        self.slots.retain(|_, slot| keep.contains(slot));
        Ok(out)
    }

    /// Write `compiled` into the inactive generation and make it active.
    pub fn apply(
        &mut self,
        set: &PolicySet,
        compiled: &Compiled,
    ) -> Result<ApplyReport, TablesError> {
        self.check_fits(compiled)?;
        let generation = self.active.map_or(0, |g| 1 - g);
        if let Some(flip) = self.last_flip {
            let since = flip.elapsed();
            if since < GRACE {
                std::thread::sleep(GRACE - since);
            }
        }
        let slots = self.assign_slots(set)?;
        let mut report = ApplyReport {
            generation,
            classes: compiled.classes.len(),
            ..ApplyReport::default()
        };
        let base = generation * self.classes_per_gen;
        let shadow = &mut self.shadow[generation as usize];

        // Class rows first: the tries and the port table point into them.
        for (k, row) in compiled.classes.iter().enumerate() {
            if shadow.classes.get(k) != Some(row) {
                self.classes
                    .set(base + k as u32, row, 0)
                    .map_err(write_err(maps::CLASSES))?;
                report.writes += 1;
            }
        }
        shadow.classes = compiled.classes.clone();

        for (trie, name, entries, held) in [
            (&mut self.src4, maps::SRC4, &compiled.src4, &mut shadow.src4),
            (&mut self.dst4, maps::DST4, &compiled.dst4, &mut shadow.dst4),
        ] {
            let next: HashMap<Ipv4Net, u32> = entries
                .iter()
                .map(|(net, class)| (*net, base + class))
                .collect();
            // Deletions first, so the trie never holds more than the active
            // generation plus the new one (what check_fits verified).
            for net in held.keys().filter(|n| !next.contains_key(*n)) {
                trie.remove(&trie_key(generation, *net))
                    .map_err(write_err(name))?;
                report.deletes += 1;
            }
            for (net, value) in &next {
                if held.get(net) != Some(value) {
                    trie.insert(&trie_key(generation, *net), *value, 0)
                        .map_err(write_err(name))?;
                    report.writes += 1;
                }
            }
            *held = next;
        }

        let port_base = generation * PORT_SLOTS_PER_GEN;
        for (slot, class) in compiled.ports.iter().enumerate() {
            let value = base + class;
            if shadow.ports.get(slot) != Some(&value) {
                self.ports
                    .set(port_base + slot as u32, value, 0)
                    .map_err(write_err(maps::PORTS))?;
                report.writes += 1;
            }
        }
        shadow.ports = compiled.ports.iter().map(|c| base + c).collect();

        let mut actions: Vec<(u32, Action)> = compiled
            .actions
            .iter()
            .zip(&slots)
            .enumerate()
            .map(|(i, (spec, slot))| (i as u32, action(spec, *slot, i as u32)))
            .collect();
        actions.push((
            NO_MATCH,
            action(&compiled.default_action, DEFAULT_STATS_SLOT, NO_MATCH),
        ));
        for (policy, value) in actions {
            if shadow.actions.get(&policy) != Some(&value) {
                self.actions
                    .set(action_slot(generation, policy), value, 0)
                    .map_err(write_err(maps::ACTIONS))?;
                shadow.actions.insert(policy, value);
                report.writes += 1;
            }
        }
        debug_assert!(compiled.actions.len() < ACTIONS_PER_GEN as usize);

        for (i, pool) in compiled.pools.iter().enumerate() {
            debug_assert!(i < MAX_POOLS as usize);
            if shadow.pools.get(i) != Some(pool) {
                self.pools
                    .set(pool_slot(generation, i as u32), pool, 0)
                    .map_err(write_err(maps::POOLS))?;
                report.writes += 1;
            }
        }
        shadow.pools = compiled.pools.clone();

        if shadow.settings != Some(compiled.settings) {
            self.settings
                .set(generation, compiled.settings, 0)
                .map_err(write_err(maps::SETTINGS))?;
            shadow.settings = Some(compiled.settings);
            report.writes += 1;
        }

        // The switch: one write, after everything it points to is in place.
        self.generation
            .set(0, generation, 0)
            .map_err(write_err(maps::GEN))?;
        self.active = Some(generation);
        self.last_flip = Some(Instant::now());
        self.active_policies = set
            .policies
            .iter()
            .zip(slots)
            .map(|(p, stats_slot)| ActivePolicy {
                name: p.name.clone(),
                stats_slot,
            })
            .collect();
        Ok(report)
    }

    /// Per-policy counters summed over CPUs.
    pub fn policy_stats(&self, slot: u32) -> Result<PolicyStats, TablesError> {
        let values = self
            .policy_stats
            .get(&slot, 0)
            .map_err(write_err(maps::POLICY_STATS))?;
        Ok(values.iter().fold(PolicyStats::default(), |mut sum, v| {
            sum.flows += v.flows;
            sum.packets_out += v.packets_out;
            sum.bytes_out += v.bytes_out;
            sum.packets_in += v.packets_in;
            sum.bytes_in += v.bytes_in;
            sum
        }))
    }
}

fn trie_key(generation: u32, net: Ipv4Net) -> Key<GenPrefix4> {
    Key::new(
        GEN_PREFIX_BITS + u32::from(net.prefix_len()),
        GenPrefix4 {
            generation: generation as u8,
            addr: net.network().octets(),
        },
    )
}

fn action(spec: &crate::policy::compile::ActionSpec, stats_slot: u32, policy: u32) -> Action {
    Action {
        kind: spec.kind,
        flags: if spec.mark.is_some() {
            ACTION_F_MARK
        } else {
            0
        },
        mark: spec.mark.unwrap_or(0),
        pool: spec.pool,
        stats_slot,
        policy,
    }
}

/// Addresses of the gateway itself, whose own flows are never steered.
pub fn set_local_addrs(ebpf: &mut Ebpf, addrs: &[Ipv4Addr]) -> Result<(), TablesError> {
    let map = ebpf
        .map_mut(maps::LOCAL4)
        .ok_or(TablesError::MissingMap { name: maps::LOCAL4 })?;
    let mut local: aya::maps::HashMap<&mut MapData, u32, u32> =
        aya::maps::HashMap::try_from(map).map_err(|source| TablesError::MapType {
            name: maps::LOCAL4,
            source,
        })?;
    let wanted: Vec<u32> = addrs.iter().map(|a| u32::from(*a).to_be()).collect();
    // Add before removing, so an address present in both lists is never
    // briefly missing.
    for key in &wanted {
        local.insert(key, 1, 0).map_err(write_err(maps::LOCAL4))?;
    }
    let stale: Vec<u32> = local
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !wanted.contains(k))
        .collect();
    for key in stale {
        local.remove(&key).map_err(write_err(maps::LOCAL4))?;
    }
    Ok(())
}
