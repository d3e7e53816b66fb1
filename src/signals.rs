//! Signals become domain commands: TERM and INT shut down, HUP reloads. The listener is
//! created once, on a dedicated thread, and forwards into a channel the supervisor reads.

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SignalCommand {
    Shutdown(&'static str),
    Reload,
}

/// Starts listening. Registering TERM and INT replaces their default action, so from
/// here on the daemon exits only through its own teardown.
pub(crate) fn listen() -> std::io::Result<mpsc::UnboundedReceiver<SignalCommand>> {
    let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT])?;
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let command = match signal {
                    SIGHUP => SignalCommand::Reload,
                    SIGTERM => SignalCommand::Shutdown("SIGTERM"),
                    _ => SignalCommand::Shutdown("SIGINT"),
                };
                if tx.send(command).is_err() {
                    break;
                }
            }
        })?;
    Ok(rx)
}
