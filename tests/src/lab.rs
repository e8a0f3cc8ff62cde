//! The lab: a client namespace, a gateway namespace running the dataplane on
//! its uplink, and an "internet" namespace with servers. Everything uses
//! documentation and private ranges and lives only in these namespaces.
//!
//! ```text
//!  client            gateway                          internet
//!  eth0 10.10.0.2 -- lan0 10.10.0.1   up0 203.0.113.1 -- eth0 203.0.113.254
//!                                         203.0.113.10    lo 192.0.2.10
//!                                         203.0.113.11       198.51.100.10
//!                                                            10.99.0.10
//! ```

use std::net::Ipv4Addr;

use anyhow::Context as _;

use crate::netns::{NetNs, unique_name};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
pub const GW_LAN: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
/// The gateway's uplink address, also the shared default egress.
pub const GW_UPLINK: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const DEDICATED_PRIMARY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const DEDICATED_SECONDARY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
pub const INET_ROUTER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);
/// A server in the range the example's dedicated policy selects.
pub const SERVER_PARTNER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// A server only the catch-all matches.
pub const SERVER_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// A server in the range the example bypasses.
pub const SERVER_INTERNAL: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 10);

/// Every server address of the internet namespace.
pub const SERVERS: [Ipv4Addr; 3] = [SERVER_PARTNER, SERVER_PUBLIC, SERVER_INTERNAL];

/// Interface names inside the namespaces.
pub const UPLINK: &str = "up0";
pub const LAN: &str = "lan0";

pub struct Lab {
    pub client: NetNs,
    pub gw: NetNs,
    pub inet: NetNs,
}

/// Set a sysctl inside a namespace (procfs resolves /proc/sys/net against
/// the opening thread's namespace).
fn sysctl(ns: &NetNs, key: &str, value: &str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let value = value.to_owned();
    ns.run(move || std::fs::write(&path, value).with_context(|| format!("writing {path}")))
}

impl Lab {
    /// Build the topology. Extra client addresses (10.10.0.3, ...) let tests
    /// run several "users" from one namespace.
    pub fn new(extra_clients: u8) -> anyhow::Result<Self> {
        let name = unique_name();
        let client = NetNs::new(&format!("{name}-cli"))?;
        let gw = NetNs::new(&format!("{name}-gw"))?;
        let inet = NetNs::new(&format!("{name}-net"))?;
        let lab = Self { client, gw, inet };
        lab.build(extra_clients)
            .with_context(|| format!("building lab {name}"))?;
        Ok(lab)
    }

    fn build(&self, extra_clients: u8) -> anyhow::Result<()> {
        let (client, gw, inet) = (&self.client, &self.gw, &self.inet);
        // Created directly inside the namespaces: never on the host.
        crate::netns::sh(
            "ip",
            &[
                "link",
                "add",
                "eth0",
                "netns",
                client.name(),
                "type",
                "veth",
                "peer",
                "name",
                LAN,
                "netns",
                gw.name(),
            ],
        )?;
        crate::netns::sh(
            "ip",
            &[
                "link",
                "add",
                UPLINK,
                "netns",
                gw.name(),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                inet.name(),
            ],
        )?;

        client.ip(&["addr", "add", "10.10.0.2/24", "dev", "eth0"])?;
        for i in 0..extra_clients {
            client.ip(&[
                "addr",
                "add",
                &format!("10.10.0.{}/24", 3 + u16::from(i)),
                "dev",
                "eth0",
            ])?;
        }
        client.ip(&["link", "set", "eth0", "up"])?;
        client.ip(&["route", "add", "default", "via", "10.10.0.1"])?;

        gw.ip(&["addr", "add", "10.10.0.1/24", "dev", LAN])?;
        gw.ip(&["addr", "add", "203.0.113.1/24", "dev", UPLINK])?;
        gw.ip(&["addr", "add", "203.0.113.10/32", "dev", UPLINK])?;
        gw.ip(&["addr", "add", "203.0.113.11/32", "dev", UPLINK])?;
        gw.ip(&["link", "set", LAN, "up"])?;
        gw.ip(&["link", "set", UPLINK, "up"])?;
        gw.ip(&["route", "add", "default", "via", "203.0.113.254"])?;
        sysctl(gw, "net.ipv4.ip_forward", "1")?;

        inet.ip(&["addr", "add", "203.0.113.254/24", "dev", "eth0"])?;
        for server in ["192.0.2.10/32", "198.51.100.10/32", "10.99.0.10/32"] {
            inet.ip(&["addr", "add", server, "dev", "lo"])?;
        }
        inet.ip(&["link", "set", "eth0", "up"])?;
        // Bypassed flows keep the client's address; the internet side routes
        // them back through the gateway.
        inet.ip(&["route", "add", "10.10.0.0/24", "via", "203.0.113.1"])?;
        Ok(())
    }

    /// Addresses of the client namespace, the first being [`CLIENT`].
    pub fn client_addr(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 10, 0, 2 + i)
    }
}
