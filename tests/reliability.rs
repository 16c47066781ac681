//! Reliability (issue 6): nothing acknowledged is lost and no one gets in, tried hard.
//!
//! - crash durability: 16 clients POST while the server is SIGKILLed and restarted, cycle after
//!   cycle; every 202 survives, the store always opens, no job stays unfinished;
//! - crash mid-copy: SIGKILL at chosen stages of a copy (right after the 202, as the temporary
//!   file appears, mid-copy, right after the final rename, mid-cancel, at random); every job
//!   ends consistent with the destination, which holds no orphan and no wrong active image;
//! - tokens: expiry, revoke and removals take effect on the very next request even when the
//!   token is cached; no plaintext token in the data directory or the logs; the admin socket
//!   refuses another uid;
//! - resource abuse: idle connections, a client dribbling its headers, bodies over the limit,
//!   floods of garbage tokens and of made-up methods;
//! - faults at the destination: a region on a 4 MiB tmpfs that fills up.
//!
//! Counts come from the environment, so the same tests run short in CI and long in the soak
//! (`scripts/soak.sh`): `SOAK_CYCLES` (crash cycles, default 5), `MIDCOPY_ROUNDS` (kills per
//! copy stage, default 2), `FLOOD_REQUESTS` (garbage-token requests measured, default 20000),
//! `RELIABILITY_SEED` (replays a run's random choices; each test prints the one it used).
//! Each test prints a `figures:` line, shown with `--nocapture`.
//!
//! The tmpfs and admin-socket tests need root (mount, setpriv), as CI has here.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Value};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

// ===== tools =====

fn bytes_under(dir: &Path) -> u64 {
    files_under(dir)
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

fn status_of(job: &Value) -> &str {
    job["status"].as_str().expect("status")
}

/// Waits until the job is terminal (as the CLI sees it); returns it.
fn wait_terminal(lab: &Lab, id: &str, timeout: Duration) -> Value {
    poll(&format!("job {id} to end"), timeout, || {
        let job = lab.ok_json(&["job", "show", id]);
        terminal(&job).then_some(job)
    })
}

/// A lab with the standard tenants, a user in tenants A and B with a token, and an image of
/// `size` bytes in ot1. Returns (lab, token, image id, the image's bytes).
fn copy_lab(size: usize) -> (Lab, String, String, Vec<u8>) {
    let (lab, token) = Lab::standard_with_copier();
    let image = lab.image(TENANT_A, "disk", size);
    let source = std::fs::read(lab.region_dir("ot1").join(&image)).expect("source bytes");
    (lab, token, image, source)
}

/// What is wrong at the destination region ot2, seen through the CLI (admin socket or store):
/// every file must be the active image of a replicated job, with the source's bytes; no
/// temporary file, no other image record, no replicated job without its image.
fn destination_violations(lab: &Lab, source: &[u8]) -> Vec<String> {
    let mut wrong = Vec::new();
    let jobs = lab.ok_json(&["job", "list"]);
    let images = lab.ok_json(&["image", "list", "--region", "ot2"]);
    let replicated: BTreeSet<String> = jobs
        .as_array()
        .expect("jobs")
        .iter()
        .filter(|j| status_of(j) == "replicated")
        .map(|j| {
            j["destination_image_id"]
                .as_str()
                .unwrap_or("(none)")
                .to_string()
        })
        .collect();
    let mut active = BTreeSet::new();
    for image in images.as_array().expect("images") {
        let id = image["id"].as_str().expect("id").to_string();
        match image["status"].as_str() {
            Some("active") => {
                active.insert(id);
            }
            other => wrong.push(format!("image {id} in ot2 is left {other:?}")),
        }
    }
    let files = names_in(&lab.region_dir("ot2"));
    for name in files.iter().filter(|n| n.starts_with('.')) {
        wrong.push(format!("temporary file {name} left in ot2"));
    }
    let finals: BTreeSet<String> = files.into_iter().filter(|n| !n.starts_with('.')).collect();
    if replicated != active {
        wrong.push(format!(
            "replicated jobs' images {replicated:?} differ from ot2's active images {active:?}"
        ));
    }
    if finals != active {
        wrong.push(format!(
            "files in ot2 {finals:?} differ from its active images {active:?}"
        ));
    }
    for id in &active {
        match std::fs::read(lab.region_dir("ot2").join(id)) {
            Ok(bytes) if bytes == source => {}
            Ok(bytes) => wrong.push(format!(
                "active image {id} has {} bytes that differ from the source's {}",
                bytes.len(),
                source.len()
            )),
            Err(e) => wrong.push(format!("active image {id} has no file: {e}")),
        }
    }
    wrong
}

fn log_panics(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("panicked"))
        .map(String::from)
        .collect()
}

fn now_secs_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

fn auth_stats(lab: &Lab) -> Value {
    lab.ok_json(&["status"])["auth"].clone()
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

// ===== 1. crash durability =====

/// What one client thread saw.
#[derive(Default)]
struct Tally {
    attempts: u64,
    acked: Vec<String>,
    /// A 202 whose body was cut by the kill: acknowledged, but the id is unknown.
    acked_without_id: u64,
    cancels: Vec<String>,
    five_xx: u64,
    violations: Vec<String>,
}

/// POSTs copies as fast as the server takes them until the server dies or `stop` is set;
/// cancels one acknowledged job in eight.
fn client(
    base: String,
    token: String,
    image: String,
    stop: Arc<AtomicBool>,
    mut rng: Rng,
) -> Tally {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let body = json!({"image_id": image, "tenant_id_dst": TENANT_B}).to_string();
    let mut tally = Tally::default();
    while !stop.load(Ordering::SeqCst) {
        tally.attempts += 1;
        let sent = http
            .post(format!("{base}{JOBS}"))
            .header("X-Auth-Token", &token)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send();
        let Ok(resp) = sent else { break };
        let status = resp.status().as_u16();
        if status != 202 {
            tally.five_xx += u64::from(status >= 500);
            tally
                .violations
                .push(format!("POST answered {status}: {:?}", resp.text()));
            continue;
        }
        let Ok(answer) = resp.json::<Value>() else {
            tally.acked_without_id += 1;
            break;
        };
        let id = answer["job_id"].as_str().expect("job_id").to_string();
        tally.acked.push(id.clone());
        if rng.below(8) == 0 {
            let sent = http
                .delete(format!("{base}{JOBS}/{id}"))
                .header("X-Auth-Token", &token)
                .send();
            let Ok(resp) = sent else { break };
            match resp.status().as_u16() {
                204 => tally.cancels.push(id),
                409 => {} // already finished
                status => {
                    tally.five_xx += u64::from(status >= 500);
                    tally
                        .violations
                        .push(format!("DELETE of acknowledged job {id} answered {status}"));
                }
            }
        }
    }
    tally
}

#[test]
fn acknowledged_jobs_survive_repeated_sigkill_under_16_concurrent_clients() {
    let cycles = env_count("SOAK_CYCLES", 5);
    let mut rng = Rng::for_test("crash durability");
    let (lab, token, image, source) = copy_lab(16 * KIB + 1);
    let root = lab.token("root", TENANT_A);

    let mut acked: Vec<String> = Vec::new();
    let mut cancels: Vec<String> = Vec::new();
    let mut lost: BTreeSet<String> = BTreeSet::new();
    let mut violations: Vec<String> = Vec::new();
    let (mut attempts, mut acked_without_id, mut five_xx) = (0u64, 0u64, 0u64);
    let (mut opens, mut slowest_open) = (0usize, Duration::ZERO);
    let mut kill_after_ms = Vec::new();
    for cycle in 0..=cycles {
        let opening = Instant::now();
        let mut server = lab.serve_with(&["--workers", "2"]);
        slowest_open = slowest_open.max(opening.elapsed());
        opens += 1;

        // Everything acknowledged before the last kill is there, listed and shown.
        let listed = all_jobs(&server, &root);
        let by_id: HashMap<&str, &str> = listed
            .iter()
            .map(|j| (j["job_id"].as_str().expect("id"), status_of(j)))
            .collect();
        if by_id.len() != listed.len() {
            violations.push(format!("cycle {cycle}: a job is listed twice"));
        }
        lost.extend(
            acked
                .iter()
                .filter(|id| !by_id.contains_key(id.as_str()))
                .cloned(),
        );
        for id in &cancels {
            let status = by_id.get(id.as_str()).copied().unwrap_or("(missing)");
            if !matches!(status, "cancel_requested" | "canceling" | "canceled") {
                violations.push(format!(
                    "cycle {cycle}: job {id} whose cancel got a 204 is {status}"
                ));
            }
        }
        for _ in 0..acked.len().min(16) {
            let id = &acked[rng.index(acked.len())];
            let status = server.get(&job_path(id), Some(&token)).status();
            if status != 200 {
                violations.push(format!(
                    "cycle {cycle}: GET of acknowledged job {id} is {status}"
                ));
            }
        }
        if cycle == cycles {
            break;
        }

        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..16)
            .map(|_| {
                let (base, token, image, stop) = (
                    server.base.clone(),
                    token.clone(),
                    image.clone(),
                    Arc::clone(&stop),
                );
                let rng = rng.fork();
                std::thread::spawn(move || client(base, token, image, stop, rng))
            })
            .collect();
        let moment = 100 + rng.below(1400);
        kill_after_ms.push(moment);
        std::thread::sleep(Duration::from_millis(moment));
        server.kill_9();
        stop.store(true, Ordering::SeqCst);
        for handle in clients {
            let tally = handle.join().expect("client thread");
            attempts += tally.attempts;
            acked.extend(tally.acked);
            acked_without_id += tally.acked_without_id;
            cancels.extend(tally.cancels);
            five_xx += tally.five_xx;
            violations.extend(tally.violations);
        }
    }

    // The last server has the worker: every job reaches an end, and the ends are consistent.
    let server = lab.serve_with(&["--workers", "2"]);
    let draining = Instant::now();
    let budget = Duration::from_secs(60) + Duration::from_millis(40) * acked.len() as u32;
    let mut listed = all_jobs(&server, &root);
    while listed.iter().any(|j| !terminal(j)) && draining.elapsed() < budget {
        std::thread::sleep(Duration::from_millis(200));
        listed = all_jobs(&server, &root);
    }
    let drain = draining.elapsed();
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    for job in &listed {
        *by_status.entry(status_of(job)).or_default() += 1;
    }
    let stuck: Vec<&Value> = listed.iter().filter(|j| !terminal(j)).collect();
    let by_id: HashMap<&str, &Value> = listed
        .iter()
        .map(|j| (j["job_id"].as_str().expect("id"), j))
        .collect();
    for id in &cancels {
        if let Some(job) = by_id.get(id.as_str()) {
            if status_of(job) != "canceled" {
                violations.push(format!(
                    "job {id} whose cancel got a 204 ended {}",
                    status_of(job)
                ));
            }
        }
    }
    for job in listed.iter().filter(|j| status_of(j) == "error") {
        let id = job["job_id"].as_str().expect("id");
        let shown = lab.ok_json(&["job", "show", id]);
        violations.push(format!("job {id} ended in error: {}", shown["error"]));
    }
    violations.extend(destination_violations(&lab, &source));
    // Creation order comes from sled's id generator, which jumps ahead after a crash: a reused
    // number would overwrite an index entry and hide a job from every list.
    let stored = lab.ok_json(&["job", "list"]);
    let seqs: BTreeSet<u64> = stored
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["seq"].as_u64().expect("seq"))
        .collect();
    if seqs.len() != listed.len() || stored.as_array().map(Vec::len) != Some(listed.len()) {
        violations.push(format!(
            "{} distinct sequence numbers, {} stored jobs, {} listed",
            seqs.len(),
            stored.as_array().map_or(0, Vec::len),
            listed.len()
        ));
    }
    let log = server.log_text();
    violations.extend(log_panics(&log));
    drop(server);

    figures(
        "crash durability",
        &[
            ("cycles", cycles.to_string()),
            (
                "kill_after_ms",
                format!("{kill_after_ms:?}").replace(' ', ""),
            ),
            ("post_attempts", attempts.to_string()),
            ("acked", acked.len().to_string()),
            ("acked_without_id", acked_without_id.to_string()),
            ("cancels_acked", cancels.len().to_string()),
            ("lost", lost.len().to_string()),
            ("five_xx", five_xx.to_string()),
            ("store_opens", opens.to_string()),
            ("slowest_open_ms", slowest_open.as_millis().to_string()),
            ("jobs_listed", listed.len().to_string()),
            ("by_status", format!("{by_status:?}").replace(' ', "")),
            ("stuck", stuck.len().to_string()),
            ("drain_ms", drain.as_millis().to_string()),
            (
                "db_bytes",
                bytes_under(&lab.data_dir().join("db")).to_string(),
            ),
            (
                "seq_span",
                format!("{:?}..={:?}", seqs.first(), seqs.last()).replace(' ', ""),
            ),
            ("violations", violations.len().to_string()),
        ],
    );
    assert!(lost.is_empty(), "acknowledged jobs lost: {lost:?}");
    assert!(
        stuck.is_empty(),
        "jobs still unfinished after {drain:?}: {stuck:?}"
    );
    assert_eq!(five_xx, 0, "5xx answers seen: {violations:?}");
    assert!(violations.is_empty(), "violations: {violations:#?}");
    assert!(!acked.is_empty(), "no POST was ever acknowledged");
}

// ===== 2. crash mid-copy =====

#[derive(Clone, Copy, Debug)]
enum Stage {
    /// Right after the 202, before the worker has done anything.
    AfterAck,
    /// As soon as the temporary file exists.
    PartCreated,
    /// With a quarter of the bytes copied.
    MidCopy,
    /// As soon as the final file name exists: after the rename, before or while the job and
    /// image are committed.
    AfterRename,
    /// Mid-copy, right after a cancel was acknowledged.
    CancelMidCopy,
    /// A random moment in the first half second.
    Random,
}

const STAGES: [Stage; 6] = [
    Stage::AfterAck,
    Stage::PartCreated,
    Stage::MidCopy,
    Stage::AfterRename,
    Stage::CancelMidCopy,
    Stage::Random,
];

/// Spins (no sleeping: the windows are short) until `probe` holds or 20 s pass.
fn spin_until(mut probe: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if probe() {
            return true;
        }
        std::thread::yield_now();
    }
    false
}

/// Size of the temporary file in `dir`, if one exists.
fn part_len(dir: &Path) -> Option<u64> {
    let entries = std::fs::read_dir(dir).ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".part") {
            return Some(entry.metadata().map_or(0, |m| m.len()));
        }
    }
    None
}

fn new_final_file(dir: &Path, known: &BTreeSet<String>) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        !name.starts_with('.') && !known.contains(&name)
    })
}

/// The job's state as a crash left it, read from the store with no server running; also
/// checks that no active image in ot2 has other bytes than the source.
fn crash_state(lab: &Lab, id: &str, source: &[u8], wrong: &mut Vec<String>) -> String {
    let job = lab.ok_json(&["job", "show", id]);
    let ot2 = lab.region_dir("ot2");
    let image = job["destination_image_id"]
        .as_str()
        .map(|dst| lab.ok_json(&["image", "show", dst])["status"].clone());
    let dst = job["destination_image_id"].as_str().unwrap_or("-");
    let file = ot2.join(dst).is_file();
    let part = part_len(&ot2).is_some();
    for img in lab
        .ok_json(&["image", "list", "--region", "ot2"])
        .as_array()
        .expect("images")
    {
        if img["status"] == "active" {
            let img_id = img["id"].as_str().expect("id");
            let bytes = std::fs::read(ot2.join(img_id)).unwrap_or_default();
            if bytes != source {
                wrong.push(format!(
                    "after a crash, active image {img_id} has {} bytes unlike the source",
                    bytes.len()
                ));
            }
        }
    }
    format!(
        "job={},image={},final_file={file},part_file={part}",
        status_of(&job),
        image.as_ref().and_then(Value::as_str).unwrap_or("none")
    )
}

#[test]
fn sigkill_at_any_stage_of_a_copy_ends_consistent_with_no_orphans() {
    let rounds = env_count("MIDCOPY_ROUNDS", 2);
    let mut rng = Rng::for_test("crash mid-copy");
    let (lab, token, image, source) = copy_lab(4 * MIB);
    let ot2 = lab.region_dir("ot2");
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut wrong: Vec<String> = Vec::new();
    let mut kills = 0;
    for round in 0..rounds {
        for stage in STAGES {
            let known = names_in(&ot2);
            let mut server = lab.serve_with(&["--max-bandwidth", "16M"]);
            let id = server.copy_ok(&token, &image, TENANT_B);
            let mut cancel_acked = false;
            let reached = match stage {
                Stage::AfterAck => true,
                Stage::Random => {
                    std::thread::sleep(Duration::from_millis(rng.below(500)));
                    true
                }
                Stage::PartCreated => spin_until(|| part_len(&ot2).is_some()),
                Stage::MidCopy => spin_until(|| part_len(&ot2) >= Some(MIB as u64)),
                Stage::AfterRename => spin_until(|| new_final_file(&ot2, &known)),
                Stage::CancelMidCopy => {
                    let reached = spin_until(|| part_len(&ot2) >= Some(MIB as u64));
                    let status = server.delete(&job_path(&id), Some(&token)).status();
                    cancel_acked = status == 204;
                    reached
                }
            };
            server.kill_9();
            drop(server);
            kills += 1;
            let state = crash_state(&lab, &id, &source, &mut wrong);
            *states
                .entry(format!(
                    "{stage:?}{}:{state}",
                    if reached { "" } else { "(missed)" }
                ))
                .or_default() += 1;

            let server = lab.serve_with(&[]);
            let job = wait_terminal(&lab, &id, Duration::from_secs(60));
            let end = status_of(&job).to_string();
            *outcomes.entry(format!("{stage:?}:{end}")).or_default() += 1;
            let expected = if cancel_acked {
                "canceled"
            } else {
                "replicated"
            };
            if end != expected {
                wrong.push(format!(
                    "round {round} {stage:?}: job {id} ended {end}, not {expected} (error: {})",
                    job["error"]
                ));
            }
            for problem in destination_violations(&lab, &source) {
                wrong.push(format!("round {round} {stage:?}: {problem}"));
            }
            wrong.extend(log_panics(&server.log_text()));
            drop(server);
        }
    }
    figures(
        "crash mid-copy",
        &[
            ("kills", kills.to_string()),
            ("states_at_kill", format!("{states:?}").replace(' ', "")),
            ("outcomes", format!("{outcomes:?}").replace(' ', "")),
            ("violations", wrong.len().to_string()),
        ],
    );
    assert!(wrong.is_empty(), "violations: {wrong:#?}");
}

// ===== 5. tokens =====

#[test]
fn an_expired_token_fails_on_the_very_next_request_even_when_cached() {
    let lab = Lab::new();
    lab.standard();
    let server = lab.serve();
    let issued = lab.ok_json(&issue_args("alice", TENANT_A, &["--expires-in", "3s"]));
    let token = issued["token"].as_str().expect("token").to_string();
    let expires = epoch(&issued["info"]["expires_at"]) as f64;
    for _ in 0..3 {
        assert_eq!(server.get(JOBS, Some(&token)).status(), 200);
    }
    let stats = auth_stats(&lab);
    assert_eq!(stats["argon2_verifications"], 1);
    let hits_before = stats["cache_hits"].as_u64().expect("hits");
    assert!(hits_before >= 2, "the token is not cached: {stats}");

    // The server reads its clock between `before` and `after`: a request that ended before
    // the expiry must succeed, and the first one that began after it must fail.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut served_before = 0;
    loop {
        assert!(Instant::now() < deadline, "never got past the expiry");
        let before = now_secs_f64();
        let status = server.get(JOBS, Some(&token)).status();
        let after = now_secs_f64();
        if after < expires {
            assert_eq!(status, 200, "failed {:.3} s before expiry", expires - after);
            served_before += 1;
        }
        if before >= expires {
            assert_eq!(
                status,
                401,
                "succeeded {:.3} s after expiry",
                before - expires
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let hits_after = auth_stats(&lab)["cache_hits"].as_u64().expect("hits");
    assert!(served_before > 0);
    assert!(
        hits_after > hits_before,
        "requests up to the expiry were cache hits"
    );
    for _ in 0..5 {
        assert_401(server.get(JOBS, Some(&token)));
    }
}

#[test]
fn a_revoked_token_fails_on_the_very_next_request_even_when_cached_and_in_use() {
    let lab = Lab::new();
    lab.standard();
    let token = lab.token("alice", TENANT_A);
    let server = lab.serve();
    for _ in 0..3 {
        assert_eq!(server.get(JOBS, Some(&token)).status(), 200);
    }
    assert_eq!(auth_stats(&lab)["argon2_verifications"], 1);
    let listed = lab.ok_json(&["token", "list"]);
    let id = listed[0]["id"].as_str().expect("token id").to_string();

    // Four clients use the token without pause while it is revoked.
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let seen: Arc<Mutex<Vec<(Instant, u16)>>> = Arc::default();
    let users: Vec<_> = (0..4)
        .map(|_| {
            let (url, token) = (server.url(JOBS), token.clone());
            let (stop, started, seen) =
                (Arc::clone(&stop), Arc::clone(&started), Arc::clone(&seen));
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::new();
                while !stop.load(Ordering::SeqCst) {
                    let at = Instant::now();
                    started.fetch_add(1, Ordering::SeqCst);
                    let status = client
                        .get(&url)
                        .header("X-Auth-Token", &token)
                        .send()
                        .expect("GET")
                        .status()
                        .as_u16();
                    seen.lock().expect("lock").push((at, status));
                }
            })
        })
        .collect();
    poll("requests in flight", Duration::from_secs(10), || {
        (started.load(Ordering::SeqCst) > 20).then_some(())
    });
    lab.ok(&["token", "revoke", &id]);
    let revoked = Instant::now();
    let target = started.load(Ordering::SeqCst) + 40;
    poll("requests after the revoke", Duration::from_secs(10), || {
        (started.load(Ordering::SeqCst) > target).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    for user in users {
        user.join().expect("client thread");
    }
    let seen = seen.lock().expect("lock");
    let after: Vec<u16> = seen
        .iter()
        .filter(|(at, _)| *at > revoked)
        .map(|(_, s)| *s)
        .collect();
    assert!(
        after.len() >= 20,
        "only {} requests after the revoke",
        after.len()
    );
    assert!(
        after.iter().all(|s| *s == 401),
        "requests begun after the revoke returned: {after:?}"
    );
    assert!(seen.iter().any(|(_, s)| *s == 200), "the token was in use");
    assert!(seen.iter().all(|(_, s)| matches!(s, 200 | 401)));
    assert_401(server.get(JOBS, Some(&token)));
    // Durable: still refused after a restart.
    drop(server);
    let server = lab.serve();
    assert_401(server.get(JOBS, Some(&token)));
}

#[test]
fn tokens_of_removed_users_and_tenants_fail_and_recreated_names_do_not_revive_them() {
    let lab = Lab::new();
    lab.standard();
    let carol = lab.token("carol", TENANT_C);
    let bob = lab.token("bob", TENANT_B);
    let server = lab.serve();
    for _ in 0..2 {
        assert_eq!(server.get(JOBS, Some(&carol)).status(), 200);
        assert_eq!(server.get(JOBS, Some(&bob)).status(), 200);
    }
    // A tenant that still has members cannot go; its members' tokens keep working.
    lab.fails(&["tenant", "remove", TENANT_B]);
    assert_eq!(server.get(JOBS, Some(&bob)).status(), 200);

    lab.ok(&["user", "remove", "carol"]);
    assert_401(server.get(JOBS, Some(&carol)));
    lab.ok(&["tenant", "remove", TENANT_C]);
    assert_401(server.get(JOBS, Some(&carol)));

    // The same names again are new principals: the old token stays dead.
    lab.ok(&["tenant", "add", TENANT_C, "--region", "ot1"]);
    lab.ok(&[
        "user", "add", "carol", "--tenant", TENANT_C, "--tenant", TENANT_B,
    ]);
    assert_401(server.get(JOBS, Some(&carol)));
    let fresh = lab.token("carol", TENANT_C);
    assert_eq!(server.get(JOBS, Some(&fresh)).status(), 200);
    assert_401(server.get(JOBS, Some(&carol)));
    assert_eq!(server.get(JOBS, Some(&bob)).status(), 200);

    drop(server);
    let server = lab.serve();
    assert_401(server.get(JOBS, Some(&carol)));
    assert_eq!(server.get(JOBS, Some(&fresh)).status(), 200);
}

#[test]
fn no_token_plaintext_in_the_data_dir_or_logs_after_kill_9_revoke_and_trace_logging() {
    let lab = Lab::new();
    lab.standard();
    let alice = lab.token("alice", TENANT_A);
    let bob = lab.token("bob", TENANT_B);
    let imported = "Imported-Reliability-Token-7f3a";
    lab.ok(&issue_args("carol", TENANT_C, &["--token", imported]));
    // Values clients present that are not tokens are secrets of someone's too.
    let presented = [
        "Presented-Unknown-Secret-5c1e".to_string(),
        format!("{}x", &alice[..31]),
        "Z".repeat(256),
    ];
    let trace = [("RUST_LOG", "trace")];
    let mut server = lab.serve_env(&["--no-worker"], &trace);
    let root = lab.token("root", TENANT_A); // issued through the socket
    let mut tokens = vec![
        alice.clone(),
        bob.clone(),
        imported.to_string(),
        root.clone(),
    ];
    for t in &tokens {
        assert_eq!(server.get(JOBS, Some(t)).status(), 200);
    }
    for p in &presented {
        assert_401(server.get(JOBS, Some(p)));
    }
    let bob_id = token_id_of(&lab.ok_json(&["token", "list"]), "bob");
    lab.ok(&["token", "revoke", &bob_id]);
    assert_401(server.get(JOBS, Some(&bob)));
    // No clean shutdown: whatever sled holds in its log stays as written.
    server.kill_9();
    drop(server);
    let server = lab.serve_env(&["--no-worker"], &trace);
    assert_eq!(server.get(JOBS, Some(&alice)).status(), 200);
    let log = server.log_text();
    drop(server);

    assert!(
        log.contains("hyper") || log.contains("trace") || log.contains("TRACE"),
        "the server did not log at trace level; the check would prove nothing"
    );
    tokens.extend(presented.iter().cloned());
    let mut places = files_under(&lab.data_dir());
    places.push(lab.dir.path().join("server.log"));
    assert_secrets_absent(&places, &tokens);
}

/// Runs the CLI as `nobody` (uid 65534) against the lab.
fn cli_as_nobody(lab: &Lab, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(BIN)
        .arg("--data-dir")
        .arg(lab.data_dir())
        .args(args)
        .current_dir("/")
        .output()
        .expect("run setpriv (util-linux)")
}

/// Sends one admin request line (`request`, JSON) to the lab's socket as `nobody`, with a
/// plain client (the CLI refuses a socket others may write to before sending anything),
/// `delay` seconds after its connect; the server's reply line goes to stderr (read up to its
/// newline, as the CLI does), and the exit status is 0 only if it carried out the request.
fn raw_admin_as_nobody(lab: &Lab, request: &str, delay: f64) -> std::process::Output {
    let client = "import socket, sys, time\n\
        s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); time.sleep(float(sys.argv[3]))\n\
        try: s.sendall(sys.argv[2].encode() + b'\\n')\n\
        except OSError: pass\n\
        reply = b''\n\
        while not reply.endswith(b'\\n'):\n    part = s.recv(65536)\n    reply += part\n    if not part: break\n\
        sys.stderr.write(reply.decode())\n\
        sys.exit(0 if reply.startswith(b'{\"Ok\"') else 1)\n";
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["/usr/bin/python3", "-c", client])
        .arg(lab.data_dir().join("admin.sock"))
        .arg(request)
        .arg(delay.to_string())
        .current_dir("/")
        .output()
        .expect("run setpriv (util-linux) and /usr/bin/python3")
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn the_admin_socket_refuses_a_peer_with_another_uid() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "this test runs the client as nobody and needs root");
    let lab = Lab::new();
    lab.standard();
    let server = lab.serve();
    let socket = lab.data_dir().join("admin.sock");
    let tokens_before = lab.ok_json(&["token", "list"]);

    // With the data directory's own modes, nobody cannot even reach the socket.
    let out = cli_as_nobody(&lab, &["region", "add", "evil1"]);
    assert!(!out.status.success(), "nobody added a region");
    assert!(out.stdout.is_empty());

    // Even with the path and the socket opened to everyone, the server refuses by peer uid.
    chmod(lab.dir.path(), 0o711);
    chmod(&lab.data_dir(), 0o711);
    chmod(&socket, 0o666);
    // nobody's CLI now refuses such a socket itself, before sending anything.
    let out = cli_as_nobody(&lab, &["region", "add", "evil2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nobody added a region");
    assert!(stderr.contains("refusing the admin socket"), "{stderr}");
    // A plain client gets to the server, which refuses by peer uid.
    let refusals = [
        json!({"op": "region_add", "id": "evil2", "dir": null, "disk_formats": null}),
        json!({"op": "token_issue", "user": "root", "tenant": TENANT_A,
               "expires_in_secs": null, "value": null}),
        json!({"op": "user_add", "name": "mallory", "tenants": [TENANT_A], "admin": true}),
        json!({"op": "token_list"}),
        json!({"op": "status"}),
    ];
    // Ten times each: the refusal must say why every time, not only when the race is won.
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for request in &refusals {
        for _ in 0..10 {
            let out = raw_admin_as_nobody(&lab, &request.to_string(), 0.0);
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(!out.status.success(), "nobody ran {request}: {stderr}");
            assert!(out.stdout.is_empty(), "{request} printed {:?}", out.stdout);
            *answers.entry(stderr).or_default() += 1;
        }
    }
    // A client that is slow to send its request (300 ms after its connect) must be told why
    // too, not find the socket already closed.
    let out = raw_admin_as_nobody(&lab, &json!({"op": "region_list"}).to_string(), 0.3);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    *answers
        .entry(format!("(slow client) {stderr}"))
        .or_default() += 1;
    chmod(&socket, 0o600);
    chmod(&lab.data_dir(), 0o700);
    chmod(lab.dir.path(), 0o700);

    let regions = lab.ok_json(&["region", "list"]).to_string();
    assert!(!regions.contains("evil"), "{regions}");
    let users = lab.ok_json(&["user", "list"]).to_string();
    assert!(!users.contains("mallory"), "{users}");
    assert_eq!(lab.ok_json(&["token", "list"]), tokens_before);
    let log = server.log_text();
    assert!(
        log.matches("admin request refused").count() >= refusals.len() * 10,
        "the server does not log every refusal"
    );
    lab.ok(&["status"]);
    let unexplained: Vec<(&String, &usize)> = answers
        .iter()
        .filter(|(a, _)| !(a.contains("permission denied") && a.contains("65534")))
        .collect();
    figures(
        "admin socket uid",
        &[("answers", format!("{answers:?}").replace(' ', "_"))],
    );
    assert!(
        unexplained.is_empty(),
        "refusals that do not say why (of {} tries): {unexplained:?}",
        refusals.len() * 10
    );
}

// ===== 6. resource abuse =====

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

/// Reads one response head off a raw socket; returns (status, head, seconds waited).
fn read_head(stream: &mut TcpStream, timeout: Duration) -> Option<(u16, String, Duration)> {
    let started = Instant::now();
    stream.set_read_timeout(Some(timeout)).expect("timeout");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    Some((status, text, started.elapsed()))
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
        let answer = read_head(&mut stream, Duration::from_secs(10));
        // After the answer the server closes: the rest of the body is never read.
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut rest = Vec::new();
        let closed = match stream.read_to_end(&mut rest) {
            Ok(_) => true,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        };
        let sent = writing.join().expect("writer");
        let (status, text, took) = answer.expect("no answer to an oversized body");
        results.push((chunked, status, took, sent));
        assert_eq!(status, 413, "{text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
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
                    let status = read_response(&mut stream).map_or(0, |(s, _)| s);
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

/// Reads one whole response (head and Content-Length body) off a keep-alive connection.
fn read_response(stream: &mut TcpStream) -> Option<(u16, Vec<u8>)> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if raw.len() >= end + 4 + length {
                let status = head.split(' ').nth(1)?.parse().ok()?;
                return Some((status, raw[end + 4..end + 4 + length].to_vec()));
            }
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
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

// ===== 7. faults at the destination =====

/// A tmpfs mounted for the test, unmounted when dropped (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mount point");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a {size} tmpfs on {} (this test needs root and mount rights): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn a_destination_that_fills_up_fails_its_jobs_cleanly_while_others_go_on() {
    let lab = Lab::new();
    let mount = lab.dir.path().join("ot2-tmpfs");
    let _tmpfs = Tmpfs::mount(&mount, "4m");
    lab.ok(&["region", "add", "ot1"]);
    lab.ok(&[
        "region",
        "add",
        "ot2",
        "--dir",
        mount.to_str().expect("path"),
    ]);
    lab.ok(&["tenant", "add", TENANT_A, "--region", "ot1"]);
    lab.ok(&["tenant", "add", TENANT_B, "--region", "ot2"]);
    lab.ok(&[
        "user", "add", "alice2", "--tenant", TENANT_A, "--tenant", TENANT_B,
    ]);
    let token = lab.token("alice2", TENANT_A);
    let big = lab.image(TENANT_A, "big", 6 * MIB);
    let mids: Vec<String> = (0..3)
        .map(|i| lab.image(TENANT_A, &format!("mid{i}"), 3 * MIB / 2))
        .collect();
    let small = lab.image(TENANT_A, "small", 256 * KIB);
    let bytes_of = |id: &str| std::fs::read(lab.region_dir("ot1").join(id)).expect("source bytes");
    // No reserve: the 4 MiB are all for copies (the default reserve is at least 64 MiB).
    let server = lab.serve_with(&["--workers", "2", "--min-free", "0"]);
    let mut ends: Vec<(String, String, String)> = Vec::new();
    // A copy without room is refused at once (409), before anything is written.
    let mut refused = 0;
    let mut ask = |source: &str| -> Option<(String, String)> {
        let resp = server.copy(&token, source, TENANT_B);
        if resp.status() == 409 {
            let body = assert_error(resp, 409);
            assert!(body.contains("has no room"), "{body}");
            refused += 1;
            return None;
        }
        assert_eq!(resp.status(), 202, "{:?}", resp.text());
        let body: Value = resp.json().expect("202 body");
        Some((
            body["job_id"].as_str().expect("id").to_string(),
            source.to_string(),
        ))
    };

    // The destination's state after every phase: only complete copies, nothing half-written.
    let check = |ends: &[(String, String, String)]| {
        let files = names_in(&mount);
        assert!(
            files.iter().all(|f| !f.starts_with('.')),
            "temporary files left: {files:?}"
        );
        let images = lab.ok_json(&["image", "list", "--region", "ot2"]);
        let active: BTreeSet<String> = images
            .as_array()
            .expect("images")
            .iter()
            .map(|i| {
                assert_eq!(i["status"], "active", "{i}");
                i["id"].as_str().expect("id").to_string()
            })
            .collect();
        assert_eq!(files, active, "files and image records differ");
        let mut replicated = BTreeSet::new();
        for (id, source, end) in ends {
            let job = lab.ok_json(&["job", "show", id]);
            match end.as_str() {
                "replicated" => {
                    let dst = job["destination_image_id"]
                        .as_str()
                        .expect("dst")
                        .to_string();
                    let copy = std::fs::read(mount.join(&dst)).expect("copy bytes");
                    assert!(
                        copy == bytes_of(source),
                        "copy {dst} differs from its source"
                    );
                    replicated.insert(dst);
                }
                "error" => {
                    let reason = job["error"].as_str().unwrap_or_default();
                    assert!(
                        reason.contains("No space left on device"),
                        "job {id} failed for another reason: {reason}"
                    );
                    assert_eq!(job["destination_image_id"], Value::Null);
                }
                other => panic!("job {id} ended {other}"),
            }
        }
        assert_eq!(replicated, active, "active images that no job replicated");
        assert_eq!(server.get(JOBS, Some(&token)).status(), 200);
    };
    let run = |ids: &[(String, String)], ends: &mut Vec<(String, String, String)>| {
        for (id, source) in ids {
            let job = wait_terminal(&lab, id, Duration::from_secs(60));
            ends.push((id.clone(), source.clone(), status_of(&job).to_string()));
        }
    };

    // 1. A copy larger than the whole store is refused and leaves the store empty.
    assert!(ask(&big).is_none(), "a 6 MiB copy into 4 MiB");
    check(&ends);
    assert!(names_in(&mount).is_empty());

    // 2. Again, with a small copy beside it: that one goes.
    assert!(ask(&big).is_none(), "a 6 MiB copy into 4 MiB");
    let batch: Vec<(String, String)> = ask(&small).into_iter().collect();
    run(&batch, &mut ends);
    assert_eq!(ends.last().expect("end").2, "replicated");
    check(&ends);

    // 3. Three copies that do not all fit: what the first ones will write is promised, so
    //    the last is refused (or, if the store fills up on the way, fails consistent).
    let first = ends.len();
    let batch: Vec<(String, String)> = mids.iter().filter_map(|m| ask(m)).collect();
    let refused_here = mids.len() - batch.len();
    run(&batch, &mut ends);
    let phase: Vec<&str> = ends[first..].iter().map(|e| e.2.as_str()).collect();
    assert!(phase.contains(&"replicated"), "{phase:?}");
    assert!(
        phase.contains(&"error") || refused_here > 0,
        "4.5 MiB fit into 4 MiB: {phase:?}"
    );
    check(&ends);

    // 4. What still fits still goes.
    let batch: Vec<(String, String)> = ask(&small).into_iter().collect();
    run(&batch, &mut ends);
    assert_eq!(ends.last().expect("end").2, "replicated");
    check(&ends);
    let errors = ends.iter().filter(|e| e.2 == "error").count();
    figures(
        "full destination",
        &[
            ("jobs", ends.len().to_string()),
            ("errors", errors.to_string()),
            ("refused_409", refused.to_string()),
            ("replicated", (ends.len() - errors).to_string()),
            ("tmpfs_files", names_in(&mount).len().to_string()),
        ],
    );
    assert!(log_panics(&server.log_text()).is_empty());
    drop(server);
}
