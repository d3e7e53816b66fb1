//! A real HTTP/1.1 origin on loopback for prefetch tests: Glance's v2 image endpoints,
//! plain files with checksum headers, and a Keystone token endpoint. Each image can be
//! told to misbehave: fail N times, 404, not active, slow, truncated, wrong checksums,
//! a redirect elsewhere. Written by hand (std threads) so it can lie on the wire, which
//! a well-behaved server library refuses to do.

use crate::kit::{md5_hex, sha512_hex};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Answer the first N file requests with `fail_status`.
    pub fail_times: u32,
    pub fail_status: u16,
    /// Glance metadata `status` (default "active").
    pub status: Option<String>,
    /// Pause between 64 KiB chunks of the body.
    pub chunk_delay: Option<Duration>,
    /// Declare the full length but close the connection after this many bytes.
    pub truncate_at: Option<usize>,
    /// Advertise this MD5 instead of the real one.
    pub wrong_md5: bool,
    /// Advertise this size in Glance's metadata instead of the real one.
    pub meta_size: Option<u64>,
    /// Answer file requests with a redirect to this URL.
    pub redirect_to: Option<String>,
    /// Advertise this text as the MD5 (Glance's `checksum`, the plain MD5 header).
    pub md5_text: Option<String>,
    /// Advertise this text as the SHA-512 (Glance's `os_hash_value`, the plain header).
    pub sha512_text: Option<String>,
    /// Leave the plain checksum headers out.
    pub no_checksum_headers: bool,
    /// Pad Glance's image JSON with this many bytes of whitespace.
    pub meta_padding: usize,
    /// Write the body this many bytes at a time (default 64 KiB), `chunk_delay` apart.
    pub chunk_bytes: Option<usize>,
    /// Answer file requests `206` with only bytes FIRST..=LAST and their
    /// `Content-Range`, as a proxy mangling `Range: bytes=0-` might.
    pub partial: Option<(usize, usize)>,
    /// Tell no size: `null` in Glance's metadata, no `Content-Length` on the body (the
    /// connection's close ends it).
    pub no_size: bool,
}

impl Behaviour {
    /// Serves the body in 64 KiB chunks `ms_per_chunk` apart.
    pub fn slow(ms_per_chunk: u64) -> Behaviour {
        Behaviour {
            chunk_delay: Some(Duration::from_millis(ms_per_chunk)),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone)]
pub struct Image {
    pub data: Arc<Vec<u8>>,
    pub behaviour: Behaviour,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub file_requests: HashMap<String, u32>,
    /// Body bytes written for each image's file requests (one-byte probes left out).
    pub bytes_sent: HashMap<String, u64>,
    pub in_flight: u32,
    pub max_in_flight: u32,
    pub tokens_issued: u32,
    /// The bodies of the Keystone token requests, as received.
    pub keystone_requests: Vec<String>,
    /// Each request's path and headers (names lower-cased), as received.
    pub requests: Vec<(String, HashMap<String, String>)>,
}

#[derive(Debug, Default)]
struct State {
    images: HashMap<String, Image>,
    /// When set, Glance endpoints want this X-Auth-Token (or one Keystone issued).
    static_token: Option<String>,
    keystone: bool,
    issued_tokens: Vec<String>,
    token_ttl_secs: i64,
    /// Pad Keystone's token response with this many bytes of whitespace.
    keystone_padding: usize,
    stats: Stats,
}

pub struct Origin {
    pub port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl Origin {
    pub fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State {
            token_ttl_secs: 3600,
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &s);
                });
            }
        });
        Origin { port, state, stop }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn add(&self, id: &str, data: Vec<u8>, behaviour: Behaviour) {
        self.state.lock().unwrap().images.insert(
            id.into(),
            Image {
                data: Arc::new(data),
                behaviour,
            },
        );
    }

    pub fn require_token(&self, token: &str) {
        self.state.lock().unwrap().static_token = Some(token.into());
    }

    /// Glance endpoints want a token issued by our Keystone endpoint, valid `ttl_secs`.
    pub fn require_keystone(&self, ttl_secs: i64) {
        let mut s = self.state.lock().unwrap();
        s.keystone = true;
        s.token_ttl_secs = ttl_secs;
    }

    /// Pads Keystone's token responses with `bytes` of whitespace.
    pub fn pad_keystone(&self, bytes: usize) {
        self.state.lock().unwrap().keystone_padding = bytes;
    }

    pub fn with_stats<R>(&self, f: impl FnOnce(&Stats) -> R) -> R {
        f(&self.state.lock().unwrap().stats)
    }

    pub fn file_requests(&self, id: &str) -> u32 {
        self.with_stats(|s| s.file_requests.get(id).copied().unwrap_or(0))
    }

    pub fn bytes_sent(&self, id: &str) -> u64 {
        self.with_stats(|s| s.bytes_sent.get(id).copied().unwrap_or(0))
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

struct Request {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> std::io::Result<Request> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let mut body = Vec::new();
    if let Some(len) = headers
        .get("content-length")
        .and_then(|l| l.parse::<usize>().ok())
    {
        body = vec![0; len];
        reader.read_exact(&mut body)?;
    }
    Ok(Request {
        method,
        path,
        headers,
        body,
    })
}

fn respond(
    conn: &mut TcpStream,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} X\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)
}

fn serve(conn: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut conn = conn;
    let req = read_request(&mut reader)?;
    state
        .lock()
        .unwrap()
        .stats
        .requests
        .push((req.path.clone(), req.headers.clone()));
    if req.method == "POST" && req.path == "/v3/auth/tokens" {
        let mut s = state.lock().unwrap();
        s.stats.tokens_issued += 1;
        let body = String::from_utf8_lossy(&req.body).into_owned();
        s.stats.keystone_requests.push(body);
        let token = format!("tok-{}", s.stats.tokens_issued);
        s.issued_tokens.push(token.clone());
        let expires = chrono::Utc::now() + chrono::Duration::seconds(s.token_ttl_secs);
        let mut body = serde_json::json!({"token": {"expires_at": expires.to_rfc3339()}})
            .to_string()
            .into_bytes();
        body.splice(1..1, std::iter::repeat_n(b' ', s.keystone_padding));
        drop(s);
        return respond(
            &mut conn,
            201,
            &[
                ("X-Subject-Token".into(), token),
                ("Content-Type".into(), "application/json".into()),
            ],
            &body,
        );
    }
    let route = req.path.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = route.trim_start_matches('/').split('/').collect();
    let (id, kind) = match segments.as_slice() {
        ["v2", "images", id] => (id.to_string(), "meta"),
        ["v2", "images", id, "file"] => (id.to_string(), "file"),
        ["plain", id] => (id.to_string(), "plain"),
        _ => return respond(&mut conn, 404, &[], b"no route"),
    };
    // Authentication for Glance endpoints.
    if kind != "plain" {
        let s = state.lock().unwrap();
        let given = req.headers.get("x-auth-token");
        let ok = match (&s.static_token, s.keystone) {
            (Some(t), _) => given == Some(t),
            (None, true) => given.is_some_and(|g| s.issued_tokens.last() == Some(g)),
            (None, false) => true,
        };
        drop(s);
        if !ok {
            return respond(&mut conn, 401, &[], b"unauthorized");
        }
    }
    let Some(image) = state.lock().unwrap().images.get(&id).cloned() else {
        return respond(&mut conn, 404, &[], b"no such image");
    };
    let b = &image.behaviour;
    let md5 = if b.wrong_md5 {
        "0".repeat(32)
    } else {
        b.md5_text.clone().unwrap_or_else(|| md5_hex(&image.data))
    };
    let sha512 = b
        .sha512_text
        .clone()
        .unwrap_or_else(|| sha512_hex(&image.data));
    if kind == "meta" {
        let body = serde_json::json!({
            "id": id,
            "status": b.status.clone().unwrap_or_else(|| "active".into()),
            "size": if b.no_size { None } else { Some(b.meta_size.unwrap_or(image.data.len() as u64)) },
            "checksum": md5,
            "os_hash_algo": "sha512",
            "os_hash_value": sha512,
        });
        let mut body = body.to_string().into_bytes();
        body.splice(1..1, std::iter::repeat_n(b' ', b.meta_padding));
        return respond(
            &mut conn,
            200,
            &[("Content-Type".into(), "application/json".into())],
            &body,
        );
    }
    // A file request: count it, then maybe misbehave.
    let attempt = {
        let mut s = state.lock().unwrap();
        let n = s.stats.file_requests.entry(id.clone()).or_default();
        *n += 1;
        *n
    };
    if attempt <= b.fail_times {
        return respond(&mut conn, b.fail_status, &[], b"failing on purpose");
    }
    if let Some(to) = &b.redirect_to {
        let head = format!(
            "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return conn.write_all(head.as_bytes());
    }
    {
        let mut s = state.lock().unwrap();
        s.stats.in_flight += 1;
        s.stats.max_in_flight = s.stats.max_in_flight.max(s.stats.in_flight);
    }
    // Glance's answer to a download probe (`Range: bytes=0-0`, how glance-cached asks
    // whether a token may download): the first byte.
    if req.headers.get("range").map(String::as_str) == Some("bytes=0-0") && !image.data.is_empty() {
        state.lock().unwrap().stats.in_flight -= 1;
        let head = format!(
            "HTTP/1.1 206 Partial Content\r\nConnection: close\r\nContent-Range: bytes 0-0/{}\r\nContent-Length: 1\r\n\r\n",
            image.data.len()
        );
        conn.write_all(head.as_bytes())?;
        return conn.write_all(&image.data[..1]);
    }
    if let Some((first, last)) = b.partial {
        let body = &image.data[first..=last.min(image.data.len() - 1)];
        let range = format!("bytes {first}-{last}/{}", image.data.len());
        state.lock().unwrap().stats.in_flight -= 1;
        let head = format!(
            "HTTP/1.1 206 Partial Content\r\nConnection: close\r\nContent-Range: {range}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes())?;
        return conn.write_all(body);
    }
    let result = (|| {
        let mut head = "HTTP/1.1 200 OK\r\nConnection: close\r\n".to_owned();
        if !b.no_size {
            head.push_str(&format!("Content-Length: {}\r\n", image.data.len()));
        }
        if kind == "plain" && !b.no_checksum_headers {
            head.push_str(&format!(
                "X-Checksum-Md5: {md5}\r\nX-Checksum-Sha512: {sha512}\r\n"
            ));
        }
        head.push_str("\r\n");
        conn.write_all(head.as_bytes())?;
        let end = b
            .truncate_at
            .unwrap_or(image.data.len())
            .min(image.data.len());
        for chunk in image.data[..end].chunks(b.chunk_bytes.unwrap_or(64 * 1024)) {
            // Pause before a chunk, not after: the transfer ends with the last byte, so
            // `in_flight` is not still counting a download the client has finished.
            if let Some(d) = b.chunk_delay {
                std::thread::sleep(d);
            }
            conn.write_all(chunk)?;
            *state
                .lock()
                .unwrap()
                .stats
                .bytes_sent
                .entry(id.clone())
                .or_default() += chunk.len() as u64;
        }
        conn.flush()
    })();
    state.lock().unwrap().stats.in_flight -= 1;
    result
}
