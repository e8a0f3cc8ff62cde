//! The lab: a client namespace, a gateway namespace running the dataplane on
//! its uplink, and an "internet" namespace with servers. Everything uses
//! documentation and private ranges and lives only in these namespaces.
//!
//! ```text
//!  client            gateway                          internet                   far (optional)
//!  eth0 10.10.0.2 -- lan0 10.10.0.1   up0 203.0.113.1 -- eth0 203.0.113.254
//!       fd00:10::2        fd00:10::1      203.0.113.10    lo 192.0.2.10
//!                                         203.0.113.11       198.51.100.10
//!                                         2001:db8:ff::1     10.99.0.10
//!                                                            2001:db8:2::10
//!                                                            2001:db8:3::10
//!                                         eth0 2001:db8:ff::254
//!                                                         eth1 10.254.0.1 -- eth0 10.254.0.2   lo 192.0.2.200
//!                                                              fd00:254::1     fd00:254::2        2001:db8:f::10
//!                                     up1 198.51.100.193 -- eth2 198.51.100.254      (second uplink, optional)
//!                                         198.51.100.201
//! ```
//!
//! The pool range 2001:db8:e0::/64 is routed by the internet side to the
//! gateway (as a provider routes a customer's prefix). The far namespace sits
//! behind a link with a small MTU, one more router hop away: where path-MTU
//! and TTL-exceeded errors come from. The second uplink is a second provider:
//! its link (198.51.100.192/26, which holds no server) carries the egress
//! address 198.51.100.201, so the internet side sends that address's replies
//! back over it; the gateway keeps routing through up0 and has a second,
//! less preferred default route via up1 for redirected flows.

use std::net::{Ipv4Addr, Ipv6Addr};

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

pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 2);
/// The gateway's IPv6 uplink address, also the example's default IPv6 egress.
pub const GW_UPLINK6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
/// The example pool's IPv6 range (routed to the gateway).
pub const POOL6: &str = "2001:db8:e0::/64";
pub const SERVER6_A: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);
pub const SERVER6_B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 0x10);
pub const SERVERS6: [Ipv6Addr; 2] = [SERVER6_A, SERVER6_B];
/// Servers of the far namespace, behind the small-MTU link.
pub const FAR_SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
pub const FAR_SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x10);
/// MTU of the internet <-> far link.
pub const FAR_MTU: u32 = 1280;

/// Every server address of the internet namespace, both families.
pub fn servers() -> Vec<std::net::IpAddr> {
    SERVERS
        .iter()
        .map(|a| (*a).into())
        .chain(SERVERS6.iter().map(|a| (*a).into()))
        .collect()
}

/// The second uplink ([`Lab::with_second_uplink`]): the gateway's address
/// on it, the second provider's router, and an egress address of that
/// provider.
pub const GW_UPLINK2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 193);
pub const PROVIDER2_ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
pub const PROVIDER2_EGRESS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 201);

/// Interface names inside the namespaces.
pub const UPLINK: &str = "up0";
/// The gateway's second uplink, and its peer in the internet namespace.
pub const UPLINK2: &str = "up1";
pub const PROVIDER2_LINK: &str = "eth2";
pub const LAN: &str = "lan0";

pub struct Lab {
    pub client: NetNs,
    pub gw: NetNs,
    pub inet: NetNs,
    /// Present when built with [`Lab::with_far`].
    pub far: Option<NetNs>,
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
        let lab = Self {
            client,
            gw,
            inet,
            far: None,
        };
        lab.build(extra_clients)
            .with_context(|| format!("building lab {name}"))?;
        Ok(lab)
    }

    /// [`Lab::new`] plus the far namespace behind a small-MTU link.
    pub fn with_far(extra_clients: u8) -> anyhow::Result<Self> {
        let mut lab = Self::new(extra_clients)?;
        let name = lab.client.name().trim_end_matches("-cli").to_owned();
        // Same stem as the other three, so it is cleaned up with them.
        let far = NetNs::new(&format!("{name}-far"))?;
        let (inet, far_ref) = (&lab.inet, &far);
        crate::netns::sh(
            "ip",
            &[
                "link",
                "add",
                "eth1",
                "netns",
                inet.name(),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                far_ref.name(),
            ],
        )?;
        let mtu = FAR_MTU.to_string();
        inet.ip(&["addr", "add", "10.254.0.1/30", "dev", "eth1"])?;
        inet.ip(&[
            "-6",
            "addr",
            "add",
            "fd00:254::1/64",
            "dev",
            "eth1",
            "nodad",
        ])?;
        inet.ip(&["link", "set", "eth1", "mtu", &mtu, "up"])?;
        inet.ip(&["route", "add", "192.0.2.200/32", "via", "10.254.0.2"])?;
        inet.ip(&[
            "-6",
            "route",
            "add",
            "2001:db8:f::10/128",
            "via",
            "fd00:254::2",
        ])?;
        far_ref.ip(&["addr", "add", "10.254.0.2/30", "dev", "eth0"])?;
        far_ref.ip(&[
            "-6",
            "addr",
            "add",
            "fd00:254::2/64",
            "dev",
            "eth0",
            "nodad",
        ])?;
        far_ref.ip(&["link", "set", "eth0", "mtu", &mtu, "up"])?;
        far_ref.ip(&["addr", "add", "192.0.2.200/32", "dev", "lo"])?;
        far_ref.ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8:f::10/128",
            "dev",
            "lo",
            "nodad",
        ])?;
        far_ref.ip(&["route", "add", "default", "via", "10.254.0.1"])?;
        far_ref.ip(&["-6", "route", "add", "default", "via", "fd00:254::1"])?;
        sysctl(inet, "net.ipv4.ip_forward", "1")?;
        sysctl(inet, "net.ipv6.conf.all.forwarding", "1")?;
        lab.far = Some(far);
        Ok(lab)
    }

    /// [`Lab::new`] plus a second uplink `up1` towards a second provider
    /// (the internet namespace's `eth2`). Routing on the gateway still sends
    /// everything through up0; up1 has a default route with a higher metric,
    /// which is what a lookup restricted to up1 (a redirect) finds, and
    /// loose reverse-path filtering, since replies to up1's addresses arrive
    /// there from sources the main route sends through up0.
    pub fn with_second_uplink(extra_clients: u8) -> anyhow::Result<Self> {
        let lab = Self::new(extra_clients)?;
        let (gw, inet) = (&lab.gw, &lab.inet);
        crate::netns::sh(
            "ip",
            &[
                "link",
                "add",
                UPLINK2,
                "netns",
                gw.name(),
                "type",
                "veth",
                "peer",
                "name",
                PROVIDER2_LINK,
                "netns",
                inet.name(),
            ],
        )?;
        gw.ip(&["addr", "add", "198.51.100.193/26", "dev", UPLINK2])?;
        gw.ip(&["addr", "add", "198.51.100.201/32", "dev", UPLINK2])?;
        gw.ip(&["link", "set", UPLINK2, "up"])?;
        gw.ip(&[
            "route",
            "add",
            "default",
            "via",
            "198.51.100.254",
            "dev",
            UPLINK2,
            "metric",
            "100",
        ])?;
        sysctl(gw, &format!("net.ipv4.conf.{UPLINK2}.rp_filter"), "2")?;
        inet.ip(&["addr", "add", "198.51.100.254/26", "dev", PROVIDER2_LINK])?;
        inet.ip(&["link", "set", PROVIDER2_LINK, "up"])?;
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
        client.ip(&["-6", "addr", "add", "fd00:10::2/64", "dev", "eth0", "nodad"])?;
        for i in 0..extra_clients {
            client.ip(&[
                "-6",
                "addr",
                "add",
                &format!("fd00:10::{:x}/64", 3 + u16::from(i)),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        client.ip(&["link", "set", "eth0", "up"])?;
        client.ip(&["route", "add", "default", "via", "10.10.0.1"])?;
        client.ip(&["-6", "route", "add", "default", "via", "fd00:10::1"])?;

        gw.ip(&["addr", "add", "10.10.0.1/24", "dev", LAN])?;
        gw.ip(&["addr", "add", "203.0.113.1/24", "dev", UPLINK])?;
        gw.ip(&["addr", "add", "203.0.113.10/32", "dev", UPLINK])?;
        gw.ip(&["addr", "add", "203.0.113.11/32", "dev", UPLINK])?;
        gw.ip(&["-6", "addr", "add", "fd00:10::1/64", "dev", LAN, "nodad"])?;
        gw.ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8:ff::1/64",
            "dev",
            UPLINK,
            "nodad",
        ])?;
        gw.ip(&["link", "set", LAN, "up"])?;
        gw.ip(&["link", "set", UPLINK, "up"])?;
        gw.ip(&["route", "add", "default", "via", "203.0.113.254"])?;
        gw.ip(&["-6", "route", "add", "default", "via", "2001:db8:ff::254"])?;
        sysctl(gw, "net.ipv4.ip_forward", "1")?;
        sysctl(gw, "net.ipv6.conf.all.forwarding", "1")?;

        inet.ip(&["addr", "add", "203.0.113.254/24", "dev", "eth0"])?;
        for server in ["192.0.2.10/32", "198.51.100.10/32", "10.99.0.10/32"] {
            inet.ip(&["addr", "add", server, "dev", "lo"])?;
        }
        inet.ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8:ff::254/64",
            "dev",
            "eth0",
            "nodad",
        ])?;
        for server in ["2001:db8:2::10/128", "2001:db8:3::10/128"] {
            inet.ip(&["-6", "addr", "add", server, "dev", "lo", "nodad"])?;
        }
        inet.ip(&["link", "set", "eth0", "up"])?;
        // Bypassed flows keep the client's address; the internet side routes
        // them back through the gateway. So is the pool's IPv6 range.
        inet.ip(&["route", "add", "10.10.0.0/24", "via", "203.0.113.1"])?;
        inet.ip(&[
            "-6",
            "route",
            "add",
            "fd00:10::/64",
            "via",
            "2001:db8:ff::1",
        ])?;
        inet.ip(&["-6", "route", "add", POOL6, "via", "2001:db8:ff::1"])?;
        Ok(())
    }

    /// Addresses of the client namespace, the first being [`CLIENT`].
    pub fn client_addr(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 10, 0, 2 + i)
    }

    /// IPv6 addresses of the client namespace, the first being [`CLIENT6`].
    pub fn client_addr6(i: u8) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 2 + u16::from(i))
    }

    /// The far namespace (panics when the lab was built without it).
    pub fn far(&self) -> &NetNs {
        self.far.as_ref().expect("lab built with Lab::with_far")
    }
}
