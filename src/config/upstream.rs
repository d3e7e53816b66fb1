//! The `[upstream]` section: where queued images are fetched from (Glance's v2 API with a
//! token or Keystone, a plain HTTP URL template, or a directory such as Glance's
//! filesystem store).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use super::validate::Validator;
use super::{PrefetcherConfig, format_duration, format_size};

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
        url: String,
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
}

pub(super) const KEYS: &[&str] = &[
    "prefetcher.concurrency",
    "prefetcher.interval",
    "prefetcher.max_attempts",
    "prefetcher.retry_delay",
    "prefetcher.max_retry_delay",
    "prefetcher.max_bytes_per_second",
    "prefetcher.min_bytes_per_second",
    "prefetcher.min_rate_window",
    "prefetcher.claim_ttl",
    "upstream.kind",
    "upstream.url",
    "upstream.url_template",
    "upstream.path",
    "upstream.ca_file",
    "upstream.token_file",
    "upstream.connect_timeout",
    "upstream.read_timeout",
    "upstream.md5_header",
    "upstream.sha512_header",
    "upstream.keystone.auth_url",
    "upstream.keystone.username",
    "upstream.keystone.password",
    "upstream.keystone.user_domain_name",
    "upstream.keystone.project_name",
    "upstream.keystone.project_domain_name",
    "upstream.keystone.application_credential_id",
    "upstream.keystone.application_credential_secret",
];

impl Validator<'_> {
    pub(super) fn upstream(&mut self) -> Option<UpstreamConfig> {
        let kind = self.string("upstream.kind")?;
        let connect_timeout = self
            .positive_duration("upstream.connect_timeout")
            .unwrap_or(Duration::from_secs(10));
        let read_timeout = self
            .positive_duration("upstream.read_timeout")
            .unwrap_or(Duration::from_secs(60));
        // Like every path in the file: relative to the file's directory.
        let ca_file = self.optional_path("upstream.ca_file");
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
                url: self.required_url(
                    "upstream.url",
                    "the Glance API endpoint, e.g. https://glance.example.org:9292",
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
                    md5_header: self.string("upstream.md5_header"),
                    sha512_header: self.string("upstream.sha512_header"),
                }
            }
            "directory" => {
                let path = self.path("upstream.path", "");
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
                    format!("unknown kind {other:?}: expected glance, http or directory"),
                );
                return None;
            }
        };
        Some(UpstreamConfig {
            kind,
            ca_file,
            connect_timeout,
            read_timeout,
        })
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
        if let Some(path) = self.optional_path("upstream.token_file") {
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
                    .string("upstream.keystone.user_domain_name")
                    .unwrap_or_else(|| "Default".into()),
                project_domain_name: self
                    .string("upstream.keystone.project_domain_name")
                    .unwrap_or_else(|| "Default".into()),
            }
        };
        GlanceAuth::Keystone { auth_url, method }
    }
}

/// The two sections as TOML, secrets masked.
pub(super) fn to_toml(p: &PrefetcherConfig, u: Option<&UpstreamConfig>) -> String {
    let mut out = format!(
        "[prefetcher]\nconcurrency = {}\ninterval = {:?}\nmax_attempts = {}\nretry_delay = {:?}\nmax_retry_delay = {:?}\nclaim_ttl = {:?}\n{}\n{}\n",
        p.concurrency,
        format_duration(p.interval),
        p.max_attempts,
        format_duration(p.retry_delay),
        format_duration(p.max_retry_delay),
        format_duration(p.claim_ttl),
        match p.max_bytes_per_second {
            Some(b) => format!("max_bytes_per_second = {:?}", format_size(b)),
            None => "# max_bytes_per_second is unset".into(),
        },
        match p.min_bytes_per_second {
            Some(b) => format!(
                "min_bytes_per_second = {:?}\nmin_rate_window = {:?}",
                format_size(b),
                format_duration(p.min_rate_window)
            ),
            None => format!(
                "min_bytes_per_second = 0\nmin_rate_window = {:?}",
                format_duration(p.min_rate_window)
            ),
        }
    );
    let Some(u) = u else {
        out.push_str("\n# [upstream] is unset: queued images are not prefetched\n");
        return out;
    };
    out.push_str("\n[upstream]\n");
    let mut keystone = String::new();
    match &u.kind {
        UpstreamKind::Glance { url, auth } => {
            let url = crate::redact::mask_url(url);
            out.push_str(&format!("kind = \"glance\"\nurl = {url:?}\n"));
            match auth {
                GlanceAuth::None => {}
                GlanceAuth::TokenFile(p) => {
                    out.push_str(&format!("token_file = {:?}\n", p.display().to_string()))
                }
                GlanceAuth::Keystone { auth_url, method } => {
                    let auth_url = crate::redact::mask_url(auth_url);
                    keystone.push_str(&format!("\n[upstream.keystone]\nauth_url = {auth_url:?}\n"));
                    match method {
                        KeystoneMethod::Password { username, project_name, user_domain_name, project_domain_name, .. } => {
                            keystone.push_str(&format!(
                                "username = {username:?}\npassword = \"***\"\nproject_name = {project_name:?}\nuser_domain_name = {user_domain_name:?}\nproject_domain_name = {project_domain_name:?}\n"
                            ));
                        }
                        KeystoneMethod::ApplicationCredential { id, .. } => keystone.push_str(&format!(
                            "application_credential_id = {id:?}\napplication_credential_secret = \"***\"\n"
                        )),
                    }
                }
            }
        }
        UpstreamKind::Http {
            url_template,
            md5_header,
            sha512_header,
        } => {
            let url_template = crate::redact::mask_url(url_template);
            out.push_str(&format!(
                "kind = \"http\"\nurl_template = {url_template:?}\n"
            ));
            if let Some(h) = md5_header {
                out.push_str(&format!("md5_header = {h:?}\n"));
            }
            if let Some(h) = sha512_header {
                out.push_str(&format!("sha512_header = {h:?}\n"));
            }
        }
        UpstreamKind::Directory { path } => {
            out.push_str(&format!(
                "kind = \"directory\"\npath = {:?}\n",
                path.display().to_string()
            ));
        }
    }
    if let Some(ca) = &u.ca_file {
        out.push_str(&format!("ca_file = {:?}\n", ca.display().to_string()));
    }
    out.push_str(&format!(
        "connect_timeout = {:?}\nread_timeout = {:?}\n",
        format_duration(u.connect_timeout),
        format_duration(u.read_timeout)
    ));
    out.push_str(&keystone);
    out
}
