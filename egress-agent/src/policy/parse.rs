//! Reading a policy file: JSON syntax, field types and every semantic rule,
//! each failure reported with the JSON path of the value at fault, e.g.
//! `policies[2].selector.dst[0]: invalid CIDR "10.0.0.0/33": ...`.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    str::FromStr,
};

use ipnet::IpNet;
use serde::{
    Deserialize, Deserializer,
    de::{self, MapAccess, Visitor},
};

use super::{
    dnf,
    expr::{self, ExprKind},
    geo,
    model::{
        Action, Atom, Continent, CountryCode, DefaultEgress, Egress, Expr, Health, HealthCheck,
        Nat, Policy, PolicySet, Pool, PoolMode, PortRange, Protocol, Timeouts, WhenDown,
    },
};

/// Why a policy file was rejected. Displayed as one line naming the place at fault.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not valid JSON: {message}")]
    Syntax { message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl PolicyError {
    fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Most policies one set may hold (bits in a classifier row).
pub const MAX_POLICIES: usize = egress_common::classify::MAX_POLICIES as usize;
/// Most IPv4 addresses in one pool.
pub const MAX_POOL_V4: usize = egress_common::classify::POOL_MAX_V4;
/// Most pools besides the default egress.
pub const MAX_POOLS: usize = egress_common::classify::MAX_POOLS as usize - 1;
const MAX_NAME_LEN: usize = 128;

pub fn load(path: &Path) -> Result<PolicySet, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text)
}

pub fn parse(text: &str) -> Result<PolicySet, PolicyError> {
    // serde would also accept an array for the top-level struct; a policy
    // file is an object.
    match text.trim_start().chars().next() {
        Some('{') => {}
        None => {
            return Err(PolicyError::Syntax {
                message: "the file is empty".into(),
            });
        }
        Some(_) if serde_json::from_str::<serde_json::Value>(text).is_ok() => {
            return Err(PolicyError::invalid(
                "(top level)",
                "expected a JSON object with egress_pools, default_egress and policies",
            ));
        }
        Some(_) => {}
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let file: FileJson = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                PolicyError::Syntax {
                    message: inner.to_string(),
                }
            }
            // An unknown top-level key "" has the empty path.
            _ if path == "." || path.is_empty() => {
                PolicyError::invalid("(top level)", inner.to_string())
            }
            _ => PolicyError::invalid(path, inner.to_string()),
        }
    })?;
    de.end().map_err(|err| PolicyError::Syntax {
        message: err.to_string(),
    })?;
    file.validate()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileJson {
    #[serde(default, deserialize_with = "unique_keys")]
    egress_pools: Vec<(String, PoolJson)>,
    default_egress: DefaultEgressJson,
    policies: Vec<PolicyJson>,
    #[serde(default)]
    nat: NatJson,
    #[serde(default)]
    timeouts: TimeoutsJson,
    #[serde(default)]
    health: HealthJson,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HealthJson {
    /// "address" (default), "probe" or "none".
    #[serde(default)]
    check: Option<String>,
    #[serde(default)]
    probe: Option<String>,
    #[serde(default)]
    interval: Option<Seconds>,
    #[serde(default)]
    fall: Option<u32>,
    #[serde(default)]
    rise: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolJson {
    #[serde(default)]
    ipv4: Vec<Ipv4Addr>,
    #[serde(default)]
    ipv6: Option<Cidr>,
    #[serde(default)]
    mode: ModeJson,
    #[serde(default)]
    when_down: WhenDownJson,
    #[serde(default)]
    interface: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "snake_case")]
enum ModeJson {
    #[default]
    Failover,
    Spread,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "snake_case")]
enum WhenDownJson {
    #[default]
    Drop,
    Default,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultEgressJson {
    ipv4: Ipv4Addr,
    #[serde(default)]
    ipv6: Option<std::net::Ipv6Addr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyJson {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default = "enabled_by_default")]
    enabled: bool,
    #[serde(default)]
    selector: Option<SelectorJson>,
    /// Zero-trust gateway expressions, ANDed with the selector and each other.
    #[serde(default)]
    traffic: Option<String>,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    device_posture: Option<String>,
    action: ActionJson,
}

fn enabled_by_default() -> bool {
    true
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SelectorJson {
    #[serde(default)]
    src: Vec<Cidr>,
    #[serde(default)]
    not_src: Vec<Cidr>,
    #[serde(default)]
    dst: Vec<Cidr>,
    #[serde(default)]
    not_dst: Vec<Cidr>,
    #[serde(default)]
    protocols: Vec<Protocol>,
    #[serde(default)]
    dst_ports: Vec<PortRange>,
    #[serde(default)]
    users: Vec<Name>,
    #[serde(default)]
    groups: Vec<Name>,
    #[serde(default)]
    posture: Vec<Name>,
    #[serde(default)]
    dst_countries: Vec<Country>,
    #[serde(default)]
    dst_continents: Vec<ContinentJson>,
}

/// A non-empty user, group or posture name.
struct Name(String);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().is_empty() {
            return Err(de::Error::custom("empty name"));
        }
        Ok(Self(s))
    }
}

/// An assigned ISO 3166-1 alpha-2 code.
struct Country(CountryCode);

impl<'de> Deserialize<'de> for Country {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        geo::lookup(&s)
            .map(|(code, _, _)| Self(code))
            .ok_or_else(|| {
                let hint = if s.eq_ignore_ascii_case("UK") {
                    " (the United Kingdom is \"GB\")"
                } else {
                    ""
                };
                de::Error::custom(format!(
                    "unknown country code {s:?}: expected an ISO 3166-1 alpha-2 code{hint}"
                ))
            })
    }
}

struct ContinentJson(Continent);

impl<'de> Deserialize<'de> for ContinentJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Continent::from_code(&s).map(Self).ok_or_else(|| {
            de::Error::custom(format!(
                "unknown continent {s:?}: expected AF, AN, AS, EU, NA, OC or SA"
            ))
        })
    }
}

impl SelectorJson {
    /// The selector as a conjunction of conditions (`Expr::True` when empty).
    fn to_expr(&self) -> Expr {
        let nets = |v: &[Cidr]| v.iter().map(|c| c.0).collect::<Vec<_>>();
        let names = |v: &[Name]| v.iter().map(|n| n.0.clone()).collect::<Vec<_>>();
        let mut protocols = self.protocols.clone();
        protocols.sort();
        protocols.dedup();
        let mut atoms = Vec::new();
        let mut push = |present: bool, atom: Atom, negate: bool| {
            if present {
                let e = Expr::Atom(atom);
                atoms.push(if negate { Expr::Not(Box::new(e)) } else { e });
            }
        };
        push(!self.src.is_empty(), Atom::SrcIp(nets(&self.src)), false);
        push(
            !self.not_src.is_empty(),
            Atom::SrcIp(nets(&self.not_src)),
            true,
        );
        push(!self.dst.is_empty(), Atom::DstIp(nets(&self.dst)), false);
        push(
            !self.not_dst.is_empty(),
            Atom::DstIp(nets(&self.not_dst)),
            true,
        );
        push(!protocols.is_empty(), Atom::Protocol(protocols), false);
        push(
            !self.dst_ports.is_empty(),
            Atom::DstPort(self.dst_ports.clone()),
            false,
        );
        push(
            !self.users.is_empty(),
            Atom::User(self.users.iter().map(|n| n.0.to_lowercase()).collect()),
            false,
        );
        push(
            !self.groups.is_empty(),
            Atom::Group(names(&self.groups)),
            false,
        );
        push(
            !self.posture.is_empty(),
            Atom::Posture(names(&self.posture)),
            false,
        );
        push(
            !self.dst_countries.is_empty(),
            Atom::Country(self.dst_countries.iter().map(|c| c.0).collect()),
            false,
        );
        push(
            !self.dst_continents.is_empty(),
            Atom::Continent(self.dst_continents.iter().map(|c| c.0).collect()),
            false,
        );
        Expr::all(atoms)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionJson {
    egress: String,
    #[serde(default)]
    mark: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NatJson {
    #[serde(default)]
    port_range: Option<PortRange>,
    #[serde(default)]
    max_flows: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TimeoutsJson {
    #[serde(default)]
    tcp_established: Option<Seconds>,
    #[serde(default)]
    tcp_transitory: Option<Seconds>,
    #[serde(default)]
    tcp_closed: Option<Seconds>,
    #[serde(default)]
    udp: Option<Seconds>,
    #[serde(default)]
    icmp: Option<Seconds>,
}

/// A duration: a number of seconds, or text like "2h4m" or "90s".
struct Seconds(std::time::Duration);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Seconds;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of seconds or a duration like \"2h4m\"")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Seconds, E> {
                Ok(Seconds(std::time::Duration::from_secs(n)))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Seconds, E> {
                Err(E::custom(format!(
                    "invalid duration {n}: must not be negative"
                )))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Seconds, E> {
                humantime::parse_duration(s)
                    .map(Seconds)
                    .map_err(|e| E::custom(format!("invalid duration {s:?}: {e}")))
            }
        }
        d.deserialize_any(V)
    }
}

/// An address or CIDR as written in the file; a bare address is a host prefix.
#[derive(Clone, Copy, Debug)]
pub struct Cidr(pub IpNet);

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let invalid = |why: String| format!("invalid CIDR {s:?}: {why}");
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| invalid(format!("{addr:?} is not an IPv4 or IPv6 address")))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(len) => {
                let len: u8 = len
                    .parse()
                    .map_err(|_| invalid(format!("prefix length {len:?} is not a number")))?;
                if len > max {
                    return Err(invalid(format!(
                        "prefix length {len} is more than {max} for an {} address",
                        if max == 32 { "IPv4" } else { "IPv6" }
                    )));
                }
                len
            }
        };
        let net = IpNet::new(addr, len).map_err(|e| invalid(e.to_string()))?;
        if net.network() != addr {
            return Err(invalid(format!(
                "host bits are set (the network is {})",
                net.trunc()
            )));
        }
        Ok(Self(net))
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| -> Result<u16, String> {
            let n: u32 = p
                .trim()
                .parse()
                .map_err(|_| format!("invalid port {s:?}: {p:?} is not a number"))?;
            u16::try_from(n).map_err(|_| format!("invalid port {s:?}: {n} is outside 0-65535"))
        };
        match s.split_once('-') {
            None => {
                let p = port(s)?;
                Ok(Self { first: p, last: p })
            }
            Some((a, b)) => {
                let (first, last) = (port(a)?, port(b)?);
                if first > last {
                    return Err(format!("invalid port range {s:?}: {first} is after {last}"));
                }
                Ok(Self { first, last })
            }
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PortVisitor;
        impl Visitor<'_> for PortVisitor {
            type Value = PortRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port (443 or \"443\") or a range (\"8000-8100\")")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<PortRange, E> {
                let p = u16::try_from(n)
                    .map_err(|_| E::custom(format!("invalid port {n}: outside 0-65535")))?;
                Ok(PortRange { first: p, last: p })
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<PortRange, E> {
                Err(E::custom(format!("invalid port {n}: outside 0-65535")))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PortRange, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(PortVisitor)
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Protocol::from_name(&s).ok_or_else(|| {
            de::Error::custom(format!(
                "unknown protocol {s:?}: expected tcp, udp, icmp or icmpv6"
            ))
        })
    }
}

/// A JSON object read in file order, rejecting a key given twice (which
/// serde_json would otherwise silently resolve to the last value).
fn unique_keys<'de, D, V>(d: D) -> Result<Vec<(String, V)>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Entries<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> Visitor<'de> for Entries<V> {
        type Value = Vec<(String, V)>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object of named pools")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out: Vec<(String, V)> = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                if out.iter().any(|(k, _)| *k == key) {
                    return Err(de::Error::custom(format!("pool {key:?} is defined twice")));
                }
                let value = map.next_value()?;
                out.push((key, value));
            }
            Ok(out)
        }
    }
    d.deserialize_map(Entries(std::marker::PhantomData))
}

fn check_name(path: &str, name: &str, what: &str) -> Result<(), PolicyError> {
    if name.trim().is_empty() {
        return Err(PolicyError::invalid(path, format!("{what} name is empty")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(PolicyError::invalid(
            path,
            format!("{what} name is longer than {MAX_NAME_LEN} bytes"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(PolicyError::invalid(
            path,
            format!("{what} name {name:?} contains control characters"),
        ));
    }
    Ok(())
}

/// A Linux interface name: what the kernel would accept (dev_valid_name).
/// Whether it is one of the agent's uplinks only the running agent knows.
fn check_interface(path: &str, name: &str) -> Result<(), PolicyError> {
    // IFNAMSIZ (16) with the terminating NUL.
    const MAX_IFNAME: usize = 15;
    let forbidden = |c: char| c == '/' || c == ':' || c.is_whitespace() || c.is_control();
    let why = if name.is_empty() {
        "is empty"
    } else if name.len() > MAX_IFNAME {
        "is longer than 15 bytes"
    } else if name == "." || name == ".." {
        "is not an interface name"
    } else if name.chars().any(forbidden) {
        "contains '/', ':', whitespace or control characters"
    } else {
        return Ok(());
    };
    Err(PolicyError::invalid(
        path,
        format!("interface name {name:?} {why}"),
    ))
}

fn check_unicast(path: &str, addr: Ipv4Addr) -> Result<(), PolicyError> {
    if addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() || addr.is_loopback() {
        return Err(PolicyError::invalid(
            path,
            format!("{addr} cannot be an egress address (not a unicast host address)"),
        ));
    }
    Ok(())
}

impl HealthJson {
    fn validate(&self) -> Result<Health, PolicyError> {
        let mut health = Health::default();
        let probe = match &self.probe {
            None => None,
            Some(text) => Some(text.parse::<std::net::SocketAddr>().map_err(|_| {
                PolicyError::invalid(
                    "health.probe",
                    format!("{text:?} is not an address:port (e.g. \"198.51.100.1:443\")"),
                )
            })?),
        };
        health.check = match (self.check.as_deref(), probe) {
            (None | Some("address"), None) => HealthCheck::Address,
            (None | Some("probe"), Some(target)) => HealthCheck::Probe(target),
            (Some("probe"), None) => {
                return Err(PolicyError::invalid(
                    "health.probe",
                    "check \"probe\" needs a probe target (address:port)",
                ));
            }
            (Some("none"), None) => HealthCheck::None,
            (Some(other @ ("address" | "none")), Some(_)) => {
                return Err(PolicyError::invalid(
                    "health.probe",
                    format!("a probe target is only used with check \"probe\", not {other:?}"),
                ));
            }
            (Some(other), _) => {
                return Err(PolicyError::invalid(
                    "health.check",
                    format!("unknown check {other:?}: expected \"address\", \"probe\" or \"none\""),
                ));
            }
        };
        if let Some(Seconds(d)) = self.interval {
            if d < std::time::Duration::from_millis(100) || d > std::time::Duration::from_secs(60) {
                return Err(PolicyError::invalid(
                    "health.interval",
                    format!("{} is outside 100ms-60s", humantime::format_duration(d)),
                ));
            }
            health.interval = d;
        }
        for (field, value, slot) in [
            ("fall", self.fall, &mut health.fall),
            ("rise", self.rise, &mut health.rise),
        ] {
            if let Some(n) = value {
                if !(1..=10).contains(&n) {
                    return Err(PolicyError::invalid(
                        format!("health.{field}"),
                        format!("{n} is outside 1-10"),
                    ));
                }
                *slot = n;
            }
        }
        Ok(health)
    }
}

impl PolicyJson {
    /// The selector and the expressions, ANDed, as one condition.
    fn matcher(&self, path: &str) -> Result<Expr, PolicyError> {
        if self.selector.is_none()
            && self.traffic.is_none()
            && self.identity.is_none()
            && self.device_posture.is_none()
        {
            return Err(PolicyError::invalid(
                path,
                "a policy needs a \"selector\" or an expression (\"traffic\", \"identity\", \"device_posture\"); use \"selector\": {} to match every flow",
            ));
        }
        let mut parts = Vec::new();
        if let Some(sel) = &self.selector {
            if !sel.dst_ports.is_empty()
                && !sel.protocols.is_empty()
                && !sel.protocols.iter().any(|p| p.has_ports())
            {
                let mut protocols = sel.protocols.clone();
                protocols.sort();
                protocols.dedup();
                return Err(PolicyError::invalid(
                    format!("{path}.selector.dst_ports"),
                    format!(
                        "ports only apply to tcp and udp, but protocols is [{}]",
                        protocols
                            .iter()
                            .map(|p| p.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            parts.push(sel.to_expr());
        }
        for (field, text, kind) in [
            ("traffic", &self.traffic, ExprKind::Traffic),
            ("identity", &self.identity, ExprKind::Identity),
            (
                "device_posture",
                &self.device_posture,
                ExprKind::DevicePosture,
            ),
        ] {
            if let Some(text) = text {
                let parsed = expr::parse(text, kind)
                    .map_err(|e| PolicyError::invalid(format!("{path}.{field}"), e.to_string()))?;
                parts.push(parsed);
            }
        }
        parts.retain(|e| *e != Expr::True);
        Ok(Expr::all(parts))
    }
}

impl FileJson {
    fn validate(self) -> Result<PolicySet, PolicyError> {
        if self.egress_pools.len() > MAX_POOLS {
            return Err(PolicyError::invalid(
                "egress_pools",
                format!(
                    "{} pools, at most {MAX_POOLS} are supported",
                    self.egress_pools.len()
                ),
            ));
        }
        let mut pools = Vec::with_capacity(self.egress_pools.len());
        for (name, pool) in self.egress_pools {
            let path = format!("egress_pools.{name}");
            check_name(&path, &name, "pool")?;
            if name == "default" || name == "bypass" {
                return Err(PolicyError::invalid(
                    path,
                    format!("pool name {name:?} is reserved for the built-in action"),
                ));
            }
            if pool.ipv4.is_empty() && pool.ipv6.is_none() {
                return Err(PolicyError::invalid(
                    path,
                    "a pool needs at least one address (ipv4 or ipv6)",
                ));
            }
            if pool.ipv4.len() > MAX_POOL_V4 {
                return Err(PolicyError::invalid(
                    format!("{path}.ipv4"),
                    format!(
                        "{} addresses, at most {MAX_POOL_V4} per pool",
                        pool.ipv4.len()
                    ),
                ));
            }
            for (i, addr) in pool.ipv4.iter().enumerate() {
                let at = format!("{path}.ipv4[{i}]");
                check_unicast(&at, *addr)?;
                if pool.ipv4[..i].contains(addr) {
                    return Err(PolicyError::invalid(at, format!("{addr} is listed twice")));
                }
            }
            let ipv6 = match pool.ipv6 {
                None => None,
                Some(Cidr(IpNet::V6(net))) => Some(net),
                Some(Cidr(IpNet::V4(net))) => {
                    return Err(PolicyError::invalid(
                        format!("{path}.ipv6"),
                        format!("{net} is not an IPv6 prefix"),
                    ));
                }
            };
            if let Some(interface) = &pool.interface {
                check_interface(&format!("{path}.interface"), interface)?;
            }
            pools.push(Pool {
                name,
                ipv4: pool.ipv4,
                ipv6,
                mode: match pool.mode {
                    ModeJson::Failover => PoolMode::Failover,
                    ModeJson::Spread => PoolMode::Spread,
                },
                when_down: match pool.when_down {
                    WhenDownJson::Drop => WhenDown::Drop,
                    WhenDownJson::Default => WhenDown::Default,
                },
                interface: pool.interface,
            });
        }

        check_unicast("default_egress.ipv4", self.default_egress.ipv4)?;
        let default_egress = DefaultEgress {
            ipv4: self.default_egress.ipv4,
            ipv6: self.default_egress.ipv6,
        };

        if self.policies.len() > MAX_POLICIES {
            return Err(PolicyError::invalid(
                "policies",
                format!(
                    "{} policies, at most {MAX_POLICIES} are supported",
                    self.policies.len()
                ),
            ));
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut policies = Vec::with_capacity(self.policies.len());
        for (i, policy) in self.policies.iter().enumerate() {
            let path = format!("policies[{i}]");
            check_name(&format!("{path}.name"), &policy.name, "policy")?;
            if let Some(first) = names.insert(&policy.name, i) {
                return Err(PolicyError::invalid(
                    format!("{path}.name"),
                    format!(
                        "duplicate policy name {:?} (first used by policies[{first}])",
                        policy.name
                    ),
                ));
            }
            let egress = match policy.action.egress.as_str() {
                "default" => Egress::Default,
                "bypass" => Egress::Bypass,
                name => Egress::Pool(pools.iter().position(|p| p.name == name).ok_or_else(|| {
                    let known: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
                    PolicyError::invalid(
                        format!("{path}.action.egress"),
                        format!(
                            "unknown egress pool {name:?} (expected \"default\", \"bypass\"{}{})",
                            if known.is_empty() { "" } else { " or one of " },
                            known.join(", ")
                        ),
                    )
                })?),
            };
            let matcher = policy.matcher(&path)?;
            let rules = dnf::normalize(&matcher)
                .map_err(|e| PolicyError::invalid(path.clone(), e.to_string()))?;
            policies.push(Policy {
                name: policy.name.clone(),
                description: policy.description.clone(),
                enabled: policy.enabled,
                matcher,
                rules,
                action: Action {
                    egress,
                    mark: policy.action.mark,
                },
            });
        }
        let enabled_rules: usize = policies
            .iter()
            .filter(|p| p.enabled)
            .map(|p| p.rules.len())
            .sum();
        if enabled_rules > MAX_POLICIES {
            return Err(PolicyError::invalid(
                "policies",
                format!(
                    "the enabled policies expand to {enabled_rules} classifier rules (one per alternative of an `or` across fields), at most {MAX_POLICIES} are supported"
                ),
            ));
        }
        let mut nat = Nat::default();
        match self.nat.port_range {
            None => {}
            Some(range) if range.first == 0 => {
                return Err(PolicyError::invalid(
                    "nat.port_range",
                    "port 0 cannot be a translated source port; start at 1 or above",
                ));
            }
            Some(range) => nat.port_range = range,
        }
        if let Some(max_flows) = self.nat.max_flows {
            if !(1024..=(1 << 26)).contains(&max_flows) {
                return Err(PolicyError::invalid(
                    "nat.max_flows",
                    format!("{max_flows} is outside 1024-{}", 1u32 << 26),
                ));
            }
            nat.max_flows = max_flows;
        }
        let mut timeouts = Timeouts::default();
        for (field, value, slot) in [
            (
                "tcp_established",
                self.timeouts.tcp_established,
                &mut timeouts.tcp_established,
            ),
            (
                "tcp_transitory",
                self.timeouts.tcp_transitory,
                &mut timeouts.tcp_transitory,
            ),
            (
                "tcp_closed",
                self.timeouts.tcp_closed,
                &mut timeouts.tcp_closed,
            ),
            ("udp", self.timeouts.udp, &mut timeouts.udp),
            ("icmp", self.timeouts.icmp, &mut timeouts.icmp),
        ] {
            if let Some(Seconds(d)) = value {
                if d < std::time::Duration::from_secs(1)
                    || d > std::time::Duration::from_secs(7 * 86400)
                {
                    return Err(PolicyError::invalid(
                        format!("timeouts.{field}"),
                        format!("{} is outside 1s-7days", humantime::format_duration(d)),
                    ));
                }
                *slot = d;
            }
        }

        let health = self.health.validate()?;

        Ok(PolicySet {
            pools,
            default_egress,
            policies,
            nat,
            timeouts,
            health,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../examples/policies.json");

    /// The example with one substring replaced; the replacement must apply.
    fn edited(from: &str, to: &str) -> String {
        assert!(EXAMPLE.contains(from), "test edit {from:?} must apply");
        EXAMPLE.replacen(from, to, 1)
    }

    fn error(text: &str) -> String {
        parse(text).expect_err("input must be rejected").to_string()
    }

    #[test]
    fn parse_example_every_field_understood() {
        let set = parse(EXAMPLE).unwrap();
        assert_eq!(set.pools.len(), 1);
        assert_eq!(
            set.pools[0].ipv4,
            vec![
                Ipv4Addr::new(203, 0, 113, 10),
                Ipv4Addr::new(203, 0, 113, 11)
            ]
        );
        assert_eq!(set.pools[0].ipv6.unwrap().to_string(), "2001:db8:e0::/64");
        assert_eq!(set.default_egress.ipv4, Ipv4Addr::new(203, 0, 113, 1));
        assert_eq!(set.policies.len(), 3);
        let p = &set.policies[0];
        assert_eq!(
            p.matcher,
            Expr::And(vec![
                Expr::Atom(Atom::DstIp(vec!["192.0.2.0/24".parse().unwrap()])),
                Expr::Atom(Atom::Protocol(vec![Protocol::Tcp, Protocol::Udp])),
                Expr::Atom(Atom::DstPort(vec![
                    PortRange {
                        first: 443,
                        last: 443
                    },
                    PortRange {
                        first: 8000,
                        last: 8100
                    }
                ])),
            ]),
            "the selector's fields are ANDed"
        );
        assert_eq!(p.rules.len(), 1, "a selector object is one classifier rule");
        assert_eq!(
            set.policies[2].matcher,
            Expr::True,
            "an empty selector matches every flow"
        );
        assert_eq!(p.action.egress, Egress::Pool(0));
        assert_eq!(set.policies[1].action.egress, Egress::Bypass);
        assert_eq!(set.policies[2].action.egress, Egress::Default);
        assert!(
            set.policies.iter().all(|p| p.enabled),
            "enabled defaults to true"
        );
        assert_eq!(set.nat, Nat::default());
    }

    #[test]
    fn parse_bad_cidr_names_path_and_value() {
        let err = error(&edited("\"10.0.0.0/8\"", "\"10.0.0.0/33\""));
        assert!(
            err.starts_with(
                "policies[1].selector.dst[0]: invalid CIDR \"10.0.0.0/33\": prefix length 33 is more than 32"
            ),
            "{err}"
        );
    }

    #[test]
    fn parse_host_bits_set_rejected_with_network() {
        let err = error(&edited("\"10.0.0.0/8\"", "\"10.1.2.3/8\""));
        assert!(
            err.starts_with("policies[1].selector.dst[0]: invalid CIDR \"10.1.2.3/8\": host bits are set (the network is 10.0.0.0/8)"),
            "{err}"
        );
    }

    #[test]
    fn parse_bare_address_is_host_prefix() {
        let set = parse(&edited("\"10.0.0.0/8\"", "\"10.1.2.3\"")).unwrap();
        assert_eq!(
            set.policies[1].matcher,
            Expr::Atom(Atom::DstIp(vec!["10.1.2.3/32".parse().unwrap()]))
        );
    }

    #[test]
    fn parse_port_out_of_range_named() {
        let err = error(&edited("\"443\"", "\"70000\""));
        assert!(
            err.starts_with("policies[0].selector.dst_ports[0]: invalid port \"70000\": 70000 is outside 0-65535"),
            "{err}"
        );
        let err = error(&edited("\"443\"", "70000"));
        assert!(
            err.starts_with("policies[0].selector.dst_ports[0]: invalid port 70000"),
            "{err}"
        );
    }

    #[test]
    fn parse_reversed_port_range_named() {
        let err = error(&edited("\"8000-8100\"", "\"8100-8000\""));
        assert!(
            err.starts_with("policies[0].selector.dst_ports[1]: invalid port range \"8100-8000\": 8100 is after 8000"),
            "{err}"
        );
    }

    #[test]
    fn parse_numeric_port_accepted() {
        let set = parse(&edited("\"443\"", "443")).unwrap();
        let Expr::And(atoms) = &set.policies[0].matcher else {
            panic!("the selector is a conjunction");
        };
        assert_eq!(
            atoms[2],
            Expr::Atom(Atom::DstPort(vec![
                PortRange {
                    first: 443,
                    last: 443
                },
                PortRange {
                    first: 8000,
                    last: 8100
                }
            ]))
        );
    }

    #[test]
    fn parse_unknown_pool_lists_known_ones() {
        let err = error(&edited(
            "\"egress\": \"pt-montijo\"",
            "\"egress\": \"pt-lisbon\"",
        ));
        assert_eq!(
            err,
            "policies[0].action.egress: unknown egress pool \"pt-lisbon\" (expected \"default\", \"bypass\" or one of pt-montijo)"
        );
    }

    #[test]
    fn parse_unknown_field_named_with_path() {
        let err = error(&edited("\"protocols\"", "\"protocol\""));
        assert!(
            err.starts_with("policies[0].selector.protocol: unknown field `protocol`"),
            "{err}"
        );
        let err = error(&edited("\"policies\"", "\"colour\": 1, \"policies\""));
        assert!(err.starts_with("colour: unknown field `colour`"), "{err}");
    }

    #[test]
    fn parse_empty_top_level_key_named_top_level() {
        // Found by the policy_file fuzz target: the key "" made the path empty.
        let err = error(&edited("\"policies\"", "\"\": 1, \"policies\""));
        assert!(
            err.starts_with("(top level): unknown field ``"),
            "the rejection names a place: {err}"
        );
    }

    #[test]
    fn parse_duplicate_policy_name_points_at_both() {
        let err = error(&edited("\"lab internal\"", "\"catch-all\""));
        assert_eq!(
            err,
            "policies[2].name: duplicate policy name \"catch-all\" (first used by policies[1])"
        );
    }

    #[test]
    fn parse_duplicate_pool_rejected() {
        let err = error(&edited(
            "\"pt-montijo\": {",
            "\"pt-montijo\": { \"ipv4\": [\"203.0.113.20\"] }, \"pt-montijo\": {",
        ));
        assert!(
            err.contains("pool \"pt-montijo\" is defined twice"),
            "{err}"
        );
        assert!(err.starts_with("egress_pools"), "{err}");
    }

    #[test]
    fn parse_not_json_is_a_syntax_error() {
        assert_eq!(
            error("policies: []"),
            "not valid JSON: expected value at line 1 column 1"
        );
        assert_eq!(error(""), "not valid JSON: the file is empty");
        assert!(error("{\"policies\": [").starts_with("not valid JSON: EOF while parsing"));
        assert_eq!(
            error("[]"),
            "(top level): expected a JSON object with egress_pools, default_egress and policies"
        );
        assert!(
            error(&format!("{EXAMPLE} {{}}")).starts_with("not valid JSON: trailing characters")
        );
    }

    #[test]
    fn parse_unknown_protocol_named() {
        let err = error(&edited("\"tcp\", \"udp\"", "\"tcp\", \"sctp\""));
        assert!(
            err.starts_with("policies[0].selector.protocols[1]: unknown protocol \"sctp\": expected tcp, udp, icmp or icmpv6"),
            "{err}"
        );
    }

    #[test]
    fn parse_ports_with_portless_protocols_rejected() {
        let err = error(&edited("\"tcp\", \"udp\"", "\"icmp\""));
        assert_eq!(
            err,
            "policies[0].selector.dst_ports: ports only apply to tcp and udp, but protocols is [icmp]"
        );
    }

    #[test]
    fn parse_bad_egress_addresses_rejected() {
        let err = error(&edited("\"203.0.113.11\"", "\"203.0.113.10\""));
        assert_eq!(
            err,
            "egress_pools.pt-montijo.ipv4[1]: 203.0.113.10 is listed twice"
        );
        let err = error(&edited(
            "\"ipv4\": \"203.0.113.1\"",
            "\"ipv4\": \"0.0.0.0\"",
        ));
        assert_eq!(
            err,
            "default_egress.ipv4: 0.0.0.0 cannot be an egress address (not a unicast host address)"
        );
        let err = error(&edited("\"2001:db8:e0::/64\"", "\"192.0.2.0/24\""));
        assert_eq!(
            err,
            "egress_pools.pt-montijo.ipv6: 192.0.2.0/24 is not an IPv6 prefix"
        );
        let err = error(&edited("\"pt-montijo\": {", "\"default\": {"));
        assert!(
            err.starts_with("egress_pools.default: pool name \"default\" is reserved"),
            "{err}"
        );
    }

    #[test]
    fn parse_missing_required_fields_named() {
        let err = error(&edited(
            "\"action\": { \"egress\": \"bypass\" }",
            "\"act\": 1",
        ));
        assert!(err.starts_with("policies[1]"), "{err}");
        assert!(
            err.contains("unknown field `act`") || err.contains("missing field `action`"),
            "{err}"
        );
        let err = error(r#"{ "default_egress": { "ipv4": "203.0.113.1" } }"#);
        assert!(
            err.starts_with("(top level): missing field `policies`"),
            "{err}"
        );
    }

    #[test]
    fn parse_nat_port_range_validated() {
        let set = parse(&edited(
            "\"policies\"",
            "\"nat\": { \"port_range\": \"20000-29999\" }, \"policies\"",
        ))
        .unwrap();
        assert_eq!(
            set.nat.port_range,
            PortRange {
                first: 20000,
                last: 29999
            }
        );
        let err = error(&edited(
            "\"policies\"",
            "\"nat\": { \"port_range\": \"0-100\" }, \"policies\"",
        ));
        assert!(
            err.starts_with("nat.port_range: port 0 cannot be a translated source port"),
            "{err}"
        );
    }

    #[test]
    fn parse_too_many_policies_rejected() {
        let one = r#"{ "name": "p", "selector": {}, "action": { "egress": "default" } }"#;
        let many: Vec<String> = (0..=MAX_POLICIES)
            .map(|i| one.replace("\"p\"", &format!("\"p{i}\"")))
            .collect();
        let text = format!(
            r#"{{ "default_egress": {{ "ipv4": "203.0.113.1" }}, "policies": [{}] }}"#,
            many.join(",")
        );
        assert_eq!(
            error(&text),
            "policies: 4097 policies, at most 4096 are supported"
        );
    }

    fn one_policy(policy: &str) -> String {
        format!(
            r#"{{ "egress_pools": {{ "pt": {{ "ipv4": ["203.0.113.10"] }} }},
                 "default_egress": {{ "ipv4": "203.0.113.1" }},
                 "policies": [ {policy} ] }}"#
        )
    }

    #[test]
    fn parse_expressions_anded_with_selector() {
        let set = parse(&one_policy(
            r#"{ "name": "f", "selector": { "protocols": ["tcp"] },
                 "traffic": "net.dst.ip in {192.0.2.0/24}",
                 "identity": "any(identity.groups[*].name in {\"finance\"})",
                 "device_posture": "any(device_posture.checks.passed[*] in {\"compliant\"})",
                 "action": { "egress": "pt" } }"#,
        ))
        .unwrap();
        let p = &set.policies[0];
        assert_eq!(
            p.matcher,
            Expr::And(vec![
                Expr::Atom(Atom::Protocol(vec![Protocol::Tcp])),
                Expr::Atom(Atom::DstIp(vec!["192.0.2.0/24".parse().unwrap()])),
                Expr::Atom(Atom::Group(vec!["finance".into()])),
                Expr::Atom(Atom::Posture(vec!["compliant".into()])),
            ]),
            "selector and the three expressions are ANDed, in that order"
        );
        assert!(p.requires_identity(), "a group condition needs an identity");
        assert_eq!(p.rules.len(), 1);
    }

    #[test]
    fn parse_expression_error_names_field_line_and_column() {
        let err = error(&one_policy(
            r#"{ "name": "f", "traffic": "net.dst.ip in {192.0.2.0/24} and\nnet.dst.prot == 443", "action": { "egress": "pt" } }"#,
        ));
        assert!(err.starts_with("policies[0].traffic: 2:1: "), "{err}");
        assert!(
            err.contains("net.dst.prot"),
            "the unknown field is named: {err}"
        );
    }

    #[test]
    fn parse_expression_field_of_other_kind_rejected() {
        let err = error(&one_policy(
            r#"{ "name": "f", "traffic": "identity.email == \"a@example.com\"", "action": { "egress": "pt" } }"#,
        ));
        assert!(err.starts_with("policies[0].traffic: 1:1: "), "{err}");
        assert!(
            err.contains("\"identity\""),
            "says where the field belongs: {err}"
        );
    }

    #[test]
    fn parse_cross_dimension_or_becomes_alternatives() {
        let set = parse(&one_policy(
            r#"{ "name": "f", "traffic": "net.protocol == \"udp\" or net.src.ip in {10.1.0.0/16}", "action": { "egress": "pt" } }"#,
        ))
        .unwrap();
        assert_eq!(set.policies[0].rules.len(), 2, "one rule per alternative");
    }

    #[test]
    fn parse_too_many_alternatives_rejected_with_path() {
        let alternatives: Vec<String> = (0..7)
            .map(|i| format!("(net.dst.ip in {{10.{i}.0.0/16}} or net.protocol == \\\"tcp\\\")"))
            .collect();
        let err = error(&one_policy(&format!(
            r#"{{ "name": "f", "traffic": "{}", "action": {{ "egress": "pt" }} }}"#,
            alternatives.join(" and ")
        )));
        assert!(
            err.starts_with("policies[0]: the condition expands to more than 64 alternatives"),
            "{err}"
        );
    }

    #[test]
    fn parse_selector_identity_and_geo_fields() {
        let set = parse(&one_policy(
            r#"{ "name": "f", "selector": {
                   "src": ["10.0.0.0/8"], "not_src": ["10.9.0.0/16"], "not_dst": ["192.0.2.0/24"],
                   "users": ["Alice@Example.com"], "groups": ["finance"], "posture": ["compliant"],
                   "dst_countries": ["pt", "IN"], "dst_continents": ["eu"] },
                 "action": { "egress": "pt" } }"#,
        ))
        .unwrap();
        let Expr::And(atoms) = &set.policies[0].matcher else {
            panic!("a selector is a conjunction");
        };
        let not = |a: Atom| Expr::Not(Box::new(Expr::Atom(a)));
        assert_eq!(
            atoms,
            &vec![
                Expr::Atom(Atom::SrcIp(vec!["10.0.0.0/8".parse().unwrap()])),
                not(Atom::SrcIp(vec!["10.9.0.0/16".parse().unwrap()])),
                not(Atom::DstIp(vec!["192.0.2.0/24".parse().unwrap()])),
                Expr::Atom(Atom::User(vec!["alice@example.com".into()])),
                Expr::Atom(Atom::Group(vec!["finance".into()])),
                Expr::Atom(Atom::Posture(vec!["compliant".into()])),
                Expr::Atom(Atom::Country(vec![
                    CountryCode(*b"PT"),
                    CountryCode(*b"IN")
                ])),
                Expr::Atom(Atom::Continent(vec![Continent::Eu])),
            ],
            "every selector field becomes its condition, exclusions negated, users lower-cased"
        );
    }

    #[test]
    fn parse_unknown_country_and_continent_named() {
        let err = error(&one_policy(
            r#"{ "name": "f", "selector": { "dst_countries": ["PT", "UK"] }, "action": { "egress": "pt" } }"#,
        ));
        assert!(
            err.starts_with("policies[0].selector.dst_countries[1]: unknown country code \"UK\": expected an ISO 3166-1 alpha-2 code (the United Kingdom is \"GB\")"),
            "{err}"
        );
        let err = error(&one_policy(
            r#"{ "name": "f", "selector": { "dst_continents": ["EUR"] }, "action": { "egress": "pt" } }"#,
        ));
        assert!(
            err.starts_with("policies[0].selector.dst_continents[0]: unknown continent \"EUR\""),
            "{err}"
        );
    }

    #[test]
    fn parse_policy_without_condition_rejected() {
        let err = error(&one_policy(
            r#"{ "name": "f", "action": { "egress": "pt" } }"#,
        ));
        assert!(
            err.starts_with("policies[0]: a policy needs a \"selector\" or an expression"),
            "{err}"
        );
    }

    #[test]
    fn parse_rule_budget_counts_alternatives_of_enabled_policies() {
        let one = r#"{ "name": "pN", "traffic": "net.protocol == \"udp\" or net.src.ip in {10.1.0.0/16}", "action": { "egress": "pt" } }"#;
        let policies: Vec<String> = (0..2049)
            .map(|i| one.replace("pN", &format!("p{i}")))
            .collect();
        let err = error(&one_policy(&policies.join(",")));
        assert_eq!(
            err,
            "policies: the enabled policies expand to 4098 classifier rules (one per alternative of an `or` across fields), at most 4096 are supported"
        );
        let disabled = policies[0].replacen("\"name\"", "\"enabled\": false, \"name\"", 1);
        let within = [vec![disabled], policies[1..].to_vec()].concat();
        assert!(
            parse(&one_policy(&within.join(","))).is_ok(),
            "disabled policies use no rules"
        );
    }

    #[test]
    fn parse_pool_mode_and_when_down() {
        let set = parse(&edited(
            "\"ipv6\": \"2001:db8:e0::/64\" }",
            "\"ipv6\": \"2001:db8:e0::/64\", \"mode\": \"spread\", \"when_down\": \"default\" }",
        ))
        .unwrap();
        assert_eq!(set.pools[0].mode, PoolMode::Spread);
        assert_eq!(set.pools[0].when_down, WhenDown::Default);
        assert_eq!(
            parse(EXAMPLE).unwrap().pools[0].when_down,
            WhenDown::Drop,
            "fail closed by default"
        );
        let err = error(&edited(
            "\"ipv6\": \"2001:db8:e0::/64\" }",
            "\"ipv6\": \"2001:db8:e0::/64\", \"mode\": \"random\" }",
        ));
        assert!(
            err.starts_with("egress_pools.pt-montijo.mode: unknown variant `random`"),
            "{err}"
        );
    }

    #[test]
    fn parse_pool_interface_optional_name_checked() {
        assert_eq!(
            parse(EXAMPLE).unwrap().pools[0].interface,
            None,
            "without an interface, flows leave from whichever uplink routing chooses"
        );
        let set = parse(&edited(
            "\"ipv6\": \"2001:db8:e0::/64\" }",
            "\"ipv6\": \"2001:db8:e0::/64\", \"interface\": \"up1\" }",
        ))
        .unwrap();
        assert_eq!(set.pools[0].interface.as_deref(), Some("up1"));
        for bad in ["", "a-name-of-16-byte", "eth 0", "a/b", ".."] {
            let err = error(&edited(
                "\"ipv6\": \"2001:db8:e0::/64\" }",
                &format!("\"ipv6\": \"2001:db8:e0::/64\", \"interface\": {bad:?} }}"),
            ));
            assert!(
                err.starts_with("egress_pools.pt-montijo.interface: interface name"),
                "{bad:?} must be rejected with the field's path: {err}"
            );
        }
    }

    #[test]
    fn parse_timeouts_seconds_or_text_and_bounds() {
        let set = parse(&edited(
            "\"policies\"",
            "\"timeouts\": { \"udp\": 30, \"tcp_established\": \"1h30m\" }, \"policies\"",
        ))
        .unwrap();
        assert_eq!(set.timeouts.udp, std::time::Duration::from_secs(30));
        assert_eq!(
            set.timeouts.tcp_established,
            std::time::Duration::from_secs(5400)
        );
        assert_eq!(
            set.timeouts.icmp,
            Timeouts::default().icmp,
            "unset timeouts keep their defaults"
        );
        let err = error(&edited(
            "\"policies\"",
            "\"timeouts\": { \"udp\": \"soon\" }, \"policies\"",
        ));
        assert!(
            err.starts_with("timeouts.udp: invalid duration \"soon\""),
            "{err}"
        );
        let err = error(&edited(
            "\"policies\"",
            "\"timeouts\": { \"icmp\": 0 }, \"policies\"",
        ));
        assert_eq!(err, "timeouts.icmp: 0s is outside 1s-7days");
    }

    #[test]
    fn parse_health_checks_validated() {
        let set = parse(&edited(
            "\"policies\"",
            "\"health\": { \"probe\": \"198.51.100.1:443\", \"interval\": \"500ms\", \"fall\": 3 }, \"policies\"",
        ))
        .unwrap();
        assert_eq!(
            set.health.check,
            HealthCheck::Probe("198.51.100.1:443".parse().unwrap())
        );
        assert_eq!(set.health.interval, std::time::Duration::from_millis(500));
        assert_eq!(set.health.fall, 3);
        let set = parse(&edited(
            "\"policies\"",
            "\"health\": { \"check\": \"none\" }, \"policies\"",
        ))
        .unwrap();
        assert_eq!(set.health.check, HealthCheck::None);
        let err = error(&edited(
            "\"policies\"",
            "\"health\": { \"check\": \"probe\" }, \"policies\"",
        ));
        assert_eq!(
            err,
            "health.probe: check \"probe\" needs a probe target (address:port)"
        );
        let err = error(&edited(
            "\"policies\"",
            "\"health\": { \"probe\": \"198.51.100.1\" }, \"policies\"",
        ));
        assert!(
            err.starts_with("health.probe: \"198.51.100.1\" is not an address:port"),
            "{err}"
        );
        let err = error(&edited(
            "\"policies\"",
            "\"health\": { \"rise\": 0 }, \"policies\"",
        ));
        assert_eq!(err, "health.rise: 0 is outside 1-10");
    }

    #[test]
    fn parse_nat_max_flows_bounds() {
        let set = parse(&edited(
            "\"policies\"",
            "\"nat\": { \"max_flows\": 65536 }, \"policies\"",
        ))
        .unwrap();
        assert_eq!(set.nat.max_flows, 65536);
        let err = error(&edited(
            "\"policies\"",
            "\"nat\": { \"max_flows\": 10 }, \"policies\"",
        ));
        assert_eq!(err, "nat.max_flows: 10 is outside 1024-67108864");
    }
}
