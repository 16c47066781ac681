//! The reference's examples, replayed against the real server.

mod common;

use std::collections::BTreeSet;

use common::*;
use image_replicator::model::JOB_KEYS;
use serde_json::Value;

const REFERENCE_TOKEN: &str = "f4328bab05ff4502b397b88657baaefd";
const REFERENCE_LIST: &str = include_str!("data/reference_jobs.json");

/// A lab holding the reference's three jobs and sample token for its tenant.
fn reference_lab() -> Lab {
    let lab = Lab::new();
    lab.ok(&["region", "add", "ot1"]);
    lab.ok(&["tenant", "add", TENANT_A, "--region", "ot1"]);
    lab.ok(&["user", "add", "demo", "--tenant", TENANT_A]);
    lab.ok(&issue_args("demo", TENANT_A, &["--token", REFERENCE_TOKEN]));
    let seed = lab.dir.path().join("jobs.json");
    std::fs::write(&seed, REFERENCE_LIST).expect("seed file");
    let out = lab.ok(&["job", "seed", seed.to_str().expect("path")]);
    assert_eq!(out, "3 job(s) seeded, 0 already present\n");
    lab
}

#[test]
fn list_is_the_reference_execution_example() {
    let lab = reference_lab();
    let server = lab.serve();
    let resp = server.get(JOBS, Some(REFERENCE_TOKEN));
    let expected: Value = serde_json::from_str(REFERENCE_LIST).expect("reference JSON");
    assert_eq!(Value::Array(jobs(resp)), expected);
}

/// Issues a token with a given value through the CLI; returns its id.
fn issue(lab: &Lab, value: &str, extra: &[&str]) -> String {
    let mut args = issue_args("demo", TENANT_A, &["--token", value]);
    args.extend_from_slice(extra);
    let issued = lab.ok_json(&args);
    assert_eq!(issued["token"], value);
    issued["info"]["id"].as_str().expect("token id").to_string()
}

/// Where each of [`JOB_KEYS`] first stands, quoted, in a JSON text.
fn key_positions(text: &str) -> Vec<usize> {
    JOB_KEYS
        .iter()
        .map(|k| {
            text.find(&format!("\"{k}\""))
                .unwrap_or_else(|| panic!("no key {k} in {text}"))
        })
        .collect()
}

fn ascending(positions: &[usize]) -> bool {
    positions.windows(2).all(|w| w[0] < w[1])
}

#[test]
fn every_reference_job_shows_alone_with_its_ten_keys_in_order() {
    let lab = reference_lab();
    let server = lab.serve();
    let expected: Vec<Value> = serde_json::from_str(REFERENCE_LIST).expect("reference JSON");
    // The appliance's ten keys are the reference's, in the reference's order.
    for job in &expected {
        let keys: BTreeSet<&str> = keys_of(job).into_iter().collect();
        assert_eq!(keys, BTreeSet::from(JOB_KEYS));
    }
    assert!(
        ascending(&key_positions(REFERENCE_LIST)),
        "JOB_KEYS is not in the reference's order"
    );
    for job in expected {
        let id = job["job_id"].as_str().expect("id");
        let resp = server.get(&job_path(id), Some(REFERENCE_TOKEN));
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"],
            "application/json; charset=UTF-8"
        );
        let text = resp.text().expect("body");
        let shown: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(shown, job);
        assert!(
            ascending(&key_positions(&text)),
            "keys out of order: {text}"
        );
    }
}

#[test]
fn seeding_the_reference_twice_changes_nothing() {
    let lab = reference_lab();
    let seed = lab.dir.path().join("jobs.json");
    let out = lab.ok(&["job", "seed", seed.to_str().expect("path")]);
    assert_eq!(out, "0 job(s) seeded, 3 already present\n");
    let list = lab.ok_json(&["job", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(3));
}

#[test]
fn unauthorized_is_the_reference_401_whatever_was_wrong() {
    let lab = reference_lab();
    issue(&lab, "expiring-token-1", &["--expires-in", "2s"]);
    let revoked = issue(&lab, "revoked-token-1", &[]);
    let server = lab.serve();

    // Both work at first, so the token cache knows them.
    assert_eq!(server.get(JOBS, Some("revoked-token-1")).status(), 200);
    assert_eq!(server.get(JOBS, Some("expiring-token-1")).status(), 200);
    lab.ok(&["token", "revoke", &revoked]);
    std::thread::sleep(std::time::Duration::from_millis(3000));

    assert_401(server.get(JOBS, None));
    assert_401(server.get(JOBS, Some("ajk3adjiown02")));
    assert_401(server.get(JOBS, Some("expiring-token-1")));
    assert_401(server.get(JOBS, Some("revoked-token-1")));
    assert_401(server.get(JOBS, Some("")));
    let job = format!("{JOBS}/0fa2817d-4e54-455d-a676-c78e863297e9");
    assert_401(server.get(&job, Some("revoked-token-1")));
    assert_401(server.delete(&job, Some("expiring-token-1")));
    assert_401(server.post(Some("revoked-token-1"), "{}"));
    // The reference token still works.
    assert_eq!(server.get(&job, Some(REFERENCE_TOKEN)).status(), 200);
}

#[test]
fn api_md_quotes_the_reference_example_the_tests_use() {
    let contract = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/API.md"))
        .expect("API.md in the repository");
    assert!(contract.contains(REFERENCE_LIST.trim_end()));
    assert!(contract.contains("List image copy jobs"));
}

#[test]
fn list_body_is_the_reference_example_byte_for_byte() {
    let lab = reference_lab();
    let server = lab.serve();
    let body = server
        .get(JOBS, Some(REFERENCE_TOKEN))
        .text()
        .expect("body");
    assert_eq!(body, REFERENCE_LIST.trim_end());
    // One job, and the 202 of a copy, are written the same way.
    let one = server
        .get(
            &job_path("0fa2817d-4e54-455d-a676-c78e863297e9"),
            Some(REFERENCE_TOKEN),
        )
        .text()
        .expect("body");
    assert!(
        one.starts_with(r#"{"copy_progress": 0, "destination_image_id": null, "#),
        "{one}"
    );
}

#[test]
fn percent_encoded_job_ids_are_decoded_as_glance_does() {
    let lab = reference_lab();
    let server = lab.serve();
    let encoded = "0fa2817d%2D4e54%2d455d-a676-c78e863297e9";
    let shown = server.job(REFERENCE_TOKEN, encoded);
    assert_eq!(shown["job_id"], "0fa2817d-4e54-455d-a676-c78e863297e9");
    assert_eq!(
        server
            .delete(&job_path(encoded), Some(REFERENCE_TOKEN))
            .status(),
        204
    );
    // An escape that decodes to a slash names no job.
    let slash = server.get(
        &job_path("0fa2817d%2F4e54-455d-a676-c78e863297e9"),
        Some(REFERENCE_TOKEN),
    );
    assert_eq!(slash.status(), 404);
}

#[test]
fn an_inbound_request_id_is_logged_beside_ours() {
    let lab = reference_lab();
    let server = lab.serve();
    let send = |value: &str| {
        let resp = server
            .client
            .get(server.url(JOBS))
            .header("X-Auth-Token", REFERENCE_TOKEN)
            .header("X-OpenStack-Request-ID", value)
            .send()
            .expect("GET");
        assert_eq!(resp.status(), 200);
        let ours = resp.headers()["x-openstack-request-id"]
            .to_str()
            .unwrap()
            .to_string();
        assert_ne!(ours, value, "ours is our own");
        ours
    };
    let theirs = "req-6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b";
    let ours = send(theirs);
    // Not of oslo.context's shape: remote text, not logged.
    let odd = [
        "hello",
        "req-6F1C2B3A-4D5E-4F60-8A7B-9C0D1E2F3A4B",
        "req-6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b-and-more text",
    ];
    let odd_ours: Vec<String> = odd.iter().map(|v| send(v)).collect();
    let log = poll(
        "the request lines",
        std::time::Duration::from_secs(5),
        || {
            let log = server.log_text();
            odd_ours
                .iter()
                .all(|id| log.contains(id.as_str()))
                .then_some(log)
        },
    );
    let line = log.lines().find(|l| l.contains(&ours)).expect("our line");
    assert!(
        line.contains(&format!("global_request_id={theirs}")),
        "{line}"
    );
    for (value, ours) in odd.iter().zip(&odd_ours) {
        let line = log.lines().find(|l| l.contains(ours.as_str())).unwrap();
        assert!(line.contains("global_request_id=-"), "{line}");
        assert!(!line.contains(value), "{line}");
    }
}
