//! PLACEHOLDER, replaced by the daemon branch: only here so that `run`
//! dispatches to the agreed `blixard::daemon::run(config, shutdown)`.

use std::future::Future;

use crate::config::Config;

pub async fn run(_config: Config, _shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    anyhow::bail!("the daemon is not built in this branch")
}
