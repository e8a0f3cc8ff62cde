//! Lab test of who may change how traffic leaves: the agent's pin
//! directories are root's alone, and a policy file that a user other than
//! root could change is refused on reload, the policies in force staying
//! until only root can write the file again.

use std::{net::IpAddr, os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use super::{nat_lab::policy_set, prog_test_run::require_root};
use crate::{
    agent::Agent,
    lab::{DEDICATED_PRIMARY, GW_UPLINK, Lab, SERVER_PUBLIC, servers},
    pins::PinPath,
    probe::{self, Servers, sa},
    tempdir::TempDir,
};

/// The public server via the dedicated address (`via_pool`), or via the
/// shared default.
fn policies(via_pool: bool) -> String {
    let public = r#"{ "name": "public via pool", "selector": { "dst": ["198.51.100.0/24"] }, "action": { "egress": "pool" } }"#;
    let rules: &[&str] = if via_pool { &[public] } else { &[] };
    policy_set(r#""pool": { "ipv4": ["203.0.113.10"] }"#, rules, "")
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn public_flow_source(lab: &Lab, label: &str) -> IpAddr {
    let seen = probe::tcp(
        &lab.client,
        None,
        sa(SERVER_PUBLIC, 443),
        probe::token(label),
    )
    .expect("a new flow to the public server");
    assert!(seen.intact, "the {label} flow's bytes come back intact");
    seen.src.ip()
}

#[test]
fn security_policy_file_made_world_writable_reload_refused_policies_stay_until_fixed() {
    require_root();
    let lab = Lab::new(0).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("insecure-config");
    let config = dir.write("policies.json", &policies(true));
    let pins = PinPath::new().unwrap();
    let agent = Agent::steering(&lab, &config, &["--pin-path", pins.arg()]).unwrap();
    // The pins give full access to every flow's translation: root's alone.
    for dir in [pins.path().to_path_buf(), pins.path().join("maps")] {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "{} is created 0700", dir.display());
    }
    assert_eq!(
        public_flow_source(&lab, "before"),
        IpAddr::from(DEDICATED_PRIMARY),
        "the first policy set steers the public server through the pool"
    );

    // Any user may now write the file, and it says something else: written
    // in place, so the mode stays, and the file watch notices by itself.
    chmod(&config, 0o666);
    std::fs::write(&config, policies(false)).unwrap();
    agent
        .wait_for("reload rejected", Duration::from_secs(10))
        .expect("the file watch's reload of a world-writable file is rejected");
    let err = agent.cli(&["reload"]).unwrap_err().to_string();
    assert!(
        err.contains("policies.json")
            && err.contains("every user")
            && err.contains("--allow-insecure-config"),
        "the API's rejection names the file, who may write it and the way out: {err}"
    );
    assert_eq!(
        public_flow_source(&lab, "insecure"),
        IpAddr::from(DEDICATED_PRIMARY),
        "new flows keep following the policies in force"
    );

    // Root takes the file back: the same content is now applied.
    chmod(&config, 0o644);
    agent
        .cli(&["reload"])
        .expect("the reload of a 0644 file is applied");
    assert_eq!(
        public_flow_source(&lab, "fixed"),
        IpAddr::from(GW_UPLINK),
        "new flows follow the file once only root can change it"
    );
}
