//! `egress-agent down`: remove the dataplane a stopped agent left pinned.

use anyhow::Context as _;

use crate::{cli::DownArgs, loader};

pub fn down(args: &DownArgs) -> anyhow::Result<()> {
    let DownArgs { pin_path } = args;
    let removed = loader::remove_pinned(pin_path)
        .with_context(|| format!("removing the dataplane pinned at {}", pin_path.display()))?;
    match removed {
        Some(removed) => println!("removed {}", loader::describe(pin_path, &removed)),
        None => println!("nothing is pinned at {}", pin_path.display()),
    }
    Ok(())
}
