//! `executor --policy p.toml`: run a model as the policy says and report what was measured.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("executor: not implemented yet")
}
