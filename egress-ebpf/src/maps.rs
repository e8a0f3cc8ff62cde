// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Every map of the object. Names equal the constants in
//! `egress_common::maps`; capacities are defaults the agent resizes at load.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use egress_common::{
    classify::{
        ACTIONS_PER_GEN, Action, COUNTRY_SLOTS, ClassRow, DEFAULT_IDENTITY_SLOTS, GENERATIONS,
        GenPrefix4, GenPrefix6, IdentityRef, MAX_POOLS, PORT_SLOTS_PER_GEN, Pool, Settings,
    },
    conntrack::{
        CtEntry4, CtEntry6, FragEntry, FragKey4, FragKey6, RevEntry4, RevEntry6, Scratch4, Scratch6,
    },
    events::CONFIG_SLOTS,
    flow::{Addr4, Addr6, Tuple4, Tuple6},
    geo::{
        BLOCK_WORDS_PER_GEN, Bucket6, DEFAULT_SPLIT_BLOCKS, DEFAULT_V6_RANGES, GEN_SLOTS, Range6,
        SplitBlock, V6_BUCKETS,
    },
    maps::{
        DEFAULT_CLASSES_PER_GEN, DEFAULT_IDENTITY_PREFIXES, DEFAULT_MAX_FLOWS, DEFAULT_PREFIXES,
        EVENTS_BYTES, MAX_FRAG_DATAGRAMS, MAX_LOCAL_ADDRS,
    },
    stats::{
        ADDR_STAT_SLOTS, AddrName, AddrStats, Counter, POLICY_STAT_SLOTS, PolicyName, PolicyStats,
    },
};

#[map]
pub static EG_CT4: HashMap<Tuple4, CtEntry4> = HashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

#[map]
pub static EG_NAT4: HashMap<Tuple4, RevEntry4> = HashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

#[map]
pub static EG_CT6: HashMap<Tuple6, CtEntry6> = HashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

#[map]
pub static EG_NAT6: HashMap<Tuple6, RevEntry6> = HashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

#[map]
pub static EG_FRAG4: LruHashMap<FragKey4, FragEntry<Addr4>> =
    LruHashMap::with_max_entries(MAX_FRAG_DATAGRAMS, 0);

#[map]
pub static EG_FRAG6: LruHashMap<FragKey6, FragEntry<Addr6>> =
    LruHashMap::with_max_entries(MAX_FRAG_DATAGRAMS, 0);

#[map]
pub static EG_SRC4: LpmTrie<GenPrefix4, u32> = LpmTrie::with_max_entries(DEFAULT_PREFIXES, 0);

#[map]
pub static EG_DST4: LpmTrie<GenPrefix4, u32> = LpmTrie::with_max_entries(DEFAULT_PREFIXES, 0);

#[map]
pub static EG_SRC6: LpmTrie<GenPrefix6, u32> = LpmTrie::with_max_entries(DEFAULT_PREFIXES, 0);

#[map]
pub static EG_DST6: LpmTrie<GenPrefix6, u32> = LpmTrie::with_max_entries(DEFAULT_PREFIXES, 0);

#[map]
pub static EG_ID4: LpmTrie<[u8; 4], IdentityRef> =
    LpmTrie::with_max_entries(DEFAULT_IDENTITY_PREFIXES, 0);

#[map]
pub static EG_ID6: LpmTrie<[u8; 16], IdentityRef> =
    LpmTrie::with_max_entries(DEFAULT_IDENTITY_PREFIXES, 0);

#[map]
pub static EG_ID4_HOST: HashMap<Addr4, IdentityRef> =
    HashMap::with_max_entries(DEFAULT_IDENTITY_PREFIXES, 0);

#[map]
pub static EG_ID6_HOST: HashMap<Addr6, IdentityRef> =
    HashMap::with_max_entries(DEFAULT_IDENTITY_PREFIXES, 0);

#[map]
pub static EG_ID_CLASS: Array<u32> =
    Array::with_max_entries(GENERATIONS * DEFAULT_IDENTITY_SLOTS, 0);

// The agent fills the country arrays through mmap: millions of elements
// would take seconds one syscall at a time.
#[map]
pub static EG_GEO4: Array<u64> =
    Array::with_max_entries(GENERATIONS * BLOCK_WORDS_PER_GEN, BPF_F_MMAPABLE);

#[map]
pub static EG_GEO4_SPLIT: HashMap<u32, SplitBlock> =
    HashMap::with_max_entries(GENERATIONS * DEFAULT_SPLIT_BLOCKS, 0);

#[map]
pub static EG_GEO6_BKT: Array<Bucket6> =
    Array::with_max_entries(GENERATIONS * V6_BUCKETS, BPF_F_MMAPABLE);

#[map]
pub static EG_GEO6: Array<Range6> =
    Array::with_max_entries(GENERATIONS * DEFAULT_V6_RANGES, BPF_F_MMAPABLE);

#[map]
pub static EG_GEO_CLASS: Array<u32> = Array::with_max_entries(GENERATIONS * COUNTRY_SLOTS, 0);

#[map]
pub static EG_PORTS: Array<u32> = Array::with_max_entries(GENERATIONS * PORT_SLOTS_PER_GEN, 0);

#[map]
pub static EG_CLASSES: Array<ClassRow> =
    Array::with_max_entries(GENERATIONS * DEFAULT_CLASSES_PER_GEN, 0);

#[map]
pub static EG_ACTIONS: Array<Action> = Array::with_max_entries(GENERATIONS * ACTIONS_PER_GEN, 0);

#[map]
pub static EG_POOLS: Array<Pool> = Array::with_max_entries(GENERATIONS * MAX_POOLS, 0);

#[map]
pub static EG_SETTINGS: Array<Settings> = Array::with_max_entries(GENERATIONS, 0);

#[map]
pub static EG_GEN: Array<u32> = Array::with_max_entries(GEN_SLOTS, 0);

#[map]
pub static EG_LOCAL4: HashMap<Addr4, u32> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

#[map]
pub static EG_LOCAL6: HashMap<Addr6, u32> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

#[map]
pub static EG_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[map]
pub static EG_POLICY_STATS: PerCpuArray<PolicyStats> =
    PerCpuArray::with_max_entries(POLICY_STAT_SLOTS, 0);

#[map]
pub static EG_ADDR_STATS: PerCpuArray<AddrStats> =
    PerCpuArray::with_max_entries(ADDR_STAT_SLOTS, 0);

// Names of the counter slots, for inspection while the agent is stopped.
// The programs never read them.
#[map]
pub static EG_POLICY_NAMES: Array<PolicyName> = Array::with_max_entries(POLICY_STAT_SLOTS, 0);

#[map]
pub static EG_ADDR_NAMES: Array<AddrName> = Array::with_max_entries(ADDR_STAT_SLOTS, 0);

#[map]
pub static EG_SCRATCH4: PerCpuArray<Scratch4> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static EG_SCRATCH6: PerCpuArray<Scratch6> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static EG_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
pub static EG_CONFIG: Array<u32> = Array::with_max_entries(CONFIG_SLOTS, 0);
