//! Logging setup. The CLI logs warnings to stderr as text; the daemon (added with the
//! `run` command) picks journald, text or JSON from `log.format`.

use tracing_subscriber::EnvFilter;

/// Logging for one-shot CLI commands: warnings and errors on stderr, or the level named
/// by `RUST_LOG` when set.
pub fn init_cli() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
