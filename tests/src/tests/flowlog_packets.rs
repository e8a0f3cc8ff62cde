//! BPF_PROG_TEST_RUN tests of the flow events: none while the flow log is
//! switched off; with it on, exactly one event per new translation, one end
//! per closing flow (first FIN or RST, whichever side), one failure per new
//! flow refused for want of a port, and none for flows that are not
//! translations.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use aya::maps::{Array, RingBuf};
use egress_agent::flowlog::{Event, FlowRecord, Reason, ring};
use egress_common::{
    events::{CONFIG_F_FLOWLOG, CONFIG_F_KLOG, CONFIG_FLAGS},
    flow::proto,
    maps,
    stats::Counter,
};
use etherparse::PacketBuilder;

use super::{
    nat_packets::{in_ok, out_ok},
    packet::{self, sa, sa6},
    prog_test_run::{Dp, TC_ACT_SHOT},
};
use crate::lab::{
    CLIENT, CLIENT6, DEDICATED_PRIMARY, GW_UPLINK, SERVER_PARTNER, SERVER_PUBLIC, SERVER6_A,
};

/// The partner range leaves from pool `p` (203.0.113.10, 2001:db8:e0::/64),
/// 10.99.0.0/16 is bypassed, the rest leaves from the default egress.
const POLICY: &str = r#"{
    "egress_pools": { "p": { "ipv4": ["203.0.113.10"], "ipv6": "2001:db8:e0::/64" } },
    "default_egress": { "ipv4": "203.0.113.1", "ipv6": "2001:db8:ff::1" },
    "policies": [
        { "name": "partner", "selector": { "dst": ["192.0.2.0/24", "2001:db8:2::/48"] },
          "action": { "egress": "p" } },
        { "name": "internal", "selector": { "dst": ["10.99.0.0/16"] },
          "action": { "egress": "bypass" } },
        { "name": "rest", "selector": {}, "action": { "egress": "default" } }
    ]
}"#;

/// One port in the range: the original port, then 40000, then nothing.
const ONE_PORT: &str = r#"{
    "egress_pools": { "p": { "ipv4": ["203.0.113.10"] } },
    "default_egress": { "ipv4": "203.0.113.1" },
    "nat": { "port_range": "40000-40000" },
    "policies": [ { "name": "all", "selector": {}, "action": { "egress": "p" } } ]
}"#;

const SERVER_INTERNAL: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 10);

/// Write the dataplane's switches, as the agent does.
fn switch(dp: &mut Dp, flags: u32) {
    let map = dp
        .dataplane_mut()
        .ebpf_mut()
        .map_mut(maps::CONFIG)
        .expect("the switches map");
    let mut config: Array<_, u32> = Array::try_from(map).unwrap();
    config.set(CONFIG_FLAGS, flags, 0).unwrap();
}

/// Every flow event submitted since the last call, decoded.
fn events(dp: &mut Dp) -> Vec<FlowRecord> {
    let map = dp
        .dataplane_mut()
        .ebpf_mut()
        .map_mut(maps::EVENTS)
        .expect("the flow-event ring buffer");
    let mut ring = RingBuf::try_from(map).unwrap();
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        let event = ring::decode(&item).expect("a record of FlowEvent's size");
        out.push(FlowRecord::from_event(&event).expect("a known kind, reason and family"));
    }
    out
}

/// An Ethernet/IPv4 TCP segment with FIN (and ACK) or RST set.
fn tcp_closing(src: SocketAddrV4, dst: SocketAddrV4, rst: bool) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .tcp(src.port(), dst.port(), 0x1000_0001, 64240);
    let builder = if rst {
        builder.rst()
    } else {
        builder.fin().ack(1)
    };
    let mut out = Vec::with_capacity(builder.size(0));
    builder.write(&mut out, &[]).unwrap();
    out
}

/// The counter slot the running set gave policy `name`.
fn slot_of(dp: &Dp, name: &str) -> u32 {
    dp.tables()
        .active_policies()
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no policy {name:?}"))
        .stats_slot
}

#[test]
fn flowlog_off_new_flow_and_fin_write_no_event() {
    let mut dp = Dp::new(POLICY);
    let client = sa(CLIENT, 40001);
    let server = sa(SERVER_PARTNER, 443);
    out_ok(&mut dp, &packet::tcp(client, server, true, b""));
    out_ok(&mut dp, &tcp_closing(client, server, false));
    in_ok(
        &mut dp,
        &tcp_closing(server, sa(DEDICATED_PRIMARY, 40001), false),
    );
    assert_eq!(
        events(&mut dp),
        vec![],
        "with the flow log off the dataplane must emit nothing"
    );
    assert_eq!(dp.counter(Counter::FlowLogLost), 0);
}

#[test]
fn flowlog_on_new_flow_one_event_with_tuples_and_policy_slot() {
    let mut dp = Dp::new(POLICY);
    switch(&mut dp, CONFIG_F_FLOWLOG);
    let client = sa(CLIENT, 40002);
    let server = sa(SERVER_PARTNER, 443);
    out_ok(&mut dp, &packet::tcp(client, server, true, b"hello"));
    out_ok(&mut dp, &packet::tcp(client, server, false, b"more"));
    let got = events(&mut dp);
    assert_eq!(
        got.len(),
        1,
        "one event for the new flow, none for its next packet: {got:?}"
    );
    let ev = &got[0];
    assert_eq!((ev.event, ev.reason), (Event::New, Reason::Translated));
    assert_eq!(
        (ev.src, ev.sport, ev.dst, ev.dport, ev.protocol),
        (
            IpAddr::V4(CLIENT),
            40002,
            IpAddr::V4(SERVER_PARTNER),
            443,
            proto::TCP
        ),
        "the original tuple"
    );
    assert_eq!(
        (ev.nat_addr, ev.nat_port),
        (IpAddr::V4(DEDICATED_PRIMARY), Some(40002)),
        "the translated source: the pool's address, the client's own port"
    );
    assert_eq!(
        ev.stats_slot,
        slot_of(&dp, "partner"),
        "the event names the policy by its counter slot"
    );
    assert_eq!(ev.identity, 0, "no session: no identity");
    assert_eq!(ev.traffic, None, "a new flow carries no counts");
}

#[test]
fn flowlog_on_ipv6_new_flow_event_carries_ipv6_tuples() {
    let mut dp = Dp::new(POLICY);
    switch(&mut dp, CONFIG_F_FLOWLOG);
    let client = sa6(CLIENT6, 40003);
    let server = sa6(SERVER6_A, 443);
    let out = out_ok(&mut dp, &packet::tcp6(client, server, true, b""));
    let left_as = packet::checked6(&out).src;
    let got = events(&mut dp);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].src, got[0].dst, got[0].nat_addr, got[0].nat_port),
        (
            IpAddr::V6(CLIENT6),
            IpAddr::V6(SERVER6_A),
            IpAddr::V6(*left_as.ip()),
            Some(left_as.port())
        ),
        "the event's tuples are the packet's, before and after translation"
    );
    assert_eq!(got[0].stats_slot, slot_of(&dp, "partner"));
}

#[test]
fn flowlog_on_fin_from_client_one_end_reply_fin_no_second() {
    let mut dp = Dp::new(POLICY);
    switch(&mut dp, CONFIG_F_FLOWLOG);
    let client = sa(CLIENT, 40004);
    let server = sa(SERVER_PUBLIC, 443);
    let translated = sa(GW_UPLINK, 40004);
    out_ok(&mut dp, &packet::tcp(client, server, true, b""));
    in_ok(&mut dp, &packet::tcp(server, translated, false, b"reply"));
    out_ok(&mut dp, &tcp_closing(client, server, false));
    in_ok(&mut dp, &tcp_closing(server, translated, false));
    out_ok(&mut dp, &tcp_closing(client, server, false));
    let got = events(&mut dp);
    assert_eq!(
        got.iter().map(|e| (e.event, e.reason)).collect::<Vec<_>>(),
        vec![(Event::New, Reason::Translated), (Event::End, Reason::Fin)],
        "the first FIN ends the flow once; the reply's FIN and a retransmission add nothing"
    );
    let end = &got[1];
    assert_eq!(
        (end.src, end.sport, end.nat_addr, end.nat_port),
        (
            IpAddr::V4(CLIENT),
            40004,
            IpAddr::V4(GW_UPLINK),
            Some(40004)
        )
    );
    assert_eq!(end.stats_slot, slot_of(&dp, "rest"));
    let traffic = end.traffic.expect("an end carries the flow's counts");
    assert_eq!(
        (traffic.packets_out, traffic.packets_in),
        (2, 1),
        "SYN and FIN out, one reply in, at the time of the FIN"
    );
}

#[test]
fn flowlog_on_rst_from_server_end_from_reply_side() {
    let mut dp = Dp::new(POLICY);
    switch(&mut dp, CONFIG_F_FLOWLOG);
    let client = sa(CLIENT, 40005);
    let server = sa(SERVER_PARTNER, 443);
    out_ok(&mut dp, &packet::tcp(client, server, true, b""));
    in_ok(
        &mut dp,
        &tcp_closing(server, sa(DEDICATED_PRIMARY, 40005), true),
    );
    out_ok(&mut dp, &tcp_closing(client, server, true));
    let got = events(&mut dp);
    assert_eq!(got.len(), 2, "new, then one end: {got:?}");
    let end = &got[1];
    assert_eq!((end.event, end.reason), (Event::End, Reason::Rst));
    assert_eq!(
        (end.src, end.sport, end.dst, end.dport),
        (IpAddr::V4(CLIENT), 40005, IpAddr::V4(SERVER_PARTNER), 443),
        "the reply side reports the original tuple"
    );
    assert_eq!(
        end.stats_slot,
        slot_of(&dp, "partner"),
        "and the policy, from the outgoing entry"
    );
    let traffic = end.traffic.unwrap();
    assert_eq!((traffic.packets_out, traffic.packets_in), (1, 1));
}

#[test]
fn flowlog_on_port_exhausted_failure_event() {
    let mut dp = Dp::new(ONE_PORT);
    switch(&mut dp, CONFIG_F_FLOWLOG | CONFIG_F_KLOG);
    let server = sa(SERVER_PUBLIC, 443);
    for i in 1..=2 {
        out_ok(
            &mut dp,
            &packet::udp(sa(Ipv4Addr::new(10, 10, 1, i), 5000), server, b"fits"),
        );
    }
    assert_eq!(events(&mut dp).len(), 2, "two translations");
    let late = sa(Ipv4Addr::new(10, 10, 1, 3), 5000);
    let (verdict, _) = dp.egress(&packet::udp(late, server, b"no port"));
    assert_eq!(verdict, TC_ACT_SHOT, "no port is left for a third flow");
    let got = events(&mut dp);
    assert_eq!(got.len(), 1, "one failure event: {got:?}");
    assert_eq!(
        (got[0].event, got[0].reason),
        (Event::Failed, Reason::PortExhausted)
    );
    assert_eq!(
        (got[0].src, got[0].sport, got[0].dst, got[0].dport),
        (IpAddr::V4(*late.ip()), 5000, IpAddr::V4(SERVER_PUBLIC), 443)
    );
    assert_eq!(
        (got[0].nat_addr, got[0].nat_port),
        (IpAddr::V4(DEDICATED_PRIMARY), None),
        "the address it would have left from, no port"
    );
    assert_eq!(got[0].stats_slot, slot_of(&dp, "all"));
    assert_eq!(
        dp.counter(Counter::DropPortExhausted),
        1,
        "kernel log records change no verdict and no count"
    );
}

#[test]
fn flowlog_on_bypassed_and_gateway_flows_no_event() {
    let mut dp = Dp::new(POLICY);
    switch(&mut dp, CONFIG_F_FLOWLOG);
    let internal = sa(SERVER_INTERNAL, 443);
    let client = sa(CLIENT, 40006);
    out_ok(&mut dp, &packet::tcp(client, internal, true, b""));
    out_ok(&mut dp, &tcp_closing(client, internal, false));
    let own = sa(GW_UPLINK, 40007);
    out_ok(
        &mut dp,
        &packet::tcp(own, sa(SERVER_PUBLIC, 443), true, b""),
    );
    out_ok(&mut dp, &tcp_closing(own, sa(SERVER_PUBLIC, 443), true));
    assert_eq!(
        events(&mut dp),
        vec![],
        "bypassed flows and the gateway's own are not translations: no events"
    );
}

#[test]
fn flowlog_ring_full_counts_lost_and_packets_pass() {
    let mut dp = Dp::new(POLICY);
    switch(&mut dp, CONFIG_F_FLOWLOG);
    // 1 MiB holds about 8 700 records of 120 bytes; nobody reads them.
    let flows: u16 = 10_000;
    for i in 0..flows {
        let client = sa(
            Ipv4Addr::new(10, 10, 2 + (i / 250) as u8, 1 + (i % 250) as u8),
            6000,
        );
        out_ok(&mut dp, &packet::udp(client, sa(SERVER_PUBLIC, 53), b"q"));
    }
    let lost = dp.counter(Counter::FlowLogLost);
    let got = events(&mut dp).len() as u64;
    assert!(lost > 0, "a full ring buffer loses events");
    assert_eq!(
        got + lost,
        u64::from(flows),
        "every new flow is either in the ring buffer or counted as lost"
    );
}
