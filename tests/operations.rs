//! Running it like an appliance: systemd notify protocol, TLS, health, metrics, logs,
//! completions and the man page.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn systemd_hears_ready_then_watchdog_beats_then_stopping() {
    let lab = Lab::new();
    lab.standard();
    let socket_path = lab.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let path = socket_path.to_str().expect("path");
    let mut server = lab.serve_env(&[], &[("NOTIFY_SOCKET", path), ("WATCHDOG_USEC", "200000")]);
    let receive = || {
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).trim().to_string()
    };
    assert_eq!(receive(), "READY=1");
    // The server answers once it said it is ready.
    assert_eq!(server.get("/healthz", None).status(), 200);
    for _ in 0..3 {
        assert_eq!(receive(), "WATCHDOG=1");
    }
    let asked = Instant::now();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let mut stopping = false;
    while !stopping {
        stopping = receive() == "STOPPING=1";
    }
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "no exit within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
}

/// A self-signed certificate for 127.0.0.1 and localhost, written as PEM files.
fn certificate(lab: &Lab) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let generated =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("certificate");
    let cert = lab.dir.path().join("cert.pem");
    let key = lab.dir.path().join("key.pem");
    let pem = generated.cert.pem();
    std::fs::write(&cert, &pem).expect("write cert");
    std::fs::write(&key, generated.signing_key.serialize_pem()).expect("write key");
    (pem, cert, key)
}

#[test]
fn https_serves_all_four_routes_and_plain_http_to_it_fails_cleanly() {
    let (lab, token) = Lab::standard_with_copier();
    let image = lab.image(TENANT_A, "disk", 1 << 20);
    let (pem, cert, key) = certificate(&lab);
    let mut server = lab.serve_with(&[
        "--no-worker",
        "--tls-cert",
        cert.to_str().expect("path"),
        "--tls-key",
        key.to_str().expect("path"),
    ]);
    assert!(server.base.starts_with("https://"), "{}", server.base);
    server.client = reqwest::blocking::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).expect("pem"))
        .build()
        .expect("TLS client");

    let id = server.copy_ok(&token, &image, TENANT_B);
    let listed = jobs(server.get(JOBS, Some(&token)));
    assert_eq!(listed.len(), 1);
    assert_eq!(server.job(&token, &id)["job_id"], id.as_str());
    assert_eq!(server.delete(&job_path(&id), Some(&token)).status(), 204);
    assert_401(server.get(JOBS, None));

    // Plain HTTP to the TLS port: a plain-text 400 saying to use https, and the server goes
    // on serving.
    let plain = server.base.replace("https://", "http://");
    let answer = reqwest::blocking::Client::new()
        .get(format!("{plain}/healthz"))
        .timeout(Duration::from_secs(10))
        .send()
        .expect("an answer");
    assert!(assert_error(answer, 400).contains("use https://"));
    assert_eq!(server.get("/healthz", None).status(), 200);

    // A client that does not trust the certificate is refused.
    let untrusting = reqwest::blocking::Client::builder()
        .tls_built_in_root_certs(false)
        .build()
        .expect("client");
    assert!(untrusting.get(server.url("/healthz")).send().is_err());
}

#[test]
fn tls_flags_need_each_other_and_readable_pem() {
    let lab = Lab::new();
    lab.standard();
    let err = lab.fails(&["serve", "--tls-cert", "/nonexistent/cert.pem"]);
    assert!(err.contains("--tls-key"), "{err}");
    let err = lab.fails(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        "/nonexistent/key.pem",
    ]);
    assert!(err.contains("cannot read the certificate"), "{err}");
}

#[test]
fn healthz_goes_503_when_a_region_directory_disappears_and_200_when_back() {
    let lab = Lab::new();
    lab.standard();
    let server = lab.serve();
    let resp = server.get("/healthz", None);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().expect("body"), "ok\n");

    let ot2 = lab.data_dir().join("regions").join("ot2");
    let away = lab.dir.path().join("ot2-away");
    std::fs::rename(&ot2, &away).expect("move ot2 away");
    let sentence = assert_error(server.get("/healthz", None), 503);
    assert!(sentence.contains("region ot2"), "{sentence}");
    assert!(!sentence.contains("ot1"), "{sentence}");

    std::fs::rename(&away, &ot2).expect("bring ot2 back");
    assert_eq!(server.get("/healthz", None).status(), 200);
}

/// Parses Prometheus text: every line a comment or `name{labels} value`.
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|line| {
            let (name, value) = line.rsplit_once(' ').expect("name and value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line}"));
            let bare = name.split('{').next().expect("name");
            assert!(
                bare.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad metric name in {line}"
            );
            if let Some(labels) = name.strip_prefix(bare) {
                assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')));
            }
            (name.to_string(), value)
        })
        .collect()
}

fn sample(all: &[(String, f64)], name: &str) -> f64 {
    all.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no sample {name}"))
}

#[test]
fn metrics_parse_and_move_with_traffic_and_copies() {
    let (lab, token) = Lab::standard_with_copier();
    let image = lab.image(TENANT_A, "disk", 3 << 20);
    let server = lab.serve_with(&[]);

    let scrape = || {
        let resp = server.get("/metrics", None);
        assert_eq!(resp.status(), 200);
        samples(&resp.text().expect("metrics"))
    };
    let before = scrape();
    assert_eq!(sample(&before, "image_replicator_copied_bytes_total"), 0.0);
    assert_eq!(
        sample(&before, "image_replicator_argon2_verifications_total"),
        0.0
    );

    let id = server.copy_ok(&token, &image, TENANT_B);
    for _ in 0..5 {
        assert_eq!(server.get(JOBS, Some(&token)).status(), 200);
    }
    assert_401(server.get(JOBS, Some("garbage-garbage")));
    server.wait_job(
        &token,
        &id,
        Duration::from_secs(30),
        status_is("replicated"),
    );

    let after = scrape();
    let jobs_route = "route=\"/v2/extension/image_replicator/jobs\"";
    assert_eq!(
        sample(&after, &format!("image_replicator_http_requests_total{{{jobs_route},method=\"GET\",status=\"200\"}}")),
        5.0
    );
    assert_eq!(
        sample(&after, &format!("image_replicator_http_requests_total{{{jobs_route},method=\"POST\",status=\"202\"}}")),
        1.0
    );
    assert_eq!(
        sample(&after, &format!("image_replicator_http_requests_total{{{jobs_route},method=\"GET\",status=\"401\"}}")),
        1.0
    );
    assert_eq!(
        sample(&after, "image_replicator_copied_bytes_total"),
        (3 << 20) as f64
    );
    assert_eq!(
        sample(&after, "image_replicator_jobs{status=\"replicated\"}"),
        1.0
    );
    assert_eq!(
        sample(&after, "image_replicator_argon2_verifications_total"),
        1.0
    );
    assert!(sample(&after, "image_replicator_token_cache_hits_total") >= 5.0);
    assert!(
        sample(
            &after,
            "image_replicator_http_request_duration_seconds_count"
        ) > sample(
            &before,
            "image_replicator_http_request_duration_seconds_count"
        )
    );
    // No tenant data in the metrics.
    let text = server.get("/metrics", None).text().expect("metrics");
    assert!(!text.contains(TENANT_A) && !text.contains(&id) && !text.contains(&token));
}

#[test]
fn json_logs_have_one_line_per_request_with_its_request_id_and_no_token() {
    let lab = Lab::new();
    lab.standard();
    let token = lab.token("alice", TENANT_A);
    let server = lab.serve_with(&["--no-worker", "--log-format", "json"]);
    let resp = server.get(JOBS, Some(&token));
    let request_id = resp.headers()["x-openstack-request-id"]
        .to_str()
        .expect("id")
        .to_string();
    assert_eq!(resp.status(), 200);
    let log = server.log_text();
    let line: serde_json::Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["fields"]["request_id"] == request_id.as_str())
        .unwrap_or_else(|| panic!("no JSON log line for {request_id} in {log}"));
    assert_eq!(line["fields"]["route"], JOBS);
    assert_eq!(line["fields"]["method"], "GET");
    assert_eq!(line["fields"]["status"], 200);
    assert!(line["fields"]["latency_us"].is_u64());
    assert!(!log.contains(&token));
}

#[test]
fn completions_and_man_page_are_generated() {
    let lab = Lab::new();
    for shell in ["bash", "zsh", "fish"] {
        let script = lab.ok(&["completions", shell]);
        assert!(
            script.contains("image-replicator") && script.contains("serve"),
            "{shell}"
        );
    }
    let man = lab.ok(&["man"]);
    assert!(man.contains(".TH image-replicator 1"), "{man}");
    assert!(man.contains("serve"));
    let err = lab.fails(&["completions", "tcsh"]);
    assert!(
        err.starts_with("image-replicator: ") && err.contains("tcsh"),
        "{err}"
    );
}
