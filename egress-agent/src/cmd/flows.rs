//! `egress-agent flows`: the flows of the pinned connection tables with
//! their policy, egress address and user, as a table or JSON.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};
use egress_common::conntrack::{CT_F_LOCAL, CT_F_PASS};
use hyper::Method;
use ipnet::IpNet;
use serde::Serialize;

use super::table;
use crate::{
    cli::FlowsArgs,
    client::Client,
    conntrack::{self, Flow},
    identity::SessionView,
    inspect::Pinned,
    policy::model::Protocol,
};

/// How long to wait for the agent's sessions: a stopped agent does not
/// answer at all, a running one at once.
const SESSIONS_TIMEOUT: Duration = Duration::from_secs(5);

/// A flow's tuple, shaped as the flow log's (ICMP echo: the identifier is
/// the port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
struct Tuple {
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
}

impl Tuple {
    fn source(&self) -> SocketAddr {
        SocketAddr::new(self.src, self.sport)
    }

    fn destination(&self) -> SocketAddr {
        SocketAddr::new(self.dst, self.dport)
    }
}

/// A flow as listed.
#[derive(Clone, Debug, PartialEq, Serialize)]
struct FlowView {
    protocol: String,
    original: Tuple,
    /// The tuple on the uplink (the original one for bypassed flows).
    translated: Tuple,
    /// `translated`, `bypass` (a bypass policy) or `local` (the gateway's own).
    kind: &'static str,
    /// `None`: no policy matched, or the slot's policy is no longer known.
    policy: Option<String>,
    /// The egress address (or IPv6 range) counter the flow counts in.
    egress: Option<String>,
    /// Identity id of the source when the flow was classified (absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<u32>,
    /// The user of the session holding the source address (`None`: no
    /// session, or the agent is not answering).
    user: Option<String>,
    age_secs: f64,
    idle_secs: f64,
    packets_out: u64,
    bytes_out: u64,
    packets_in: u64,
    bytes_in: u64,
}

/// Which user holds each source address: exact addresses hashed, prefixes
/// scanned (sessions hold few).
#[derive(Default)]
struct Owners {
    hosts: HashMap<IpAddr, String>,
    prefixes: Vec<(IpNet, String)>,
}

impl Owners {
    fn new(sessions: Vec<SessionView>) -> Self {
        let mut owners = Self::default();
        for s in sessions {
            for claim in &s.spec.addresses {
                let net = claim.0;
                if net.prefix_len() == net.max_prefix_len() {
                    owners.hosts.insert(net.addr(), s.spec.user.clone());
                } else {
                    owners.prefixes.push((net, s.spec.user.clone()));
                }
            }
        }
        owners
    }

    fn user(&self, addr: IpAddr) -> Option<&str> {
        self.hosts.get(&addr).map(String::as_str).or_else(|| {
            self.prefixes
                .iter()
                .find(|(net, _)| net.contains(&addr))
                .map(|(_, user)| user.as_str())
        })
    }
}

pub async fn flows(args: FlowsArgs) -> anyhow::Result<()> {
    let FlowsArgs {
        pin,
        api,
        user,
        egress,
        json,
    } = args;
    let pinned = Pinned::new(&pin.pin_path);
    let flows = pinned.flows().context("reading the connection tables")?;
    let policies = pinned.policy_names()?;
    let addresses = pinned.addr_names()?;
    let owners = match sessions(&api.api).await {
        Ok(sessions) => Some(Owners::new(sessions)),
        Err(e) if user.is_some() => {
            bail!("--user needs the running agent's sessions: {e:#}")
        }
        Err(e) => {
            eprintln!("egress-agent: users are not shown: {e:#}");
            None
        }
    };
    let now = conntrack::now_ns();
    let mut views: Vec<FlowView> = flows
        .iter()
        .filter(|f| egress.is_none_or(|e| f.flags & CT_F_PASS == 0 && f.nat_addr == e))
        .map(|f| {
            let owner = owners.as_ref().and_then(|o| o.user(f.src));
            view(f, now, &policies, &addresses, owner)
        })
        .filter(|v| {
            user.as_deref()
                .is_none_or(|u| v.user.as_deref().is_some_and(|v| v.eq_ignore_ascii_case(u)))
        })
        .collect();
    views.sort_by_key(|v| (v.original.source(), v.original.destination()));
    if json {
        println!("{}", serde_json::to_string_pretty(&views)?);
    } else {
        print!("{}", render(&views));
    }
    Ok(())
}

/// The running agent's sessions.
async fn sessions(api: &Path) -> anyhow::Result<Vec<SessionView>> {
    let reply = Client::new(api)
        .with_timeout(SESSIONS_TIMEOUT)
        .call(Method::GET, "/v1/sessions", None)
        .await?;
    serde_json::from_value(reply).context("the agent's session list")
}

/// A flow as listed; `policies` and `addresses` name the counter slots.
fn view(
    f: &Flow,
    now_ns: u64,
    policies: &[Option<String>],
    addresses: &[Option<String>],
    user: Option<&str>,
) -> FlowView {
    let name = |names: &[Option<String>], slot: usize| names.get(slot).cloned().flatten();
    let secs = |since: u64| Duration::from_nanos(now_ns.saturating_sub(since)).as_secs_f64();
    FlowView {
        protocol: Protocol::from_number(f.protocol)
            .map_or_else(|| f.protocol.to_string(), |p| p.name().to_owned()),
        original: Tuple {
            src: f.src,
            sport: f.sport,
            dst: f.dst,
            dport: f.dport,
        },
        translated: Tuple {
            src: f.nat_addr,
            sport: f.nat_port,
            dst: f.dst,
            dport: f.dport,
        },
        kind: if f.flags & CT_F_LOCAL != 0 {
            "local"
        } else if f.flags & CT_F_PASS != 0 {
            "bypass"
        } else {
            "translated"
        },
        policy: name(policies, f.stats_slot as usize),
        // Slot 0 counts untranslated flows: no egress address.
        egress: (f.addr_slot != 0)
            .then(|| name(addresses, usize::from(f.addr_slot)))
            .flatten(),
        identity: (f.identity != 0).then_some(f.identity),
        user: user.map(str::to_owned),
        age_secs: secs(f.created_ns),
        idle_secs: secs(f.last_seen_ns),
        packets_out: f.traffic.packets_out,
        bytes_out: f.traffic.bytes_out,
        packets_in: f.traffic.packets_in,
        bytes_in: f.traffic.bytes_in,
    }
}

/// Whole seconds, as `1h 2m 3s`.
fn age(secs: f64) -> String {
    humantime::format_duration(Duration::from_secs(secs as u64)).to_string()
}

fn render(views: &[FlowView]) -> String {
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            vec![
                v.protocol.clone(),
                format!("{} -> {}", v.original.source(), v.original.destination()),
                match v.kind {
                    "translated" => v.translated.source().to_string(),
                    kind => kind.to_owned(),
                },
                v.policy.clone().unwrap_or_default(),
                v.user.clone().unwrap_or_default(),
                age(v.age_secs),
                format!("{}/{}", v.packets_out, v.packets_in),
                format!("{}/{}", v.bytes_out, v.bytes_in),
            ]
        })
        .collect();
    table::render(
        &[
            "PROTO",
            "ORIGINAL",
            "TRANSLATED",
            "POLICY",
            "USER",
            "AGE",
            "PACKETS OUT/IN",
            "BYTES OUT/IN",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use egress_common::{flow::proto, stats::Traffic};

    use super::*;

    fn flow() -> Flow {
        Flow {
            protocol: proto::TCP,
            src: "10.10.0.2".parse().unwrap(),
            sport: 40000,
            dst: "192.0.2.10".parse().unwrap(),
            dport: 443,
            nat_addr: "203.0.113.10".parse().unwrap(),
            nat_port: 40001,
            flags: 0,
            policy: 0,
            stats_slot: 2,
            addr_slot: 1,
            identity: 7,
            created_ns: 1_000_000_000,
            last_seen_ns: 4_000_000_000,
            traffic: Traffic {
                packets_out: 3,
                bytes_out: 300,
                packets_in: 2,
                bytes_in: 200,
            },
        }
    }

    #[test]
    fn flows_view_names_policy_egress_and_times() {
        let policies = vec![None, None, Some("to partner".to_owned())];
        let addresses = vec![None, Some("203.0.113.10".to_owned())];
        let v = view(
            &flow(),
            5_500_000_000,
            &policies,
            &addresses,
            Some("ana@example.com"),
        );
        assert_eq!(v.translated.source().to_string(), "203.0.113.10:40001");
        assert_eq!(v.original.destination().to_string(), "192.0.2.10:443");
        assert_eq!(v.identity, Some(7));
        assert_eq!(
            serde_json::to_value(&v).unwrap()["original"],
            serde_json::json!({"src": "10.10.0.2", "sport": 40000, "dst": "192.0.2.10", "dport": 443}),
            "tuples are shaped as the flow log's"
        );
        assert_eq!(v.policy.as_deref(), Some("to partner"));
        assert_eq!(v.egress.as_deref(), Some("203.0.113.10"));
        assert_eq!(v.kind, "translated");
        assert_eq!((v.age_secs, v.idle_secs), (4.5, 1.5));
        let out = render(&[v]);
        assert_eq!(
            out.lines().nth(1).unwrap(),
            "tcp    10.10.0.2:40000 -> 192.0.2.10:443  203.0.113.10:40001  to partner  ana@example.com  4s   3/2             300/200"
        );
    }

    #[test]
    fn flows_bypass_has_no_egress_and_unknown_slot_no_policy() {
        let f = Flow {
            flags: CT_F_PASS,
            addr_slot: 0,
            stats_slot: 9,
            ..flow()
        };
        let v = view(&f, 0, &[], &[None, Some("x".into())], None);
        assert_eq!(v.kind, "bypass");
        assert_eq!(v.egress, None, "slot 0 counts untranslated flows");
        assert_eq!(v.policy, None, "a slot with no name has no policy");
        assert_eq!(v.age_secs, 0.0, "a clock before creation is age 0");
    }

    #[test]
    fn flows_owners_match_hosts_and_prefixes() {
        let session = |user: &str, addrs: &[&str]| -> SessionView {
            serde_json::from_value(serde_json::json!({
                "id": user, "user": user, "addresses": addrs, "origin": "api"
            }))
            .unwrap()
        };
        let owners = Owners::new(vec![
            session("ana", &["10.10.0.2"]),
            session("bo", &["10.8.0.0/24", "fd00:10::3"]),
        ]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(owners.user(ip("10.10.0.2")), Some("ana"));
        assert_eq!(owners.user(ip("10.8.0.77")), Some("bo"));
        assert_eq!(owners.user(ip("fd00:10::3")), Some("bo"));
        assert_eq!(owners.user(ip("10.10.0.3")), None);
    }
}
