//! One module per subcommand.

mod check;
mod explain;
mod import;
mod run;

use crate::cli::{Command, ImportCommand};

impl Command {
    pub async fn execute(self) -> anyhow::Result<()> {
        match self {
            Command::Run(args) => run::run(args).await,
            Command::Check(args) => check::check(&args),
            Command::Explain(args) => explain::explain(&args),
            Command::Import(ImportCommand::GatewayRules(args)) => import::gateway_rules(&args),
        }
    }
}
