//! The dataplane's runtime switches (`EG_CONFIG`): whether it emits flow
//! events for the flow log and kernel log records of rare events. Both are
//! off unless switched on here, so the packet path costs nothing for them.

use aya::{
    Ebpf,
    maps::{Array, MapData, MapError},
};
use egress_common::{
    events::{CONFIG_F_FLOWLOG, CONFIG_F_KLOG, CONFIG_FLAGS},
    maps,
};

#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("map {name} is missing from the eBPF object")]
    Missing { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// The switch word and the map it lives in.
pub struct Switches {
    map: Array<MapData, u32>,
    flags: u32,
}

impl Switches {
    /// Take the map and write `flags`: whatever a previous agent left there
    /// (an adopted, pinned map) is replaced.
    pub fn new(ebpf: &mut Ebpf, flow_log: bool) -> Result<Self, SwitchError> {
        let name = maps::CONFIG;
        let map = ebpf.take_map(name).ok_or(SwitchError::Missing { name })?;
        let map = Array::try_from(map).map_err(|source| SwitchError::Map { name, source })?;
        let mut switches = Self { map, flags: 0 };
        switches.write(if flow_log { CONFIG_F_FLOWLOG } else { 0 })?;
        Ok(switches)
    }

    fn write(&mut self, flags: u32) -> Result<(), SwitchError> {
        self.map
            .set(CONFIG_FLAGS, flags, 0)
            .map_err(|source| SwitchError::Map {
                name: maps::CONFIG,
                source,
            })?;
        self.flags = flags;
        Ok(())
    }

    /// Turn kernel log records on or off.
    pub fn set_kernel_log(&mut self, on: bool) -> Result<(), SwitchError> {
        let flags = if on {
            self.flags | CONFIG_F_KLOG
        } else {
            self.flags & !CONFIG_F_KLOG
        };
        self.write(flags)
    }

    pub fn kernel_log(&self) -> bool {
        self.flags & CONFIG_F_KLOG != 0
    }

    pub fn flow_log(&self) -> bool {
        self.flags & CONFIG_F_FLOWLOG != 0
    }
}
