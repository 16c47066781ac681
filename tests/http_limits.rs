//! The listener's limits: header section size, transfer codings, slow readers, list pages.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// What came back on a raw connection: the bytes, and whether the server closed it.
struct Answer {
    raw: Vec<u8>,
    closed: bool,
}

impl Answer {
    fn head(&self) -> String {
        let end = find(&self.raw, b"\r\n\r\n").unwrap_or(self.raw.len());
        String::from_utf8_lossy(&self.raw[..end]).to_string()
    }

    fn status(&self) -> u16 {
        self.head()
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head().split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    fn body(&self) -> String {
        let start = find(&self.raw, b"\r\n\r\n").map_or(self.raw.len(), |i| i + 4);
        String::from_utf8_lossy(&self.raw[start..]).to_string()
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads until the server closes or `wait` passes without a byte.
fn read_until_close(stream: &mut TcpStream, wait: Duration) -> Answer {
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    stream.set_read_timeout(Some(wait)).expect("read timeout");
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Answer { raw, closed: true },
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Answer { raw, closed: false }
            }
            // A reset after the answer: Linux hands out what arrived first.
            Err(_) => return Answer { raw, closed: true },
        }
    }
}

/// Sends `raw` on a new connection (write errors ignored: the server may close first).
fn connect_and_send(addr: &str, raw: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .expect("write timeout");
    let _ = stream.write_all(raw);
    stream
}

fn get_with_filler(token: &str, filler: usize) -> Vec<u8> {
    format!(
        "GET {JOBS} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {token}\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(filler)
    )
    .into_bytes()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

// ----- item 13: the header section is capped at 16 KiB -----

#[test]
fn a_header_section_over_16_kib_gets_a_plain_text_431_and_the_connection_closes() {
    let lab = Lab::new();
    lab.standard();
    let token = lab.token("alice", TENANT_A);
    let server = lab.serve();

    let mut small = connect_and_send(&server.addr(), &get_with_filler(&token, 15_000));
    let answer = read_until_close(&mut small, Duration::from_secs(2));
    assert_eq!(answer.status(), 200, "{}", answer.head());

    let mut big = connect_and_send(&server.addr(), &get_with_filler(&token, 17_000));
    let answer = read_until_close(&mut big, Duration::from_secs(5));
    assert_eq!(answer.status(), 431, "{}", answer.head());
    assert_eq!(
        answer.body(),
        "431 Request Header Fields Too Large\n\n\
         The request line and headers are larger than 16384 bytes.\n\n"
    );
    assert_eq!(
        answer.header("content-type").as_deref(),
        Some("text/plain; charset=UTF-8")
    );
    assert_eq!(answer.header("connection").as_deref(), Some("close"));
    assert!(answer.header("x-openstack-request-id").is_some());
    assert!(answer.closed, "the connection is closed after the 431");
    assert_eq!(server.get("/healthz", None).status(), 200);
}

#[test]
fn five_hundred_half_sent_400_kb_headers_are_cut_off_without_holding_memory() {
    let lab = Lab::new();
    lab.standard();
    let server = lab.serve();
    let pid = server.child.id();
    let before = rss_kib(pid);
    // A header line of 400 KB that never ends (hyper's own cap is about 408 KB).
    let half = format!(
        "GET {JOBS} HTTP/1.1\r\nHost: x\r\nX-Filler: {}",
        "a".repeat(400 * 1024)
    )
    .into_bytes();
    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..500 {
        held.push(connect_and_send(&server.addr(), &half));
    }
    let peak = rss_kib(pid);
    let mut refused = 0;
    for stream in &mut held {
        let answer = read_until_close(stream, Duration::from_secs(5));
        if answer.closed && (answer.raw.is_empty() || answer.status() == 431) {
            refused += 1;
        }
    }
    let took = started.elapsed();
    figures(
        "half-sent headers",
        &[
            ("connections", held.len().to_string()),
            ("refused", refused.to_string()),
            ("rss_before_kib", before.to_string()),
            ("rss_with_all_open_kib", peak.to_string()),
            ("seconds", format!("{:.1}", took.as_secs_f64())),
        ],
    );
    assert_eq!(refused, 500, "every half-sent header is refused and closed");
    assert!(
        peak.saturating_sub(before) < 32 * 1024,
        "500 half-sent headers grew the server from {before} KiB to {peak} KiB"
    );
    assert_eq!(server.get("/healthz", None).status(), 200);
}

// ----- item 14: only exactly `chunked` is a transfer coding -----

fn chunked_post(token: &str, codings: &[&str], body: &str) -> Vec<u8> {
    let mut raw = format!(
        "POST {JOBS} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {token}\r\n\
         Content-Type: application/json\r\n"
    );
    for coding in codings {
        raw.push_str(&format!("Transfer-Encoding: {coding}\r\n"));
    }
    raw.push_str("\r\n");
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(&chunk_encode(body.as_bytes()));
    raw
}

#[test]
fn transfer_codings_other_than_one_chunked_are_refused_and_the_connection_closes() {
    let lab = Lab::new();
    lab.standard();
    let image = lab.image(TENANT_A, "cirros", 1024);
    let token = lab.token("alice", TENANT_A);
    let server = lab.serve();
    let body = serde_json::json!({"image_id": image, "tenant_id_dst": TENANT_A}).to_string();

    let mut ok = connect_and_send(&server.addr(), &chunked_post(&token, &["chunked"], &body));
    let answer = read_until_close(&mut ok, Duration::from_secs(2));
    assert_eq!(answer.status(), 202, "{}", answer.head());

    for (codings, status, sentence) in [
        (
            &["gzip, chunked"][..],
            501,
            "This server implements only the chunked transfer coding, not 'gzip'.",
        ),
        (
            &["identity, chunked"][..],
            501,
            "This server implements only the chunked transfer coding, not 'identity'.",
        ),
        (
            &["gzip", "chunked"][..],
            501,
            "This server implements only the chunked transfer coding, not 'gzip'.",
        ),
        (
            &["chunked, chunked"][..],
            400,
            "The chunked transfer coding may be applied only once.",
        ),
        (
            &["chunked", "chunked"][..],
            400,
            "The chunked transfer coding may be applied only once.",
        ),
    ] {
        let mut stream = connect_and_send(&server.addr(), &chunked_post(&token, codings, &body));
        let answer = read_until_close(&mut stream, Duration::from_secs(5));
        assert_eq!(answer.status(), status, "{codings:?}: {}", answer.head());
        assert_eq!(
            error_sentence(&answer.body(), status),
            sentence,
            "{codings:?}"
        );
        assert_eq!(answer.header("connection").as_deref(), Some("close"));
        assert!(answer.closed, "{codings:?}: the connection is closed");
    }
    // Only the one plain chunked POST made a job.
    assert_eq!(jobs(server.get(JOBS, Some(&token))).len(), 1);
}
