//! BPF_PROG_TEST_RUN tests of leaving from the uplink a pool names: every
//! translated packet of such a pool's flows gets a redirect verdict (the
//! kernel then sends it through that uplink), unless it is already on it;
//! pools without an interface keep a plain pass.
//!
//! Each test runs in a network namespace of its own holding a veth `up1`:
//! the agent resolves the pool's interface name there, and the kernel only
//! accepts existing interfaces as the test packet's device.

use std::net::Ipv4Addr;

use aya::programs::{TestRun as _, TestRunOptions};
use egress_agent::{
    policy,
    tables::{TablesError, addr6_words},
};
use egress_common::{
    flow::{Tuple4, Tuple6, proto},
    maps,
    stats::Counter,
};
use ipnet::Ipv6Net;

use super::{
    nat_lab::policy_set,
    packet::{self, Summary, sa, sa6},
    prog_test_run::{Dp, TC_ACT_OK, require_root},
};
use crate::{
    lab::{
        CLIENT, CLIENT6, DEDICATED_PRIMARY, PROVIDER2_EGRESS, SERVER_PARTNER, SERVER_PUBLIC,
        SERVER6_A, UPLINK2,
    },
    netns::{NetNs, unique_name},
};

/// The verdict of a redirect (bpf_redirect_neigh's return value).
const TC_ACT_REDIRECT: i32 = 7;
/// Pool `far`'s IPv6 range.
const FAR6: &str = "2001:db8:e1::/64";

/// Pool `far` (the second provider's address) leaves from up1; pool `home`
/// names no interface.
fn policies(far_interface: &str) -> String {
    policy_set(
        &format!(
            r#""home": {{ "ipv4": ["203.0.113.10"] }},
               "far": {{ "ipv4": ["{PROVIDER2_EGRESS}"], "ipv6": "{FAR6}", "interface": "{far_interface}" }}"#
        ),
        &[
            r#"{ "name": "partner via far", "selector": { "dst": ["192.0.2.10/32", "2001:db8:2::10/128"] }, "action": { "egress": "far" } }"#,
            r#"{ "name": "public via home", "selector": { "dst": ["198.51.100.10/32"] }, "action": { "egress": "home" } }"#,
        ],
        "",
    )
}

/// A namespace of its own; with `up1` (a veth) when `with_up1`.
fn namespace(with_up1: bool) -> NetNs {
    let ns = NetNs::new(&format!("{}-up", unique_name())).unwrap();
    if with_up1 {
        ns.ip(&[
            "link", "add", UPLINK2, "type", "veth", "peer", "name", "up1-peer",
        ])
        .unwrap();
    }
    ns
}

fn ifindex(ns: &NetNs, iface: &str) -> u32 {
    ns.exec("cat", &[&format!("/sys/class/net/{iface}/ifindex")])
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Run the egress program on `frame` as if on the interface `ifindex` (0:
/// BPF_PROG_TEST_RUN's default device, loopback).
fn egress_on(dp: &mut Dp, ifindex: u32, frame: &[u8]) -> (i32, Vec<u8>) {
    // struct __sk_buff up to `ifindex` (offset 40), everything else zero,
    // as the kernel requires of the fields it does not take.
    let mut ctx = [0u8; 44];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: (ifindex != 0).then_some(&ctx[..]),
        ..TestRunOptions::default()
    };
    let result = dp
        .dataplane_mut()
        .program(maps::PROG_EGRESS)
        .unwrap()
        .test_run(opts)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN egress: {e}"));
    out.truncate(result.data_size_out as usize);
    (result.return_value as i32, out)
}

fn tuple(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Tuple4 {
    Tuple4::new(
        u32::from(src).to_be(),
        u32::from(dst).to_be(),
        sport.to_be(),
        dport.to_be(),
        proto::TCP,
    )
}

#[test]
fn uplinks_pool_interface_every_packet_redirected_unless_on_it() {
    require_root();
    let ns = namespace(true);
    let up1 = ifindex(&ns, UPLINK2);
    ns.run(move || {
        let mut dp = Dp::new(&policies(UPLINK2));
        let client = sa(CLIENT, 40100);
        let server = sa(SERVER_PARTNER, 443);

        let (verdict, out) = egress_on(&mut dp, 0, &packet::tcp(client, server, true, b"syn"));
        assert_eq!(
            verdict, TC_ACT_REDIRECT,
            "routing chose another uplink: the first packet is redirected to up1"
        );
        assert_eq!(
            packet::checked(&out),
            Summary {
                src: sa(PROVIDER2_EGRESS, 40100),
                dst: server,
                proto: proto::TCP
            },
            "the redirected packet is translated first, with valid checksums"
        );
        let entry = dp
            .ct(&tuple(CLIENT, 40100, SERVER_PARTNER, 443))
            .expect("the flow must be tracked");
        assert_eq!(entry.ifindex, up1, "the flow remembers its pool's uplink");

        let (verdict, out) = egress_on(&mut dp, 0, &packet::tcp(client, server, false, b"data"));
        assert_eq!(
            verdict, TC_ACT_REDIRECT,
            "every packet of the flow is redirected, not only the first"
        );
        assert_eq!(packet::checked(&out).src, sa(PROVIDER2_EGRESS, 40100));
        assert_eq!(dp.counter(Counter::Redirected), 2);

        let (verdict, out) = egress_on(&mut dp, up1, &packet::tcp(client, server, false, b"x"));
        assert_eq!(
            verdict, TC_ACT_OK,
            "a packet already on its pool's uplink passes"
        );
        assert_eq!(packet::checked(&out).src, sa(PROVIDER2_EGRESS, 40100));
        assert_eq!(
            dp.counter(Counter::Redirected),
            2,
            "a pass is not counted as a redirect"
        );

        let (verdict, out) = egress_on(
            &mut dp,
            0,
            &packet::tcp(client, sa(SERVER_PUBLIC, 443), true, b"syn"),
        );
        assert_eq!(
            verdict, TC_ACT_OK,
            "a pool without an interface leaves wherever routing sends it"
        );
        assert_eq!(packet::checked(&out).src, sa(DEDICATED_PRIMARY, 40100));
        let entry = dp
            .ct(&tuple(CLIENT, 40100, SERVER_PUBLIC, 443))
            .expect("the flow must be tracked");
        assert_eq!(entry.ifindex, 0, "no uplink recorded for it");

        let (verdict, out) = dp.ingress(&packet::tcp(
            server,
            sa(PROVIDER2_EGRESS, 40100),
            false,
            b"reply",
        ));
        assert_eq!(verdict, TC_ACT_OK, "the reply passes");
        assert_eq!(
            packet::checked(&out).dst,
            client,
            "the reply arriving on the pool's uplink is restored to the client"
        );

        let (client6, server6) = (sa6(CLIENT6, 40200), sa6(SERVER6_A, 443));
        let (verdict, out) = egress_on(&mut dp, 0, &packet::tcp6(client6, server6, true, b"syn"));
        assert_eq!(
            verdict, TC_ACT_REDIRECT,
            "IPv6 flows of the pool are redirected too"
        );
        let src = *packet::checked6(&out).src.ip();
        assert!(
            FAR6.parse::<Ipv6Net>().unwrap().contains(&src),
            "the redirected IPv6 packet leaves from the pool's range, not {src}"
        );
        let entry = dp
            .ct6(&Tuple6::new(
                addr6_words(&CLIENT6),
                addr6_words(&SERVER6_A),
                40200u16.to_be(),
                443u16.to_be(),
                proto::TCP,
            ))
            .expect("the IPv6 flow must be tracked");
        assert_eq!(
            entry.ifindex, up1,
            "the IPv6 flow remembers its pool's uplink"
        );
        Ok(())
    })
    .unwrap();
}

#[test]
fn uplinks_pool_interface_missing_apply_rejected_with_path() {
    require_root();
    let ns = namespace(false);
    ns.run(|| {
        let mut dp = Dp::new(&policies(UPLINK2).replace(r#", "interface": "up1""#, ""));
        let set = policy::parse(&policies(UPLINK2)).unwrap();
        let err = dp
            .tables_mut()
            .apply(&set, &policy::compile(&set, &[]))
            .expect_err("a pool naming a missing interface cannot be applied");
        assert!(
            matches!(&err, TablesError::NoSuchInterface { pool, interface } if pool == "far" && interface == UPLINK2),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "egress_pools.far.interface: no interface \"up1\" in the agent's network namespace"
        );
        Ok(())
    })
    .unwrap();
}
