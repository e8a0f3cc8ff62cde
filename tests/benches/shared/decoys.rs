//! The decoy policies every bench puts before the measured one: shaped like
//! real partner rules (1-3 destination prefixes, TCP and UDP, a port and a
//! port range), drawn from a seeded generator so the same count always
//! gives the same file.

use std::net::Ipv4Addr;

use egress_tests::rng::Rng;
use ipnet::Ipv4Net;

/// One decoy's selector members (without braces): 1-3 prefixes inside
/// `within`, of lengths drawn from `lens`, then `extra` members (each
/// starting with a comma, e.g. `, "groups": ["team-3"]`). `r` is the draw
/// the caller also used for its own choices.
pub fn selector(rng: &mut Rng, r: u64, within: Ipv4Net, lens: &[u8], extra: &str) -> String {
    let dst: Vec<String> = (0..1 + r % 3)
        .map(|_| {
            let v = rng.u64();
            let len = lens[(v % lens.len() as u64) as usize];
            let host = (v >> 8) as u32 & !u32::from(within.netmask());
            let addr = Ipv4Addr::from(u32::from(within.network()) | host);
            let net = Ipv4Net::new(addr, len.max(within.prefix_len()))
                .expect("prefix lengths are at most 32")
                .trunc();
            format!("\"{net}\"")
        })
        .collect();
    let port = 1 + (r >> 20) % 60000;
    format!(
        r#""dst": [{}], "protocols": ["tcp", "udp"], "dst_ports": ["{port}", "{}-{}"]{extra}"#,
        dst.join(", "),
        port + 10,
        port + 100
    )
}
