//! Loading the embedded eBPF object with its maps sized from configuration,
//! and attaching its TC programs to an uplink (and detaching them again,
//! leaving nothing behind).

use std::process::Command;

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcError},
    },
    util::KernelVersion,
};
use aya_log::EbpfLogger;

/// aya-log's reader, forwarding records to the `log` crate.
pub type Logger = EbpfLogger<&'static dyn log::Log>;
use egress_common::{
    classify::{DEFAULT_IDENTITY_SLOTS, GENERATIONS},
    geo, maps,
};

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
    /// Netlink filters on a clsact qdisc (older kernels).
    Netlink,
}

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("loading the eBPF object: {source}")]
    Load {
        #[source]
        source: Box<EbpfError>,
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
        direction: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
}

struct Attachment {
    iface: String,
    program: &'static str,
    link: SchedClassifierLinkId,
}

/// The loaded programs and maps, and where they are attached.
pub struct Dataplane {
    ebpf: Ebpf,
    logger: Option<Logger>,
    attachments: Vec<Attachment>,
    /// Interfaces on which this dataplane added the clsact qdisc.
    qdiscs_added: Vec<String>,
}

impl Dataplane {
    /// Load the object with sized maps and load both programs into the kernel.
    pub fn load(opts: &LoadOptions) -> Result<Self, LoaderError> {
        // Unused country tables keep one element per generation.
        let geo_size = |full: u32| if opts.geo { full } else { GENERATIONS };
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::CT4, opts.max_flows)
            .map_max_entries(maps::NAT4, opts.max_flows)
            .map_max_entries(maps::CT6, opts.max_flows)
            .map_max_entries(maps::NAT6, opts.max_flows)
            .map_max_entries(maps::CLASSES, GENERATIONS * opts.classes_per_gen)
            .map_max_entries(maps::SRC4, opts.max_prefixes)
            .map_max_entries(maps::DST4, opts.max_prefixes)
            .map_max_entries(maps::SRC6, opts.max_prefixes)
            .map_max_entries(maps::DST6, opts.max_prefixes)
            .map_max_entries(maps::ID_CLASS, GENERATIONS * opts.identity_slots)
            .map_max_entries(maps::ID4, opts.identity_prefixes)
            .map_max_entries(maps::ID6, opts.identity_prefixes)
            .map_max_entries(maps::ID4_HOST, opts.identity_prefixes)
            .map_max_entries(maps::ID6_HOST, opts.identity_prefixes)
            .map_max_entries(maps::GEO4, geo_size(GENERATIONS * geo::BLOCK_WORDS_PER_GEN))
            .map_max_entries(
                maps::GEO4_SPLIT,
                geo_size(GENERATIONS * opts.geo_split_blocks),
            )
            .map_max_entries(maps::GEO6_BUCKETS, geo_size(GENERATIONS * geo::V6_BUCKETS))
            .map_max_entries(maps::GEO6, geo_size(GENERATIONS * opts.geo_v6_ranges))
            .override_global("BENCH_MODE", &opts.bench_mode, true)
            .load(EBPF_OBJECT)
            .map_err(|source| LoaderError::Load {
                source: Box::new(source),
            })?;
        // The logger holds the log ring buffer; it must outlive program
        // loading, or the programs' map references dangle.
        let logger = match EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(err) => {
                log::warn!("eBPF log records will not be shown: {err}");
                None
            }
        };
        for name in [maps::PROG_EGRESS, maps::PROG_INGRESS] {
            program_of(&mut ebpf, name)?
                .load()
                .map_err(|source| LoaderError::Program {
                    name,
                    source: Box::new(source),
                })?;
        }
        Ok(Self {
            ebpf,
            logger,
            attachments: Vec::new(),
            qdiscs_added: Vec::new(),
        })
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The eBPF log reader, for the caller to poll.
    pub fn take_logger(&mut self) -> Option<Logger> {
        self.logger.take()
    }

    /// One of the two TC programs (for BPF_PROG_TEST_RUN).
    pub fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, LoaderError> {
        program_of(&mut self.ebpf, name)
    }

    /// Attach the egress (translate) and ingress (restore) programs to `iface`.
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
        for (program, attach_type, direction) in [
            (maps::PROG_EGRESS, TcAttachType::Egress, "egress"),
            (maps::PROG_INGRESS, TcAttachType::Ingress, "ingress"),
        ] {
            let options = if tcx {
                TcAttachOptions::TcxOrder(LinkOrder::default())
            } else {
                TcAttachOptions::Netlink(NlOptions::default())
            };
            let link = program_of(&mut self.ebpf, program)?
                .attach_with_options(iface, attach_type, options)
                .map_err(|source| LoaderError::Attach {
                    program,
                    iface: iface.to_owned(),
                    direction,
                    source: Box::new(source),
                })?;
            self.attachments.push(Attachment {
                iface: iface.to_owned(),
                program,
                link,
            });
        }
        Ok(())
    }

    /// Detach everything this dataplane attached and remove qdiscs it added.
    /// Idempotent; also run on drop.
    pub fn detach(&mut self) {
        for Attachment {
            iface,
            program,
            link,
        } in self.attachments.drain(..)
        {
            if let Err(err) = program_of(&mut self.ebpf, program).and_then(|p| {
                p.detach(link).map_err(|source| LoaderError::Program {
                    name: program,
                    source: Box::new(source),
                })
            }) {
                log::warn!("detaching {program} from {iface}: {err}");
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
                    log::warn!("removing the clsact qdisc from {iface}: tc exited with {status}")
                }
                Err(err) => log::warn!("removing the clsact qdisc from {iface}: {err}"),
            }
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.detach();
    }
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
