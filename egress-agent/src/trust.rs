//! Whether a configuration file may be trusted: the policy file, the
//! identities file and the country databases decide which address every flow
//! leaves from, so only root (or the agent's own user) may be able to change
//! them. Checked at start and at every reload, like sshd's StrictModes:
//! the file, every directory above it, and every symbolic link on the way.

use std::{
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::{Component, Path, PathBuf},
};

/// Directories with the sticky bit (such as /tmp) may be world-writable:
/// others can add entries there but not rename or remove root's.
const STICKY: u32 = 0o1000;
const GROUP_OR_OTHER_WRITE: u32 = 0o022;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{what} {path}: cannot check who may change it: {source}")]
    Stat {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{what} {file}: {path} is owned by uid {uid}, so that user could change which address traffic leaves from; make root its owner (`chown root {path}`) or start with --allow-insecure-config"
    )]
    Owner {
        what: &'static str,
        file: PathBuf,
        path: PathBuf,
        uid: u32,
    },
    #[error(
        "{what} {file}: {path} is writable by {who} (mode {mode:04o}), so they could change which address traffic leaves from; remove the write bit (`chmod go-w {path}`) or start with --allow-insecure-config"
    )]
    Writable {
        what: &'static str,
        file: PathBuf,
        path: PathBuf,
        who: &'static str,
        mode: u32,
    },
}

/// The users a file may belong to: root, and the user the agent runs as
/// (an agent run with capabilities under its own account owns its files).
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// Check every file the agent steers by: the policy file, the identities
/// file and the country databases.
pub fn check_config(
    policy: &Path,
    identities: Option<&Path>,
    geoip: &[PathBuf],
) -> Result<(), TrustError> {
    check("policy file", policy)?;
    if let Some(path) = identities {
        check("identities file", path)?;
    }
    for path in geoip {
        check("country database", path)?;
    }
    Ok(())
}

/// Check `file` (described as `what`, e.g. "policy file") and everything a
/// non-root user could use to swap it: its directories and any symbolic
/// link on the path as given, then the same for the path it resolves to.
pub fn check(what: &'static str, file: &Path) -> Result<(), TrustError> {
    let stat_err = |path: &Path, source| TrustError::Stat {
        what,
        path: path.to_path_buf(),
        source,
    };
    let absolute = std::path::absolute(file).map_err(|e| stat_err(file, e))?;
    let resolved = std::fs::canonicalize(&absolute).map_err(|e| stat_err(&absolute, e))?;
    for path in [&absolute, &resolved] {
        let mut prefix = PathBuf::new();
        for component in path.components() {
            match component {
                Component::ParentDir => {
                    prefix.pop();
                }
                Component::CurDir => {}
                other => prefix.push(other),
            }
            let meta = std::fs::symlink_metadata(&prefix).map_err(|e| stat_err(&prefix, e))?;
            check_entry(what, file, &prefix, &meta)?;
        }
    }
    Ok(())
}

fn check_entry(
    what: &'static str,
    file: &Path,
    path: &Path,
    meta: &std::fs::Metadata,
) -> Result<(), TrustError> {
    if !trusted_owner(meta.uid()) {
        return Err(TrustError::Owner {
            what,
            file: file.to_path_buf(),
            path: path.to_path_buf(),
            uid: meta.uid(),
        });
    }
    let kind = meta.file_type();
    // A symbolic link's own mode bits mean nothing; its owner was checked.
    if kind.is_symlink() || kind.is_char_device() {
        return Ok(());
    }
    let mode = meta.mode() & 0o7777;
    if mode & GROUP_OR_OTHER_WRITE == 0 || (kind.is_dir() && mode & STICKY != 0) {
        return Ok(());
    }
    Err(TrustError::Writable {
        what,
        file: file.to_path_buf(),
        path: path.to_path_buf(),
        who: if mode & 0o002 != 0 {
            "every user"
        } else {
            "its group"
        },
        mode,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// A private directory under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(label: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "egress-trust-{label}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir(&dir).expect("creating the scratch dir");
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
                .expect("chmod 0755 the scratch dir");
            Self(dir)
        }

        fn file(&self, name: &str, mode: u32) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, "{}").expect("writing a scratch file");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .expect("chmod the scratch file");
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The temp dir itself may be anything on a developer's machine; these
    /// tests only make sense where it is root's or ours.
    fn temp_dir_trusted() -> bool {
        check("probe", &std::env::temp_dir()).is_ok()
    }

    #[test]
    fn trust_owner_only_writable_file_is_accepted() {
        if !temp_dir_trusted() {
            return;
        }
        let dir = Scratch::new("ok");
        let file = dir.file("policies.json", 0o644);
        check("policy file", &file).expect("a 0644 file of ours in a 0755 dir is trusted");
    }

    #[test]
    fn trust_world_writable_file_is_refused_naming_the_file_and_the_flag() {
        if !temp_dir_trusted() {
            return;
        }
        let dir = Scratch::new("o-w");
        let file = dir.file("policies.json", 0o666);
        let err = check("policy file", &file).expect_err("a 0666 file is not trusted");
        let text = err.to_string();
        assert!(
            matches!(
                err,
                TrustError::Writable {
                    who: "every user",
                    mode: 0o666,
                    ..
                }
            ),
            "the error says every user may write it: {text}"
        );
        assert!(
            text.contains("policies.json") && text.contains("--allow-insecure-config"),
            "the message names the file and the way out: {text}"
        );
    }

    #[test]
    fn trust_group_writable_directory_is_refused_naming_the_directory() {
        if !temp_dir_trusted() {
            return;
        }
        let dir = Scratch::new("g-w-dir");
        let file = dir.file("identities.json", 0o600);
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o775)).unwrap();
        let err = check("identities file", &file).expect_err("a group-writable dir is not trusted");
        match &err {
            TrustError::Writable { path, who, .. } => {
                assert_eq!(path, &dir.0, "the directory is named: {err}");
                assert_eq!(*who, "its group", "the group is named: {err}");
            }
            other => panic!("expected a writable-directory error, got {other}"),
        }
    }

    #[test]
    fn trust_sticky_world_writable_directory_is_accepted() {
        if !temp_dir_trusted() {
            return;
        }
        let dir = Scratch::new("sticky");
        let file = dir.file("policies.json", 0o644);
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o1777)).unwrap();
        check("policy file", &file).expect("a sticky directory such as /tmp is trusted");
    }

    #[test]
    fn trust_symlink_to_writable_file_is_refused() {
        if !temp_dir_trusted() {
            return;
        }
        let dir = Scratch::new("link");
        let target = dir.file("real.json", 0o646);
        let link = dir.0.join("policies.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = check("policy file", &link).expect_err("the link's target is other-writable");
        assert!(
            matches!(&err, TrustError::Writable { path, .. } if path == &target),
            "the resolved target is named: {err}"
        );
    }

    #[test]
    fn trust_file_owned_by_another_user_is_refused_naming_the_uid() {
        if !temp_dir_trusted() || !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = Scratch::new("owner");
        let file = dir.file("policies.json", 0o644);
        let nobody = 65534;
        std::os::unix::fs::chown(&file, Some(nobody), None).expect("chown to nobody (as root)");
        let err = check("policy file", &file).expect_err("a file nobody owns is not trusted");
        assert!(
            matches!(&err, TrustError::Owner { uid, path, .. } if *uid == nobody && path == &file),
            "the owner's uid and the file are named: {err}"
        );
    }

    #[test]
    fn trust_missing_file_is_a_stat_error_naming_it() {
        let err = check(
            "policy file",
            Path::new("/nonexistent/egress/policies.json"),
        )
        .expect_err("a missing file cannot be checked");
        assert!(
            matches!(err, TrustError::Stat { .. }) && err.to_string().contains("/nonexistent"),
            "the message names the path: {err}"
        );
    }
}
