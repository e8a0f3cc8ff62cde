//! Writing session changes into the dataplane: class rows for new identity
//! ids, then the source addresses: single addresses in exact-match hashes
//! (`EG_ID4_HOST`, `EG_ID6_HOST`), prefixes in the tries (`EG_ID4`, `EG_ID6`).

use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, MapData, MapError, lpm_trie::Key},
};
use egress_common::{
    classify::{ClassRow, IdentityRef},
    maps,
};
use ipnet::IpNet;

use super::registry::Change;
use crate::{
    policy::{PolicySet, compile::identity_rows},
    tables::{Tables, TablesError, take},
};

/// The identity maps, taken out of the loaded object.
pub struct IdentityTries {
    v4: LpmTrie<MapData, [u8; 4], IdentityRef>,
    v6: LpmTrie<MapData, [u8; 16], IdentityRef>,
    /// Keys as the dataplane reads packets: network-order words.
    host4: HashMap<MapData, u32, IdentityRef>,
    host6: HashMap<MapData, [u32; 4], IdentityRef>,
}

/// Entries written by one change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub classes: usize,
    pub addresses: usize,
    pub removed: usize,
}

fn written(name: &'static str, result: Result<(), MapError>) -> Result<(), TablesError> {
    match result {
        // Removing what is already gone is what was wanted.
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(TablesError::Write { name, source }),
    }
}

impl IdentityTries {
    /// Take the maps and empty them. Maps adopted from a previous run hold
    /// that run's identity ids, which mean nothing to this one: until the
    /// sessions are written again a source is better anonymous (it matches
    /// only policies without identity conditions) than taken for someone
    /// else.
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, TablesError> {
        let mut tries = Self {
            v4: take(ebpf, maps::ID4, LpmTrie::try_from)?,
            v6: take(ebpf, maps::ID6, LpmTrie::try_from)?,
            host4: take(ebpf, maps::ID4_HOST, HashMap::try_from)?,
            host6: take(ebpf, maps::ID6_HOST, HashMap::try_from)?,
        };
        tries.clear()?;
        Ok(tries)
    }

    fn clear(&mut self) -> Result<(), TablesError> {
        let v4: Vec<_> = self.v4.keys().filter_map(Result::ok).collect();
        for key in v4 {
            written(maps::ID4, self.v4.remove(&key))?;
        }
        let v6: Vec<_> = self.v6.keys().filter_map(Result::ok).collect();
        for key in v6 {
            written(maps::ID6, self.v6.remove(&key))?;
        }
        let host4: Vec<_> = self.host4.keys().filter_map(Result::ok).collect();
        for key in host4 {
            written(maps::ID4_HOST, self.host4.remove(&key))?;
        }
        let host6: Vec<_> = self.host6.keys().filter_map(Result::ok).collect();
        for key in host6 {
            written(maps::ID6_HOST, self.host6.remove(&key))?;
        }
        Ok(())
    }

    /// Write (`Some`) or remove (`None`) the entry of `net`.
    fn set(&mut self, net: &IpNet, value: Option<IdentityRef>) -> Result<(), TablesError> {
        let len = u32::from(net.prefix_len());
        match net {
            IpNet::V4(n) if len == 32 => {
                let key = u32::from_ne_bytes(n.addr().octets());
                let r = match value {
                    Some(v) => self.host4.insert(key, v, 0),
                    None => self.host4.remove(&key),
                };
                written(maps::ID4_HOST, r)
            }
            IpNet::V6(n) if len == 128 => {
                let key = crate::tables::addr6_words(&n.addr());
                let r = match value {
                    Some(v) => self.host6.insert(key, v, 0),
                    None => self.host6.remove(&key),
                };
                written(maps::ID6_HOST, r)
            }
            IpNet::V4(n) => {
                let key = Key::new(len, n.network().octets());
                let r = match value {
                    Some(v) => self.v4.insert(&key, v, 0),
                    None => self.v4.remove(&key),
                };
                written(maps::ID4, r)
            }
            IpNet::V6(n) => {
                let key = Key::new(len, n.network().octets());
                let r = match value {
                    Some(v) => self.v6.insert(&key, v, 0),
                    None => self.v6.remove(&key),
                };
                written(maps::ID6, r)
            }
        }
    }

    /// Write a committed change: the class rows of its new identity ids
    /// (`classes`, see [`class_rows`]), then addresses, then removals, so
    /// an address never points at an id without a class and a moved
    /// address is never briefly anonymous.
    pub fn apply(
        &mut self,
        tables: &mut Tables,
        classes: &[(u32, ClassRow)],
        change: &Change,
    ) -> Result<Written, TablesError> {
        let mut written = Written {
            classes: tables.set_identity_classes(classes)?,
            ..Written::default()
        };
        for (net, value) in &change.insert {
            self.set(net, Some(*value))?;
            written.addresses += 1;
        }
        for net in &change.remove {
            self.set(net, None)?;
            written.removed += 1;
        }
        Ok(written)
    }

    /// The four maps with their names, for counting their entries (metrics).
    pub fn maps(&self) -> [(&'static str, &MapData); 4] {
        use aya::maps::IterableMap as _;
        [
            (maps::ID4, self.v4.map()),
            (maps::ID6, self.v6.map()),
            (maps::ID4_HOST, self.host4.map()),
            (maps::ID6_HOST, self.host6.map()),
        ]
    }
}

/// The class rows of a change's new identity ids under `set`.
pub fn class_rows(set: &PolicySet, change: &Change) -> Vec<(u32, ClassRow)> {
    let identities: Vec<_> = change
        .new_identities
        .iter()
        .map(|(_, identity)| identity.clone())
        .collect();
    let rows = identity_rows(set, &identities);
    change
        .new_identities
        .iter()
        .map(|(id, _)| *id)
        .zip(rows)
        .collect()
}
