//! `planner`: measure a machine, solve for a policy, explain and check policies.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("planner: no commands yet")
}
