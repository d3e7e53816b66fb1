//! `DbTime`: a naive-UTC timestamp stored the way Glance (SQLAlchemy) stores it.
//!
//! On SQLite SQLAlchemy writes `YYYY-MM-DD HH:MM:SS.ffffff` text, and LRU order is text
//! order, so we write exactly that shape (sqlx's own encoding drops trailing zeros). On
//! PostgreSQL (`TIMESTAMP WITHOUT TIME ZONE`) and MySQL (`DATETIME`) the native types are
//! used as they are.

use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::mysql::{MySql, MySqlTypeInfo, MySqlValueRef};
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueFormat, PgValueRef, Postgres};
use sqlx::sqlite::{Sqlite, SqliteArgumentsBuffer, SqliteTypeInfo, SqliteValueRef};
use sqlx::{Decode, Encode, Type};

/// SQLAlchemy's SQLite DATETIME storage format (what `sqlalchemy_text` writes).
#[cfg(test)]
const SQLALCHEMY_SQLITE_FORMAT: &str = "%Y-%m-%d %H:%M:%S%.6f";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DbTime(pub NaiveDateTime);

/// The earliest and latest times every backend stores and orders correctly, in
/// microseconds since the epoch: MySQL's DATETIME spans years 1000 to 9999, and on
/// SQLite text order is time order only with four-digit years.
const STORABLE_MICROS: std::ops::RangeInclusive<i128> =
    -30_610_224_000_000_000..=253_402_300_799_999_999;

impl DbTime {
    pub fn from_utc(t: DateTime<Utc>) -> Self {
        DbTime(t.naive_utc())
    }

    /// A file's mtime as a `DbTime`, to microseconds. Anyone can set any mtime
    /// (`touch -d`, `utime`), and chrono's `From<SystemTime>` panics outside its range:
    /// an mtime outside the storable years is `Err` with the nearest storable time, for
    /// the caller to use and warn about.
    pub fn from_mtime(t: SystemTime) -> Result<DbTime, DbTime> {
        let micros = match t.duration_since(UNIX_EPOCH) {
            Ok(after) => i128::try_from(after.as_micros()).unwrap_or(i128::MAX),
            Err(before) => i128::try_from(before.duration().as_micros()).map_or(i128::MIN, |m| -m),
        };
        let clamped = micros.clamp(*STORABLE_MICROS.start(), *STORABLE_MICROS.end());
        // In range by the clamp (chrono spans about 262,000 years either side).
        let time = i64::try_from(clamped)
            .ok()
            .and_then(DateTime::from_timestamp_micros)
            .map_or(NaiveDateTime::MIN, |t| t.naive_utc());
        if clamped == micros {
            Ok(DbTime(time))
        } else {
            Err(DbTime(time))
        }
    }
    pub fn to_utc(self) -> DateTime<Utc> {
        self.0.and_utc()
    }
}

impl Type<Sqlite> for DbTime {
    fn type_info() -> SqliteTypeInfo {
        <NaiveDateTime as Type<Sqlite>>::type_info()
    }
    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <NaiveDateTime as Type<Sqlite>>::compatible(ty)
    }
}

impl Encode<'_, Sqlite> for DbTime {
    fn encode_by_ref(&self, buf: &mut SqliteArgumentsBuffer) -> Result<IsNull, BoxDynError> {
        Encode::<Sqlite>::encode(sqlalchemy_text(&self.0), buf)
    }
}

impl<'r> Decode<'r, Sqlite> for DbTime {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        // The common case (ours and SQLAlchemy's rows) without chrono's general parser,
        // which a profile of listing 100k rows showed as the largest cost of decoding.
        let text = <&str as Decode<Sqlite>>::decode(value)?;
        if let Some(t) = parse_sqlalchemy_text(text) {
            return Ok(DbTime(t));
        }
        for pattern in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
            if let Ok(t) = NaiveDateTime::parse_from_str(text, pattern) {
                return Ok(DbTime(t));
            }
        }
        let t = DateTime::parse_from_rfc3339(text).map_err(|e| format!("time {text:?}: {e}"))?;
        Ok(DbTime(t.naive_utc()))
    }
}

/// `YYYY-MM-DD HH:MM:SS.ffffff`, written directly (chrono's `format` interprets the
/// pattern on every call).
fn sqlalchemy_text(t: &NaiveDateTime) -> String {
    use chrono::{Datelike, Timelike};
    use std::fmt::Write;
    let mut s = String::with_capacity(26);
    let _ = write!(
        s,
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond() / 1_000 % 1_000_000
    );
    s
}

/// Parses exactly `YYYY-MM-DD HH:MM:SS` with an optional `.f` to `.ffffff` fraction;
/// `None` for anything else (left to chrono).
fn parse_sqlalchemy_text(text: &str) -> Option<NaiveDateTime> {
    let b = text.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b' '
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        b.get(r)?.iter().try_fold(0u32, |acc, c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    let micros = match &b[19..] {
        [] => 0,
        [b'.', frac @ ..] if (1..=6).contains(&frac.len()) => {
            let v = num(20..b.len())?;
            v * 10u32.pow(6 - frac.len() as u32)
        }
        _ => return None,
    };
    chrono::NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)?.and_hms_micro_opt(
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
        micros,
    )
}

impl Type<Postgres> for DbTime {
    fn type_info() -> PgTypeInfo {
        <NaiveDateTime as Type<Postgres>>::type_info()
    }
    fn compatible(ty: &PgTypeInfo) -> bool {
        <NaiveDateTime as Type<Postgres>>::compatible(ty)
    }
}

impl Encode<'_, Postgres> for DbTime {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        Encode::<Postgres>::encode_by_ref(&self.0, buf)
    }
}

impl<'r> Decode<'r, Postgres> for DbTime {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        // sqlx adds the microseconds to its epoch unchecked and panics on `infinity`
        // (i64::MAX) or any time beyond chrono's range: check it here instead.
        if value.format() == PgValueFormat::Binary {
            let micros = <i64 as Decode<Postgres>>::decode(value)?;
            return pg_time_from_micros(micros)
                .map(DbTime)
                .ok_or_else(|| format!("time out of range: {micros} µs after 2000-01-01").into());
        }
        <NaiveDateTime as Decode<Postgres>>::decode(value).map(DbTime)
    }
}

/// PostgreSQL's binary TIMESTAMP: microseconds since 2000-01-01 00:00:00; `None` for
/// `infinity`, `-infinity` and what chrono cannot hold.
fn pg_time_from_micros(micros: i64) -> Option<NaiveDateTime> {
    const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
    if micros == i64::MAX || micros == i64::MIN {
        return None;
    }
    let unix = micros.checked_add(PG_EPOCH_MICROS)?;
    DateTime::from_timestamp_micros(unix).map(|t| t.naive_utc())
}

impl Type<MySql> for DbTime {
    fn type_info() -> MySqlTypeInfo {
        <NaiveDateTime as Type<MySql>>::type_info()
    }
    fn compatible(ty: &MySqlTypeInfo) -> bool {
        <NaiveDateTime as Type<MySql>>::compatible(ty)
    }
}

impl Encode<'_, MySql> for DbTime {
    fn encode_by_ref(&self, buf: &mut Vec<u8>) -> Result<IsNull, BoxDynError> {
        Encode::<MySql>::encode_by_ref(&self.0, buf)
    }
}

impl<'r> Decode<'r, MySql> for DbTime {
    fn decode(value: MySqlValueRef<'r>) -> Result<Self, BoxDynError> {
        <NaiveDateTime as Decode<MySql>>::decode(value).map(DbTime)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::Timelike;
    use proptest::prelude::*;
    use std::time::Duration;

    /// Any time a filesystem can report: seconds across the whole i64 range of
    /// `st_mtime`, either side of the epoch, with nanoseconds.
    pub(crate) fn any_mtime() -> impl Strategy<Value = SystemTime> {
        (any::<bool>(), 0..=i64::MAX as u64, 0..1_000_000_000u32).prop_map(
            |(after, secs, nanos)| {
                let d = Duration::new(secs, nanos);
                let t = if after {
                    UNIX_EPOCH.checked_add(d)
                } else {
                    UNIX_EPOCH.checked_sub(d)
                };
                t.unwrap_or(UNIX_EPOCH)
            },
        )
    }

    proptest! {
        #[test]
        fn any_mtime_becomes_a_storable_time(t in any_mtime()) {
            let stored = match DbTime::from_mtime(t) { Ok(v) | Err(v) => v };
            let text = sqlalchemy_text(&stored.0);
            // Four-digit years, the text reads back as the same time.
            prop_assert_eq!(text.len(), 26, "{}", text);
            prop_assert_eq!(parse_sqlalchemy_text(&text), Some(stored.0));
        }

        #[test]
        fn mtimes_in_range_are_kept_to_the_microsecond(
            secs in -30_610_224_000i64..253_402_300_799,
            micros in 0..1_000_000u32,
        ) {
            let d = Duration::new(secs.unsigned_abs(), 0);
            let whole = if secs >= 0 { UNIX_EPOCH + d } else { UNIX_EPOCH - d };
            let t = whole + Duration::from_micros(u64::from(micros));
            let stored = DbTime::from_mtime(t);
            let expected = DateTime::from_timestamp(secs, micros * 1000).unwrap().naive_utc();
            prop_assert_eq!(stored, Ok(DbTime(expected)));
        }
    }

    proptest! {
        #[test]
        fn any_postgres_time_decodes_or_is_refused(micros in any::<i64>()) {
            if let Some(t) = pg_time_from_micros(micros) {
                let back = (t - pg_time_from_micros(0).unwrap()).num_microseconds();
                prop_assert_eq!(back, Some(micros));
            }
        }
    }

    #[test]
    fn postgres_infinity_is_refused() {
        assert_eq!(pg_time_from_micros(i64::MAX), None);
        assert_eq!(pg_time_from_micros(i64::MIN), None);
        assert_eq!(
            pg_time_from_micros(0)
                .map(|t| sqlalchemy_text(&t))
                .as_deref(),
            Some("2000-01-01 00:00:00.000000")
        );
    }

    #[test]
    fn far_mtimes_are_clamped() {
        let far = UNIX_EPOCH + Duration::from_secs(10u64.pow(13));
        let max = DbTime::from_mtime(far).unwrap_err();
        assert_eq!(sqlalchemy_text(&max.0), "9999-12-31 23:59:59.999999");
        let early = UNIX_EPOCH - Duration::from_secs(10u64.pow(12));
        let min = DbTime::from_mtime(early).unwrap_err();
        assert_eq!(sqlalchemy_text(&min.0), "1000-01-01 00:00:00.000000");
    }

    #[test]
    fn fast_text_round_trips_and_matches_chrono() {
        let t = chrono::NaiveDate::from_ymd_opt(2026, 11, 25)
            .unwrap()
            .and_hms_micro_opt(23, 59, 1, 987_654)
            .unwrap();
        assert_eq!(
            sqlalchemy_text(&t),
            t.format(SQLALCHEMY_SQLITE_FORMAT).to_string()
        );
        assert_eq!(parse_sqlalchemy_text(&sqlalchemy_text(&t)), Some(t));
        let whole = t.with_nanosecond(0).unwrap();
        assert_eq!(parse_sqlalchemy_text("2026-11-25 23:59:01"), Some(whole));
        assert_eq!(
            parse_sqlalchemy_text("2026-11-25 23:59:01.5"),
            Some(whole.with_nanosecond(500_000_000).unwrap())
        );
        for other in [
            "2026-11-25T23:59:01",
            "2026-13-01 00:00:00",
            "x",
            "2026-11-25 23:59:01.1234567",
        ] {
            assert_eq!(parse_sqlalchemy_text(other), None, "{other}");
        }
    }

    #[test]
    fn sqlite_text_matches_sqlalchemy() {
        let t = chrono::NaiveDate::from_ymd_opt(2024, 3, 5)
            .unwrap()
            .and_hms_micro_opt(7, 8, 9, 120)
            .unwrap();
        assert_eq!(
            t.format(SQLALCHEMY_SQLITE_FORMAT).to_string(),
            "2024-03-05 07:08:09.000120"
        );
    }
}
