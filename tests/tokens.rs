//! Tokens: never at rest in plaintext, and argon2 paid once per token, never for garbage.

mod common;

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
    let store = image_replicator::store::open(&lab.data_dir()).expect("open the store");
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
