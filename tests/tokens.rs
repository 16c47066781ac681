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
    assert_eq!(verifications(&lab), 1, "the failed twin is remembered");
    assert_eq!(server.get(JOBS, Some(&real)).status(), 200);
    assert_eq!(verifications(&lab), 2);
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
