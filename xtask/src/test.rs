use clap::Args;
#[derive(Args)]
pub struct TestArgs {}
pub fn test(_: &TestArgs) -> anyhow::Result<()> {
    Ok(())
}
