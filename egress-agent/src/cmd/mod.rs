//! One module per subcommand.

mod check;
mod down;
mod explain;
mod flows;
pub mod import;
mod log;
mod maps;
mod policies;
mod posture;
mod reload;
mod run;
mod session;
mod stats;
mod table;

use crate::cli::{Command, ImportCommand};

impl Command {
    pub async fn execute(self) -> anyhow::Result<()> {
        match self {
            Command::Run(args) => run::run(args).await,
            Command::Down(args) => down::down(&args),
            Command::Check(args) => check::check(&args),
            Command::Explain(args) => explain::explain(&args),
            Command::Import(ImportCommand::GatewayRules(args)) => import::gateway_rules(&args),
            Command::Session(args) => session::session(args).await,
            Command::Posture(args) => posture::posture(args).await,
            Command::Policies(args) => policies::policies(args).await,
            Command::Reload(args) => reload::reload(args).await,
            Command::Log(args) => log::log(args).await,
            Command::Stats(args) => stats::stats(args).await,
            Command::Flows(args) => flows::flows(args).await,
            Command::Maps(args) => maps::maps(&args),
        }
    }
}
