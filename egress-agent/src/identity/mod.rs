//! Identity sources: sessions (from the identities file and the control
//! API) and the registry that keeps the dataplane's identity maps in step
//! with them.

pub mod dataplane;
pub mod file;
pub mod model;
pub mod registry;
pub mod state;

pub use model::{Claim, Origin, SessionSpec, SessionView, SpecError};
