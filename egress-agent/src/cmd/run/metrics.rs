//! `GET /metrics` (`run --metrics`): the agent's counters, its flows and
//! the fill of its maps, rendered in the Prometheus text format.
//!
//! Counters are read on the main task (a few hundred syscalls); the
//! connection tables and identity maps are counted off it, since a full
//! table of a million flows takes a third of a second to read.

use std::{
    net::SocketAddr,
    os::fd::AsFd as _,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use anyhow::Context as _;
use aya::maps::MapData;
use egress_common::{
    maps,
    stats::{AddrStats, DEFAULT_STATS_SLOT, PolicyStats, Traffic},
};
use log::info;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, prometheus_text},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::sync::mpsc;

use super::Agent;
use crate::{
    conntrack::{Census, Conntrack},
    control::{Command, ControlError, Reply},
    counters,
    mapwalk::{self, WalkError},
    metrics::MetricsServer,
};

/// Start the endpoint when `--metrics` asks for it; scrapes come back to
/// the main task through `tx`.
pub(super) async fn start(
    addr: Option<SocketAddr>,
    tx: mpsc::Sender<Command>,
) -> anyhow::Result<Option<MetricsServer>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let server = crate::metrics::serve(addr, tx)
        .await
        .with_context(|| format!("starting the metrics endpoint (--metrics {addr})"))?;
    info!("metrics at http://{}/metrics", server.local_addr());
    Ok(Some(server))
}

/// Every metric's name starts with this (and `_`).
const PREFIX: &str = "egress";
/// The policy label of counter slot 0: flows no policy matched, and the
/// gateway's own flows.
const NO_POLICY: &str = "(no policy)";
/// Counters whose name starts with this are drops, one metric by reason.
const DROP: &str = "drop_";

/// A counter slot (policy or egress address) with its counters.
#[derive(Clone, Debug, Default, PartialEq)]
struct Slot<S> {
    name: String,
    slot: u32,
    stats: S,
    /// Flows in the connection tables that count here.
    active: u64,
}

/// A map's entries and capacity.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Fill {
    name: &'static str,
    entries: u64,
    capacity: u64,
}

/// Everything one scrape shows.
#[derive(Clone, Debug, Default, PartialEq)]
struct Snapshot {
    /// Global dataplane counters by exported name (`Counter::ALL`).
    counters: Vec<(&'static str, u64)>,
    /// The running policies in order, then the "no policy" slot.
    policies: Vec<Slot<PolicyStats>>,
    /// Egress addresses and IPv6 ranges, by label.
    addresses: Vec<Slot<AddrStats>>,
    flows4: u64,
    flows6: u64,
    reloads_ok: u64,
    reloads_failed: u64,
    /// Unix time of the last successful reload, in seconds.
    last_reload: Option<f64>,
    sessions: u64,
    identities: u64,
    /// Per egress address: the share of the port range used towards its
    /// busiest destination, and how many destinations are above 80 %.
    ports: Vec<(String, f64, u64)>,
    /// Sorted by name.
    maps: Vec<Fill>,
}

impl Snapshot {
    /// Complete the snapshot with what was counted off the main task.
    fn with(mut self, census: &Census, identity_maps: Vec<Fill>) -> Self {
        let count = |counts: &[u64], slot: u32| counts.get(slot as usize).copied().unwrap_or(0);
        for p in &mut self.policies {
            p.active = count(&census.by_policy_slot, p.slot);
        }
        for a in &mut self.addresses {
            a.active = count(&census.by_addr_slot, a.slot);
        }
        self.flows4 = census.flows4 as u64;
        self.flows6 = census.flows6 as u64;
        self.maps.extend(census.tables.iter().map(|t| Fill {
            name: t.name,
            entries: t.entries as u64,
            capacity: u64::from(t.capacity),
        }));
        self.maps.extend(identity_maps);
        self.maps.sort_by_key(|m| m.name);
        self
    }
}

/// What is counted off the main task.
struct Walk {
    conntrack: Arc<Mutex<Conntrack>>,
    /// The identity maps, on file descriptors of their own.
    identity: Vec<(&'static str, MapData)>,
}

impl Walk {
    fn count(self) -> Result<(Census, Vec<Fill>), WalkError> {
        let census = self.conntrack.lock().expect("conntrack lock").census()?;
        let identity = self
            .identity
            .iter()
            .map(|(name, map)| {
                let fill = mapwalk::fill(map, name)?;
                Ok(Fill {
                    name,
                    entries: fill.entries.unwrap_or_default() as u64,
                    capacity: u64::from(fill.capacity),
                })
            })
            .collect::<Result<_, WalkError>>()?;
        Ok((census, identity))
    }
}

impl Agent {
    /// Answer a scrape: read the counters now, count the tables on a
    /// blocking thread, render there and reply.
    pub(super) fn metrics(&mut self, reply: Reply<String>) {
        let prepared = self
            .snapshot()
            .and_then(|snapshot| Ok((snapshot, self.walk()?)));
        let (snapshot, walk) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        tokio::spawn(async move {
            let counted = tokio::task::spawn_blocking(move || {
                let (census, identity) = walk.count()?;
                Ok::<_, WalkError>(render(snapshot.with(&census, identity)))
            })
            .await;
            let _ = reply.send(match counted {
                Ok(Ok(text)) => Ok(text),
                Ok(Err(e)) => Err(ControlError::internal(format!("counting map entries: {e}"))),
                Err(e) => Err(ControlError::internal(format!("counting map entries: {e}"))),
            });
        });
    }

    /// The counters, read on the main task.
    fn snapshot(&mut self) -> Result<Snapshot, ControlError> {
        let internal = |e: &dyn std::fmt::Display| ControlError::internal(e.to_string());
        let counters = counters::read(self.dataplane.ebpf_mut())
            .map_err(|e| internal(&e))?
            .into_iter()
            .map(|(_, name, value)| (name, value))
            .collect();
        let mut policies = Vec::new();
        let named = self
            .tables
            .active_policies()
            .iter()
            .map(|p| (p.name.as_str(), p.stats_slot));
        for (name, slot) in named.chain([(NO_POLICY, DEFAULT_STATS_SLOT)]) {
            policies.push(Slot {
                name: name.to_owned(),
                slot,
                stats: self.tables.policy_stats(slot).map_err(|e| internal(&e))?,
                active: 0,
            });
        }
        let addresses = self
            .tables
            .addr_stats()
            .map_err(|e| internal(&e))?
            .into_iter()
            .map(|(name, stats)| Slot {
                slot: self.tables.addr_slot_of(&name).map_or(0, u32::from),
                name,
                stats,
                active: 0,
            })
            .collect();
        let (classes, class_capacity) = self.tables.class_fill();
        Ok(Snapshot {
            counters,
            policies,
            addresses,
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            last_reload: self.last_reload.and_then(|t| {
                t.duration_since(SystemTime::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs_f64())
            }),
            sessions: self.registry.len() as u64,
            identities: self.registry.identity_count() as u64,
            ports: self
                .port_usage()
                .into_iter()
                .map(|u| (u.egress.to_string(), u.ratio, u.spaces_over as u64))
                .collect(),
            maps: vec![Fill {
                name: maps::CLASSES,
                entries: classes as u64,
                capacity: u64::from(class_capacity),
            }],
            ..Snapshot::default()
        })
    }

    /// Handles on the maps counted off the main task.
    fn walk(&self) -> Result<Walk, ControlError> {
        let identity = self
            .tries
            .maps()
            .into_iter()
            .map(|(name, map)| {
                let fd = map
                    .fd()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| ControlError::internal(format!("map {name}: {e}")))?;
                let map = MapData::from_fd(fd)
                    .map_err(|e| ControlError::internal(format!("map {name}: {e}")))?;
                Ok((name, map))
            })
            .collect::<Result<_, ControlError>>()?;
        Ok(Walk {
            conntrack: Arc::clone(&self.conntrack),
            identity,
        })
    }
}

/// The snapshot in the Prometheus text format (version 0.0.4).
fn render(snapshot: Snapshot) -> String {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(snapshot));
    let mut text = String::new();
    prometheus_text::encode(&mut text, &registry).expect("writing to a String cannot fail");
    text
}

/// One metric: its descriptor, then each series; nothing at all when
/// there is no series.
fn metric<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error> {
    let mut series = series.into_iter().peekable();
    let Some((_, first)) = series.peek() else {
        return Ok(());
    };
    let mut family = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, value) in series {
        value.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A metric without labels.
fn single<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: M,
) -> Result<(), std::fmt::Error> {
    let family = encoder.encode_descriptor(name, help, None, value.metric_type())?;
    value.encode(family)
}

/// Packets or bytes of `traffic` per direction, as two series of a metric
/// labelled `key=name`.
fn directions<'a>(
    key: &'static str,
    name: &'a str,
    traffic: &Traffic,
    packets: bool,
) -> [([(&'static str, &'a str); 2], ConstCounter); 2] {
    let (out, back) = if packets {
        (traffic.packets_out, traffic.packets_in)
    } else {
        (traffic.bytes_out, traffic.bytes_in)
    };
    [
        ([(key, name), ("direction", "out")], ConstCounter::new(out)),
        ([(key, name), ("direction", "in")], ConstCounter::new(back)),
    ]
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let by = |key: &'static str, name: &str| [(key, name.to_owned())];

        // Policies.
        metric(
            &mut e,
            "policy_flows",
            "Flows the policy classified.",
            self.policies
                .iter()
                .map(|p| (by("policy", &p.name), ConstCounter::new(p.stats.flows))),
        )?;
        for (name, help, packets) in [
            (
                "policy_packets",
                "Packets of the policy's flows (out: towards the destination, in: replies).",
                true,
            ),
            (
                "policy_bytes",
                "Bytes (IP length) of the policy's flows.",
                false,
            ),
        ] {
            metric(
                &mut e,
                name,
                help,
                self.policies
                    .iter()
                    .flat_map(|p| directions("policy", &p.name, &p.stats.traffic, packets)),
            )?;
        }
        metric(
            &mut e,
            "policy_active_flows",
            "Flows of the policy in the connection tables.",
            self.policies
                .iter()
                .map(|p| (by("policy", &p.name), ConstGauge::new(p.active))),
        )?;

        // Egress addresses.
        metric(
            &mut e,
            "address_flows",
            "Flows given the egress address (or IPv6 range).",
            self.addresses
                .iter()
                .map(|a| (by("address", &a.name), ConstCounter::new(a.stats.flows))),
        )?;
        for (name, help, packets) in [
            (
                "address_packets",
                "Packets of the address's flows (out: towards the destination, in: replies).",
                true,
            ),
            (
                "address_bytes",
                "Bytes (IP length) of the address's flows.",
                false,
            ),
        ] {
            metric(
                &mut e,
                name,
                help,
                self.addresses
                    .iter()
                    .flat_map(|a| directions("address", &a.name, &a.stats.traffic, packets)),
            )?;
        }
        metric(
            &mut e,
            "address_active_flows",
            "Flows of the address in the connection tables.",
            self.addresses
                .iter()
                .map(|a| (by("address", &a.name), ConstGauge::new(a.active))),
        )?;
        metric(
            &mut e,
            "address_port_exhausted",
            "New flows dropped because no port of the address was free towards their destination.",
            self.addresses
                .iter()
                .map(|a| (by("address", &a.name), ConstCounter::new(a.stats.exhausted))),
        )?;

        // Flows and dataplane counters.
        single(
            &mut e,
            "active_flows",
            "Flows in the connection tables.",
            ConstGauge::new(self.flows4 + self.flows6),
        )?;
        metric(
            &mut e,
            "active_flows_by_family",
            "Flows in the connection tables, per address family.",
            [("ipv4", self.flows4), ("ipv6", self.flows6)]
                .map(|(family, n)| ([("family", family)], ConstGauge::new(n))),
        )?;
        metric(
            &mut e,
            "dataplane_drops",
            "Packets the dataplane dropped, by reason.",
            self.counters.iter().filter_map(|(name, value)| {
                let reason = name.strip_prefix(DROP)?;
                Some(([("reason", reason)], ConstCounter::new(*value)))
            }),
        )?;
        for (name, value) in self.counters.iter().filter(|(n, _)| !n.starts_with(DROP)) {
            single(
                &mut e,
                &format!("dataplane_{name}"),
                &format!("Dataplane counter {name}, summed over CPUs."),
                ConstCounter::new(*value),
            )?;
        }

        // The agent.
        metric(
            &mut e,
            "reloads",
            "Reloads of the policy file (SIGHUP, the control API, a change on disk), by result.",
            [
                ("success", self.reloads_ok),
                ("failure", self.reloads_failed),
            ]
            .map(|(result, n)| ([("result", result)], ConstCounter::new(n))),
        )?;
        if let Some(at) = self.last_reload {
            single(
                &mut e,
                "last_reload_success_timestamp_seconds",
                "When the policies were last reloaded successfully (Unix time).",
                ConstGauge::new(at),
            )?;
        }
        single(
            &mut e,
            "sessions",
            "Sessions (who is behind which source addresses) the agent holds.",
            ConstGauge::new(self.sessions),
        )?;
        single(
            &mut e,
            "identities",
            "Distinct identities (user, groups, posture) of the sessions.",
            ConstGauge::new(self.identities),
        )?;
        metric(
            &mut e,
            "address_port_use_ratio",
            "Share of the translation port range in use towards the egress address's busiest destination (address, port, protocol).",
            self.ports
                .iter()
                .map(|(addr, ratio, _)| ([("address", addr.as_str())], ConstGauge::new(*ratio))),
        )?;
        metric(
            &mut e,
            "address_port_spaces_over_threshold",
            "Destinations (address, port, protocol) towards which the egress address uses more than 80 % of the port range.",
            self.ports
                .iter()
                .map(|(addr, _, over)| ([("address", addr.as_str())], ConstGauge::new(*over))),
        )?;

        // Map fill.
        metric(
            &mut e,
            "map_entries",
            "Entries the map holds (the class table: rows of the active generation).",
            self.maps
                .iter()
                .map(|m| ([("map", m.name)], ConstGauge::new(m.entries))),
        )?;
        metric(
            &mut e,
            "map_capacity",
            "Entries the map can hold (the class table: rows per generation).",
            self.maps
                .iter()
                .map(|m| ([("map", m.name)], ConstGauge::new(m.capacity))),
        )?;
        metric(
            &mut e,
            "map_fill_ratio",
            "Entries over capacity.",
            self.maps.iter().map(|m| {
                let ratio = if m.capacity == 0 {
                    0.0
                } else {
                    m.entries as f64 / m.capacity as f64
                };
                ([("map", m.name)], ConstGauge::new(ratio))
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use egress_common::stats::Counter;

    use super::*;
    use crate::conntrack::TableFill;

    fn traffic(base: u64) -> Traffic {
        Traffic {
            packets_out: base,
            bytes_out: base * 100,
            packets_in: base + 1,
            bytes_in: (base + 1) * 100,
        }
    }

    /// Two policies, one address, a census, and every counter zero but two.
    fn snapshot() -> Snapshot {
        let mut census = Census {
            tables: [
                TableFill {
                    name: maps::CT4,
                    entries: 3,
                    capacity: 1024,
                },
                TableFill {
                    name: maps::NAT4,
                    entries: 2,
                    capacity: 1024,
                },
                TableFill {
                    name: maps::CT6,
                    entries: 1,
                    capacity: 1024,
                },
                TableFill {
                    name: maps::NAT6,
                    entries: 1,
                    capacity: 1024,
                },
            ],
            flows4: 3,
            flows6: 1,
            ..Census::default()
        };
        census.by_policy_slot[1] = 2;
        census.by_policy_slot[2] = 1;
        census.by_policy_slot[0] = 1;
        census.by_addr_slot[1] = 3;
        let counters = Counter::ALL
            .iter()
            .map(|&(c, name)| {
                let value = match c {
                    Counter::FlowsNew => 4,
                    Counter::DropTableFull => 7,
                    _ => 0,
                };
                (name, value)
            })
            .collect();
        Snapshot {
            counters,
            policies: vec![
                Slot {
                    name: "to \"pt\"".into(),
                    slot: 1,
                    stats: PolicyStats {
                        flows: 2,
                        traffic: traffic(10),
                    },
                    active: 0,
                },
                Slot {
                    name: "catch-all".into(),
                    slot: 2,
                    stats: PolicyStats {
                        flows: 1,
                        traffic: traffic(1),
                    },
                    active: 0,
                },
                Slot {
                    name: NO_POLICY.into(),
                    slot: 0,
                    stats: PolicyStats::default(),
                    active: 0,
                },
            ],
            addresses: vec![Slot {
                name: "203.0.113.10".into(),
                slot: 1,
                stats: AddrStats {
                    flows: 3,
                    exhausted: 5,
                    traffic: traffic(20),
                },
                active: 0,
            }],
            reloads_ok: 2,
            reloads_failed: 1,
            last_reload: Some(1_700_000_000.5),
            sessions: 3,
            identities: 2,
            ports: vec![("203.0.113.10".into(), 0.85, 1)],
            maps: vec![Fill {
                name: maps::CLASSES,
                entries: 4,
                capacity: 16,
            }],
            ..Snapshot::default()
        }
        .with(
            &census,
            vec![Fill {
                name: maps::ID4_HOST,
                entries: 3,
                capacity: 1024,
            }],
        )
    }

    /// The lines of `text` that hold samples of `metric` (no comments).
    fn samples<'a>(text: &'a str, metric: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| {
                l.strip_prefix(metric)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .collect()
    }

    #[test]
    fn metrics_policies_render_flows_traffic_and_active_per_policy() {
        let text = render(snapshot());
        assert_eq!(
            samples(&text, "egress_policy_flows_total"),
            [
                r#"egress_policy_flows_total{policy="to \"pt\""} 2"#,
                r#"egress_policy_flows_total{policy="catch-all"} 1"#,
                r#"egress_policy_flows_total{policy="(no policy)"} 0"#,
            ],
            "one series per policy in list order, quotes in names escaped:\n{text}"
        );
        assert_eq!(
            samples(&text, "egress_policy_packets_total")[..2],
            [
                r#"egress_policy_packets_total{policy="to \"pt\"",direction="out"} 10"#,
                r#"egress_policy_packets_total{policy="to \"pt\"",direction="in"} 11"#,
            ]
        );
        assert_eq!(
            samples(&text, "egress_policy_bytes_total")[2..4],
            [
                r#"egress_policy_bytes_total{policy="catch-all",direction="out"} 100"#,
                r#"egress_policy_bytes_total{policy="catch-all",direction="in"} 200"#,
            ]
        );
        assert_eq!(
            samples(&text, "egress_policy_active_flows"),
            [
                r#"egress_policy_active_flows{policy="to \"pt\""} 2"#,
                r#"egress_policy_active_flows{policy="catch-all"} 1"#,
                r#"egress_policy_active_flows{policy="(no policy)"} 1"#,
            ],
            "active flows come from the census, by policy slot"
        );
        assert!(
            text.contains("# TYPE egress_policy_flows_total counter\n")
                && text.contains("# TYPE egress_policy_active_flows gauge\n"),
            "{text}"
        );
    }

    #[test]
    fn metrics_addresses_render_traffic_active_and_exhaustion() {
        let text = render(snapshot());
        assert_eq!(
            samples(&text, "egress_address_flows_total"),
            [r#"egress_address_flows_total{address="203.0.113.10"} 3"#]
        );
        assert_eq!(
            samples(&text, "egress_address_bytes_total"),
            [
                r#"egress_address_bytes_total{address="203.0.113.10",direction="out"} 2000"#,
                r#"egress_address_bytes_total{address="203.0.113.10",direction="in"} 2100"#,
            ]
        );
        assert_eq!(
            samples(&text, "egress_address_active_flows"),
            [r#"egress_address_active_flows{address="203.0.113.10"} 3"#]
        );
        assert_eq!(
            samples(&text, "egress_address_port_exhausted_total"),
            [r#"egress_address_port_exhausted_total{address="203.0.113.10"} 5"#]
        );
    }

    #[test]
    fn metrics_globals_render_flows_drops_counters_and_reloads() {
        let text = render(snapshot());
        assert_eq!(
            samples(&text, "egress_active_flows"),
            ["egress_active_flows 4"]
        );
        assert_eq!(
            samples(&text, "egress_active_flows_by_family"),
            [
                r#"egress_active_flows_by_family{family="ipv4"} 3"#,
                r#"egress_active_flows_by_family{family="ipv6"} 1"#,
            ]
        );
        let drops = samples(&text, "egress_dataplane_drops_total");
        assert!(
            drops.contains(&r#"egress_dataplane_drops_total{reason="table_full"} 7"#),
            "{drops:?}"
        );
        let reasons = Counter::ALL
            .iter()
            .filter(|(_, n)| n.starts_with(DROP))
            .count();
        assert_eq!(drops.len(), reasons, "one series per drop reason");
        assert_eq!(
            samples(&text, "egress_dataplane_flows_new_total"),
            ["egress_dataplane_flows_new_total 4"]
        );
        for (_, name) in Counter::ALL.iter().filter(|(_, n)| !n.starts_with(DROP)) {
            assert_eq!(
                samples(&text, &format!("egress_dataplane_{name}_total")).len(),
                1,
                "every global counter is exported: {name}"
            );
        }
        assert_eq!(
            samples(&text, "egress_reloads_total"),
            [
                r#"egress_reloads_total{result="success"} 2"#,
                r#"egress_reloads_total{result="failure"} 1"#,
            ]
        );
        assert_eq!(
            samples(&text, "egress_last_reload_success_timestamp_seconds"),
            ["egress_last_reload_success_timestamp_seconds 1700000000.5"]
        );
        assert_eq!(samples(&text, "egress_sessions"), ["egress_sessions 3"]);
        assert_eq!(samples(&text, "egress_identities"), ["egress_identities 2"]);
        assert_eq!(
            samples(&text, "egress_address_port_use_ratio"),
            ["egress_address_port_use_ratio{address=\"203.0.113.10\"} 0.85"]
        );
        assert_eq!(
            samples(&text, "egress_address_port_spaces_over_threshold"),
            ["egress_address_port_spaces_over_threshold{address=\"203.0.113.10\"} 1"]
        );
    }

    #[test]
    fn metrics_never_reloaded_omits_last_reload_time() {
        let text = render(Snapshot {
            last_reload: None,
            ..snapshot()
        });
        assert!(
            !text.contains("last_reload"),
            "no timestamp before the first reload:\n{text}"
        );
    }

    #[test]
    fn metrics_maps_render_entries_capacity_and_ratio_sorted_by_name() {
        let text = render(snapshot());
        assert_eq!(
            samples(&text, "egress_map_entries"),
            [
                r#"egress_map_entries{map="EG_CLASSES"} 4"#,
                r#"egress_map_entries{map="EG_CT4"} 3"#,
                r#"egress_map_entries{map="EG_CT6"} 1"#,
                r#"egress_map_entries{map="EG_ID4_HOST"} 3"#,
                r#"egress_map_entries{map="EG_NAT4"} 2"#,
                r#"egress_map_entries{map="EG_NAT6"} 1"#,
            ]
        );
        assert!(
            samples(&text, "egress_map_capacity")
                .contains(&r#"egress_map_capacity{map="EG_CT4"} 1024"#)
        );
        assert!(
            samples(&text, "egress_map_fill_ratio")
                .contains(&r#"egress_map_fill_ratio{map="EG_CLASSES"} 0.25"#),
            "{text}"
        );
    }
}
