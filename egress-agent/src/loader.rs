//! Loading the embedded eBPF object with its maps sized from configuration,
//! pinned under a pin directory (and adopted from there when an earlier
//! agent left them), attaching its TC programs to an uplink, and at the end
//! either detaching and removing everything or leaving it all running for
//! the next agent.

mod compat;
mod link;

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::Command,
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{MapData, MapError},
    programs::{ProgramError, SchedClassifier, tc, tc::TcError},
    util::KernelVersion,
};
use aya_log::EbpfLogger;
use egress_common::{
    classify::{DEFAULT_IDENTITY_SLOTS, GENERATIONS},
    geo, maps,
};
use log::{info, warn};

pub use self::{
    compat::Field as MapField,
    link::{LinkPinError, NETLINK_HANDLE, NETLINK_PRIORITY},
};
use self::{compat::MapShape, link::Attachment};
use crate::pin::{Direction, LinkKind, LinkPin, PinDir, PinError, Removed};

/// aya-log's reader, forwarding records to the `log` crate.
pub type Logger = EbpfLogger<&'static dyn log::Log>;

/// Per-CPU scratch space: nothing in it outlives a packet, so it is not
/// pinned. Every other map of [`maps::ALL`] is.
const NOT_PINNED: &[&str] = &[maps::SCRATCH4, maps::SCRATCH6];

/// The maps a pinned dataplane keeps across agents.
pub fn pinned_maps() -> impl Iterator<Item = &'static str> {
    maps::ALL
        .iter()
        .copied()
        .filter(|name| !NOT_PINNED.contains(name))
}

/// The eBPF object built by `cargo xtask build-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("EGRESS_EBPF_OBJ"));

/// Map capacities chosen at load time.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Flows each connection table holds.
    pub max_flows: u32,
    /// Classifier class rows per generation.
    pub classes_per_gen: u32,
    /// Prefixes each classifier trie holds (both generations together).
    pub max_prefixes: u32,
    /// Identity ids per generation (id 0, "no identity", included).
    pub identity_slots: u32,
    /// Source prefixes the identity tries hold.
    pub identity_prefixes: u32,
    /// Reserve the country tables (`egress_common::geo`): about 16 MiB per
    /// generation for IPv4 blocks plus the sizes below. Without them every
    /// destination's country is unknown.
    pub geo: bool,
    /// /24 blocks holding several countries, per generation.
    pub geo_split_blocks: u32,
    /// IPv6 ranges per generation.
    pub geo_v6_ranges: u32,
    /// Benchmarks only: 1 = translate new flows without recording them,
    /// 2 = record and remove them again (see `BENCH_MODE` in nat.rs).
    pub bench_mode: u8,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_flows: maps::DEFAULT_MAX_FLOWS,
            classes_per_gen: maps::DEFAULT_CLASSES_PER_GEN,
            max_prefixes: maps::DEFAULT_PREFIXES,
            identity_slots: DEFAULT_IDENTITY_SLOTS,
            identity_prefixes: maps::DEFAULT_IDENTITY_PREFIXES,
            geo: false,
            geo_split_blocks: geo::DEFAULT_SPLIT_BLOCKS,
            geo_v6_ranges: geo::DEFAULT_V6_RANGES,
            bench_mode: 0,
        }
    }
}

/// How TC programs are attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// tcx links where the kernel has them (6.6+), netlink filters otherwise.
    #[default]
    Auto,
    /// tcx links (kernel 6.6+): nothing to clean up but the link itself.
    Tcx,
    /// Netlink filters on a clsact qdisc (older kernels), at the fixed
    /// priority 17735 (0x4547) handle 1, where a restarted agent swaps its
    /// program into its predecessor's filter. Run `down` in the agent's
    /// network namespace: filters are found by interface there.
    Netlink,
}

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("loading the eBPF object: {source}")]
    Load {
        #[source]
        source: Box<EbpfError>,
    },
    #[error("reading the map definitions of the eBPF object: {source}")]
    Parse {
        #[source]
        source: aya_obj::ParseError,
    },
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("loading program {name} into the kernel: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("interface {iface:?} does not exist in this network namespace")]
    NoSuchInterface { iface: String },
    #[error("adding a clsact qdisc to {iface}: {source}")]
    Qdisc {
        iface: String,
        #[source]
        source: TcError,
    },
    #[error("attaching {program} to {iface} (tc {direction}): {source}")]
    Attach {
        program: &'static str,
        iface: String,
        direction: Direction,
        #[source]
        source: LinkPinError,
    },
    #[error("removing the pinned attachment {path}: {source}")]
    RemoveLink {
        path: PathBuf,
        #[source]
        source: LinkPinError,
    },
    #[error("opening pinned map {name} at {path}: {source}")]
    PinnedMap {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error(
        "pinned map {name} at {path} has {field} {pinned}, this agent asks for {wanted}{sized_by}: a restart takes over pinned maps only as they are. Start it with the options the pinned dataplane was made with, or remove that dataplane first with `egress-agent down --pin-path {root}` (its established flows are lost)"
    )]
    PinnedMapMismatch {
        name: &'static str,
        path: PathBuf,
        root: PathBuf,
        field: MapField,
        pinned: u32,
        wanted: u32,
        /// " (set by --max-flows)" and the like, or "".
        sized_by: &'static str,
    },
    #[error(transparent)]
    Pins {
        #[from]
        source: PinError,
    },
}

/// The pin directory of a pinned dataplane.
struct Pinned {
    dir: PinDir,
    /// Whether maps of an earlier agent were taken over.
    adopted: bool,
}

/// The loaded programs and maps, and where they are attached.
pub struct Dataplane {
    ebpf: Ebpf,
    logger: Option<Logger>,
    attachments: Vec<Attachment>,
    /// Interfaces on which this dataplane added the clsact qdisc.
    qdiscs_added: Vec<String>,
    pins: Option<Pinned>,
}

/// Each map this run sizes, its size, and what sets it (for errors).
fn sizes(opts: &LoadOptions) -> Vec<(&'static str, u32, &'static str)> {
    // Unused country tables keep one element per generation.
    let geo_size = |full: u32| if opts.geo { full } else { GENERATIONS };
    let flows = " (set by --max-flows or the policy file's nat.max_flows)";
    let prefixes = " (set by --max-prefixes)";
    let sessions = " (set by --max-sessions)";
    vec![
        (maps::CT4, opts.max_flows, flows),
        (maps::NAT4, opts.max_flows, flows),
        (maps::CT6, opts.max_flows, flows),
        (maps::NAT6, opts.max_flows, flows),
        (
            maps::CLASSES,
            GENERATIONS * opts.classes_per_gen,
            " (set by --max-classes)",
        ),
        (maps::SRC4, opts.max_prefixes, prefixes),
        (maps::DST4, opts.max_prefixes, prefixes),
        (maps::SRC6, opts.max_prefixes, prefixes),
        (maps::DST6, opts.max_prefixes, prefixes),
        (maps::ID_CLASS, GENERATIONS * opts.identity_slots, sessions),
        (maps::ID4, opts.identity_prefixes, sessions),
        (maps::ID6, opts.identity_prefixes, sessions),
        (maps::ID4_HOST, opts.identity_prefixes, sessions),
        (maps::ID6_HOST, opts.identity_prefixes, sessions),
        (
            maps::GEO4,
            geo_size(GENERATIONS * geo::BLOCK_WORDS_PER_GEN),
            " (set by --geoip)",
        ),
        (
            maps::GEO4_SPLIT,
            geo_size(GENERATIONS * opts.geo_split_blocks),
            " (set by --geoip and --geo-split-blocks)",
        ),
        (
            maps::GEO6_BUCKETS,
            geo_size(GENERATIONS * geo::V6_BUCKETS),
            " (set by --geoip)",
        ),
        (
            maps::GEO6,
            geo_size(GENERATIONS * opts.geo_v6_ranges),
            " (set by --geoip and --geo-v6-ranges)",
        ),
    ]
}

fn loader<'a>(
    opts: &'a LoadOptions,
    sizes: &[(&'static str, u32, &'static str)],
) -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
    for (name, size, _) in sizes {
        loader.map_max_entries(name, *size);
    }
    loader.override_global("BENCH_MODE", &opts.bench_mode, true);
    loader
}

fn load_error(source: EbpfError) -> LoaderError {
    LoaderError::Load {
        source: Box::new(source),
    }
}

impl Dataplane {
    /// Load the object with sized maps and load both programs into the
    /// kernel. Nothing is pinned: everything goes with this value (tests,
    /// benchmarks).
    pub fn load(opts: &LoadOptions) -> Result<Self, LoaderError> {
        let ebpf = loader(opts, &sizes(opts))
            .load(EBPF_OBJECT)
            .map_err(load_error)?;
        Self::with_programs(ebpf, None)
    }

    /// Load the object with its maps pinned in `dir`: a map an earlier agent
    /// pinned there is taken over with its entries (established flows,
    /// counters, the active policy generation), after checking it has the
    /// shape this run asks for; a missing one is created and pinned.
    pub fn load_pinned(opts: &LoadOptions, dir: PinDir) -> Result<Self, LoaderError> {
        let sizes = sizes(opts);
        let plain: Vec<(&str, u32)> = sizes.iter().map(|(n, s, _)| (*n, *s)).collect();
        let wanted = compat::wanted_shapes(EBPF_OBJECT, &plain)
            .map_err(|source| LoaderError::Parse { source })?;
        let names: Vec<&'static str> = pinned_maps()
            .filter(|name| wanted.contains_key(*name))
            .collect();
        let mut adopted = Vec::new();
        for name in &names {
            let path = dir.map(name);
            if !path.exists() {
                continue;
            }
            let shape = MapData::from_pin(&path)
                .and_then(|map| MapShape::of(&map))
                .map_err(|source| LoaderError::PinnedMap {
                    name,
                    path: path.clone(),
                    source,
                })?;
            if let Some(m) = shape.mismatch(&wanted[*name]) {
                let sized_by = match m.field {
                    MapField::MaxEntries => sizes
                        .iter()
                        .find(|(n, _, _)| n == name)
                        .map_or("", |(_, _, by)| *by),
                    _ => "",
                };
                return Err(LoaderError::PinnedMapMismatch {
                    name,
                    path,
                    root: dir.root().to_owned(),
                    field: m.field,
                    pinned: m.pinned,
                    wanted: m.wanted,
                    sized_by,
                });
            }
            adopted.push(*name);
        }
        let mut loader = loader(opts, &sizes);
        for name in &names {
            loader.map_pin_path(name, dir.map(name));
        }
        let ebpf = match loader.load(EBPF_OBJECT) {
            Ok(ebpf) => ebpf,
            Err(source) => {
                // Maps created before the failure are pinned already.
                for name in names.iter().filter(|n| !adopted.contains(n)) {
                    if let Err(err) = crate::pin::remove_file(&dir.map(name)) {
                        warn!("{err}");
                    }
                }
                return Err(load_error(source));
            }
        };
        if adopted.is_empty() {
            info!("pinned {} maps at {}", names.len(), dir.root().display());
        } else {
            info!(
                "took over {} maps pinned at {} by an earlier agent (their flows, counters and tables stay){}",
                adopted.len(),
                dir.root().display(),
                match names.len() - adopted.len() {
                    0 => String::new(),
                    n => format!("; created {n} new"),
                }
            );
        }
        let pins = Pinned {
            dir,
            adopted: !adopted.is_empty(),
        };
        Self::with_programs(ebpf, Some(pins))
    }

    /// Load both programs; on failure, dropping `Self` removes what a fresh
    /// pinned load created.
    fn with_programs(mut ebpf: Ebpf, pins: Option<Pinned>) -> Result<Self, LoaderError> {
        // The logger holds the log ring buffer; it must outlive program
        // loading, or the programs' map references dangle.
        let logger = match EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(err) => {
                warn!("eBPF log records will not be shown: {err}");
                None
            }
        };
        let mut dataplane = Self {
            ebpf,
            logger,
            attachments: Vec::new(),
            qdiscs_added: Vec::new(),
            pins,
        };
        for name in [maps::PROG_EGRESS, maps::PROG_INGRESS] {
            program_of(&mut dataplane.ebpf, name)?
                .load()
                .map_err(|source| LoaderError::Program {
                    name,
                    source: Box::new(source),
                })?;
        }
        Ok(dataplane)
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Whether this dataplane took over maps an earlier agent pinned.
    pub fn adopted(&self) -> bool {
        self.pins.as_ref().is_some_and(|p| p.adopted)
    }

    /// The pin directory, when pinned.
    pub fn pin_path(&self) -> Option<&Path> {
        self.pins.as_ref().map(|p| p.dir.root())
    }

    /// The eBPF log reader, for the caller to poll.
    pub fn take_logger(&mut self) -> Option<Logger> {
        self.logger.take()
    }

    /// One of the two TC programs (for BPF_PROG_TEST_RUN).
    pub fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, LoaderError> {
        program_of(&mut self.ebpf, name)
    }

    /// Attach the egress (translate) and ingress (restore) programs to
    /// `iface`. When pinned, the attachments are pinned too, and those an
    /// earlier agent pinned for `iface` are taken over in place: the
    /// programs on the uplink change without a packet going unhandled.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<(), LoaderError> {
        if nix::net::if_::if_nametoindex(iface).is_err() {
            return Err(LoaderError::NoSuchInterface {
                iface: iface.to_owned(),
            });
        }
        let tcx = match mode {
            AttachMode::Tcx => true,
            AttachMode::Netlink => false,
            AttachMode::Auto => {
                KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
            }
        };
        if !tcx {
            match tc::qdisc_add_clsact(iface) {
                Ok(()) => self.qdiscs_added.push(iface.to_owned()),
                // Someone else's clsact is as good as ours; we only remove
                // the qdisc on shutdown when we were the ones who added it.
                Err(err) if matches!(err, TcError::AlreadyAttached) || is_exists(&err) => {}
                Err(source) => {
                    return Err(LoaderError::Qdisc {
                        iface: iface.to_owned(),
                        source,
                    });
                }
            }
        }
        for (program, direction) in [
            (maps::PROG_EGRESS, Direction::Egress),
            (maps::PROG_INGRESS, Direction::Ingress),
        ] {
            let pin = self.pins.as_ref().map(|p| {
                p.dir.link(&LinkPin {
                    iface: iface.to_owned(),
                    direction,
                    kind: if tcx {
                        LinkKind::Tcx
                    } else {
                        LinkKind::Netlink
                    },
                })
            });
            let prog = program_of(&mut self.ebpf, program)?;
            let attached = if tcx {
                link::attach_tcx(prog, program, iface, direction, pin)
            } else {
                link::attach_netlink(prog, program, iface, direction, pin)
            }
            .map_err(|source| LoaderError::Attach {
                program,
                iface: iface.to_owned(),
                direction,
                source,
            })?;
            if attached.adopted {
                info!(
                    "{iface} (tc {direction}): {program} took over from the previous agent's program in place"
                );
            }
            self.attachments.push(attached);
        }
        Ok(())
    }

    /// Remove the pinned attachments of earlier agents that this one did
    /// not take over (an uplink no longer configured, another attach mode):
    /// their programs are detached. Call it once every uplink is attached.
    pub fn drop_stale_links(&mut self) -> Result<Vec<LinkPin>, LoaderError> {
        let Some(pins) = &self.pins else {
            return Ok(Vec::new());
        };
        let current: HashSet<&Path> = self
            .attachments
            .iter()
            .filter_map(|a| a.pin.as_deref())
            .collect();
        let mut removed = Vec::new();
        for pin in pins.dir.links()? {
            let path = pins.dir.link(&pin);
            if current.contains(path.as_path()) {
                continue;
            }
            link::remove_pinned(&path, &pin)
                .map_err(|source| LoaderError::RemoveLink { path, source })?;
            info!(
                "detached the previous agent's program from {} (tc {}): that uplink is not configured any more",
                pin.iface, pin.direction
            );
            removed.push(pin);
        }
        Ok(removed)
    }

    /// Leave the programs attached and the maps pinned for the next agent
    /// (`run --keep-dataplane`), and release the pin directory. Without pins
    /// there is nothing to keep them by, so this detaches instead.
    pub fn keep(&mut self) {
        let Some(pins) = self.pins.take() else {
            warn!("the dataplane is not pinned: detaching instead of keeping it");
            self.detach();
            return;
        };
        let hooks: Vec<String> = self
            .attachments
            .iter()
            .map(|a| format!("{} (tc {})", a.iface, a.direction))
            .collect();
        for attachment in self.attachments.drain(..) {
            attachment.keep();
        }
        // Filters stay in them.
        self.qdiscs_added.clear();
        let maps = pins.dir.maps().map_or(0, |m| m.len());
        info!(
            "kept the dataplane pinned at {root}: {maps} maps; programs stay attached to {}; a new agent with the same --pin-path takes it over, `egress-agent down --pin-path {root}` removes it",
            if hooks.is_empty() {
                "nothing".to_owned()
            } else {
                hooks.join(", ")
            },
            root = pins.dir.root().display(),
        );
    }

    /// Detach everything this dataplane attached, remove qdiscs it added,
    /// and remove its pins and pin directory. Idempotent; also run on drop
    /// (unless the dataplane was taken over from an earlier agent).
    pub fn detach(&mut self) {
        for attachment in self.attachments.drain(..) {
            let (program, iface) = (attachment.program, attachment.iface.clone());
            if let Err(err) = attachment.detach() {
                warn!("detaching {program} from {iface}: {err}");
            }
        }
        for iface in self.qdiscs_added.drain(..) {
            // aya has no qdisc removal; iproute2 is on every gateway.
            match Command::new("tc")
                .args(["qdisc", "del", "dev", &iface, "clsact"])
                .status()
            {
                Ok(status) if status.success() => {}
                Ok(status) => {
                    warn!("removing the clsact qdisc from {iface}: tc exited with {status}")
                }
                Err(err) => warn!("removing the clsact qdisc from {iface}: {err}"),
            }
        }
        if let Some(pins) = self.pins.take() {
            let root = pins.dir.root().to_owned();
            match remove_pins(pins.dir) {
                Ok(removed) => info!("removed {}", describe(&root, &removed)),
                Err(err) => warn!("removing the pins at {}: {err}", root.display()),
            }
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        // Without an explicit detach (a failed start, a panic), a dataplane
        // taken over from an earlier agent is left running as it was found:
        // the flows it carries matter more than a tidy exit.
        if self.adopted() {
            warn!(
                "leaving the dataplane pinned at {} in place; `egress-agent down` removes it",
                self.pin_path()
                    .map_or(String::new(), |p| p.display().to_string())
            );
            self.keep();
        } else {
            self.detach();
        }
    }
}

/// Remove every pinned attachment (detaching its program) and pinned map
/// in `dir`, and the directory.
fn remove_pins(dir: PinDir) -> Result<Removed, LoaderError> {
    let mut links = Vec::new();
    for pin in dir.links()? {
        let path = dir.link(&pin);
        link::remove_pinned(&path, &pin)
            .map_err(|source| LoaderError::RemoveLink { path, source })?;
        links.push(pin);
    }
    let mut removed = dir.remove_all()?;
    removed.links.extend(links);
    removed.links.sort_by_key(LinkPin::file_name);
    Ok(removed)
}

/// Remove the dataplane a stopped agent left pinned at `root` (`egress-agent
/// down`): programs detached, maps unpinned (their entries go with the last
/// reference), directories removed. Refused while an agent holds the pin
/// directory. `None`: nothing is pinned there.
pub fn remove_pinned(root: &Path) -> Result<Option<Removed>, LoaderError> {
    match PinDir::lock_existing(root)? {
        Some(dir) => remove_pins(dir).map(Some),
        None => Ok(None),
    }
}

/// "the pins at P: N maps, links up0 (tc egress), ...", for logs.
pub fn describe(root: &Path, removed: &Removed) -> String {
    let links: Vec<String> = removed
        .links
        .iter()
        .map(|l| format!("{} (tc {})", l.iface, l.direction))
        .collect();
    format!(
        "the pins at {}: {} maps ({}), {} attachments{}",
        root.display(),
        removed.maps.len(),
        removed.maps.join(", "),
        links.len(),
        if links.is_empty() {
            String::new()
        } else {
            format!(" ({})", links.join(", "))
        }
    )
}

fn is_exists(err: &TcError) -> bool {
    matches!(err, TcError::NetlinkError(e) if e.raw_os_error() == Some(libc::EEXIST))
}

fn program_of<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoaderError> {
    ebpf.program_mut(name)
        .ok_or(LoaderError::MissingProgram { name })?
        .try_into()
        .map_err(|source| LoaderError::Program {
            name,
            source: Box::new(source),
        })
}
