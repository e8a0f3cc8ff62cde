//! Whether a map pinned by an earlier agent can stand in for the one this
//! agent would create. aya 0.14 adopts an existing pin as it is (its
//! `MapData::create_pinned_by_name` opens the pin and checks nothing), so a
//! map of another size or layout would be used silently: programs would be
//! verified against the pinned map and the agent's typed views would
//! disagree with it. The check compares the kernel's view of each pin with
//! the object's definition (and this run's sizes) before loading.

use std::{collections::HashMap, fmt};

use aya::maps::MapData;

/// What must agree for a program to use a pinned map as if it had created it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// A part of a map's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Type,
    KeySize,
    ValueSize,
    MaxEntries,
    Flags,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Type => "type",
            Self::KeySize => "key size",
            Self::ValueSize => "value size",
            Self::MaxEntries => "max_entries",
            Self::Flags => "flags",
        })
    }
}

/// The first way in which a pinned map differs from the wanted one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub field: Field,
    pub pinned: u32,
    pub wanted: u32,
}

impl MapShape {
    /// How `self` (pinned) differs from `wanted`, if it does.
    pub fn mismatch(&self, wanted: &Self) -> Option<Mismatch> {
        [
            (Field::Type, self.map_type, wanted.map_type),
            (Field::KeySize, self.key_size, wanted.key_size),
            (Field::ValueSize, self.value_size, wanted.value_size),
            (Field::MaxEntries, self.max_entries, wanted.max_entries),
            (Field::Flags, self.flags, wanted.flags),
        ]
        .into_iter()
        .find(|(_, pinned, wanted)| pinned != wanted)
        .map(|(field, pinned, wanted)| Mismatch {
            field,
            pinned,
            wanted,
        })
    }

    /// The kernel's view of a map.
    pub fn of(map: &MapData) -> Result<Self, aya::maps::MapError> {
        let info = map.info()?;
        Ok(Self {
            map_type: info.map_type()? as u32,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        })
    }
}

/// The maps `object` defines, as this run would create them: the object's
/// definitions with `sizes` (map name, max_entries) applied.
pub fn wanted_shapes(
    object: &[u8],
    sizes: &[(&str, u32)],
) -> Result<HashMap<String, MapShape>, aya_obj::ParseError> {
    let object = aya_obj::Object::parse(object)?;
    Ok(object
        .maps
        .iter()
        .map(|(name, def)| {
            let max_entries = sizes
                .iter()
                .find(|(n, _)| n == name)
                .map_or(def.max_entries(), |(_, size)| *size);
            let shape = MapShape {
                map_type: def.map_type(),
                key_size: def.key_size(),
                value_size: def.value_size(),
                max_entries,
                flags: def.map_flags(),
            };
            (name.clone(), shape)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: MapShape = MapShape {
        map_type: 1,
        key_size: 16,
        value_size: 48,
        max_entries: 1 << 20,
        flags: 0,
    };

    #[test]
    fn compat_same_shape_adopted() {
        assert_eq!(HASH.mismatch(&HASH), None);
    }

    #[test]
    fn compat_resized_map_reports_both_sizes() {
        let wanted = MapShape {
            max_entries: 4096,
            ..HASH
        };
        assert_eq!(
            HASH.mismatch(&wanted),
            Some(Mismatch {
                field: Field::MaxEntries,
                pinned: 1 << 20,
                wanted: 4096
            })
        );
    }

    #[test]
    fn compat_layout_change_reported_before_size() {
        // An upgrade that grew the value: the layout is what matters most.
        let wanted = MapShape {
            value_size: 56,
            max_entries: 4096,
            ..HASH
        };
        let m = HASH
            .mismatch(&wanted)
            .expect("a different layout is refused");
        assert_eq!((m.field, m.pinned, m.wanted), (Field::ValueSize, 48, 56));
        assert_eq!(m.field.to_string(), "value size");
    }
}
