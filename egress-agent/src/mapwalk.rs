//! Map walks aya 0.14 lacks: reading a hash map many entries per syscall
//! (`BPF_MAP_LOOKUP_BATCH`) and counting the entries of any map.
//!
//! aya's key iterator costs one `BPF_MAP_GET_NEXT_KEY` per key, plus one
//! lookup per value: two million syscalls for a full connection table. A
//! batch reads thousands of entries at once, and it walks the hash table's
//! buckets, so entries removed meanwhile (the sweeper, the dataplane) never
//! send it back to the start as a vanished key sends `GET_NEXT_KEY`.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    Pod,
    maps::{MapData, MapError, MapType},
};

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries one batch syscall asks for. Each call walks whole hash buckets,
/// so this only needs to exceed the longest bucket (ENOSPC says it did not).
const BATCH: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("reading the kernel's information about map {name}: {source}")]
    Info {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "map {name} holds {key_size}-byte keys and {value_size}-byte values, this reader expects {want_key}/{want_value} (an agent of another version?)"
    )]
    Layout {
        name: &'static str,
        key_size: usize,
        value_size: usize,
        want_key: usize,
        want_value: usize,
    },
    #[error("{call} on map {name}: {source}")]
    Syscall {
        call: &'static str,
        name: &'static str,
        #[source]
        source: io::Error,
    },
}

/// `bpf_attr` for `BPF_MAP_*_BATCH` (the `batch` member of the union).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `bpf_attr` for `BPF_MAP_GET_NEXT_KEY`.
#[repr(C)]
#[derive(Default)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

/// `bpf(cmd, attr, sizeof attr)`; the error is errno.
fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<()> {
    // SAFETY: `attr` is a live, exclusively borrowed repr(C) prefix of
    // `union bpf_attr` for `cmd`, and its exact size is passed: the kernel
    // reads and writes only within it (and zero-fills the rest of its own
    // copy). Every pointer inside it was set by the caller to a buffer that
    // outlives this call and holds what the command may write.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<A>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn sizes(map: &MapData, name: &'static str) -> Result<(usize, usize, u32), WalkError> {
    let info = map
        .info()
        .map_err(|source| WalkError::Info { name, source })?;
    Ok((
        info.key_size() as usize,
        info.value_size() as usize,
        info.max_entries(),
    ))
}

/// Call `each(keys, values, n)` for every batch of a hash map's entries:
/// `n` entries packed at `key_size` and `value_size` strides. Returns how
/// many entries there were.
fn walk_raw(
    map: &MapData,
    name: &'static str,
    key_size: usize,
    value_size: usize,
    mut each: impl FnMut(&[u8], &[u8], usize),
) -> Result<usize, WalkError> {
    let mut keys = vec![0u8; BATCH * key_size];
    let mut values = vec![0u8; BATCH * value_size];
    // The position token: a bucket index for hash maps, at most a key long.
    let mut token = vec![0u8; key_size.max(8)];
    let mut next = vec![0u8; key_size.max(8)];
    let mut started = false;
    let mut total = 0;
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut batch = BATCH;
    loop {
        let mut attr = BatchAttr {
            in_batch: if started {
                token.as_mut_ptr() as u64
            } else {
                0
            },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: batch as u32,
            map_fd: fd,
            ..BatchAttr::default()
        };
        let result = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = attr.count as usize;
        match result {
            // ENOENT: the walk is over; the entries of this call still count.
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                each(&keys, &values, n);
                return Ok(total + n);
            }
            // One bucket holds more entries than the buffers: grow them.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 => {
                batch *= 2;
                keys.resize(batch * key_size, 0);
                values.resize(batch * value_size, 0);
                continue;
            }
            Err(source) => {
                return Err(WalkError::Syscall {
                    call: "BPF_MAP_LOOKUP_BATCH",
                    name,
                    source,
                });
            }
        }
        each(&keys, &values, n);
        total += n;
        std::mem::swap(&mut token, &mut next);
        started = true;
    }
}

/// Call `each` on every entry of a hash map (typed), reading a few
/// thousand entries per syscall. Returns how many there were.
pub fn for_each<K: Pod, V: Pod>(
    map: &MapData,
    name: &'static str,
    mut each: impl FnMut(&K, &V),
) -> Result<usize, WalkError> {
    let (key_size, value_size, _) = sizes(map, name)?;
    if key_size != size_of::<K>() || value_size != size_of::<V>() {
        return Err(WalkError::Layout {
            name,
            key_size,
            value_size,
            want_key: size_of::<K>(),
            want_value: size_of::<V>(),
        });
    }
    walk_raw(map, name, key_size, value_size, |keys, values, n| {
        for i in 0..n {
            // SAFETY: entry `i < n` lies within the buffers the kernel filled
            // (sizes checked above); K and V are Pod, so any bytes are a
            // valid value, and read_unaligned needs no alignment.
            let (key, value) = unsafe {
                (
                    std::ptr::read_unaligned(keys.as_ptr().add(i * key_size).cast::<K>()),
                    std::ptr::read_unaligned(values.as_ptr().add(i * value_size).cast::<V>()),
                )
            };
            each(&key, &value);
        }
    })
}

/// How many keys a map holds, one `BPF_MAP_GET_NEXT_KEY` per key (LPM
/// tries have no batch operations). Bounded by twice the capacity: a key
/// removed under the walk restarts it from the first key.
fn count_keys(
    map: &MapData,
    name: &'static str,
    key_size: usize,
    capacity: u32,
) -> Result<usize, WalkError> {
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut count = 0;
    let bound = 2 * capacity as usize;
    loop {
        let mut attr = NextKeyAttr {
            map_fd: fd,
            key: if count == 0 {
                0
            } else {
                key.as_mut_ptr() as u64
            },
            next_key: next.as_mut_ptr() as u64,
            ..NextKeyAttr::default()
        };
        match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(count),
            Err(source) => {
                return Err(WalkError::Syscall {
                    call: "BPF_MAP_GET_NEXT_KEY",
                    name,
                    source,
                });
            }
        }
        count += 1;
        if count >= bound {
            return Ok(capacity as usize);
        }
        std::mem::swap(&mut key, &mut next);
    }
}

/// A map's kind, how many entries it holds (`None`: not countable, a ring
/// buffer) and how many it can hold. Arrays are always full: every index
/// exists.
#[derive(Clone, Copy, Debug)]
pub struct Fill {
    pub map_type: Option<MapType>,
    pub entries: Option<usize>,
    pub capacity: u32,
}

/// Count the entries of any map: hash maps by batches, tries key by key.
pub fn fill(map: &MapData, name: &'static str) -> Result<Fill, WalkError> {
    let info = map
        .info()
        .map_err(|source| WalkError::Info { name, source })?;
    let map_type = info.map_type().ok();
    let (key_size, value_size) = (info.key_size() as usize, info.value_size() as usize);
    let capacity = info.max_entries();
    let entries = match map_type {
        Some(MapType::Hash | MapType::LruHash) => {
            Some(walk_raw(map, name, key_size, value_size, |_, _, _| {})?)
        }
        Some(MapType::LpmTrie) => Some(count_keys(map, name, key_size, capacity)?),
        Some(MapType::Array | MapType::PerCpuArray) => Some(capacity as usize),
        _ => None,
    };
    Ok(Fill {
        map_type,
        entries,
        capacity,
    })
}
