//! Reading the agent's pinned maps from another process: counters with
//! their slot names, flows, and each map's fill. Works while the agent
//! runs and after it stopped with `--keep-dataplane`, since the pins keep
//! the maps.

use std::path::{Path, PathBuf};

use aya::{
    Pod,
    maps::{Array, Map, MapData, MapError, MapType, PerCpuArray},
};
use egress_common::{
    maps,
    stats::{AddrName, AddrStats, PolicyName, PolicyStats},
};

use crate::{
    conntrack::{Census, Conntrack, ConntrackError, Flow},
    counters::{self, CountersError},
    loader, mapwalk,
    mapwalk::WalkError,
    pin, slot_names,
};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(
        "no pinned map {path}: is an agent running (or stopped with --keep-dataplane) with --pin-path {}?",
        root.display()
    )]
    NotPinned { path: PathBuf, root: PathBuf },
    #[error("opening the pinned map {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("reading map {name}: {source}")]
    Read {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error(transparent)]
    Conntrack(#[from] ConntrackError),
    #[error(transparent)]
    Counters(#[from] CountersError),
}

/// A counter slot that has a name, with its counters summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named<S> {
    pub slot: u32,
    pub name: String,
    pub stats: S,
}

/// One map as `egress-agent maps` lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapRow {
    pub name: &'static str,
    /// bpftool's name for the type (`hash`, `lpm_trie`, `percpu_array`...).
    #[serde(rename = "type")]
    pub map_type: String,
    /// `None` where entries are not counted (ring buffers).
    pub entries: Option<usize>,
    pub capacity: u32,
}

/// The maps pinned under one pin path.
#[derive(Clone, Debug)]
pub struct Pinned {
    root: PathBuf,
}

impl Pinned {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A new handle on the pinned map `name`.
    pub fn open(&self, name: &'static str) -> Result<MapData, InspectError> {
        let path = pin::map_path(&self.root, name);
        if !path.exists() {
            return Err(InspectError::NotPinned {
                path,
                root: self.root.clone(),
            });
        }
        MapData::from_pin(&path).map_err(|source| InspectError::Open { path, source })
    }

    fn array<V: Pod>(&self, name: &'static str) -> Result<Array<MapData, V>, InspectError> {
        Array::try_from(Map::Array(self.open(name)?))
            .map_err(|source| InspectError::Read { name, source })
    }

    fn per_cpu<V: Pod>(&self, name: &'static str) -> Result<PerCpuArray<MapData, V>, InspectError> {
        PerCpuArray::try_from(Map::PerCpuArray(self.open(name)?))
            .map_err(|source| InspectError::Read { name, source })
    }

    /// The global counters by exported name.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>, InspectError> {
        Ok(counters::read_map(self.open(maps::STATS)?)?
            .into_iter()
            .map(|(_, name, value)| (name, value))
            .collect())
    }

    /// The name of every policy counter slot (`None`: unnamed).
    pub fn policy_names(&self) -> Result<Vec<Option<String>>, InspectError> {
        names::<PolicyName>(&self.array(maps::POLICY_NAMES)?, maps::POLICY_NAMES)
    }

    /// The name of every egress-address counter slot.
    pub fn addr_names(&self) -> Result<Vec<Option<String>>, InspectError> {
        names::<AddrName>(&self.array(maps::ADDR_NAMES)?, maps::ADDR_NAMES)
    }

    /// Named policy slots with their counters, in slot order: the running
    /// set's policies and those its last reload removed (their flows may
    /// still be in the tables).
    pub fn policies(&self) -> Result<Vec<Named<PolicyStats>>, InspectError> {
        let stats = self.per_cpu::<PolicyStats>(maps::POLICY_STATS)?;
        named(self.policy_names()?, |slot| {
            let values = stats.get(&slot, 0).map_err(|source| InspectError::Read {
                name: maps::POLICY_STATS,
                source,
            })?;
            Ok(values.iter().fold(PolicyStats::default(), |mut sum, v| {
                sum.add(v);
                sum
            }))
        })
    }

    /// Named egress-address slots with their counters, in slot order.
    pub fn addresses(&self) -> Result<Vec<Named<AddrStats>>, InspectError> {
        let stats = self.per_cpu::<AddrStats>(maps::ADDR_STATS)?;
        named(self.addr_names()?, |slot| {
            let values = stats.get(&slot, 0).map_err(|source| InspectError::Read {
                name: maps::ADDR_STATS,
                source,
            })?;
            Ok(values.iter().fold(AddrStats::default(), |mut sum, v| {
                sum.add(v);
                sum
            }))
        })
    }

    /// The connection tables.
    pub fn conntrack(&self) -> Result<Conntrack, InspectError> {
        Ok(Conntrack::from_maps([
            self.open(maps::CT4)?,
            self.open(maps::NAT4)?,
            self.open(maps::CT6)?,
            self.open(maps::NAT6)?,
        ])?)
    }

    /// Every flow in the connection tables.
    pub fn flows(&self) -> Result<Vec<Flow>, InspectError> {
        Ok(self.conntrack()?.flows())
    }

    /// Entries of the connection tables, by family and slot.
    pub fn census(&self) -> Result<Census, InspectError> {
        Ok(self.conntrack()?.census()?)
    }

    /// Every pinned map with its type, entries and capacity.
    pub fn maps(&self) -> Result<Vec<MapRow>, InspectError> {
        let mut rows = Vec::new();
        let mut missing = None;
        for name in loader::pinned_maps() {
            let map = match self.open(name) {
                Ok(map) => map,
                // Maps an older agent did not have.
                Err(e @ InspectError::NotPinned { .. }) => {
                    missing.get_or_insert(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let fill = mapwalk::fill(&map, name)?;
            rows.push(MapRow {
                name,
                map_type: fill
                    .map_type
                    .map_or_else(|| "unknown".to_owned(), type_name),
                entries: fill.entries,
                capacity: fill.capacity,
            });
        }
        match missing {
            Some(e) if rows.is_empty() => Err(e),
            _ => Ok(rows),
        }
    }
}

/// Decode every element of a name array.
fn names<V: Pod + AsRef<[u8]>>(
    array: &Array<MapData, V>,
    name: &'static str,
) -> Result<Vec<Option<String>>, InspectError> {
    (0..array.len())
        .map(|slot| {
            let value = array
                .get(&slot, 0)
                .map_err(|source| InspectError::Read { name, source })?;
            Ok(slot_names::decode(value.as_ref()))
        })
        .collect()
}

/// The named slots, each with `stats(slot)`.
fn named<S>(
    names: Vec<Option<String>>,
    mut stats: impl FnMut(u32) -> Result<S, InspectError>,
) -> Result<Vec<Named<S>>, InspectError> {
    names
        .into_iter()
        .enumerate()
        .filter_map(|(slot, name)| Some((slot as u32, name?)))
        .map(|(slot, name)| {
            Ok(Named {
                slot,
                name,
                stats: stats(slot)?,
            })
        })
        .collect()
}

/// The name bpftool gives a map type.
fn type_name(map_type: MapType) -> String {
    match map_type {
        MapType::Hash => "hash".to_owned(),
        MapType::LruHash => "lru_hash".to_owned(),
        MapType::LpmTrie => "lpm_trie".to_owned(),
        MapType::Array => "array".to_owned(),
        MapType::PerCpuArray => "percpu_array".to_owned(),
        MapType::RingBuf => "ringbuf".to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}
