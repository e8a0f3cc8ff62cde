//! `egress-agent import gateway-rules` as a user runs it: converting
//! examples/gateway-rules.json, and the errors for bad exports.

use std::{
    path::{Path, PathBuf},
    process::Output,
};

use serde_json::Value;

mod common;

use common::{TempDir, agent};

fn example() -> PathBuf {
    common::example("gateway-rules.json")
}

fn example_text() -> String {
    std::fs::read_to_string(example()).expect("examples/gateway-rules.json is readable")
}

fn import(file: &Path, extra: &[&str]) -> Output {
    agent()
        .args(["import", "gateway-rules"])
        .arg(file)
        .args(extra)
        .output()
        .expect("egress-agent runs")
}

/// Converts the example with `--default-ipv4 203.0.113.1` (plus `extra`)
/// and returns the policy file text, asserting the run succeeded quietly.
fn import_example_text(extra: &[&str]) -> String {
    let mut args = vec!["--default-ipv4", "203.0.113.1"];
    args.extend_from_slice(extra);
    let out = import(&example(), &args);
    assert!(
        out.status.success(),
        "importing the example must succeed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "a successful import prints nothing on stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("the policy file is UTF-8")
}

fn import_example(extra: &[&str]) -> Value {
    serde_json::from_str(&import_example_text(extra)).expect("the import output is JSON")
}

fn policies(file: &Value) -> &Vec<Value> {
    file["policies"]
        .as_array()
        .expect("the policy file has a policies list")
}

fn policy<'a>(file: &'a Value, name: &str) -> &'a Value {
    policies(file)
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("the output has a policy named {name:?}: {file:#}"))
}

/// The pool a policy's action names.
fn pool_of<'a>(file: &'a Value, name: &str) -> &'a Value {
    let egress = policy(file, name)["action"]["egress"]
        .as_str()
        .expect("action.egress is a string");
    let pool = &file["egress_pools"][egress];
    assert!(
        pool.is_object(),
        "policy {name:?} names the pool {egress:?}, which egress_pools defines: {file:#}"
    );
    pool
}

/// Runs `egress-agent import` on a damaged copy of the example and returns
/// its single error line, asserting it failed with nothing on stdout.
fn import_error(dir: &TempDir, name: &str, text: &str) -> String {
    let path = dir.write(name, text);
    let out = import(&path, &["--default-ipv4", "203.0.113.1"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{name}: the import must fail");
    assert!(
        out.stdout.is_empty(),
        "{name}: nothing on stdout for a rejected export"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "{name}: the error is one line: {stderr}"
    );
    assert!(
        stderr.starts_with(&format!("error: {}: ", path.display())),
        "{name}: the error names the file: {stderr}"
    );
    stderr
}

/// Converts the rules `text` (written to a file of `dir`) with
/// `--default-ipv4 203.0.113.1` and returns the policy file, asserting the
/// run succeeded quietly (`what` says what should have converted).
fn import_rules(dir: &TempDir, text: &str, what: &str) -> Value {
    let path = dir.write("rules.json", text);
    let out = import(&path, &["--default-ipv4", "203.0.113.1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what}: {stderr}");
    assert!(
        stderr.is_empty(),
        "a successful import prints nothing on stderr: {stderr}"
    );
    serde_json::from_slice(&out.stdout).expect("the import output is JSON")
}

/// `text` with the first `from` replaced by `to`, which must be present.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the example contains {from}");
    text.replacen(from, to, 1)
}

#[test]
fn import_example_output_passes_check() {
    let dir = TempDir::new("check");
    let path = dir.write("policies.json", &import_example_text(&[]));
    let out = agent().arg("check").arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "the converted example must be a valid policy file: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("policies (6, first match wins):"),
        "check sees every imported rule as a policy: {stdout}"
    );
}

#[test]
fn import_precedence_orders_policies() {
    let file = import_example(&[]);
    let names: Vec<&str> = policies(&file)
        .iter()
        .map(|p| p["name"].as_str().expect("a policy name is a string"))
        .collect();
    assert_eq!(
        names,
        [
            "Portugal sites",
            "partner SaaS over IPv6",
            "engineering to North America",
            "finance to partner API",
            "legacy SFTP (retired)",
            "everyone else",
        ],
        "policies are in ascending precedence (10, 15, 20, 30, 50, 1000), not export order"
    );
    let descriptions: Vec<&str> = policies(&file)
        .iter()
        .map(|p| p["description"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        descriptions,
        [10, 15, 20, 30, 50, 1000].map(|n| format!("imported gateway rule, precedence {n}")),
        "each policy's description records its rule's precedence"
    );
}

#[test]
fn import_disabled_rule_is_enabled_false() {
    let file = import_example(&[]);
    assert_eq!(
        policy(&file, "legacy SFTP (retired)")["enabled"],
        Value::Bool(false),
        "the disabled rule becomes a policy with \"enabled\": false"
    );
    for p in policies(&file) {
        if p["name"] != "legacy SFTP (retired)" {
            assert!(
                p.get("enabled").is_none_or(|e| *e == Value::Bool(true)),
                "enabled rules stay enabled: {p:#}"
            );
        }
    }
}

#[test]
fn import_shared_egress_triple_shares_one_pool() {
    let file = import_example(&[]);
    assert_eq!(
        policy(&file, "Portugal sites")["action"]["egress"],
        policy(&file, "finance to partner API")["action"]["egress"],
        "two rules with the same egress addresses use the same pool"
    );
    let shared = pool_of(&file, "Portugal sites");
    assert_eq!(
        shared["ipv4"],
        serde_json::json!(["203.0.113.10", "203.0.113.11"]),
        "the pool lists the primary, then the fallback"
    );
    assert_eq!(
        shared["ipv6"], "2001:db8:e0::/64",
        "the pool keeps the rule's IPv6 range"
    );
    let pools = file["egress_pools"]
        .as_object()
        .expect("egress_pools is an object");
    assert_eq!(
        pools.len(),
        4,
        "one pool per distinct address triple (the default egress needs none): {pools:#?}"
    );
    let contents: Vec<&Value> = pools.values().collect();
    for (i, a) in contents.iter().enumerate() {
        assert!(
            !contents[i + 1..].contains(a),
            "no two pools hold the same addresses: {pools:#?}"
        );
    }
    assert_eq!(
        pool_of(&file, "partner SaaS over IPv6")["ipv4"],
        serde_json::json!(["203.0.113.30"]),
        "an empty fallback adds no address"
    );
    assert!(
        pool_of(&file, "legacy SFTP (retired)")
            .get("ipv6")
            .is_none(),
        "an empty IPv6 setting gives a pool without an IPv6 range"
    );
}

#[test]
fn import_unspecified_ipv4_uses_default_egress() {
    let file = import_example(&[]);
    let catch_all = policy(&file, "everyone else");
    assert_eq!(
        catch_all["action"]["egress"], "default",
        "an egress of 0.0.0.0 becomes the shared default egress"
    );
    assert_eq!(
        catch_all["selector"],
        serde_json::json!({}),
        "a rule without expressions matches every flow"
    );
    assert_eq!(
        file["default_egress"],
        serde_json::json!({ "ipv4": "203.0.113.1" }),
        "--default-ipv4 is the default egress, with no IPv6 unless asked for"
    );
    for (name, pool) in file["egress_pools"].as_object().unwrap() {
        assert!(
            !pool["ipv4"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a == "0.0.0.0"),
            "0.0.0.0 is never a pool address ({name})"
        );
    }
}

#[test]
fn import_expressions_carried_verbatim() {
    let file = import_example(&[]);
    let export: Value = serde_json::from_str(&example_text()).unwrap();
    let rules = export["result"]
        .as_array()
        .expect("the example has a result list");
    for rule in rules {
        let name = rule["name"].as_str().unwrap();
        let p = policy(&file, name);
        for field in ["traffic", "identity", "device_posture"] {
            let text = rule[field].as_str().unwrap_or("");
            if text.is_empty() {
                assert!(
                    p.get(field).is_none(),
                    "{name}: an empty {field} is left out, not carried as \"\""
                );
            } else {
                assert_eq!(
                    p[field], text,
                    "{name}: the {field} expression is carried verbatim"
                );
            }
        }
    }
}

#[test]
fn import_default_ipv6_sets_default_egress() {
    let file = import_example(&["--default-ipv6", "2001:db8:ff::1"]);
    assert_eq!(
        file["default_egress"],
        serde_json::json!({ "ipv4": "203.0.113.1", "ipv6": "2001:db8:ff::1" }),
        "--default-ipv6 is the default IPv6 egress"
    );
    let dir = TempDir::new("ipv6");
    let path = dir.write("policies.json", &file.to_string());
    let out = agent().arg("check").arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "the converted example with an IPv6 default must be valid: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = agent()
        .arg("explain")
        .arg("--config")
        .arg(&path)
        .args(["--src", "2001:db8:1::2", "--dst", "2001:db8:9::1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "explain runs on the converted file");
    assert!(
        stdout.contains(
            "result: policy [5] \"everyone else\" -> leaves from the default egress 2001:db8:ff::1"
        ),
        "an IPv6 flow caught by the 0.0.0.0 rule leaves from the default IPv6 egress: {stdout}"
    );
}

#[test]
fn import_output_flag_writes_file_and_prints_nothing() {
    let dir = TempDir::new("output");
    let target = dir.join("policies.json");
    let out = import(
        &example(),
        &[
            "--default-ipv4",
            "203.0.113.1",
            "-o",
            target.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "import -o must succeed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "with -o nothing goes to stdout");
    assert!(out.stderr.is_empty(), "with -o nothing goes to stderr");
    let written = std::fs::read_to_string(&target).expect("-o writes the file");
    assert_eq!(
        written,
        import_example_text(&[]),
        "the file holds what standard output would have"
    );
}

#[test]
fn import_plain_list_matches_api_response() {
    let export: Value = serde_json::from_str(&example_text()).unwrap();
    let dir = TempDir::new("list");
    let path = dir.write("rules.json", &export["result"].to_string());
    let out = import(&path, &["--default-ipv4", "203.0.113.1"]);
    assert!(
        out.status.success(),
        "a bare list of rules is accepted: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        import_example_text(&[]),
        "a bare list converts like the API response holding it"
    );
}

#[test]
fn import_converted_example_steers_portugal_to_shared_pool() {
    let dir = TempDir::new("explain");
    let path = dir.write("policies.json", &import_example_text(&[]));
    let out = agent()
        .arg("explain")
        .arg("--config")
        .arg(&path)
        .args([
            "--src",
            "10.10.0.2",
            "--dst",
            "198.51.100.10",
            "--country",
            "PT",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "explain runs on the converted file");
    assert!(
        stdout.contains(
            "result: policy [0] \"Portugal sites\" -> leaves from 203.0.113.10 \
             (pool egress-203.0.113.10; 203.0.113.11 if it is down)"
        ),
        "a flow to Portugal leaves from the shared pool's primary: {stdout}"
    );
}

#[test]
fn import_bad_rule_ipv4_fails_naming_path() {
    let dir = TempDir::new("bad-ipv4");
    let text = replace_once(&example_text(), "\"198.51.100.20\"", "\"198.51.100.300\"");
    let stderr = import_error(&dir, "rules.json", &text);
    assert!(
        stderr.contains(
            "result[2].rule_settings.egress.ipv4: \"198.51.100.300\" is not an IPv4 address"
        ),
        "the error names the rule's ipv4 setting and the bad value: {stderr}"
    );
}

#[test]
fn import_bad_expression_fails_naming_path_and_position() {
    let dir = TempDir::new("bad-expr");
    let text = replace_once(
        &example_text(),
        r#"net.dst.geo.country == \"PT\""#,
        r#"net.dst.geo.country = \"PT\""#,
    );
    let stderr = import_error(&dir, "one-line.json", &text);
    assert!(
        stderr.contains("result[1].traffic: 1:21: unexpected \"=\" (compare with \"==\")"),
        "the error names the rule's traffic expression and the line:column: {stderr}"
    );

    let text = replace_once(
        &example_text(),
        r#"net.dst.geo.country == \"PT\""#,
        r#"net.dst.geo.country == \"PT\"\n  and net.dst.port == 99999"#,
    );
    let stderr = import_error(&dir, "two-lines.json", &text);
    assert!(
        stderr.contains("result[1].traffic: 2:23: invalid port \"99999\""),
        "the position of an error on an expression's second line is 2:column: {stderr}"
    );
}

#[test]
fn import_non_egress_action_fails_naming_rule() {
    let dir = TempDir::new("action");
    let text = replace_once(
        &example_text(),
        "\"action\": \"egress\"",
        "\"action\": \"block\"",
    );
    let stderr = import_error(&dir, "rules.json", &text);
    assert!(
        stderr.contains("result[0].action: \"block\" is not an egress rule"),
        "the error names the rule's action: {stderr}"
    );
}

#[test]
fn import_non_json_input_fails_with_one_line() {
    let dir = TempDir::new("not-json");
    let stderr = import_error(&dir, "rules.json", "name: everyone else\nprecedence: 1\n");
    assert!(
        stderr.contains("expected a JSON list of gateway rules"),
        "the error says what input was expected: {stderr}"
    );
    assert!(
        stderr.contains("at line 1 column "),
        "the error says where the JSON breaks: {stderr}"
    );
}

#[test]
fn import_missing_default_ipv4_fails_with_usage_error() {
    let out = import(&example(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a missing required flag is a usage error (exit 2): {stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing on stdout for a usage error");
    assert!(
        stderr.starts_with("error: the following required arguments were not provided"),
        "clap reports the missing argument: {stderr}"
    );
    assert!(
        stderr.contains("--default-ipv4 <IPV4>"),
        "the error names --default-ipv4: {stderr}"
    );
}

// Bugs found while writing these tests; each asserts the correct behaviour.

#[test]
fn import_repeated_names_made_unique_without_collision() {
    let dir = TempDir::new("names");
    let rules = r#"[
        {"name": "a", "precedence": 1, "traffic": "net.dst.port == 443",
         "rule_settings": {"egress": {"ipv4": "203.0.113.10"}}},
        {"name": "a", "precedence": 2, "traffic": "net.dst.port == 8443",
         "rule_settings": {"egress": {"ipv4": "203.0.113.10"}}},
        {"name": "a (2)", "precedence": 3,
         "rule_settings": {"egress": {"ipv4": "0.0.0.0"}}}
    ]"#;
    let file = import_rules(
        &dir,
        rules,
        "three rules whose names are unique after renaming convert",
    );
    let mut names: Vec<&str> = policies(&file)
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "every rule becomes a policy");
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 3, "policy names are unique");
}

#[test]
fn import_fallback_equal_to_primary_pool_holds_primary_only() {
    let dir = TempDir::new("fallback");
    let rules = r#"{"result": [
        {"name": "a", "precedence": 1,
         "rule_settings": {"egress": {"ipv4": "203.0.113.10", "ipv4_fallback": "203.0.113.10"}}}
    ]}"#;
    let file = import_rules(
        &dir,
        rules,
        "a fallback equal to the primary is no fallback, not an error",
    );
    assert_eq!(
        pool_of(&file, "a")["ipv4"],
        serde_json::json!(["203.0.113.10"]),
        "a fallback equal to the primary adds nothing to the pool"
    );
}

#[test]
fn import_equivalent_egress_settings_share_one_pool() {
    let dir = TempDir::new("equivalent");
    let rules = r#"{"result": [
        {"name": "a", "precedence": 1, "traffic": "net.dst.port == 443",
         "rule_settings": {"egress": {"ipv4": "203.0.113.10", "ipv4_fallback": "203.0.113.11", "ipv6": ""}}},
        {"name": "b", "precedence": 2,
         "rule_settings": {"egress": {"ipv4": "203.0.113.10", "ipv4_fallback": "203.0.113.11"}}}
    ]}"#;
    let file = import_rules(&dir, rules, "the rules convert");
    assert_eq!(
        policy(&file, "a")["action"]["egress"],
        policy(&file, "b")["action"]["egress"],
        "rules with the same addresses share one pool however \"no IPv6\" is spelled"
    );
    assert_eq!(
        file["egress_pools"].as_object().unwrap().len(),
        1,
        "one pool for one address triple"
    );
}
