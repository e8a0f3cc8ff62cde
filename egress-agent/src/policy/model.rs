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

    /// The protocol named `name` (`tcp`, `udp`, ...), in any case.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(name))
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

/// An ISO 3166-1 alpha-2 country code, upper case (`PT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountryCode(pub [u8; 2]);

impl fmt::Display for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.0[0] as char, self.0[1] as char)
    }
}

/// Continents as GeoIP databases code them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Continent {
    Af,
    An,
    As,
    Eu,
    Na,
    Oc,
    Sa,
}

impl Continent {
    pub const ALL: [Continent; 7] = [
        Self::Af,
        Self::An,
        Self::As,
        Self::Eu,
        Self::Na,
        Self::Oc,
        Self::Sa,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Self::Af => "AF",
            Self::An => "AN",
            Self::As => "AS",
            Self::Eu => "EU",
            Self::Na => "NA",
            Self::Oc => "OC",
            Self::Sa => "SA",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.code().eq_ignore_ascii_case(code))
    }
}

impl fmt::Display for Continent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// The table a condition is looked up in by the dataplane. Conditions on
/// one dimension combine freely (and, or, not) at no cost; only an `or`
/// across dimensions makes a policy occupy more than one classifier rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dimension {
    /// Source address prefixes.
    Src,
    /// Destination address prefixes.
    Dst,
    /// Protocol and destination port.
    L4,
    /// The identity behind the source address: user, groups, posture.
    Identity,
    /// The destination address's country.
    Country,
}

impl Dimension {
    pub const ALL: [Dimension; 5] = [
        Self::Src,
        Self::Dst,
        Self::L4,
        Self::Identity,
        Self::Country,
    ];
}

/// A condition on one field of a flow. Each holds a set of values and is
/// true when the field's value is one of them (for groups and posture
/// checks: when any of the identity's values is one of them).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Atom {
    /// `net.src.ip in {...}`: the source address is in one of the prefixes.
    SrcIp(Vec<IpNet>),
    /// `net.dst.ip in {...}`.
    DstIp(Vec<IpNet>),
    /// `net.protocol in {...}`.
    Protocol(Vec<Protocol>),
    /// `net.dst.port in {...}`: only TCP and UDP flows have ports, so this
    /// is false for every other protocol.
    DstPort(Vec<PortRange>),
    /// `identity.email in {...}`, compared in lower case.
    User(Vec<String>),
    /// `any(identity.groups[*].name in {...})`.
    Group(Vec<String>),
    /// `any(device_posture.checks.passed[*] in {...})`: posture tags.
    Posture(Vec<String>),
    /// `net.dst.geo.country in {...}`.
    Country(Vec<CountryCode>),
    /// `net.dst.geo.continent in {...}`.
    Continent(Vec<Continent>),
}

impl Atom {
    pub fn dimension(&self) -> Dimension {
        match self {
            Self::SrcIp(_) => Dimension::Src,
            Self::DstIp(_) => Dimension::Dst,
            Self::Protocol(_) | Self::DstPort(_) => Dimension::L4,
            Self::User(_) | Self::Group(_) | Self::Posture(_) => Dimension::Identity,
            Self::Country(_) | Self::Continent(_) => Dimension::Country,
        }
    }
}

/// A boolean condition over a flow.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Expr {
    /// Matches every flow (an empty selector).
    True,
    Atom(Atom),
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
}

impl Expr {
    /// `items` ANDed: `True` when there are none, the item itself when alone.
    pub fn all(mut items: Vec<Expr>) -> Expr {
        match items.len() {
            0 => Self::True,
            1 => items.pop().expect("one item"),
            _ => Self::And(items),
        }
    }

    /// Every atom of the expression, left to right.
    pub fn atoms(&self) -> Vec<&Atom> {
        fn walk<'a>(expr: &'a Expr, out: &mut Vec<&'a Atom>) {
            match expr {
                Expr::True => {}
                Expr::Atom(a) => out.push(a),
                Expr::Not(e) => walk(e, out),
                Expr::And(es) | Expr::Or(es) => es.iter().for_each(|e| walk(e, out)),
            }
        }
        let mut out = Vec::new();
        walk(self, &mut out);
        out
    }

    /// Whether any condition in the expression is about the identity.
    pub fn mentions_identity(&self) -> bool {
        self.atoms()
            .iter()
            .any(|a| a.dimension() == Dimension::Identity)
    }
}

/// Who is behind a source address (delivered by sessions or an identities
/// file) and the state of their device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Identity {
    /// User name, normally an e-mail address; compared in lower case.
    pub user: String,
    pub groups: std::collections::BTreeSet<String>,
    /// Posture checks the device currently passes ("compliant", ...).
    pub posture: std::collections::BTreeSet<String>,
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
    /// The selector object and the three expressions, ANDed.
    pub matcher: Expr,
    /// `matcher` as classifier rules: alternatives, each ANDing at most one
    /// predicate per dimension (see `dnf.rs`).
    pub rules: Vec<super::dnf::Conjunction>,
    pub action: Action,
}

impl Policy {
    /// Policies that mention the identity never match a flow whose source
    /// has none, whatever the form of the condition (even `not(...)`).
    pub fn requires_identity(&self) -> bool {
        self.matcher.mentions_identity()
    }
}

/// How a pool with several IPv4 addresses hands them to new flows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PoolMode {
    /// The first usable address, in list order (primary, then secondary...).
    #[default]
    Failover,
    /// New flows hashed over every usable address.
    Spread,
}

/// What happens to a pool's new flows when none of its addresses is usable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WhenDown {
    /// Fail closed: drop them (and count it); never leak them elsewhere.
    #[default]
    Drop,
    /// Fall back to the shared default egress.
    Default,
}

/// A named set of dedicated egress addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    /// In preference order: the first is the primary, the second the secondary.
    pub ipv4: Vec<Ipv4Addr>,
    /// IPv6 flows leave from an address in this range, fixed per user (or
    /// per source without identity).
    pub ipv6: Option<Ipv6Net>,
    pub mode: PoolMode,
    pub when_down: WhenDown,
    /// The uplink the pool's flows must leave from (redirected there when
    /// routing chose another one); `None`: whichever uplink routing chooses.
    /// Only the running agent knows its uplinks, so it checks the name.
    pub interface: Option<String>,
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
    /// Flows each connection table holds (read at start; a change applies
    /// after a restart).
    pub max_flows: u32,
}

impl Default for Nat {
    fn default() -> Self {
        Self {
            port_range: PortRange {
                first: 1024,
                last: 65535,
            },
            max_flows: egress_common::maps::DEFAULT_MAX_FLOWS,
        }
    }
}

/// Idle time after which a flow is forgotten (its mapping freed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP with replies seen and no FIN/RST (RFC 5382: at least 2 h 4 min).
    pub tcp_established: std::time::Duration,
    /// TCP opening (no reply yet) or closing (FIN seen) (RFC 5382: 4 min).
    pub tcp_transitory: std::time::Duration,
    /// TCP after a RST.
    pub tcp_closed: std::time::Duration,
    /// UDP (RFC 4787: at least 2 min, 5 min recommended).
    pub udp: std::time::Duration,
    /// ICMP echo (RFC 5508: at least 60 s).
    pub icmp: std::time::Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        use std::time::Duration;
        Self {
            tcp_established: Duration::from_secs(7440),
            tcp_transitory: Duration::from_secs(240),
            tcp_closed: Duration::from_secs(10),
            udp: Duration::from_secs(300),
            icmp: Duration::from_secs(60),
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
    pub timeouts: Timeouts,
    pub health: Health,
}

/// How the agent decides that a dedicated IPv4 address is usable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HealthCheck {
    /// Usable while it is assigned to an interface of the gateway.
    #[default]
    Address,
    /// Assigned, and a TCP connection from it to the probe target succeeds.
    Probe(std::net::SocketAddr),
    /// Always usable (addresses routed to the gateway, not assigned to it).
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health {
    pub check: HealthCheck,
    /// Time between checks.
    pub interval: std::time::Duration,
    /// Consecutive failed probes before an address is down.
    pub fall: u32,
    /// Consecutive good probes before it is up again.
    pub rise: u32,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            check: HealthCheck::Address,
            interval: std::time::Duration::from_secs(1),
            fall: 2,
            rise: 2,
        }
    }
}

impl PolicySet {
    pub fn pool_by_name(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name == name)
    }
}
