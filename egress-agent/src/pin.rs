//! The pin directory on a BPF filesystem: its layout (`maps/<MAP>`,
//! `links/<iface>-<direction>`), the lock that keeps a second agent off it,
//! and removing everything it holds.
//!
//! Pins are what let the dataplane outlive the agent: a pinned map keeps
//! its entries and a pinned tcx link keeps its program attached after the
//! process that made them is gone, until the pin file is removed.

use std::{
    fmt,
    fs::File,
    io,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use nix::{
    fcntl::{Flock, FlockArg},
    sys::statfs::{self, FsType},
};

/// Where `run` pins and `down` looks, unless `--pin-path` says otherwise.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/egress-agent";
/// Mode of every directory the agent creates: pins give full access to the
/// maps (rewrite any flow's translation), so only root may reach them.
const DIR_MODE: u32 = 0o700;
const MAPS: &str = "maps";
const LINKS: &str = "links";
/// Suffix of a pinned program standing for a netlink (clsact) filter, which
/// has no link object to pin; it records the interface for `down`.
const NETLINK_SUFFIX: &str = "-netlink";

/// The two TC hooks the programs attach to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Egress,
    Ingress,
}

impl Direction {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Egress => "egress",
            Self::Ingress => "ingress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an attachment is pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// A tcx link: removing its pin detaches the program.
    Tcx,
    /// A program behind a netlink filter: the filter must be removed too.
    Netlink,
}

/// One attachment as its pin file names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkPin {
    pub iface: String,
    pub direction: Direction,
    pub kind: LinkKind,
}

impl LinkPin {
    /// The pin's file name inside `links/`: `<iface>-<direction>`, and
    /// `-netlink` after it for a netlink filter's marker. bpffs refuses
    /// names with a '.' (it keeps those for its own files), which interface
    /// names may hold (VLANs: `eth0.100`), so '.' is written `%2e` (and
    /// '%' itself `%25`).
    pub fn file_name(&self) -> String {
        let suffix = match self.kind {
            LinkKind::Tcx => "",
            LinkKind::Netlink => NETLINK_SUFFIX,
        };
        let iface = self.iface.replace('%', "%25").replace('.', "%2e");
        format!("{iface}-{}{suffix}", self.direction)
    }

    /// The attachment a file name of `links/` stands for (`None`: not ours).
    pub fn parse(name: &str) -> Option<Self> {
        let (name, kind) = match name.strip_suffix(NETLINK_SUFFIX) {
            Some(rest) => (rest, LinkKind::Netlink),
            None => (name, LinkKind::Tcx),
        };
        // Interface names may hold '-' themselves: the direction is last.
        let (iface, direction) = name.rsplit_once('-')?;
        let direction = match direction {
            "egress" => Direction::Egress,
            "ingress" => Direction::Ingress,
            _ => return None,
        };
        (!iface.is_empty()).then(|| Self {
            iface: iface.replace("%2e", ".").replace("%25", "%"),
            direction,
            kind,
        })
    }
}

/// The pid holding a lock, when `/proc/locks` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder(pub Option<u32>);

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(pid) => write!(f, " (pid {pid})"),
            None => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "pin path {path} is not on a BPF filesystem ({checked} is {fs}): mount one with `mount -t bpf bpf {checked}` or choose another --pin-path. `ip netns exec` mounts a fresh /sys, which hides /sys/fs/bpf: there, use a BPF filesystem mounted outside /sys (e.g. `mkdir -p /run/egress-agent/bpf && mount -t bpf bpf /run/egress-agent/bpf`)"
    )]
    NotBpfFs {
        path: PathBuf,
        checked: PathBuf,
        fs: String,
    },
    #[error("checking the filesystem of {path}: {source}")]
    Statfs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(
        "another egress-agent{holder} is running with pin path {path}: stop it first, or give this one another --pin-path"
    )]
    Locked { path: PathBuf, holder: Holder },
    #[error("creating pin directory {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("locking pin directory {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pin directory {path} was removed and re-created while this agent locked it")]
    Replaced { path: PathBuf },
    #[error("reading pin directory {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What [`PinDir::remove_all`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub links: Vec<LinkPin>,
    pub maps: Vec<String>,
}

/// A pin directory this process holds the lock of (until dropped). The
/// lock is an `flock` on the directory itself: the kernel drops it when the
/// process dies, however it dies, so a killed agent never blocks the next.
#[derive(Debug)]
pub struct PinDir {
    root: PathBuf,
    _lock: Flock<File>,
}

impl PinDir {
    /// Create the directory (mode 0700) if needed and take its lock.
    pub fn lock(root: &Path) -> Result<Self, PinError> {
        check_bpffs(root)?;
        // A stopping agent may remove the directory between our mkdir and
        // our lock; then lock the new one.
        for _ in 0..3 {
            create_dir(root)?;
            match Self::try_lock(root)? {
                Some(dir) => {
                    for sub in [MAPS, LINKS] {
                        create_dir(&root.join(sub))?;
                    }
                    return Ok(dir);
                }
                None => continue,
            }
        }
        Err(PinError::Replaced {
            path: root.to_owned(),
        })
    }

    /// Lock an existing directory without creating anything; `None` when
    /// there is no directory.
    pub fn lock_existing(root: &Path) -> Result<Option<Self>, PinError> {
        if !root.exists() {
            return Ok(None);
        }
        match Self::try_lock(root)? {
            Some(dir) => Ok(Some(dir)),
            // Removed meanwhile: by a `down` or a stopping agent.
            None => Ok(None),
        }
    }

    /// `None`: the path no longer names the directory that was locked.
    fn try_lock(root: &Path) -> Result<Option<Self>, PinError> {
        let lock_err = |source| PinError::Lock {
            path: root.to_owned(),
            source,
        };
        let file = match File::open(root) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(lock_err(e)),
        };
        let locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = file.metadata().ok().and_then(|m| lock_holder(&m));
                return Err(PinError::Locked {
                    path: root.to_owned(),
                    holder: Holder(holder),
                });
            }
            Err((_, errno)) => return Err(lock_err(errno.into())),
        };
        let held = locked.metadata().map_err(lock_err)?;
        match std::fs::metadata(root) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(lock_err(e)),
        }
        Ok(Some(Self {
            root: root.to_owned(),
            _lock: locked,
        }))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the map `name` is pinned.
    pub fn map(&self, name: &str) -> PathBuf {
        map_path(&self.root, name)
    }

    /// Where an attachment is pinned.
    pub fn link(&self, pin: &LinkPin) -> PathBuf {
        self.root.join(LINKS).join(pin.file_name())
    }

    /// Names of the pinned maps.
    pub fn maps(&self) -> Result<Vec<String>, PinError> {
        let mut names = list(&self.root.join(MAPS))?;
        names.sort();
        Ok(names)
    }

    /// The pinned attachments (files of `links/` that are not ours are
    /// left out).
    pub fn links(&self) -> Result<Vec<LinkPin>, PinError> {
        let mut pins: Vec<LinkPin> = list(&self.root.join(LINKS))?
            .iter()
            .filter_map(|name| LinkPin::parse(name))
            .collect();
        pins.sort_by_key(LinkPin::file_name);
        Ok(pins)
    }

    /// Remove every pin and the directories, links first: removing a tcx
    /// link's pin detaches its program (once no process holds the link),
    /// so no program is left running on maps that are going away.
    /// Netlink filters are not removed here (see `loader::remove_netlink`).
    pub fn remove_all(self) -> Result<Removed, PinError> {
        let mut removed = Removed::default();
        let links = self.root.join(LINKS);
        for name in list(&links)? {
            remove_file(&links.join(&name))?;
            removed.links.extend(LinkPin::parse(&name));
        }
        let maps = self.root.join(MAPS);
        for name in list(&maps)? {
            remove_file(&maps.join(&name))?;
            removed.maps.push(name);
        }
        removed.maps.sort();
        for dir in [links.as_path(), maps.as_path(), self.root.as_path()] {
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(PinError::Remove {
                        path: dir.to_owned(),
                        source,
                    });
                }
            }
        }
        Ok(removed)
    }
}

/// Where the map `name` is pinned under the pin path `root`; for readers
/// that do not take the lock (`egress-agent flows|maps|stats`).
pub fn map_path(root: &Path, name: &str) -> PathBuf {
    root.join(MAPS).join(name)
}

/// Remove a pin; one that is already gone is what was wanted.
pub fn remove_file(path: &Path) -> Result<(), PinError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PinError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

fn list(dir: &Path) -> Result<Vec<String>, PinError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PinError::Read {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| PinError::Read {
            path: dir.to_owned(),
            source,
        })?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

fn create_dir(dir: &Path) -> Result<(), PinError> {
    let err = |source| PinError::Create {
        path: dir.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(err)?;
    // One that existed may have been made with a wider mode.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE)).map_err(err)
}

/// Check that `path` (or, before it exists, its nearest existing ancestor)
/// is on a BPF filesystem: pinning anywhere else fails, and only a clear
/// word here says why.
fn check_bpffs(path: &Path) -> Result<(), PinError> {
    let checked = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let fs = statfs::statfs(checked)
        .map_err(|source| PinError::Statfs {
            path: checked.to_owned(),
            source,
        })?
        .filesystem_type();
    if fs == statfs::BPF_FS_MAGIC {
        return Ok(());
    }
    Err(PinError::NotBpfFs {
        path: path.to_owned(),
        checked: checked.to_owned(),
        fs: fs_name(fs),
    })
}

fn fs_name(fs: FsType) -> String {
    let known = [
        (statfs::SYSFS_MAGIC, "sysfs"),
        (statfs::TMPFS_MAGIC, "tmpfs"),
        (statfs::EXT4_SUPER_MAGIC, "ext4"),
        (statfs::OVERLAYFS_SUPER_MAGIC, "overlayfs"),
        (statfs::PROC_SUPER_MAGIC, "procfs"),
    ];
    known.iter().find(|(magic, _)| *magic == fs).map_or_else(
        || format!("filesystem {:#x}", fs.0),
        |(_, n)| (*n).to_owned(),
    )
}

/// The pid holding an flock on the file `meta` describes, from `/proc/locks`.
fn lock_holder(meta: &std::fs::Metadata) -> Option<u32> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let dev = meta.dev();
    parse_lock_holder(&locks, libc::major(dev), libc::minor(dev), meta.ino())
}

/// In `/proc/locks` text, the pid of the FLOCK held on device
/// `major:minor`, inode `ino`. Lines look like
/// `1: FLOCK  ADVISORY  WRITE 9115 00:27:1916840 0 EOF`; waiters (`->`)
/// are skipped.
fn parse_lock_holder(locks: &str, major: u32, minor: u32, ino: u64) -> Option<u32> {
    locks.lines().find_map(|line| {
        let mut words = line.split_whitespace().skip(1);
        if words.next()? != "FLOCK" {
            return None;
        }
        let pid: u32 = words.nth(2)?.parse().ok()?;
        let mut id = words.next()?.split(':');
        let maj = u32::from_str_radix(id.next()?, 16).ok()?;
        let min = u32::from_str_radix(id.next()?, 16).ok()?;
        let inode: u64 = id.next()?.parse().ok()?;
        (maj == major && min == minor && inode == ino).then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_link_names_round_trip_with_dashes_in_interface() {
        for (iface, direction, kind, file) in [
            ("up0", Direction::Egress, LinkKind::Tcx, "up0-egress"),
            ("eth-0", Direction::Ingress, LinkKind::Tcx, "eth-0-ingress"),
            (
                "up0",
                Direction::Ingress,
                LinkKind::Netlink,
                "up0-ingress-netlink",
            ),
            (
                "eth0.100",
                Direction::Egress,
                LinkKind::Tcx,
                "eth0%2e100-egress",
            ),
            ("a%2e", Direction::Egress, LinkKind::Tcx, "a%252e-egress"),
        ] {
            let pin = LinkPin {
                iface: iface.into(),
                direction,
                kind,
            };
            assert_eq!(pin.file_name(), file);
            assert!(!file.contains('.'), "bpffs refuses names with a '.'");
            assert_eq!(LinkPin::parse(file), Some(pin), "{file} parses back");
        }
    }

    #[test]
    fn pin_link_foreign_names_ignored() {
        for name in ["up0", "up0-sideways", "-egress", "notes.txt"] {
            assert_eq!(LinkPin::parse(name), None, "{name:?} is not a link pin");
        }
    }

    #[test]
    fn pin_lock_holder_found_by_device_and_inode() {
        let locks = "1: FLOCK  ADVISORY  WRITE 9115 00:27:1916840 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 9200 00:27:1916840 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 9100 00:27:77 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 9089 fe:00:5308505 0 EOF\n";
        assert_eq!(parse_lock_holder(locks, 0, 0x27, 1_916_840), Some(9115));
        assert_eq!(parse_lock_holder(locks, 0xfe, 0, 5_308_505), Some(9089));
        assert_eq!(
            parse_lock_holder(locks, 0, 0x27, 77),
            None,
            "POSIX locks are not the agent's"
        );
        assert_eq!(parse_lock_holder(locks, 0, 0x28, 1_916_840), None);
    }

    #[test]
    fn pin_locked_error_names_pid_and_path() {
        let err = PinError::Locked {
            path: "/sys/fs/bpf/egress-agent".into(),
            holder: Holder(Some(42)),
        };
        assert_eq!(
            err.to_string(),
            "another egress-agent (pid 42) is running with pin path /sys/fs/bpf/egress-agent: stop it first, or give this one another --pin-path"
        );
        let err = PinError::Locked {
            path: "/p".into(),
            holder: Holder(None),
        };
        assert!(
            err.to_string()
                .starts_with("another egress-agent is running")
        );
    }

    #[test]
    fn pin_path_off_bpffs_refused_with_mount_hint() {
        // The test's temp dir is never a BPF filesystem.
        let dir = std::env::temp_dir().join(format!("egress-pin-test-{}", std::process::id()));
        let err = PinDir::lock(&dir.join("pins")).unwrap_err();
        assert!(
            matches!(err, PinError::NotBpfFs { .. }),
            "a pin path off bpffs must be refused before anything is created: {err}"
        );
        assert!(
            err.to_string().contains("mount -t bpf bpf"),
            "the error says how to fix it: {err}"
        );
        assert!(!dir.exists(), "nothing was created");
    }
}
