//! The control socket on disk and who may talk through it: binding it
//! (private directory, stale-file cleanup, mode 0600) and a listener that
//! serves only root and the agent's own user.

use std::{
    io,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use axum::serve::Listener;
use log::{debug, warn};
use tokio::net::{UnixListener, UnixStream, unix::SocketAddr};

use super::ApiError;

/// Mode of the socket file: only its owner (root) may connect.
const SOCKET_MODE: u32 = 0o600;
/// Mode of a socket directory the agent creates.
const DIR_MODE: u32 = 0o700;
/// How long a probe of an existing socket waits for a listener to accept.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The socket file as bound (device and inode), so that shutting down
/// removes this file and never one a newer agent bound at the same path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FileId {
    dev: u64,
    ino: u64,
}

/// Bind the control socket at `path`.
pub(super) async fn bind(path: &Path) -> Result<(UnixListener, FileId), ApiError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|source| ApiError::CreateDir {
                dir: dir.to_owned(),
                source,
            })?;
    }
    remove_stale(path).await?;
    let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: path.to_owned(),
        source,
    })?;
    // Between bind and chmod the file has the umask's mode; that is
    // harmless because every connection's peer credentials are checked
    // (`RootOnly`), the mode is the second fence, not the only one.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(
        |source| ApiError::SetMode {
            path: path.to_owned(),
            source,
        },
    )?;
    let meta = std::fs::symlink_metadata(path).map_err(|source| ApiError::Bind {
        path: path.to_owned(),
        source,
    })?;
    Ok((
        listener,
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

/// Remove a socket file left by an agent that is gone; refuse when an
/// agent still listens there, or when the path is not a socket at all.
async fn remove_stale(path: &Path) -> Result<(), ApiError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiError::Inspect {
                path: path.to_owned(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ApiError::NotASocket {
            path: path.to_owned(),
        });
    }
    match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
        // A listener whose backlog is full does not accept in time: it is
        // alive all the same.
        Ok(Ok(_)) | Err(_) => Err(ApiError::InUse {
            path: path.to_owned(),
        }),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            debug!("removing the stale control socket {}", path.display());
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(ApiError::RemoveStale {
                    path: path.to_owned(),
                    source,
                }),
            }
        }
        Ok(Err(source)) => Err(ApiError::Inspect {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Remove the socket file at `path` if it is still the one bound as `id`.
pub(super) fn remove_if_ours(path: &Path, id: FileId) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if meta.dev() != id.dev || meta.ino() != id.ino {
        debug!(
            "{} is another socket now; leaving it in place",
            path.display()
        );
        return;
    }
    if let Err(e) = std::fs::remove_file(path) {
        warn!("removing the control socket {}: {e}", path.display());
    }
}

/// Accepts connections and keeps only those whose peer is root or the
/// agent's own effective user; the others are closed unanswered.
pub(super) struct RootOnly {
    inner: UnixListener,
    own_uid: u32,
    path: PathBuf,
}

impl RootOnly {
    pub(super) fn new(inner: UnixListener, path: &Path) -> Self {
        Self {
            inner,
            own_uid: nix::unistd::geteuid().as_raw(),
            path: path.to_owned(),
        }
    }

    fn admits(&self, uid: u32) -> bool {
        uid == 0 || uid == self.own_uid
    }
}

impl Listener for RootOnly {
    type Io = UnixStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // axum's own accept loop logs and backs off on errors (EMFILE).
            let (stream, addr) = Listener::accept(&mut self.inner).await;
            match stream.peer_cred() {
                Ok(cred) if self.admits(cred.uid()) => return (stream, addr),
                Ok(cred) => warn!(
                    "control API {}: refused a connection from uid {} (pid {}): only root may use it",
                    self.path.display(),
                    cred.uid(),
                    cred.pid()
                        .map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
                ),
                Err(e) => warn!(
                    "control API {}: refused a connection whose peer credentials are unreadable: {e}",
                    self.path.display()
                ),
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
