// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Names and default capacities of every BPF map and program.
//!
//! The eBPF side declares each `#[map]` static with exactly these names and the
//! agent only ever looks maps up through these constants. Names stay within
//! BPF_OBJ_NAME_LEN (16 bytes with the NUL) so `bpftool map` shows them whole.

/// Connection table, IPv4: original outgoing tuple -> translation.
pub const CT4: &str = "EG_CT4";
/// Reverse NAT table, IPv4: translated outgoing tuple -> original client.
pub const NAT4: &str = "EG_NAT4";
/// Connection table, IPv6.
pub const CT6: &str = "EG_CT6";
/// Reverse NAT table, IPv6.
pub const NAT6: &str = "EG_NAT6";
/// Fragments of translated IPv4 datagrams -> their translation (LRU).
pub const FRAG4: &str = "EG_FRAG4";
/// Fragments of translated IPv6 datagrams (LRU).
pub const FRAG6: &str = "EG_FRAG6";
/// Classifier: IPv4 source prefix (generation-keyed LPM) -> class row.
pub const SRC4: &str = "EG_SRC4";
/// Classifier: IPv4 destination prefix (generation-keyed LPM) -> class row.
pub const DST4: &str = "EG_DST4";
/// Classifier: IPv6 source prefix (generation-keyed LPM) -> class row.
pub const SRC6: &str = "EG_SRC6";
/// Classifier: IPv6 destination prefix (generation-keyed LPM) -> class row.
pub const DST6: &str = "EG_DST6";
/// Source IPv4 prefix -> identity id (not per generation: identities
/// change independently of policies).
pub const ID4: &str = "EG_ID4";
/// Source IPv6 prefix -> identity id.
pub const ID6: &str = "EG_ID6";
/// Source IPv4 address -> identity id: sessions' single addresses (/32),
/// an exact-match hash that is cheaper than the trie it is tried before.
pub const ID4_HOST: &str = "EG_ID4_HOST";
/// Source IPv6 address (/128) -> identity id.
pub const ID6_HOST: &str = "EG_ID6_HOST";
/// Classifier: (generation, identity id) -> class row.
pub const ID_CLASS: &str = "EG_ID_CLASS";
/// Country tables (see `crate::geo`), per generation of their own:
/// IPv4 /24 block -> country id, eight blocks per element.
pub const GEO4: &str = "EG_GEO4";
/// IPv4 /24 block holding several countries -> one id per address.
pub const GEO4_SPLIT: &str = "EG_GEO4_SPLIT";
/// IPv6 top 16 bits -> the ranges starting there.
pub const GEO6_BUCKETS: &str = "EG_GEO6_BKT";
/// IPv6 ranges sorted by start -> country id.
pub const GEO6: &str = "EG_GEO6";
/// Classifier: (generation, country id) -> class row.
pub const GEO_CLASS: &str = "EG_GEO_CLASS";
/// Classifier: (generation, protocol, destination port) -> class row.
pub const PORTS: &str = "EG_PORTS";
/// Classifier: class row -> bit vector of the policies it admits.
pub const CLASSES: &str = "EG_CLASSES";
/// (generation, policy index) -> what to do with a flow.
pub const ACTIONS: &str = "EG_ACTIONS";
/// (generation, pool index) -> egress addresses.
pub const POOLS: &str = "EG_POOLS";
/// Generation -> per-generation settings (port range).
pub const SETTINGS: &str = "EG_SETTINGS";
/// The active generations (policies, countries: `crate::geo::GEN_SLOT_*`),
/// each flipped by one write.
pub const GEN: &str = "EG_GEN";
/// IPv4 addresses of the gateway itself (its own traffic is never steered).
pub const LOCAL4: &str = "EG_LOCAL4";
/// IPv6 addresses of the gateway itself.
pub const LOCAL6: &str = "EG_LOCAL6";
/// Global per-CPU counters, indexed by [`crate::stats::Counter`].
pub const STATS: &str = "EG_STATS";
/// Per-CPU per-policy counters, indexed by a policy's stats slot.
pub const POLICY_STATS: &str = "EG_POLICY_STATS";
/// Per-CPU per-egress-address counters, indexed by an address's slot.
pub const ADDR_STATS: &str = "EG_ADDR_STATS";
/// Counter slot -> name of the policy counting there (NUL-padded
/// [`crate::stats::PolicyName`]). Written by the agent, never read by the
/// programs: it lets `egress-agent flows|policies` name slots while the
/// agent is stopped.
pub const POLICY_NAMES: &str = "EG_POLICY_NAMES";
/// Egress-address counter slot -> the address or IPv6 range it counts
/// ([`crate::stats::AddrName`]); agent-written, like [`POLICY_NAMES`].
pub const ADDR_NAMES: &str = "EG_ADDR_NAMES";
/// Per-CPU scratch space for building a new flow's IPv4 entry (the BPF
/// stack is too small to hold it beside everything else).
pub const SCRATCH4: &str = "EG_SCRATCH4";
/// Per-CPU scratch space for a new IPv6 flow's entry.
pub const SCRATCH6: &str = "EG_SCRATCH6";
/// Flow events for the flow log (ring buffer of `crate::events::FlowEvent`).
pub const EVENTS: &str = "EG_EVENTS";
/// Runtime switches (`crate::events::CONFIG_*`), written by the agent.
pub const CONFIG: &str = "EG_CONFIG";

/// Every map the object must define; a packet test checks the object against it.
pub const ALL: &[&str] = &[
    CT4,
    NAT4,
    CT6,
    NAT6,
    FRAG4,
    FRAG6,
    SRC4,
    DST4,
    SRC6,
    DST6,
    ID4,
    ID6,
    ID4_HOST,
    ID6_HOST,
    ID_CLASS,
    GEO4,
    GEO4_SPLIT,
    GEO6_BUCKETS,
    GEO6,
    GEO_CLASS,
    PORTS,
    CLASSES,
    ACTIONS,
    POOLS,
    SETTINGS,
    GEN,
    LOCAL4,
    LOCAL6,
    STATS,
    POLICY_STATS,
    ADDR_STATS,
    POLICY_NAMES,
    ADDR_NAMES,
    SCRATCH4,
    SCRATCH6,
    EVENTS,
    CONFIG,
];

/// TC egress program on the uplink: classify new flows, translate the source.
pub const PROG_EGRESS: &str = "egress_steer";
/// TC ingress program on the uplink: translate replies back to the client.
pub const PROG_INGRESS: &str = "ingress_restore";

/// Default number of flows the connection tables hold (each direction).
pub const DEFAULT_MAX_FLOWS: u32 = 1 << 20;
/// Default class rows per generation (the agent may size the map larger).
pub const DEFAULT_CLASSES_PER_GEN: u32 = 16384;
/// Default prefix capacity of each classifier trie (both generations).
pub const DEFAULT_PREFIXES: u32 = 65536;
/// Default prefix capacity of the identity tries (addresses of sessions).
pub const DEFAULT_IDENTITY_PREFIXES: u32 = 262_144;
/// Datagrams whose fragments can be in flight at once (each direction shares).
pub const MAX_FRAG_DATAGRAMS: u32 = 16384;
/// Capacity of the gateway-address table.
pub const MAX_LOCAL_ADDRS: u32 = 1024;
/// Size of the flow-event ring buffer: about 9 000 events of 112 bytes (plus
/// an 8-byte header each) waiting for the agent before new ones are lost
/// (and counted).
pub const EVENTS_BYTES: u32 = 1 << 20;
