// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Counter slots of the global per-CPU statistics map and the per-policy
//! counters. The dataplane never logs per packet; it counts here.

/// Index into [`crate::maps::STATS`]. The agent prints these by name.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets seen by the egress program.
    EgressPackets = 0,
    /// Packets seen by the ingress program.
    IngressPackets,
    /// New flows classified (first packet of a flow).
    FlowsNew,
    /// New flows translated to an egress address.
    FlowsTranslated,
    /// New flows left untouched by a `bypass` policy.
    FlowsBypassed,
    /// New flows of the gateway itself, reserved and not steered.
    FlowsLocal,
    /// Outgoing packets whose source was rewritten.
    EgressTranslated,
    /// Replies whose destination was rewritten back to the client.
    IngressTranslated,
    /// Incoming packets that belong to no translated flow (passed untouched).
    IngressNotOurs,
    /// Non-IP frames (ARP, LLDP, ...) passed untouched.
    PassNonIp,
    /// Link-scoped packets (from ::, 0.0.0.0 or a link-local address, or to
    /// multicast or the limited broadcast) passed untouched.
    PassLinkScoped,
    /// The original source port was taken; another one was searched for.
    PortCollisions,
    /// Fragments translated by the translation of their datagram's first one.
    FragmentsTranslated,
    /// ICMP errors about translated flows, translated (outer and quoted packet).
    IcmpErrorsTranslated,
    /// Two CPUs created the same flow at once; the loser adopted the winner's entry.
    FlowRaces,
    /// Dropped: no free translated port for the destination after a bounded search.
    DropPortExhausted,
    /// Dropped: the connection table is full.
    DropTableFull,
    /// Dropped: truncated or malformed IP/L4 header.
    DropMalformed,
    /// Dropped: a fragment whose datagram's translation is unknown (its
    /// first fragment was not seen, or came later).
    DropFragment,
    /// Dropped: the protocol cannot be translated (not TCP/UDP/ICMP echo)
    /// but the matching policy requires translation.
    DropUnsupported,
    /// Dropped: the policy's pool has no usable address for the flow's family.
    DropNoEgress,
    /// Dropped: a packet helper failed while rewriting.
    DropRewrite,
    /// Dropped: the classifier tables of the active generation are missing.
    DropNoTables,
    /// Outgoing packets redirected to the uplink their pool names (routing
    /// had chosen another). Each also passes that uplink's egress program,
    /// so it is counted in `EgressPackets` twice. Last, so that adding it
    /// kept the other slots' numbers.
    Redirected,
    /// Flow events lost: the ring buffer was full (the agent's flow log
    /// reads slower than flows come and go). Traffic is not affected.
    FlowLogLost,
}

impl Counter {
    /// Number of counter slots (size of the stats map).
    pub const COUNT: u32 = Counter::FlowLogLost as u32 + 1;

    /// Every counter in slot order with its stable, exported name.
    pub const ALL: &[(Counter, &'static str)] = &[
        (Counter::EgressPackets, "egress_packets"),
        (Counter::IngressPackets, "ingress_packets"),
        (Counter::FlowsNew, "flows_new"),
        (Counter::FlowsTranslated, "flows_translated"),
        (Counter::FlowsBypassed, "flows_bypassed"),
        (Counter::FlowsLocal, "flows_local"),
        (Counter::EgressTranslated, "egress_translated"),
        (Counter::IngressTranslated, "ingress_translated"),
        (Counter::IngressNotOurs, "ingress_not_ours"),
        (Counter::PassNonIp, "pass_non_ip"),
        (Counter::PassLinkScoped, "pass_link_scoped"),
        (Counter::PortCollisions, "port_collisions"),
        (Counter::FragmentsTranslated, "fragments_translated"),
        (Counter::IcmpErrorsTranslated, "icmp_errors_translated"),
        (Counter::FlowRaces, "flow_races"),
        (Counter::DropPortExhausted, "drop_port_exhausted"),
        (Counter::DropTableFull, "drop_table_full"),
        (Counter::DropMalformed, "drop_malformed"),
        (Counter::DropFragment, "drop_fragment"),
        (Counter::DropUnsupported, "drop_unsupported"),
        (Counter::DropNoEgress, "drop_no_egress"),
        (Counter::DropRewrite, "drop_rewrite"),
        (Counter::DropNoTables, "drop_no_tables"),
        (Counter::Redirected, "redirected"),
        (Counter::FlowLogLost, "flow_log_lost"),
    ];
}
const _: () = assert!(Counter::ALL.len() == Counter::COUNT as usize);

/// Which way a packet crosses the gateway, relative to its flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// From the client towards the destination.
    Out,
    /// A reply, towards the client.
    In,
}

/// Packets and bytes (L3 length) of flows, each way.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
}
const _: () = assert!(size_of::<Traffic>() == 32);

impl Traffic {
    /// Count one packet of `bytes` on `side`.
    #[inline(always)]
    pub fn record(&mut self, side: Side, bytes: u32) {
        let (packets, total) = match side {
            Side::Out => (&mut self.packets_out, &mut self.bytes_out),
            Side::In => (&mut self.packets_in, &mut self.bytes_in),
        };
        *packets += 1;
        *total += u64::from(bytes);
    }

    /// Add another CPU's (or flow's) counts.
    pub fn add(&mut self, other: &Self) {
        self.packets_out += other.packets_out;
        self.bytes_out += other.bytes_out;
        self.packets_in += other.packets_in;
        self.bytes_in += other.bytes_in;
    }
}

/// Per-policy counters (one per-CPU slot per policy).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyStats {
    /// Flows this policy classified.
    pub flows: u64,
    /// Packets of those flows, each way.
    pub traffic: Traffic,
}
const _: () = assert!(size_of::<PolicyStats>() == 40);
#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, no implicit padding (size asserted above).
unsafe impl aya::Pod for PolicyStats {}

impl PolicyStats {
    /// Add another CPU's counts.
    pub fn add(&mut self, other: &Self) {
        self.flows += other.flows;
        self.traffic.add(&other.traffic);
    }
}

/// Per-policy counter slots: enough for two full policy sets with no name in
/// common, so a reload never has to reuse a slot the previous set still counts in.
pub const POLICY_STAT_SLOTS: u32 = 2 * crate::classify::ACTIONS_PER_GEN;
/// Slot of the implicit "no policy matched" default.
pub const DEFAULT_STATS_SLOT: u32 = 0;

/// Egress-address counter slots (per-CPU array size).
pub const ADDR_STAT_SLOTS: u32 = 4096;

/// A policy's name as [`crate::maps::POLICY_NAMES`] holds it: UTF-8,
/// NUL-padded, cut at a character boundary when longer.
pub type PolicyName = [u8; 64];
/// An egress address or IPv6 range as [`crate::maps::ADDR_NAMES`] holds it
/// (the longest, an IPv6 range, takes 43 bytes).
pub type AddrName = [u8; 48];

/// Per egress address (an IPv4 address or an IPv6 range), per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrStats {
    /// Flows given this address.
    pub flows: u64,
    /// New flows dropped because no port was free towards their destination.
    pub exhausted: u64,
    /// Packets of its flows, each way.
    pub traffic: Traffic,
}
const _: () = assert!(size_of::<AddrStats>() == 48);
#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, no implicit padding (size asserted above).
unsafe impl aya::Pod for AddrStats {}

impl AddrStats {
    /// Add another CPU's counts.
    pub fn add(&mut self, other: &Self) {
        self.flows += other.flows;
        self.exhausted += other.exhausted;
        self.traffic.add(&other.traffic);
    }
}
