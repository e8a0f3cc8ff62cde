//! One module per subcommand.

mod check;
mod run;

use crate::cli::Command;

impl Command {
    pub async fn execute(self) -> anyhow::Result<()> {
        match self {
            Command::Run(args) => run::run(args).await,
            Command::Check(args) => check::check(&args),
        }
    }
}
