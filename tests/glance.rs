//! Glance-backed regions against real Glance (and Keystone) services from PyPI, started on
//! loopback by tests/openstack/lab.py: every mix of directory and Glance regions, cancel,
//! a Glance that stops mid-copy, one that is down at POST time, and Keystone authentication.

mod common;

use std::time::Duration;

use common::openstack::{qcow2, OpenStack};
use common::*;
use serde_json::Value;

const MINUTE: Duration = Duration::from_secs(60);
/// Tenant of the directory region in the no-auth labs.
const TENANT_DIR: &str = "3c4d5e6f708192a3b4c5d6e7f8091a2b";

fn copying(job: &Value) -> bool {
    job["status"] == "replicating" && job["copy_progress"].as_u64().unwrap_or(0) >= 5
}

/// An appliance with regions g0 and g1 (the lab's two no-auth Glances) and d (a directory);
/// tenant A lives in g0, B in g1, the directory tenant in d; alice may use all three.
struct NoAuth {
    os: OpenStack,
    lab: Lab,
    token_a: String,
    token_dir: String,
}

fn no_auth_lab() -> NoAuth {
    let os = OpenStack::start(2, false);
    let lab = Lab::new();
    for (region, i) in [("g0", 0), ("g1", 1)] {
        lab.ok(&["region", "add", region, "--glance-url", &os.glance_url(i)]);
    }
    lab.ok(&["region", "add", "d"]);
    lab.ok(&["tenant", "add", TENANT_A, "--region", "g0"]);
    lab.ok(&["tenant", "add", TENANT_B, "--region", "g1"]);
    lab.ok(&["tenant", "add", TENANT_DIR, "--region", "d"]);
    lab.ok(&[
        "user", "add", "alice", "--tenant", TENANT_A, "--tenant", TENANT_B, "--tenant", TENANT_DIR,
    ]);
    let token_a = lab.token("alice", TENANT_A);
    let token_dir = lab.token("alice", TENANT_DIR);
    NoAuth {
        os,
        lab,
        token_a,
        token_dir,
    }
}

/// Glance `i`'s record of `id` must show a faithful copy of `data` owned by `owner`.
fn assert_in_glance(
    os: &OpenStack,
    i: usize,
    token: Option<&str>,
    id: &str,
    owner: &str,
    data: &[u8],
) {
    let record = os
        .image(i, token, id)
        .expect("the destination image exists");
    assert_eq!(record["status"], "active", "{record}");
    assert_eq!(record["owner"], owner, "{record}");
    assert_eq!(record["size"], data.len() as u64);
    assert_eq!(record["os_hash_value"], sha512_hex(data));
    assert_eq!(record["disk_format"], "qcow2");
    let stored = os.data(i, token, id);
    assert!(stored == data, "the bytes in Glance {i} differ");
}

#[test]
fn every_mix_of_glance_and_directory_regions_copies_faithfully() {
    let t = no_auth_lab();
    let data = qcow2(t.lab.dir.path(), 64, 1);
    let source = t.os.upload(0, None, TENANT_A, "qcow2", data.clone());
    let source_md5 = t.os.image(0, None, &source).expect("source")["checksum"].clone();
    let server = t.lab.serve_with(&[]);

    // The tenant sees its Glance image through the appliance.
    let listed = t.lab.ok(&[
        "--json", "image", "list", "--region", "g0", "--tenant", TENANT_A,
    ]);
    assert!(listed.contains(&source), "{listed}");

    // Glance → Glance.
    let job = server.copy_ok(&t.token_a, &source, TENANT_B);
    let done = server.wait_job(&t.token_a, &job, MINUTE, status_is("replicated"));
    assert_eq!(done["copy_progress"], 100);
    assert_eq!(done["source_region_id"], "g0");
    assert_eq!(done["destination_region_id"], "g1");
    let in_g1 = done["destination_image_id"]
        .as_str()
        .expect("destination id");
    assert_in_glance(&t.os, 1, None, in_g1, TENANT_B, &data);
    assert_eq!(
        t.os.image(1, None, in_g1).expect("record")["checksum"],
        source_md5
    );

    // Glance → directory.
    let job = server.copy_ok(&t.token_a, &source, TENANT_DIR);
    let done = server.wait_job(&t.token_a, &job, MINUTE, status_is("replicated"));
    let in_dir = done["destination_image_id"]
        .as_str()
        .expect("destination id");
    let record: Value =
        serde_json::from_str(&t.lab.ok(&["--json", "image", "show", in_dir])).expect("JSON");
    assert_eq!(record["status"], "active");
    assert_eq!(record["owner"], TENANT_DIR);
    assert_eq!(record["checksum"], source_md5);
    assert_eq!(record["os_hash_value"], sha512_hex(&data));
    let file = t.lab.data_dir().join("regions/d").join(in_dir);
    assert!(std::fs::read(file).expect("the copy's file") == data);

    // Directory → Glance.
    let job = server.copy_ok(&t.token_dir, in_dir, TENANT_B);
    let done = server.wait_job(&t.token_dir, &job, MINUTE, status_is("replicated"));
    let back = done["destination_image_id"]
        .as_str()
        .expect("destination id");
    assert_in_glance(&t.os, 1, None, back, TENANT_B, &data);
}

#[test]
fn a_glance_image_of_another_owner_is_not_visible() {
    let t = no_auth_lab();
    let theirs = t.os.upload(0, None, TENANT_B, "raw", vec![7u8; 4096]);
    let server = t.lab.serve();
    let sentence = assert_error(server.copy(&t.token_a, &theirs, TENANT_B), 404);
    assert!(sentence.starts_with("No image"), "{sentence}");
    let listed = t.lab.ok(&[
        "--json", "image", "list", "--region", "g0", "--tenant", TENANT_A,
    ]);
    assert!(!listed.contains(&theirs), "{listed}");
}

/// A 64 MiB Glance → Glance copy at 4 MiB/s (16 s: time enough for a test to act on it on a
/// busy machine), caught while running: the server, the job id and the destination image's
/// id.
fn slow_copy_into_glance_1(t: &NoAuth, seed: u64) -> (Server, String, String) {
    let data = qcow2(t.lab.dir.path(), 64, seed);
    let source = t.os.upload(0, None, TENANT_A, "qcow2", data);
    let server = t.lab.serve_with(&["--max-bandwidth", "4M"]);
    let job = server.copy_ok(&t.token_a, &source, TENANT_B);
    let running = server.wait_job(&t.token_a, &job, MINUTE, copying);
    let dst = running["destination_image_id"]
        .as_str()
        .expect("destination id")
        .to_string();
    (server, job, dst)
}

#[test]
fn cancel_mid_copy_deletes_the_destination_glance_image() {
    let t = no_auth_lab();
    let (server, job, dst) = slow_copy_into_glance_1(&t, 2);
    assert!(
        t.os.image(1, None, &dst).is_some(),
        "the upload target exists while copying"
    );
    let resp = server.delete(&job_path(&job), Some(&t.token_a));
    assert_eq!(resp.status(), 204);
    server.wait_job(
        &t.token_a,
        &job,
        Duration::from_secs(10),
        status_is("canceled"),
    );
    assert_eq!(
        t.os.image(1, None, &dst),
        None,
        "the destination image is deleted"
    );
    assert_eq!(t.os.image_ids(1, None), Vec::<String>::new());
}

#[test]
fn a_cancel_ends_a_copy_stalled_on_a_frozen_destination_glance() {
    let mut t = no_auth_lab();
    let (server, job, dst) = slow_copy_into_glance_1(&t, 7);
    t.os.signal_glance(1, "STOP");
    // Let the upload stall: Glance's socket buffer fills and the chunk queue with it.
    std::thread::sleep(Duration::from_secs(3));
    let resp = server.delete(&job_path(&job), Some(&t.token_a));
    assert_eq!(resp.status(), 204);
    let asked = std::time::Instant::now();
    // The upload is abandoned at once; deleting the image waits for Glance up to 10 s.
    server.wait_job(
        &t.token_a,
        &job,
        Duration::from_secs(20),
        status_is("canceled"),
    );
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "took {:?}",
        asked.elapsed()
    );
    // Once Glance thaws, the half-made image is deleted.
    t.os.signal_glance(1, "CONT");
    t.os.wait_image_gone(1, None, &dst);
}

#[test]
fn a_destination_glance_that_stops_mid_copy_gives_a_clear_error_and_leaves_nothing() {
    let mut t = no_auth_lab();
    let (server, job, dst) = slow_copy_into_glance_1(&t, 3);
    t.os.command("kill glance 1");
    server.wait_job(&t.token_a, &job, MINUTE, status_is("error"));
    let shown = t.lab.ok(&["job", "show", &job]);
    assert!(shown.contains("Glance of region g1"), "{shown}");
    assert!(shown.contains("gave up after 4 attempts"), "{shown}");
    let log = server.log_text();
    assert!(log.contains("retrying"), "no retry in the log:\n{log}");

    // Once Glance is back, the half-uploaded image is deleted.
    t.os.command("start glance 1");
    t.os.wait_image_gone(1, None, &dst);
    assert_eq!(t.os.image_ids(1, None), Vec::<String>::new());
}

#[test]
fn kill_9_mid_copy_into_glance_then_restart_ends_replicated_with_one_image() {
    let t = no_auth_lab();
    let data = qcow2(t.lab.dir.path(), 48, 6);
    let source = t.os.upload(0, None, TENANT_A, "qcow2", data.clone());
    let (job, first) = {
        let mut server = t.lab.serve_with(&["--max-bandwidth", "8M"]);
        let job = server.copy_ok(&t.token_a, &source, TENANT_B);
        let running = server.wait_job(&t.token_a, &job, MINUTE, copying);
        server.kill_9();
        let first = running["destination_image_id"].as_str().map(String::from);
        (job, first.expect("destination id"))
    };
    assert!(
        t.os.image(1, None, &first).is_some(),
        "the crash left a partial upload"
    );
    let server = t.lab.serve_with(&[]);
    let done = server.wait_job(&t.token_a, &job, MINUTE, status_is("replicated"));
    let dst = done["destination_image_id"]
        .as_str()
        .expect("destination id");
    assert_ne!(dst, first, "a new upload after the restart");
    assert_in_glance(&t.os, 1, None, dst, TENANT_B, &data);
    assert_eq!(
        t.os.image_ids(1, None),
        vec![dst.to_string()],
        "strays in Glance 1"
    );
}

#[test]
fn a_source_glance_that_drops_mid_copy_is_resumed_with_range() {
    let mut t = no_auth_lab();
    let data = qcow2(t.lab.dir.path(), 64, 4);
    let source = t.os.upload(0, None, TENANT_A, "qcow2", data.clone());
    let server = t.lab.serve_with(&["--max-bandwidth", "16M"]);
    let job = server.copy_ok(&t.token_a, &source, TENANT_DIR);
    server.wait_job(&t.token_a, &job, MINUTE, copying);
    t.os.command("kill glance 0");
    t.os.command("start glance 0");
    let done = server.wait_job(&t.token_a, &job, MINUTE, |j| {
        j["status"] == "replicated" || j["status"] == "error"
    });
    assert_eq!(done["status"], "replicated", "log:\n{}", server.log_text());
    let log = server.log_text();
    assert!(
        log.contains("resuming"),
        "the download was not resumed:\n{log}"
    );
    let dst = done["destination_image_id"]
        .as_str()
        .expect("destination id");
    let file = t.lab.data_dir().join("regions/d").join(dst);
    assert!(std::fs::read(file).expect("the copy's file") == data);
}

#[test]
fn a_copy_from_glance_killed_mid_copy_resumes_with_range_after_its_verified_part() {
    let t = no_auth_lab();
    let data = qcow2(t.lab.dir.path(), 64, 4);
    let size = data.len() as u64;
    let source = t.os.upload(0, None, TENANT_A, "qcow2", data.clone());
    let mut server = t.lab.serve_with(&["--max-bandwidth", "8M"]);
    let job = server.copy_ok(&t.token_a, &source, TENANT_DIR);
    server.wait_job(&t.token_a, &job, MINUTE, |j| {
        j["copy_progress"].as_u64().unwrap_or(0) >= 40
    });
    server.kill_9();
    drop(server);
    let before = t.lab.ok_json(&["job", "show", &job]);
    let verified = before["bytes_verified"].as_u64().expect("bytes_verified");
    assert!(verified > 0, "nothing was recorded as verified: {before}");
    let server = t.lab.serve_with(&[]);
    let done = server.wait_job(&t.token_a, &job, MINUTE, terminal);
    assert_eq!(done["status"], "replicated", "log:\n{}", server.log_text());
    let record = t.lab.ok_json(&["job", "show", &job]);
    assert_eq!(record["resumes"], 1, "{record}");
    let read = record["source_bytes_read"].as_u64().expect("read");
    assert!(
        read as f64 <= 1.3 * size as f64,
        "{read} bytes read from Glance for a {size}-byte image"
    );
    let dst = done["destination_image_id"]
        .as_str()
        .expect("destination id");
    let file = t.lab.data_dir().join("regions/d").join(dst);
    assert!(std::fs::read(file).expect("the copy's file") == data);
}

#[test]
fn a_source_glance_that_is_down_at_post_time_is_a_409() {
    let mut t = no_auth_lab();
    let source = t.os.upload(0, None, TENANT_A, "raw", vec![1u8; 4096]);
    let server = t.lab.serve();
    t.os.command("stop glance 0");
    let sentence = assert_error(server.copy(&t.token_a, &source, TENANT_B), 409);
    assert!(sentence.contains("region g0"), "{sentence}");
    // And health says so.
    let health = server.get("/healthz", None);
    assert_eq!(health.status(), 503);
    assert!(health.text().expect("body").contains("g0"));
}

#[test]
fn keystone_authenticated_regions_copy_and_a_revoked_password_is_a_clear_error() {
    let os = OpenStack::start(2, true);
    let ks = os.info["keystone"].clone();
    let alpha = ks["projects"]["alpha"]["id"]
        .as_str()
        .expect("alpha id")
        .to_string();
    let beta = ks["projects"]["beta"]["id"]
        .as_str()
        .expect("beta id")
        .to_string();
    let lab = Lab::new();
    let password_file = lab.dir.path().join("service.password");
    std::fs::write(
        &password_file,
        format!(
            "{}\n",
            ks["service"]["password"].as_str().expect("password")
        ),
    )
    .expect("password file");
    for (region, i) in [("k0", 0), ("k1", 1)] {
        lab.ok(&[
            "region",
            "add",
            region,
            "--glance-url",
            &os.glance_url(i),
            "--glance-auth",
            "keystone",
            "--auth-url",
            &os.keystone_url(),
            "--username",
            ks["service"]["username"].as_str().expect("username"),
            "--project",
            ks["service"]["project"].as_str().expect("project"),
            "--password-file",
            password_file.to_str().expect("path"),
        ]);
    }
    lab.ok(&["tenant", "add", &alpha, "--region", "k0"]);
    lab.ok(&["tenant", "add", &beta, "--region", "k1"]);
    lab.ok(&[
        "user", "add", "alice", "--tenant", &alpha, "--tenant", &beta,
    ]);
    let token = lab.token("alice", &alpha);
    let service = os.user_token("service");

    let data = qcow2(lab.dir.path(), 32, 5);
    let source = os.upload(0, Some(&service), &alpha, "qcow2", data.clone());
    let server = lab.serve_with(&[]);
    let job = server.copy_ok(&token, &source, &beta);
    let done = server.wait_job(&token, &job, MINUTE, status_is("replicated"));
    let dst = done["destination_image_id"]
        .as_str()
        .expect("destination id");
    assert_in_glance(&os, 1, Some(&service), dst, &beta, &data);
    drop(server);

    // The service user's password changes while a copy runs: Keystone revokes its tokens,
    // and the old password no longer gets new ones.
    let server = lab.serve_with(&["--max-bandwidth", "4M"]);
    let job = server.copy_ok(&token, &source, &beta);
    server.wait_job(&token, &job, MINUTE, copying);
    // Keystone revokes by the second: a service token issued in the second of the password
    // change may outlive it, and the copy then ends `replicated` (seen 3 times in 4 runs).
    std::thread::sleep(Duration::from_millis(1100));
    let admin = os.user_token("admin");
    let name = ks["service"]["username"].as_str().expect("name");
    let users: Value = os
        .http
        .get(format!("{}/users?name={name}", os.keystone_url()))
        .header("x-auth-token", &admin)
        .send()
        .expect("find the service user")
        .json()
        .expect("users JSON");
    let user_id = users["users"][0]["id"].as_str().expect("user id");
    let resp = os
        .http
        .patch(format!("{}/users/{user_id}", os.keystone_url()))
        .header("x-auth-token", &admin)
        .json(&serde_json::json!({"user": {"password": "a-new-password-0"}}))
        .send()
        .expect("change the password");
    assert_eq!(resp.status(), 200, "{:?}", resp.text());
    server.wait_job(&token, &job, MINUTE, status_is("error"));
    let shown = lab.ok(&["job", "show", &job]);
    assert!(
        shown.contains("refused the password of user"),
        "{shown}\nlog:\n{}",
        server.log_text()
    );
    let password = ks["service"]["password"].as_str().expect("password");
    assert!(
        !server.log_text().contains(password),
        "the password is in the log"
    );
    // At POST time the refusal is a 409 that says so.
    let sentence = assert_error(server.copy(&token, &source, &beta), 409);
    assert!(sentence.contains("region k0"), "{sentence}");
}
