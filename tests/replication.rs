//! The replication worker, end to end: real server, real files, real copies.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MIB: usize = 1 << 20;

/// A lab with the standard tenants, alice2's token and an image of `size` bytes in ot1.
fn lab_with_image(size: usize) -> (Lab, String, String) {
    let (lab, token) = Lab::standard_with_copier();
    let image = lab.image(TENANT_A, "disk", size);
    (lab, token, image)
}

fn image_json(lab: &Lab, id: &str) -> Value {
    lab.ok_json(&["image", "show", id])
}

fn images_in(lab: &Lab, region: &str) -> Vec<Value> {
    serde_json::from_value(lab.ok_json(&["image", "list", "--region", region]))
        .expect("image list JSON")
}

/// Asserts the job's destination image is a faithful, active copy of `source` in ot2.
fn assert_faithful_copy(lab: &Lab, job: &Value, source: &str) {
    let dst = job["destination_image_id"]
        .as_str()
        .expect("destination id");
    let dst_image = image_json(lab, dst);
    let src_image = image_json(lab, source);
    assert_eq!(dst_image["status"], "active");
    assert_eq!(dst_image["owner"], TENANT_B);
    assert_eq!(dst_image["region"], "ot2");
    for key in [
        "size",
        "checksum",
        "os_hash_value",
        "disk_format",
        "container_format",
        "name",
    ] {
        assert_eq!(dst_image[key], src_image[key], "{key} differs");
    }
    let src_bytes = std::fs::read(lab.region_dir("ot1").join(source)).expect("source bytes");
    let dst_bytes = std::fs::read(lab.region_dir("ot2").join(dst)).expect("destination bytes");
    assert_eq!(sha512_hex(&dst_bytes), sha512_hex(&src_bytes));
    assert_eq!(dst_bytes, src_bytes);
    assert_eq!(
        lab.files_in("ot2"),
        vec![dst.to_string()],
        "stray files in ot2"
    );
}

#[test]
fn a_copy_ends_replicated_with_identical_bytes_and_monotonic_progress() {
    let (lab, token, image) = lab_with_image(32 * MIB);
    let server = lab.serve_with(&["--max-bandwidth", "24M"]);
    let id = server.copy_ok(&token, &image, TENANT_B);
    let (job, progress) = server.wait_job_progress(
        &token,
        &id,
        Duration::from_secs(60),
        status_is("replicated"),
    );
    assert!(
        progress.windows(2).all(|w| w[0] <= w[1]),
        "progress went back: {progress:?}"
    );
    assert!(
        progress.iter().any(|p| (1..100).contains(p)),
        "no intermediate progress seen: {progress:?}"
    );
    assert_eq!(job["copy_progress"], 100);
    assert_faithful_copy(&lab, &job, &image);
    let shown = lab.ok(&["job", "show", &id]);
    assert!(
        shown.contains(&format!("bytes: {0} of {0}", 32 * MIB)),
        "{shown}"
    );
}

/// Job lists are kept encoded while no job changes: every change of a running copy must
/// still show in the next list.
#[test]
fn the_job_list_follows_every_change_of_a_copy() {
    let (lab, token, image) = lab_with_image(16 * MIB);
    let server = lab.serve_with(&["--max-bandwidth", "12M"]);
    let id = server.copy_ok(&token, &image, TENANT_B);
    let progress = |j: &Value| j["copy_progress"].as_u64().expect("progress");
    let mut seen = Vec::new();
    poll_every(
        Duration::from_millis(20),
        Duration::from_secs(60),
        || {
            let shown = server.job(&token, &id);
            let resp = server.get(JOBS, Some(&token));
            assert_eq!(resp.status(), 200);
            let list: Value = resp.json().expect("list JSON");
            let listed = list
                .as_array()
                .and_then(|jobs| jobs.iter().find(|j| j["job_id"] == id.as_str()))
                .expect("the job is listed")
                .clone();
            // The list was read after the show: it is at least as far along.
            assert!(
                progress(&listed) >= progress(&shown),
                "list {listed} behind show {shown}"
            );
            seen.push(progress(&listed));
            (listed["status"] == "replicated").then(|| assert_eq!(progress(&listed), 100))
        },
        || {
            format!(
                "job {id} to be replicated; it is {}",
                server.job(&token, &id)
            )
        },
    );
    assert!(
        seen.iter().any(|p| (1..100).contains(p)),
        "no intermediate progress in the list: {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
}

#[test]
fn an_empty_image_copies_straight_to_100() {
    let (lab, token, image) = lab_with_image(0);
    let server = lab.serve_with(&[]);
    let id = server.copy_ok(&token, &image, TENANT_B);
    let job = server.wait_job(&token, &id, Duration::from_secs(30), terminal);
    assert_eq!(job["status"], "replicated");
    assert_eq!(job["copy_progress"], 100);
    assert_faithful_copy(&lab, &job, &image);
}

#[test]
fn cancel_mid_copy_ends_canceled_within_two_seconds_leaving_nothing() {
    let (lab, token, image) = lab_with_image(32 * MIB);
    let server = lab.serve_with(&["--max-bandwidth", "2M"]);
    let id = server.copy_ok(&token, &image, TENANT_B);
    server.wait_job(&token, &id, Duration::from_secs(30), |j| {
        j["status"] == "replicating" && j["copy_progress"].as_u64() > Some(0)
    });
    let asked = Instant::now();
    let resp = server.delete(&job_path(&id), Some(&token));
    assert_eq!(resp.status(), 204);
    let job = server.wait_job(&token, &id, Duration::from_secs(10), terminal);
    let took = asked.elapsed();
    assert_eq!(job["status"], "canceled");
    assert!(took < Duration::from_secs(2), "cancel took {took:?}");
    assert_eq!(job["destination_image_id"], Value::Null);
    assert!(
        lab.files_in("ot2").is_empty(),
        "left in ot2: {:?}",
        lab.files_in("ot2")
    );
    assert!(images_in(&lab, "ot2").is_empty());
}

#[test]
fn a_cancel_before_the_copy_starts_means_it_never_starts() {
    let (lab, token, image) = lab_with_image(MIB);
    let id = {
        let server = lab.serve();
        let id = server.copy_ok(&token, &image, TENANT_B);
        assert_eq!(server.delete(&job_path(&id), Some(&token)).status(), 204);
        id
    };
    let server = lab.serve_with(&[]);
    let job = server.wait_job(&token, &id, Duration::from_secs(30), terminal);
    assert_eq!(job["status"], "canceled");
    assert_eq!(job["copy_progress"], 0);
    assert!(lab.files_in("ot2").is_empty());
    assert!(images_in(&lab, "ot2").is_empty());
}

/// A copy of a 32 MiB image at 4 MiB/s that is past 5 %, with the server running it.
/// `server` is declared first so it stops before the lab's directory goes away.
struct MidCopy {
    server: Server,
    lab: Lab,
    token: String,
    image: String,
    id: String,
}

fn mid_copy() -> MidCopy {
    let (lab, token, image) = lab_with_image(32 * MIB);
    let server = lab.serve_with(&["--max-bandwidth", "4M"]);
    let id = server.copy_ok(&token, &image, TENANT_B);
    server.wait_job(&token, &id, Duration::from_secs(30), |j| {
        j["copy_progress"].as_u64() > Some(5)
    });
    MidCopy {
        server,
        lab,
        token,
        image,
        id,
    }
}

impl MidCopy {
    /// With the first server gone, a new one ends the interrupted copy replicated: a faithful
    /// copy and nothing else in ot2.
    fn assert_resumes_on_restart(&self) {
        let server = self.lab.serve_with(&[]);
        let job = server.wait_job(&self.token, &self.id, Duration::from_secs(60), terminal);
        assert_eq!(job["status"], "replicated");
        assert_faithful_copy(&self.lab, &job, &self.image);
    }
}

#[test]
fn kill_9_mid_copy_then_restart_ends_replicated_without_strays() {
    let mut copy = mid_copy();
    copy.server.kill_9();
    assert!(
        copy.lab
            .files_in("ot2")
            .iter()
            .any(|f| f.ends_with(".part")),
        "the crash should have left a partial file"
    );
    copy.assert_resumes_on_restart();
}

#[test]
fn sigterm_mid_copy_exits_quickly_and_the_copy_resumes_on_restart() {
    let mut copy = mid_copy();
    let asked = Instant::now();
    assert!(
        copy.server.stop(),
        "the server did not exit within 10 s of SIGTERM"
    );
    assert!(asked.elapsed() < Duration::from_secs(10));
    assert_eq!(
        copy.lab.ok_json(&["job", "show", &copy.id])["status"],
        "replicating",
        "a paused copy stays resumable"
    );
    copy.assert_resumes_on_restart();
}

#[test]
fn a_source_changed_after_import_ends_in_error_leaving_nothing() {
    let (lab, token, image) = lab_with_image(4 * MIB);
    let path = lab.region_dir("ot1").join(&image);
    let mut bytes = std::fs::read(&path).expect("source");
    bytes[12345] ^= 0xff;
    std::fs::write(&path, bytes).expect("tamper");
    let server = lab.serve_with(&[]);
    let id = server.copy_ok(&token, &image, TENANT_B);
    let job = server.wait_job(&token, &id, Duration::from_secs(30), terminal);
    assert_eq!(job["status"], "error");
    assert_eq!(job["destination_image_id"], Value::Null);
    let shown = lab.ok(&["job", "show", &id]);
    assert!(shown.contains("changed since it was recorded"), "{shown}");
    assert!(lab.files_in("ot2").is_empty());
    assert!(images_in(&lab, "ot2").is_empty());
}

#[test]
fn a_missing_source_file_ends_in_error_with_the_reason() {
    let (lab, token, image) = lab_with_image(MIB);
    std::fs::remove_file(lab.region_dir("ot1").join(&image)).expect("remove source");
    let server = lab.serve_with(&[]);
    let id = server.copy_ok(&token, &image, TENANT_B);
    let job = server.wait_job(&token, &id, Duration::from_secs(30), terminal);
    assert_eq!(job["status"], "error");
    let shown = lab.ok_json(&["job", "show", &id]);
    let reason = shown["error"].as_str().expect("reason");
    assert!(reason.contains("is missing"), "{reason}");
    assert!(lab.files_in("ot2").is_empty());
}

#[test]
fn an_unwritable_destination_ends_in_error_saying_so() {
    let (lab, token, image) = lab_with_image(MIB);
    let id = {
        let server = lab.serve();
        server.copy_ok(&token, &image, TENANT_B)
    };
    let ot2 = lab.region_dir("ot2");
    std::fs::set_permissions(&ot2, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    let server = lab.serve_with(&[]);
    let job = server.wait_job(&token, &id, Duration::from_secs(30), terminal);
    std::fs::set_permissions(&ot2, std::fs::Permissions::from_mode(0o755)).expect("chmod back");
    assert_eq!(job["status"], "error");
    let shown = lab.ok(&["job", "show", &id]);
    assert!(shown.contains("not writable"), "{shown}");
    assert!(lab.files_in("ot2").is_empty());
    assert!(images_in(&lab, "ot2").is_empty());
}

#[test]
fn cancel_racing_completion_ends_in_one_consistent_terminal_state() {
    let (lab, token, image) = lab_with_image(2 * MIB);
    let server = lab.serve_with(&["--workers", "3"]);
    let mut outcomes = Vec::new();
    for round in 0..24u64 {
        let id = server.copy_ok(&token, &image, TENANT_B);
        std::thread::sleep(Duration::from_millis(round % 8));
        let cancel = server.delete(&job_path(&id), Some(&token)).status();
        let job = server.wait_job(&token, &id, Duration::from_secs(30), terminal);
        match (cancel.as_u16(), job["status"].as_str()) {
            (204, Some("canceled")) => assert_eq!(job["destination_image_id"], Value::Null),
            (409, Some("replicated")) => {
                let dst = job["destination_image_id"].as_str().expect("destination");
                assert_eq!(image_json(&lab, dst)["status"], "active");
                assert!(lab.region_dir("ot2").join(dst).is_file());
            }
            other => panic!("inconsistent outcome {other:?} for job {job}"),
        }
        outcomes.push(job["status"].as_str().unwrap_or_default().to_string());
    }
    // Every file left in ot2 belongs to a replicated job's active image, and vice versa.
    let active: Vec<String> = images_in(&lab, "ot2")
        .iter()
        .map(|i| {
            assert_eq!(i["status"], "active");
            i["id"].as_str().expect("id").to_string()
        })
        .collect();
    assert_eq!(lab.files_in("ot2").len(), active.len());
    let replicated = outcomes.iter().filter(|s| *s == "replicated").count();
    assert_eq!(replicated, active.len());
}

#[test]
fn a_sparse_image_stays_sparse_with_the_same_size_and_hashes() {
    let (lab, token) = Lab::standard_with_copier();
    let raw = lab.dir.path().join("sparse.raw");
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::create(&raw).expect("create");
        file.set_len(64 * MIB as u64).expect("set_len");
        for i in 0..8u64 {
            file.write_all_at(&vec![0xab; 256 * 1024], i * 8 * MIB as u64 + 4096)
                .expect("write data");
        }
    }
    let image = lab
        .ok(&[
            "image",
            "import",
            raw.to_str().expect("path"),
            "--tenant",
            TENANT_A,
            "--name",
            "sparse",
        ])
        .trim()
        .to_string();
    let server = lab.serve_with(&[]);
    let id = server.copy_ok(&token, &image, TENANT_B);
    let job = server.wait_job(&token, &id, Duration::from_secs(60), terminal);
    assert_eq!(job["status"], "replicated");
    assert_faithful_copy(&lab, &job, &image);
    let dst = job["destination_image_id"].as_str().expect("destination");
    let src_meta = std::fs::metadata(lab.region_dir("ot1").join(&image)).expect("src");
    let dst_meta = std::fs::metadata(lab.region_dir("ot2").join(dst)).expect("dst");
    assert_eq!(dst_meta.len(), 64 * MIB as u64);
    assert!(
        dst_meta.blocks() <= src_meta.blocks(),
        "destination allocates {} blocks, source {}",
        dst_meta.blocks(),
        src_meta.blocks()
    );
    assert!(
        dst_meta.blocks() * 512 < 8 * MIB as u64,
        "holes were filled"
    );
}

#[test]
fn the_bandwidth_cap_is_global_across_three_concurrent_copies() {
    let (lab, token) = Lab::standard_with_copier();
    let images: Vec<String> = (0..3)
        .map(|i| lab.image(TENANT_A, &format!("disk{i}"), 8 * MIB))
        .collect();
    let server = lab.serve_with(&["--workers", "3", "--max-bandwidth", "8M"]);
    let started = Instant::now();
    let ids: Vec<String> = images
        .iter()
        .map(|image| server.copy_ok(&token, image, TENANT_B))
        .collect();
    for id in &ids {
        let job = server.wait_job(&token, id, Duration::from_secs(60), terminal);
        assert_eq!(job["status"], "replicated");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rate = (24 * MIB) as f64 / elapsed / MIB as f64;
    assert!(
        (8.0 * 0.85..=8.0 * 1.15).contains(&rate),
        "3 copies of 8 MiB under an 8 MiB/s cap ran at {rate:.2} MiB/s ({elapsed:.2} s)"
    );
}

#[test]
fn job_watch_prints_progress_lines_until_the_job_ends() {
    let (lab, token, image) = lab_with_image(16 * MIB);
    let server = lab.serve_with(&["--max-bandwidth", "8M"]);
    let id = server.copy_ok(&token, &image, TENANT_B);
    let out = lab.ok(&["job", "watch", &id]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.len() >= 2, "expected several progress lines: {out}");
    assert!(lines.iter().all(|l| l.starts_with(&id)), "{out}");
    let percents: Vec<u64> = lines
        .iter()
        .filter_map(|l| l.split_whitespace().nth(2)?.strip_suffix('%')?.parse().ok())
        .collect();
    assert!(percents.windows(2).all(|w| w[0] <= w[1]), "{out}");
    assert!(
        lines.iter().any(|l| l.contains("/s eta ")),
        "no rate/ETA shown: {out}"
    );
    assert_eq!(
        lines.last().copied(),
        Some(format!("{id} replicated 100%").as_str())
    );
    // Watching everything with nothing running ends at once.
    assert_eq!(lab.ok(&["job", "watch"]), "no active jobs\n");
}

#[test]
fn job_watch_needs_a_running_server() {
    let (lab, _, _) = lab_with_image(MIB);
    let err = lab.fails(&["job", "watch"]);
    assert!(err.contains("no server is running"), "{err}");
}

#[test]
fn the_demo_works_on_first_run_and_again_on_the_same_data() {
    let lab = Lab::new();
    let reference: Value =
        serde_json::from_str(include_str!("data/reference_jobs.json")).expect("reference");
    let demo_token = "f4328bab05ff4502b397b88657baaefd";
    let id = {
        // Without the demo's cap on copies (256K: 32 s for this image).
        let server = lab.serve_with(&["--demo", "--max-bandwidth", "1G"]);
        assert_eq!(
            Value::Array(jobs(server.get(JOBS, Some(demo_token)))),
            reference
        );
        let id = server.copy_ok(demo_token, "335eef3f-551d-46e1-8781-173f43209d48", TENANT_B);
        let job = server.wait_job(demo_token, &id, Duration::from_secs(30), terminal);
        assert_eq!(job["status"], "replicated");
        id
    };
    let server = lab.serve_with(&["--demo"]);
    let listed = jobs(server.get(JOBS, Some(demo_token)));
    assert_eq!(listed.len(), 4, "a second demo start adds nothing");
    assert_eq!(listed[3]["job_id"], id.as_str());
    assert_eq!(images_in(&lab, "ot1").len(), 2);
}

#[test]
fn a_seeded_destination_image_id_is_never_reused_or_removed() {
    let (lab, token, image) = lab_with_image(MIB);
    let bystander = lab.image(TENANT_B, "bystander", MIB);
    let seed = |job_id: &str, status: &str| {
        serde_json::json!([{
            "copy_progress": 0,
            "destination_image_id": bystander,
            "destination_region_id": "ot2",
            "destination_tenant_id": TENANT_B,
            "job_id": job_id,
            "source_image_id": image,
            "source_image_name": "disk",
            "source_region_id": "ot1",
            "source_tenant_id": TENANT_A,
            "status": status,
        }])
        .to_string()
    };
    let canceled = "11111111-2222-4333-8444-555555555555";
    let copied = "66666666-7777-4888-9999-aaaaaaaaaaaa";
    for (id, status) in [(canceled, "replicate_requested"), (copied, "replicating")] {
        let out = lab.cli_stdin(
            &["job", "seed", "-", "--enqueue"],
            Some(seed(id, status).as_bytes()),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let server = lab.serve_with(&[]);
    // Whichever the worker reaches first, the cancel must not touch the bystander.
    let _ = server.delete(&job_path(canceled), Some(&token));
    let first = server.wait_job(&token, canceled, Duration::from_secs(30), terminal);
    let second = server.wait_job(&token, copied, Duration::from_secs(30), terminal);
    assert!(matches!(
        first["status"].as_str(),
        Some("canceled" | "replicated")
    ));
    assert_eq!(second["status"], "replicated");
    assert_ne!(second["destination_image_id"], bystander.as_str());
    let kept = image_json(&lab, &bystander);
    assert_eq!(kept["status"], "active");
    assert_eq!(kept["name"], "bystander");
    let bytes = std::fs::read(lab.region_dir("ot2").join(&bystander)).expect("bystander bytes");
    assert_eq!(bytes.len(), MIB);
}
