//! The demo lab (`cargo xtask lab`).
pub fn run() -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
