//! The one place that reads the wall clock. Logic that depends on time (stall, LRU,
//! backoff) takes `now` as a parameter so tests set times instead of sleeping.
//! `clippy.toml` disallows the wall-clock reads everywhere else.

use chrono::{DateTime, Utc};

/// `d` after `t`, saturating at the latest time chrono can hold.
pub(crate) fn after(t: DateTime<Utc>, d: std::time::Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The current UTC time.
#[allow(
    clippy::disallowed_methods,
    reason = "the one wall-clock read, for chrono times"
)]
pub(crate) fn now() -> DateTime<Utc> {
    Utc::now()
}

/// The current wall-clock time as a `SystemTime` (file mtimes are compared against it).
#[allow(
    clippy::disallowed_methods,
    reason = "the one wall-clock read, for file times"
)]
pub(crate) fn system_now() -> std::time::SystemTime {
    std::time::SystemTime::now()
}

/// The clock the kernel stamps new files from (`CLOCK_REALTIME_COARSE`): it lags the
/// wall clock by up to a tick (1 to 10 ms), and a file made once it has passed a time
/// `t` has an mtime after `t`. (A kernel with fine-grained stamps gives a stamp at
/// least this clock's reading, so the same holds.)
pub(crate) fn file_stamp_now() -> std::time::SystemTime {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
    let (Ok(secs), Ok(nanos)) = (u64::try_from(now.tv_sec), u32::try_from(now.tv_nsec)) else {
        // A clock before 1970: nothing is stamped after the epoch.
        return std::time::UNIX_EPOCH;
    };
    std::time::UNIX_EPOCH
        .checked_add(std::time::Duration::new(secs, nanos.min(999_999_999)))
        .unwrap_or(std::time::UNIX_EPOCH)
}
