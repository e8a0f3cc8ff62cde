//! Sessions added through the control API, kept on disk so that a restarted
//! or upgraded agent still knows who is behind which address before the
//! API's clients push their sessions again.
//!
//! The file is the identities file's format with explicit ids, written
//! whole to a temporary file and renamed over the old one (mode 0600), so
//! a crash never leaves half a file.

use std::{
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use super::{
    file::{self, IdentitiesError, IdentitiesFile},
    model::SessionView,
};

/// File name of the saved sessions inside the state directory.
pub const SESSIONS_FILE: &str = "sessions.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("creating the state directory {dir}")]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the saved sessions {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Read(#[from] IdentitiesError),
}

/// Save `sessions` (the API's) in `dir`.
pub fn save(dir: &Path, sessions: &[SessionView]) -> Result<(), StateError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StateError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
    let path = dir.join(SESSIONS_FILE);
    let tmp = dir.join(format!(".{SESSIONS_FILE}.tmp"));
    let entries: Vec<serde_json::Value> = sessions
        .iter()
        .map(|s| {
            let mut entry = serde_json::to_value(&s.spec).expect("a session spec serialises");
            entry["id"] = s.id.clone().into();
            entry
        })
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({ "sessions": entries }))
        .expect("JSON values serialise");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|source| StateError::Write { path, source })
}

/// The sessions saved in `dir`, if any (expired ones skipped).
pub fn load(dir: &Path, now: jiff::Timestamp) -> Result<Option<IdentitiesFile>, StateError> {
    let path = dir.join(SESSIONS_FILE);
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(file::load(&path, now, file::LOAD_ID_PREFIX)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Origin, SessionSpec};

    #[test]
    fn state_saved_sessions_load_back_and_file_is_private() {
        let dir = std::env::temp_dir().join(format!("egress-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let now = jiff::Timestamp::now();
        assert!(load(&dir, now).unwrap().is_none(), "nothing saved yet");
        let spec: SessionSpec = serde_json::from_str(
            r#"{"user":"ana@x","groups":["finance"],"addresses":["10.0.0.2","2001:db8::/64"]}"#,
        )
        .unwrap();
        let views = vec![SessionView {
            id: "ana".into(),
            spec: spec.clone(),
            origin: Origin::Api,
        }];
        save(&dir, &views).unwrap();
        let back = load(&dir, now).unwrap().unwrap();
        assert_eq!(back.sessions, vec![("ana".to_string(), spec)]);
        let mode = std::fs::metadata(dir.join(SESSIONS_FILE))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600,
            "only root reads who is behind which address"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
