//! BPF_PROG_TEST_RUN tests of the stateful NAT: IPv6 flows and fragments,
//! ICMP errors of both families and both directions, port allocation,
//! pools (spread, failover, health), per-address counters and reloads.
//!
//! Wherever the dataplane rewrites a packet, the expected packet is built
//! independently (as the sender on the other side would have built it) and
//! compared byte for byte, after every checksum was verified.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
};

use aya::maps::HashMap as BpfHashMap;
use egress_common::{
    conntrack::CtEntry6,
    flow::Tuple6,
    maps,
    stats::{AddrStats, Counter, Traffic},
};
use etherparse::{Icmpv4Type, Icmpv6Type, icmpv4, icmpv6};

use super::{
    packet::{self, sa, sa6},
    prog_test_run::{Dp, TC_ACT_OK, TC_ACT_SHOT},
};
use crate::lab::{
    CLIENT, CLIENT6, DEDICATED_PRIMARY, DEDICATED_SECONDARY, GW_UPLINK, GW_UPLINK6, INET_ROUTER,
    POOL6, SERVER_PARTNER, SERVER_PUBLIC, SERVER6_A, SERVER6_B,
};

/// A second and third client on the LAN.
const CLIENT_B: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 3);
const CLIENT6_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 3);
/// A router on the IPv6 path (sends packet-too-big and time-exceeded).
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0xfe);
/// A third pool address.
const DEDICATED_THIRD: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 12);

/// Both families: the partner ranges leave from pool `p` (its IPv4 address is
/// DEDICATED_PRIMARY, its IPv6 range POOL6), 2001:db8:3::/48 is bypassed,
/// everything else leaves from the default egress.
const POLICY: &str = r#"{
    "egress_pools": {
        "p": { "ipv4": ["203.0.113.10"], "ipv6": "2001:db8:e0::/64" }
    },
    "default_egress": { "ipv4": "203.0.113.1", "ipv6": "2001:db8:ff::1" },
    "policies": [
        { "name": "partner", "selector": { "dst": ["192.0.2.0/24", "2001:db8:2::/48"] },
          "action": { "egress": "p" } },
        { "name": "internal v6", "selector": { "dst": ["2001:db8:3::/48"] },
          "action": { "egress": "bypass" } },
        { "name": "rest", "selector": {}, "action": { "egress": "default" } }
    ]
}"#;

fn pool6() -> ipnet::Ipv6Net {
    POOL6.parse().unwrap()
}

/// The IP length of an Ethernet frame (what the byte counters count).
fn ip_len(frame: &[u8]) -> u64 {
    (frame.len() - 14) as u64
}

/// Entries of the IPv6 connection table.
fn ipv6_flows(dp: &mut Dp) -> usize {
    let map = dp
        .dataplane_mut()
        .ebpf_mut()
        .map(maps::CT6)
        .expect("the IPv6 connection table");
    let ct: BpfHashMap<_, Tuple6, CtEntry6> = BpfHashMap::try_from(map).unwrap();
    ct.keys().count()
}

/// Counters of one egress address (an IPv4 address or an IPv6 range as text).
fn addr_stats(dp: &Dp, label: &str) -> AddrStats {
    let all = dp.tables().addr_stats().expect("reading address counters");
    all.iter()
        .find(|(l, _)| l == label)
        .unwrap_or_else(|| panic!("no counters for {label}: {all:?}"))
        .1
}

fn frag_needed(mtu: u16) -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FragmentationNeeded {
        next_hop_mtu: mtu,
    })
}

fn ttl_exceeded() -> Icmpv4Type {
    Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit)
}

fn port_unreachable() -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port)
}

fn hop_limit_exceeded() -> Icmpv6Type {
    Icmpv6Type::TimeExceeded(icmpv6::TimeExceededCode::HopLimitExceeded)
}

/// Send `frame` out and return what left, asserting that it passed.
pub(super) fn out_ok(dp: &mut Dp, frame: &[u8]) -> Vec<u8> {
    let (verdict, out) = dp.egress(frame);
    assert_eq!(verdict, TC_ACT_OK, "the outgoing packet must pass");
    out
}

/// Send `frame` in and return what arrived, asserting that it passed.
pub(super) fn in_ok(dp: &mut Dp, frame: &[u8]) -> Vec<u8> {
    let (verdict, out) = dp.ingress(frame);
    assert_eq!(verdict, TC_ACT_OK, "the incoming packet must pass");
    out
}

// ---- IPv6 builders -----------------------------------------------------

/// Offsets inside an Ethernet/IPv6 frame.
const V6_PAYLOAD_LEN: usize = 14 + 4;
const V6_NEXT: usize = 14 + 6;
const V6_SRC: usize = 14 + 8;
const V6_L4: usize = 14 + 40;
/// IPv6 Fragment extension header.
const NEXT_FRAGMENT: u8 = 44;

/// The two fragments of an IPv6 UDP datagram (a Fragment extension header,
/// next header 44, with identification `id`), the first carrying
/// `first_len` bytes of the UDP datagram (a multiple of 8).
fn udp6_fragments(
    src: SocketAddrV6,
    dst: SocketAddrV6,
    id: u32,
    payload: &[u8],
    first_len: usize,
) -> [Vec<u8>; 2] {
    assert_eq!(first_len % 8, 0, "fragment offsets count 8-byte units");
    let whole = packet::udp6(src, dst, payload);
    let (head, datagram) = whole.split_at(V6_L4);
    let piece = |bytes: &[u8], offset: usize, more: bool| {
        let mut out = head.to_vec();
        out[V6_NEXT] = NEXT_FRAGMENT;
        out[V6_PAYLOAD_LEN..V6_PAYLOAD_LEN + 2]
            .copy_from_slice(&((8 + bytes.len()) as u16).to_be_bytes());
        // Next header, reserved, offset (8-byte units, << 3) | M, identification.
        out.extend_from_slice(&[17, 0]);
        out.extend_from_slice(&(offset as u16 | u16::from(more)).to_be_bytes());
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(bytes);
        out
    };
    [
        piece(&datagram[..first_len], 0, true),
        piece(&datagram[first_len..], first_len, false),
    ]
}

/// Put IPv6 fragments (as they came out, in order) back together into one
/// frame without the Fragment header, for checking the datagram's checksum.
fn reassemble6(fragments: &[&[u8]]) -> Vec<u8> {
    let first = fragments[0];
    let mut out = first[..V6_L4].to_vec();
    out[V6_NEXT] = first[V6_L4];
    for frag in fragments {
        assert_eq!(
            frag[V6_NEXT], NEXT_FRAGMENT,
            "every fragment keeps its Fragment header"
        );
        assert_eq!(
            frag[V6_SRC..V6_L4],
            first[V6_SRC..V6_L4],
            "every fragment of the datagram must carry the same addresses"
        );
        assert_eq!(
            frag[V6_L4 + 4..V6_L4 + 8],
            first[V6_L4 + 4..V6_L4 + 8],
            "every fragment keeps the datagram's identification"
        );
        let offset = usize::from(u16::from_be_bytes([frag[V6_L4 + 2], frag[V6_L4 + 3]]) & 0xfff8);
        assert_eq!(offset, out.len() - V6_L4, "fragments must be contiguous");
        out.extend_from_slice(&frag[V6_L4 + 8..]);
    }
    let len = (out.len() - V6_L4) as u16;
    out[V6_PAYLOAD_LEN..V6_PAYLOAD_LEN + 2].copy_from_slice(&len.to_be_bytes());
    out
}

/// `frame` (Ethernet/IPv6) with an 8-byte hop-by-hop options header (one
/// PadN option) inserted before its upper-layer header. The upper-layer
/// checksum stays valid: its pseudo-header does not cover extension headers.
fn with_hop_by_hop(frame: &[u8]) -> Vec<u8> {
    let mut out = frame[..V6_L4].to_vec();
    let next = out[V6_NEXT];
    out[V6_NEXT] = 0;
    let len = u16::from_be_bytes([out[V6_PAYLOAD_LEN], out[V6_PAYLOAD_LEN + 1]]) + 8;
    out[V6_PAYLOAD_LEN..V6_PAYLOAD_LEN + 2].copy_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    out.extend_from_slice(&frame[V6_L4..]);
    out
}

// ---- IPv6 flows --------------------------------------------------------

#[test]
fn snat6_udp_pool_range_address_stable_per_source_reply_restored() {
    let mut dp = Dp::new(POLICY);
    let server = sa6(SERVER6_A, 53);
    let a = sa6(CLIENT6, 5000);
    let out = out_ok(&mut dp, &packet::udp6(a, server, b"query-a"));
    let nat_a = *packet::checked6(&out).src.ip();
    assert!(
        pool6().contains(&nat_a),
        "the source must be an address of the pool's range, got {nat_a}"
    );
    assert_eq!(
        out,
        packet::udp6(sa6(nat_a, 5000), server, b"query-a"),
        "only the source address changes (free port kept), UDP checksum valid"
    );

    // The same source keeps its address on another flow.
    let out = out_ok(&mut dp, &packet::udp6(sa6(CLIENT6, 5001), server, b"x"));
    assert_eq!(
        out,
        packet::udp6(sa6(nat_a, 5001), server, b"x"),
        "the same source must keep one address of the range"
    );

    // Another source is given its own address.
    let b = sa6(CLIENT6_B, 5000);
    let out = out_ok(&mut dp, &packet::udp6(b, server, b"query-b"));
    let nat_b = *packet::checked6(&out).src.ip();
    assert!(pool6().contains(&nat_b), "inside the range: {nat_b}");
    assert_ne!(nat_a, nat_b, "another source must get another address");
    assert_eq!(out, packet::udp6(sa6(nat_b, 5000), server, b"query-b"));

    // Replies go back to each client.
    let back = in_ok(
        &mut dp,
        &packet::udp6(server, sa6(nat_a, 5000), b"answer-a"),
    );
    assert_eq!(
        back,
        packet::udp6(server, a, b"answer-a"),
        "the reply's destination must be the first client again, checksum valid"
    );
    let back = in_ok(
        &mut dp,
        &packet::udp6(server, sa6(nat_b, 5000), b"answer-b"),
    );
    assert_eq!(
        back,
        packet::udp6(server, b, b"answer-b"),
        "the reply's destination must be the second client again"
    );
    assert_eq!(dp.counter(Counter::FlowsTranslated), 3);
    assert_eq!(dp.counter(Counter::IngressTranslated), 2);
}

#[test]
fn snat6_icmpv6_echo_pool_range_address_reply_restored() {
    let mut dp = Dp::new(POLICY);
    let out = out_ok(
        &mut dp,
        &packet::udp6(sa6(CLIENT6, 5000), sa6(SERVER6_A, 53), b""),
    );
    let nat = *packet::checked6(&out).src.ip();

    let out = out_ok(
        &mut dp,
        &packet::echo6(CLIENT6, SERVER6_A, true, 0x7777, b"ping"),
    );
    let got = packet::checked6(&out);
    assert_eq!(
        *got.src.ip(),
        nat,
        "echo leaves from the source's one address of the range"
    );
    assert_eq!(
        out,
        packet::echo6(nat, SERVER6_A, true, 0x7777, b"ping"),
        "only the source address changes (free identifier kept), ICMPv6 checksum valid"
    );
    let back = in_ok(
        &mut dp,
        &packet::echo6(SERVER6_A, nat, false, 0x7777, b"ping"),
    );
    assert_eq!(
        back,
        packet::echo6(SERVER6_A, CLIENT6, false, 0x7777, b"ping"),
        "the echo reply must go back to the client with a valid checksum"
    );
    assert_eq!(dp.counter(Counter::IngressTranslated), 1);
}

#[test]
fn snat6_pool_without_ipv6_flows_dropped_no_egress() {
    let policy = r#"{
        "egress_pools": { "v4only": { "ipv4": ["203.0.113.10"] } },
        "default_egress": { "ipv4": "203.0.113.1", "ipv6": "2001:db8:ff::1" },
        "policies": [
            { "name": "partner", "selector": { "dst": ["192.0.2.0/24", "2001:db8:2::/48"] },
              "action": { "egress": "v4only" } }
        ]
    }"#;
    let mut dp = Dp::new(policy);
    let input = packet::udp6(sa6(CLIENT6, 5000), sa6(SERVER6_A, 53), b"q");
    let (verdict, _) = dp.egress(&input);
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "an IPv6 flow of a pool without IPv6 must not leave with the client's address"
    );
    assert_eq!(dp.counter(Counter::DropNoEgress), 1);
    let (verdict, _) = dp.egress(&packet::echo6(CLIENT6, SERVER6_A, true, 1, b""));
    assert_eq!(verdict, TC_ACT_SHOT, "ICMPv6 echo likewise");
    let (verdict, _) = dp.egress(&input);
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "a retry is dropped too: nothing was recorded"
    );
    assert_eq!(dp.counter(Counter::DropNoEgress), 3);
    assert_eq!(dp.counter(Counter::FlowsTranslated), 0);
    assert_eq!(
        ipv6_flows(&mut dp),
        0,
        "a dropped IPv6 flow must leave no connection-table entry"
    );

    // The pool itself works for IPv4.
    let out = out_ok(
        &mut dp,
        &packet::udp(sa(CLIENT, 5000), sa(SERVER_PARTNER, 53), b"q"),
    );
    assert_eq!(
        out,
        packet::udp(sa(DEDICATED_PRIMARY, 5000), sa(SERVER_PARTNER, 53), b"q"),
        "IPv4 flows of the same policy leave from the pool's IPv4 address"
    );
}

#[test]
fn snat6_default_egress_without_ipv6_flows_dropped_no_egress() {
    let policy = r#"{
        "egress_pools": { "p": { "ipv4": ["203.0.113.10"] } },
        "default_egress": { "ipv4": "203.0.113.1" },
        "policies": [
            { "name": "partner", "selector": { "dst": ["192.0.2.0/24"] }, "action": { "egress": "p" } },
            { "name": "v6 default", "selector": { "dst": ["2001:db8:3::/48"] },
              "action": { "egress": "default" } }
        ]
    }"#;
    let mut dp = Dp::new(policy);
    let (verdict, _) = dp.egress(&packet::udp6(sa6(CLIENT6, 5000), sa6(SERVER6_B, 53), b"q"));
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "a policy sending IPv6 to a default egress without IPv6 must drop"
    );
    assert_eq!(dp.counter(Counter::DropNoEgress), 1);
    let (verdict, _) = dp.egress(&packet::tcp6(
        sa6(CLIENT6, 5001),
        sa6("2001:db8:9::1".parse().unwrap(), 443),
        true,
        b"",
    ));
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "an IPv6 flow no policy matches (implicit default) must drop too"
    );
    assert_eq!(dp.counter(Counter::DropNoEgress), 2);
    let out = out_ok(
        &mut dp,
        &packet::udp(sa(CLIENT, 5000), sa(SERVER_PUBLIC, 53), b"q"),
    );
    assert_eq!(
        out,
        packet::udp(sa(GW_UPLINK, 5000), sa(SERVER_PUBLIC, 53), b"q"),
        "IPv4 still leaves from the default egress"
    );
}

#[test]
fn frag6_first_and_later_fragment_translated_consistently() {
    let mut dp = Dp::new(POLICY);
    let client = sa6(CLIENT6, 7001);
    let server = sa6(SERVER6_A, 8080);
    let payload: Vec<u8> = (0..200u8).collect();
    let [first, later] = udp6_fragments(client, server, 0xdead_beef, &payload, 96);
    let out1 = out_ok(&mut dp, &first);
    let out2 = out_ok(&mut dp, &later);
    let whole = reassemble6(&[&out1, &out2]);
    let got = packet::checked6(&whole);
    let nat = *got.src.ip();
    assert!(
        pool6().contains(&nat),
        "the datagram leaves from the pool's range, its UDP checksum valid: {got:?}"
    );
    assert_eq!(got.src.port(), 7001, "the free port is kept");
    assert_eq!(&whole[V6_L4 + 8..], payload.as_slice(), "payload intact");
    let expected = udp6_fragments(sa6(nat, 7001), server, 0xdead_beef, &payload, 96);
    assert_eq!(
        out1, expected[0],
        "the first fragment is the translated datagram's first fragment, byte for byte"
    );
    assert_eq!(
        out2, expected[1],
        "the later fragment takes the first one's source address, nothing else changes"
    );
    assert_eq!(dp.counter(Counter::FragmentsTranslated), 1);

    // The reply comes back fragmented too.
    let [r1, r2] = udp6_fragments(server, sa6(nat, 7001), 0x0bad_cafe, &payload, 64);
    let back1 = in_ok(&mut dp, &r1);
    let back2 = in_ok(&mut dp, &r2);
    let whole = reassemble6(&[&back1, &back2]);
    assert_eq!(
        packet::checked6(&whole).dst,
        client,
        "the reassembled reply reaches the client with a valid UDP checksum"
    );
    let expected = udp6_fragments(server, client, 0x0bad_cafe, &payload, 64);
    assert_eq!([back1, back2], expected, "reply fragments byte for byte");
    assert_eq!(dp.counter(Counter::FragmentsTranslated), 2);
}

#[test]
fn snat6_hop_by_hop_header_translating_dropped_bypass_identical() {
    let mut dp = Dp::new(POLICY);
    let input = with_hop_by_hop(&packet::udp6(sa6(CLIENT6, 5000), sa6(SERVER6_A, 53), b"q"));
    assert_eq!(
        packet::checked6(&input).src,
        sa6(CLIENT6, 5000),
        "the crafted packet must be valid (UDP checksum behind the hop-by-hop header)"
    );
    let (verdict, _) = dp.egress(&input);
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "an extension header under a translating policy must not leak the client address"
    );
    assert_eq!(dp.counter(Counter::DropUnsupported), 1);

    let input = with_hop_by_hop(&packet::udp6(sa6(CLIENT6, 5000), sa6(SERVER6_B, 53), b"q"));
    let out = out_ok(&mut dp, &input);
    assert_eq!(out, input, "under a bypass policy it passes byte-identical");
    assert_eq!(dp.counter(Counter::FlowsBypassed), 1);
    assert_eq!(dp.counter(Counter::DropUnsupported), 1);
}

// ---- ICMP errors about translated flows (ingress) ----------------------

/// A UDP flow of the partner policy: (as the client sent it, as it left).
fn udp_flow(dp: &mut Dp) -> (Vec<u8>, Vec<u8>) {
    let original = packet::udp(sa(CLIENT, 7000), sa(SERVER_PARTNER, 8080), b"datagram");
    let out = out_ok(dp, &original);
    assert_eq!(
        out,
        packet::udp(
            sa(DEDICATED_PRIMARY, 7000),
            sa(SERVER_PARTNER, 8080),
            b"datagram"
        ),
        "the UDP flow leaves from the pool address keeping its port"
    );
    (original, out)
}

/// A TCP flow whose source port another client already holds towards the
/// same server: (as the second client sent it, as it left).
fn tcp_collided_flow(dp: &mut Dp) -> (Vec<u8>, Vec<u8>) {
    let server = sa(SERVER_PARTNER, 443);
    let first = out_ok(dp, &packet::tcp(sa(CLIENT, 50000), server, true, b""));
    assert_eq!(packet::checked(&first).src, sa(DEDICATED_PRIMARY, 50000));
    let original = packet::tcp(sa(CLIENT_B, 50000), server, true, b"");
    let out = out_ok(dp, &original);
    let port = packet::checked(&out).src.port();
    assert_ne!(port, 50000, "the second client's port must be changed");
    assert_eq!(
        out,
        packet::tcp(sa(DEDICATED_PRIMARY, port), server, true, b""),
        "the second flow leaves from the pool address with another port"
    );
    (original, out)
}

/// An ICMP echo flow whose identifier another client already holds towards
/// the same server: (as the second client sent it, as it left).
fn echo_collided_flow(dp: &mut Dp) -> (Vec<u8>, Vec<u8>) {
    out_ok(
        dp,
        &packet::echo(CLIENT, SERVER_PARTNER, true, 0x4242, b"ping"),
    );
    let original = packet::echo(CLIENT_B, SERVER_PARTNER, true, 0x4242, b"ping");
    let out = out_ok(dp, &original);
    let id = packet::checked(&out).src.port();
    assert_ne!(id, 0x4242, "the second client's identifier must be changed");
    assert_eq!(
        out,
        packet::echo(DEDICATED_PRIMARY, SERVER_PARTNER, true, id, b"ping"),
        "the second echo leaves from the pool address with another identifier"
    );
    (original, out)
}

/// An ICMP error of either family, sent by that family's router.
#[derive(Clone)]
enum ErrorKind {
    V4(Icmpv4Type),
    V6(Icmpv6Type),
}

impl From<Icmpv4Type> for ErrorKind {
    fn from(kind: Icmpv4Type) -> Self {
        Self::V4(kind)
    }
}

impl From<Icmpv6Type> for ErrorKind {
    fn from(kind: Icmpv6Type) -> Self {
        Self::V6(kind)
    }
}

impl ErrorKind {
    fn router(&self) -> IpAddr {
        match self {
            Self::V4(_) => INET_ROUTER.into(),
            Self::V6(_) => ROUTER6.into(),
        }
    }

    /// The error from the router to `to`, quoting `quoted` (an IP packet).
    fn frame(&self, to: IpAddr, quoted: &[u8]) -> Vec<u8> {
        match (self, to) {
            (Self::V4(kind), IpAddr::V4(to)) => {
                packet::icmp4_error(INET_ROUTER, to, kind.clone(), quoted)
            }
            (Self::V6(kind), IpAddr::V6(to)) => packet::icmp6_error(ROUTER6, to, *kind, quoted),
            _ => panic!("an error to {to} is of the other family"),
        }
    }
}

/// Source and destination of a frame of either family, every checksum
/// verified.
fn addressing(frame: &[u8]) -> (SocketAddr, SocketAddr) {
    if frame[12..14] == [0x86, 0xdd] {
        let summary = packet::checked6(frame);
        (summary.src.into(), summary.dst.into())
    } else {
        let summary = packet::checked(frame);
        (summary.src.into(), summary.dst.into())
    }
}

/// A router's ICMP error (either family) about `translated` (quoting its
/// first `quote` bytes of IP) must reach the client as if the router had
/// sent it the error about `original` directly: outer destination the
/// client, quoted source the client's address and port, the rest (quoted
/// destination, MTU) unchanged, every checksum valid. Returns the error as
/// it reached the client.
fn assert_error_restored(
    dp: &mut Dp,
    kind: impl Into<ErrorKind>,
    original: &[u8],
    translated: &[u8],
    quote: usize,
) -> Vec<u8> {
    let kind = kind.into();
    let ((client, server), (egress, _)) = (addressing(original), addressing(translated));
    let input = kind.frame(egress.ip(), &packet::ip_of(translated)[..quote]);
    let before = dp.counter(Counter::IcmpErrorsTranslated);
    let out = in_ok(dp, &input);
    let got = packet::checked_error(&out);
    assert_eq!(got.outer_src, kind.router(), "outer source unchanged");
    assert_eq!(
        got.outer_dst,
        client.ip(),
        "the error must be addressed to the client"
    );
    assert_eq!(
        got.inner_src, client,
        "the quoted source must be the client's address and original port"
    );
    assert_eq!(
        got.inner_dst, server,
        "the quoted destination must not change"
    );
    assert_eq!(
        out,
        kind.frame(client.ip(), &packet::ip_of(original)[..quote]),
        "byte for byte the error the client would get without the gateway (quoted checksums included)"
    );
    assert_eq!(
        dp.counter(Counter::IcmpErrorsTranslated),
        before + 1,
        "the translated error is counted"
    );
    out
}

/// The next-hop MTU field of an ICMPv4 fragmentation-needed message.
fn mtu_of(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[14 + 20 + 6], frame[14 + 20 + 7]])
}

/// Fragmentation-needed (several MTUs) and time-exceeded errors about the
/// flow `flow` sets up, quoting the whole packet and the RFC 792 minimum
/// (IP header and 8 bytes: ports and TCP sequence number, or the echo
/// identifier), each restored for the client with its MTU unchanged.
fn assert_icmp4_errors_restored(flow: fn(&mut Dp) -> (Vec<u8>, Vec<u8>)) {
    let mut dp = Dp::new(POLICY);
    let (original, translated) = flow(&mut dp);
    let full = packet::ip_of(&original).len();
    for kind in [
        frag_needed(576),
        frag_needed(1280),
        frag_needed(1400),
        ttl_exceeded(),
    ] {
        for quote in [full, 28] {
            let out = assert_error_restored(&mut dp, kind.clone(), &original, &translated, quote);
            if let Icmpv4Type::DestinationUnreachable(
                icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu },
            ) = kind
            {
                assert_eq!(
                    mtu_of(&out),
                    next_hop_mtu,
                    "the next-hop MTU must not change"
                );
            }
        }
    }
    assert_eq!(dp.counter(Counter::IcmpErrorsTranslated), 8);
}

#[test]
fn icmp_error_about_udp_flow_rewritten_to_client() {
    assert_icmp4_errors_restored(udp_flow);
}

#[test]
fn icmp_error_about_tcp_collided_port_rewritten_to_client() {
    assert_icmp4_errors_restored(tcp_collided_flow);
}

#[test]
fn icmp_error_about_echo_collided_id_rewritten_to_client() {
    assert_icmp4_errors_restored(echo_collided_flow);
}

#[test]
fn icmp6_error_packet_too_big_udp_flow_rewritten_to_client() {
    let mut dp = Dp::new(POLICY);
    let original = packet::udp6(sa6(CLIENT6, 7000), sa6(SERVER6_A, 8080), b"datagram");
    let translated = out_ok(&mut dp, &original);
    let full = packet::ip_of(&original).len();
    assert_error_restored(
        &mut dp,
        Icmpv6Type::PacketTooBig { mtu: 1280 },
        &original,
        &translated,
        full,
    );
    // Quoting only the fixed header and the UDP header's first 8 bytes.
    assert_error_restored(
        &mut dp,
        Icmpv6Type::PacketTooBig { mtu: 1400 },
        &original,
        &translated,
        48,
    );
}

#[test]
fn icmp6_error_time_exceeded_tcp_and_echo_flows_rewritten_to_client() {
    let mut dp = Dp::new(POLICY);
    let tcp = packet::tcp6(sa6(CLIENT6, 40000), sa6(SERVER6_A, 443), true, b"");
    let tcp_out = out_ok(&mut dp, &tcp);
    let full = packet::ip_of(&tcp).len();
    assert_error_restored(&mut dp, hop_limit_exceeded(), &tcp, &tcp_out, full);

    let echo = packet::echo6(CLIENT6, SERVER6_A, true, 0x5151, b"trace");
    let echo_out = out_ok(&mut dp, &echo);
    let full = packet::ip_of(&echo).len();
    assert_error_restored(&mut dp, hop_limit_exceeded(), &echo, &echo_out, full);
}

#[test]
fn icmp_error_about_untranslated_packet_passes_byte_identical() {
    let mut dp = Dp::new(POLICY);
    let (_, _) = udp_flow(&mut dp);
    // Same addresses, a port no flow holds.
    let stranger = packet::udp(sa(DEDICATED_PRIMARY, 7001), sa(SERVER_PARTNER, 8080), b"x");
    let input = packet::icmp4_error(
        INET_ROUTER,
        DEDICATED_PRIMARY,
        frag_needed(1400),
        packet::ip_of(&stranger),
    );
    let (verdict, out) = dp.ingress(&input);
    assert_eq!(
        verdict, TC_ACT_OK,
        "an error about nothing we translated passes"
    );
    assert_eq!(out, input, "and is not changed");

    let stranger6 = packet::udp6(sa6(GW_UPLINK6, 7001), sa6(SERVER6_A, 8080), b"x");
    let input6 = packet::icmp6_error(
        ROUTER6,
        GW_UPLINK6,
        Icmpv6Type::PacketTooBig { mtu: 1280 },
        packet::ip_of(&stranger6),
    );
    let (verdict, out) = dp.ingress(&input6);
    assert_eq!(verdict, TC_ACT_OK, "likewise for ICMPv6");
    assert_eq!(out, input6, "and is not changed");
    assert_eq!(dp.counter(Counter::IngressNotOurs), 2);
    assert_eq!(dp.counter(Counter::IcmpErrorsTranslated), 0);
}

// ---- ICMP errors from clients (egress) ---------------------------------

#[test]
fn icmp_error_egress_port_unreachable_rewritten_to_egress_address() {
    let mut dp = Dp::new(POLICY);
    let server = sa(SERVER_PARTNER, 53);
    out_ok(&mut dp, &packet::udp(sa(CLIENT, 5353), server, b"q"));
    let out = out_ok(&mut dp, &packet::udp(sa(CLIENT_B, 5353), server, b"q"));
    let nat = packet::checked(&out).src;
    assert_eq!(*nat.ip(), DEDICATED_PRIMARY);
    assert_ne!(nat.port(), 5353, "the second client's port was changed");

    let reply = packet::udp(server, nat, b"answer");
    let seen = in_ok(&mut dp, &reply);
    assert_eq!(
        seen,
        packet::udp(server, sa(CLIENT_B, 5353), b"answer"),
        "the reply reaches the second client"
    );
    // The client's socket is gone: it reports the reply as it saw it.
    let error = packet::icmp4_error(
        CLIENT_B,
        SERVER_PARTNER,
        port_unreachable(),
        packet::ip_of(&seen),
    );
    let out = out_ok(&mut dp, &error);
    let got = packet::checked_error(&out);
    assert_eq!(
        got.outer_src,
        IpAddr::V4(DEDICATED_PRIMARY),
        "the error must leave from the flow's egress address"
    );
    assert_eq!(got.outer_dst, IpAddr::V4(SERVER_PARTNER));
    assert_eq!(
        got.inner_dst,
        SocketAddr::V4(nat),
        "the quoted destination must be the egress address and translated port"
    );
    assert_eq!(
        got.inner_src,
        SocketAddr::V4(server),
        "the quoted source unchanged"
    );
    assert_eq!(
        out,
        packet::icmp4_error(
            DEDICATED_PRIMARY,
            SERVER_PARTNER,
            port_unreachable(),
            packet::ip_of(&reply)
        ),
        "byte for byte an error about the reply as the server sent it"
    );
    assert_eq!(dp.counter(Counter::IcmpErrorsTranslated), 1);

    // IPv6 likewise.
    let server6 = sa6(SERVER6_A, 53);
    let out = out_ok(&mut dp, &packet::udp6(sa6(CLIENT6, 5353), server6, b"q"));
    let nat6 = packet::checked6(&out).src;
    let reply6 = packet::udp6(server6, nat6, b"answer");
    let seen6 = in_ok(&mut dp, &reply6);
    let unreachable6 = Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port);
    let error6 = packet::icmp6_error(CLIENT6, SERVER6_A, unreachable6, packet::ip_of(&seen6));
    let out = out_ok(&mut dp, &error6);
    let got = packet::checked_error(&out);
    assert_eq!(
        got.outer_src,
        IpAddr::V6(*nat6.ip()),
        "IPv6: from the egress address"
    );
    assert_eq!(
        got.inner_dst,
        SocketAddr::V6(nat6),
        "IPv6: quoting the translated tuple"
    );
    assert_eq!(
        out,
        packet::icmp6_error(*nat6.ip(), SERVER6_A, unreachable6, packet::ip_of(&reply6)),
        "IPv6: byte for byte an error about the reply as the server sent it"
    );
    assert_eq!(dp.counter(Counter::IcmpErrorsTranslated), 2);
}

#[test]
fn icmp_error_egress_untracked_from_client_dropped_unsupported() {
    let mut dp = Dp::new(POLICY);
    let unknown = packet::udp(sa(SERVER_PUBLIC, 53), sa(CLIENT, 9999), b"?");
    let error = packet::icmp4_error(
        CLIENT,
        SERVER_PUBLIC,
        port_unreachable(),
        packet::ip_of(&unknown),
    );
    let (verdict, _) = dp.egress(&error);
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "a client's error about nothing we track would leak its address: dropped"
    );
    assert_eq!(dp.counter(Counter::DropUnsupported), 1);

    let unknown6 = packet::udp6(sa6(SERVER6_A, 53), sa6(CLIENT6, 9999), b"?");
    let error6 = packet::icmp6_error(
        CLIENT6,
        SERVER6_A,
        Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port),
        packet::ip_of(&unknown6),
    );
    let (verdict, _) = dp.egress(&error6);
    assert_eq!(verdict, TC_ACT_SHOT, "likewise for ICMPv6");
    assert_eq!(dp.counter(Counter::DropUnsupported), 2);
    assert_eq!(dp.counter(Counter::IcmpErrorsTranslated), 0);
}

// ---- Port allocation ---------------------------------------------------

const NARROW_RANGE: &str = r#"{
    "egress_pools": { "p": { "ipv4": ["203.0.113.10"] } },
    "default_egress": { "ipv4": "203.0.113.1" },
    "nat": { "port_range": "40000-40003" },
    "policies": [ { "name": "all", "selector": {}, "action": { "egress": "p" } } ]
}"#;

fn lan_client(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 10, 1, i)
}

/// Fill the range: one flow keeping its port 5000 and four more taking
/// 40000-40003, all from port 5000 towards SERVER_PUBLIC:443. Returns each
/// client with its translated port.
///
/// Ports are searched at random (32 tries); the last free one of four is
/// missed with probability (3/4)^31, about 1e-4.
fn fill_range(dp: &mut Dp) -> Vec<(Ipv4Addr, u16)> {
    let server = sa(SERVER_PUBLIC, 443);
    let mut mappings = Vec::new();
    for i in 1..=5 {
        let client = sa(lan_client(i), 5000);
        let out = out_ok(dp, &packet::tcp(client, server, true, b""));
        let port = packet::checked(&out).src.port();
        assert_eq!(
            out,
            packet::tcp(sa(DEDICATED_PRIMARY, port), server, true, b""),
            "client {i} leaves from the pool address"
        );
        mappings.push((*client.ip(), port));
    }
    mappings
}

#[test]
fn port_range_collisions_distinct_ports_exhausted_dropped_no_eviction() {
    let mut dp = Dp::new(NARROW_RANGE);
    let server = sa(SERVER_PUBLIC, 443);
    let mappings = fill_range(&mut dp);
    assert_eq!(mappings[0].1, 5000, "the first flow keeps its own port");
    let others: BTreeSet<u16> = mappings[1..].iter().map(|m| m.1).collect();
    assert_eq!(
        others,
        (40000..=40003).collect(),
        "the next flows get distinct ports, every one inside the range"
    );

    // The range is used up: a new flow has nowhere to go.
    let late = sa(lan_client(6), 5000);
    let (verdict, _) = dp.egress(&packet::tcp(late, server, true, b""));
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "with every port taken the new flow must be dropped"
    );
    assert_ne!(
        dp.counter(Counter::DropPortExhausted),
        0,
        "and counted as exhausted"
    );
    assert_eq!(
        addr_stats(&dp, "203.0.113.10").exhausted,
        1,
        "the egress address counts the exhausted flow"
    );

    // Nothing was evicted: every mapping still leaves and returns as before.
    for (client, port) in &mappings {
        let out = out_ok(
            &mut dp,
            &packet::tcp(sa(*client, 5000), server, false, b"more"),
        );
        assert_eq!(
            out,
            packet::tcp(sa(DEDICATED_PRIMARY, *port), server, false, b"more"),
            "{client} keeps its mapping"
        );
        let back = in_ok(
            &mut dp,
            &packet::tcp(server, sa(DEDICATED_PRIMARY, *port), false, b"r"),
        );
        assert_eq!(
            back,
            packet::tcp(server, sa(*client, 5000), false, b"r"),
            "replies to port {port} reach {client}"
        );
    }

    // Mappings are endpoint-dependent: another destination has every port.
    let other = sa(Ipv4Addr::new(198, 51, 100, 11), 443);
    let out = out_ok(&mut dp, &packet::tcp(late, other, true, b""));
    assert_eq!(
        out,
        packet::tcp(sa(DEDICATED_PRIMARY, 5000), other, true, b""),
        "towards another destination the late client keeps its port"
    );
    let out = out_ok(
        &mut dp,
        &packet::tcp(sa(lan_client(7), 5000), other, true, b""),
    );
    let port = packet::checked(&out).src.port();
    assert!(
        (40000..=40003).contains(&port),
        "and the range is free again there: got {port}"
    );
    let back = in_ok(
        &mut dp,
        &packet::tcp(other, sa(DEDICATED_PRIMARY, 5000), false, b""),
    );
    assert_eq!(
        packet::checked(&back).dst,
        late,
        "replies from the other destination reach the late client"
    );
}

#[test]
fn port_range_exhausted_drop_counted_once_per_packet() {
    let mut dp = Dp::new(NARROW_RANGE);
    fill_range(&mut dp);
    let late = packet::tcp(sa(lan_client(6), 5000), sa(SERVER_PUBLIC, 443), true, b"");
    let (verdict, _) = dp.egress(&late);
    assert_eq!(verdict, TC_ACT_SHOT, "the range is used up");
    assert_eq!(
        dp.counter(Counter::DropPortExhausted),
        1,
        "one dropped packet must count one drop_port_exhausted"
    );
    let (verdict, _) = dp.egress(&late);
    assert_eq!(verdict, TC_ACT_SHOT, "a retry is dropped too");
    assert_eq!(
        dp.counter(Counter::DropPortExhausted),
        2,
        "two drops, two counts"
    );
    assert_eq!(addr_stats(&dp, "203.0.113.10").exhausted, 2);
}

// ---- Pools -------------------------------------------------------------

/// Sources of `n` new TCP flows from CLIENT (ports from `first_port`) to
/// SERVER_PUBLIC:443, each checked byte for byte.
fn sources_of_new_flows(dp: &mut Dp, first_port: u16, n: u16) -> Vec<Ipv4Addr> {
    let server = sa(SERVER_PUBLIC, 443);
    (first_port..first_port + n)
        .map(|port| {
            let out = out_ok(dp, &packet::tcp(sa(CLIENT, port), server, true, b""));
            let src = *packet::checked(&out).src.ip();
            assert_eq!(out, packet::tcp(sa(src, port), server, true, b""));
            src
        })
        .collect()
}

#[test]
fn pool_spread_uses_every_address_never_a_down_one() {
    let policy = r#"{
        "egress_pools": { "s": { "ipv4": ["203.0.113.10", "203.0.113.11", "203.0.113.12"], "mode": "spread" } },
        "default_egress": { "ipv4": "203.0.113.1" },
        "policies": [ { "name": "all", "selector": {}, "action": { "egress": "s" } } ]
    }"#;
    let mut dp = Dp::new(policy);
    let all: BTreeSet<Ipv4Addr> = [DEDICATED_PRIMARY, DEDICATED_SECONDARY, DEDICATED_THIRD].into();
    let used: BTreeSet<Ipv4Addr> = sources_of_new_flows(&mut dp, 20000, 60)
        .into_iter()
        .collect();
    assert_eq!(used, all, "spread mode must use every address of the pool");

    dp.tables_mut().set_down(&[DEDICATED_SECONDARY]).unwrap();
    let used: BTreeSet<Ipv4Addr> = sources_of_new_flows(&mut dp, 30000, 60)
        .into_iter()
        .collect();
    assert_eq!(
        used,
        [DEDICATED_PRIMARY, DEDICATED_THIRD].into(),
        "new flows must spread over the usable addresses, never the down one"
    );

    dp.tables_mut().set_down(&[]).unwrap();
    let used: BTreeSet<Ipv4Addr> = sources_of_new_flows(&mut dp, 40000, 60)
        .into_iter()
        .collect();
    assert_eq!(used, all, "an address back up takes new flows again");
}

#[test]
fn pool_failover_new_flows_follow_health_established_keep_address() {
    let policy = r#"{
        "egress_pools": { "f": { "ipv4": ["203.0.113.10", "203.0.113.11"], "mode": "failover" } },
        "default_egress": { "ipv4": "203.0.113.1" },
        "policies": [ { "name": "all", "selector": {}, "action": { "egress": "f" } } ]
    }"#;
    let mut dp = Dp::new(policy);
    let server = sa(SERVER_PUBLIC, 443);
    let src_of = |dp: &mut Dp, port: u16, syn: bool| {
        let out = out_ok(dp, &packet::tcp(sa(CLIENT, port), server, syn, b""));
        *packet::checked(&out).src.ip()
    };
    assert_eq!(
        sources_of_new_flows(&mut dp, 1000, 8),
        [DEDICATED_PRIMARY; 8],
        "every new flow takes the primary while it is up"
    );

    dp.tables_mut().set_down(&[DEDICATED_PRIMARY]).unwrap();
    assert_eq!(
        sources_of_new_flows(&mut dp, 2000, 8),
        [DEDICATED_SECONDARY; 8],
        "with the primary down, new flows take the secondary"
    );
    // The dataplane never moves an established flow (the agent ends flows
    // on a down address separately, through the connection table).
    assert_eq!(
        src_of(&mut dp, 1000, false),
        DEDICATED_PRIMARY,
        "a flow established on the primary keeps it"
    );

    // A reload while the primary is down keeps it out of use.
    dp.apply(policy);
    assert_eq!(
        sources_of_new_flows(&mut dp, 2500, 8),
        [DEDICATED_SECONDARY; 8],
        "after a reload the down primary still takes no new flows"
    );

    dp.tables_mut().set_down(&[]).unwrap();
    assert_eq!(
        sources_of_new_flows(&mut dp, 3000, 8),
        [DEDICATED_PRIMARY; 8],
        "with the primary up again, new flows go back to it"
    );
    assert_eq!(
        src_of(&mut dp, 2000, false),
        DEDICATED_SECONDARY,
        "a flow established on the secondary keeps it after the failback"
    );
    let back = in_ok(
        &mut dp,
        &packet::tcp(server, sa(DEDICATED_SECONDARY, 2000), false, b""),
    );
    assert_eq!(
        back,
        packet::tcp(server, sa(CLIENT, 2000), false, b""),
        "and its replies still reach the client"
    );
}

#[test]
fn pool_when_down_drop_all_down_new_flows_dropped_no_egress() {
    let policy = r#"{
        "egress_pools": { "d": { "ipv4": ["203.0.113.10", "203.0.113.11"], "when_down": "drop" } },
        "default_egress": { "ipv4": "203.0.113.1" },
        "policies": [ { "name": "all", "selector": {}, "action": { "egress": "d" } } ]
    }"#;
    let mut dp = Dp::new(policy);
    dp.tables_mut()
        .set_down(&[DEDICATED_PRIMARY, DEDICATED_SECONDARY])
        .unwrap();
    let input = packet::udp(sa(CLIENT, 5000), sa(SERVER_PUBLIC, 53), b"q");
    let (verdict, _) = dp.egress(&input);
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "with every address down a new flow must be dropped"
    );
    assert_eq!(dp.counter(Counter::DropNoEgress), 1);
    assert_eq!(dp.counter(Counter::FlowsTranslated), 0);

    dp.tables_mut().set_down(&[DEDICATED_SECONDARY]).unwrap();
    let out = out_ok(&mut dp, &input);
    assert_eq!(
        out,
        packet::udp(sa(DEDICATED_PRIMARY, 5000), sa(SERVER_PUBLIC, 53), b"q"),
        "once an address is up the same flow is translated (nothing stale was recorded)"
    );
}

#[test]
fn pool_when_down_default_all_down_new_flows_use_default_egress() {
    let policy = r#"{
        "egress_pools": { "d": { "ipv4": ["203.0.113.10", "203.0.113.11"], "when_down": "default" } },
        "default_egress": { "ipv4": "203.0.113.1" },
        "policies": [ { "name": "all", "selector": {}, "action": { "egress": "d" } } ]
    }"#;
    let mut dp = Dp::new(policy);
    dp.tables_mut()
        .set_down(&[DEDICATED_PRIMARY, DEDICATED_SECONDARY])
        .unwrap();
    let client = sa(CLIENT, 5000);
    let server = sa(SERVER_PUBLIC, 53);
    let out = out_ok(&mut dp, &packet::udp(client, server, b"q"));
    assert_eq!(
        out,
        packet::udp(sa(GW_UPLINK, 5000), server, b"q"),
        "with every address down new flows leave from the default egress"
    );
    let back = in_ok(&mut dp, &packet::udp(server, sa(GW_UPLINK, 5000), b"a"));
    assert_eq!(
        back,
        packet::udp(server, client, b"a"),
        "replies are restored"
    );
    assert_eq!(dp.counter(Counter::DropNoEgress), 0);
    assert_eq!(
        addr_stats(&dp, "203.0.113.1").flows,
        1,
        "the flow counts on the default egress address"
    );
    assert_eq!(addr_stats(&dp, "203.0.113.10").flows, 0);
}

// ---- Per-address counters ----------------------------------------------

#[test]
fn addr_stats_flows_packets_bytes_both_directions_exact() {
    let mut dp = Dp::new(POLICY);
    let udp_client = sa(CLIENT, 6000);
    let udp_server = sa(SERVER_PARTNER, 53);
    let udp_out = packet::udp(udp_client, udp_server, b"0123456789");
    let udp_in = packet::udp(udp_server, sa(DEDICATED_PRIMARY, 6000), b"ok!!");
    assert_eq!((ip_len(&udp_out), ip_len(&udp_in)), (38, 32));
    for _ in 0..3 {
        out_ok(&mut dp, &udp_out);
    }
    for _ in 0..2 {
        in_ok(&mut dp, &udp_in);
    }
    let tcp_server = sa(SERVER_PARTNER, 443);
    let tcp_out = packet::tcp(sa(CLIENT, 6001), tcp_server, true, b"");
    let tcp_in = packet::tcp(tcp_server, sa(DEDICATED_PRIMARY, 6001), false, b"hi");
    assert_eq!((ip_len(&tcp_out), ip_len(&tcp_in)), (40, 42));
    out_ok(&mut dp, &tcp_out);
    in_ok(&mut dp, &tcp_in);

    let v6_out = packet::udp6(sa6(CLIENT6, 6000), sa6(SERVER6_A, 53), b"abcd");
    let nat6 = packet::checked6(&out_ok(&mut dp, &v6_out)).src;
    let v6_in = packet::udp6(sa6(SERVER6_A, 53), nat6, b"ab");
    in_ok(&mut dp, &v6_in);
    assert_eq!((ip_len(&v6_out), ip_len(&v6_in)), (52, 50));

    // Not counted anywhere: a packet that is not a reply.
    in_ok(
        &mut dp,
        &packet::udp(udp_server, sa(DEDICATED_PRIMARY, 6999), b"stray"),
    );

    assert_eq!(
        addr_stats(&dp, "203.0.113.10"),
        AddrStats {
            flows: 2,
            exhausted: 0,
            traffic: Traffic {
                packets_out: 4,
                bytes_out: 3 * 38 + 40,
                packets_in: 3,
                bytes_in: 2 * 32 + 42,
            },
        },
        "the pool address counts its two flows, every packet and IP byte both ways"
    );
    assert_eq!(
        addr_stats(&dp, POOL6),
        AddrStats {
            flows: 1,
            exhausted: 0,
            traffic: Traffic {
                packets_out: 1,
                bytes_out: 52,
                packets_in: 1,
                bytes_in: 50,
            },
        },
        "the IPv6 range counts its flow"
    );
    assert_eq!(
        addr_stats(&dp, "203.0.113.1"),
        AddrStats::default(),
        "the default egress carried nothing"
    );
}

// ---- Reloads -----------------------------------------------------------

#[test]
fn reload_keeping_pool_established_flows_keep_translation() {
    let mut dp = Dp::new(POLICY);
    let server = sa(SERVER_PARTNER, 443);
    let first = sa(CLIENT, 6000);
    let second = sa(CLIENT_B, 6000);
    out_ok(&mut dp, &packet::tcp(first, server, true, b""));
    let out = out_ok(&mut dp, &packet::tcp(second, server, true, b""));
    let collided = packet::checked(&out).src.port();
    assert_ne!(collided, 6000, "the second flow was given another port");
    let server6 = sa6(SERVER6_A, 443);
    let client6 = sa6(CLIENT6, 6000);
    let nat6 = *packet::checked6(&out_ok(&mut dp, &packet::tcp6(client6, server6, true, b"")))
        .src
        .ip();

    // A new set: another pool first (pool indexes shift), a new first
    // policy, the partner policy renamed; pool "p" is kept.
    let reloaded = r#"{
        "egress_pools": {
            "q": { "ipv4": ["203.0.113.20"] },
            "p": { "ipv4": ["203.0.113.10"], "ipv6": "2001:db8:e0::/64" }
        },
        "default_egress": { "ipv4": "203.0.113.1", "ipv6": "2001:db8:ff::1" },
        "policies": [
            { "name": "partner dns", "selector": { "dst": ["192.0.2.0/24"], "protocols": ["udp"] },
              "action": { "egress": "q" } },
            { "name": "partner renamed", "selector": { "dst": ["192.0.2.0/24", "2001:db8:2::/48"] },
              "action": { "egress": "p" } },
            { "name": "rest", "selector": {}, "action": { "egress": "default" } }
        ]
    }"#;
    dp.apply(reloaded);

    for (client, port) in [(first, 6000), (second, collided)] {
        let out = out_ok(&mut dp, &packet::tcp(client, server, false, b"more"));
        assert_eq!(
            out,
            packet::tcp(sa(DEDICATED_PRIMARY, port), server, false, b"more"),
            "an established flow keeps its address and port across the reload"
        );
        let back = in_ok(
            &mut dp,
            &packet::tcp(server, sa(DEDICATED_PRIMARY, port), false, b"r"),
        );
        assert_eq!(
            back,
            packet::tcp(server, client, false, b"r"),
            "its replies still reach the client"
        );
    }
    let out = out_ok(&mut dp, &packet::tcp6(client6, server6, false, b"more"));
    assert_eq!(
        out,
        packet::tcp6(sa6(nat6, 6000), server6, false, b"more"),
        "an established IPv6 flow keeps its address across the reload"
    );
    let back = in_ok(
        &mut dp,
        &packet::tcp6(server6, sa6(nat6, 6000), false, b"r"),
    );
    assert_eq!(back, packet::tcp6(server6, client6, false, b"r"));

    // The new set is in force for new flows.
    let out = out_ok(
        &mut dp,
        &packet::udp(sa(CLIENT, 6002), sa(SERVER_PARTNER, 53), b"q"),
    );
    assert_eq!(
        *packet::checked(&out).src.ip(),
        Ipv4Addr::new(203, 0, 113, 20),
        "a new flow follows the reloaded set"
    );
    let out = out_ok(&mut dp, &packet::tcp(sa(CLIENT, 6003), server, true, b""));
    assert_eq!(
        out,
        packet::tcp(sa(DEDICATED_PRIMARY, 6003), server, true, b""),
        "new flows of the kept pool still leave from its address"
    );
    assert_eq!(dp.counter(Counter::FlowsTranslated), 5);
}

/// Entries of the IPv4 connection table.
fn ipv4_flows(dp: &mut Dp) -> usize {
    let map = dp
        .dataplane_mut()
        .ebpf_mut()
        .map(maps::CT4)
        .expect("the IPv4 connection table");
    let ct: BpfHashMap<_, egress_common::flow::Tuple4, egress_common::conntrack::CtEntry4> =
        BpfHashMap::try_from(map).unwrap();
    ct.keys().count()
}

#[test]
fn link_scoped_dhcp_mdns_link_local_pass_untouched_untracked() {
    let mut dp = Dp::new(POLICY);
    let link_local = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x10);
    let frames = [
        // DHCP discover: from the unspecified address to the broadcast.
        packet::udp(
            sa(Ipv4Addr::UNSPECIFIED, 68),
            sa(Ipv4Addr::BROADCAST, 67),
            b"discover",
        ),
        // mDNS to its multicast group.
        packet::udp(
            sa(CLIENT, 5353),
            sa(Ipv4Addr::new(224, 0, 0, 251), 5353),
            b"query",
        ),
        // A host with only a link-local address talking to a public server.
        packet::udp(
            sa(Ipv4Addr::new(169, 254, 7, 9), 4000),
            sa(SERVER_PUBLIC, 53),
            b"stray",
        ),
        // DHCPv6 solicit from a link-local address to all DHCP agents.
        packet::udp6(
            sa6(link_local, 546),
            sa6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2), 547),
            b"solicit",
        ),
        // A global client sending to a site multicast group.
        packet::udp6(
            sa6(CLIENT6, 4000),
            sa6(Ipv6Addr::new(0xff05, 0, 0, 0, 0, 0, 0, 0x1234), 4000),
            b"group",
        ),
    ];
    for frame in &frames {
        let (verdict, out) = dp.egress(frame);
        assert_eq!(verdict, TC_ACT_OK, "link-scoped traffic must pass");
        assert_eq!(&out, frame, "link-scoped traffic must leave byte-identical");
    }
    assert_eq!(
        dp.counter(Counter::PassLinkScoped),
        frames.len() as u64,
        "every link-scoped packet is counted once"
    );
    assert_eq!(dp.counter(Counter::FlowsNew), 0, "no flow may be created");
    assert_eq!(ipv4_flows(&mut dp), 0, "the IPv4 table must stay empty");
    assert_eq!(ipv6_flows(&mut dp), 0, "the IPv6 table must stay empty");

    // A global client's unicast flow is still translated.
    out_ok(
        &mut dp,
        &packet::udp(sa(CLIENT, 4000), sa(SERVER_PUBLIC, 53), b"q"),
    );
    assert_eq!(dp.counter(Counter::FlowsTranslated), 1);
}
