//! Attaching one TC program to one hook so that it can outlive the agent,
//! and handing a hook over from the programs of an earlier agent without a
//! moment in which no program sees the packets.
//!
//! tcx (kernel 6.6+): the link is pinned; a restarted agent opens the pin
//! and swaps its own program into the same link with `BPF_LINK_UPDATE`, one
//! atomic step (the old program sees every packet before it, the new one
//! every packet after). This is better than attaching a second link first
//! and then removing the old one: the two programs are never in the chain
//! together, so a verdict that continues the chain (`TCX_NEXT`) cannot hand
//! a packet from the new program to the old one.
//!
//! Netlink (older kernels): a filter has no link to pin, but it stays
//! installed without any process. Ours sits at a fixed priority and handle,
//! and the program is pinned beside the links as a marker; a restarted
//! agent replaces the program of that filter in place (the kernel swaps it
//! atomically), and `down` knows from the marker where to remove filters.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::programs::{
    LinkOrder, ProgramError, SchedClassifier, TcAttachType,
    links::{FdLink, LinkError, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
};
use log::{info, warn};

use crate::pin::{self, Direction, LinkKind, LinkPin};

/// Priority of our netlink filters (lower runs first). Fixed, so that a
/// restarted agent finds the filter of the previous one; an uncommon value,
/// so that it is not some other tool's automatically chosen one (49152 and
/// down).
pub const NETLINK_PRIORITY: u16 = 0x4547;
/// Handle of our netlink filters at [`NETLINK_PRIORITY`].
pub const NETLINK_HANDLE: TcHandle = TcHandle::new(0, 1);

/// What keeps a program attached.
pub(super) enum Held {
    /// A tcx link: attached until the last fd and the pin are gone.
    Tcx { link: FdLink },
    /// A netlink filter: attached until removed (dropping this removes it).
    Netlink { link: SchedClassifierLink },
}

/// One program on one hook.
pub(super) struct Attachment {
    pub iface: String,
    pub direction: Direction,
    pub program: &'static str,
    /// Its pin: the tcx link, or the netlink filter's marker.
    pub pin: Option<PathBuf>,
    /// Taken over from an earlier agent's pin.
    pub adopted: bool,
    held: Held,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkPinError {
    #[error("opening pinned link {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("pinned link {path} is not a tcx link: {source}")]
    NotTcx {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("swapping the program of pinned link {path}: {source}")]
    Update {
        path: PathBuf,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error(
        "a tc filter of another program holds priority {priority} handle 1 on {iface} (tc {direction}): remove it, or use --attach tcx"
    )]
    NetlinkSlotTaken {
        iface: String,
        direction: Direction,
        priority: u16,
    },
    #[error(transparent)]
    Program(#[from] Box<ProgramError>),
    #[error("taking the link out of the program: {source}")]
    TakeLink {
        #[source]
        source: LinkError,
    },
    #[error(transparent)]
    Remove(#[from] pin::PinError),
}

fn boxed(e: ProgramError) -> Box<ProgramError> {
    Box::new(e)
}

pub(super) const fn attach_type(direction: Direction) -> TcAttachType {
    match direction {
        Direction::Egress => TcAttachType::Egress,
        Direction::Ingress => TcAttachType::Ingress,
    }
}

/// Attach `prog` to `iface` through a tcx link, taking over the link
/// pinned at `pin` when there is one.
pub(super) fn attach_tcx(
    prog: &mut SchedClassifier,
    program: &'static str,
    iface: &str,
    direction: Direction,
    pin: Option<PathBuf>,
) -> Result<Attachment, LinkPinError> {
    let attachment = |link, pin, adopted| Attachment {
        iface: iface.to_owned(),
        direction,
        program,
        pin,
        adopted,
        held: Held::Tcx { link },
    };
    if let Some(path) = pin.as_deref().filter(|p| p.exists()) {
        match adopt_tcx(prog, path) {
            Ok(link) => return Ok(attachment(link, pin, true)),
            // A link whose interface was deleted (and maybe re-created) is
            // defunct and refuses the update: nothing uses it any more.
            Err(err) => {
                warn!("{err}; attaching a new link instead");
                pin::remove_file(path)?;
            }
        }
    }
    let id = prog
        .attach_with_options(
            iface,
            attach_type(direction),
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(boxed)?;
    let link: FdLink = prog
        .take_link(id)
        .map_err(boxed)?
        .try_into()
        .map_err(|source| LinkPinError::TakeLink { source })?;
    let link = match &pin {
        // Dropping the PinnedLink on failure closes the fd: detached again.
        Some(path) => FdLink::from(link.pin(path).map_err(|source| LinkPinError::Pin {
            path: path.clone(),
            source,
        })?),
        None => link,
    };
    Ok(attachment(link, pin, false))
}

/// Swap `prog` into the tcx link pinned at `path`.
fn adopt_tcx(prog: &mut SchedClassifier, path: &Path) -> Result<FdLink, LinkPinError> {
    let pinned = PinnedLink::from_pin(path).map_err(|source| LinkPinError::Open {
        path: path.to_owned(),
        source,
    })?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| {
        LinkPinError::NotTcx {
            path: path.to_owned(),
            source,
        }
    })?;
    let id = prog
        .attach_to_link(link)
        .map_err(|source| LinkPinError::Update {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
    prog.take_link(id)
        .map_err(boxed)?
        .try_into()
        .map_err(|source| LinkPinError::TakeLink { source })
}

/// Attach `prog` to `iface` through a netlink filter at our fixed slot,
/// replacing the program of our earlier filter there (the one `pin` marks)
/// when there is one.
pub(super) fn attach_netlink(
    prog: &mut SchedClassifier,
    program: &'static str,
    iface: &str,
    direction: Direction,
    pin: Option<PathBuf>,
) -> Result<Attachment, LinkPinError> {
    let options = NlOptions {
        priority: NETLINK_PRIORITY,
        handle: NETLINK_HANDLE,
        classid: None,
    };
    let marked = pin.as_deref().is_some_and(Path::exists);
    let (id, adopted) = match prog.attach_with_options(
        iface,
        attach_type(direction),
        TcAttachOptions::Netlink(options),
    ) {
        Ok(id) => (id, false),
        Err(err) if is_exists(&err) => {
            if !marked {
                return Err(LinkPinError::NetlinkSlotTaken {
                    iface: iface.to_owned(),
                    direction,
                    priority: NETLINK_PRIORITY,
                });
            }
            // Ours from the previous run: swap the program in place.
            let existing = SchedClassifierLink::attached(
                iface,
                attach_type(direction),
                NETLINK_PRIORITY,
                NETLINK_HANDLE,
                None,
            )
            .map_err(|e| boxed(TcError::IoError(e).into()))?;
            (prog.attach_to_link(existing).map_err(boxed)?, true)
        }
        Err(err) => return Err(boxed(err).into()),
    };
    let link = prog.take_link(id).map_err(boxed)?;
    if let Some(path) = &pin {
        // The marker names the program now in the filter.
        pin::remove_file(path)?;
        prog.pin(path).map_err(|source| LinkPinError::Pin {
            path: path.clone(),
            source,
        })?;
    }
    Ok(Attachment {
        iface: iface.to_owned(),
        direction,
        program,
        pin,
        adopted,
        held: Held::Netlink { link },
    })
}

fn is_exists(err: &ProgramError) -> bool {
    matches!(err, ProgramError::TcError(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST))
}

impl Attachment {
    /// Detach the program and remove the pin.
    pub fn detach(self) -> Result<(), LinkPinError> {
        let Self {
            pin, held, iface, ..
        } = self;
        match held {
            // The pin first: the link goes when its last reference does.
            Held::Tcx { link } => {
                if let Some(path) = &pin {
                    pin::remove_file(path)?;
                }
                drop(link);
            }
            Held::Netlink { link } => {
                use aya::programs::links::Link as _;
                let result = link.detach();
                if let Some(path) = &pin {
                    pin::remove_file(path)?;
                }
                match result {
                    Ok(()) => {}
                    // Gone with its interface, or removed by hand.
                    Err(ProgramError::NetlinkError(e))
                        if e.raw_os_error() == Some(libc::ENOENT)
                            || e.raw_os_error() == Some(libc::ENODEV) =>
                    {
                        info!("the filter on {iface} was already gone")
                    }
                    Err(err) => return Err(boxed(err).into()),
                }
            }
        }
        Ok(())
    }

    /// Let go of the attachment, leaving the program attached (through its
    /// pin, or the filter that needs no process).
    pub fn keep(self) {
        match self.held {
            Held::Tcx { link } => drop(link),
            // Dropping the link object would remove the filter.
            Held::Netlink { link } => std::mem::forget(link),
        }
    }
}

/// Remove what an attachment pinned by an agent that is gone left attached:
/// a tcx link goes with its pin; a netlink filter is removed by program name
/// on the pin's interface (in this network namespace), then its marker.
pub fn remove_pinned(path: &Path, pin: &LinkPin) -> Result<(), LinkPinError> {
    if pin.kind == LinkKind::Netlink {
        let program = match pin.direction {
            Direction::Egress => egress_common::maps::PROG_EGRESS,
            Direction::Ingress => egress_common::maps::PROG_INGRESS,
        };
        match tc::qdisc_detach_program(&pin.iface, attach_type(pin.direction), program) {
            Ok(()) => {}
            // No such filter (removed, or its interface is gone).
            Err(TcError::IoError(e))
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENODEV) => {}
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::ENODEV) => {}
            Err(err) => return Err(boxed(err.into()).into()),
        }
    }
    Ok(pin::remove_file(path)?)
}
