//! Tenant isolation: three tenants × every route × every job. A job of another tenant must be
//! indistinguishable from a job that does not exist.

mod common;

use std::collections::BTreeMap;

use common::*;
use reqwest::blocking::Response;
use serde_json::{json, Value};

const UNKNOWN_JOB: &str = "7d444840-9dc0-11d1-b245-5ffdce74fad2";
const UNKNOWN_IMAGE: &str = "3f0c9a2e-5b7d-4e1f-8a6c-2d9b0e4f7a13";

/// One tenant's view: who acts for it, and what it owns.
struct Tenant {
    name: &'static str,
    id: &'static str,
    token: String,
    images: Vec<String>,
    /// Its jobs, oldest first.
    jobs: Vec<String>,
}

/// The three tenants with their images and jobs, the admin's token, and the running server.
/// `server` is declared first so it stops before the lab's directory goes away.
struct World {
    server: Server,
    lab: Lab,
    tenants: Vec<Tenant>,
    /// root: admin, member of tenant A.
    admin: String,
}

impl World {
    /// Every job with the index of its owner in `tenants`.
    fn all_jobs(&self) -> Vec<(usize, String)> {
        self.tenants
            .iter()
            .enumerate()
            .flat_map(|(i, t)| t.jobs.iter().map(move |j| (i, j.clone())))
            .collect()
    }

    /// Every job as its owner sees it.
    fn snapshot(&self) -> BTreeMap<String, Value> {
        self.all_jobs()
            .into_iter()
            .map(|(owner, id)| {
                let job = self.server.job(&self.tenants[owner].token, &id);
                (id, job)
            })
            .collect()
    }
}

fn seeded_job(id: &str, status: &str, tenant: &str, region: &str) -> Value {
    json!({
        "copy_progress": if status == "replicated" { 100 } else { 0 },
        "destination_image_id": null,
        "destination_region_id": region,
        "destination_tenant_id": tenant,
        "job_id": id,
        "source_image_id": "9b805919-8acb-4880-8904-cd2f9a32c1ad",
        "source_image_name": format!("seeded-{status}"),
        "source_region_id": region,
        "source_tenant_id": tenant,
        "status": status,
    })
}

/// Status, content type, content length and body of a response, the body with `id` replaced
/// by a placeholder: what must not differ between an invisible job and an unknown one.
fn fingerprint(resp: Response, id: &str) -> (u16, String, String, String) {
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().expect("ASCII").to_string())
            .unwrap_or_default()
    };
    let (content_type, length) = (header("content-type"), header("content-length"));
    let body = resp.text().expect("body");
    assert!(body.contains(id), "body {body:?} does not name {id}");
    (status, content_type, length, body.replace(id, "<id>"))
}

/// Builds the world: tenants A (alice), B (bob), C (carol, also member of B); root is admin in
/// A. Each tenant copies its own images; a few jobs per tenant are seeded in other states.
fn world() -> World {
    let lab = Lab::new();
    lab.standard();
    let mut tenants = vec![
        Tenant {
            name: "alice",
            id: TENANT_A,
            token: lab.token("alice", TENANT_A),
            images: vec![
                lab.image(TENANT_A, "a-one", 1500),
                lab.image(TENANT_A, "a-two", 700),
            ],
            jobs: Vec::new(),
        },
        Tenant {
            name: "bob",
            id: TENANT_B,
            token: lab.token("bob", TENANT_B),
            images: vec![lab.image(TENANT_B, "b-one", 900)],
            jobs: Vec::new(),
        },
        Tenant {
            name: "carol",
            id: TENANT_C,
            token: lab.token("carol", TENANT_C),
            images: vec![
                lab.image(TENANT_C, "c-one", 1100),
                lab.image(TENANT_C, "c-two", 300),
            ],
            jobs: Vec::new(),
        },
    ];
    let admin = lab.token("root", TENANT_A);
    let server = lab.serve();

    // Interleaved, so that oldest-first per tenant is not the same as oldest-first overall.
    let plan: [(usize, usize, &str); 7] = [
        (0, 0, TENANT_A),
        (1, 0, TENANT_B),
        (2, 0, TENANT_C),
        (0, 1, TENANT_A),
        (2, 1, TENANT_B), // carol copies into B: still C's job
        (1, 0, TENANT_B),
        (2, 0, TENANT_C),
    ];
    for (t, image, dst) in plan {
        let job = server.copy_ok(&tenants[t].token, &tenants[t].images[image], dst);
        tenants[t].jobs.push(job);
    }
    // The admin copies one of A's images: the job is A's (its source tenant).
    let by_admin = server.copy_ok(&admin, &tenants[0].images[0], TENANT_A);
    tenants[0].jobs.push(by_admin);

    let seeds = [
        (
            0,
            "1a000000-0000-4000-8000-00000000000a",
            "replicated",
            "ot1",
        ),
        (
            0,
            "1a000000-0000-4000-8000-00000000000b",
            "replicating",
            "ot1",
        ),
        (1, "1b000000-0000-4000-8000-00000000000a", "error", "ot2"),
        (
            1,
            "1b000000-0000-4000-8000-00000000000b",
            "cancel_requested",
            "ot2",
        ),
        (2, "1c000000-0000-4000-8000-00000000000a", "canceled", "ot1"),
        (
            2,
            "1c000000-0000-4000-8000-00000000000b",
            "canceling",
            "ot1",
        ),
    ];
    let entries: Vec<Value> = seeds
        .iter()
        .map(|(t, id, status, region)| seeded_job(id, status, tenants[*t].id, region))
        .collect();
    lab.seed_jobs(&entries);
    for (t, id, _, _) in seeds {
        tenants[t].jobs.push(id.to_string());
    }
    World {
        server,
        lab,
        tenants,
        admin,
    }
}

#[test]
fn each_tenant_lists_exactly_its_own_jobs_oldest_first() {
    let w = world();
    for tenant in &w.tenants {
        let listed = jobs(w.server.get(JOBS, Some(&tenant.token)));
        assert_eq!(job_ids(&listed), tenant.jobs, "{}'s list", tenant.name);
        for job in &listed {
            assert_eq!(
                job["source_tenant_id"], tenant.id,
                "{} lists a job of another tenant: {job}",
                tenant.name
            );
        }
    }
}

#[test]
fn the_admin_lists_and_shows_every_tenants_jobs() {
    let w = world();
    let listed = jobs(w.server.get(JOBS, Some(&w.admin)));
    let mut got = job_ids(&listed);
    got.sort();
    let mut expected: Vec<String> = w.all_jobs().into_iter().map(|(_, id)| id).collect();
    expected.sort();
    assert_eq!(got, expected);
    let owners_view = w.snapshot();
    for job in &listed {
        let id = job["job_id"].as_str().expect("id");
        assert_eq!(job, &owners_view[id], "the admin's list differs for {id}");
        assert_eq!(w.server.job(&w.admin, id), owners_view[id]);
    }
}

#[test]
fn get_of_a_job_not_visible_is_404_identical_to_an_unknown_job() {
    let w = world();
    let owners_view = w.snapshot();
    for tenant in &w.tenants {
        let unknown = fingerprint(
            w.server.get(&job_path(UNKNOWN_JOB), Some(&tenant.token)),
            UNKNOWN_JOB,
        );
        assert_eq!(unknown.0, 404);
        assert_eq!(unknown.1, "text/plain; charset=UTF-8");
        for (owner, id) in w.all_jobs() {
            let resp = w.server.get(&job_path(&id), Some(&tenant.token));
            if w.tenants[owner].id == tenant.id {
                assert_eq!(resp.status(), 200, "{} GET own {id}", tenant.name);
                let job: Value = resp.json().expect("JSON");
                assert_eq!(job, owners_view[&id]);
            } else {
                assert_eq!(
                    fingerprint(resp, &id),
                    unknown,
                    "{} GET {}'s job {id}",
                    tenant.name,
                    w.tenants[owner].name
                );
            }
        }
    }
}

#[test]
fn delete_of_a_job_not_visible_is_404_identical_to_an_unknown_job_and_changes_nothing() {
    let w = world();
    let before = w.snapshot();
    let foreign_deletes_are_404 = |round: &str| {
        for tenant in &w.tenants {
            let unknown = fingerprint(
                w.server.delete(&job_path(UNKNOWN_JOB), Some(&tenant.token)),
                UNKNOWN_JOB,
            );
            assert_eq!(unknown.0, 404);
            for (owner, id) in w.all_jobs() {
                if w.tenants[owner].id == tenant.id {
                    continue;
                }
                let resp = w.server.delete(&job_path(&id), Some(&tenant.token));
                assert_eq!(
                    fingerprint(resp, &id),
                    unknown,
                    "{round}: {} DELETE {}'s job {id}",
                    tenant.name,
                    w.tenants[owner].name
                );
            }
        }
    };
    foreign_deletes_are_404("first round");
    assert_eq!(w.snapshot(), before, "a foreign cancel changed a job");

    // The owners cancel what they may; the others still get 404, never 409.
    for (owner, id) in w.all_jobs() {
        let status = before[&id]["status"].as_str().expect("status");
        let expected = if ["replicate_requested", "replicating"].contains(&status) {
            204
        } else {
            409
        };
        let resp = w
            .server
            .delete(&job_path(&id), Some(&w.tenants[owner].token));
        assert_eq!(resp.status(), expected, "owner cancel of {id} ({status})");
    }
    let after_cancel = w.snapshot();
    for (id, job) in &after_cancel {
        let was = before[id]["status"].as_str().expect("status");
        if ["replicate_requested", "replicating"].contains(&was) {
            assert_eq!(job["status"], "cancel_requested", "{id}");
        } else {
            assert_eq!(job, &before[id], "{id}");
        }
    }
    foreign_deletes_are_404("after the owners' cancels");
    assert_eq!(w.snapshot(), after_cancel, "a foreign cancel changed a job");
}

#[test]
fn copy_of_another_tenants_image_is_404_identical_to_an_unknown_image() {
    let w = world();
    let lists_before: Vec<Vec<Value>> = w
        .tenants
        .iter()
        .map(|t| jobs(w.server.get(JOBS, Some(&t.token))))
        .collect();
    for tenant in &w.tenants {
        let unknown = fingerprint(
            w.server.copy(&tenant.token, UNKNOWN_IMAGE, tenant.id),
            UNKNOWN_IMAGE,
        );
        assert_eq!(unknown.0, 404);
        for other in w.tenants.iter().filter(|o| o.id != tenant.id) {
            for image in &other.images {
                // To the caller's own tenant, and to the image owner's tenant.
                for dst in [tenant.id, other.id] {
                    let resp = w.server.copy(&tenant.token, image, dst);
                    if dst == other.id && resp.status() == 401 {
                        // Not a member of the destination: may be refused for that first.
                        assert_401(resp);
                        continue;
                    }
                    assert_eq!(
                        fingerprint(resp, image),
                        unknown,
                        "{} copies {}'s image {image} to {dst}",
                        tenant.name,
                        other.name
                    );
                }
            }
        }
    }
    let lists_after: Vec<Vec<Value>> = w
        .tenants
        .iter()
        .map(|t| jobs(w.server.get(JOBS, Some(&t.token))))
        .collect();
    assert_eq!(lists_after, lists_before, "a refused copy created a job");
}

#[test]
fn marker_of_another_tenants_job_is_400_like_an_unknown_marker() {
    let w = world();
    for tenant in &w.tenants {
        let unknown = w
            .server
            .get(&format!("{JOBS}?marker={UNKNOWN_JOB}"), Some(&tenant.token));
        let unknown = assert_error(unknown, 400).replace(UNKNOWN_JOB, "<id>");
        for (owner, id) in w.all_jobs() {
            let resp = w
                .server
                .get(&format!("{JOBS}?marker={id}"), Some(&tenant.token));
            if w.tenants[owner].id == tenant.id {
                let after = job_ids(&jobs(resp));
                let at = tenant.jobs.iter().position(|j| j == &id).expect("own job");
                assert_eq!(after, tenant.jobs[at + 1..], "{} marker {id}", tenant.name);
            } else {
                let sentence = assert_error(resp, 400);
                assert_eq!(
                    sentence.replace(&id, "<id>"),
                    unknown,
                    "{} marker {}'s job {id}",
                    tenant.name,
                    w.tenants[owner].name
                );
            }
        }
    }
}

#[test]
fn status_filter_shows_only_the_tenants_jobs() {
    let w = world();
    let statuses = [
        "replicate_requested",
        "replicating",
        "replicated",
        "cancel_requested",
        "canceling",
        "canceled",
        "error",
    ];
    let all = w.snapshot();
    for tenant in &w.tenants {
        for status in statuses {
            let listed = jobs(
                w.server
                    .get(&format!("{JOBS}?status={status}"), Some(&tenant.token)),
            );
            let expected: Vec<String> = tenant
                .jobs
                .iter()
                .filter(|id| all[*id]["status"] == status)
                .cloned()
                .collect();
            assert_eq!(
                job_ids(&listed),
                expected,
                "{} status={status}",
                tenant.name
            );
        }
        let limited = jobs(
            w.server
                .get(&format!("{JOBS}?limit=2"), Some(&tenant.token)),
        );
        assert_eq!(
            job_ids(&limited),
            tenant.jobs[..2],
            "{} limit=2",
            tenant.name
        );
    }
}

#[test]
fn a_token_sees_the_jobs_of_the_tenant_it_was_issued_for() {
    let w = world();
    // carol is a member of C and B; a token for B acts for B.
    let carol_b = w.lab.token("carol", TENANT_B);
    let bob = &w.tenants[1];
    let carol = &w.tenants[2];
    assert_eq!(job_ids(&jobs(w.server.get(JOBS, Some(&carol_b)))), bob.jobs);
    let unknown = fingerprint(
        w.server.get(&job_path(UNKNOWN_JOB), Some(&carol_b)),
        UNKNOWN_JOB,
    );
    for id in &carol.jobs {
        let resp = w.server.get(&job_path(id), Some(&carol_b));
        assert_eq!(fingerprint(resp, id), unknown, "carol's B token GET {id}");
    }
    for id in &bob.jobs {
        assert_eq!(w.server.job(&carol_b, id), w.server.job(&bob.token, id));
    }
    // And carol's C token does not see B's jobs, though carol is a member of B.
    for id in &bob.jobs {
        let resp = w.server.get(&job_path(id), Some(&carol.token));
        assert_eq!(resp.status(), 404, "carol's C token GET {id}");
    }
}
