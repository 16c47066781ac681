//! Copies that resume: after kill -9 a copy into a directory region goes on from the chunks its
//! destination holds verified, checking them again first; a damaged chunk is rewritten, a
//! changed source fails the job, a cancel during a resume leaves nothing. Chunk manifests are
//! made on first use for images that have none, and a damaged one is not trusted.
//!
//! `RESUME_KILLS` sets the number of kills of the first test (default 20).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MIB: usize = 1 << 20;

/// Bytes that differ from chunk to chunk (unlike [`Lab::file`]'s, which repeat every 256).
fn varied(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(size);
    out
}

/// A copier lab with an image of `bytes` in ot1; (lab, alice2's token, image id, source path).
fn lab_with(bytes: &[u8]) -> (Lab, String, String, PathBuf) {
    let (lab, token) = Lab::standard_with_copier();
    let file = lab.data_dir().with_file_name("source.raw");
    std::fs::write(&file, bytes).expect("write source");
    let image = lab
        .ok(&import_args(
            file.to_str().expect("path"),
            TENANT_A,
            "disk",
            &[],
        ))
        .trim()
        .to_string();
    let path = lab.region_dir("ot1").join(&image);
    (lab, token, image, path)
}

/// The length of the temporary file in `dir` (0 while there is none).
fn part_len(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

fn wait_part(dir: &Path, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while part_len(dir) < at_least {
        assert!(
            Instant::now() < deadline,
            "the copy never wrote {at_least} bytes"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts a copy of `image` into tenant B under `cap`, kills the server once the partial file
/// holds `at_least` bytes, and returns the job id.
fn interrupted_copy(lab: &Lab, token: &str, image: &str, cap: &str, at_least: usize) -> String {
    let mut server = lab.serve_with(&["--max-bandwidth", cap]);
    let id = server.copy_ok(token, image, TENANT_B);
    wait_part(&lab.region_dir("ot2"), at_least as u64);
    server.kill_9();
    id
}

/// The job as `job show --json` gives it (no server needed).
fn shown(lab: &Lab, id: &str) -> Value {
    lab.ok_json(&["job", "show", id])
}

fn number(job: &Value, key: &str) -> u64 {
    job[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {job}"))
}

/// The destination's bytes of a replicated job.
fn destination_bytes(lab: &Lab, job: &Value) -> Vec<u8> {
    let dst = job["destination_image_id"].as_str().expect("destination");
    std::fs::read(lab.region_dir("ot2").join(dst)).expect("destination bytes")
}

#[test]
fn kill_9_at_random_points_twenty_times_ends_replicated_having_read_the_source_about_once() {
    let kills = env_count("RESUME_KILLS", 20);
    let size = 256 * MIB;
    let source = varied(size, 20);
    let (lab, token, image, _) = lab_with(&source);
    let ot2 = lab.region_dir("ot2");
    let mut rng = Rng::for_test("resume after kills");
    let mut id = None;
    let mut at_kill = Vec::new();
    for _ in 0..kills {
        // 32 MiB/s: a whole copy takes 8 s, and 20 runs of 50-350 ms about half of that, so
        // every kill lands inside it.
        let mut server = lab.serve_with(&["--max-bandwidth", "32M"]);
        let job = id.get_or_insert_with(|| server.copy_ok(&token, &image, TENANT_B));
        std::thread::sleep(Duration::from_millis(50 + rng.below(300)));
        server.kill_9();
        at_kill.push(part_len(&ot2) / MIB as u64);
        let status = shown(&lab, job)["status"].clone();
        assert_eq!(status, "replicating", "killed at {at_kill:?}");
    }
    let id = id.expect("a job");
    let server = lab.serve_with(&[]);
    let job = server.wait_job(&token, &id, Duration::from_secs(120), terminal);
    assert_eq!(job["status"], "replicated", "{}", server.log_text());
    let record = shown(&lab, &id);
    assert!(destination_bytes(&lab, &record) == source, "bytes differ");
    let read = number(&record, "source_bytes_read");
    let resumes = number(&record, "resumes");
    figures(
        "resume after kills",
        &[
            ("kills", kills.to_string()),
            ("part_mib_at_kills", format!("{at_kill:?}").replace(' ', "")),
            ("source_bytes_read", read.to_string()),
            ("ratio", format!("{:.3}", read as f64 / size as f64)),
            ("resumes", resumes.to_string()),
        ],
    );
    assert!(
        read as f64 <= 1.3 * size as f64,
        "read {read} bytes from the source for a {size}-byte image"
    );
    assert!(resumes >= 1, "no attempt resumed: {record}");
    assert_eq!(number(&record, "bytes_verified"), size as u64);
    assert!(log_panics(&server.log_text()).is_empty());
}

#[test]
fn a_chunk_damaged_between_a_crash_and_the_restart_is_detected_and_rewritten() {
    let size = 32 * MIB;
    let source = varied(size, 21);
    let (lab, token, image, _) = lab_with(&source);
    let ot2 = lab.region_dir("ot2");
    let id = interrupted_copy(&lab, &token, &image, "8M", 16 * MIB);
    let before = shown(&lab, &id);
    // One byte of the sixth chunk changes on the destination's disk while nothing runs.
    let part = std::fs::read_dir(&ot2)
        .expect("ot2")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".part"))
        .expect("the partial file stays");
    let mut bytes = std::fs::read(&part).expect("part");
    bytes[5 * MIB + 77] ^= 0xff;
    std::fs::write(&part, &bytes).expect("damage");

    let server = lab.serve_with(&[]);
    let job = server.wait_job(&token, &id, Duration::from_secs(60), terminal);
    assert_eq!(job["status"], "replicated", "{}", server.log_text());
    let record = shown(&lab, &id);
    assert!(destination_bytes(&lab, &record) == source, "bytes differ");
    // It resumed after the five good chunks, and read everything after them again.
    let read_after = number(&record, "source_bytes_read") - number(&before, "source_bytes_read");
    assert!(
        read_after >= (size - 5 * MIB) as u64,
        "only {read_after} bytes read after the restart: the damaged chunk was trusted"
    );
    assert_eq!(number(&record, "resumes"), 1, "{record}");
    assert!(
        server.log_text().contains("verified=5242880"),
        "{}",
        server.log_text()
    );
    let metrics = server.get("/metrics", None).text().expect("metrics");
    assert!(
        metrics.contains("image_replicator_resumes_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("image_replicator_resumed_bytes_total 5242880"));
}

#[test]
fn a_source_changed_between_a_crash_and_the_restart_fails_the_job_with_a_reason() {
    let size = 32 * MIB;
    let (lab, token, image, path) = lab_with(&varied(size, 22));
    let id = interrupted_copy(&lab, &token, &image, "8M", 8 * MIB);
    std::fs::write(&path, varied(size, 23)).expect("change the source");
    let server = lab.serve_with(&[]);
    let job = server.wait_job(&token, &id, Duration::from_secs(60), terminal);
    assert_eq!(job["status"], "error");
    let reason = shown(&lab, &id)["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("changed since it was recorded")
            && reason.contains("differs from the image's manifest"),
        "{reason}"
    );
    assert!(lab.files_in("ot2").is_empty(), "{:?}", lab.files_in("ot2"));
}

#[test]
fn a_cancel_during_a_resume_ends_canceled_with_nothing_left() {
    let size = 32 * MIB;
    let (lab, token, image, _) = lab_with(&varied(size, 24));
    let id = interrupted_copy(&lab, &token, &image, "4M", 8 * MIB);
    let server = lab.serve_with(&["--max-bandwidth", "4M"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while number(&shown(&lab, &id), "resumes") == 0 {
        assert!(Instant::now() < deadline, "the copy never resumed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let resp = server.delete(&job_path(&id), Some(&token));
    assert_eq!(resp.status(), 204);
    let job = server.wait_job(&token, &id, Duration::from_secs(30), terminal);
    assert_eq!(job["status"], "canceled");
    assert!(lab.files_in("ot2").is_empty(), "{:?}", lab.files_in("ot2"));
    let images = lab.ok_json(&["image", "list", "--region", "ot2"]);
    assert_eq!(images, Value::Array(vec![]));
}

#[test]
fn holes_of_a_sparse_source_are_not_read_and_stay_holes() {
    let (lab, token) = Lab::standard_with_copier();
    let file = lab.data_dir().with_file_name("sparse.raw");
    let out = std::fs::File::create(&file).expect("create");
    out.set_len(64 * MIB as u64).expect("extend");
    use std::os::unix::fs::FileExt;
    out.write_all_at(&varied(2 * MIB, 25), 10 * MIB as u64)
        .expect("data");
    out.write_all_at(&varied(MIB, 26), 63 * MIB as u64)
        .expect("data");
    let image = lab
        .ok(&import_args(
            file.to_str().expect("path"),
            TENANT_A,
            "sparse",
            &[],
        ))
        .trim()
        .to_string();
    let server = lab.serve_with(&[]);
    let id = server.copy_ok(&token, &image, TENANT_B);
    let job = server.wait_job(&token, &id, Duration::from_secs(60), terminal);
    assert_eq!(job["status"], "replicated", "{}", server.log_text());
    let record = shown(&lab, &id);
    assert_eq!(
        number(&record, "source_bytes_read"),
        3 * MIB as u64,
        "{record}"
    );
    let dst = lab
        .region_dir("ot2")
        .join(record["destination_image_id"].as_str().expect("dst"));
    assert!(std::fs::read(&dst).expect("dst") == std::fs::read(&file).expect("src"));
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&dst).expect("meta").blocks() * 512;
    assert!(allocated <= 4 * MIB as u64, "{allocated} bytes allocated");
}

/// Opens the lab's store in this process (no server may run) to reach the manifests.
fn with_store<T>(lab: &Lab, f: impl FnOnce(&dyn image_replicator::store::Repo) -> T) -> T {
    let store = image_replicator::store::open(
        &lab.data_dir(),
        &image_replicator::store::StoreConfig::embedded(),
    )
    .expect("open the store");
    let out = f(&*store);
    store.flush().expect("flush");
    out
}

#[test]
fn images_without_a_manifest_get_one_on_first_use_and_a_damaged_one_is_not_trusted() {
    use image_replicator::manifest::Manifest;
    let size = 8 * MIB + 1234;
    let source = varied(size, 27);
    let (lab, token, image, _) = lab_with(&source);
    let uuid: uuid::Uuid = image.parse().expect("uuid");
    let imported = with_store(&lab, |s| {
        let bytes = s
            .manifest(uuid)
            .expect("read")
            .expect("import made a manifest");
        let m = Manifest::decode(&bytes).expect("valid");
        // As an image that predates manifests: none.
        s.remove_manifest(uuid).expect("remove");
        m
    });
    assert_eq!(
        imported.chunks.len(),
        129,
        "64 KiB chunks of 8 MiB and 1234 bytes"
    );
    assert_eq!(imported.size, size as u64);

    let mut server = lab.serve_with(&[]);
    let first = server.copy_ok(&token, &image, TENANT_B);
    let job = server.wait_job(&token, &first, Duration::from_secs(60), terminal);
    assert_eq!(job["status"], "replicated", "{}", server.log_text());
    assert!(server
        .log_text()
        .contains("making the image's manifest (it has none yet)"));
    assert!(server.stop());
    let record = shown(&lab, &first);
    assert!(destination_bytes(&lab, &record) == source);
    let dst: uuid::Uuid = record["destination_image_id"]
        .as_str()
        .expect("dst")
        .parse()
        .expect("uuid");
    with_store(&lab, |s| {
        let made = Manifest::decode(&s.manifest(uuid).expect("read").expect("made"));
        assert_eq!(
            made.as_ref(),
            Ok(&imported),
            "made on first use as at import"
        );
        let copy = Manifest::decode(&s.manifest(dst).expect("read").expect("copy's"));
        assert_eq!(copy.map(|m| m.chunks), Ok(imported.chunks.clone()));
        // One byte of the stored manifest flips.
        let mut bytes = imported.encode();
        bytes[40] ^= 1;
        s.put_manifest(uuid, &bytes).expect("damage");
    });

    let server = lab.serve_with(&[]);
    let second = server.copy_ok(&token, &image, TENANT_B);
    let job = server.wait_job(&token, &second, Duration::from_secs(60), terminal);
    assert_eq!(job["status"], "replicated", "{}", server.log_text());
    let log = server.log_text();
    assert!(log.contains("not using the stored manifest"), "{log}");
    assert!(log.contains("damaged"), "{log}");
    drop(server);
    with_store(&lab, |s| {
        let again = Manifest::decode(&s.manifest(uuid).expect("read").expect("made again"));
        assert_eq!(again, Ok(imported));
    });
    assert!(destination_bytes(&lab, &shown(&lab, &second)) == source);
}
