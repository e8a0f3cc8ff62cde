use clap::Args;
#[derive(Args)]
pub struct RunArgs {}
pub fn run(_: &RunArgs) -> anyhow::Result<()> {
    Ok(())
}
