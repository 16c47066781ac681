//! Room and quotas: the free-space reserve of every file system the appliance writes
//! (`serve --min-free`), copies refused when their destination lacks room, copies that run
//! out of space while writing waiting for room, and tenant quotas of stored bytes and of
//! active jobs (413, as Glance answers an upload over its quota).
//!
//! The small file systems are tmpfs mounts the tests make themselves (root only; without
//! root the tests say SKIPPED and pass).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::Value;

const MIB: usize = 1 << 20;

/// Regions ot1 (on the lab's disk) and ot2 (on a tmpfs of `size`); tenant A in ot1, B in
/// ot2; alice2, a member of both; her token for A.
fn lab_with_small_destination(size: &str) -> Option<(Lab, Tmpfs, String)> {
    let lab = Lab::new();
    let fs = Tmpfs::mount(&lab.dir.path().join("ot2"), size)?;
    lab.ok(&["region", "add", "ot1"]);
    lab.ok(&["region", "add", "ot2", "--dir", fs.path.to_str().unwrap()]);
    lab.ok(&["tenant", "add", TENANT_A, "--region", "ot1"]);
    lab.ok(&["tenant", "add", TENANT_B, "--region", "ot2"]);
    lab.ok(&[
        "user", "add", "alice2", "--tenant", TENANT_A, "--tenant", TENANT_B,
    ]);
    let token = lab.token("alice2", TENANT_A);
    Some((lab, fs, token))
}

fn dst_files(fs: &Tmpfs) -> Vec<String> {
    names_in(&fs.path).into_iter().collect()
}

fn wait_end(server: &Server, token: &str, id: &str) -> Value {
    server.wait_job(token, id, Duration::from_secs(60), terminal)
}

/// The destination image of a replicated job holds the source's bytes.
fn assert_copied(lab: &Lab, fs: &Tmpfs, job: &Value, source: &str) {
    assert_eq!(job["status"], "replicated", "{job}");
    let dst = job["destination_image_id"].as_str().unwrap();
    let copy = std::fs::read(fs.path.join(dst)).unwrap();
    let original = std::fs::read(lab.region_dir("ot1").join(source)).unwrap();
    assert!(copy == original, "copy {dst} differs from its source");
}

/// With the default reserve (at least 64 MiB) nothing fits on a 24 MiB file system: the copy
/// is refused at POST with a 409 saying so, and nothing is written.
#[test]
fn a_copy_without_room_for_its_size_plus_the_reserve_is_refused_with_409() {
    let Some((lab, fs, token)) = lab_with_small_destination("24m") else {
        return;
    };
    let image = lab.image(TENANT_A, "one", MIB);
    let server = lab.serve_with(&["--workers", "2"]);
    let body = assert_error(server.copy(&token, &image, TENANT_B), 409);
    assert_eq!(
        body,
        format!(
            "Region ot2 has no room for image {image}: the image needs 1 MiB, and its file system has 24 MiB free, with 64 MiB kept free as the reserve (serve --min-free)."
        )
    );
    assert!(dst_files(&fs).is_empty());
    assert!(jobs(server.get(JOBS, Some(&token))).is_empty(), "no job");
}

/// `--min-free 8M` on a 24 MiB file system: 16 MiB are for copies, the rest is refused.
#[test]
fn min_free_8m_is_honoured_on_a_24_mib_file_system() {
    let Some((lab, fs, token)) = lab_with_small_destination("24m") else {
        return;
    };
    let fifteen = lab.image(TENANT_A, "fifteen", 15 * MIB);
    let two = lab.image(TENANT_A, "two", 2 * MIB);
    let one = lab.image(TENANT_A, "one", MIB);
    let server = lab.serve_with(&["--min-free", "8M"]);
    let id = server.copy_ok(&token, &fifteen, TENANT_B);
    assert_copied(&lab, &fs, &wait_end(&server, &token, &id), &fifteen);
    // 9 MiB are free: 2 MiB would go into the reserve.
    let body = assert_error(server.copy(&token, &two, TENANT_B), 409);
    assert!(
        body.contains("needs 2 MiB") && body.contains("with 8 MiB kept free as the reserve"),
        "{body}"
    );
    let id = server.copy_ok(&token, &one, TENANT_B);
    assert_copied(&lab, &fs, &wait_end(&server, &token, &id), &one);
    assert_eq!(dst_files(&fs).len(), 2, "{:?}", dst_files(&fs));
}

/// Two copies that each fit alone but not together, asked for at the same moment, 7 times:
/// one is replicated, the other refused with a 409 (the first one's bytes are promised),
/// never a half-written image or a 5xx.
#[test]
fn two_copies_that_fit_alone_but_not_together_end_cleanly() {
    let Some((lab, fs, token)) = lab_with_small_destination("24m") else {
        return;
    };
    let images: Vec<String> = (0..2)
        .map(|i| lab.image(TENANT_A, &format!("big{i}"), 14 * MIB))
        .collect();
    let server = lab.serve_with(&["--min-free", "4M", "--workers", "2"]);
    let (mut replicated, mut refused) = (0, 0);
    for _ in 0..7 {
        let answers: Vec<(u16, String)> = std::thread::scope(|s| {
            let posts: Vec<_> = images
                .iter()
                .map(|image| {
                    let (server, token) = (&server, &token);
                    s.spawn(move || {
                        let resp = server.copy(token, image, TENANT_B);
                        (resp.status().as_u16(), resp.text().unwrap())
                    })
                })
                .collect();
            posts.into_iter().map(|p| p.join().unwrap()).collect()
        });
        let mut ended = Vec::new();
        for ((status, body), image) in answers.iter().zip(&images) {
            match status {
                202 => {
                    let id: Value = serde_json::from_str(body).unwrap();
                    let job = wait_end(&server, &token, id["job_id"].as_str().unwrap());
                    assert_copied(&lab, &fs, &job, image);
                    ended.push(job["destination_image_id"].as_str().unwrap().to_string());
                    replicated += 1;
                }
                409 => {
                    let sentence = error_sentence(body, 409);
                    assert!(sentence.contains("has no room"), "{sentence}");
                    refused += 1;
                }
                other => panic!("answered {other}: {body}"),
            }
        }
        assert_eq!(ended.len(), 1, "exactly one of the two fits: {answers:?}");
        assert_eq!(dst_files(&fs), ended, "only the complete copy is there");
        lab.ok(&["image", "delete", &ended[0]]);
        assert!(dst_files(&fs).is_empty());
    }
    figures(
        "two_copies_that_do_not_fit_together",
        &[
            ("runs", "7".into()),
            ("replicated", replicated.to_string()),
            ("refused_409", refused.to_string()),
            ("half_written", "0".into()),
        ],
    );
}

/// A copy whose destination runs out of space while it writes (another writer filled the
/// file system) waits for room instead of failing, and completes once space is back.
#[test]
fn a_copy_that_runs_out_of_space_waits_and_completes_once_space_is_back() {
    let Some((lab, fs, token)) = lab_with_small_destination("24m") else {
        return;
    };
    let image = lab.image(TENANT_A, "eight", 8 * MIB);
    let server = lab.serve_with(&["--min-free", "0", "--max-bandwidth", "2M"]);
    let id = server.copy_ok(&token, &image, TENANT_B);
    server.wait_job(&token, &id, Duration::from_secs(30), |j| {
        j["copy_progress"].as_u64().unwrap_or(0) > 0
    });
    let filler: PathBuf = fs.path.join("filler");
    fs.fill(&filler);
    poll(
        "the copy to meet the full disk",
        Duration::from_secs(30),
        || {
            server
                .log_text()
                .contains("no room at the destination")
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let job = server.job(&token, &id);
    assert!(!terminal(&job), "the copy gave up: {job}");
    std::fs::remove_file(&filler).unwrap();
    let job = wait_end(&server, &token, &id);
    assert_copied(&lab, &fs, &job, &image);
    assert_eq!(dst_files(&fs).len(), 1, "{:?}", dst_files(&fs));
}

/// `--min-free` holds on the store's own file system too: while it is short of the reserve,
/// new jobs are refused with a 507 naming the full disk (the store itself is never driven
/// into ENOSPC), and accepted again once space is freed.
#[test]
fn new_jobs_are_refused_while_the_store_disk_is_below_its_reserve() {
    let lab = Lab::new();
    let Some(fs) = Tmpfs::mount(&lab.data_dir(), "24m") else {
        return;
    };
    let token = lab.copier();
    let image = lab.image(TENANT_A, "base", 4096);
    let server = lab.serve_with(&["--no-worker", "--min-free", "8M"]);
    server.copy_ok(&token, &image, TENANT_B);
    // Leave 4 MiB free: below the reserve, far from full.
    let free = free_bytes(&fs.path);
    let filler = fs.path.join("filler");
    std::fs::write(&filler, vec![1u8; free as usize - 4 * MIB]).unwrap();
    let body = assert_error(server.copy(&token, &image, TENANT_B), 507);
    assert!(
        body.contains("disk is full") && body.contains("reserve of 8 MiB"),
        "{body}"
    );
    assert_eq!(
        server.get("/healthz", None).status(),
        200,
        "the store writes"
    );
    std::fs::remove_file(&filler).unwrap();
    server.copy_ok(&token, &image, TENANT_B);
}

/// `--quota-jobs`: a tenant with 2 jobs queued or copying gets a 413 naming the quota for a
/// third; once they end it may ask again, and a raised quota takes effect at once.
#[test]
fn a_tenant_over_its_quota_of_active_jobs_gets_413_until_its_jobs_end() {
    let (lab, token) = Lab::standard_with_copier();
    let image = lab.image(TENANT_A, "two", 2 * MIB);
    lab.ok(&["tenant", "update", TENANT_A, "--quota-jobs", "2"]);
    let server = lab.serve_with(&["--max-bandwidth", "1M", "--min-free", "0"]);
    let first = server.copy_ok(&token, &image, TENANT_B);
    let second = server.copy_ok(&token, &image, TENANT_B);
    let body = assert_error(server.copy(&token, &image, TENANT_B), 413);
    assert_eq!(
        body,
        format!("Tenant {TENANT_A} is over its quota of 2 active jobs: 2 of its jobs are queued or copying; new ones are accepted once some end or are canceled.")
    );
    for id in [&first, &second] {
        assert_eq!(wait_end(&server, &token, id)["status"], "replicated");
    }
    let third = server.copy_ok(&token, &image, TENANT_B);
    lab.ok(&["tenant", "update", TENANT_A, "--quota-jobs", "3"]);
    server.copy_ok(&token, &image, TENANT_B);
    server.copy_ok(&token, &image, TENANT_B);
    assert_error(server.copy(&token, &image, TENANT_B), 413);
    lab.ok(&["tenant", "update", TENANT_A, "--quota-jobs", "none"]);
    server.copy_ok(&token, &image, TENANT_B);
    wait_end(&server, &token, &third);
}

/// `--quota-bytes`: the destination tenant's images and the copies into it under way count;
/// a copy that would go over answers 413 naming the quota, and is accepted again once an
/// image is deleted or the quota is raised.
#[test]
fn a_tenant_over_its_quota_of_stored_bytes_gets_413_until_images_are_deleted() {
    let (lab, token) = Lab::standard_with_copier();
    let image = lab.image(TENANT_A, "two", 2 * MIB);
    let server = lab.serve_with(&["--min-free", "0"]);
    lab.ok(&["tenant", "update", TENANT_B, "--quota-bytes", "3M"]);
    let first = server.copy_ok(&token, &image, TENANT_B);
    // The first copy's 2 MiB count while it runs and once it is done.
    let body = assert_error(server.copy(&token, &image, TENANT_B), 413);
    assert!(
        body.starts_with(&format!(
            "Tenant {TENANT_B} is over its quota of 3 MiB stored: it holds 2 MiB"
        )) && body.ends_with("needs 2 MiB more."),
        "{body}"
    );
    let job = wait_end(&server, &token, &first);
    assert_eq!(job["status"], "replicated");
    assert_error(server.copy(&token, &image, TENANT_B), 413);
    lab.ok(&[
        "image",
        "delete",
        job["destination_image_id"].as_str().unwrap(),
    ]);
    let again = server.copy_ok(&token, &image, TENANT_B);
    wait_end(&server, &token, &again);
    assert_error(server.copy(&token, &image, TENANT_B), 413);
    lab.ok(&["tenant", "update", TENANT_B, "--quota-bytes", "10G"]);
    server.copy_ok(&token, &image, TENANT_B);
}

/// `tenant add --quota-…` and `tenant update` work with no server (the CLI opens the store)
/// and through a running one; `tenant list` shows the quotas; `none` clears one.
#[test]
fn tenant_quotas_are_set_listed_and_cleared_with_and_without_a_server() {
    let lab = Lab::new();
    lab.ok(&["region", "add", "ot1"]);
    let added = lab.ok_json(&[
        "tenant",
        "add",
        TENANT_A,
        "--region",
        "ot1",
        "--quota-bytes",
        "10G",
        "--quota-jobs",
        "20",
    ]);
    assert_eq!(added["quota_bytes"], 10u64 << 30);
    assert_eq!(added["quota_jobs"], 20);
    let table = lab.ok(&["tenant", "list"]);
    assert!(table.starts_with("ID  "), "{table}");
    assert!(table.contains("QUOTA-BYTES") && table.contains("QUOTA-JOBS"));
    let row = table.lines().find(|l| l.starts_with(TENANT_A)).unwrap();
    assert!(row.ends_with("10 GiB       20"), "{row:?}");

    let out = lab.ok(&["tenant", "update", TENANT_A, "--quota-bytes", "none"]);
    assert_eq!(out, format!("tenant {TENANT_A} updated\n"));
    let listed = lab.ok_json(&["tenant", "list"]);
    assert_eq!(listed[0]["quota_bytes"], Value::Null);
    assert_eq!(listed[0]["quota_jobs"], 20);

    let _server = lab.serve();
    lab.ok(&["tenant", "update", TENANT_A, "--quota-jobs", "5"]);
    lab.ok(&["tenant", "update", TENANT_A, "--quota-bytes", "512K"]);
    let listed = lab.ok_json(&["tenant", "list"]);
    assert_eq!(listed[0]["quota_bytes"], 512 * 1024);
    assert_eq!(listed[0]["quota_jobs"], 5);
    let err = lab.fails(&["tenant", "update", TENANT_A]);
    assert!(
        err.contains("tenant update needs --quota-bytes or --quota-jobs"),
        "{err}"
    );
    let err = lab.fails(&["tenant", "update", TENANT_B, "--quota-jobs", "1"]);
    assert!(err.contains(&format!("no tenant {TENANT_B}")), "{err}");
    let err = lab.fails(&["tenant", "update", TENANT_A, "--quota-bytes", "lots"]);
    assert!(err.contains("'lots' is not a size"), "{err}");
}

/// The scenario: the default layout (store and regions on one file system) on a
/// 64 MiB tmpfs, 18 copies of a 4 MiB image asked for at once. What does not fit beside the
/// reserve is refused with a 409; the rest is replicated; nothing is half-written, the store
/// keeps writing and the appliance stays healthy.
#[test]
fn eighteen_copies_into_a_64_mib_disk_leave_the_reserve_and_nothing_half_written() {
    let lab = Lab::new();
    let Some(fs) = Tmpfs::mount(&lab.data_dir(), "64m") else {
        return;
    };
    let token = lab.copier();
    let image = lab.image(TENANT_A, "four", 4 * MIB);
    let server = lab.serve_with(&["--min-free", "8M", "--workers", "2"]);
    let started = std::time::Instant::now();
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let posts: Vec<_> = (0..18)
            .map(|_| {
                let (server, token, image) = (&server, &token, &image);
                s.spawn(move || {
                    let resp = server.copy(token, image, TENANT_B);
                    (resp.status().as_u16(), resp.text().unwrap())
                })
            })
            .collect();
        posts.into_iter().map(|p| p.join().unwrap()).collect()
    });
    let mut accepted = Vec::new();
    let mut refused = 0;
    for (status, body) in &answers {
        match status {
            202 => {
                let job: Value = serde_json::from_str(body).unwrap();
                accepted.push(job["job_id"].as_str().unwrap().to_string());
            }
            409 => {
                assert!(error_sentence(body, 409).contains("has no room"), "{body}");
                refused += 1;
            }
            other => panic!("answered {other}: {body}"),
        }
    }
    for id in &accepted {
        assert_eq!(wait_end(&server, &token, id)["status"], "replicated");
    }
    let elapsed = started.elapsed();
    let files = lab.files_in("ot2");
    assert_eq!(files.len(), accepted.len(), "{files:?}");
    assert!(files.iter().all(|f| !f.starts_with('.')), "{files:?}");
    assert!(refused > 0 && !accepted.is_empty(), "{answers:?}");
    let free = free_bytes(&fs.path);
    assert!(
        free >= 8 * MIB as u64,
        "the reserve was used: {free} bytes free"
    );
    assert_eq!(server.get("/healthz", None).status(), 200);
    lab.ok(&["tenant", "update", TENANT_B, "--quota-jobs", "5"]);
    figures(
        "eighteen_copies_into_64_mib",
        &[
            ("replicated", accepted.len().to_string()),
            ("refused_409", refused.to_string()),
            ("half_written", "0".into()),
            ("free_after_mib", (free >> 20).to_string()),
            ("seconds", format!("{:.1}", elapsed.as_secs_f64())),
        ],
    );
}
