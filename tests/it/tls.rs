//! The Glance upstream over TLS: a loopback HTTPS origin with a certificate from a test
//! CA. With `upstream.ca_file` naming that CA the image is fetched; without it the
//! certificate is refused and nothing is cached.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;

use crate::kit::daemon::{SOON, Setup, eventually};
use crate::kit::{md5_hex, sha512_hex, test_bytes};

/// Serves one image as Glance's `/v2/images/{id}` and `/file` over TLS; returns the port.
fn https_origin(config: Arc<rustls::ServerConfig>, id: &'static str, data: Arc<Vec<u8>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let (config, data) = (config.clone(), data.clone());
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut reader = BufReader::new(&mut tls);
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return; // the client refused our certificate
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                }
                drop(reader);
                let body: Vec<u8> = if path.ends_with("/file") {
                    data.to_vec()
                } else {
                    serde_json::json!({
                        "id": id, "status": "active", "size": data.len(),
                        "checksum": md5_hex(&data),
                        "os_hash_algo": "sha512",
                        "os_hash_value": sha512_hex(&data),
                    })
                    .to_string()
                    .into_bytes()
                };
                let _ = write!(
                    tls,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tls.write_all(&body);
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    port
}

#[test]
fn glance_over_tls_with_a_private_ca() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // A CA, and a server certificate for localhost signed by it.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
    let server_config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![server_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).unwrap(),
        )
        .unwrap();
    let data = Arc::new(test_bytes(300_000, 13));
    let port = https_origin(Arc::new(server_config), "tls-img", data.clone());

    let s = Setup::new("");
    let ca_file = s.tmp.path().join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let upstream = format!(
        "[prefetcher]\nretry_delay = \"100ms\"\nmax_retry_delay = \"200ms\"\n[upstream]\nkind = \"glance\"\nurl = \"https://localhost:{port}\"\n"
    );

    // Without the CA the certificate is unknown: retried, never cached.
    s.write_config(&upstream);
    let d = s.start();
    assert!(s.cli(&["queue", "tls-img"]).status.success());
    eventually(SOON, "the TLS failure is recorded", || {
        let out = s.cli(&["list-queued", "--json"]);
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        rows[0]["attempts"].as_u64().unwrap_or(0) >= 1
    });
    assert!(s.cached_ids().is_empty());
    let out = s.cli(&["list-queued", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let error = rows[0]["last_error"].as_str().unwrap().to_ascii_lowercase();
    assert!(
        error.contains("certificate"),
        "a certificate problem: {error}"
    );
    assert_eq!(
        rows[0]["state"], "queued",
        "retried, not dropped: the operator can add the CA"
    );
    d.stop();

    // With the CA: fetched and verified.
    s.write_config(&format!("{upstream}ca_file = \"{}\"\n", ca_file.display()));
    let d = s.start();
    eventually(SOON, "the image is cached over TLS", || {
        s.cached_ids() == ["tls-img"]
    });
    assert_eq!(std::fs::read(s.cache("tls-img")).unwrap(), *data);
    d.stop();
}
