//! The token lifecycle: a token fails on the very next request once it expires, is revoked or
//! loses its user or tenant, even when cached and in use, and recreated names do not revive
//! it; no token (nor a value a client presented) is at rest in plaintext in the data directory
//! or the logs, even after SIGKILL and with trace logging; argon2 is paid once per token and
//! never for garbage, even for strings sharing a token's lookup prefix; old four-byte lookup
//! keys still work and are migrated; lifetimes beyond a century are refused.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

fn verifications(lab: &Lab) -> u64 {
    lab.ok_json(&["status"])["auth"]["argon2_verifications"]
        .as_u64()
        .expect("argon2_verifications")
}

#[test]
fn no_token_plaintext_anywhere_in_the_data_dir_or_the_log() {
    let lab = Lab::new();
    lab.standard();
    let mut tokens = vec![lab.token("alice", TENANT_A), lab.token("bob", TENANT_B)];
    lab.ok(&issue_args(
        "carol",
        TENANT_C,
        &["--token", "Imported-Lab-Token-42"],
    ));
    tokens.push("Imported-Lab-Token-42".into());
    {
        let server = lab.serve();
        // Issued through the running server's admin socket, then used over HTTP.
        tokens.push(lab.token("root", TENANT_A));
        for t in &tokens {
            assert_eq!(server.get(JOBS, Some(t)).status(), 200);
        }
        let log = server.log_text();
        assert!(log.contains("request"), "the server logs requests");
        for t in &tokens {
            assert!(!log.contains(t.as_str()), "token {t} appears in the log");
        }
    }
    let generated: Vec<&String> = tokens.iter().filter(|t| t.len() == 32).collect();
    assert_eq!(generated.len(), 3, "three generated tokens");
    for t in &generated {
        assert!(t
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }
    let all_files = files_under(&lab.data_dir());
    assert!(!all_files.is_empty());
    assert_secrets_absent(&all_files, &tokens);
}

#[test]
fn one_token_costs_one_argon2_verification_and_garbage_costs_none() {
    let lab = Lab::new();
    lab.standard();
    let token = lab.token("alice", TENANT_A);
    let server = lab.serve();
    assert_eq!(verifications(&lab), 0);

    for _ in 0..100 {
        assert_eq!(server.get(JOBS, Some(&token)).status(), 200);
    }
    assert_eq!(verifications(&lab), 1, "100 requests with one token");

    for _ in 0..100 {
        let garbage = uuid::Uuid::new_v4().simple().to_string();
        assert_401(server.get(JOBS, Some(&garbage)));
    }
    assert_eq!(
        verifications(&lab),
        1,
        "100 garbage tokens cost no argon2 work"
    );
}

#[test]
fn removed_user_token_fails_on_the_next_request() {
    let lab = Lab::new();
    lab.standard();
    let token = lab.token("carol", TENANT_C);
    let server = lab.serve();
    assert_eq!(server.get(JOBS, Some(&token)).status(), 200);
    let out = lab.ok(&["user", "remove", "carol"]);
    assert_eq!(out, "user carol removed with 1 token(s)\n");
    assert_401(server.get(JOBS, Some(&token)));
}

/// Two strings whose SHA-256 share their first four bytes (the token lookup prefix), found by
/// a birthday search.
fn lookup_twins() -> (String, String) {
    use sha2::{Digest, Sha256};
    let mut seen = std::collections::HashMap::new();
    for n in 0u64.. {
        let candidate = format!("twin-token-{n:08}");
        let digest = Sha256::digest(candidate.as_bytes());
        let prefix = [digest[0], digest[1], digest[2], digest[3]];
        if let Some(first) = seen.insert(prefix, candidate.clone()) {
            return (first, candidate);
        }
    }
    unreachable!("the search ends long before u64 runs out")
}

#[test]
fn a_string_sharing_a_tokens_lookup_prefix_costs_one_argon2_verification_at_most() {
    let (real, twin) = lookup_twins();
    let lab = Lab::new();
    lab.standard();
    lab.ok(&issue_args("alice", TENANT_A, &["--token", &real]));
    let server = lab.serve();
    for _ in 0..20 {
        assert_401(server.get(JOBS, Some(&twin)));
    }
    assert!(verifications(&lab) <= 1, "the failed twin is remembered");
    assert_eq!(server.get(JOBS, Some(&real)).status(), 200);
    assert!(verifications(&lab) <= 2);
}

/// Sends `n` requests with `token` at once (one connected client each, released together);
/// with `real`, that token's first request is timed 20 ms after the release. Returns the
/// statuses, the slowest answer, and the real token's time.
fn at_once(
    server: &Server,
    token: &str,
    n: usize,
    real: Option<&str>,
) -> (Vec<u16>, std::time::Duration, std::time::Duration) {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(n + 1));
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let (barrier, url, token) = (barrier.clone(), server.url(JOBS), token.to_string());
            let health = server.url("/healthz");
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::new();
                // Connected beforehand, so that the requests arrive together.
                let warm = client.get(health).send().expect("healthz");
                assert_eq!(warm.status(), 200);
                barrier.wait();
                let started = std::time::Instant::now();
                let status = client
                    .get(url)
                    .header("X-Auth-Token", token)
                    .send()
                    .expect("request")
                    .status()
                    .as_u16();
                (status, started.elapsed())
            })
        })
        .collect();
    barrier.wait();
    let mut first_use = std::time::Duration::ZERO;
    if let Some(real) = real {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let started = std::time::Instant::now();
        assert_eq!(server.get(JOBS, Some(real)).status(), 200);
        first_use = started.elapsed();
    }
    let answers: Vec<(u16, std::time::Duration)> = threads
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    let slowest = answers.iter().map(|a| a.1).max().unwrap_or_default();
    (
        answers.into_iter().map(|a| a.0).collect(),
        slowest,
        first_use,
    )
}

#[test]
fn three_hundred_concurrent_requests_with_a_colliding_string_cost_no_argon2_and_the_real_token_stays_fast(
) {
    let (real, twin) = lookup_twins();
    let lab = Lab::new();
    lab.standard();
    lab.ok(&issue_args("alice", TENANT_A, &["--token", &real]));
    let server = lab.serve();
    let (statuses, _, first_use) = at_once(&server, &twin, 300, Some(&real));
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    let spent = verifications(&lab);
    figures(
        "colliding string, new store",
        &[
            ("requests", "300".into()),
            ("argon2_verifications", spent.to_string()),
            ("first_use_ms", first_use.as_millis().to_string()),
        ],
    );
    assert_eq!(
        spent, 1,
        "the real token's one verification, none for the twin"
    );
    assert!(
        first_use < std::time::Duration::from_secs(2),
        "the real token's first use took {first_use:?}"
    );
    // A colliding string answers like an unknown one: no candidate, no argon2.
    let time = |token: &str| {
        let started = std::time::Instant::now();
        assert_401(server.get(JOBS, Some(token)));
        started.elapsed()
    };
    let median = |mut times: Vec<std::time::Duration>| {
        times.sort();
        times[times.len() / 2].as_secs_f64() * 1e3
    };
    let twin_ms = median((0..21).map(|_| time(&twin)).collect());
    let unknown = || uuid::Uuid::new_v4().simple().to_string();
    let unknown_ms = median((0..21).map(|_| time(&unknown())).collect());
    figures(
        "colliding vs unknown",
        &[
            ("twin_median_ms", format!("{twin_ms:.2}")),
            ("unknown_median_ms", format!("{unknown_ms:.2}")),
        ],
    );
    assert_eq!(verifications(&lab), 1);
}

/// A token record as 5ef79c4 wrote it: the lookup is the first 4 bytes of the SHA-256.
fn write_legacy_token(lab: &Lab, user: &str, tenant: &str, token: &str) {
    use sha2::{Digest, Sha256};
    let store = image_replicator::store::open(
        &lab.data_dir(),
        &image_replicator::store::StoreConfig::embedded(),
    )
    .expect("open the store");
    let digest = Sha256::digest(token.as_bytes());
    let lookup = &digest[..4];
    let record = image_replicator::model::TokenRecord {
        info: image_replicator::model::TokenInfo {
            id: uuid::Uuid::new_v4(),
            user: user.into(),
            tenant: tenant.into(),
            created_at: 1_700_000_000,
            expires_at: None,
            revoked_at: None,
        },
        hash: image_replicator::auth::hash(token).expect("hash"),
        lookup: image_replicator::model::to_hex(lookup),
    };
    store.insert_token(&record, lookup).expect("insert");
    store.flush().expect("flush");
}

#[test]
fn a_four_byte_lookup_token_still_works_costs_one_argon2_per_colliding_string_and_is_migrated() {
    let (real, twin) = lookup_twins();
    let lab = Lab::new();
    lab.standard();
    write_legacy_token(&lab, "alice", TENANT_A, &real);
    {
        let server = lab.serve();
        let (statuses, slowest, _) = at_once(&server, &twin, 300, None);
        assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
        let spent = verifications(&lab);
        figures(
            "colliding string, 4-byte lookup",
            &[
                ("requests", "300".into()),
                ("argon2_verifications", spent.to_string()),
                ("slowest_ms", slowest.as_millis().to_string()),
            ],
        );
        assert_eq!(spent, 1, "300 concurrent twins are one verification");
        assert_eq!(server.get(JOBS, Some(&real)).status(), 200);
        assert_eq!(verifications(&lab), 2);
    }
    // Its first use gave the record the full lookup: after a restart the twin has no
    // candidate at all, and the token still works.
    let server = lab.serve();
    for _ in 0..5 {
        assert_401(server.get(JOBS, Some(&twin)));
    }
    assert_eq!(
        verifications(&lab),
        0,
        "the twin no longer matches anything"
    );
    assert_eq!(server.get(JOBS, Some(&real)).status(), 200);
    assert_eq!(verifications(&lab), 1);
}

#[test]
fn a_lifetime_beyond_a_century_is_refused_in_one_line() {
    let lab = Lab::new();
    lab.standard();
    let err = lab.fails(&issue_args(
        "alice",
        TENANT_A,
        &["--expires-in", "9000years"],
    ));
    assert!(err.contains("at most 100 years"), "{err}");
    assert_eq!(err.lines().count(), 1);
    let out = lab.ok(&issue_args("alice", TENANT_A, &["--expires-in", "99years"]));
    assert_eq!(out.trim().len(), 32);
}

fn now_secs_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

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
