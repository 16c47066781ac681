//! Crash durability: nothing acknowledged is lost when the server is SIGKILLed, tried hard.
//!
//! - under load: 16 clients POST (and cancel one job in eight) while the server is SIGKILLed
//!   and restarted, cycle after cycle; every 202 survives, every acknowledged cancel ends
//!   `canceled`, the store always opens, no job stays unfinished, creation numbers are never
//!   reused;
//! - mid-copy: SIGKILL at chosen stages of a copy (right after the 202, as the temporary
//!   file appears, mid-copy, right after the final rename, mid-cancel, at random); every job
//!   ends consistent with the destination, which holds no orphan and no wrong active image.
//!
//! Counts come from the environment, so the same tests run short in CI and long in the soak
//! (`scripts/soak.sh`): `SOAK_CYCLES` (crash cycles, default 5), `MIDCOPY_ROUNDS` (kills per
//! copy stage, default 2), `RELIABILITY_SEED` (replays a run's random choices; each test prints
//! the one it used). Each test prints a `figures:` line, shown with `--nocapture`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        .filter(|j| job_status(j) == "replicated")
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

// ===== SIGKILL under 16 clients =====

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
            .map(|j| (j["job_id"].as_str().expect("id"), job_status(j)))
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
        *by_status.entry(job_status(job)).or_default() += 1;
    }
    let stuck: Vec<&Value> = listed.iter().filter(|j| !terminal(j)).collect();
    let by_id: HashMap<&str, &Value> = listed
        .iter()
        .map(|j| (j["job_id"].as_str().expect("id"), j))
        .collect();
    for id in &cancels {
        if let Some(job) = by_id.get(id.as_str()) {
            if job_status(job) != "canceled" {
                violations.push(format!(
                    "job {id} whose cancel got a 204 ended {}",
                    job_status(job)
                ));
            }
        }
    }
    for job in listed.iter().filter(|j| job_status(j) == "error") {
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

// ===== SIGKILL at each stage of a copy =====

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
        job_status(&job),
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
            let end = job_status(&job).to_string();
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
