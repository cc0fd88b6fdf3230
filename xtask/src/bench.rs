//! `cargo xtask bench`: filled in below.
pub fn run(_write: bool) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
