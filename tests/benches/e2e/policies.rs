//! The policy files the end-to-end bench runs: `n` policies of which only
//! the last selects the measured traffic, so every configuration has to get
//! past all the others first. Only what nftables can also express (prefixes,
//! protocols, ports): no identities, no countries.

use std::net::Ipv4Addr;

use crate::decoys;
use egress_tests::rng::Rng;

/// The server every measured flow goes to (nginx, iperf3, the probe).
pub const SERVER: Ipv4Addr = egress_tests::lab::SERVER_PUBLIC;
/// The address the last policy gives the measured flows.
pub const MEASURED_EGRESS: Ipv4Addr = egress_tests::lab::DEDICATED_PRIMARY;
/// The address of the decoy policies' pool (never used by measured flows).
pub const DECOY_EGRESS: Ipv4Addr = egress_tests::lab::DEDICATED_SECONDARY;
/// nginx, iperf3 and the probe servers listen on these.
pub const HTTP_PORT: u16 = 80;
pub const IPERF_PORT: u16 = 5201;
pub const PROBE_PORT: u16 = 7777;

/// A policy file of `n` (at least 1) policies: `n - 1` decoys with 1-3
/// destination prefixes (/18 to /28) inside 10.128.0.0/9, which no measured
/// flow goes to, TCP and UDP, a port and a port range, some leaving from the
/// default egress; then the measured policy for [`SERVER`]'s ports.
/// Deterministic: the same `n` gives the same file.
///
/// The decoys overlap as partner ranges do, a few deep at most. (Crammed
/// into a /15, as the per-packet bench's are, a thousand policies would
/// share every address: first-match order then makes an exact nftables
/// decision tree grow with the square of the overlap.)
pub fn generate(n: usize) -> String {
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let within: ipnet::Ipv4Net = "10.128.0.0/9".parse().expect("a prefix");
    let mut out = Vec::with_capacity(n);
    for i in 0..n.saturating_sub(1) {
        let r = rng.u64();
        let selector = decoys::selector(&mut rng, r, within, &[18, 20, 24, 28], "");
        let egress = if i % 4 == 3 { "default" } else { "decoy" };
        out.push(format!(
            r#"{{ "name": "decoy-{i}", "selector": {{ {selector} }}, "action": {{ "egress": "{egress}" }} }}"#
        ));
    }
    out.push(format!(
        r#"{{ "name": "measured", "selector": {{ "dst": ["{SERVER}/32"], "protocols": ["tcp", "udp"], "dst_ports": ["{HTTP_PORT}", "{IPERF_PORT}", "{PROBE_PORT}"] }}, "action": {{ "egress": "measured" }} }}"#
    ));
    format!(
        r#"{{ "egress_pools": {{ "measured": {{ "ipv4": ["{MEASURED_EGRESS}"] }}, "decoy": {{ "ipv4": ["{DECOY_EGRESS}"] }} }},
  "default_egress": {{ "ipv4": "{}" }},
  "policies": [
{}
] }}
"#,
        egress_tests::lab::GW_UPLINK,
        out.join(",\n")
    )
}
