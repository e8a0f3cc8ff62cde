//! `egress-agent check`: validate a policy file and show what it compiles to.

use std::fmt::Write as _;

use anyhow::Context as _;

use crate::{
    cli::CheckArgs,
    policy::{self, PolicySet, model::Egress},
};

pub fn check(args: &CheckArgs) -> anyhow::Result<()> {
    let set = policy::load(&args.file).with_context(|| args.file.display().to_string())?;
    let compiled = policy::compile(&set);
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

/// Human-readable summary of a valid policy set.
pub fn summary(set: &PolicySet, compiled: &policy::Compiled) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "default egress: {}", set.default_egress.ipv4);
    for pool in &set.pools {
        let _ = write!(out, "pool {}: ipv4 [{}]", pool.name, list(&pool.ipv4));
        if let Some(v6) = pool.ipv6 {
            let _ = write!(out, " ipv6 {v6}");
        }
        out.push('\n');
    }
    let _ = writeln!(out, "nat: translated ports {}", set.nat.port_range);
    let _ = writeln!(out, "policies ({}, first match wins):", set.policies.len());
    for (i, p) in set.policies.iter().enumerate() {
        let mut fields = Vec::new();
        let s = &p.selector;
        if !s.src.is_empty() {
            fields.push(format!("src [{}]", list(&s.src)));
        }
        if !s.dst.is_empty() {
            fields.push(format!("dst [{}]", list(&s.dst)));
        }
        if !s.protocols.is_empty() {
            fields.push(format!("protocols [{}]", list(&s.protocols)));
        }
        if !s.dst_ports.is_empty() {
            fields.push(format!("dst_ports [{}]", list(&s.dst_ports)));
        }
        let selector = if fields.is_empty() {
            "any flow".to_owned()
        } else {
            fields.join(" and ")
        };
        let egress = match p.action.egress {
            Egress::Default => format!("default ({})", set.default_egress.ipv4),
            Egress::Bypass => "bypass (untouched)".to_owned(),
            Egress::Pool(k) => {
                let pool = &set.pools[k];
                format!("pool {} [{}]", pool.name, list(&pool.ipv4))
            }
        };
        let _ = write!(out, "  [{i}] {:?}: {selector} -> {egress}", p.name);
        if let Some(mark) = p.action.mark {
            let _ = write!(out, ", mark {mark:#x}");
        }
        if !p.enabled {
            out.push_str(" (disabled)");
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "  [-] no match -> default ({})",
        set.default_egress.ipv4
    );
    let _ = writeln!(
        out,
        "compiled: {} source prefixes, {} destination prefixes, {} classes",
        compiled.src4.len(),
        compiled.dst4.len(),
        compiled.classes.len()
    );
    out
}
