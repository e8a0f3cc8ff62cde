//! Placing country tables into the dataplane's maps: the inactive
//! generation is written (the big arrays through a shared memory mapping,
//! the split blocks with syscalls), then slot `GEN_SLOT_GEO` of `EG_GEN`
//! flips to it with one write, so a lookup sees either the old database or
//! the new one, never a mix.

use std::{
    collections::HashMap,
    fmt,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap as BpfHashMap, IterableMap as _, Map, MapData, MapError},
};
use egress_common::{
    classify::GENERATIONS,
    geo::{BLOCK_WORDS_PER_GEN, Bucket6, GEN_SLOT_GEO, Range6, SplitBlock, V6_BUCKETS, split_key},
    maps,
};

use super::{
    error::GeoError,
    table::{GeoTables, TableStats},
};

/// Lookups finish within microseconds (TC programs run in softirq context,
/// without preemption): after this long no packet still reads the
/// generation a flip left, and it may be rewritten.
const GRACE: Duration = Duration::from_millis(20);

/// An array map's elements, mapped into this process (the map was created
/// with `BPF_F_MMAPABLE`). Element `i` is at byte `i * stride` with
/// `stride = round_up(value_size, 8)`, which `open` checks equals
/// `size_of::<T>()`, so the mapping is a `[T]`.
struct MappedArray<T: Pod> {
    name: &'static str,
    map: Array<MapData, T>,
    ptr: NonNull<T>,
    bytes: usize,
    entries: u32,
}

// SAFETY: the mapping is owned by this value alone (written only through
// `&mut self`), like a `Vec<T>`; T is plain data.
unsafe impl<T: Pod> Send for MappedArray<T> {}

impl<T: Pod> MappedArray<T> {
    fn open(ebpf: &mut Ebpf, name: &'static str) -> Result<Self, GeoError> {
        let map = ebpf.take_map(name).ok_or(GeoError::MissingMap { name })?;
        let map: Array<MapData, T> =
            Array::try_from(map).map_err(|source| GeoError::MapType { name, source })?;
        let info = map
            .map()
            .info()
            .map_err(|source| GeoError::MapType { name, source })?;
        let stride = (info.value_size() as usize).next_multiple_of(8);
        if stride != size_of::<T>() {
            return Err(GeoError::ValueSize {
                name,
                value_size: info.value_size(),
                expected: size_of::<T>(),
            });
        }
        let entries = info.max_entries();
        let bytes = (entries as usize * stride).next_multiple_of(page_size());
        let fd = map.map().fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the map's element area (the
        // kernel checks offset and length against it); nothing else in this
        // process maps it, and `Drop` unmaps exactly this range.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(GeoError::Mmap {
                name,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            name,
            map,
            ptr: NonNull::new(ptr.cast()).expect("mmap succeeded"),
            bytes,
            entries,
        })
    }

    /// Copy `values` to elements `index..`.
    fn write(&mut self, index: u32, values: &[T]) {
        assert!(
            index as usize + values.len() <= self.entries as usize,
            "{}: writing {} elements at {index} past its {} entries",
            self.name,
            values.len(),
            self.entries
        );
        // SAFETY: the range is inside the mapping (asserted above; the
        // mapping holds `entries` elements of `size_of::<T>()` bytes, page
        // aligned so aligned for T); `values` is ordinary memory, so they
        // cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr(),
                self.ptr.as_ptr().add(index as usize),
                values.len(),
            );
        }
    }
}

impl<T: Pod> Drop for MappedArray<T> {
    fn drop(&mut self) {
        // SAFETY: unmaps the range `open` mapped, which nothing borrows.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.bytes);
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// Kernel memory of one map.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapMemory {
    pub name: &'static str,
    pub max_entries: u32,
    pub key_size: u32,
    pub value_size: u32,
    /// Element storage, both generations: entries × value size (plus the
    /// key for the hash map), not counting kernel bookkeeping.
    pub bytes: u64,
    /// What the kernel charges for the map (`memlock` in fdinfo), when it
    /// says.
    pub memlock: Option<u64>,
}

/// The outcome of one database load, for logs and `stats geo`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GeoReport {
    /// The generation now active.
    pub generation: u32,
    #[serde(flatten)]
    pub tables: TableStats,
    /// Writing the maps and flipping.
    pub write_ms: f64,
    /// Reading, building and writing.
    pub load_ms: f64,
    pub maps: Vec<MapMemory>,
    /// Sum of the maps' element storage.
    pub kernel_bytes: u64,
    /// Sum of the maps' `memlock`, when the kernel reports it for all.
    pub kernel_memlock: Option<u64>,
}

impl fmt::Display for GeoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.tables;
        write!(
            f,
            "countries: {} IPv4 ranges ({} prefixes, {} split /24s), {} IPv6 ranges ({} prefixes, {} table entries); loaded in {:.0} ms (read {:.0}, build {:.0}, write {:.0}); kernel memory {:.1} MiB",
            t.v4_ranges,
            t.v4_prefixes,
            t.split_blocks,
            t.v6_ranges,
            t.v6_prefixes,
            t.v6_table_ranges,
            self.load_ms,
            t.parse_ms,
            t.build_ms,
            self.write_ms,
            self.kernel_memlock.unwrap_or(self.kernel_bytes) as f64 / f64::from(1 << 20),
        )
    }
}

/// Writer of the country tables; owns the four country maps.
pub struct GeoWriter {
    blocks: MappedArray<u64>,
    buckets: MappedArray<Bucket6>,
    ranges: MappedArray<Range6>,
    splits: BpfHashMap<MapData, u32, SplitBlock>,
    generation: Array<MapData, u32>,
    /// Split blocks each generation holds, by block number.
    held_splits: [HashMap<u32, SplitBlock>; GENERATIONS as usize],
    active: u32,
    /// The generation `stage` wrote, until `flip` activates it.
    staged: Option<u32>,
    last_flip: Option<Instant>,
}

fn write_err(name: &'static str) -> impl FnOnce(MapError) -> GeoError {
    move |source| GeoError::Write { name, source }
}

impl GeoWriter {
    /// Take the country maps out of a loaded object. Call it before
    /// `Tables::new`, which takes `EG_GEN`: the writer opens its own handle
    /// on that map and continues from the generation it finds active.
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, GeoError> {
        let name = maps::GEN;
        let generation = {
            let map = ebpf
                .map(name)
                .ok_or(GeoError::GenerationMapTaken { name })?;
            let shared: Array<&MapData, u32> =
                Array::try_from(map).map_err(|source| GeoError::MapType { name, source })?;
            let id = shared
                .map()
                .info()
                .map_err(|source| GeoError::MapType { name, source })?
                .id();
            let own = MapData::from_id(id).map_err(|source| GeoError::MapType { name, source })?;
            Array::try_from(Map::Array(own)).map_err(|source| GeoError::MapType { name, source })?
        };
        let active = generation
            .get(&GEN_SLOT_GEO, 0)
            .map_err(|source| GeoError::MapType { name, source })?
            & 1;

        let name = maps::GEO4_SPLIT;
        let splits: BpfHashMap<MapData, u32, SplitBlock> =
            BpfHashMap::try_from(ebpf.take_map(name).ok_or(GeoError::MissingMap { name })?)
                .map_err(|source| GeoError::MapType { name, source })?;
        // Maps reused from an earlier run may hold split blocks already.
        let mut held_splits: [HashMap<u32, SplitBlock>; GENERATIONS as usize] = Default::default();
        for entry in splits.iter() {
            let (key, block) = entry.map_err(|source| GeoError::MapType { name, source })?;
            held_splits[(key >> 24 & 1) as usize].insert(key & 0x00ff_ffff, block);
        }

        Ok(Self {
            blocks: MappedArray::open(ebpf, maps::GEO4)?,
            buckets: MappedArray::open(ebpf, maps::GEO6_BUCKETS)?,
            ranges: MappedArray::open(ebpf, maps::GEO6)?,
            splits,
            generation,
            held_splits,
            active,
            staged: None,
            last_flip: None,
        })
    }

    /// The generation lookups use now.
    pub fn active_generation(&self) -> u32 {
        self.active
    }

    /// Check that `tables` fit the maps, without writing anything.
    pub fn check(&self, tables: &GeoTables) -> Result<(), GeoError> {
        for (name, entries, full) in [
            (
                maps::GEO4,
                self.blocks.entries,
                GENERATIONS * BLOCK_WORDS_PER_GEN,
            ),
            (
                maps::GEO6_BUCKETS,
                self.buckets.entries,
                GENERATIONS * V6_BUCKETS,
            ),
        ] {
            if entries < full {
                return Err(GeoError::NotReserved { name, entries });
            }
        }
        let split_capacity = self
            .splits
            .map()
            .info()
            .map_err(|source| GeoError::MapType {
                name: maps::GEO4_SPLIT,
                source,
            })?
            .max_entries()
            / GENERATIONS;
        for (name, needed, capacity, flag) in [
            (
                maps::GEO4_SPLIT,
                tables.splits.len(),
                split_capacity,
                "--geo-split-blocks",
            ),
            (
                maps::GEO6,
                tables.ranges6.len(),
                self.ranges.entries / GENERATIONS,
                "--geo-v6-ranges",
            ),
        ] {
            if needed > capacity as usize {
                return Err(GeoError::Capacity {
                    name,
                    needed,
                    capacity,
                    flag,
                });
            }
        }
        Ok(())
    }

    /// Write `tables` into the inactive generation and make it active.
    pub fn apply(&mut self, tables: &GeoTables) -> Result<GeoReport, GeoError> {
        let start = Instant::now();
        self.stage(tables)?;
        let generation = self.flip()?;
        let write_ms = start.elapsed().as_secs_f64() * 1e3;
        let maps = self.memory()?;
        let kernel_bytes = maps.iter().map(|m| m.bytes).sum();
        let kernel_memlock = maps.iter().map(|m| m.memlock).sum();
        Ok(GeoReport {
            generation,
            tables: tables.stats.clone(),
            write_ms,
            load_ms: tables.stats.parse_ms + tables.stats.build_ms + write_ms,
            maps,
            kernel_bytes,
            kernel_memlock,
        })
    }

    /// First half of `apply`: write `tables` into the inactive generation,
    /// which lookups do not read. Returns that generation.
    pub fn stage(&mut self, tables: &GeoTables) -> Result<u32, GeoError> {
        self.check(tables)?;
        if let Some(flip) = self.last_flip {
            let since = flip.elapsed();
            if since < GRACE {
                std::thread::sleep(GRACE - since);
            }
        }
        let generation = 1 - self.active;
        self.staged = None;

        // Split blocks first, stale ones out before new ones in: the map
        // then never holds more than the active generation plus this one.
        let name = maps::GEO4_SPLIT;
        let held = &mut self.held_splits[generation as usize];
        let wanted: HashMap<u32, &SplitBlock> =
            tables.splits.iter().map(|(b, s)| (*b, s)).collect();
        let stale: Vec<u32> = held
            .keys()
            .filter(|b| !wanted.contains_key(*b))
            .copied()
            .collect();
        for block in stale {
            self.splits
                .remove(&split_key(generation, block << 8))
                .map_err(write_err(name))?;
            held.remove(&block);
        }
        for (block, split) in &tables.splits {
            if held.get(block) != Some(split) {
                self.splits
                    .insert(split_key(generation, block << 8), split, 0)
                    .map_err(write_err(name))?;
                held.insert(*block, *split);
            }
        }

        self.blocks
            .write(generation * BLOCK_WORDS_PER_GEN, &tables.blocks);
        let base = generation * (self.ranges.entries / GENERATIONS);
        self.ranges.write(base, &tables.ranges6);
        // Bucket indices are absolute: add the generation's base.
        let buckets: Vec<Bucket6> = tables
            .buckets
            .iter()
            .map(|b| match b.count {
                0 => *b,
                _ => Bucket6 {
                    first: b.first + base,
                    count: b.count,
                },
            })
            .collect();
        self.buckets.write(generation * V6_BUCKETS, &buckets);
        self.staged = Some(generation);
        Ok(generation)
    }

    /// Second half of `apply`: make the staged generation active (one map
    /// write, after everything it points to is in place). Returns the
    /// active generation; without a staged one, nothing changes.
    pub fn flip(&mut self) -> Result<u32, GeoError> {
        let Some(generation) = self.staged.take() else {
            return Ok(self.active);
        };
        self.generation
            .set(GEN_SLOT_GEO, generation, 0)
            .map_err(write_err(maps::GEN))?;
        self.active = generation;
        self.last_flip = Some(Instant::now());
        Ok(generation)
    }

    /// Kernel memory of the four country maps.
    pub fn memory(&self) -> Result<Vec<MapMemory>, GeoError> {
        let mut out = Vec::with_capacity(4);
        for (name, data, hash) in [
            (maps::GEO4, self.blocks.map.map(), false),
            (maps::GEO4_SPLIT, self.splits.map(), true),
            (maps::GEO6_BUCKETS, self.buckets.map.map(), false),
            (maps::GEO6, self.ranges.map.map(), false),
        ] {
            let info = data
                .info()
                .map_err(|source| GeoError::MapType { name, source })?;
            let stride = |size: u32| u64::from(size.next_multiple_of(8));
            let element =
                stride(info.value_size()) + if hash { stride(info.key_size()) } else { 0 };
            out.push(MapMemory {
                name,
                max_entries: info.max_entries(),
                key_size: info.key_size(),
                value_size: info.value_size(),
                bytes: u64::from(info.max_entries()) * element,
                memlock: memlock(data.fd().as_fd().as_raw_fd()),
            });
        }
        Ok(out)
    }
}

/// The `memlock:` line of the fd's `/proc/self/fdinfo` entry.
fn memlock(fd: i32) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    parse_memlock(&info)
}

fn parse_memlock(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geoip_writer_is_send_for_async_tasks() {
        fn send<T: Send>() {}
        send::<GeoWriter>();
    }

    #[test]
    fn geoip_memlock_parsed_from_fdinfo() {
        let fdinfo = "pos:\t0\nflags:\t02000002\nmap_type:\t2\nmemlock:\t33558528\nmap_id:\t7\n";
        assert_eq!(parse_memlock(fdinfo), Some(33_558_528));
        assert_eq!(
            parse_memlock("pos:\t0\n"),
            None,
            "older kernels may not say"
        );
    }
}
