//! Egress policies: the model, the file format, the reference evaluator and
//! the compiler to dataplane tables.

pub mod analyze;
pub mod compile;
pub mod dnf;
pub mod eval;
pub mod expr;
pub mod geo;
pub mod model;
pub mod parse;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use compile::{Compiled, compile};
pub use model::PolicySet;
pub use parse::{PolicyError, load, parse};
