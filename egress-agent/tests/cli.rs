//! The `egress-agent` binary as a user runs it: `check` on good and bad files.

use std::path::PathBuf;

mod common;

use common::{TempDir, agent};

fn example() -> PathBuf {
    common::example("policies.json")
}

#[test]
fn check_example_prints_compiled_summary() {
    let out = agent().arg("check").arg(example()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the example must be valid: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = [
        "  [0] \"third-party via Portugal\" -> pool pt-montijo [203.0.113.10 203.0.113.11]",
        "       net.dst.ip in {192.0.2.0/24} and net.protocol in {\"tcp\" \"udp\"} and net.dst.port in {443 8000..8100}",
        "  [1] \"lab internal\" -> bypass (untouched)",
        "       net.dst.ip in {10.0.0.0/8}",
        "  [2] \"catch-all\" -> default (203.0.113.1)",
        "       any flow",
    ];
    for line in expected {
        assert!(
            stdout.lines().any(|l| l == line),
            "missing line {line:?} in:\n{stdout}"
        );
    }
    assert!(
        !stdout.contains("warning"),
        "the example has no unreachable policy: {stdout}"
    );
}

#[test]
fn check_bad_inputs_fail_with_one_line_naming_the_path() {
    let text = std::fs::read_to_string(example()).unwrap();
    let dir = TempDir::new("bad-inputs");
    let cases = [
        (
            "\"10.0.0.0/8\"",
            "\"10.0.0.0/33\"",
            "policies[1].selector.dst[0]: invalid CIDR \"10.0.0.0/33\"",
        ),
        (
            "\"443\"",
            "\"70000\"",
            "policies[0].selector.dst_ports[0]: invalid port \"70000\"",
        ),
        (
            "\"egress\": \"pt-montijo\"",
            "\"egress\": \"nowhere\"",
            "policies[0].action.egress: unknown egress pool \"nowhere\"",
        ),
        (
            "\"dst_ports\"",
            "\"dst_port\"",
            "policies[0].selector.dst_port: unknown field `dst_port`",
        ),
        (
            "\"lab internal\"",
            "\"catch-all\"",
            "policies[2].name: duplicate policy name \"catch-all\"",
        ),
        ("{", "{{", "not valid JSON"),
    ];
    for (i, (from, to, expected)) in cases.into_iter().enumerate() {
        let path = dir.write(&format!("bad{i}.json"), &text.replacen(from, to, 1));
        let out = agent().arg("check").arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{expected}: check must fail");
        assert!(
            out.stdout.is_empty(),
            "{expected}: nothing on stdout for a rejected file"
        );
        assert_eq!(stderr.lines().count(), 1, "one line of error: {stderr}");
        assert!(
            stderr.starts_with(&format!("error: {}: ", path.display())),
            "{stderr}"
        );
        assert!(
            stderr.contains(expected),
            "{stderr} must contain {expected}"
        );
    }
}

#[test]
fn check_missing_file_names_it() {
    let out = agent()
        .args(["check", "/nonexistent/policies.json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot read /nonexistent/policies.json"),
        "{stderr}"
    );
}

#[test]
fn run_world_writable_policy_file_refused_before_touching_anything() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("insecure-run");
    let config = dir.write(
        "policies.json",
        &std::fs::read_to_string(example()).unwrap(),
    );
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o666)).unwrap();
    let pins = dir.join("pins");
    let out = agent()
        .args(["run", "--uplink", "lo", "--no-watch", "--config"])
        .arg(&config)
        .arg("--pin-path")
        .arg(&pins)
        .arg("--api")
        .arg(dir.join("api.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a world-writable policy file stops the start: {stderr}"
    );
    assert!(
        stderr.contains(&format!("policy file {}", config.display()))
            && stderr.contains("--allow-insecure-config"),
        "the error names the file and the way out: {stderr}"
    );
    assert!(
        !pins.exists() && !dir.join("state").exists() && !dir.join("api.sock").exists(),
        "nothing was created before the refusal"
    );
}
