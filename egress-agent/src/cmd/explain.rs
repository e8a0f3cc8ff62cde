//! `egress-agent explain`: which policy a flow matches, why the earlier ones
//! do not, and where it would leave from (with the destination's country
//! given or looked up in `--geoip` databases).

use std::{fmt::Write as _, net::IpAddr, path::PathBuf};

use anyhow::{Context as _, bail};

use crate::{
    cli::ExplainArgs,
    geoip,
    policy::{
        self, PolicySet,
        compile::Lookup,
        eval::{Context, Flow, Mismatch},
        geo,
        model::{Atom, CountryCode, Dimension, Egress, Expr, Identity, Protocol},
    },
};

pub fn explain(args: &ExplainArgs) -> anyhow::Result<()> {
    let set = policy::load(&args.config).with_context(|| args.config.display().to_string())?;
    print!("{}", report(&set, args)?);
    Ok(())
}

fn protocol_number(text: &str) -> anyhow::Result<u8> {
    if let Some(p) = Protocol::from_name(text) {
        return Ok(p.number());
    }
    text.parse::<u8>().with_context(|| {
        format!("--proto {text:?}: expected tcp, udp, icmp, icmpv6 or a protocol number")
    })
}

fn describe(dimension: Dimension, pred: &Expr, ctx: &Context<'_>) -> String {
    let flow = &ctx.flow;
    match dimension {
        Dimension::Src => format!("source {}", flow.src),
        Dimension::Dst => format!("destination {}", flow.dst),
        Dimension::L4 => match Protocol::from_number(flow.proto) {
            Some(p) if p.has_ports() => format!("{p} port {}", flow.dst_port),
            Some(p) => p.to_string(),
            None => format!("protocol {}", flow.proto),
        },
        Dimension::Identity => match ctx.identity {
            None => "no identity".to_owned(),
            Some(id) => {
                // Show the facets the failing condition is about.
                let atoms = pred.atoms();
                let mut parts = Vec::new();
                if atoms.iter().any(|a| matches!(a, Atom::User(_))) {
                    parts.push(format!("user {:?}", id.user));
                }
                if atoms.iter().any(|a| matches!(a, Atom::Group(_))) {
                    parts.push(format!("groups {:?}", id.groups));
                }
                if atoms.iter().any(|a| matches!(a, Atom::Posture(_))) {
                    parts.push(format!("posture {:?}", id.posture));
                }
                parts.join(", ")
            }
        },
        Dimension::Country => match ctx.country {
            Some(c) => format!("country {c}"),
            None => "country unknown".to_owned(),
        },
    }
}

/// The explanation as text.
pub fn report(set: &PolicySet, args: &ExplainArgs) -> anyhow::Result<String> {
    if args.src.is_ipv4() != args.dst.is_ipv4() {
        bail!(
            "--src {} and --dst {} are of different address families",
            args.src,
            args.dst
        );
    }
    let proto = protocol_number(&args.proto)?;
    let has_ports = Protocol::from_number(proto).is_some_and(Protocol::has_ports);
    let flow = Flow {
        src: args.src,
        dst: args.dst,
        proto,
        dst_port: if has_ports { args.dst_port } else { 0 },
    };
    let identity = (args.user.is_some() || !args.groups.is_empty() || !args.posture.is_empty())
        .then(|| Identity {
            user: args.user.clone().unwrap_or_default().to_lowercase(),
            groups: args.groups.iter().cloned().collect(),
            posture: args.posture.iter().cloned().collect(),
        });
    let (country, geoip_line) = match &args.country {
        None if !args.geoip.is_empty() => {
            let (country, line) = country_from_databases(&args.geoip, args.dst)?;
            (country, Some(line))
        }
        None => (None, None),
        Some(code) => (
            Some(
                geo::lookup(code)
                    .with_context(|| {
                        let hint = if code.eq_ignore_ascii_case("UK") {
                            " (the United Kingdom is GB)"
                        } else {
                            ""
                        };
                        format!("--country {code:?} is not an ISO 3166-1 alpha-2 code{hint}")
                    })?
                    .0,
            ),
            None,
        ),
    };
    let ctx = Context {
        flow,
        identity: identity.as_ref(),
        country,
    };

    let mut out = geoip_line.unwrap_or_default();
    let proto_name =
        Protocol::from_number(proto).map_or_else(|| proto.to_string(), |p| p.to_string());
    let _ = write!(out, "flow: {proto_name} {} -> {}", flow.src, flow.dst);
    if has_ports {
        let _ = write!(out, " port {}", flow.dst_port);
    }
    match &identity {
        Some(id) => {
            let _ = write!(out, ", user {:?}", id.user);
            if !id.groups.is_empty() {
                let _ = write!(out, ", groups {:?}", id.groups);
            }
            if !id.posture.is_empty() {
                let _ = write!(out, ", posture {:?}", id.posture);
            }
        }
        None => out.push_str(", no identity"),
    }
    if let Some(c) = country {
        let _ = write!(out, ", destination country {c}");
    }
    out.push('\n');
    if flow.is_link_scoped() {
        out.push_str(
            "result: link-scoped traffic (unspecified or link-local source, multicast or broadcast destination) passes untouched; no policy is consulted\n",
        );
        return Ok(out);
    }

    let matched = set.first_match(&ctx);
    for (i, p) in set.policies.iter().enumerate() {
        let head = format!("  [{i}] {:?}", p.name);
        match p.check(&ctx) {
            Ok(()) => {
                let _ = writeln!(out, "{head}: MATCH");
                break;
            }
            Err(Mismatch::Disabled) => {
                let _ = writeln!(out, "{head}: no match: the policy is disabled");
            }
            Err(Mismatch::NoIdentity) => {
                let _ = writeln!(
                    out,
                    "{head}: no match: it is about identities and the source has none"
                );
            }
            Err(Mismatch::Failed(reasons)) => {
                let why: Vec<String> = reasons
                    .iter()
                    .map(|(d, pred)| format!("{pred} is false for {}", describe(*d, pred, &ctx)))
                    .collect();
                let _ = match why.len() {
                    0 => writeln!(out, "{head}: no match: its condition is never true"),
                    1 => writeln!(out, "{head}: no match: {}", why[0]),
                    _ => writeln!(
                        out,
                        "{head}: no match: none of its {} alternatives holds: {}",
                        why.len(),
                        why.join("; ")
                    ),
                };
            }
        }
    }

    // The compiled tables must agree with the reference walk above: they
    // are what the dataplane runs.
    let identities: Vec<Identity> = identity.iter().cloned().collect();
    let compiled = policy::compile(set, &identities);
    let lookup = Lookup {
        flow,
        identity: u32::from(identity.is_some()),
        country: country.and_then(geo::country_id).unwrap_or(0),
    };
    let by_tables = compiled.classify(&lookup);
    if by_tables != matched {
        bail!(
            "internal error: the compiled tables choose {by_tables:?} but the policy list says {matched:?}; please report this with the policy file"
        );
    }

    let egress = matched.map_or(Egress::Default, |i| set.policies[i].action.egress);
    match matched {
        Some(i) => {
            let _ = write!(out, "result: policy [{i}] {:?}", set.policies[i].name);
        }
        None => out.push_str("result: no policy matches"),
    }
    let _ = writeln!(out, " -> {}", egress_line(set, egress, flow.src));
    Ok(out)
}

/// The destination's country by the `--geoip` databases, and the report
/// line saying what they answered and which file decided.
fn country_from_databases(
    paths: &[PathBuf],
    dst: IpAddr,
) -> anyhow::Result<(Option<CountryCode>, String)> {
    let found = geoip::locate(paths, dst)
        .with_context(|| format!("looking up --dst {dst} in the --geoip databases"))?;
    Ok(match found {
        Some((path, id)) => match geo::by_id(u16::from(id)) {
            Some((code, _)) => {
                let name = geo::lookup(&code.to_string()).map_or("", |(_, name, _)| name);
                (
                    Some(code),
                    format!(
                        "geoip: {dst} is in {code} ({name}) according to {}\n",
                        path.display()
                    ),
                )
            }
            None => (
                None,
                format!(
                    "geoip: {dst} is listed in {} with a code that is not an ISO 3166-1 country: country unknown\n",
                    path.display()
                ),
            ),
        },
        None => (
            None,
            format!(
                "geoip: {dst} is in none of the databases ({}): country unknown\n",
                paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    })
}

fn egress_line(set: &PolicySet, egress: Egress, src: IpAddr) -> String {
    match (egress, src) {
        (Egress::Bypass, _) => "bypass: leaves untouched".to_owned(),
        (Egress::Default, IpAddr::V4(_)) => {
            format!("leaves from the default egress {}", set.default_egress.ipv4)
        }
        (Egress::Default, IpAddr::V6(_)) => match set.default_egress.ipv6 {
            Some(a) => format!("leaves from the default egress {a}"),
            None => "no default IPv6 egress is configured: the flow is dropped".to_owned(),
        },
        (Egress::Pool(k), IpAddr::V4(_)) => {
            let pool = &set.pools[k];
            match pool.ipv4.as_slice() {
                [] => format!(
                    "pool {} has no IPv4 address: the flow is dropped",
                    pool.name
                ),
                [primary] => format!("leaves from {primary} (pool {})", pool.name),
                [primary, rest @ ..] => format!(
                    "leaves from {primary} (pool {}; {} if it is down)",
                    pool.name,
                    rest.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", then ")
                ),
            }
        }
        (Egress::Pool(k), IpAddr::V6(_)) => {
            let pool = &set.pools[k];
            match pool.ipv6 {
                Some(net) => format!(
                    "leaves from an address in {net} (pool {}), fixed per user or source",
                    pool.name
                ),
                None => format!("pool {} has no IPv6 range: the flow is dropped", pool.name),
            }
        }
    }
}
