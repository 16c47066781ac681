//! Day two (issue 17, items 1-6): a job's story over HTTP (detail, 401 causes in the log,
//! retries) and the lifecycle of the records (purge, user update, backup and restore), each
//! through the real binary on a temporary data directory.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

const MIB: usize = 1 << 20;

/// The ten keys of the job object, in wire order.
use image_replicator::model::JOB_KEYS as TEN;

/// What the detail adds after the ten keys, in order.
const MORE: [&str; 10] = [
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
    "bytes_done",
    "bytes_total",
    "rate_bytes_per_s",
    "error",
    "retries",
    "resumes",
];

fn detail_path(id: &str) -> String {
    format!("{JOBS}/{id}/detail")
}

fn detail(server: &Server, token: &str, id: &str) -> Value {
    serde_json::from_str(&detail_text(server, token, id)).expect("detail JSON")
}

/// The detail's body as sent.
fn detail_text(server: &Server, token: &str, id: &str) -> String {
    let resp = server.get(&detail_path(id), Some(token));
    assert_eq!(resp.status(), 200, "detail of {id}: {:?}", resp.text());
    assert_eq!(
        resp.headers()["content-type"],
        "application/json; charset=UTF-8"
    );
    resp.text().expect("detail body")
}

/// The top-level keys of a JSON object's text, in the order it has them.
fn keys_in_order(text: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut de = serde_json::Deserializer::from_str(text);
    struct Keys<'a>(&'a mut Vec<String>);
    impl<'de> serde::de::Visitor<'de> for Keys<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<String>()? {
                self.0.push(key);
                map.next_value::<serde::de::IgnoredAny>()?;
            }
            Ok(())
        }
    }
    serde::Deserializer::deserialize_map(&mut de, Keys(&mut keys)).expect("a JSON object");
    keys
}

fn retry(server: &Server, token: &str, id: &str) -> reqwest::blocking::Response {
    server
        .client
        .post(server.url(&format!("{JOBS}/{id}/retry")))
        .header("X-Auth-Token", token)
        .send()
        .expect("POST retry")
}

/// A lab with the standard tenants, alice2's token (A and B) and an image of `size` bytes.
fn lab_with_image(size: usize) -> (Lab, String, String) {
    let (lab, token) = Lab::standard_with_copier();
    let image = lab.image(TENANT_A, "disk", size);
    (lab, token, image)
}

/// A job in the list-response format, of tenant A into `dst` (in ot2), with `status`.
fn seed_job(status: &str, dst: &str) -> Value {
    serde_json::json!({
        "copy_progress": 0,
        "destination_image_id": null,
        "destination_region_id": "ot2",
        "destination_tenant_id": dst,
        "job_id": uuid::Uuid::new_v4().to_string(),
        "source_image_id": uuid::Uuid::new_v4().to_string(),
        "source_image_name": "seeded",
        "source_region_id": "ot1",
        "source_tenant_id": TENANT_A,
        "status": status,
    })
}

// ----- 1. the job's detail -----

#[test]
fn job_detail_shows_the_ten_keys_unchanged_then_times_bytes_and_a_live_rate() {
    let (lab, token, image) = lab_with_image(16 * MIB);
    let server = lab.serve_with(&["--max-bandwidth", "4M"]);
    let id = server.copy_ok(&token, &image, TENANT_B);
    let queued = detail_text(&server, &token, &id);
    let keys: Vec<&str> = TEN.iter().chain(MORE.iter()).copied().collect();
    assert_eq!(keys_in_order(&queued), keys);
    let running = poll("a measured rate", Duration::from_secs(30), || {
        let d = detail(&server, &token, &id);
        (d["status"] == "replicating" && d["rate_bytes_per_s"].is_u64()).then_some(d)
    });
    let rate = running["rate_bytes_per_s"].as_u64().expect("rate");
    assert!(
        (MIB as u64..=8 * MIB as u64).contains(&rate),
        "a copy capped at 4 MiB/s measured {rate} bytes/s"
    );
    assert!(running["started_at"].is_string());
    assert_eq!(running["finished_at"], Value::Null);
    assert_eq!(running["bytes_total"], 16 * MIB);
    assert!(running["bytes_done"].as_u64() > Some(0));
    assert_eq!(running["error"], Value::Null);
    // The show route's object is still exactly the ten keys.
    let shown = server
        .get(&job_path(&id), Some(&token))
        .text()
        .expect("show");
    assert_eq!(keys_in_order(&shown), TEN.to_vec());
    let done = server.wait_job(&token, &id, Duration::from_secs(30), terminal);
    assert_eq!(done["status"], "replicated");
    let ended = detail(&server, &token, &id);
    for key in TEN {
        assert_eq!(ended[key], done[key], "{key}");
    }
    assert_eq!(ended["bytes_done"], 16 * MIB);
    let (started, finished) = (epoch(&ended["started_at"]), epoch(&ended["finished_at"]));
    assert!(started >= epoch(&ended["created_at"]) && finished >= started);
    assert!(
        finished - started >= 2,
        "16 MiB at 4 MiB/s took {}",
        finished - started
    );
    assert!(ended["rate_bytes_per_s"].as_u64() > Some(0));
    assert_eq!(
        (ended["retries"].as_u64(), ended["resumes"].as_u64()),
        (Some(0), Some(0))
    );
}

#[test]
fn job_detail_of_a_failed_copy_says_why_and_is_scoped_like_the_job() {
    let (lab, token, image) = lab_with_image(MIB);
    std::fs::remove_file(lab.region_dir("ot1").join(&image)).expect("remove the source");
    let bob = lab.token("bob", TENANT_B);
    let server = lab.serve_with(&[]);
    let id = server.copy_ok(&token, &image, TENANT_B);
    server.wait_job(&token, &id, Duration::from_secs(30), terminal);
    let failed = detail(&server, &token, &id);
    assert_eq!(failed["status"], "error");
    let reason = failed["error"].as_str().expect("the reason");
    assert!(reason.contains("is missing"), "{reason}");
    // A tenant is not told where the appliance keeps its files; an admin, and the CLI, are.
    let data_dir = lab.data_dir().display().to_string();
    assert!(
        reason.ends_with("is missing (<path on the appliance>)"),
        "{reason}"
    );
    let root = lab.token("root", TENANT_A);
    let whole = detail(&server, &root, &id)["error"].clone();
    assert!(
        whole.as_str().expect("the reason").contains(&data_dir),
        "{whole}"
    );
    assert_eq!(lab.ok_json(&["job", "show", &id])["error"], whole);
    assert!(failed["finished_at"].is_string());
    assert_eq!(failed["rate_bytes_per_s"], Value::Null);
    // Another tenant's job, an id that is no job, no token: what the show route answers.
    for path in [detail_path(&id), job_path(&id)] {
        assert_error(server.get(&path, Some(&bob)), 404);
        assert_401(server.get(&path, None));
    }
    let stranger = uuid::Uuid::new_v4().to_string();
    assert_error(server.get(&detail_path(&stranger), Some(&token)), 404);
    assert_error(server.get(&detail_path("not-a-uuid"), Some(&token)), 404);
    let resp = server.delete(&detail_path(&id), Some(&token));
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET");
}

#[test]
fn job_detail_of_a_seeded_job_has_null_times_it_never_had() {
    let lab = Lab::new();
    lab.standard();
    let job = seed_job("replicated", TENANT_B);
    lab.seed_jobs(std::slice::from_ref(&job));
    let root = lab.token("root", TENANT_A);
    let server = lab.serve();
    let id = job["job_id"].as_str().expect("id");
    let seen = detail(&server, &root, id);
    for key in TEN {
        assert_eq!(seen[key], job[key], "{key}");
    }
    assert_eq!(seen["started_at"], Value::Null);
    assert_eq!(seen["finished_at"], Value::Null);
    assert!(seen["created_at"].is_string());
}

// ----- 2. why a 401 -----

#[test]
fn a_401_for_a_tenant_the_user_is_not_a_member_of_logs_the_cause_never_the_token() {
    let f = Fixture::new();
    let resp = f.server.copy(&f.alice, &f.img_a, TENANT_B);
    let cause = "not a member of the destination tenant";
    assert_401_logged(&f.server, resp, cause, &f.alice);
    let log = f.server.log_text();
    for token in [&f.alice, &f.bob, &f.carol, &f.root] {
        assert!(!log.contains(token.as_str()), "a token is in the log");
    }
}

#[test]
fn a_401_for_an_expired_revoked_or_unknown_token_logs_which() {
    let lab = Lab::new();
    lab.standard();
    let expiring = lab
        .ok(&issue_args("alice", TENANT_A, &["--expires-in", "1s"]))
        .trim()
        .to_string();
    let revoked = lab.token("bob", TENANT_B);
    let list = lab.ok_json(&["token", "list"]);
    lab.ok(&["token", "revoke", &token_id_of(&list, "bob")]);
    let server = lab.serve();
    std::thread::sleep(Duration::from_millis(2100));
    let unknown = "0123456789abcdef0123456789abcdef";
    for (token, cause) in [
        (expiring.as_str(), "expired token"),
        (revoked.as_str(), "revoked token"),
        (unknown, "unknown token"),
        ("short", "cannot be a token"),
    ] {
        assert_401_logged(&server, server.get(JOBS, Some(token)), cause, token);
    }
}

// ----- 3. retry -----

#[test]
fn a_retry_of_a_failed_job_copies_again_as_a_new_job_with_one_more_retry() {
    let (lab, token, image) = lab_with_image(2 * MIB);
    let source = lab.region_dir("ot1").join(&image);
    let kept = lab.dir.path().join("source-copy");
    std::fs::copy(&source, &kept).expect("keep the source");
    std::fs::remove_file(&source).expect("remove the source");
    let bob = lab.token("bob", TENANT_B);
    let server = lab.serve_with(&[]);
    let old = server.copy_ok(&token, &image, TENANT_B);
    let failed = server.wait_job(&token, &old, Duration::from_secs(30), terminal);
    assert_eq!(failed["status"], "error");
    // Another tenant does not see the job at all.
    assert_error(retry(&server, &bob, &old), 404);
    std::fs::copy(&kept, &source).expect("put the source back");
    let resp = retry(&server, &token, &old);
    assert_eq!(resp.status(), 202);
    let text = resp.text().expect("the new job");
    assert_eq!(keys_in_order(&text), TEN.to_vec());
    let new: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(new["status"], "replicate_requested");
    assert_ne!(new["job_id"], failed["job_id"]);
    for key in [
        "source_image_id",
        "destination_tenant_id",
        "destination_region_id",
    ] {
        assert_eq!(new[key], failed[key], "{key}");
    }
    let new_id = new["job_id"].as_str().expect("id").to_string();
    let done = server.wait_job(&token, &new_id, Duration::from_secs(30), terminal);
    assert_eq!(done["status"], "replicated");
    assert_eq!(detail(&server, &token, &new_id)["retries"], 1);
    // The old job stays as it was; a second retry of it, and a retry of a replicated job,
    // are 409s that say why.
    assert_eq!(server.job(&token, &old)["status"], "error");
    let again = assert_error(retry(&server, &token, &old), 409);
    assert!(
        again.contains(&format!("retried already as job {new_id}")),
        "{again}"
    );
    let replicated = assert_error(retry(&server, &token, &new_id), 409);
    assert!(
        replicated.contains("only error or canceled jobs can be retried"),
        "{replicated}"
    );
}

#[test]
fn job_retry_on_the_cli_retries_a_canceled_job_while_the_server_runs() {
    let (lab, token, image) = lab_with_image(MIB);
    let server = lab.serve();
    let old = server.copy_ok(&token, &image, TENANT_B);
    // Still queued: not ended, so no retry.
    let refused = lab.fails(&["job", "retry", &old]);
    assert!(refused.contains("has not ended"), "{refused}");
    let resp = retry(&server, &token, &old);
    assert!(assert_error(resp, 409).contains("has not ended"));
    assert_eq!(server.delete(&job_path(&old), Some(&token)).status(), 204);
    drop(server);
    let server = lab.serve_with(&[]);
    server.wait_job(&token, &old, Duration::from_secs(30), status_is("canceled"));
    let new_id = lab.ok(&["job", "retry", &old]).trim().to_string();
    let done = server.wait_job(&token, &new_id, Duration::from_secs(30), terminal);
    assert_eq!(done["status"], "replicated");
    let shown = lab.ok_json(&["job", "show", &new_id]);
    assert_eq!(shown["retries"], 1);
    assert_eq!(shown["retry_of"], old);
    assert_eq!(lab.ok_json(&["job", "show", &old])["retried_by"], new_id);
}

// ----- 4. purge -----

#[test]
fn job_purge_removes_old_terminal_jobs_keeps_lists_and_counts_in_step_and_frees_tenants() {
    let lab = Lab::new();
    lab.standard();
    const TENANT_D: &str = "4b1f0e3c9a7d4e2fb6c58a9d0e1f2a3b";
    lab.ok(&["tenant", "add", TENANT_D, "--region", "ot2"]);
    let (done, failed, running) = (
        seed_job("replicated", TENANT_D),
        seed_job("error", TENANT_B),
        seed_job("replicating", TENANT_B),
    );
    lab.seed_jobs(&[done.clone(), failed.clone(), running.clone()]);
    let root = lab.token("root", TENANT_A);
    let server = lab.serve();
    assert_eq!(all_jobs(&server, &root).len(), 3);
    let pinned = lab.fails(&["tenant", "remove", TENANT_D]);
    assert!(pinned.contains("still named by job"), "{pinned}");
    // Not old enough yet.
    assert_eq!(
        lab.ok(&["job", "purge", "--older-than", "1h"]),
        "0 job(s) purged\n"
    );
    std::thread::sleep(Duration::from_millis(1100));
    let out = lab.ok(&["job", "purge", "--older-than", "1s", "--status", "error"]);
    assert_eq!(out, "1 job(s) purged\n");
    assert_eq!(
        job_ids(&all_jobs(&server, &root)),
        job_ids(&[done.clone(), running.clone()])
    );
    assert_eq!(
        lab.ok(&["job", "purge", "--older-than", "1s"]),
        "1 job(s) purged\n"
    );
    assert_eq!(
        job_ids(&all_jobs(&server, &root)),
        job_ids(std::slice::from_ref(&running))
    );
    assert_error(
        server.get(&job_path(done["job_id"].as_str().expect("id")), Some(&root)),
        404,
    );
    let metrics = server.get("/metrics", None).text().expect("metrics");
    assert!(
        metrics.contains("image_replicator_jobs{status=\"replicating\"} 1"),
        "{metrics}"
    );
    assert!(!metrics.contains("image_replicator_jobs{status=\"replicated\"} 1"));
    assert!(!metrics.contains("image_replicator_jobs{status=\"error\"} 1"));
    lab.ok(&["tenant", "remove", TENANT_D]);
}

#[test]
fn job_purge_refuses_bad_durations_and_unfinished_statuses_with_a_sentence() {
    let lab = Lab::new();
    lab.standard();
    let out = lab.cli(&["job", "purge", "--older-than", "3 fortnights!"]);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("is not a duration such as 30d, 12h, 90m or 45s"),
        "{text}"
    );
    let out = lab.cli(&["job", "purge", "--older-than", "0s"]);
    assert_eq!(out.status.code(), Some(2));
    let refused = lab.fails(&[
        "job",
        "purge",
        "--older-than",
        "30d",
        "--status",
        "replicating",
    ]);
    assert!(
        refused.contains("are not finished and cannot be purged"),
        "{refused}"
    );
    assert_eq!(
        lab.ok(&["job", "purge", "--older-than", "30d"]),
        "0 job(s) purged\n"
    );
}

#[test]
fn serve_job_retention_purges_terminal_jobs_in_the_background() {
    let lab = Lab::new();
    lab.standard();
    let (ended, running) = (
        seed_job("canceled", TENANT_B),
        seed_job("replicating", TENANT_B),
    );
    lab.seed_jobs(&[ended, running.clone()]);
    let root = lab.token("root", TENANT_A);
    let server = lab.serve_with(&["--no-worker", "--job-retention", "1s"]);
    let left = poll("the background purge", Duration::from_secs(10), || {
        let list = all_jobs(&server, &root);
        (list.len() == 1).then_some(list)
    });
    assert_eq!(job_ids(&left), job_ids(&[running]));
    poll("the purge's log line", Duration::from_secs(5), || {
        server
            .log_text()
            .contains("terminal jobs purged")
            .then_some(())
    });
}

// ----- 5. user update -----

#[test]
fn user_update_ends_a_removed_tenants_tokens_at_once_and_keeps_the_others() {
    let f = Fixture::new();
    let carol_b = f.lab.token("carol", TENANT_B);
    assert_eq!(f.server.get(JOBS, Some(&carol_b)).status(), 200);
    let out = f
        .lab
        .ok(&["user", "update", "carol", "--remove-tenant", TENANT_B]);
    assert!(
        out.contains("1 token(s) for removed tenants revoked"),
        "{out}"
    );
    assert_401(f.server.get(JOBS, Some(&carol_b)));
    assert_eq!(f.server.get(JOBS, Some(&f.carol)).status(), 200);
    // Carol may now copy into A, and as an admin she sees every tenant's jobs.
    assert_401(f.server.copy(&f.carol, &f.img_c, TENANT_A));
    f.lab.ok(&[
        "user",
        "update",
        "carol",
        "--add-tenant",
        TENANT_A,
        "--admin",
    ]);
    let job = f.server.copy_ok(&f.carol, &f.img_c, TENANT_A);
    let alices = f.server.copy_ok(&f.alice, &f.img_a, TENANT_A);
    let seen = job_ids(&all_jobs(&f.server, &f.carol));
    assert_eq!(seen, vec![job.clone(), alices.clone()]);
    f.lab.ok(&["user", "update", "carol", "--no-admin"]);
    assert_eq!(job_ids(&all_jobs(&f.server, &f.carol)), vec![job]);
    let users = f.lab.ok_json(&["user", "list"]);
    let carol = users
        .as_array()
        .expect("users")
        .iter()
        .find(|u| u["name"] == "carol")
        .expect("carol");
    assert_eq!(carol["tenants"], serde_json::json!([TENANT_C, TENANT_A]));
    assert_eq!(carol["admin"], false);
}

#[test]
fn user_update_refuses_unknown_names_and_leaving_a_user_without_tenants() {
    let lab = Lab::new();
    lab.standard();
    for (args, says) in [
        (
            vec!["user", "update", "nobody", "--admin"],
            "no user nobody",
        ),
        (
            vec![
                "user",
                "update",
                "alice",
                "--add-tenant",
                "4b1f0e3c9a7d4e2fb6c58a9d0e1f2a3b",
            ],
            "no tenant 4b1f0e3c9a7d4e2fb6c58a9d0e1f2a3b",
        ),
        (
            vec!["user", "update", "alice", "--remove-tenant", TENANT_A],
            "would be left without a tenant",
        ),
        (
            vec!["user", "update", "alice", "--remove-tenant", TENANT_B],
            "is not a member of tenant",
        ),
        (vec!["user", "update", "alice"], "nothing to change"),
    ] {
        let text = lab.fails(&args);
        assert!(text.contains(says), "{args:?}: {text}");
    }
    let out = lab.cli(&["user", "update", "alice", "--admin", "--no-admin"]);
    assert_eq!(out.status.code(), Some(2));
}

// ----- 6. backup and restore -----

/// Copies `from` into `to` recursively (what a file-system backup of a region does).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

#[test]
fn a_backup_taken_mid_copy_restores_into_a_new_data_dir_where_the_copy_finishes() {
    use std::os::unix::fs::PermissionsExt;
    let (lab, token, image) = lab_with_image(32 * MIB);
    lab.seed_jobs(&[
        seed_job("replicated", TENANT_B),
        seed_job("error", TENANT_B),
    ]);
    let mut server = lab.serve_with(&["--max-bandwidth", "4M"]);
    let id = server.copy_ok(&token, &image, TENANT_B);
    server.wait_job(&token, &id, Duration::from_secs(30), |j| {
        j["copy_progress"].as_u64() > Some(10)
    });
    let file = lab.dir.path().join("backup.json");
    let out = lab.ok(&["backup", file.to_str().expect("path")]);
    assert!(
        out.starts_with("backup of 2 region(s), 3 tenant(s), 5 user(s), 1 token(s)"),
        "{out}"
    );
    let mode = std::fs::metadata(&file)
        .expect("backup")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let backup: Value = serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("JSON");
    assert_eq!(
        (backup["format"].as_str(), backup["version"].as_u64()),
        (Some("image-replicator-backup"), Some(1))
    );
    let saved = backup["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .find(|j| j["job_id"] == id.as_str())
        .expect("the copy's job")
        .clone();
    assert_eq!(saved["status"], "replicating");
    assert!(!String::from_utf8_lossy(&std::fs::read(&file).expect("read")).contains(&token));
    // The host fails; its region directories were backed up with the file system.
    server.kill_9();
    let other = Lab::new();
    let restored = other.ok(&["restore", file.to_str().expect("path")]);
    assert!(restored.starts_with("restored 2 region(s)"), "{restored}");
    for region in ["ot1", "ot2"] {
        copy_tree(&lab.region_dir(region), &other.region_dir(region));
    }
    let regions = other.ok_json(&["region", "list"]);
    let dirs: Vec<&str> = regions
        .as_array()
        .expect("regions")
        .iter()
        .map(|r| r["dir"].as_str().expect("dir"))
        .collect();
    let home = other.data_dir();
    assert!(
        dirs.iter().all(|d| Path::new(d).starts_with(&home)),
        "{dirs:?}"
    );
    for list in [["user", "list"], ["tenant", "list"], ["token", "list"]] {
        assert_eq!(other.ok_json(&list), lab.ok_json(&list), "{list:?}");
    }
    let root = other.token("root", TENANT_A);
    let server = other.serve_with(&[]);
    assert_eq!(all_jobs(&server, &root).len(), 3);
    let done = server.wait_job(&token, &id, Duration::from_secs(60), terminal);
    assert_eq!(done["status"], "replicated");
    let story = detail(&server, &token, &id);
    assert!(story["resumes"].as_u64() >= Some(1), "{story}");
    let copy = other.ok_json(&[
        "image",
        "show",
        done["destination_image_id"].as_str().expect("dst"),
    ]);
    let source = other.ok_json(&["image", "show", &image]);
    assert_eq!(copy["os_hash_value"], source["os_hash_value"]);
    let bytes = std::fs::read(
        other
            .region_dir("ot2")
            .join(copy["id"].as_str().expect("id")),
    )
    .expect("the copy's bytes");
    assert_eq!(
        sha512_hex(&bytes),
        source["os_hash_value"].as_str().expect("hash")
    );
}

#[test]
fn restore_refuses_a_data_dir_that_is_not_empty_and_a_file_that_is_no_backup() {
    let lab = Lab::new();
    lab.standard();
    let file = lab.dir.path().join("backup.json");
    lab.ok(&["backup", file.to_str().expect("path")]);
    let refused = lab.fails(&["restore", file.to_str().expect("path")]);
    assert!(refused.contains("it is not empty"), "{refused}");
    let other = Lab::new();
    let junk = other.dir.path().join("junk.json");
    std::fs::write(&junk, "{\"hello\": 1}").expect("junk");
    let refused = other.fails(&["restore", junk.to_str().expect("path")]);
    assert!(
        refused.contains("is not an image-replicator backup"),
        "{refused}"
    );
    assert!(
        !other.data_dir().exists(),
        "nothing is created for a refused restore"
    );
    let mut newer: Value =
        serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("JSON");
    newer["version"] = 2.into();
    std::fs::write(&junk, newer.to_string()).expect("write");
    let refused = other.fails(&["restore", junk.to_str().expect("path")]);
    assert!(refused.contains("format version 2"), "{refused}");
    // The same backup restores into an empty directory, every record there.
    other.ok(&["restore", file.to_str().expect("path")]);
    assert_eq!(
        other.ok_json(&["user", "list"]),
        lab.ok_json(&["user", "list"])
    );
    assert_eq!(
        other.ok_json(&["tenant", "list"]),
        lab.ok_json(&["tenant", "list"])
    );
}
