//! Health of the dedicated IPv4 egress addresses: whether each is still
//! assigned to the gateway and, optionally, whether a TCP connection from it
//! to a probe target succeeds. Pools fail over to their next address when
//! one goes down, and back when it recovers.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use tokio::{net::TcpSocket, task::JoinSet};

use crate::policy::model::{Health, HealthCheck};

#[derive(Clone, Copy, Debug, Default)]
struct State {
    up: bool,
    /// Consecutive results against the current state.
    streak: u32,
}

/// Per-address state machine with fall/rise hysteresis.
#[derive(Default)]
pub struct Monitor {
    state: HashMap<Ipv4Addr, State>,
}

/// The addresses of `addrs` that pass this round's check. Probes run all at
/// once, so a round takes one probe timeout however many addresses are dead.
async fn checks(health: &Health, addrs: &[Ipv4Addr], local: &[IpAddr]) -> HashSet<Ipv4Addr> {
    let present = addrs
        .iter()
        .copied()
        .filter(|a| local.contains(&IpAddr::V4(*a)));
    match health.check {
        HealthCheck::None => addrs.iter().copied().collect(),
        HealthCheck::Address => present.collect(),
        HealthCheck::Probe(target) => {
            let within = health.interval / 2;
            let mut probes = JoinSet::new();
            for addr in present {
                probes.spawn(async move { (addr, probe(addr, target, within).await) });
            }
            let mut passed = HashSet::new();
            while let Some(done) = probes.join_next().await {
                if let Ok((addr, true)) = done {
                    passed.insert(addr);
                }
            }
            passed
        }
    }
}

/// Whether a TCP connection from `from` to `target` completes in time.
async fn probe(from: Ipv4Addr, target: SocketAddr, within: Duration) -> bool {
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => return false,
    };
    let Ok(socket) = socket else { return false };
    if socket.bind(SocketAddr::new(IpAddr::V4(from), 0)).is_err() {
        return false;
    }
    matches!(
        tokio::time::timeout(within, socket.connect(target)).await,
        Ok(Ok(_))
    )
}

impl Monitor {
    /// Addresses currently down.
    pub fn down(&self) -> Vec<Ipv4Addr> {
        let mut out: Vec<Ipv4Addr> = self
            .state
            .iter()
            .filter(|(_, s)| !s.up)
            .map(|(a, _)| *a)
            .collect();
        out.sort();
        out
    }

    /// One round of checks over `addrs`, given the addresses the host has.
    /// Returns the addresses whose state changed, with their new state.
    pub async fn round(
        &mut self,
        health: &Health,
        addrs: &[Ipv4Addr],
        local: &[IpAddr],
    ) -> Vec<(Ipv4Addr, bool)> {
        self.state.retain(|a, _| addrs.contains(a));
        let passed = checks(health, addrs, local).await;
        let mut changed = Vec::new();
        for &addr in addrs {
            let present = local.contains(&IpAddr::V4(addr));
            let ok = passed.contains(&addr);
            let state = self.state.entry(addr).or_insert(State {
                up: true,
                streak: 0,
            });
            if ok == state.up {
                state.streak = 0;
                continue;
            }
            state.streak += 1;
            // An address that left the host is down at once; probe results
            // need `fall`/`rise` in a row.
            let needed = if !present && health.check != HealthCheck::None {
                1
            } else if ok {
                health.rise
            } else {
                health.fall
            };
            if state.streak >= needed {
                state.up = ok;
                state.streak = 0;
                changed.push((addr, ok));
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(check: HealthCheck) -> Health {
        Health {
            check,
            ..Health::default()
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn health_address_removed_down_at_once_restored_after_rise() {
        let a = Ipv4Addr::new(203, 0, 113, 10);
        let mut m = Monitor::default();
        let h = health(HealthCheck::Address);
        let with = [IpAddr::V4(a)];
        assert!(
            m.round(&h, &[a], &with).await.is_empty(),
            "present: stays up"
        );
        assert_eq!(
            m.round(&h, &[a], &[]).await,
            vec![(a, false)],
            "removed: down in one round"
        );
        assert!(
            m.round(&h, &[a], &with).await.is_empty(),
            "back: needs `rise` good rounds"
        );
        assert_eq!(
            m.round(&h, &[a], &with).await,
            vec![(a, true)],
            "up after two"
        );
        assert!(m.down().is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn health_none_never_down() {
        let a = Ipv4Addr::new(203, 0, 113, 10);
        let mut m = Monitor::default();
        assert!(
            m.round(&health(HealthCheck::None), &[a], &[])
                .await
                .is_empty()
        );
    }
}
