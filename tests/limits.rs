//! Connection and resource limits: whatever clients hold open, send slowly, send too much of
//! or flood the server with, others are still served at once and the server's memory stays
//! put.
//!
//! - connections: a thousand idle ones do not stop service to others and are closed once the
//!   10 s header timeout passes; a client dribbling its headers, or its body, one byte per
//!   second is cut off; clients that never read their answers are dropped after the write
//!   timeout;
//! - sizes: a header section over 16 KiB is a 431, and 500 half-sent 400 KB headers hold no
//!   memory; a body over the limit is refused before it is read whole; only exactly one
//!   `chunked` is a transfer coding;
//! - floods: garbage tokens cost no argon2 and no memory, made-up methods no memory and no
//!   metrics labels; job lists are paged at 1,000 and polling a large one leaves `/healthz`
//!   fast.
//!
//! `FLOOD_REQUESTS` sets the garbage-token requests measured (default 20000; the soak,
//! `scripts/soak.sh`, runs 100000), `SLOW_READERS` the clients that never read (default 150).
//! Each test prints a `figures:` line, shown with `--nocapture`.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

fn get_with_filler(token: &str, filler: usize) -> Vec<u8> {
    format!(
        "GET {JOBS} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {token}\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(filler)
    )
    .into_bytes()
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A normal client's request, timed: the list with a valid token.
fn timed_list(server: &Server, token: &str) -> (u16, Duration) {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let started = Instant::now();
    let status = client
        .get(server.url(JOBS))
        .header("X-Auth-Token", token)
        .send()
        .map_or(0, |r| r.status().as_u16());
    (status, started.elapsed())
}

// ----- item 13: the header section is capped at 16 KiB -----

#[test]
fn a_header_section_over_16_kib_gets_a_plain_text_431_and_the_connection_closes() {
    let lab = Lab::new();
    lab.standard();
    let token = lab.token("alice", TENANT_A);
    let server = lab.serve();

    let mut small = raw::send(&server.addr(), &get_with_filler(&token, 15_000));
    let answer = raw::read_answer(&mut small, Duration::from_secs(2));
    assert_eq!(answer.status(), Some(200), "{answer:?}");

    let mut big = raw::send(&server.addr(), &get_with_filler(&token, 17_000));
    let answer = raw::read_answer(&mut big, Duration::from_secs(5));
    assert_eq!(answer.status(), Some(431), "{answer:?}");
    assert_eq!(
        answer.text(),
        "431 Request Header Fields Too Large\n\n\
         The request line and headers are larger than 16384 bytes.\n\n"
    );
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; charset=UTF-8")
    );
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(answer.header("x-openstack-request-id").is_some());
    assert!(
        raw::closes(&mut big, Duration::from_secs(5)),
        "the connection is closed after the 431"
    );
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
        held.push(raw::send(&server.addr(), &half));
    }
    let peak = rss_kib(pid);
    let mut refused = 0;
    for stream in &mut held {
        // Closed without an answer, or after a 431.
        let answer = raw::read_answer(stream, Duration::from_secs(5));
        let closed = match answer {
            raw::Outcome::Closed => true,
            _ => answer.status() == Some(431) && raw::closes(stream, Duration::from_secs(5)),
        };
        if closed {
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

    let mut ok = raw::send(&server.addr(), &chunked_post(&token, &["chunked"], &body));
    let answer = raw::read_answer(&mut ok, Duration::from_secs(2));
    assert_eq!(answer.status(), Some(202), "{answer:?}");

    for (codings, status, sentence) in [
        (
            &["gzip, chunked"][..],
            400,
            "This server implements only the chunked transfer coding, not 'gzip'.",
        ),
        (
            &["identity, chunked"][..],
            400,
            "This server implements only the chunked transfer coding, not 'identity'.",
        ),
        (
            &["gzip", "chunked"][..],
            400,
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
        let mut stream = raw::send(&server.addr(), &chunked_post(&token, codings, &body));
        let answer = raw::read_answer(&mut stream, Duration::from_secs(5));
        assert_eq!(answer.status(), Some(status), "{codings:?}: {answer:?}");
        assert_eq!(
            error_sentence(&answer.text(), status),
            sentence,
            "{codings:?}"
        );
        assert_eq!(answer.header("connection"), Some("close"));
        assert!(
            raw::closes(&mut stream, Duration::from_secs(5)),
            "{codings:?}: the connection is closed"
        );
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

// ----- idle, slow and oversized clients, floods -----

/// Opens `n` connections that send nothing (or, every other one, half a request line); each
/// with the moment its connect returned.
fn idle_connections(server: &Server, n: usize) -> Vec<(TcpStream, Instant)> {
    let addr = server.addr();
    (0..n)
        .map(|i| {
            let mut stream = TcpStream::connect(&addr).expect("connect");
            let opened = Instant::now();
            if i % 2 == 1 {
                stream.write_all(b"GET /v2/ext").expect("write");
            }
            (stream, opened)
        })
        .collect()
}

#[test]
fn a_thousand_idle_connections_do_not_stop_service_to_others() {
    let lab = Lab::new();
    lab.standard();
    let token = lab.token("alice", TENANT_A);
    let server = lab.serve();
    let opening = Instant::now();
    let idle = idle_connections(&server, 1000);
    let open_took = opening.elapsed();
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let (status, took) = timed_list(&server, &token);
        assert_eq!(status, 200);
        slowest = slowest.max(took);
    }
    // The idle connections still inside their 10 s header window all along: those the server
    // was holding open while it answered the others.
    let held = idle
        .iter()
        .filter(|(_, opened)| opened.elapsed() < Duration::from_millis(9500))
        .count();
    figures(
        "1000 idle connections",
        &[
            ("open_ms", open_took.as_millis().to_string()),
            ("held_while_serving", held.to_string()),
            ("slowest_other_request_ms", slowest.as_millis().to_string()),
        ],
    );
    assert!(
        held >= 500,
        "opening the idle connections took {open_took:?}: too slow to prove anything"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "a normal request took {slowest:?} with {held} idle connections open"
    );
    drop(idle);
}

/// Waits until the server closes every stream (EOF, reset, or an answer then EOF), for at most
/// `limit` after the last one was opened; returns how long each lived, from its own opening to
/// the first poll that saw it closed (`None`: still open).
fn lifetimes(streams: &mut [(TcpStream, Instant)], limit: Duration) -> Vec<Option<Duration>> {
    let last_opened = streams
        .iter()
        .map(|(_, at)| *at)
        .max()
        .unwrap_or_else(Instant::now);
    let mut lived: Vec<Option<Duration>> = vec![None; streams.len()];
    for (stream, _) in streams.iter() {
        stream.set_nonblocking(true).expect("nonblocking");
    }
    let mut buf = [0u8; 1024];
    while lived.iter().any(Option::is_none) && last_opened.elapsed() < limit {
        for (i, (stream, opened)) in streams.iter_mut().enumerate() {
            if lived[i].is_some() {
                continue;
            }
            let closed = match stream.read(&mut buf) {
                Ok(0) => true,
                Ok(_) => false, // an answer (408, say); EOF follows
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            };
            if closed {
                lived[i] = Some(opened.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    lived
}

#[test]
fn idle_connections_are_closed_once_the_10_second_header_timeout_passes() {
    let lab = Lab::new();
    lab.standard();
    let token = lab.token("alice", TENANT_A);
    let server = lab.serve();
    let mut idle = idle_connections(&server, 1000);
    // Each opening time is taken after its connect: a stream lives at least as long as measured.
    let lived = lifetimes(&mut idle, Duration::from_secs(16));
    let still_open = lived.iter().filter(|l| l.is_none()).count();
    let closed: Vec<Duration> = lived.iter().flatten().copied().collect();
    let shortest = closed.iter().min().copied().unwrap_or_default();
    let longest = closed.iter().max().copied().unwrap_or_default();
    figures(
        "idle connections cut",
        &[
            ("still_open", still_open.to_string()),
            ("shortest_life_ms", shortest.as_millis().to_string()),
            ("longest_life_ms", longest.as_millis().to_string()),
        ],
    );
    assert_eq!(
        still_open, 0,
        "{still_open} idle connections were still open 16 s after the last was opened"
    );
    assert!(
        shortest >= Duration::from_millis(9500),
        "an idle connection was closed after {shortest:?}, before the 10 s the contract gives"
    );
    assert!(
        longest <= Duration::from_secs(13),
        "an idle connection lived {longest:?}"
    );
    assert_eq!(timed_list(&server, &token).0, 200);
}

/// Sends `head` at once, then `dribble` one byte per second, while a normal client lists the
/// jobs every second. Returns when the server cut the dribbling connection (and how: EOF, a
/// reset, or its answer), or `None` if it had not after 20 s; and the slowest normal request.
fn dribble(
    server: &Server,
    token: &str,
    head: &[u8],
    dribble: &[u8],
) -> (Option<(Duration, String)>, Duration) {
    let mut slow = TcpStream::connect(server.addr()).expect("connect");
    let mut reader = slow.try_clone().expect("clone");
    slow.write_all(head).expect("head");
    let started = Instant::now();
    // The reader learns when the server closes the connection (EOF, reset, or an answer).
    let closed = std::thread::spawn(move || {
        reader
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut buf = [0u8; 1024];
        let got = reader.read(&mut buf);
        let took = started.elapsed();
        match got {
            Ok(0) => Some((took, "EOF".to_string())),
            Ok(n) => Some((took, String::from_utf8_lossy(&buf[..n]).into_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => None,
            Err(e) => Some((took, e.to_string())),
        }
    });
    let mut slowest = Duration::ZERO;
    for byte in dribble {
        if closed.is_finished() || started.elapsed() > Duration::from_secs(18) {
            break;
        }
        if slow.write_all(&[*byte]).is_err() {
            break;
        }
        // Meanwhile others are served at once.
        let second = Instant::now() + Duration::from_secs(1);
        let (status, took) = timed_list(server, token);
        assert_eq!(status, 200);
        slowest = slowest.max(took);
        std::thread::sleep(second.saturating_duration_since(Instant::now()));
    }
    (closed.join().expect("reader"), slowest)
}

#[test]
fn a_client_sending_its_headers_one_byte_per_second_does_not_block_others_and_is_cut_off() {
    let lab = Lab::new();
    lab.standard();
    let token = lab.token("alice", TENANT_A);
    let server = lab.serve();
    let request = format!("GET {JOBS} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {token}\r\n\r\n");
    let (outcome, slowest) = dribble(&server, &token, b"", request.as_bytes());
    figures(
        "slow headers",
        &[
            ("cut_after", format!("{outcome:?}").replace(' ', "_")),
            ("slowest_other_request_ms", slowest.as_millis().to_string()),
        ],
    );
    assert!(
        slowest < Duration::from_secs(2),
        "others waited {slowest:?}"
    );
    let (took, how) = outcome.expect("the slow client was never cut off");
    assert!(
        took <= Duration::from_secs(13),
        "cut off only after {took:?} ({how})"
    );
    assert!(
        !how.starts_with("HTTP/1.1 200"),
        "the slow request was served: {how}"
    );
}

/// Not in the header-timeout contract, its neighbour: a client with a valid token whose
/// headers are complete but whose body trickles in one byte per second. Without a limit on the
/// body's time too, each such client holds a connection slot and a request task forever.
#[test]
fn a_client_sending_its_body_one_byte_per_second_is_cut_off_too() {
    let lab = Lab::new();
    lab.standard();
    let token = lab.token("alice", TENANT_A);
    let server = lab.serve();
    let head = format!(
        "POST {JOBS} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 16000\r\n\r\n{{\"image_id\": \""
    );
    let (outcome, slowest) = dribble(&server, &token, head.as_bytes(), &[b'a'; 100]);
    figures(
        "slow body",
        &[
            ("cut_after", format!("{outcome:?}").replace(' ', "_")),
            ("slowest_other_request_ms", slowest.as_millis().to_string()),
        ],
    );
    assert!(
        slowest < Duration::from_secs(2),
        "others waited {slowest:?}"
    );
    let (took, how) = outcome.expect("a body trickling in at 1 byte/s was never cut off (20 s)");
    assert!(
        took <= Duration::from_secs(20),
        "cut off only after {took:?} ({how})"
    );
}

#[test]
fn a_body_over_the_limit_is_refused_before_it_is_read_whole() {
    let lab = Lab::new();
    lab.standard();
    let token = lab.token("alice", TENANT_A);
    let server = lab.serve();
    let head = |framing: &str| {
        format!(
            "POST {JOBS} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {token}\r\n\
             Content-Type: application/json\r\n{framing}\r\n"
        )
    };
    let mut results = Vec::new();
    for chunked in [false, true] {
        let mut stream = TcpStream::connect(server.addr()).expect("connect");
        let framing = if chunked {
            "Transfer-Encoding: chunked\r\n".to_string()
        } else {
            format!("Content-Length: {}\r\n", 1u64 << 30)
        };
        stream.write_all(head(&framing).as_bytes()).expect("head");
        // A client streaming a gigabyte at 80 KiB/s: the answer must come long before.
        let mut writer = stream.try_clone().expect("clone");
        let writing = std::thread::spawn(move || {
            let chunk = vec![b' '; 4 * KIB];
            let mut sent = 0usize;
            let until = Instant::now() + Duration::from_secs(10);
            while Instant::now() < until {
                let piece = if chunked {
                    let mut p = format!("{:x}\r\n", chunk.len()).into_bytes();
                    p.extend_from_slice(&chunk);
                    p.extend_from_slice(b"\r\n");
                    p
                } else {
                    chunk.clone()
                };
                if writer.write_all(&piece).is_err() {
                    break;
                }
                sent += chunk.len();
                std::thread::sleep(Duration::from_millis(50));
            }
            sent
        });
        let started = Instant::now();
        let answer = raw::read_answer(&mut stream, Duration::from_secs(10));
        let took = started.elapsed();
        // After the answer the server closes: the rest of the body is never read.
        let closed = raw::closes(&mut stream, Duration::from_secs(5));
        let sent = writing.join().expect("writer");
        let status = answer
            .status()
            .unwrap_or_else(|| panic!("no answer to an oversized body: {answer:?}"));
        results.push((chunked, status, took, sent));
        assert_eq!(status, 413, "{answer:?}");
        assert!(
            answer
                .header("connection")
                .is_some_and(|v| v.to_ascii_lowercase().starts_with("close")),
            "{answer:?}"
        );
        assert!(took < Duration::from_secs(3), "the 413 took {took:?}");
        assert!(closed, "the connection stayed open after the 413");
        assert!(
            sent < 4 * MIB,
            "the client could push {sent} bytes: the server kept reading"
        );
    }
    figures(
        "oversized bodies",
        &[(
            "results(chunked,status,took,bytes_sent)",
            format!("{results:?}").replace(' ', ""),
        )],
    );
    assert_eq!(timed_list(&server, &token).0, 200);
}

/// Sends `count` requests carrying made-up tokens from 4 keep-alive clients; returns how many
/// were not the exact 401.
fn garbage_token_flood(server: &Server, count: usize, salt: u64) -> usize {
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let url = server.url(JOBS);
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::new();
                let mut rng = Rng(salt * 1000 + w);
                let mut odd = 0;
                for _ in 0..count / 4 {
                    let len = 8 + rng.below(249) as usize;
                    let token: String = (0..len)
                        .map(|_| (b'!' + rng.below(94) as u8) as char)
                        .collect();
                    let resp = client
                        .get(&url)
                        .header("X-Auth-Token", token)
                        .send()
                        .expect("GET");
                    odd += usize::from(resp.status() != 401);
                    let _ = resp.bytes();
                }
                odd
            })
        })
        .collect();
    workers.into_iter().map(|w| w.join().expect("flood")).sum()
}

#[test]
fn a_flood_of_garbage_tokens_does_not_raise_memory() {
    let flood = env_count("FLOOD_REQUESTS", 20_000);
    let lab = Lab::new();
    lab.standard();
    let token = lab.token("alice", TENANT_A);
    let server = lab.serve();
    let pid = server.child.id();
    assert_eq!(server.get(JOBS, Some(&token)).status(), 200);
    // Warm-up: the allocator's arenas, the connection pool and the store's cache settle.
    assert_eq!(garbage_token_flood(&server, 4000, 1), 0);
    let before = rss_kib(pid);
    let started = Instant::now();
    assert_eq!(garbage_token_flood(&server, flood, 2), 0);
    let took = started.elapsed();
    let after = rss_kib(pid);
    let stats = auth_stats(&lab);
    figures(
        "garbage token flood",
        &[
            ("requests", flood.to_string()),
            ("seconds", format!("{:.1}", took.as_secs_f64())),
            ("rss_before_kib", before.to_string()),
            ("rss_after_kib", after.to_string()),
            (
                "argon2_verifications",
                stats["argon2_verifications"].to_string(),
            ),
        ],
    );
    assert_eq!(stats["argon2_verifications"], 1, "garbage cost argon2 work");
    assert_eq!(stats["cached_tokens"], 1);
    // 20,000 tokens of 132 bytes on average: keeping even their digests would show.
    assert!(
        after <= before + 1024,
        "RSS grew from {before} KiB to {after} KiB over {flood} garbage tokens"
    );
    let (status, latency) = timed_list(&server, &token);
    assert_eq!(status, 200);
    assert!(latency < Duration::from_secs(1));
}

/// Sends requests with `count` distinct made-up methods of 1 KiB each on keep-alive raw
/// connections; returns the statuses seen (counted).
fn made_up_method_flood(server: &Server, count: usize, salt: usize) -> BTreeMap<u16, usize> {
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let addr = server.addr();
            std::thread::spawn(move || {
                let mut seen: BTreeMap<u16, usize> = BTreeMap::new();
                let mut stream = TcpStream::connect(&addr).expect("connect");
                for i in 0..count / 4 {
                    let method = format!("M{salt}X{w}X{i}X{}", "Q".repeat(KIB));
                    let request = format!("{method} {JOBS} HTTP/1.1\r\nHost: x\r\n\r\n");
                    if stream.write_all(request.as_bytes()).is_err() {
                        stream = TcpStream::connect(&addr).expect("reconnect");
                        stream.write_all(request.as_bytes()).expect("write");
                    }
                    let status = raw::read_answer(&mut stream, Duration::from_secs(10))
                        .status()
                        .unwrap_or(0);
                    *seen.entry(status).or_default() += 1;
                    if status == 0 {
                        stream = TcpStream::connect(&addr).expect("reconnect");
                    }
                }
                seen
            })
        })
        .collect();
    let mut all = BTreeMap::new();
    for worker in workers {
        for (status, n) in worker.join().expect("flood") {
            *all.entry(status).or_default() += n;
        }
    }
    all
}

#[test]
fn a_flood_of_made_up_methods_does_not_raise_memory() {
    let lab = Lab::new();
    lab.standard();
    let token = lab.token("alice", TENANT_A);
    let server = lab.serve();
    let pid = server.child.id();
    made_up_method_flood(&server, 400, 1);
    let before = rss_kib(pid);
    let seen = made_up_method_flood(&server, 8000, 2);
    let after = rss_kib(pid);
    let metrics = server.get("/metrics", None).bytes().map_or(0, |b| b.len());
    figures(
        "made-up method flood",
        &[
            ("requests", "8000".into()),
            ("statuses", format!("{seen:?}").replace(' ', "")),
            ("rss_before_kib", before.to_string()),
            ("rss_after_kib", after.to_string()),
            ("metrics_bytes", metrics.to_string()),
        ],
    );
    assert!(
        seen.keys().all(|s| (400..500).contains(s)),
        "made-up methods got {seen:?}"
    );
    // 8,000 methods of 1 KiB: remembering each would take 8 MiB.
    assert!(
        after <= before + 2048,
        "RSS grew from {before} KiB to {after} KiB over 8000 made-up methods"
    );
    assert!(
        metrics < 256 * KIB,
        "GET /metrics grew to {metrics} bytes: made-up methods are labels"
    );
    assert_eq!(timed_list(&server, &token).0, 200);
}
