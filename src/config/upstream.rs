//! The `[upstream]` section: where queued images are fetched from (Glance's v2 API with a
//! token or Keystone, a plain HTTP URL template, or a directory such as Glance's
//! filesystem store).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use super::Config;
use super::keys::{UPSTREAM_KINDS, unknown_choice};
use super::validate::Validator;

#[derive(Debug, Clone, PartialEq)]
pub enum KeystoneMethod {
    Password {
        username: String,
        password: String,
        user_domain_name: String,
        project_name: String,
        project_domain_name: String,
    },
    ApplicationCredential {
        id: String,
        secret: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum GlanceAuth {
    None,
    /// A file holding a token (re-read for every request, so it can be rotated).
    TokenFile(PathBuf),
    Keystone {
        auth_url: String,
        method: KeystoneMethod,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamKind {
    Glance {
        /// One endpoint or several (tried by health, then in this order).
        urls: Vec<String>,
        auth: GlanceAuth,
    },
    Http {
        url_template: String,
        md5_header: Option<String>,
        sha512_header: Option<String>,
    },
    Directory {
        path: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub kind: UpstreamKind,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// How long a Glance endpoint that failed is passed over.
    pub down_for: Duration,
}

/// Fills `[upstream]`, a union tagged by `upstream.kind`: which keys apply depends on
/// the kind, so this section is assembled here rather than key by key.
pub(super) fn fill(v: &mut Validator<'_>, c: &mut Config) {
    c.upstream = v.upstream();
    // Only Glance's API can answer what a Glance client sends (`[http]` is filled
    // before `[upstream]`, so the rule is checked here).
    let glance = matches!(
        c.upstream.as_ref().map(|u| &u.kind),
        Some(UpstreamKind::Glance { .. })
    );
    if c.http.forward && !glance {
        v.problem(
            "http.forward",
            "needs upstream.kind = \"glance\" (requests are forwarded to Glance's API)".into(),
        );
    }
}

impl Validator<'_> {
    pub(super) fn upstream(&mut self) -> Option<UpstreamConfig> {
        let kind = self.string("upstream.kind")?;
        // A default of the right kind is the table's to keep (tested there).
        let connect_timeout = self.get("upstream.connect_timeout").unwrap_or_default();
        let read_timeout = self.get("upstream.read_timeout").unwrap_or_default();
        let down_for = self.get("upstream.down_for").unwrap_or_default();
        // Like every path in the file: relative to the file's directory.
        let ca_file: Option<PathBuf> = self.get("upstream.ca_file");
        if let Some(ca) = &ca_file
            && !ca.is_file()
        {
            self.problem(
                "upstream.ca_file",
                format!("{} is not a readable file", ca.display()),
            );
        }
        let kind = match kind.as_str() {
            "glance" => UpstreamKind::Glance {
                urls: self.required_urls(
                    "upstream.url",
                    "the Glance API endpoint, e.g. https://glance.example.org:9292, or a list of them",
                ),
                auth: self.glance_auth(),
            },
            "http" => {
                let url_template =
                    self.required_url("upstream.url_template", "a URL with {image_id}");
                if !url_template.is_empty() && !url_template.contains("{image_id}") {
                    self.problem("upstream.url_template", "must contain {image_id}".into());
                }
                UpstreamKind::Http {
                    url_template,
                    md5_header: self.get("upstream.md5_header"),
                    sha512_header: self.get("upstream.sha512_header"),
                }
            }
            "directory" => {
                let path: PathBuf = self.get("upstream.path").unwrap_or_default();
                if path.as_os_str().is_empty() {
                    self.problem(
                        "upstream.path",
                        "is required: the directory holding <image_id> files".into(),
                    );
                } else if !path.is_dir() {
                    self.problem(
                        "upstream.path",
                        format!("{} is not a directory", path.display()),
                    );
                }
                UpstreamKind::Directory { path }
            }
            other => {
                self.problem(
                    "upstream.kind",
                    unknown_choice("kind", other, UPSTREAM_KINDS),
                );
                return None;
            }
        };
        Some(UpstreamConfig {
            kind,
            ca_file,
            connect_timeout,
            read_timeout,
            down_for,
        })
    }

    /// One URL or a list of them, each http:// or https://, at least one.
    fn required_urls(&mut self, key: &str, what: &str) -> Vec<String> {
        let urls = self.url_list(key).unwrap_or_default();
        if urls.is_empty() {
            self.problem(key, format!("is required: {what}"));
        }
        for u in &urls {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                let shown = crate::redact::mask_url(u);
                self.problem(key, format!("{shown:?} is not an http:// or https:// URL"));
            }
        }
        urls
    }

    fn required_url(&mut self, key: &str, what: &str) -> String {
        match self.string(key) {
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => u,
            Some(u) => {
                self.problem(key, format!("{u:?} is not an http:// or https:// URL"));
                u
            }
            None => {
                self.problem(key, format!("is required: {what}"));
                String::new()
            }
        }
    }

    fn glance_auth(&mut self) -> GlanceAuth {
        if let Some(path) = self.get::<PathBuf>("upstream.token_file") {
            match std::fs::metadata(&path) {
                Ok(m) if !m.is_file() => self.problem(
                    "upstream.token_file",
                    format!("{} is not a regular file", path.display()),
                ),
                // A token is a credential: others must not read it, nor anyone but its
                // owner replace it with one of their choosing.
                Ok(m) if m.permissions().mode() & 0o004 != 0 => self.problem(
                    "upstream.token_file",
                    format!(
                        "{} is world-readable: chmod o-r it (a token is a credential)",
                        path.display()
                    ),
                ),
                Ok(m) if m.permissions().mode() & 0o022 != 0 => self.problem(
                    "upstream.token_file",
                    format!(
                        "{} is writable by its group or others: chmod go-w it (whoever can write it chooses the token sent)",
                        path.display()
                    ),
                ),
                Ok(_) => {}
                Err(e) => self.problem("upstream.token_file", format!("{}: {e}", path.display())),
            }
            return GlanceAuth::TokenFile(path);
        }
        let Some(auth_url) = self.string("upstream.keystone.auth_url") else {
            return GlanceAuth::None;
        };
        let credential_id = self.string("upstream.keystone.application_credential_id");
        let method = if let Some(id) = credential_id {
            let secret = self
                .string("upstream.keystone.application_credential_secret")
                .unwrap_or_else(|| {
                    self.problem(
                        "upstream.keystone.application_credential_secret",
                        "is required with application_credential_id".into(),
                    );
                    String::new()
                });
            KeystoneMethod::ApplicationCredential { id, secret }
        } else {
            let need = |v: &mut Self, key: &str| {
                v.string(key).unwrap_or_else(|| {
                    v.problem(
                        key,
                        "is required for Keystone password authentication".into(),
                    );
                    String::new()
                })
            };
            KeystoneMethod::Password {
                username: need(self, "upstream.keystone.username"),
                password: need(self, "upstream.keystone.password"),
                project_name: need(self, "upstream.keystone.project_name"),
                user_domain_name: self
                    .get("upstream.keystone.user_domain_name")
                    .unwrap_or_default(),
                project_domain_name: self
                    .get("upstream.keystone.project_domain_name")
                    .unwrap_or_default(),
            }
        };
        GlanceAuth::Keystone { auth_url, method }
    }
}
