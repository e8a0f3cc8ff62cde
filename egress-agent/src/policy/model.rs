//! The validated policy set: what the file means, independent of JSON and of
//! how the dataplane encodes it.

use std::{fmt, net::Ipv4Addr};

use ipnet::{IpNet, Ipv6Net};

/// Transport protocols a selector can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

impl Protocol {
    pub const ALL: [Protocol; 4] = [Self::Tcp, Self::Udp, Self::Icmp, Self::Icmpv6];

    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
            Self::Icmpv6 => "icmpv6",
        }
    }

    /// IP protocol number.
    pub fn number(self) -> u8 {
        use egress_common::flow::proto;
        match self {
            Self::Tcp => proto::TCP,
            Self::Udp => proto::UDP,
            Self::Icmp => proto::ICMP,
            Self::Icmpv6 => proto::ICMPV6,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.number() == number)
    }

    /// Whether flows of this protocol have ports a `dst_ports` selector can match.
    pub fn has_ports(self) -> bool {
        matches!(self, Self::Tcp | Self::Udp)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An inclusive port range; a single port has `first == last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Which flows a policy applies to. Fields are ANDed; the values inside one
/// field are ORed; an empty field matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub src: Vec<IpNet>,
    pub dst: Vec<IpNet>,
    pub protocols: Vec<Protocol>,
    pub dst_ports: Vec<PortRange>,
}

/// Where a policy's flows leave from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Egress {
    /// The shared default egress address.
    Default,
    /// Leave the packets untouched.
    Bypass,
    /// A dedicated pool, by index into [`PolicySet::pools`].
    Pool(usize),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Action {
    pub egress: Egress,
    /// Packet mark set on every packet of the flow (for policy routing).
    pub mark: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub description: Option<String>,
    pub enabled: bool,
    pub selector: Selector,
    pub action: Action,
}

/// A named set of dedicated egress addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    /// In preference order: the first is the primary, the second the secondary.
    pub ipv4: Vec<Ipv4Addr>,
    pub ipv6: Option<Ipv6Net>,
}

/// The shared default egress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DefaultEgress {
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<std::net::Ipv6Addr>,
}

/// Translation settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nat {
    /// Range searched for a translated port when a flow's own port is taken.
    pub port_range: PortRange,
}

impl Default for Nat {
    fn default() -> Self {
        Self {
            port_range: PortRange {
                first: 1024,
                last: 65535,
            },
        }
    }
}

/// A complete, validated policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySet {
    pub pools: Vec<Pool>,
    pub default_egress: DefaultEgress,
    pub policies: Vec<Policy>,
    pub nat: Nat,
}

impl PolicySet {
    pub fn pool_by_name(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name == name)
    }
}
