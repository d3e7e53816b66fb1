//! `import-glance-config`: reads Glance's INI options (`glance-api.conf`, optionally
//! `glance-cache.conf`) and writes the equivalent glance-cached TOML, so an operator
//! can switch from Glance's cron tools in one step.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub(crate) enum GlanceConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {problem}")]
    Syntax {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("[database] connection {0:?} is not a SQLite, PostgreSQL or MySQL URL")]
    UnsupportedDatabase(String),
}

/// Sections of an INI file: lower-cased section name -> key -> value. Later files and
/// later lines win, as oslo.config does.
#[derive(Debug, Default)]
pub(crate) struct Ini {
    sections: HashMap<String, HashMap<String, String>>,
}

impl Ini {
    pub(crate) fn read(&mut self, path: &Path) -> Result<(), GlanceConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| GlanceConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut section = "default".to_string();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[') {
                let Some(name) = name.strip_suffix(']') else {
                    return Err(GlanceConfigError::Syntax {
                        path: path.to_path_buf(),
                        line: n + 1,
                        problem: "unterminated section header".into(),
                    });
                };
                section = name.trim().to_ascii_lowercase();
                continue;
            }
            let Some((key, value)) = line.split_once('=').or_else(|| line.split_once(':')) else {
                return Err(GlanceConfigError::Syntax {
                    path: path.to_path_buf(),
                    line: n + 1,
                    problem: format!("expected `key = value`, found {line:?}"),
                });
            };
            self.sections
                .entry(section.clone())
                .or_default()
                .insert(key.trim().to_owned(), value.trim().to_owned());
        }
        Ok(())
    }

    pub(crate) fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.sections
            .get(section)?
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// Turns an SQLAlchemy URL (`mysql+pymysql://u:p@h/glance?charset=utf8`) into the sqlx
/// URL glance-cached uses (`mysql://u:p@h/glance`).
pub(crate) fn sqlalchemy_to_sqlx(url: &str) -> Result<String, GlanceConfigError> {
    let unsupported = || GlanceConfigError::UnsupportedDatabase(crate::db::mask_url(url));
    let (scheme, rest) = url.split_once("://").ok_or_else(unsupported)?;
    let dialect = scheme.split('+').next().unwrap_or_default();
    let rest = rest.split('?').next().unwrap_or_default();
    match dialect {
        "mysql" | "mariadb" => Ok(format!("mysql://{rest}")),
        "postgresql" | "postgres" => Ok(format!("postgres://{rest}")),
        // SQLAlchemy: sqlite:////abs/path (four slashes); sqlx: sqlite:///abs/path.
        "sqlite" => match rest.strip_prefix('/') {
            Some(path) if path.starts_with('/') => Ok(format!("sqlite://{path}")),
            _ => Err(unsupported()),
        },
        _ => Err(unsupported()),
    }
}

/// The TOML equivalent of the Glance options found.
pub(crate) fn to_toml(ini: &Ini, sources: &[&Path]) -> Result<String, GlanceConfigError> {
    let names: Vec<String> = sources.iter().map(|p| p.display().to_string()).collect();
    let mut out = format!(
        "# glance-cached configuration imported from {}\n",
        names.join(", ")
    );
    out.push_str(
        "# Review, then check with: glance-cached check-config --config THIS_FILE\n\n[cache]\n",
    );
    let quoted = |v: &str| format!("{v:?}");
    match ini.get("default", "image_cache_dir") {
        Some(dir) => out.push_str(&format!("dir = {}\n", quoted(dir))),
        None => out.push_str("# image_cache_dir is unset in Glance: set dir\n"),
    }
    // Glance's values are integers (bytes, seconds); anything else is passed through
    // quoted for check-config to judge.
    let number = |v: &str| {
        if v.parse::<u64>().is_ok() {
            v.to_owned()
        } else {
            quoted(v)
        }
    };
    if let Some(size) = ini.get("default", "image_cache_max_size") {
        out.push_str(&format!("max_size = {}\n", number(size)));
    }
    if let Some(stall) = ini.get("default", "image_cache_stall_time") {
        out.push_str(&format!("stall_time = {}\n", number(stall)));
    }
    if let Some(conn) = ini.get("database", "connection") {
        out.push_str(&format!(
            "\n[database]\nurl = {}\n",
            quoted(&sqlalchemy_to_sqlx(conn)?)
        ));
    }
    match ini.get("default", "worker_self_reference_url") {
        Some(url) => out.push_str(&format!("\n[node]\nreference_url = {}\n", quoted(url))),
        None => out.push_str(
            "\n[node]\n# worker_self_reference_url is unset in Glance: set reference_url\n",
        ),
    }
    if ini
        .get("default", "image_cache_driver")
        .is_some_and(|d| d != "centralized_db")
    {
        out.push_str("\n# Note: Glance's image_cache_driver is not centralized_db; glance-cached keeps\n# its metadata in the database above (see `glance-cached migrate-sqlite`).\n");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlalchemy_urls_become_sqlx_urls() {
        assert_eq!(
            sqlalchemy_to_sqlx("mysql+pymysql://glance:pw@db/glance?charset=utf8").unwrap(),
            "mysql://glance:pw@db/glance"
        );
        assert_eq!(
            sqlalchemy_to_sqlx("postgresql+psycopg2://g:pw@db:5432/glance").unwrap(),
            "postgres://g:pw@db:5432/glance"
        );
        assert_eq!(
            sqlalchemy_to_sqlx("sqlite:////var/lib/glance/glance.sqlite").unwrap(),
            "sqlite:///var/lib/glance/glance.sqlite"
        );
        assert!(sqlalchemy_to_sqlx("oracle://x").is_err());
        assert!(sqlalchemy_to_sqlx("sqlite:///relative.db").is_err());
    }
}
