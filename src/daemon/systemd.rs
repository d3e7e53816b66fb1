//! The systemd notification protocol: READY, STATUS, RELOADING, STOPPING, WATCHDOG.
//!
//! Messages are formatted by `sd-notify` but sent here, on a non-blocking socket: a
//! service manager that does not read its socket must never stall the daemon (a blocked
//! send in a loop or the supervisor would wedge shutdown). A message that cannot be sent
//! at once is dropped and logged at debug level. Every call is a no-op when
//! `NOTIFY_SOCKET` is unset; abstract socket names (`@name`) are supported.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

fn send(states: &[NotifyState]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let mut message = String::new();
    for s in states {
        message.push_str(&s.to_string());
        message.push('\n');
    }
    if let Err(error) = send_to(&path, message.as_bytes()) {
        debug!(%error, "cannot notify the service manager");
    }
}

fn send_to(path: &std::ffi::OsStr, message: &[u8]) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(message, &addr)?
    } else {
        socket.send_to(message, path)?
    };
    if sent != message.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "incomplete notification",
        ));
    }
    Ok(())
}

pub(super) fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub(super) fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Tells systemd a reload started; `MONOTONIC_USEC` is required with `RELOADING=1`.
pub(super) fn reloading() {
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

pub(super) fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

pub(super) fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// The watchdog timeout systemd asked for (`WatchdogSec=`), if any.
pub(super) fn watchdog_timeout() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}
