//! BPF_PROG_TEST_RUN tests: crafted packets into the loaded programs, exact
//! verdicts, rewritten bytes, verified checksums and counters out.

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::{
    maps::HashMap as BpfHashMap,
    programs::{TestRun as _, TestRunOptions},
};
use egress_agent::{
    counters,
    geoip::{GeoReport, GeoTables, GeoWriter},
    loader::{Dataplane, LoadOptions},
    policy,
    tables::{self, Tables},
};
use egress_common::{
    classify::NO_MATCH,
    conntrack::{CtEntry4, RevEntry4},
    flow::{Tuple4, proto},
    maps,
    stats::Counter,
};

use super::packet::{self, Summary, sa};
use crate::lab::{
    CLIENT, DEDICATED_PRIMARY, GW_UPLINK, SERVER_INTERNAL, SERVER_PARTNER, SERVER_PUBLIC,
};

const EXAMPLE: &str = include_str!("../../../examples/policies.json");
/// The verdicts of a TC program: let the packet pass, drop it.
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;

pub fn require_root() {
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "these tests load BPF programs and need root: run them with `cargo xtask test`"
    );
}

/// A loaded dataplane with a policy set applied, not attached anywhere.
pub struct Dp {
    dataplane: Dataplane,
    tables: Tables,
    /// The country tables' writer, when they were reserved (`opts.geo`).
    geo: Option<GeoWriter>,
}

impl Dp {
    pub fn new(policies: &str) -> Self {
        Self::with_options(
            policies,
            &LoadOptions {
                max_flows: 16384,
                ..LoadOptions::default()
            },
        )
    }

    pub fn with_options(policies: &str, opts: &LoadOptions) -> Self {
        require_root();
        let mut dataplane =
            Dataplane::load(opts).unwrap_or_else(|e| panic!("loading the dataplane: {e}"));
        tables::set_local_addrs(dataplane.ebpf_mut(), &[GW_UPLINK.into()]).unwrap();
        // Before `Tables::new`, which takes the generation map.
        let geo = opts.geo.then(|| {
            GeoWriter::new(dataplane.ebpf_mut())
                .unwrap_or_else(|e| panic!("opening the country maps: {e}"))
        });
        let tables = Tables::new(dataplane.ebpf_mut()).unwrap();
        let mut dp = Self {
            dataplane,
            tables,
            geo,
        };
        dp.apply(policies);
        dp
    }

    /// The country tables' writer (the dataplane must be loaded with `geo`).
    pub fn geo(&mut self) -> &mut GeoWriter {
        self.geo
            .as_mut()
            .expect("the dataplane was loaded with LoadOptions { geo: true, .. }")
    }

    /// Load country tables, as the agent does on start and reload.
    pub fn set_countries(&mut self, countries: &GeoTables) -> GeoReport {
        self.geo()
            .apply(countries)
            .unwrap_or_else(|e| panic!("loading the country tables: {e}"))
    }

    pub fn apply(&mut self, policies: &str) {
        let set = policy::parse(policies).unwrap_or_else(|e| panic!("test policy: {e}"));
        self.tables
            .apply(&set, &policy::compile(&set, &[]))
            .unwrap_or_else(|e| panic!("applying policies: {e}"));
    }

    pub fn run(&mut self, program: &'static str, input: &[u8]) -> (i32, Vec<u8>) {
        let mut out = vec![0u8; input.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let result = self
            .dataplane
            .program(program)
            .unwrap()
            .test_run(opts)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN {program}: {e}"));
        out.truncate(result.data_size_out as usize);
        (result.return_value as i32, out)
    }

    pub fn egress(&mut self, input: &[u8]) -> (i32, Vec<u8>) {
        self.run(maps::PROG_EGRESS, input)
    }

    pub fn ingress(&mut self, input: &[u8]) -> (i32, Vec<u8>) {
        self.run(maps::PROG_INGRESS, input)
    }

    pub fn counter(&mut self, counter: Counter) -> u64 {
        counters::get(self.dataplane.ebpf_mut(), counter).unwrap()
    }

    pub fn ct(&mut self, key: &Tuple4) -> Option<CtEntry4> {
        let map: BpfHashMap<_, Tuple4, CtEntry4> =
            BpfHashMap::try_from(self.dataplane.ebpf_mut().map(maps::CT4).unwrap()).unwrap();
        map.get(key, 0).ok()
    }

    pub fn ct6(
        &mut self,
        key: &egress_common::flow::Tuple6,
    ) -> Option<egress_common::conntrack::CtEntry6> {
        let map: BpfHashMap<_, egress_common::flow::Tuple6, egress_common::conntrack::CtEntry6> =
            BpfHashMap::try_from(self.dataplane.ebpf_mut().map(maps::CT6).unwrap()).unwrap();
        map.get(key, 0).ok()
    }

    pub fn rev(&mut self, key: &Tuple4) -> Option<RevEntry4> {
        let map: BpfHashMap<_, Tuple4, RevEntry4> =
            BpfHashMap::try_from(self.dataplane.ebpf_mut().map(maps::NAT4).unwrap()).unwrap();
        map.get(key, 0).ok()
    }

    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    pub fn tables_mut(&mut self) -> &mut Tables {
        &mut self.tables
    }

    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dataplane
    }
}

fn tuple(src: SocketAddrV4, dst: SocketAddrV4, protocol: u8) -> Tuple4 {
    Tuple4::new(
        u32::from(*src.ip()).to_be(),
        u32::from(*dst.ip()).to_be(),
        src.port().to_be(),
        dst.port().to_be(),
        protocol,
    )
}

#[test]
fn object_every_shared_map_and_program_present() {
    require_root();
    let mut dataplane = Dataplane::load(&LoadOptions::default()).unwrap();
    for name in maps::ALL {
        assert!(
            dataplane.ebpf_mut().map(name).is_some(),
            "map {name} from egress_common::maps must exist in the object"
        );
    }
    for name in [maps::PROG_EGRESS, maps::PROG_INGRESS] {
        assert!(dataplane.program(name).is_ok(), "program {name} must exist");
    }
}

#[test]
fn snat_tcp_dedicated_policy_rewrites_source_with_valid_checksums() {
    let mut dp = Dp::new(EXAMPLE);
    let client = sa(CLIENT, 40001);
    let server = sa(SERVER_PARTNER, 443);
    let (verdict, out) = dp.egress(&packet::tcp(client, server, true, b"hello"));
    assert_eq!(verdict, TC_ACT_OK, "a translated packet must pass");
    let got = packet::checked(&out);
    assert_eq!(
        got,
        Summary {
            src: sa(DEDICATED_PRIMARY, 40001),
            dst: server,
            proto: proto::TCP
        },
        "src must become the pool's primary address, keeping the free source port"
    );
    assert_eq!(&out[out.len() - 5..], b"hello", "payload must be intact");
    let entry = dp
        .ct(&tuple(client, server, proto::TCP))
        .expect("flow must be tracked");
    assert_eq!(
        entry.policy, 0,
        "the flow must record the policy that chose it"
    );
    assert_eq!(dp.counter(Counter::FlowsTranslated), 1);
    assert_eq!(dp.counter(Counter::EgressTranslated), 1);
}

#[test]
fn snat_udp_catch_all_rewrites_to_default_address() {
    let mut dp = Dp::new(EXAMPLE);
    let client = sa(CLIENT, 5353);
    let server = sa(SERVER_PUBLIC, 53);
    let (verdict, out) = dp.egress(&packet::udp(client, server, b"query"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        packet::checked(&out).src,
        sa(GW_UPLINK, 5353),
        "catch-all flows must leave from the default egress address"
    );
}

#[test]
fn snat_dedicated_destination_wrong_port_falls_to_catch_all() {
    let mut dp = Dp::new(EXAMPLE);
    let (_, out) = dp.egress(&packet::tcp(
        sa(CLIENT, 40002),
        sa(SERVER_PARTNER, 9000),
        true,
        b"",
    ));
    assert_eq!(
        packet::checked(&out).src,
        sa(GW_UPLINK, 40002),
        "port 9000 is outside the dedicated policy's ports: default egress"
    );
}

#[test]
fn snat_bypass_policy_leaves_packet_byte_identical() {
    let mut dp = Dp::new(EXAMPLE);
    let input = packet::tcp(
        sa(CLIENT, 40003),
        sa(SERVER_INTERNAL, 443),
        true,
        b"internal",
    );
    let (verdict, out) = dp.egress(&input);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, input, "bypassed packets must not change");
    assert_eq!(dp.counter(Counter::FlowsBypassed), 1);
    let (_, again) = dp.egress(&input);
    assert_eq!(
        again, input,
        "later packets of a bypassed flow must not change"
    );
    assert_eq!(
        dp.counter(Counter::FlowsNew),
        1,
        "the second packet must hit the connection table"
    );
}

#[test]
fn snat_non_ip_frame_passes_untouched() {
    let mut dp = Dp::new(EXAMPLE);
    let input = packet::arp();
    let (verdict, out) = dp.egress(&input);
    assert_eq!(verdict, TC_ACT_OK, "ARP must pass");
    assert_eq!(out, input, "ARP must not change");
    assert_eq!(dp.counter(Counter::PassNonIp), 1);
}

#[test]
fn snat_icmp_echo_translated_and_reply_restored() {
    let mut dp = Dp::new(EXAMPLE);
    let (verdict, out) = dp.egress(&packet::echo(CLIENT, SERVER_PARTNER, true, 0x4242, b"ping"));
    assert_eq!(verdict, TC_ACT_OK);
    let got = packet::checked(&out);
    assert_eq!(
        *got.src.ip(),
        GW_UPLINK,
        "ICMP is not in the dedicated policy's protocols: default egress"
    );
    assert_eq!(got.src.port(), 0x4242, "a free echo identifier is kept");

    let (verdict, back) = dp.ingress(&packet::echo(
        SERVER_PARTNER,
        GW_UPLINK,
        false,
        0x4242,
        b"ping",
    ));
    assert_eq!(verdict, TC_ACT_OK);
    let got = packet::checked(&back);
    assert_eq!(
        *got.dst.ip(),
        CLIENT,
        "the echo reply must go back to the client"
    );
    assert_eq!(dp.counter(Counter::IngressTranslated), 1);
}

#[test]
fn restore_tcp_reply_translated_back_to_client_port() {
    let mut dp = Dp::new(EXAMPLE);
    let client = sa(CLIENT, 40004);
    let server = sa(SERVER_PARTNER, 8080);
    dp.egress(&packet::tcp(client, server, true, b""));
    let reply = packet::tcp(server, sa(DEDICATED_PRIMARY, 40004), false, b"response");
    let (verdict, out) = dp.ingress(&reply);
    assert_eq!(verdict, TC_ACT_OK);
    let got = packet::checked(&out);
    assert_eq!(
        got.dst, client,
        "the reply's destination must be the client again"
    );
    assert_eq!(got.src, server, "the reply's source must not change");
    assert_eq!(&out[out.len() - 8..], b"response");
}

#[test]
fn restore_unrelated_packet_passes_byte_identical() {
    let mut dp = Dp::new(EXAMPLE);
    let input = packet::tcp(sa(SERVER_PUBLIC, 5555), sa(GW_UPLINK, 22), true, b"");
    let (verdict, out) = dp.ingress(&input);
    assert_eq!(
        verdict, TC_ACT_OK,
        "traffic to the gateway itself must pass"
    );
    assert_eq!(out, input, "and must not change");
    assert_eq!(dp.counter(Counter::IngressNotOurs), 1);
}

#[test]
fn snat_source_port_taken_second_client_gets_other_port() {
    let mut dp = Dp::new(EXAMPLE);
    let server = sa(SERVER_PUBLIC, 443);
    let first = sa(CLIENT, 50000);
    let second = sa(Ipv4Addr::new(10, 10, 0, 3), 50000);
    let (_, a) = dp.egress(&packet::tcp(first, server, true, b""));
    let (_, b) = dp.egress(&packet::tcp(second, server, true, b""));
    let (a, b) = (packet::checked(&a), packet::checked(&b));
    assert_eq!(a.src, sa(GW_UPLINK, 50000), "the first flow keeps its port");
    assert_eq!(*b.src.ip(), GW_UPLINK);
    assert_ne!(
        b.src.port(),
        50000,
        "the second flow must not reuse a live mapping"
    );
    assert!(
        b.src.port() >= 1024,
        "the replacement port comes from the configured range"
    );
    assert_eq!(dp.counter(Counter::PortCollisions), 1);

    // Replies reach the right client each.
    let (_, back) = dp.ingress(&packet::tcp(server, b.src, false, b""));
    assert_eq!(
        packet::checked(&back).dst,
        second,
        "replies to the second mapping reach the second client"
    );
    let (_, back) = dp.ingress(&packet::tcp(server, a.src, false, b""));
    assert_eq!(
        packet::checked(&back).dst,
        first,
        "replies to the first mapping reach the first client"
    );
}

#[test]
fn snat_same_port_other_destination_reuses_port() {
    let mut dp = Dp::new(EXAMPLE);
    let (_, a) = dp.egress(&packet::udp(sa(CLIENT, 6000), sa(SERVER_PUBLIC, 53), b"a"));
    let (_, b) = dp.egress(&packet::udp(
        sa(Ipv4Addr::new(10, 10, 0, 3), 6000),
        sa(Ipv4Addr::new(198, 51, 100, 11), 53),
        b"b",
    ));
    assert_eq!(packet::checked(&a).src, sa(GW_UPLINK, 6000));
    assert_eq!(
        packet::checked(&b).src,
        sa(GW_UPLINK, 6000),
        "mappings are endpoint-dependent: another destination may reuse the port"
    );
}

#[test]
fn snat_udp_zero_checksum_stays_zero() {
    let mut dp = Dp::new(EXAMPLE);
    let (verdict, out) = dp.egress(&packet::udp_no_checksum(
        sa(CLIENT, 7000),
        sa(SERVER_PUBLIC, 53),
        b"x",
    ));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        packet::udp_checksum(&out),
        0,
        "an absent UDP checksum must stay absent"
    );
    assert_eq!(*packet::checked(&out).src.ip(), GW_UPLINK);
}

#[test]
fn snat_truncated_tcp_header_dropped_and_counted() {
    let mut dp = Dp::new(EXAMPLE);
    let full = packet::tcp(sa(CLIENT, 40005), sa(SERVER_PUBLIC, 443), true, b"");
    let (verdict, _) = dp.egress(&full[..14 + 20 + 10]);
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "a truncated TCP header must be dropped"
    );
    assert_eq!(dp.counter(Counter::DropMalformed), 1);
}

#[test]
fn frag_fragments_of_translated_datagram_all_translated_consistently() {
    let mut dp = Dp::new(EXAMPLE);
    let client = sa(CLIENT, 7001);
    let server = sa(SERVER_PARTNER, 8080);
    let payload: Vec<u8> = (0..200u8).collect();
    let [first, second] = packet::udp_fragments(client, server, 0x1234, &payload, 96);
    let (v1, out1) = dp.egress(&first);
    let (v2, out2) = dp.egress(&second);
    assert_eq!((v1, v2), (TC_ACT_OK, TC_ACT_OK), "both fragments must pass");
    let whole = packet::reassemble(&[&out1, &out2]);
    let got = packet::checked(&whole);
    assert_eq!(
        got.src,
        sa(DEDICATED_PRIMARY, 7001),
        "the reassembled datagram leaves from the dedicated address, its UDP checksum valid"
    );
    assert_eq!(&whole[14 + 20 + 8..], payload.as_slice(), "payload intact");
    assert_eq!(
        dp.counter(Counter::FragmentsTranslated),
        1,
        "the later fragment was translated"
    );

    // The reply comes back fragmented too.
    let [r1, r2] = packet::udp_fragments(server, sa(DEDICATED_PRIMARY, 7001), 0x4321, &payload, 64);
    let (_, back1) = dp.ingress(&r1);
    let (_, back2) = dp.ingress(&r2);
    let whole = packet::reassemble(&[&back1, &back2]);
    assert_eq!(
        packet::checked(&whole).dst,
        client,
        "the reassembled reply reaches the client"
    );
}

#[test]
fn frag_later_fragment_without_first_dropped_and_counted() {
    let mut dp = Dp::new(EXAMPLE);
    let payload: Vec<u8> = (0..100u8).collect();
    let [_, second] = packet::udp_fragments(
        sa(CLIENT, 7002),
        sa(SERVER_PUBLIC, 53),
        0x5555,
        &payload,
        48,
    );
    let (verdict, _) = dp.egress(&second);
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "a fragment whose datagram is unknown must not leak"
    );
    assert_eq!(dp.counter(Counter::DropFragment), 1);
    let (verdict, out) = dp.ingress(&second);
    assert_eq!(
        verdict, TC_ACT_OK,
        "on ingress it belongs to no translated flow: untouched"
    );
    assert_eq!(out, second);
}

#[test]
fn snat_untranslatable_protocol_under_translate_policy_dropped() {
    let mut dp = Dp::new(EXAMPLE);
    let (verdict, _) = dp.egress(&packet::other_protocol(CLIENT, SERVER_PUBLIC, 47));
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "GRE matching a translating policy must not leak with the client address"
    );
    assert_eq!(dp.counter(Counter::DropUnsupported), 1);
    let input = packet::other_protocol(CLIENT, SERVER_INTERNAL, 47);
    let (verdict, out) = dp.egress(&input);
    assert_eq!(verdict, TC_ACT_OK, "GRE matching a bypass policy passes");
    assert_eq!(out, input);
}

#[test]
fn snat_gateway_own_flow_reserved_not_steered() {
    let mut dp = Dp::new(EXAMPLE);
    let own = sa(GW_UPLINK, 33000);
    let input = packet::tcp(own, sa(SERVER_PARTNER, 443), true, b"");
    let (verdict, out) = dp.egress(&input);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out, input,
        "the gateway's own flow is not steered to the dedicated address"
    );
    assert_eq!(dp.counter(Counter::FlowsLocal), 1);
    // A client flow wanting the same tuple is given another port.
    let (_, client) = dp.egress(&packet::tcp(
        sa(CLIENT, 33000),
        sa(SERVER_PUBLIC, 443),
        true,
        b"",
    ));
    assert_eq!(*packet::checked(&client).src.ip(), GW_UPLINK);
    let (_, again) = dp.egress(&packet::tcp(
        sa(Ipv4Addr::new(10, 10, 0, 3), 33000),
        sa(SERVER_PARTNER, 443),
        true,
        b"",
    ));
    let again = packet::checked(&again);
    assert_eq!(*again.src.ip(), DEDICATED_PRIMARY);
    let (_, clash) = dp.egress(&packet::tcp(
        sa(Ipv4Addr::new(10, 10, 0, 4), 33000),
        sa(SERVER_PUBLIC, 443),
        true,
        b"",
    ));
    assert_ne!(
        packet::checked(&clash).src.port(),
        33000,
        "the port is already held towards this destination"
    );
}

#[test]
fn snat_policy_counters_count_packets_and_bytes_both_ways() {
    let mut dp = Dp::new(EXAMPLE);
    let client = sa(CLIENT, 40006);
    let server = sa(SERVER_PARTNER, 443);
    let out_pkt = packet::tcp(client, server, true, b"0123456789");
    for _ in 0..3 {
        dp.egress(&out_pkt);
    }
    dp.ingress(&packet::tcp(
        server,
        sa(DEDICATED_PRIMARY, 40006),
        false,
        b"ok",
    ));
    let slot = dp.tables().active_policies()[0].stats_slot;
    let stats = dp.tables().policy_stats(slot).unwrap();
    let l3 = (out_pkt.len() - 14) as u64;
    assert_eq!(stats.flows, 1, "one flow");
    assert_eq!(stats.traffic.packets_out, 3, "three packets out");
    assert_eq!(stats.traffic.bytes_out, 3 * l3, "bytes out are IP lengths");
    assert_eq!(stats.traffic.packets_in, 1, "one reply");
    assert_eq!(
        stats.traffic.bytes_in,
        20 + 20 + 2,
        "reply bytes are its IP length"
    );
}

#[test]
fn reload_new_flows_use_new_set_established_keep_translation() {
    let mut dp = Dp::new(EXAMPLE);
    let old_client = sa(CLIENT, 41000);
    let server = sa(SERVER_PUBLIC, 443);
    let (_, out) = dp.egress(&packet::tcp(old_client, server, true, b""));
    assert_eq!(*packet::checked(&out).src.ip(), GW_UPLINK);

    // Send everything to the dedicated pool from now on.
    let everything_dedicated = EXAMPLE.replace(
        r#""selector": {}, "action": { "egress": "default" }"#,
        r#""selector": {}, "action": { "egress": "pt-montijo" }"#,
    );
    assert_ne!(everything_dedicated, EXAMPLE, "test policy edit must apply");
    dp.apply(&everything_dedicated);

    let (_, out) = dp.egress(&packet::tcp(old_client, server, false, b"more"));
    assert_eq!(
        *packet::checked(&out).src.ip(),
        GW_UPLINK,
        "an established flow keeps its egress address across a reload"
    );
    let (_, out) = dp.egress(&packet::tcp(sa(CLIENT, 41001), server, true, b""));
    assert_eq!(
        *packet::checked(&out).src.ip(),
        DEDICATED_PRIMARY,
        "a new flow is classified by the new policy set"
    );

    // And back: the old generation's tables are rewritten, not appended to.
    dp.apply(EXAMPLE);
    let (_, out) = dp.egress(&packet::tcp(sa(CLIENT, 41002), server, true, b""));
    assert_eq!(
        *packet::checked(&out).src.ip(),
        GW_UPLINK,
        "the third set is in force"
    );
}

#[test]
fn snat_no_policy_matches_uses_default_egress() {
    let only_dedicated = r#"{
        "egress_pools": { "p": { "ipv4": ["203.0.113.10"] } },
        "default_egress": { "ipv4": "203.0.113.1" },
        "policies": [ { "name": "p", "selector": { "dst": ["192.0.2.0/24"] }, "action": { "egress": "p" } } ]
    }"#;
    let mut dp = Dp::new(only_dedicated);
    let client = sa(CLIENT, 42000);
    let server = sa(SERVER_PUBLIC, 80);
    let (_, out) = dp.egress(&packet::tcp(client, server, true, b""));
    assert_eq!(
        *packet::checked(&out).src.ip(),
        GW_UPLINK,
        "no match: default egress"
    );
    assert_eq!(
        dp.ct(&tuple(client, server, proto::TCP)).unwrap().policy,
        NO_MATCH as u16,
        "the flow records that no policy matched"
    );
    let rev = dp
        .rev(&tuple(sa(GW_UPLINK, 42000), server, proto::TCP))
        .expect("reverse entry");
    assert_eq!(rev.orig_addr, u32::from(CLIENT).to_be());
}

/// Build the first packet of `flow` (TCP, UDP or ICMP echo) from `sport`.
pub fn first_packet(flow: &policy::eval::Flow, sport: u16) -> Vec<u8> {
    use super::packet::{echo6, sa6, tcp6, udp6};
    match (flow.src, flow.dst) {
        (std::net::IpAddr::V4(src), std::net::IpAddr::V4(dst)) => match flow.proto {
            proto::TCP => packet::tcp(sa(src, sport), sa(dst, flow.dst_port), true, b""),
            proto::UDP => packet::udp(sa(src, sport), sa(dst, flow.dst_port), b""),
            _ => packet::echo(src, dst, true, sport, b""),
        },
        (std::net::IpAddr::V6(src), std::net::IpAddr::V6(dst)) => match flow.proto {
            proto::TCP => tcp6(sa6(src, sport), sa6(dst, flow.dst_port), true, b""),
            proto::UDP => udp6(sa6(src, sport), sa6(dst, flow.dst_port), b""),
            _ => echo6(src, dst, true, sport, b""),
        },
        _ => panic!("mixed families"),
    }
}

/// The policy index the kernel recorded for the flow `first_packet` made.
pub fn recorded_policy(dp: &mut Dp, flow: &policy::eval::Flow, sport: u16) -> Option<u16> {
    let dport = if matches!(flow.proto, proto::ICMP | proto::ICMPV6) {
        0
    } else {
        flow.dst_port
    };
    match (flow.src, flow.dst) {
        (std::net::IpAddr::V4(src), std::net::IpAddr::V4(dst)) => dp
            .ct(&tuple(sa(src, sport), sa(dst, dport), flow.proto))
            .map(|e| e.policy),
        (std::net::IpAddr::V6(src), std::net::IpAddr::V6(dst)) => {
            let key = egress_common::flow::Tuple6::new(
                tables::addr6_words(&src),
                tables::addr6_words(&dst),
                sport.to_be(),
                dport.to_be(),
                flow.proto,
            );
            dp.ct6(&key).map(|e| e.policy)
        }
        _ => None,
    }
}

#[test]
fn classify_random_policy_sets_kernel_agrees_with_reference() {
    use std::{
        collections::{HashMap, HashSet},
        net::IpAddr,
    };

    use egress_agent::{
        geoip::{Merged, Ranges},
        identity::{dataplane::IdentityTries, registry::Change},
        policy::{eval::Context, geo, testing},
    };
    use egress_common::classify::IdentityRef;
    use ipnet::IpNet;
    use proptest::{
        strategy::{Strategy as _, ValueTree as _},
        test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
    };

    let mut dp = Dp::with_options(
        EXAMPLE,
        &LoadOptions {
            max_flows: 16384,
            geo: true,
            // One address per probe: a split block or a few IPv6 ranges each.
            geo_split_blocks: 1024,
            geo_v6_ranges: 4096,
            ..LoadOptions::default()
        },
    );
    // The agent's own writer of the identity maps; the addresses of the
    // previous round are removed when a round no longer names them.
    let mut tries = IdentityTries::new(dp.dataplane.ebpf_mut()).unwrap();
    let mut held: HashSet<IpNet> = HashSet::new();
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let mut sport = 1024u16;
    let mut checked = 0;
    let mut checked6 = 0;
    for round in 0..80 {
        // Mostly small sets, some large; every set is a reload of the same maps.
        let max = if round % 8 == 7 { 4096 } else { 48 };
        let case = testing::case(max, 100)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        dp.tables
            .apply(&case.set, &policy::compile(&case.set, &case.identities))
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        // Identities by source and countries by destination, as the maps
        // hold them: the first probe naming an address decides.
        let mut identity_of: HashMap<IpAddr, u32> = HashMap::new();
        let mut country_of: HashMap<IpAddr, u16> = HashMap::new();
        for probe in &case.probes {
            if let Some(id) = probe.identity {
                identity_of.entry(probe.flow.src).or_insert(id);
            }
            if let Some(c) = probe.country {
                country_of.entry(probe.flow.dst).or_insert(c);
            }
        }
        let host = |a: &IpAddr| IpNet::from(*a);
        let ids: Vec<(IpNet, IdentityRef)> = identity_of
            .iter()
            .map(|(a, id)| (host(a), IdentityRef { id: *id, key: *id }))
            .collect();
        let mut countries = Ranges::default();
        for (a, c) in &country_of {
            countries.push(*a, *a, *c as u8);
        }
        let wanted: HashSet<IpNet> = ids.iter().map(|(net, _)| *net).collect();
        let change = Change {
            remove: held.difference(&wanted).copied().collect(),
            insert: ids,
            ..Change::default()
        };
        tries.apply(&mut dp.tables, &[], &change).unwrap();
        held = wanted;
        let countries = GeoTables::build(&Merged::new([&countries])).unwrap();
        dp.set_countries(&countries);

        for probe in &case.probes {
            let flow = probe.flow;
            // Only flows the dataplane tracks whatever the action: TCP, UDP
            // and echo of the flow's own family, from a non-gateway source.
            let echo = if flow.src.is_ipv4() {
                proto::ICMP
            } else {
                proto::ICMPV6
            };
            if ![proto::TCP, proto::UDP, echo].contains(&flow.proto)
                || flow.src == IpAddr::V4(GW_UPLINK)
            {
                continue;
            }
            sport = sport.wrapping_add(1).max(1024);
            let (verdict, _) = dp.egress(&first_packet(&flow, sport));
            if flow.is_link_scoped() {
                assert!(
                    verdict == TC_ACT_OK && recorded_policy(&mut dp, &flow, sport).is_none(),
                    "round {round}: link-scoped {flow:?} must pass untracked (verdict {verdict})"
                );
                continue;
            }
            let ctx = Context {
                flow,
                identity: identity_of
                    .get(&flow.src)
                    .map(|&id| &case.identities[id as usize - 1]),
                country: country_of
                    .get(&flow.dst)
                    .and_then(|&c| geo::by_id(c))
                    .map(|(c, _)| c),
            };
            let expected = case.set.first_match(&ctx).map_or(NO_MATCH, |i| i as u32);
            let recorded = recorded_policy(&mut dp, &flow, sport).unwrap_or_else(|| {
                panic!("round {round}: no flow entry for {flow:?} (verdict {verdict})")
            });
            assert_eq!(
                u32::from(recorded),
                expected,
                "round {round}: the kernel must pick the reference's policy for {ctx:?}"
            );
            checked += 1;
            checked6 += usize::from(flow.src.is_ipv6());
        }
    }
    assert!(
        checked6 > 300,
        "IPv6 flows must be sampled too, checked {checked6}"
    );
    assert!(
        checked > 1000,
        "the sample must be substantial, checked {checked}"
    );
}

#[test]
fn snat6_tcp_pool_range_address_stable_per_source_and_reply_restored() {
    use std::net::Ipv6Addr;

    use super::packet::{sa6, tcp6};
    let policy = r#"{
        "egress_pools": { "p": { "ipv4": ["203.0.113.10"], "ipv6": "2001:db8:e0::/64" } },
        "default_egress": { "ipv4": "203.0.113.1", "ipv6": "2001:db8:ff::1" },
        "policies": [
            { "name": "v6 partner", "selector": { "dst": ["2001:db8:2::/48"] }, "action": { "egress": "p" } },
            { "name": "rest", "selector": {}, "action": { "egress": "default" } }
        ]
    }"#;
    let mut dp = Dp::new(policy);
    let client: Ipv6Addr = "fd00:10::2".parse().unwrap();
    let server = sa6("2001:db8:2::10".parse().unwrap(), 443);
    let (verdict, out) = dp.egress(&tcp6(sa6(client, 40000), server, true, b"v6"));
    assert_eq!(verdict, TC_ACT_OK);
    let first = packet::checked6(&out);
    let range: ipnet::Ipv6Net = "2001:db8:e0::/64".parse().unwrap();
    assert!(
        range.contains(first.src.ip()),
        "the source must come from the pool's range: {first:?}"
    );
    assert_eq!(first.src.port(), 40000, "the free port is kept");
    let (_, out) = dp.egress(&tcp6(sa6(client, 40001), server, true, b""));
    assert_eq!(
        packet::checked6(&out).src.ip(),
        first.src.ip(),
        "the same source keeps one address"
    );
    let (_, out) = dp.egress(&tcp6(
        sa6(client, 40002),
        sa6("2001:db8:3::10".parse().unwrap(), 80),
        true,
        b"",
    ));
    assert_eq!(
        packet::checked6(&out).src.ip(),
        &"2001:db8:ff::1".parse::<Ipv6Addr>().unwrap(),
        "other destinations leave from the default IPv6 egress"
    );
    let (verdict, back) = dp.ingress(&tcp6(server, first.src, false, b"ok"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        packet::checked6(&back).dst,
        sa6(client, 40000),
        "the reply returns to the client"
    );
}

/// Nested country ranges that share a first address (192.0.2.0/24 in
/// Portugal, then 192.0.2.0/25 in Spain): the one listed later wins inside
/// it, the wider one covers the rest. Loading the tables again keeps both.
#[test]
fn geo_nested_ranges_later_wins_inside_wider_covers_rest() {
    use egress_agent::geoip::{Merged, Ranges};

    const POLICIES: &str = r#"{
        "egress_pools": {
            "es": { "ipv4": ["203.0.113.10"] },
            "pt": { "ipv4": ["203.0.113.11"] }
        },
        "default_egress": { "ipv4": "203.0.113.1" },
        "policies": [
            { "name": "to Spain", "selector": { "dst_countries": ["ES"] }, "action": { "egress": "es" } },
            { "name": "to Portugal", "selector": { "dst_countries": ["PT"] }, "action": { "egress": "pt" } }
        ]
    }"#;
    let id = |code: &str| {
        let (country, _, _) = policy::geo::lookup(code).expect("a known country");
        policy::geo::country_id(country).expect("a country id") as u8
    };
    let mut dp = Dp::with_options(
        POLICIES,
        &LoadOptions {
            max_flows: 16384,
            geo: true,
            ..LoadOptions::default()
        },
    );
    let mut ranges = Ranges::default();
    let addr = |a: &str| a.parse::<std::net::IpAddr>().unwrap();
    ranges.push(addr("192.0.2.0"), addr("192.0.2.255"), id("PT"));
    ranges.push(addr("192.0.2.0"), addr("192.0.2.127"), id("ES"));
    let countries = GeoTables::build(&Merged::new([&ranges])).unwrap();
    // Twice: the second load goes to the other generation and must hold
    // both ranges there too.
    for _ in 0..2 {
        dp.set_countries(&countries);
    }
    let mut left_from = |dst: Ipv4Addr, sport: u16| {
        let (verdict, out) = dp.egress(&packet::udp(sa(CLIENT, sport), sa(dst, 53), b"q"));
        assert_eq!(verdict, TC_ACT_OK, "a flow to {dst} must pass");
        *packet::checked(&out).src.ip()
    };
    assert_eq!(
        left_from(Ipv4Addr::new(192, 0, 2, 10), 4001),
        Ipv4Addr::new(203, 0, 113, 10),
        "192.0.2.10 is in the /25 (Spain)"
    );
    assert_eq!(
        left_from(Ipv4Addr::new(192, 0, 2, 200), 4002),
        Ipv4Addr::new(203, 0, 113, 11),
        "192.0.2.200 is only in the /24 (Portugal)"
    );
    assert_eq!(
        left_from(Ipv4Addr::new(198, 51, 100, 7), 4003),
        GW_UPLINK,
        "an address of no known country leaves from the default egress"
    );
}
