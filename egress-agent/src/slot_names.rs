//! Names of the counter slots (policies, egress addresses), recorded in
//! `EG_POLICY_NAMES` and `EG_ADDR_NAMES` beside the counters, so that the
//! pinned maps can be read with names while the agent is stopped.

use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use egress_common::{
    maps,
    stats::{AddrName, PolicyName},
};

use crate::tables::TablesError;

/// `name` as a NUL-padded array, cut at a character boundary if longer.
pub fn encode<const N: usize>(name: &str) -> [u8; N] {
    let mut end = name.len().min(N);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = [0; N];
    out[..end].copy_from_slice(&name.as_bytes()[..end]);
    out
}

/// The name in a NUL-padded array; `None` for an unnamed (all-NUL) slot.
pub fn decode(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    (end > 0).then(|| String::from_utf8_lossy(&bytes[..end]).into_owned())
}

/// Writer of both name maps.
pub struct SlotNames {
    policies: Array<MapData, PolicyName>,
    addrs: Array<MapData, AddrName>,
}

impl SlotNames {
    /// Take the name maps out of a loaded object.
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, TablesError> {
        fn take<V: aya::Pod>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<Array<MapData, V>, TablesError> {
            let map = ebpf
                .take_map(name)
                .ok_or(TablesError::MissingMap { name })?;
            Array::try_from(map).map_err(|source| TablesError::MapType { name, source })
        }
        Ok(Self {
            policies: take(ebpf, maps::POLICY_NAMES)?,
            addrs: take(ebpf, maps::ADDR_NAMES)?,
        })
    }

    /// Name policy counter `slot` (`""` unnames it).
    pub fn set_policy(&mut self, slot: u32, name: &str) -> Result<(), TablesError> {
        let value: PolicyName = encode(name);
        self.policies
            .set(slot, value, 0)
            .map_err(|source| TablesError::Write {
                name: maps::POLICY_NAMES,
                source,
            })
    }

    /// Name egress-address counter `slot` (an address or IPv6 range).
    pub fn set_addr(&mut self, slot: u16, label: &str) -> Result<(), TablesError> {
        let value: AddrName = encode(label);
        self.addrs
            .set(u32::from(slot), value, 0)
            .map_err(|source| TablesError::Write {
                name: maps::ADDR_NAMES,
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_round_trip_and_cut_at_char_boundary() {
        let name: [u8; 8] = encode("to pt");
        assert_eq!(&name, b"to pt\0\0\0");
        assert_eq!(decode(&name).as_deref(), Some("to pt"));
        let full: [u8; 4] = encode("abcd");
        assert_eq!(
            decode(&full).as_deref(),
            Some("abcd"),
            "a name filling the array has no NUL and still decodes whole"
        );
        // "é" is two bytes: a cut inside it would leave invalid UTF-8.
        let cut: [u8; 4] = encode("abcé");
        assert_eq!(decode(&cut).as_deref(), Some("abc"));
        assert_eq!(decode(&[0u8; 8]), None, "an unnamed slot has no name");
    }
}
