//! `DbTime`: a naive-UTC timestamp stored the way Glance (SQLAlchemy) stores it.
//!
//! On SQLite SQLAlchemy writes `YYYY-MM-DD HH:MM:SS.ffffff` text, and LRU order is text
//! order, so we write exactly that shape (sqlx's own encoding drops trailing zeros). On
//! PostgreSQL (`TIMESTAMP WITHOUT TIME ZONE`) and MySQL (`DATETIME`) the native types are
//! used as they are.

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::mysql::{MySql, MySqlTypeInfo, MySqlValueRef};
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef, Postgres};
use sqlx::sqlite::{Sqlite, SqliteArgumentsBuffer, SqliteTypeInfo, SqliteValueRef};
use sqlx::{Decode, Encode, Type};

/// SQLAlchemy's SQLite DATETIME storage format.
const SQLALCHEMY_SQLITE_FORMAT: &str = "%Y-%m-%d %H:%M:%S%.6f";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DbTime(pub NaiveDateTime);

impl DbTime {
    pub fn from_utc(t: DateTime<Utc>) -> Self {
        DbTime(t.naive_utc())
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
        Encode::<Sqlite>::encode(self.0.format(SQLALCHEMY_SQLITE_FORMAT).to_string(), buf)
    }
}

impl<'r> Decode<'r, Sqlite> for DbTime {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        <NaiveDateTime as Decode<Sqlite>>::decode(value).map(DbTime)
    }
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
        <NaiveDateTime as Decode<Postgres>>::decode(value).map(DbTime)
    }
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
mod tests {
    use super::*;

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
