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

// ----- item 5: pages, slow readers, lists off the executor -----

/// Seeds `n` jobs of `tenant` (list format, oldest first); returns their ids in order.
fn seed_many(lab: &Lab, n: usize, tenant: &str) -> Vec<String> {
    let ids: Vec<String> = (0..n)
        .map(|i| format!("00000000-0000-4000-8000-{i:012x}"))
        .collect();
    let jobs: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| {
            serde_json::json!({
                "copy_progress": 40,
                "destination_image_id": null,
                "destination_region_id": "ot2",
                "destination_tenant_id": TENANT_B,
                "job_id": id,
                "source_image_id": "9b805919-8acb-4880-8904-cd2f9a32c1ad",
                "source_image_name": "Test-image-Ubuntu",
                "source_region_id": "ot1",
                "source_tenant_id": tenant,
                "status": "replicating",
            })
        })
        .collect();
    lab.seed_jobs(&jobs);
    ids
}

#[test]
fn the_job_list_is_paged_at_1000_by_default_and_at_most() {
    let lab = Lab::new();
    lab.standard();
    let ids = seed_many(&lab, 1205, TENANT_A);
    let token = lab.token("alice", TENANT_A);
    let server = lab.serve();

    let first = server.get(JOBS, Some(&token));
    assert_eq!(first.status(), 200);
    let bytes = first.bytes().expect("body").len();
    let first: Vec<serde_json::Value> =
        serde_json::from_slice(&server.get(JOBS, Some(&token)).bytes().expect("body"))
            .expect("JSON");
    assert_eq!(first.len(), 1000, "a page of 1,000 without a limit");
    assert!(
        job_ids(&first) == ids[..1000],
        "the first 1,000, oldest first"
    );
    figures(
        "default page",
        &[("jobs", "1000".into()), ("bytes", bytes.to_string())],
    );

    let asked_more = jobs(server.get(&format!("{JOBS}?limit=5000"), Some(&token)));
    assert_eq!(asked_more.len(), 1000, "a larger limit is lowered to 1,000");
    let rest = jobs(server.get(&format!("{JOBS}?marker={}", ids[999]), Some(&token)));
    assert_eq!(rest.len(), 205);
    assert!(job_ids(&rest) == ids[1000..], "the page after the marker");
    let ten = jobs(server.get(&format!("{JOBS}?limit=10&marker={}", ids[4]), Some(&token)));
    assert_eq!(job_ids(&ten), ids[5..15]);
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A connection that sends `requests` requests for `path` at once and never reads, with a
/// small receive buffer.
fn never_reading(addr: &str, path: &str, token: &str, requests: usize) -> TcpStream {
    use std::os::fd::AsRawFd;
    let mut stream = TcpStream::connect(addr).expect("connect");
    let size: libc::c_int = 4096;
    // SAFETY: a valid socket and a c_int of the given length.
    let set = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0, "SO_RCVBUF");
    let one = format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {token}\r\n\r\n");
    stream
        .write_all(one.repeat(requests).as_bytes())
        .expect("send the requests");
    stream
}

#[test]
fn clients_that_never_read_their_list_are_dropped_after_the_write_timeout() {
    let clients = env_count("SLOW_READERS", 150);
    let lab = Lab::new();
    lab.standard();
    // 30 jobs are an 11 KB list, kept encoded between changes: cheap to serve, so that 600
    // of them pipelined (7 MB) fill the socket buffers (a few MB on loopback) quickly.
    seed_many(&lab, 30, TENANT_A);
    let token = lab.token("alice", TENANT_A);
    let server = lab.serve();
    let pid = server.child.id();
    let (fds_before, rss_before) = (open_fds(pid), rss_kib(pid));
    let started = Instant::now();
    let held: Vec<TcpStream> = (0..clients)
        .map(|_| never_reading(&server.addr(), JOBS, &token, 600))
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let (fds_held, rss_held) = (open_fds(pid), rss_kib(pid));
    assert!(
        fds_held >= fds_before + clients / 2,
        "the connections are open: {fds_before} -> {fds_held} descriptors"
    );
    // Others are served meanwhile.
    assert_eq!(server.get("/healthz", None).status(), 200);
    let dropped_after = poll(
        "the server closes the stalled connections",
        Duration::from_secs(60),
        || (open_fds(pid) <= fds_before + 2).then(|| started.elapsed()),
    );
    let rss_after = rss_kib(pid);
    figures(
        "never-reading clients",
        &[
            ("clients", clients.to_string()),
            ("fds", format!("{fds_before}/{fds_held}/{}", open_fds(pid))),
            ("rss_kib", format!("{rss_before}/{rss_held}/{rss_after}")),
            (
                "dropped_after_s",
                format!("{:.1}", dropped_after.as_secs_f64()),
            ),
        ],
    );
    assert!(
        dropped_after < Duration::from_secs(40),
        "dropped only after {dropped_after:?}"
    );
    drop(held);
    assert_eq!(server.get(JOBS, Some(&token)).status(), 200);
}

#[test]
fn polling_a_large_job_list_leaves_healthz_fast() {
    let lab = Lab::new();
    lab.standard();
    seed_many(&lab, 5000, TENANT_A);
    let token = lab.token("alice", TENANT_A);
    let server = lab.serve();
    let median_healthz = |samples: usize| {
        let mut times: Vec<Duration> = (0..samples)
            .map(|_| {
                let started = Instant::now();
                assert_eq!(server.get("/healthz", None).status(), 200);
                let took = started.elapsed();
                std::thread::sleep(Duration::from_millis(20));
                took
            })
            .collect();
        times.sort();
        times[times.len() / 2]
    };
    let idle = median_healthz(21);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (loaded, polls) = std::thread::scope(|scope| {
        let pollers: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let client = reqwest::blocking::Client::new();
                    let mut polls = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let resp = client
                            .get(server.url(JOBS))
                            .header("X-Auth-Token", &token)
                            .send()
                            .expect("list");
                        assert_eq!(resp.status(), 200);
                        resp.bytes().expect("body");
                        polls += 1;
                    }
                    polls
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let loaded = median_healthz(41);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let polls: u64 = pollers.into_iter().map(|p| p.join().expect("poller")).sum();
        (loaded, polls)
    });
    figures(
        "healthz under list polling",
        &[
            ("jobs", "5000".into()),
            ("pollers", "4".into()),
            ("lists_served", polls.to_string()),
            (
                "healthz_idle_ms",
                format!("{:.1}", idle.as_secs_f64() * 1e3),
            ),
            (
                "healthz_loaded_ms",
                format!("{:.1}", loaded.as_secs_f64() * 1e3),
            ),
        ],
    );
    assert!(
        loaded < Duration::from_millis(100),
        "/healthz took {loaded:?} (median) while four clients polled the list"
    );
}
