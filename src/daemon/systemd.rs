//! The systemd notification protocol: READY, STATUS, RELOADING, STOPPING, WATCHDOG.
//! Every call is a no-op when `NOTIFY_SOCKET` is unset (not under systemd). Failures to
//! send are logged at debug level and otherwise ignored: the manager may be gone.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

fn send(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        debug!(%error, "cannot notify the service manager");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Tells systemd a reload started; `MONOTONIC_USEC` is required with `RELOADING=1`.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading configuration"),
        ]),
        Err(_) => send(&[
            NotifyState::Reloading,
            NotifyState::Status("reloading configuration"),
        ]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// The watchdog timeout systemd asked for (`WatchdogSec=`), if any.
pub fn watchdog_timeout() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}
