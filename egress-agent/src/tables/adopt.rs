//! What policy tables pinned by an earlier agent hold, read once when a
//! restarted agent takes them over: the generation the programs read now
//! (never to be written before the flip), each generation's trie entries
//! (so that the first writes into a generation remove the prefixes the
//! earlier agent left there), and the counter slot of each policy name and
//! egress address (so that counters, and the flows counting into them,
//! keep their slots).

use std::{collections::HashMap, hash::Hash};

use aya::{
    Ebpf, Pod,
    maps::{Array, LpmTrie, MapData, lpm_trie::Key},
};
use egress_common::{
    classify::{GEN_PREFIX_BITS, GENERATIONS, GenPrefix4, GenPrefix6, Settings},
    geo::GEN_SLOT_POLICY,
    maps,
    stats::{AddrName, PolicyName},
};
use ipnet::{Ipv4Net, Ipv6Net};

use super::{Shadow, TablesError, write_err};
use crate::slot_names;

/// The entries of a generation-keyed trie, per generation.
pub(super) type PerGeneration<N> = [HashMap<N, u32>; GENERATIONS as usize];

/// The generation the programs read, and whether an earlier agent wrote
/// the tables (its settings row is filled in; fresh maps are all zero).
pub(super) fn live_generation(
    generation: &Array<MapData, u32>,
    settings: &Array<MapData, Settings>,
) -> Result<(u32, bool), TablesError> {
    let live = generation
        .get(&GEN_SLOT_POLICY, 0)
        .map_err(write_err(maps::GEN))?
        & 1;
    let written = settings
        .get(&live, 0)
        .map_err(write_err(maps::SETTINGS))?
        .identity_slots
        != 0;
    Ok((live, written))
}

fn read_trie<K: Pod, N: Eq + Hash>(
    trie: &LpmTrie<MapData, K, u32>,
    name: &'static str,
    split: impl Fn(&Key<K>) -> Option<(u8, N)>,
) -> Result<PerGeneration<N>, TablesError> {
    let mut out: PerGeneration<N> = Default::default();
    for entry in trie.iter() {
        let (key, value) = entry.map_err(write_err(name))?;
        if let Some((generation, net)) = split(&key)
            && let Some(held) = out.get_mut(usize::from(generation))
        {
            held.insert(net, value);
        }
    }
    Ok(out)
}

fn read_trie4(
    trie: &LpmTrie<MapData, GenPrefix4, u32>,
    name: &'static str,
) -> Result<PerGeneration<Ipv4Net>, TablesError> {
    read_trie(trie, name, |key| {
        let len = key.prefix_len().checked_sub(GEN_PREFIX_BITS)?;
        let data = key.data();
        let net = Ipv4Net::new(data.addr.into(), u8::try_from(len).ok()?).ok()?;
        Some((data.generation, net))
    })
}

fn read_trie6(
    trie: &LpmTrie<MapData, GenPrefix6, u32>,
    name: &'static str,
) -> Result<PerGeneration<Ipv6Net>, TablesError> {
    read_trie(trie, name, |key| {
        let len = key.prefix_len().checked_sub(GEN_PREFIX_BITS)?;
        let data = key.data();
        let net = Ipv6Net::new(data.addr.into(), u8::try_from(len).ok()?).ok()?;
        Some((data.generation, net))
    })
}

type Trie4 = LpmTrie<MapData, GenPrefix4, u32>;
type Trie6 = LpmTrie<MapData, GenPrefix6, u32>;

/// Fill the trie part of both generations' shadows with what the tries
/// hold: `sync_trie` then deletes, on the first write into a generation,
/// exactly the prefixes the earlier agent left there.
pub(super) fn read_tries(
    shadow: &mut [Shadow; GENERATIONS as usize],
    (src4, dst4): (&Trie4, &Trie4),
    (src6, dst6): (&Trie6, &Trie6),
) -> Result<(), TablesError> {
    let [s4, d4] = [(src4, maps::SRC4), (dst4, maps::DST4)].map(|(t, n)| read_trie4(t, n));
    let [s6, d6] = [(src6, maps::SRC6), (dst6, maps::DST6)].map(|(t, n)| read_trie6(t, n));
    for (g, (((s4, d4), s6), d6)) in s4?.into_iter().zip(d4?).zip(s6?).zip(d6?).enumerate() {
        shadow[g].src4 = s4;
        shadow[g].dst4 = d4;
        shadow[g].src6 = s6;
        shadow[g].dst6 = d6;
    }
    Ok(())
}

/// The named slots of a name map (`EG_POLICY_NAMES`, `EG_ADDR_NAMES`).
fn read_names<const N: usize>(
    ebpf: &Ebpf,
    name: &'static str,
) -> Result<Vec<(u32, String)>, TablesError>
where
    [u8; N]: Pod,
{
    let map = ebpf.map(name).ok_or(TablesError::MissingMap { name })?;
    let names: Array<&MapData, [u8; N]> =
        Array::try_from(map).map_err(|source| TablesError::MapType { name, source })?;
    let mut out = Vec::new();
    for (slot, entry) in names.iter().enumerate() {
        let bytes = entry.map_err(write_err(name))?;
        if let Some(label) = slot_names::decode(&bytes) {
            out.push((slot as u32, label));
        }
    }
    Ok(out)
}

/// Policy name -> counter slot, as the earlier agent recorded them. Names
/// longer than a `PolicyName` were recorded cut, and no longer match.
pub(super) fn policy_slots(ebpf: &Ebpf) -> Result<Vec<(String, u32)>, TablesError> {
    const LEN: usize = size_of::<PolicyName>();
    Ok(read_names::<LEN>(ebpf, maps::POLICY_NAMES)?
        .into_iter()
        .map(|(slot, name)| (name, slot))
        .collect())
}

/// Egress address (or IPv6 range) -> counter slot.
pub(super) fn addr_slots(ebpf: &Ebpf) -> Result<Vec<(String, u16)>, TablesError> {
    const LEN: usize = size_of::<AddrName>();
    Ok(read_names::<LEN>(ebpf, maps::ADDR_NAMES)?
        .into_iter()
        .filter_map(|(slot, label)| Some((label, u16::try_from(slot).ok()?)))
        .collect())
}
