//! Lab test of destination countries: a small country database places the
//! lab's servers in two countries, and `dst_countries` policies steer.

use std::net::IpAddr;

use super::{nat_lab::policy_set, prog_test_run::require_root};
use crate::{
    agent::Agent,
    lab::{
        DEDICATED_PRIMARY, DEDICATED_SECONDARY, GW_UPLINK, GW_UPLINK6, Lab, SERVER_INTERNAL,
        SERVER_PARTNER, SERVER_PUBLIC, SERVER6_A, SERVER6_B, servers,
    },
    probe::{self, Servers, sa},
    tempdir::TempDir,
};

#[test]
fn geo_lab_dst_countries_steer_by_database() {
    require_root();
    let lab = Lab::new(0).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("geo-lab");
    let config = dir.write(
        "policies.json",
        &policy_set(
            r#""pt": { "ipv4": ["203.0.113.10"], "ipv6": "2001:db8:e0::/64" }, "in": { "ipv4": ["203.0.113.11"] }"#,
            &[
                r#"{ "name": "Portuguese sites", "selector": { "dst_countries": ["PT"] }, "action": { "egress": "pt" } }"#,
                r#"{ "name": "Indian sites", "selector": { "dst_countries": ["IN"] }, "action": { "egress": "in" } }"#,
            ],
            "",
        ),
    );
    // 192.0.2.0/25 and 2001:db8:2::/48 in Portugal, 198.51.100.0/24 in
    // India; 10.99.0.10 and 2001:db8:3::10 in no listed country.
    let db = dir.write(
        "countries.csv",
        "192.0.2.0,192.0.2.127,PT\n\
         198.51.100.0,198.51.100.255,IN\n\
         2001:db8:2::,2001:db8:2:ffff:ffff:ffff:ffff:ffff,PT\n",
    );
    let agent = Agent::steering(&lab, &config, &["--geoip", db.to_str().unwrap()]).unwrap();

    let seen = |to: IpAddr| {
        let s = probe::tcp(&lab.client, None, sa(to, 443), probe::token("geo"))
            .unwrap_or_else(|e| panic!("connection to {to} must be served: {e:#}"));
        assert!(s.intact, "echo from {to} intact");
        s.src.ip()
    };
    assert_eq!(
        seen(SERVER_PARTNER.into()),
        IpAddr::from(DEDICATED_PRIMARY),
        "a Portuguese destination leaves from the Portugal pool"
    );
    assert_eq!(
        seen(SERVER_PUBLIC.into()),
        IpAddr::from(DEDICATED_SECONDARY),
        "an Indian destination leaves from the India pool"
    );
    assert_eq!(
        seen(SERVER_INTERNAL.into()),
        IpAddr::from(GW_UPLINK),
        "a destination of unknown country takes the catch-all"
    );
    let v6 = seen(SERVER6_A.into());
    assert!(
        "2001:db8:e0::/64"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&v6),
        "a Portuguese IPv6 destination leaves from the pool's IPv6 range, not {v6}"
    );
    assert_eq!(
        seen(SERVER6_B.into()),
        IpAddr::from(GW_UPLINK6),
        "an IPv6 destination of unknown country takes the catch-all"
    );

    let stats: serde_json::Value =
        serde_json::from_str(&agent.cli(&["stats", "geo", "--json"]).unwrap()).unwrap();
    assert_eq!(
        stats["loaded"], true,
        "stats geo reports the database: {stats}"
    );
    assert_eq!(
        stats["files"].as_array().map(Vec::len),
        Some(1),
        "one file: {stats}"
    );
}
