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
