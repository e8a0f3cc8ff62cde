//! Noticing that the policy file (or the identities file, or a country
//! database) changed on disk, so the agent reloads without a signal.
//!
//! Polled rather than inotify-driven: editors and configuration managers
//! replace files by rename and orchestrators swap symlinks, which a watch
//! on the file itself misses; a stat per second is negligible. A change is
//! acted on once it has stayed the same for a whole poll interval, so a
//! file still being written is never read half-way.

use std::{
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    time::{Duration, Instant},
};

/// What identifies one version of a file: where it is and when it was last
/// written (following symlinks). `None` when it cannot be read.
pub type Fingerprint = Vec<Option<(u64, u64, i64, i64, u64)>>;

pub struct FileWatch {
    paths: Vec<PathBuf>,
    /// The version last acted on.
    applied: Fingerprint,
    /// A newer version and when it was first seen.
    seen: Option<(Fingerprint, Instant)>,
    settle: Duration,
}

pub fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
        })
        .collect()
}

impl FileWatch {
    /// Watch `paths` as they are now; a change must hold still for
    /// `settle` before [`FileWatch::poll`] reports it.
    pub fn new(paths: Vec<PathBuf>, settle: Duration) -> Self {
        let applied = fingerprint(&paths);
        Self {
            paths,
            applied,
            seen: None,
            settle,
        }
    }

    /// Whether the files changed and have since settled. Reported once per
    /// change, whether or not the reload it triggers succeeds.
    pub fn poll(&mut self, now: Instant) -> bool {
        let current = fingerprint(&self.paths);
        if current == self.applied {
            self.seen = None;
            return false;
        }
        match &self.seen {
            Some((fp, since)) if *fp == current => {
                if now.duration_since(*since) >= self.settle {
                    self.applied = current;
                    self.seen = None;
                    return true;
                }
                false
            }
            _ => {
                self.seen = Some((current, now));
                false
            }
        }
    }

    /// Take the files as they are now as applied (after a reload by
    /// signal or API), so the same change does not trigger another.
    pub fn mark_applied(&mut self) {
        self.applied = fingerprint(&self.paths);
        self.seen = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_change_reported_once_after_it_settles() {
        let dir = std::env::temp_dir().join(format!("egress-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("p.json");
        std::fs::write(&file, "a").unwrap();
        let settle = Duration::from_millis(500);
        let mut w = FileWatch::new(vec![file.clone()], settle);
        let t0 = Instant::now();
        assert!(!w.poll(t0), "nothing changed");
        // Replaced by rename, as editors do.
        let tmp = dir.join("p.tmp");
        std::fs::write(&tmp, "bb").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        assert!(!w.poll(t0), "a fresh change is not acted on at once");
        assert!(!w.poll(t0 + Duration::from_millis(100)), "still settling");
        assert!(w.poll(t0 + settle), "settled: reload");
        assert!(!w.poll(t0 + settle * 2), "reported once");
        std::fs::remove_file(&file).unwrap();
        assert!(!w.poll(t0 + settle * 3));
        assert!(w.poll(t0 + settle * 4), "a vanished file is a change too");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
