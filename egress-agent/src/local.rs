//! The gateway's own addresses: its own flows are reserved, never steered.

use std::net::Ipv4Addr;

/// Every IPv4 address configured on any interface of this network namespace.
pub fn ipv4_addrs() -> nix::Result<Vec<Ipv4Addr>> {
    let mut addrs: Vec<Ipv4Addr> = nix::ifaddrs::getifaddrs()?
        .filter_map(|ifa| ifa.address)
        .filter_map(|a| a.as_sockaddr_in().map(|sin| sin.ip()))
        .collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}
