//! Destination countries in the kernel (BPF_PROG_TEST_RUN): the full real
//! database loaded through the agent's writer answers as the MaxMind DB
//! reader does, and a reload switches generations atomically.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use egress_agent::{
    geoip::{self, GeoTables, GeoWriter, Merged, Ranges},
    loader::{Dataplane, LoadOptions},
    policy::{eval::Flow, geo},
};
use egress_common::{classify::NO_MATCH, flow::proto};

use super::prog_test_run::{Dp, first_packet, recorded_policy};
use crate::rng::Rng;
use crate::{
    geodb,
    lab::{CLIENT, CLIENT6},
};

/// One policy per country, in id order, so the policy a flow records
/// names the country the kernel found (no match: unknown).
fn policy_per_country(codes: &[&str]) -> String {
    let mut policies = String::new();
    for (i, code) in codes.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(
            policies,
            r#"{sep}{{ "name": "{code}", "selector": {{ "dst_countries": ["{code}"] }}, "action": {{ "egress": "default" }} }}"#
        );
    }
    format!(
        r#"{{ "egress_pools": {{}}, "default_egress": {{ "ipv4": "203.0.113.1", "ipv6": "2001:db8:ff::1" }}, "policies": [{policies}] }}"#
    )
}

/// Country codes by dataplane id (index 0 is "unknown").
fn all_codes() -> Vec<String> {
    (1..=geo::MAX_COUNTRY_ID)
        .map(|id| geo::by_id(id).expect("ids are dense").0.to_string())
        .collect()
}

fn id_of(code: &str) -> u8 {
    geo::country_id(geo::lookup(code).expect("a country").0).expect("an id") as u8
}

/// Sends a new flow to each destination and reads back the country the
/// kernel's lookup found.
struct Prober {
    dp: Dp,
    /// Country id of each policy index (`NO_MATCH`: 0).
    policy_country: Vec<u8>,
    sport: u16,
}

impl Prober {
    fn new(codes: &[&str], opts: &LoadOptions) -> Self {
        Self {
            dp: Dp::with_options(&policy_per_country(codes), opts),
            policy_country: codes.iter().map(|c| id_of(c)).collect(),
            sport: 1023,
        }
    }

    /// The country id the dataplane gives `dst`.
    fn country(&mut self, dst: IpAddr) -> u8 {
        // A fresh source port: an established flow would keep its first answer.
        self.sport = self.sport.checked_add(1).expect("fewer than 64 512 probes");
        let flow = Flow {
            src: match dst {
                IpAddr::V4(_) => CLIENT.into(),
                IpAddr::V6(_) => CLIENT6.into(),
            },
            dst,
            proto: proto::UDP,
            dst_port: 53,
        };
        let (verdict, _) = self.dp.egress(&first_packet(&flow, self.sport));
        let policy = recorded_policy(&mut self.dp, &flow, self.sport)
            .unwrap_or_else(|| panic!("a flow to {dst} must be tracked (verdict {verdict})"));
        match u32::from(policy) {
            NO_MATCH => 0,
            i => self.policy_country[i as usize],
        }
    }
}

/// Random destinations: a quarter anywhere in the family's space (mostly
/// unknown for IPv6), the rest inside or at the edge of a listed range.
fn sample(rng: &mut Rng, merged: &Merged, n: usize, v6: bool) -> Vec<IpAddr> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let (first, last, bits) = if v6 {
            let s = merged.v6[rng.below(merged.v6.len())];
            (s.first, s.last, 128)
        } else {
            let s = merged.v4[rng.below(merged.v4.len())];
            (u128::from(s.first), u128::from(s.last), 32)
        };
        let raw = match rng.below(8) {
            0 | 1 => rng.below128(u128::MAX) >> (128 - bits),
            2 => first,
            3 => last,
            4 => last.wrapping_add(1) & (u128::MAX >> (128 - bits)),
            _ => first + rng.below128(last - first + 1),
        };
        let addr = if v6 {
            IpAddr::V6(Ipv6Addr::from(raw))
        } else {
            IpAddr::V4(Ipv4Addr::from(raw as u32))
        };
        let src = if v6 {
            IpAddr::from(CLIENT6)
        } else {
            CLIENT.into()
        };
        // The dataplane passes link-scoped traffic untracked: no answer.
        let flow = Flow {
            src,
            dst: addr,
            proto: proto::UDP,
            dst_port: 53,
        };
        if !flow.is_link_scoped() {
            out.push(addr);
        }
    }
    out
}

/// The MaxMind DB reader's country id for `addr` (0: none or unknown code).
fn mmdb_country(reader: &maxminddb::Reader<Vec<u8>>, addr: IpAddr) -> u8 {
    let result = reader
        .lookup(addr)
        .unwrap_or_else(|e| panic!("MMDB lookup of {addr}: {e}"));
    let code: Option<String> = result
        .decode_path(&[maxminddb::PathElement::Key("country_code")])
        .unwrap_or_else(|e| panic!("MMDB record of {addr}: {e}"));
    code.and_then(|c| geo::lookup(&c))
        .and_then(|(c, _, _)| geo::country_id(c))
        .map_or(0, |id| id as u8)
}

fn seed() -> u64 {
    std::env::var("GEO_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

#[test]
fn geo_full_database_kernel_agrees_with_mmdb_reader() {
    super::prog_test_run::require_root();
    let Some(db) = geodb::fetch_or_skip("geo_full_database_kernel_agrees_with_mmdb_reader") else {
        return;
    };
    let seed = seed();
    eprintln!("geo: seed {seed} (replay with GEO_TEST_SEED={seed})");
    let mut rng = Rng::new(seed);

    let start = Instant::now();
    let (from_csv, csv_stats) = geoip::load(&db.csv()).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "geo: CSV read in {:.0} ms, built in {:.0} ms (this build's profile), {:?}; unknown codes {:?}",
        from_csv.stats.parse_ms,
        from_csv.stats.build_ms,
        start.elapsed(),
        csv_stats.unknown_codes
    );
    let (from_mmdb, _) =
        geoip::load(std::slice::from_ref(&db.mmdb)).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        from_csv.blocks == from_mmdb.blocks
            && from_csv.splits == from_mmdb.splits
            && from_csv.buckets == from_mmdb.buckets
            && from_csv.ranges6 == from_mmdb.ranges6,
        "the CSV and MMDB packages of one version must make the same tables"
    );

    let bytes = std::fs::read(&db.mmdb).unwrap();
    let reader = maxminddb::Reader::from_source(bytes).unwrap();
    let files = [&db.csv_v4, &db.csv_v6].map(|p| geoip::source::read(p).unwrap());
    let merged = Merged::new(files.iter().map(|f| &f.ranges));
    let v4 = sample(&mut rng, &merged, 10_000, false);
    let v6 = sample(&mut rng, &merged, 10_000, true);

    let codes = all_codes();
    let codes: Vec<&str> = codes.iter().map(String::as_str).collect();
    let mut prober = Prober::new(
        &codes,
        &LoadOptions {
            max_flows: 65536,
            geo: true,
            ..LoadOptions::default()
        },
    );
    for (label, tables) in [("MMDB", &from_mmdb), ("CSV", &from_csv)] {
        let report = prober.dp.set_countries(tables);
        eprintln!("geo: {label} loaded: {report}");
        for m in &report.maps {
            eprintln!(
                "geo:   {}: {} entries of {} bytes, {:.1} MiB of elements, memlock {:?}",
                m.name,
                m.max_entries,
                m.value_size,
                m.bytes as f64 / f64::from(1 << 20),
                m.memlock
            );
        }
        let (mut agree, mut known) = ([0usize; 2], [0usize; 2]);
        for (family, addrs) in [&v4, &v6].into_iter().enumerate() {
            for &addr in addrs {
                let want = mmdb_country(&reader, addr);
                assert_eq!(
                    tables.lookup(addr),
                    want,
                    "the {label} tables must answer {addr} as the MMDB reader (seed {seed})"
                );
                let got = prober.country(addr);
                assert_eq!(
                    got, want,
                    "the kernel ({label} tables) must answer {addr} as the MMDB reader (seed {seed})"
                );
                agree[family] += 1;
                known[family] += usize::from(want != 0);
            }
        }
        eprintln!(
            "geo: {label}: kernel agrees with the MMDB reader on {}/{} IPv4 ({} in a country) and {}/{} IPv6 ({} in a country)",
            agree[0],
            v4.len(),
            known[0],
            agree[1],
            v6.len(),
            known[1]
        );
        assert!(
            known[0] > 5000 && known[1] > 5000,
            "most sampled addresses must be in a country, or the check proves little: {known:?}"
        );
    }
}

/// A small database of `(first, last, code)` ranges.
fn tables(ranges: &[(&str, &str, &str)]) -> GeoTables {
    let mut r = Ranges::default();
    for (first, last, code) in ranges {
        r.push(first.parse().unwrap(), last.parse().unwrap(), id_of(code));
    }
    GeoTables::build(&Merged::new([&r])).unwrap()
}

#[test]
fn geo_reload_staged_generation_unseen_until_flip() {
    let mut prober = Prober::new(
        &["PT", "ES", "FR"],
        &LoadOptions {
            max_flows: 16384,
            geo: true,
            geo_split_blocks: 64,
            geo_v6_ranges: 1024,
            ..LoadOptions::default()
        },
    );
    // A whole /24, a split /24 and an IPv6 range, each changing country.
    let old = tables(&[
        ("192.0.2.0", "192.0.2.127", "PT"),
        ("192.0.2.128", "192.0.2.255", "ES"),
        ("198.51.100.0", "198.51.100.255", "PT"),
        ("2001:db8:1::", "2001:db8:1:ffff:ffff:ffff:ffff:ffff", "PT"),
    ]);
    let new = tables(&[
        ("192.0.2.0", "192.0.2.127", "ES"),
        ("192.0.2.128", "192.0.2.255", "FR"),
        ("203.0.113.0", "203.0.113.255", "FR"),
        ("2001:db8:1::", "2001:db8:1:ffff:ffff:ffff:ffff:ffff", "ES"),
    ]);
    let probes: Vec<IpAddr> = [
        "192.0.2.10",
        "192.0.2.200",
        "198.51.100.7",
        "203.0.113.77",
        "2001:db8:1::5",
        "2001:db8:2::5",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    let answers =
        |prober: &mut Prober| -> Vec<u8> { probes.iter().map(|&a| prober.country(a)).collect() };
    let expect = |t: &GeoTables| -> Vec<u8> { probes.iter().map(|&a| t.lookup(a)).collect() };
    assert_ne!(
        expect(&old),
        expect(&new),
        "the two databases differ on every probe kind"
    );

    assert_eq!(
        answers(&mut prober),
        vec![0; probes.len()],
        "no database: every country unknown"
    );
    let first = prober.dp.set_countries(&old).generation;
    assert_eq!(
        answers(&mut prober),
        expect(&old),
        "after the first load: its answers"
    );

    let staged = prober.dp.geo().stage(&new).unwrap();
    assert_ne!(
        staged, first,
        "the new tables go to the inactive generation"
    );
    assert_eq!(
        answers(&mut prober),
        expect(&old),
        "a written but unflipped generation must not change any answer"
    );
    assert_eq!(
        prober.dp.geo().flip().unwrap(),
        staged,
        "the flip activates it"
    );
    assert_eq!(
        answers(&mut prober),
        expect(&new),
        "after the flip every answer is the new database's"
    );

    // Back to the first generation, now holding different split blocks:
    // an empty database leaves nothing of either behind.
    let empty = prober.dp.set_countries(&GeoTables::empty());
    assert_eq!(empty.generation, first, "generations alternate");
    assert_eq!(
        answers(&mut prober),
        vec![0; probes.len()],
        "an empty database: all unknown"
    );
    prober.dp.set_countries(&new);
    assert_eq!(
        answers(&mut prober),
        expect(&new),
        "reloading the new database again"
    );
}

#[test]
fn geo_capacity_exceeded_error_names_map_and_flag() {
    let mut prober = Prober::new(
        &["PT"],
        &LoadOptions {
            max_flows: 1024,
            geo: true,
            geo_split_blocks: 1,
            ..LoadOptions::default()
        },
    );
    let two_splits = tables(&[
        ("192.0.2.1", "192.0.2.1", "PT"),
        ("198.51.100.1", "198.51.100.1", "PT"),
    ]);
    let err = prober.dp.geo().apply(&two_splits).unwrap_err().to_string();
    assert_eq!(
        err,
        "the country database needs 2 entries per generation in EG_GEO4_SPLIT but it holds 1 (start the agent with a larger --geo-split-blocks)",
        "the error names the map, the need, the capacity and the flag"
    );
    assert_eq!(
        prober.country("192.0.2.1".parse().unwrap()),
        0,
        "a rejected database changes nothing"
    );
}

#[test]
fn geo_not_reserved_apply_rejected() {
    super::prog_test_run::require_root();
    let mut dataplane = Dataplane::load(&LoadOptions {
        max_flows: 1024,
        ..LoadOptions::default()
    })
    .unwrap_or_else(|e| panic!("loading the dataplane: {e}"));
    let mut writer = GeoWriter::new(dataplane.ebpf_mut()).unwrap();
    let err = writer.apply(&GeoTables::empty()).unwrap_err().to_string();
    assert!(
        err.starts_with(
            "the dataplane was loaded without country tables (EG_GEO4 holds 2 entries)"
        ),
        "without LoadOptions.geo the writer refuses: {err}"
    );
}
