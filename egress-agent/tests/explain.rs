//! `egress-agent explain` as a user runs it: which policy a flow matches,
//! why the earlier ones do not, and where it leaves from.

use std::{
    path::{Path, PathBuf},
    process::Output,
};

mod common;

use common::{TempDir, agent};

fn example() -> PathBuf {
    common::example("policies.json")
}

fn run_explain(config: &Path, args: &[&str]) -> Output {
    agent()
        .arg("explain")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("egress-agent runs")
}

/// The report for a flow, asserting explain succeeded.
fn explain(config: &Path, args: &[&str]) -> String {
    let out = run_explain(config, args);
    assert!(
        out.status.success(),
        "explain {args:?} must succeed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("the report is UTF-8")
}

/// The single error line for bad arguments, asserting explain failed.
fn explain_error(config: &Path, args: &[&str]) -> String {
    let out = run_explain(config, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "explain {args:?} must fail");
    assert!(
        out.stdout.is_empty(),
        "explain {args:?}: nothing on stdout when the flow is rejected"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "explain {args:?}: the error is one line: {stderr}"
    );
    assert!(stderr.starts_with("error: "), "explain {args:?}: {stderr}");
    stderr
}

/// The report's line about policy `[index]`.
fn policy_line(report: &str, index: usize) -> &str {
    let head = format!("  [{index}] ");
    report
        .lines()
        .find(|l| l.starts_with(&head))
        .unwrap_or_else(|| panic!("the report has a line for policy [{index}]:\n{report}"))
}

fn result_line(report: &str) -> &str {
    report
        .lines()
        .find(|l| l.starts_with("result: "))
        .unwrap_or_else(|| panic!("the report ends with a result line:\n{report}"))
}

/// Identity, posture and country policies, written for the test.
const IDENTITY_POLICIES: &str = r#"{
  "egress_pools": {
    "finance-pt": { "ipv4": ["203.0.113.20", "203.0.113.21"] },
    "portugal": { "ipv4": ["203.0.113.30"] }
  },
  "default_egress": { "ipv4": "203.0.113.1" },
  "policies": [
    {
      "name": "compliant finance",
      "identity": "any(identity.groups[*].name in {\"finance\"})",
      "device_posture": "any(device_posture.checks.passed[*] in {\"compliant\"})",
      "action": { "egress": "finance-pt" }
    },
    {
      "name": "to Portugal",
      "traffic": "net.dst.geo.country == \"PT\"",
      "action": { "egress": "portugal" }
    }
  ]
}
"#;

/// A client's flow to the partner (192.0.2.10).
const FLOW: [&str; 4] = ["--src", "10.10.0.2", "--dst", "192.0.2.10"];

/// The arguments of [`FLOW`], then `extra`.
fn flow<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = FLOW.to_vec();
    args.extend_from_slice(extra);
    args
}

fn identity_flow(dir: &TempDir, extra: &[&str]) -> String {
    let config = dir.write("policies.json", IDENTITY_POLICIES);
    explain(&config, &flow(extra))
}

#[test]
fn explain_tcp_443_to_partner_matches_pool_with_fallback() {
    let report = explain(&example(), &flow(&["--proto", "tcp", "--dst-port", "443"]));
    assert!(
        report.starts_with("flow: tcp 10.10.0.2 -> 192.0.2.10 port 443, no identity\n"),
        "the report starts with the flow: {report}"
    );
    assert_eq!(
        policy_line(&report, 0),
        "  [0] \"third-party via Portugal\": MATCH",
        "the first policy matches"
    );
    assert!(
        !report.contains("  [1] "),
        "policies after the match are not evaluated: {report}"
    );
    assert_eq!(
        result_line(&report),
        "result: policy [0] \"third-party via Portugal\" -> leaves from 203.0.113.10 \
         (pool pt-montijo; 203.0.113.11 if it is down)",
        "the flow leaves from the pool's primary, with the secondary named as the fallback"
    );
}

#[test]
fn explain_udp_dns_reports_mismatches_and_matches_catch_all() {
    let report = explain(
        &example(),
        &[
            "--src",
            "10.10.0.2",
            "--dst",
            "198.51.100.10",
            "--proto",
            "udp",
            "--dst-port",
            "53",
        ],
    );
    let first = policy_line(&report, 0);
    assert!(
        first.contains(
            "no match: net.dst.ip in {192.0.2.0/24} is false for destination 198.51.100.10"
        ),
        "[0] fails on its destination condition, and the flow's destination is shown: {first}"
    );
    let second = policy_line(&report, 1);
    assert!(
        second.contains(
            "no match: net.dst.ip in {10.0.0.0/8} is false for destination 198.51.100.10"
        ),
        "[1] fails on its destination condition, and the flow's destination is shown: {second}"
    );
    assert_eq!(
        policy_line(&report, 2),
        "  [2] \"catch-all\": MATCH",
        "the catch-all matches"
    );
    assert_eq!(
        result_line(&report),
        "result: policy [2] \"catch-all\" -> leaves from the default egress 203.0.113.1",
        "the catch-all sends the flow out of the default egress"
    );
}

#[test]
fn explain_private_destination_bypassed() {
    let report = explain(&example(), &["--src", "10.10.0.2", "--dst", "10.1.2.3"]);
    assert_eq!(
        policy_line(&report, 1),
        "  [1] \"lab internal\": MATCH",
        "the lab-internal policy matches 10.0.0.0/8"
    );
    assert_eq!(
        result_line(&report),
        "result: policy [1] \"lab internal\" -> bypass: leaves untouched",
        "a bypassed flow leaves untouched"
    );
}

#[test]
fn explain_icmp_to_partner_fails_protocol_condition() {
    let report = explain(&example(), &flow(&["--proto", "icmp"]));
    assert!(
        report.starts_with("flow: icmp 10.10.0.2 -> 192.0.2.10, no identity\n"),
        "an ICMP flow has no port: {report}"
    );
    let first = policy_line(&report, 0);
    assert!(
        first.contains("no match: net.protocol in {\"tcp\" \"udp\"}")
            && first.ends_with("is false for icmp"),
        "[0] fails on its protocol condition for an ICMP flow: {first}"
    );
    assert!(
        result_line(&report).contains("policy [2] \"catch-all\""),
        "ICMP to the partner falls through to the catch-all: {report}"
    );
}

#[test]
fn explain_mixed_address_families_rejected() {
    let stderr = explain_error(&example(), &["--src", "10.10.0.2", "--dst", "2001:db8::1"]);
    assert!(
        stderr.contains("--src 10.10.0.2 and --dst 2001:db8::1 are of different address families"),
        "the error names both addresses and the problem: {stderr}"
    );
}

#[test]
fn explain_unknown_protocol_rejected() {
    let stderr = explain_error(&example(), &flow(&["--proto", "sctp"]));
    assert!(
        stderr.contains("--proto \"sctp\": expected tcp, udp, icmp, icmpv6 or a protocol number"),
        "the error names the flag, the value and what is accepted: {stderr}"
    );
}

#[test]
fn explain_unknown_country_rejected() {
    let stderr = explain_error(&example(), &flow(&["--country", "UK"]));
    assert!(
        stderr.contains("--country \"UK\" is not an ISO 3166-1 alpha-2 code"),
        "the error names the flag, the value and the expected code: {stderr}"
    );
}

#[test]
fn explain_identity_policy_without_identity_reports_it_needs_one() {
    let dir = TempDir::new("no-identity");
    let report = identity_flow(&dir, &[]);
    assert_eq!(
        policy_line(&report, 0),
        "  [0] \"compliant finance\": no match: it is about identities and the source has none",
        "a flow without an identity cannot match an identity policy"
    );
    assert_eq!(
        result_line(&report),
        "result: no policy matches -> leaves from the default egress 203.0.113.1",
        "with no match the flow leaves from the default egress"
    );
}

/// The group condition holds, the posture one does not: only the posture
/// condition is the reason (a bug once named the group condition, with an
/// empty user name as the flow's value).
#[test]
fn explain_group_without_posture_names_only_posture_condition_false() {
    let dir = TempDir::new("no-posture");
    let report = identity_flow(&dir, &["--group", "finance"]);
    let line = policy_line(&report, 0);
    assert!(
        line.starts_with("  [0] \"compliant finance\": no match: ")
            && line.contains("any(device_posture.checks.passed[*] in {\"compliant\"})")
            && line.contains(" is false for "),
        "without the posture check the posture condition is reported false: {line}"
    );
    assert!(
        line.contains("any(device_posture.checks.passed[*] in {\"compliant\"}) is false"),
        "the posture condition alone is reported false: {line}"
    );
    assert!(
        !line.contains("identity.groups"),
        "the group condition, which holds, is not given as a reason: {line}"
    );
    assert!(
        !line.contains("user \"\""),
        "the flow's value shown is its posture, not an empty user name: {line}"
    );
    assert!(
        !result_line(&report).contains("[0]"),
        "the finance policy does not match: {report}"
    );
}

#[test]
fn explain_group_and_posture_matches() {
    let dir = TempDir::new("posture");
    let report = identity_flow(&dir, &["--group", "finance", "--posture", "compliant"]);
    assert_eq!(
        policy_line(&report, 0),
        "  [0] \"compliant finance\": MATCH",
        "a finance user on a compliant device matches"
    );
    assert_eq!(
        result_line(&report),
        "result: policy [0] \"compliant finance\" -> leaves from 203.0.113.20 \
         (pool finance-pt; 203.0.113.21 if it is down)",
        "the flow leaves from the finance pool"
    );
}

#[test]
fn explain_country_pt_matches_country_policy() {
    let dir = TempDir::new("country");
    let report = identity_flow(&dir, &["--country", "PT"]);
    assert!(
        report
            .lines()
            .next()
            .is_some_and(|l| l.ends_with(", destination country PT")),
        "the flow line shows the destination country: {report}"
    );
    assert_eq!(
        policy_line(&report, 1),
        "  [1] \"to Portugal\": MATCH",
        "a destination in Portugal matches the country policy"
    );
    assert_eq!(
        result_line(&report),
        "result: policy [1] \"to Portugal\" -> leaves from 203.0.113.30 (pool portugal)",
        "the flow leaves from the Portugal pool"
    );

    let report = identity_flow(&dir, &["--country", "ES"]);
    assert!(
        policy_line(&report, 1).contains("net.dst.geo.country in {\"PT\"} is false for country ES"),
        "another country fails the country condition, and the flow's country is shown: {report}"
    );
}

/// Country ranges: the partner's /25 in Spain, with one address moved to
/// Portugal by an override file given after the database.
const GEO_DB: &str =
    "first_ip,last_ip,country_code\n\n192.0.2.0,192.0.2.127,ES\n2001:db8::,2001:db8::ffff,PT\n";
const GEO_OVERRIDE: &str = "192.0.2.10,192.0.2.10,PT\n";

#[test]
fn explain_geoip_later_file_decides_country_and_names_it() {
    let dir = TempDir::new("geoip");
    let config = dir.write("policies.json", IDENTITY_POLICIES);
    let db = dir.write("countries.csv", GEO_DB);
    let fix = dir.write("override.csv", GEO_OVERRIDE);
    let (db, fix) = (db.to_str().unwrap(), fix.to_str().unwrap());

    let report = explain(&config, &flow(&["--geoip", db, "--geoip", fix]));
    assert_eq!(
        report.lines().next(),
        Some(format!("geoip: 192.0.2.10 is in PT (Portugal) according to {fix}").as_str()),
        "the report says which country the lookup found and which file decided: {report}"
    );
    assert!(
        report
            .lines()
            .nth(1)
            .is_some_and(|l| l.ends_with(", destination country PT")),
        "the flow carries the country found: {report}"
    );
    assert_eq!(
        result_line(&report),
        "result: policy [1] \"to Portugal\" -> leaves from 203.0.113.30 (pool portugal)",
        "the looked-up country selects the country policy"
    );

    let report = explain(&config, &flow(&["--geoip", db]));
    assert!(
        report.starts_with(&format!(
            "geoip: 192.0.2.10 is in ES (Spain) according to {db}\n"
        )),
        "without the override the database's country holds: {report}"
    );
    assert!(
        policy_line(&report, 1).contains("is false for country ES"),
        "Spain fails the Portugal policy: {report}"
    );

    let report = explain(
        &config,
        &[
            "--src",
            "10.10.0.2",
            "--dst",
            "198.51.100.7",
            "--geoip",
            db,
            "--geoip",
            fix,
        ],
    );
    assert!(
        report.starts_with(&format!(
            "geoip: 198.51.100.7 is in none of the databases ({db}, {fix}): country unknown\n"
        )),
        "an address no file lists has no country: {report}"
    );
    assert!(
        policy_line(&report, 1).contains("is false for country unknown"),
        "an unknown country matches no country policy: {report}"
    );

    let report = explain(
        &config,
        &[
            "--src",
            "10.10.0.2",
            "--dst",
            "192.0.2.10",
            "--country",
            "ES",
            "--geoip",
            fix,
        ],
    );
    assert!(
        report.starts_with("flow: ") && report.contains(", destination country ES\n"),
        "--country is used as given, the databases are not consulted: {report}"
    );
}

#[test]
fn explain_geoip_bad_database_line_rejected() {
    let dir = TempDir::new("geoip-bad");
    let bad = dir.write("bad.csv", "192.0.2.0,192.0.2.x,ES\n");
    let stderr = explain_error(&example(), &flow(&["--geoip", bad.to_str().unwrap()]));
    assert!(
        stderr.contains(&format!(
            "{}:1: \"192.0.2.x\" is not an IP address",
            bad.display()
        )),
        "the error names the file, the line and the bad value: {stderr}"
    );
}

// Bugs found while writing these tests; each asserts the correct behaviour.

#[test]
fn explain_link_scoped_multicast_and_link_local_pass_untouched() {
    for (src, dst) in [
        ("10.10.0.2", "224.0.0.251"),
        ("0.0.0.0", "255.255.255.255"),
        ("fe80::10", "2001:db8:2::1"),
    ] {
        let report = explain(
            &example(),
            &[
                "--src",
                src,
                "--dst",
                dst,
                "--proto",
                "udp",
                "--dst-port",
                "53",
            ],
        );
        assert!(
            result_line(&report).contains("link-scoped traffic")
                && result_line(&report).contains("passes untouched"),
            "{src} -> {dst} is passed untouched by the dataplane, so explain must say so:\n{report}"
        );
        assert!(
            !report.contains("  [0] "),
            "{src} -> {dst}: no policy is consulted for link-scoped traffic:\n{report}"
        );
    }
}
