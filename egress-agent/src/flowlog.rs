//! The flow log's records: flow events decoded from the dataplane's ring
//! buffer or made from flows the agent's table walks removed, and their
//! rendering as JSON lines.
//!
//! Reading the ring buffer ([`ring`]) and writing the lines ([`sink`]) are
//! separate; naming a record's policy and user needs the running agent's
//! state, so that happens where the agent's state lives (its main task).

pub mod ring;
pub mod sink;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use egress_common::{
    events::{
        EVENT_END, EVENT_FAILED, EVENT_NEW, FlowEvent, REASON_EXPIRED, REASON_FIN, REASON_FLUSHED,
        REASON_PORT_EXHAUSTED, REASON_RST, REASON_TRANSLATED,
    },
    stats::Traffic,
};
use serde::Serialize;

use crate::{conntrack::Flow, policy::model::Protocol};

/// What happened to a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// Its first packet was translated.
    New,
    /// Its translation ended (or, for TCP, the connection is closing).
    End,
    /// Its first packet could not be translated and was dropped.
    Failed,
}

/// Why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Translated,
    /// The first TCP FIN, either way.
    Fin,
    /// The first TCP RST, either way.
    Rst,
    /// Idle past its timeout.
    Expired,
    /// Ended by the agent: its egress address went down or was removed,
    /// or a reload sent its policy's flows elsewhere.
    Flushed,
    /// No free port towards the destination.
    PortExhausted,
}

impl Event {
    fn from_code(kind: u8, reason: u8) -> Option<(Self, Reason)> {
        let reason = match reason {
            REASON_TRANSLATED => Reason::Translated,
            REASON_FIN => Reason::Fin,
            REASON_RST => Reason::Rst,
            REASON_EXPIRED => Reason::Expired,
            REASON_FLUSHED => Reason::Flushed,
            REASON_PORT_EXHAUSTED => Reason::PortExhausted,
            _ => return None,
        };
        let event = match kind {
            EVENT_NEW => Self::New,
            EVENT_END => Self::End,
            EVENT_FAILED => Self::Failed,
            _ => return None,
        };
        Some((event, reason))
    }
}

/// One flow event, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowRecord {
    /// CLOCK_MONOTONIC nanoseconds (the dataplane's clock) when it happened.
    pub time_ns: u64,
    pub event: Event,
    pub reason: Reason,
    pub protocol: u8,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    /// The egress address (translated source).
    pub nat_addr: IpAddr,
    /// The translated source port (none when the translation failed).
    pub nat_port: Option<u16>,
    /// `CT_F_*` known when it happened.
    pub flags: u16,
    /// Policy counter slot (names the policy; 0 is the implicit default).
    pub stats_slot: u32,
    /// Identity id of the source (0: none).
    pub identity: u32,
    /// Packets and bytes each way, for ends.
    pub traffic: Option<Traffic>,
}

fn ip_of(family: u8, words: [u32; 4]) -> Option<IpAddr> {
    match family {
        4 => Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(words[0])))),
        6 => {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.chunks_mut(4).zip(words) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    }
}

impl FlowRecord {
    /// Decode a dataplane event; `None` for one this agent does not know
    /// (a newer dataplane's kind, reason or family).
    pub fn from_event(ev: &FlowEvent) -> Option<Self> {
        let (event, reason) = Event::from_code(ev.kind, ev.reason)?;
        Some(Self {
            time_ns: ev.time_ns,
            event,
            reason,
            protocol: ev.proto,
            src: ip_of(ev.family, ev.src)?,
            sport: u16::from_be(ev.sport_be),
            dst: ip_of(ev.family, ev.dst)?,
            dport: u16::from_be(ev.dport_be),
            nat_addr: ip_of(ev.family, ev.nat_addr)?,
            nat_port: (event != Event::Failed).then_some(u16::from_be(ev.nat_port_be)),
            flags: ev.flags,
            stats_slot: ev.stats_slot,
            identity: ev.identity,
            traffic: (event == Event::End).then_some(Traffic {
                packets_out: ev.packets_out,
                bytes_out: ev.bytes_out,
                packets_in: ev.packets_in,
                bytes_in: ev.bytes_in,
            }),
        })
    }

    /// The end of a flow a table walk removed at `time_ns` (`reason`:
    /// expired or flushed).
    pub fn ended(flow: &Flow, reason: Reason, time_ns: u64) -> Self {
        Self {
            time_ns,
            event: Event::End,
            reason,
            protocol: flow.protocol,
            src: flow.src,
            sport: flow.sport,
            dst: flow.dst,
            dport: flow.dport,
            nat_addr: flow.nat_addr,
            nat_port: Some(flow.nat_port),
            flags: flow.flags,
            stats_slot: flow.stats_slot,
            identity: flow.identity,
            traffic: Some(flow.traffic),
        }
    }

    /// The record as one JSON line (with its newline): `time` is when it
    /// happened, `policy` and `user` what the agent knows the slot and the
    /// identity id as (`None` for the implicit default and for sources
    /// without identity).
    pub fn render(
        &self,
        time: jiff::Timestamp,
        policy: Option<&str>,
        user: Option<&str>,
    ) -> String {
        let endpoints = |src, sport| Endpoints {
            src,
            sport,
            dst: self.dst,
            dport: self.dport,
        };
        let line = Line {
            time,
            event: self.event,
            reason: self.reason,
            protocol: Protocol::from_number(self.protocol)
                .map_or_else(|| self.protocol.to_string(), |p| p.name().to_owned()),
            original: endpoints(self.src, Some(self.sport)),
            translated: endpoints(self.nat_addr, self.nat_port),
            policy,
            identity: (self.identity != 0).then_some(self.identity),
            user,
            traffic: self.traffic.as_ref().map(|t| LineTraffic {
                packets_out: t.packets_out,
                bytes_out: t.bytes_out,
                packets_in: t.packets_in,
                bytes_in: t.bytes_in,
            }),
        };
        let mut out = serde_json::to_string(&line).expect("a flow line always serializes");
        out.push('\n');
        out
    }
}

/// A tuple as a line shows it (ICMP echo: the identifier is the port).
#[derive(Serialize)]
struct Endpoints {
    src: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    sport: Option<u16>,
    dst: IpAddr,
    dport: u16,
}

#[derive(Serialize)]
struct LineTraffic {
    packets_out: u64,
    bytes_out: u64,
    packets_in: u64,
    bytes_in: u64,
}

/// One line of the flow log. `policy` is always present (null: no policy
/// matched, the implicit default); `identity` and `user` only when known.
#[derive(Serialize)]
struct Line<'a> {
    time: jiff::Timestamp,
    event: Event,
    reason: Reason,
    protocol: String,
    original: Endpoints,
    translated: Endpoints,
    policy: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    traffic: Option<LineTraffic>,
}

/// The wall-clock time of a CLOCK_MONOTONIC instant `mono_ns`, given the
/// two clocks read together now.
pub fn wall_time(mono_ns: u64, now_mono_ns: u64, now: jiff::Timestamp) -> jiff::Timestamp {
    let ago = now_mono_ns.saturating_sub(mono_ns);
    let ago = jiff::SignedDuration::from_nanos(i64::try_from(ago).unwrap_or(i64::MAX));
    now.checked_sub(ago).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use egress_common::{
        conntrack::{CT_F_FIN, CT_F_SYN},
        flow::proto,
    };
    use serde_json::{Value, json};

    use super::*;

    fn be4(ip: &str) -> [u32; 4] {
        [u32::from(ip.parse::<Ipv4Addr>().unwrap()).to_be(), 0, 0, 0]
    }

    fn new_tcp_event() -> FlowEvent {
        FlowEvent {
            time_ns: 5_000_000_000,
            src: be4("10.10.0.2"),
            dst: be4("192.0.2.10"),
            nat_addr: be4("203.0.113.10"),
            sport_be: 40001u16.to_be(),
            dport_be: 443u16.to_be(),
            nat_port_be: 40001u16.to_be(),
            flags: CT_F_SYN,
            stats_slot: 3,
            identity: 7,
            addr_slot: 1,
            kind: EVENT_NEW,
            reason: REASON_TRANSLATED,
            proto: proto::TCP,
            family: 4,
            ..FlowEvent::default()
        }
    }

    fn time() -> jiff::Timestamp {
        "2026-05-01T10:00:00Z".parse().unwrap()
    }

    fn parsed(line: &str) -> Value {
        assert!(line.ends_with('\n'), "one line, newline-terminated");
        assert_eq!(line.matches('\n').count(), 1, "exactly one line: {line:?}");
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn flowlog_new_tcp_renders_tuples_policy_and_user() {
        let record = FlowRecord::from_event(&new_tcp_event()).expect("a known event");
        let line = record.render(time(), Some("partner"), Some("ana@example.com"));
        assert_eq!(
            parsed(&line),
            json!({
                "time": "2026-05-01T10:00:00Z",
                "event": "new",
                "reason": "translated",
                "protocol": "tcp",
                "original": {"src": "10.10.0.2", "sport": 40001, "dst": "192.0.2.10", "dport": 443},
                "translated": {"src": "203.0.113.10", "sport": 40001, "dst": "192.0.2.10", "dport": 443},
                "policy": "partner",
                "identity": 7,
                "user": "ana@example.com",
            })
        );
    }

    #[test]
    fn flowlog_default_policy_without_identity_renders_null_policy_no_user() {
        let mut ev = new_tcp_event();
        ev.identity = 0;
        ev.stats_slot = 0;
        let line = FlowRecord::from_event(&ev)
            .unwrap()
            .render(time(), None, None);
        let value = parsed(&line);
        assert_eq!(value["policy"], Value::Null, "no policy matched: null");
        assert!(value.get("identity").is_none(), "no identity, no field");
        assert!(value.get("user").is_none());
        assert!(
            value.get("packets_out").is_none(),
            "a new flow has no counts"
        );
    }

    #[test]
    fn flowlog_end_ipv6_udp_renders_counts_and_reason() {
        let words = |ip: &str| {
            let octets = ip.parse::<Ipv6Addr>().unwrap().octets();
            let mut w = [0u32; 4];
            for (word, chunk) in w.iter_mut().zip(octets.chunks(4)) {
                *word = u32::from_ne_bytes(chunk.try_into().unwrap());
            }
            w
        };
        let ev = FlowEvent {
            src: words("fd00:10::2"),
            dst: words("2001:db8:2::10"),
            nat_addr: words("2001:db8:e0::7"),
            sport_be: 5353u16.to_be(),
            dport_be: 53u16.to_be(),
            nat_port_be: 5353u16.to_be(),
            kind: EVENT_END,
            reason: REASON_FIN,
            proto: proto::UDP,
            family: 6,
            flags: CT_F_FIN,
            packets_out: 2,
            bytes_out: 120,
            packets_in: 1,
            bytes_in: 80,
            ..FlowEvent::default()
        };
        let value = parsed(
            &FlowRecord::from_event(&ev)
                .unwrap()
                .render(time(), None, None),
        );
        assert_eq!(value["event"], "end");
        assert_eq!(value["reason"], "fin");
        assert_eq!(value["protocol"], "udp");
        assert_eq!(value["original"]["src"], "fd00:10::2");
        assert_eq!(value["translated"]["src"], "2001:db8:e0::7");
        assert_eq!(
            (
                &value["packets_out"],
                &value["bytes_out"],
                &value["packets_in"],
                &value["bytes_in"]
            ),
            (&json!(2), &json!(120), &json!(1), &json!(80)),
            "an end carries both directions' counts"
        );
    }

    #[test]
    fn flowlog_port_exhausted_renders_egress_without_port() {
        let mut ev = new_tcp_event();
        ev.kind = EVENT_FAILED;
        ev.reason = REASON_PORT_EXHAUSTED;
        ev.nat_port_be = 0;
        let value = parsed(&FlowRecord::from_event(&ev).unwrap().render(
            time(),
            Some("partner"),
            None,
        ));
        assert_eq!(value["event"], "failed");
        assert_eq!(value["reason"], "port_exhausted");
        assert_eq!(
            value["translated"],
            json!({"src": "203.0.113.10", "dst": "192.0.2.10", "dport": 443}),
            "the egress address it would have left from, and no port"
        );
    }

    #[test]
    fn flowlog_unknown_kind_or_family_not_decoded() {
        let mut ev = new_tcp_event();
        ev.kind = 99;
        assert_eq!(FlowRecord::from_event(&ev), None);
        let mut ev = new_tcp_event();
        ev.family = 5;
        assert_eq!(FlowRecord::from_event(&ev), None);
    }

    #[test]
    fn flowlog_expired_flow_renders_expired_end() {
        let flow = Flow {
            protocol: proto::ICMP,
            src: "10.10.0.2".parse().unwrap(),
            sport: 77,
            dst: "198.51.100.10".parse().unwrap(),
            dport: 0,
            nat_addr: "203.0.113.1".parse().unwrap(),
            nat_port: 77,
            flags: 0,
            policy: 0,
            stats_slot: 2,
            addr_slot: 1,
            identity: 0,
            created_ns: 1,
            last_seen_ns: 2,
            traffic: Traffic {
                packets_out: 1,
                bytes_out: 84,
                packets_in: 1,
                bytes_in: 84,
            },
        };
        let value = parsed(&FlowRecord::ended(&flow, Reason::Expired, 3).render(
            time(),
            Some("rest"),
            None,
        ));
        assert_eq!(value["event"], "end");
        assert_eq!(value["reason"], "expired");
        assert_eq!(value["protocol"], "icmp");
        assert_eq!(value["original"]["sport"], 77, "the echo identifier");
        assert_eq!(value["packets_in"], 1);
    }

    #[test]
    fn flowlog_wall_time_counts_back_from_now() {
        let now = time();
        let at = wall_time(9_000_000_000, 10_000_000_000, now);
        assert_eq!(at, "2026-05-01T09:59:59Z".parse().unwrap());
        assert_eq!(
            wall_time(11, 10, now),
            now,
            "an instant after `now` is `now`"
        );
    }
}
