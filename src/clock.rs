//! The one place that reads the wall clock. Logic that depends on time (stall, LRU,
//! backoff) takes `now` as a parameter so tests set times instead of sleeping.

use chrono::{DateTime, Utc};

/// The current UTC time.
pub fn now() -> DateTime<Utc> {
    Utc::now()
}
