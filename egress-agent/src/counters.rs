//! Reading the dataplane's global per-CPU counters.

use std::borrow::Borrow;

use aya::{
    Ebpf,
    maps::{Map, MapData, MapError, PerCpuArray},
};
use egress_common::{maps, stats::Counter};

#[derive(Debug, thiserror::Error)]
pub enum CountersError {
    #[error("map {} is missing from the eBPF object", maps::STATS)]
    Missing,
    #[error("reading map {}: {source}", maps::STATS)]
    Read {
        #[source]
        source: MapError,
    },
}

/// Every counter with its exported name, summed over CPUs.
pub fn read(ebpf: &Ebpf) -> Result<Vec<(Counter, &'static str, u64)>, CountersError> {
    let map = ebpf.map(maps::STATS).ok_or(CountersError::Missing)?;
    let stats: PerCpuArray<_, u64> =
        PerCpuArray::try_from(map).map_err(|source| CountersError::Read { source })?;
    sum(&stats)
}

/// Every counter of a stats map opened elsewhere (the pinned map, read
/// by `egress-agent stats` while the agent is stopped).
pub fn read_map(map: MapData) -> Result<Vec<(Counter, &'static str, u64)>, CountersError> {
    let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(Map::PerCpuArray(map))
        .map_err(|source| CountersError::Read { source })?;
    sum(&stats)
}

fn sum<T: Borrow<MapData>>(
    stats: &PerCpuArray<T, u64>,
) -> Result<Vec<(Counter, &'static str, u64)>, CountersError> {
    Counter::ALL
        .iter()
        .map(|&(counter, name)| {
            let values = stats
                .get(&(counter as u32), 0)
                .map_err(|source| CountersError::Read { source })?;
            Ok((counter, name, values.iter().sum()))
        })
        .collect()
}

/// One counter's value.
pub fn get(ebpf: &Ebpf, counter: Counter) -> Result<u64, CountersError> {
    Ok(read(ebpf)?
        .into_iter()
        .find(|(c, _, _)| *c == counter)
        .map_or(0, |(_, _, v)| v))
}
