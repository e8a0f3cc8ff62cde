//! Placing a compiled policy set into the dataplane's maps.
//!
//! Tables exist once per generation. `apply` writes the inactive generation
//! (only the entries that differ from what that generation last held), then
//! flips `EG_GEN` with one write: a new flow is classified entirely by the
//! old set or entirely by the new one. Established flows never consult these
//! tables, so a reload never moves them.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    net::IpAddr,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, Pod,
    maps::{
        Array, IterableMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key,
    },
};
use egress_common::{
    classify::{
        ACTION_F_MARK, ACTIONS_PER_GEN, Action, COUNTRY_SLOTS, ClassRow, GEN_PREFIX_BITS,
        GENERATIONS, GenPrefix4, GenPrefix6, MAX_POOLS, NO_MATCH, PORT_SLOTS_PER_GEN, Pool,
        Settings, action_slot, country_slot, identity_slot, pool_slot,
    },
    maps,
    stats::{ADDR_STAT_SLOTS, AddrStats, DEFAULT_STATS_SLOT, POLICY_STAT_SLOTS, PolicyStats},
};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::{
    policy::{
        compile::{ActionSpec, Compiled},
        model::PolicySet,
    },
    slot_names::SlotNames,
};

mod adopt;

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
        "the policy set needs {needed} prefixes in {map} but it holds {capacity} (start the agent with a larger --max-prefixes)"
    )]
    TooManyPrefixes {
        map: &'static str,
        needed: usize,
        capacity: u32,
    },
    #[error(
        "{needed} identities are known but the dataplane holds {capacity} (start the agent with a larger --max-identities)"
    )]
    TooManyIdentities { needed: usize, capacity: u32 },
    #[error(
        "more than {capacity} distinct egress addresses have been used; restart the agent to reclaim their counter slots"
    )]
    TooManyAddresses { capacity: u32 },
    #[error(
        "egress_pools.{pool}.interface: no interface {interface:?} in the agent's network namespace"
    )]
    NoSuchInterface { pool: String, interface: String },
    #[error("{map} holds {capacity} prefixes, {needed} were given")]
    TableFull {
        map: &'static str,
        needed: usize,
        capacity: u32,
    },
}

pub(crate) fn take<T>(
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

fn capacity(map: &MapData, name: &'static str) -> Result<u32, TablesError> {
    Ok(map
        .info()
        .map_err(|source| TablesError::MapType { name, source })?
        .max_entries())
}

/// What one generation of the maps currently holds, so the next write to it
/// can be limited to the entries that change.
#[derive(Default)]
struct Shadow {
    src4: HashMap<Ipv4Net, u32>,
    src6: HashMap<Ipv6Net, u32>,
    dst4: HashMap<Ipv4Net, u32>,
    dst6: HashMap<Ipv6Net, u32>,
    ports: Vec<u32>,
    identities: Vec<u32>,
    countries: Vec<u32>,
    classes: Vec<ClassRow>,
    actions: Vec<Action>,
    default_action: Option<Action>,
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
    pub rules: usize,
}

/// A policy and the counter slot it counts into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActivePolicy {
    pub name: String,
    pub stats_slot: u32,
}

/// Write only the elements of `new` that differ from `held`, at `base + i`.
/// `held` follows every write, so after a failure it still says what the
/// map holds and the next attempt rewrites exactly what is missing.
fn sync_array<V: Pod + PartialEq>(
    map: &mut Array<MapData, V>,
    name: &'static str,
    base: u32,
    new: &[V],
    held: &mut Vec<V>,
) -> Result<usize, TablesError> {
    let mut writes = 0;
    for (i, value) in new.iter().enumerate() {
        if held.get(i) != Some(value) {
            map.set(base + i as u32, value, 0)
                .map_err(write_err(name))?;
            // Elements before `i` are all in `held`, so `i <= held.len()`.
            match held.get_mut(i) {
                Some(slot) => *slot = *value,
                None => held.push(*value),
            }
            writes += 1;
        }
    }
    held.truncate(new.len());
    Ok(writes)
}

/// Make a generation's part of a trie hold exactly `new`: deletions first,
/// so the trie never holds more than the active generation plus the new one
/// (what `check_fits` verified).
fn sync_trie<N: Copy + Eq + Hash, K: Pod>(
    trie: &mut LpmTrie<MapData, K, u32>,
    name: &'static str,
    key: impl Fn(N) -> Key<K>,
    new: &[(N, u32)],
    base: u32,
    held: &mut HashMap<N, u32>,
) -> Result<(usize, usize), TablesError> {
    let next: HashMap<N, u32> = new.iter().map(|(n, class)| (*n, base + class)).collect();
    let (mut writes, mut deletes) = (0, 0);
    // `held` follows every write, as in `sync_array`.
    let stale: Vec<N> = held
        .keys()
        .filter(|n| !next.contains_key(*n))
        .copied()
        .collect();
    for net in stale {
        trie.remove(&key(net)).map_err(write_err(name))?;
        held.remove(&net);
        deletes += 1;
    }
    for (net, value) in next {
        if held.get(&net) != Some(&value) {
            trie.insert(&key(net), value, 0).map_err(write_err(name))?;
            held.insert(net, value);
            writes += 1;
        }
    }
    Ok((writes, deletes))
}

fn key4(generation: u32) -> impl Fn(Ipv4Net) -> Key<GenPrefix4> {
    move |net| {
        Key::new(
            GEN_PREFIX_BITS + u32::from(net.prefix_len()),
            GenPrefix4 {
                generation: generation as u8,
                addr: net.network().octets(),
            },
        )
    }
}

fn key6(generation: u32) -> impl Fn(Ipv6Net) -> Key<GenPrefix6> {
    move |net| {
        Key::new(
            GEN_PREFIX_BITS + u32::from(net.prefix_len()),
            GenPrefix6 {
                generation: generation as u8,
                addr: net.network().octets(),
            },
        )
    }
}

/// Writer for the classifier, action, pool and settings maps.
pub struct Tables {
    src4: LpmTrie<MapData, GenPrefix4, u32>,
    dst4: LpmTrie<MapData, GenPrefix4, u32>,
    src6: LpmTrie<MapData, GenPrefix6, u32>,
    dst6: LpmTrie<MapData, GenPrefix6, u32>,
    ports: Array<MapData, u32>,
    identities: Array<MapData, u32>,
    countries: Array<MapData, u32>,
    classes: Array<MapData, ClassRow>,
    actions: Array<MapData, Action>,
    pools: Array<MapData, Pool>,
    settings: Array<MapData, Settings>,
    generation: Array<MapData, u32>,
    policy_stats: PerCpuArray<MapData, PolicyStats>,
    addr_stats: PerCpuArray<MapData, AddrStats>,
    /// Counter slot per egress address (an IPv4 address or an IPv6 range,
    /// as text), stable across reloads; slot 0 counts untranslated flows.
    addr_slots: HashMap<String, u16>,
    /// Dedicated IPv4 addresses health checks found down.
    down: HashSet<std::net::Ipv4Addr>,
    classes_per_gen: u32,
    identity_slots: u32,
    prefix_capacity: u32,
    shadow: [Shadow; GENERATIONS as usize],
    /// The generation this agent last wrote and flipped to (its shadow is
    /// complete).
    active: Option<u32>,
    /// The generation the programs read: `active` once this agent has
    /// flipped, before that the one an earlier agent left active (tables
    /// taken over from pins), which must not be written.
    live: u32,
    /// Counter slot per policy name, stable across reloads.
    slots: HashMap<String, u32>,
    active_policies: Vec<ActivePolicy>,
    last_flip: Option<Instant>,
    /// Slot names for inspection (`EG_POLICY_NAMES`, `EG_ADDR_NAMES`).
    names: SlotNames,
}

/// Packets classified against a generation finish within microseconds (TC
/// programs run in softirq context, without preemption). Waiting this long
/// after a flip before rewriting the now-inactive generation means no packet
/// can still be reading it.
const GRACE: Duration = Duration::from_millis(20);

impl Tables {
    /// Take the policy maps out of a loaded object. Maps an earlier agent
    /// left pinned are taken over: the generation its programs read stays
    /// untouched until the first `apply` flips away from it, the prefixes
    /// it left in the other generation are removed by that write, and
    /// policies and egress addresses keep their counter slots.
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, TablesError> {
        let classes: Array<MapData, ClassRow> = take(ebpf, maps::CLASSES, Array::try_from)?;
        let identities: Array<MapData, u32> = take(ebpf, maps::ID_CLASS, Array::try_from)?;
        let src4: LpmTrie<MapData, GenPrefix4, u32> = take(ebpf, maps::SRC4, LpmTrie::try_from)?;
        let dst4: LpmTrie<MapData, GenPrefix4, u32> = take(ebpf, maps::DST4, LpmTrie::try_from)?;
        let src6: LpmTrie<MapData, GenPrefix6, u32> = take(ebpf, maps::SRC6, LpmTrie::try_from)?;
        let dst6: LpmTrie<MapData, GenPrefix6, u32> = take(ebpf, maps::DST6, LpmTrie::try_from)?;
        let settings = take(ebpf, maps::SETTINGS, Array::try_from)?;
        let generation = take(ebpf, maps::GEN, Array::try_from)?;
        let prefix_capacity = capacity(src4.map(), maps::SRC4)?;
        let (live, taken_over) = adopt::live_generation(&generation, &settings)?;
        let mut shadow: [Shadow; GENERATIONS as usize] = Default::default();
        let (mut slots, mut addr_slots) = (HashMap::new(), HashMap::new());
        if taken_over {
            adopt::read_tries(&mut shadow, (&src4, &dst4), (&src6, &dst6))?;
            slots.extend(adopt::policy_slots(ebpf)?);
            addr_slots.extend(adopt::addr_slots(ebpf)?);
            log::info!(
                "policy tables taken over from an earlier agent: generation {live} stays active until the first write; {} policy and {} egress-address counter slots kept",
                slots.len(),
                addr_slots.len()
            );
        }
        // Until the first apply, the slots the earlier agent's policies
        // count into (its established flows still do) are not handed out.
        let active_policies = slots
            .iter()
            .map(|(name, &stats_slot)| ActivePolicy {
                name: name.clone(),
                stats_slot,
            })
            .collect();
        Ok(Self {
            classes_per_gen: classes.len() / GENERATIONS,
            identity_slots: identities.len() / GENERATIONS,
            prefix_capacity,
            src4,
            dst4,
            src6,
            dst6,
            ports: take(ebpf, maps::PORTS, Array::try_from)?,
            identities,
            countries: take(ebpf, maps::GEO_CLASS, Array::try_from)?,
            classes,
            actions: take(ebpf, maps::ACTIONS, Array::try_from)?,
            pools: take(ebpf, maps::POOLS, Array::try_from)?,
            settings,
            generation,
            policy_stats: take(ebpf, maps::POLICY_STATS, PerCpuArray::try_from)?,
            addr_stats: take(ebpf, maps::ADDR_STATS, PerCpuArray::try_from)?,
            addr_slots,
            down: HashSet::new(),
            shadow,
            active: None,
            live,
            slots,
            active_policies,
            last_flip: None,
            names: SlotNames::new(ebpf)?,
        })
    }

    /// Give identity ids their class rows in the active generation, without
    /// a reload: for identities that appear between reloads (sessions).
    /// A row the generation lacks is appended to its class table (the
    /// slots past the compiled rows are unused, so no packet sees a
    /// half-written row). Checks capacity before writing anything.
    /// Returns the entries written.
    pub fn set_identity_classes(&mut self, rows: &[(u32, ClassRow)]) -> Result<usize, TablesError> {
        let Some(generation) = self.active else {
            return Ok(0);
        };
        if let Some(&(id, _)) = rows.iter().find(|(id, _)| *id >= self.identity_slots) {
            return Err(TablesError::TooManyIdentities {
                needed: id as usize,
                capacity: self.identity_slots - 1,
            });
        }
        let mut index = self.active_class_index(generation);
        self.check_rows_fit(generation, &index, rows.iter().map(|(_, row)| row))?;
        let shadow = &mut self.shadow[generation as usize];
        let base = generation * self.classes_per_gen;
        let mut writes = 0;
        for (id, row) in rows {
            let class = match index.get(row) {
                Some(&class) => class,
                None => {
                    let class = shadow.classes.len() as u32;
                    self.classes
                        .set(base + class, row, 0)
                        .map_err(write_err(maps::CLASSES))?;
                    shadow.classes.push(*row);
                    index.insert(*row, class);
                    writes += 1;
                    class
                }
            };
            let value = base + class;
            let slot = *id as usize;
            if shadow.identities.get(slot) != Some(&value) {
                self.identities
                    .set(
                        identity_slot(generation, self.identity_slots, *id),
                        value,
                        0,
                    )
                    .map_err(write_err(maps::ID_CLASS))?;
                if shadow.identities.len() <= slot {
                    // Unwritten ids in between: a value no class has, so a
                    // later sync rewrites them.
                    shadow.identities.resize(slot + 1, u32::MAX);
                }
                shadow.identities[slot] = value;
                writes += 1;
            }
        }
        Ok(writes)
    }

    /// Check that identity class rows would fit the active generation's
    /// class table, without writing anything.
    pub fn check_identity_rows(&self, rows: &[ClassRow]) -> Result<(), TablesError> {
        match self.active {
            Some(generation) => {
                let index = self.active_class_index(generation);
                self.check_rows_fit(generation, &index, rows.iter())
            }
            None => Ok(()),
        }
    }

    fn active_class_index(&self, generation: u32) -> HashMap<ClassRow, u32> {
        let held = &self.shadow[generation as usize].classes;
        let mut index = HashMap::with_capacity(held.len());
        for (i, row) in held.iter().enumerate() {
            index.entry(*row).or_insert(i as u32);
        }
        index
    }

    fn check_rows_fit<'a>(
        &self,
        generation: u32,
        index: &HashMap<ClassRow, u32>,
        rows: impl Iterator<Item = &'a ClassRow>,
    ) -> Result<(), TablesError> {
        let new_rows: HashSet<&ClassRow> = rows.filter(|row| !index.contains_key(*row)).collect();
        let needed = self.shadow[generation as usize].classes.len() + new_rows.len();
        if needed > self.classes_per_gen as usize {
            return Err(TablesError::TooManyClasses {
                needed,
                capacity: self.classes_per_gen,
            });
        }
        Ok(())
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
        if compiled.identities.len() > self.identity_slots as usize {
            return Err(TablesError::TooManyIdentities {
                needed: compiled.identities.len() - 1,
                capacity: self.identity_slots - 1,
            });
        }
        // Both generations share a trie; the new one must fit beside the active one.
        // The trie shadows of the live generation are complete even before
        // the first apply (read back when taken over, empty when fresh).
        let active = Some(&self.shadow[self.live as usize]);
        for (map, held, needed) in [
            (
                maps::SRC4,
                active.map_or(0, |s| s.src4.len()),
                compiled.src4.len(),
            ),
            (
                maps::DST4,
                active.map_or(0, |s| s.dst4.len()),
                compiled.dst4.len(),
            ),
            (
                maps::SRC6,
                active.map_or(0, |s| s.src6.len()),
                compiled.src6.len(),
            ),
            (
                maps::DST6,
                active.map_or(0, |s| s.dst6.len()),
                compiled.dst6.len(),
            ),
        ] {
            if held + needed > self.prefix_capacity as usize {
                return Err(TablesError::TooManyPrefixes {
                    map,
                    needed: held + needed,
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
        let in_use: HashSet<u32> = self.active_policies.iter().map(|p| p.stats_slot).collect();
        let mut taken = in_use.clone();
        taken.insert(DEFAULT_STATS_SLOT);
        // Every remembered name keeps its slot to itself, so two names can
        // never end up sharing one.
        taken.extend(self.slots.values().copied());
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| TablesError::Cpus { source })?;
        let mut next_free = 1..POLICY_STAT_SLOTS;
        let mut out = Vec::with_capacity(set.policies.len());
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
                    self.names.set_policy(slot, &p.name)?;
                    self.slots.insert(p.name.clone(), slot);
                    slot
                }
            };
            out.push(slot);
        }
        // Forget names in neither set, so their slots can be reused later.
        let keep: HashSet<u32> = in_use
            .union(&out.iter().copied().collect())
            .copied()
            .collect();
        for (_, &slot) in self.slots.iter().filter(|(_, s)| !keep.contains(s)) {
            self.names.set_policy(slot, "")?;
        }
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
        let generation = 1 - self.live;
        if let Some(flip) = self.last_flip {
            let since = flip.elapsed();
            if since < GRACE {
                std::thread::sleep(GRACE - since);
            }
        }
        let slots = self.assign_slots(set)?;
        // Fallible but map-free: before the first write.
        debug_assert!(compiled.pools.len() <= MAX_POOLS as usize);
        let pools = self.pools_with_slots(set, &compiled.pools)?;
        let mut report = ApplyReport {
            generation,
            classes: compiled.classes.len(),
            rules: compiled.rules.len(),
            ..ApplyReport::default()
        };
        let base = generation * self.classes_per_gen;
        let shadow = &mut self.shadow[generation as usize];
        let global = |classes: &[u32]| classes.iter().map(|c| base + c).collect::<Vec<_>>();

        // Class rows first: everything else points into them.
        report.writes += sync_array(
            &mut self.classes,
            maps::CLASSES,
            base,
            &compiled.classes,
            &mut shadow.classes,
        )?;
        for (w, d) in [
            sync_trie(
                &mut self.src4,
                maps::SRC4,
                key4(generation),
                &compiled.src4,
                base,
                &mut shadow.src4,
            )?,
            sync_trie(
                &mut self.dst4,
                maps::DST4,
                key4(generation),
                &compiled.dst4,
                base,
                &mut shadow.dst4,
            )?,
            sync_trie(
                &mut self.src6,
                maps::SRC6,
                key6(generation),
                &compiled.src6,
                base,
                &mut shadow.src6,
            )?,
            sync_trie(
                &mut self.dst6,
                maps::DST6,
                key6(generation),
                &compiled.dst6,
                base,
                &mut shadow.dst6,
            )?,
        ] {
            report.writes += w;
            report.deletes += d;
        }
        report.writes += sync_array(
            &mut self.ports,
            maps::PORTS,
            generation * PORT_SLOTS_PER_GEN,
            &global(&compiled.ports),
            &mut shadow.ports,
        )?;
        report.writes += sync_array(
            &mut self.identities,
            maps::ID_CLASS,
            identity_slot(generation, self.identity_slots, 0),
            &global(&compiled.identities),
            &mut shadow.identities,
        )?;
        debug_assert_eq!(compiled.countries.len(), COUNTRY_SLOTS as usize);
        report.writes += sync_array(
            &mut self.countries,
            maps::GEO_CLASS,
            country_slot(generation, 0),
            &global(&compiled.countries),
            &mut shadow.countries,
        )?;

        let actions: Vec<Action> = compiled
            .rules
            .iter()
            .map(|rule| action(&rule.action, slots[rule.policy as usize], rule.policy))
            .collect();
        debug_assert!(actions.len() < ACTIONS_PER_GEN as usize);
        report.writes += sync_array(
            &mut self.actions,
            maps::ACTIONS,
            action_slot(generation, 0),
            &actions,
            &mut shadow.actions,
        )?;
        let default = action(&compiled.default_action, DEFAULT_STATS_SLOT, NO_MATCH);
        if shadow.default_action != Some(default) {
            self.actions
                .set(action_slot(generation, NO_MATCH), default, 0)
                .map_err(write_err(maps::ACTIONS))?;
            shadow.default_action = Some(default);
            report.writes += 1;
        }
        report.writes += sync_array(
            &mut self.pools,
            maps::POOLS,
            pool_slot(generation, 0),
            &pools,
            &mut shadow.pools,
        )?;
        let settings = Settings {
            identity_slots: self.identity_slots,
            ..compiled.settings
        };
        if shadow.settings != Some(settings) {
            self.settings
                .set(generation, settings, 0)
                .map_err(write_err(maps::SETTINGS))?;
            shadow.settings = Some(settings);
            report.writes += 1;
        }

        // The switch: one write, after everything it points to is in place.
        self.generation
            .set(0, generation, 0)
            .map_err(write_err(maps::GEN))?;
        self.active = Some(generation);
        self.live = generation;
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

    /// The slot counting `label` (an address or range), assigned on first use.
    fn addr_slot(&mut self, label: String) -> Result<u16, TablesError> {
        if let Some(&slot) = self.addr_slots.get(&label) {
            return Ok(slot);
        }
        // Slots are never reused (a long-gone address keeps its counters),
        // so they are handed out in order after slot 0 (and after the slots
        // an earlier agent handed out, when taken over).
        let next = self
            .addr_slots
            .values()
            .max()
            .map_or(1, |&s| usize::from(s) + 1);
        let slot = u16::try_from(next)
            .ok()
            .filter(|&s| u32::from(s) < ADDR_STAT_SLOTS)
            .ok_or(TablesError::TooManyAddresses {
                capacity: ADDR_STAT_SLOTS - 1,
            })?;
        self.names.set_addr(slot, &label)?;
        self.addr_slots.insert(label, slot);
        Ok(slot)
    }

    /// Mark dedicated addresses down (health checks), in both generations
    /// at once: new flows of their pools move to the next usable address.
    /// Returns the pool entries rewritten.
    pub fn set_down(&mut self, down: &[std::net::Ipv4Addr]) -> Result<usize, TablesError> {
        self.down = down.iter().copied().collect();
        let mut writes = 0;
        for generation in 0..GENERATIONS {
            let held = &mut self.shadow[generation as usize].pools;
            for (i, pool) in held.iter_mut().enumerate() {
                let up = up_bits(pool, &self.down);
                if pool.v4_up != up {
                    pool.v4_up = up;
                    self.pools
                        .set(pool_slot(generation, i as u32), *pool, 0)
                        .map_err(write_err(maps::POOLS))?;
                    writes += 1;
                }
            }
        }
        Ok(writes)
    }

    /// The compiled pools with their addresses' counter slots, health and
    /// uplink interface index filled in.
    fn pools_with_slots(
        &mut self,
        set: &PolicySet,
        compiled: &[Pool],
    ) -> Result<Vec<Pool>, TablesError> {
        let mut out = compiled.to_vec();
        let default_v4 = [set.default_egress.ipv4];
        let default_v6 = set.default_egress.ipv6.map(|a| IpAddr::V6(a).to_string());
        let sources = std::iter::once((&default_v4[..], default_v6)).chain(
            set.pools
                .iter()
                .map(|p| (&p.ipv4[..], p.ipv6.map(|n| n.to_string()))),
        );
        for (pool, (v4, v6)) in out.iter_mut().zip(sources) {
            for (i, addr) in v4.iter().enumerate().take(pool.v4_slot.len()) {
                pool.v4_slot[i] = self.addr_slot(addr.to_string())?;
            }
            if let Some(range) = v6 {
                pool.v6_slot = self.addr_slot(range)?;
            }
            pool.v4_up = up_bits(pool, &self.down);
        }
        // Resolved at every apply, in the agent's namespace; pool 0, the
        // default egress, names no interface.
        for (pool, named) in out.iter_mut().skip(1).zip(&set.pools) {
            if let Some(interface) = &named.interface {
                pool.ifindex = nix::net::if_::if_nametoindex(interface.as_str()).map_err(|_| {
                    TablesError::NoSuchInterface {
                        pool: named.name.clone(),
                        interface: interface.clone(),
                    }
                })?;
            }
        }
        Ok(out)
    }

    /// Egress addresses (and IPv6 ranges) with their counters, summed over CPUs.
    pub fn addr_stats(&self) -> Result<Vec<(String, AddrStats)>, TablesError> {
        let mut out = Vec::with_capacity(self.addr_slots.len());
        for (label, slot) in &self.addr_slots {
            let values = self
                .addr_stats
                .get(&u32::from(*slot), 0)
                .map_err(write_err(maps::ADDR_STATS))?;
            let sum = values.iter().fold(AddrStats::default(), |mut a, v| {
                a.add(v);
                a
            });
            out.push((label.clone(), sum));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The counter slot of an egress address or IPv6 range (as
    /// [`Tables::addr_stats`] labels it).
    pub fn addr_slot_of(&self, label: &str) -> Option<u16> {
        self.addr_slots.get(label).copied()
    }

    /// Class rows the active generation uses, and how many it can hold.
    pub fn class_fill(&self) -> (usize, u32) {
        let used = self
            .active
            .map_or(0, |g| self.shadow[g as usize].classes.len());
        (used, self.classes_per_gen)
    }

    /// Per-policy counters summed over CPUs.
    pub fn policy_stats(&self, slot: u32) -> Result<PolicyStats, TablesError> {
        let values = self
            .policy_stats
            .get(&slot, 0)
            .map_err(write_err(maps::POLICY_STATS))?;
        Ok(values.iter().fold(PolicyStats::default(), |mut sum, v| {
            sum.add(v);
            sum
        }))
    }
}

/// A pool's usable-address bits given the addresses that are down.
fn up_bits(pool: &Pool, down: &HashSet<std::net::Ipv4Addr>) -> u32 {
    (0..usize::from(pool.v4_count))
        .filter(|&i| !down.contains(&std::net::Ipv4Addr::from(u32::from_be(pool.v4[i]))))
        .fold(0, |bits, i| bits | 1 << i)
}

fn action(spec: &ActionSpec, stats_slot: u32, policy: u32) -> Action {
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

fn hash_map<'a, K: Pod, V: Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<aya::maps::HashMap<&'a mut MapData, K, V>, TablesError> {
    let map = ebpf.map_mut(name).ok_or(TablesError::MissingMap { name })?;
    aya::maps::HashMap::try_from(map).map_err(|source| TablesError::MapType { name, source })
}

/// Addresses of the gateway itself, whose own flows are never steered.
pub fn set_local_addrs(ebpf: &mut Ebpf, addrs: &[IpAddr]) -> Result<(), TablesError> {
    fn sync<K: Pod + PartialEq>(
        ebpf: &mut Ebpf,
        name: &'static str,
        wanted: &[K],
    ) -> Result<(), TablesError> {
        let mut local = hash_map::<K, u32>(ebpf, name)?;
        // Add before removing, so an address present in both lists is never
        // briefly missing.
        for key in wanted {
            local.insert(key, 1, 0).map_err(write_err(name))?;
        }
        let stale: Vec<K> = local
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in stale {
            local.remove(&key).map_err(write_err(name))?;
        }
        Ok(())
    }
    let v4: Vec<u32> = addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(a) => Some(u32::from(*a).to_be()),
            IpAddr::V6(_) => None,
        })
        .collect();
    let v6: Vec<[u32; 4]> = addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V6(a) => Some(addr6_words(a)),
            IpAddr::V4(_) => None,
        })
        .collect();
    sync(ebpf, maps::LOCAL4, &v4)?;
    sync(ebpf, maps::LOCAL6, &v6)
}

/// An IPv6 address as the dataplane stores it: four network-order words.
pub fn addr6_words(addr: &std::net::Ipv6Addr) -> [u32; 4] {
    let o = addr.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}
