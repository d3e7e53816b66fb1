//! Logging setup. The CLI logs warnings to stderr as text. The daemon logs natively to
//! journald under systemd (or with `log.format = "journald"`), as human text on a
//! terminal, or as JSON lines, with a level that SIGHUP can change.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry};

use crate::config::{LogConfig, LogFormat};

/// Logging for one-shot CLI commands: warnings and errors on stderr, or the level named
/// by `RUST_LOG` when set.
pub(crate) fn init_cli() {
    // sqlx's "slow statement" warnings (a statement waiting on a lock) only repeat what
    // the command's own error says.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,sqlx=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// Changes the daemon's log level at run time (SIGHUP).
#[derive(Clone)]
pub(crate) struct LogLevelHandle {
    filter: reload::Handle<EnvFilter, Registry>,
}

impl LogLevelHandle {
    pub(crate) fn set_level(&self, level: &str) -> Result<(), String> {
        let filter = EnvFilter::builder()
            .parse(level)
            .map_err(|e| e.to_string())?;
        self.filter.reload(filter).map_err(|e| e.to_string())
    }
}

/// Which output the daemon's logs went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogOutput {
    Journald,
    Text,
    Json,
}

/// Whether stderr is connected to the journal: systemd sets `JOURNAL_STREAM` to the
/// device and inode of the stream it gave us.
fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    match rustix::fs::fstat(std::io::stderr()) {
        Ok(st) => dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino),
        Err(_) => false,
    }
}

/// Installs the daemon's subscriber. Journald is used when asked for or when stderr is
/// the journal, and falls back to text when the journal socket is missing.
pub(crate) fn init_daemon(config: &LogConfig) -> (LogLevelHandle, LogOutput) {
    let filter = EnvFilter::builder()
        .parse(&config.level)
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter_layer, handle) = reload::Layer::new(filter);
    let want_journald = match config.format {
        LogFormat::Journald => true,
        LogFormat::Auto => stderr_is_journal(),
        LogFormat::Text | LogFormat::Json => false,
    };
    let journald = want_journald
        .then(|| {
            tracing_journald::layer().ok().map(|l| {
                l.with_syslog_identifier("glance-cached".into())
                    .with_field_prefix(None)
                    .with_priority_mappings(tracing_journald::PriorityMappings {
                        info: tracing_journald::Priority::Informational,
                        debug: tracing_journald::Priority::Debug,
                        ..tracing_journald::PriorityMappings::new()
                    })
            })
        })
        .flatten();
    let output = match (&journald, config.format) {
        (Some(_), _) => LogOutput::Journald,
        (None, LogFormat::Json) => LogOutput::Json,
        (None, _) => LogOutput::Text,
    };
    let text = (output == LogOutput::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
    });
    let json = (output == LogOutput::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_current_span(false)
    });
    let _ = tracing_subscriber::registry()
        .with(filter_layer)
        .with(journald)
        .with(text)
        .with(json)
        .try_init();
    if want_journald && output != LogOutput::Journald {
        tracing::warn!("journald socket unavailable; logging text to stderr instead");
    }
    (LogLevelHandle { filter: handle }, output)
}
