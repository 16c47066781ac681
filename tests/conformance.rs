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
