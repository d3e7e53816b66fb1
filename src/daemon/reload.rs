//! SIGHUP: reload the configuration through the same path as startup. A valid config is
//! applied to the running loops; keys that need a restart keep their running values and
//! are logged; an invalid config changes nothing and is reported in the log and STATUS.

use std::path::PathBuf;
use std::sync::Arc;

use tracing::{error, info, warn};

use super::context::Context;
use super::systemd;
use crate::config::Config;
use crate::telemetry::LogLevelHandle;

pub(super) struct Reloader {
    pub config_path: Option<PathBuf>,
    pub config_tx: tokio::sync::watch::Sender<Arc<Config>>,
    pub log_level: Option<LogLevelHandle>,
}

impl Reloader {
    pub(super) fn reload(&self, ctx: &Context) {
        systemd::reloading();
        let running = ctx.config();
        match Config::load(self.config_path.as_deref()) {
            Err(e) => {
                let problems = e.lines();
                for problem in &problems {
                    error!(problem = %problem, "configuration reload rejected");
                }
                error!(
                    problems = problems.len(),
                    "invalid configuration; still running on the previous one"
                );
                ctx.metrics.reload(false);
                ctx.board.set_config_error(Some(format!(
                    "reload failed ({} problems), running previous config",
                    problems.len()
                )));
            }
            Ok(new) => {
                let ignored = running.restart_required_changes(&new);
                for key in &ignored {
                    warn!(
                        key,
                        "changed key needs a restart; keeping the running value until then"
                    );
                }
                let mut effective = new;
                effective.keep_restart_only_keys(&running);
                if let Some(handle) = &self.log_level
                    && effective.log.level != running.log.level
                    && let Err(error) = handle.set_level(&effective.log.level)
                {
                    warn!(%error, "cannot apply log.level");
                }
                ctx.metrics.reload(true);
                ctx.board.set_config_error(None);
                ctx.board.set_max_size(effective.cache.max_size);
                let _ = self.config_tx.send(Arc::new(effective));
                info!(restart_needed = ignored.len(), "configuration reloaded");
                // Every loop re-reads its settings now (a smaller max_size prunes at once).
                ctx.nudges.all();
            }
        }
        ctx.board.ready();
    }
}
