//! `egress-agent check`: validate a policy file, show each policy as the
//! classifier rules it becomes, and warn about policies that can never match.

use std::fmt::Write as _;

use anyhow::Context as _;

use crate::{
    cli::CheckArgs,
    policy::{
        self, PolicySet,
        analyze::{Finding, analyze},
        dnf::Conjunction,
        model::{Egress, Expr, HealthCheck, PoolMode, WhenDown},
    },
};

pub fn check(args: &CheckArgs) -> anyhow::Result<()> {
    let set = policy::load(&args.file).with_context(|| args.file.display().to_string())?;
    let compiled = policy::compile(&set, &[]);
    print!("{}", summary(&set, &compiled));
    Ok(())
}

fn list<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// One rule as an expression: its predicates ANDed, in dimension order.
pub fn conjunction_text(conj: &Conjunction) -> String {
    let preds: Vec<Expr> = conj
        .preds
        .values()
        .flat_map(|p| match p {
            Expr::And(parts) => parts.clone(),
            other => vec![other.clone()],
        })
        .collect();
    match preds.len() {
        0 => "any flow".to_owned(),
        1 => preds[0].to_string(),
        _ => Expr::And(preds).to_string(),
    }
}

/// Where a policy's flows leave from, in words.
pub fn egress_text(set: &PolicySet, egress: Egress) -> String {
    match egress {
        Egress::Default => format!("default ({})", set.default_egress.ipv4),
        Egress::Bypass => "bypass (untouched)".to_owned(),
        Egress::Pool(k) => {
            let pool = &set.pools[k];
            format!("pool {} [{}]", pool.name, list(&pool.ipv4))
        }
    }
}

/// Human-readable summary of a valid policy set.
pub fn summary(set: &PolicySet, compiled: &policy::Compiled) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "default egress: {}", set.default_egress.ipv4);
    if let Some(v6) = set.default_egress.ipv6 {
        let _ = writeln!(out, "default egress (IPv6): {v6}");
    }
    for pool in &set.pools {
        let _ = write!(out, "pool {}: ipv4 [{}]", pool.name, list(&pool.ipv4));
        if let Some(v6) = pool.ipv6 {
            let _ = write!(out, " ipv6 {v6}");
        }
        let mode = match pool.mode {
            PoolMode::Failover => "failover",
            PoolMode::Spread => "spread",
        };
        let down = match pool.when_down {
            WhenDown::Drop => "drop new flows",
            WhenDown::Default => "use the default egress",
        };
        let _ = write!(out, ", {mode}; when every address is down: {down}");
        if let Some(interface) = &pool.interface {
            let _ = write!(out, "; leaves from uplink {interface}");
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "nat: translated ports {}, {} flows per table",
        set.nat.port_range, set.nat.max_flows
    );
    let t = &set.timeouts;
    let d = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let _ = writeln!(
        out,
        "timeouts: tcp established {}, tcp opening/closing {}, tcp after reset {}, udp {}, icmp {}",
        d(t.tcp_established),
        d(t.tcp_transitory),
        d(t.tcp_closed),
        d(t.udp),
        d(t.icmp)
    );
    let check = match set.health.check {
        HealthCheck::Address => "address assigned to the gateway".to_owned(),
        HealthCheck::Probe(target) => format!("address assigned and TCP to {target} succeeds"),
        HealthCheck::None => "none (always usable)".to_owned(),
    };
    let _ = writeln!(
        out,
        "health: {check}, every {}, down after {} failures, up after {} successes",
        d(set.health.interval),
        set.health.fall,
        set.health.rise
    );
    let _ = writeln!(out, "policies ({}, first match wins):", set.policies.len());
    for (i, p) in set.policies.iter().enumerate() {
        let _ = write!(
            out,
            "  [{i}] {:?} -> {}",
            p.name,
            egress_text(set, p.action.egress)
        );
        if let Some(mark) = p.action.mark {
            let _ = write!(out, ", mark {mark:#x}");
        }
        if !p.enabled {
            out.push_str(" (disabled)");
        }
        out.push('\n');
        for (k, conj) in p.rules.iter().enumerate() {
            let lead = if k == 0 { "     " } else { "  or " };
            let _ = writeln!(out, "  {lead}{}", conjunction_text(conj));
        }
        if p.rules.is_empty() {
            let _ = writeln!(out, "       never");
        }
    }
    let _ = writeln!(
        out,
        "  [-] no match -> default ({})",
        set.default_egress.ipv4
    );
    let _ = writeln!(
        out,
        "compiled: {} rules, {} classes, prefixes: {} source + {} destination (IPv4), {} + {} (IPv6)",
        compiled.rules.len(),
        compiled.classes.len(),
        compiled.src4.len(),
        compiled.dst4.len(),
        compiled.src6.len(),
        compiled.dst6.len(),
    );
    for finding in analyze(set) {
        let name = |i: usize| format!("policies[{i}] {:?}", set.policies[i].name);
        let _ = match finding {
            Finding::Unreachable { policy, reason } => {
                writeln!(out, "warning: {} can never match: {reason}", name(policy))
            }
            Finding::Shadowed { policy, by } => writeln!(
                out,
                "warning: {} can never match: every flow it selects is taken by {}",
                name(policy),
                by.iter()
                    .map(|&i| name(i))
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
        };
    }
    out
}
