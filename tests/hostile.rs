//! Hostile requests (issue 6): a corpus of malformed, truncated, oversized, mistyped and
//! malicious requests, sent byte for byte over raw sockets. Each gets its documented 4xx in the
//! plain-text shape (never a 5xx), and the server stays healthy throughout; then the valid
//! requests are mutated at random and none may get a 5xx or hurt the server.
//!
//! Requests malformed at the HTTP level (a control character in a header, a broken
//! Content-Length, an over-long URI) never reach the application: hyper answers them itself
//! with a bare 400/414/431, or closes. Those are held to "a 4xx or a close, never a 5xx".
//!
//! `HOSTILE_MUTATIONS` sets the number of mutated requests (default 600); `RELIABILITY_SEED`
//! replays a run. Each test prints a `figures:` line, shown with `--nocapture`.

mod common;

use std::collections::BTreeMap;
use std::net::Shutdown;
use std::time::Duration;

use common::raw::{exchange, read_answer, send, Outcome};
use common::*;
use serde_json::json;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
const UNKNOWN_UUID: &str = "7d444840-9dc0-11d1-b245-5ffdce74fad2";
const UNKNOWN_TENANT: &str = "0123456789abcdef0123456789abcdef";

/// The jobs made before any hostile request.
struct Jobs {
    /// alice's, A to A.
    job: String,
    /// bob's, B to B.
    bob_job: String,
}

/// The standard [`Fixture`] and one job each for alice and bob.
fn fixture() -> (Fixture, Jobs) {
    let f = Fixture::new();
    let job = f.server.copy_ok(&f.alice, &f.img_a, TENANT_A);
    let bob_job = f.server.copy_ok(&f.bob, &f.img_b, TENANT_B);
    (f, Jobs { job, bob_job })
}

fn valid_body(f: &Fixture) -> String {
    json!({"image_id": f.img_a, "tenant_id_dst": TENANT_A}).to_string()
}

/// The list with alice's token answers 200.
fn healthy(f: &Fixture) -> bool {
    f.server.get(JOBS, Some(&f.alice)).status() == 200
}

// ===== raw HTTP =====

/// A request, byte for byte: method, target, headers, and a body sent with Content-Length.
/// `Host` and `Connection: close` are added.
fn request(method: &str, target: &str, headers: &[(&str, &[u8])], body: Option<&[u8]>) -> Vec<u8> {
    request_bytes(method.as_bytes(), target.as_bytes(), headers, body)
}

fn request_bytes(
    method: &[u8],
    target: &[u8],
    headers: &[(&str, &[u8])],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(method);
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\nHost: hostile\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(body) = body {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    if let Some(body) = body {
        out.extend_from_slice(body);
    }
    out
}

/// A POST of `body` with chunked transfer encoding, in chunks of 4 KiB.
fn chunked_post(headers: &[(&str, &[u8])], body: &[u8]) -> Vec<u8> {
    let mut all: Vec<(&str, &[u8])> = headers.to_vec();
    all.push(("Transfer-Encoding", b"chunked"));
    let mut out = request("POST", JOBS, &all, None);
    out.extend_from_slice(&chunk_encode(body));
    out
}

// ===== expectations =====

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// The documented status in the plain-text shape, with a request id.
    Shape(u16),
    /// A HEAD request: the status alone (its answer carries no body).
    Head(u16),
    /// Any 4xx in the plain-text shape.
    AnyShape4xx,
    /// Malformed HTTP that hyper refuses before the application: a 4xx or a close.
    Framing,
}

struct Case {
    name: String,
    raw: Vec<u8>,
    expect: Expect,
}

fn case(name: impl Into<String>, raw: Vec<u8>, expect: Expect) -> Case {
    Case {
        name: name.into(),
        raw,
        expect,
    }
}

/// What is wrong with an answer in the plain-text error shape for `code`.
fn shape_problems(outcome: &Outcome, code: Option<u16>) -> Vec<String> {
    let Outcome::Answer { status, body, .. } = outcome else {
        return vec![format!("no answer: {outcome:?}")];
    };
    let mut wrong = Vec::new();
    if let Some(code) = code {
        if *status != code {
            wrong.push(format!("status {status}, not {code}"));
        }
    } else if !(400..500).contains(status) {
        wrong.push(format!("status {status}, not a 4xx"));
    }
    if outcome.header("content-type") != Some("text/plain; charset=UTF-8") {
        wrong.push(format!("content-type {:?}", outcome.header("content-type")));
    }
    let request_id = outcome.header("x-openstack-request-id").unwrap_or("");
    let id_ok = request_id
        .strip_prefix("req-")
        .is_some_and(|u| uuid::Uuid::try_parse(u).is_ok());
    if !id_ok {
        wrong.push(format!("request id {request_id:?}"));
    }
    let text = String::from_utf8_lossy(body).into_owned();
    let reason = reqwest::StatusCode::from_u16(*status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("?");
    let head = format!("{status} {reason}\n\n");
    match text
        .strip_prefix(&head)
        .and_then(|rest| rest.strip_suffix("\n\n"))
    {
        None => wrong.push(format!(
            "body {:?} is not in the plain-text shape",
            clip(&text)
        )),
        Some(sentence) => {
            if sentence.is_empty() || !sentence.ends_with('.') {
                wrong.push(format!("sentence {:?} is not a sentence", clip(sentence)));
            }
            if let Some(c) = sentence.chars().find(|c| c.is_control()) {
                wrong.push(format!(
                    "sentence {:?} holds the control character {c:?}",
                    clip(sentence)
                ));
            }
        }
    }
    if *status == 401 {
        if text != BODY_401 {
            wrong.push(format!("401 body {:?}", clip(&text)));
        }
        if outcome.header("vary") != Some("X-Auth-Token") {
            wrong.push("401 without Vary: X-Auth-Token".into());
        }
    }
    wrong
}

fn clip(text: &str) -> String {
    if text.chars().count() > 160 {
        format!("{}…", text.chars().take(160).collect::<String>())
    } else {
        text.to_string()
    }
}

fn judge(expect: Expect, outcome: &Outcome) -> Vec<String> {
    if outcome.status().is_some_and(|s| s >= 500) {
        return vec![format!("a 5xx: {outcome:?}")];
    }
    match expect {
        Expect::Shape(code) => shape_problems(outcome, Some(code)),
        Expect::AnyShape4xx => shape_problems(outcome, None),
        Expect::Head(code) => match outcome.status() {
            Some(s) if s == code => Vec::new(),
            other => vec![format!("status {other:?}, not {code}")],
        },
        Expect::Framing => match outcome {
            Outcome::Answer { status, .. } if (400..500).contains(status) => Vec::new(),
            Outcome::Closed => Vec::new(),
            other => vec![format!("neither a 4xx nor a close: {other:?}")],
        },
    }
}

/// Runs the cases in order, checking the server's health every 16; returns the answers seen
/// (status or "closed"/"hung" → count) and every problem.
fn run(f: &Fixture, cases: &[Case]) -> (BTreeMap<String, usize>, Vec<String>) {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut problems = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let outcome = exchange(&f.server.addr(), &c.raw, Duration::from_secs(10));
        let key = match &outcome {
            Outcome::Answer { status, .. } => status.to_string(),
            Outcome::Closed => "closed".into(),
            Outcome::Hung => "hung".into(),
        };
        *seen.entry(key).or_default() += 1;
        for p in judge(c.expect, &outcome) {
            problems.push(format!("{} (expected {:?}): {p}", c.name, c.expect));
        }
        if i % 16 == 15 {
            assert!(healthy(f), "the server is unhealthy after case {}", c.name);
        }
    }
    (seen, problems)
}

/// [`run`], then [`final_health`]: the answers seen and every problem.
fn run_then_check_health(
    f: &mut Fixture,
    cases: &[Case],
) -> (BTreeMap<String, usize>, Vec<String>) {
    let (seen, mut problems) = run(f, cases);
    problems.extend(final_health(f));
    (seen, problems)
}

fn assert_no_problems(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

fn final_health(f: &mut Fixture) -> Vec<String> {
    let mut problems = Vec::new();
    if !matches!(f.server.child.try_wait(), Ok(None)) {
        problems.push("the server process is gone".into());
    }
    if !healthy(f) {
        problems.push("the list no longer answers 200".into());
    }
    let resp = f.server.copy(&f.alice, &f.img_a, TENANT_A);
    if resp.status() != 202 {
        problems.push(format!("a valid copy now answers {}", resp.status()));
    }
    for line in f
        .server
        .log_text()
        .lines()
        .filter(|l| l.contains("panicked"))
    {
        problems.push(format!("log: {line}"));
    }
    problems
}

// ===== the corpus =====

/// Header lines as (name, raw value).
type Headers<'a> = Vec<(&'a str, &'a [u8])>;

/// POSTs `body` as alice with `Content-Type: application/json`.
fn post(f: &Fixture, body: &[u8]) -> Vec<u8> {
    request(
        "POST",
        JOBS,
        &[
            ("X-Auth-Token", f.alice.as_bytes()),
            ("Content-Type", b"application/json"),
        ],
        Some(body),
    )
}

fn get_with_token(target: &str, token: &[u8]) -> Vec<u8> {
    request("GET", target, &[("X-Auth-Token", token)], None)
}

fn corpus(f: &Fixture, made: &Jobs) -> Vec<Case> {
    use Expect::*;
    let mut cases = Vec::new();
    let valid = valid_body(f);
    let img = f.img_a.as_str();
    let alice = f.alice.as_bytes();
    let json_ct: (&str, &[u8]) = ("Content-Type", b"application/json");

    // --- bodies that are not JSON, or truncated, or not one object ---
    let malformed: Vec<String> = vec![
        String::new(),
        " ".into(),
        "\r\n".into(),
        "{".into(),
        "}".into(),
        "{{}}".into(),
        "[".into(),
        r#"{"image_id""#.into(),
        r#"{"image_id":"#.into(),
        r#"{"image_id": "x""#.into(),
        r#"{"image_id": "x",}"#.into(),
        format!("{{'image_id': '{img}', 'tenant_id_dst': '{TENANT_A}'}}"),
        format!("{{image_id: \"{img}\", tenant_id_dst: \"{TENANT_A}\"}}"),
        r#"{"image_id" "x"}"#.into(),
        format!(r#"{{"image_id": "{img}" "tenant_id_dst": "{TENANT_A}"}}"#),
        "nul".into(),
        "tru".into(),
        "\"unterminated".into(),
        format!(r#"{{"image_id": "\u12", "tenant_id_dst": "{TENANT_A}"}}"#),
        format!(r#"{{"image_id": "\ud800", "tenant_id_dst": "{TENANT_A}"}}"#),
        format!(r#"{{"image_id": NaN, "tenant_id_dst": "{TENANT_A}"}}"#),
        format!(r#"{{"image_id": Infinity, "tenant_id_dst": "{TENANT_A}"}}"#),
        format!(r#"{{"image_id": 1e999, "tenant_id_dst": "{TENANT_A}"}}"#),
        format!("/* comment */ {valid}"),
        format!("\u{feff}{valid}"),
        format!("{valid} x"),
        format!("{valid}{valid}"),
        format!("{valid}\0"),
        format!("{{\"image_id\": \"{img}\u{1}\", \"tenant_id_dst\": \"{TENANT_A}\"}}"),
    ];
    for (i, body) in malformed.iter().enumerate() {
        cases.push(case(
            format!("malformed #{i}"),
            post(f, body.as_bytes()),
            Shape(400),
        ));
    }
    for cut in (1..valid.len()).step_by(7) {
        cases.push(case(
            format!("truncated at {cut}"),
            post(f, &valid.as_bytes()[..cut]),
            Shape(400),
        ));
    }

    // --- wrong types, nulls, arrays ---
    let wrong_values = [
        "1",
        "1.5",
        "-0",
        "true",
        "false",
        "null",
        "[]",
        "{}",
        &format!("[\"{img}\"]"),
        &format!("{{\"id\": \"{img}\"}}"),
    ];
    for value in wrong_values {
        let body = format!(r#"{{"image_id": {value}, "tenant_id_dst": "{TENANT_A}"}}"#);
        cases.push(case(
            format!("image_id = {value}"),
            post(f, body.as_bytes()),
            Shape(400),
        ));
        let body = format!(r#"{{"image_id": "{img}", "tenant_id_dst": {value}}}"#);
        cases.push(case(
            format!("tenant_id_dst = {value}"),
            post(f, body.as_bytes()),
            Shape(400),
        ));
    }
    for body in [
        "null".to_string(),
        "true".into(),
        "0".into(),
        "\"a string\"".into(),
        "[]".into(),
        format!("[\"{img}\", \"{TENANT_A}\"]"),
        format!("[{valid}]"),
    ] {
        cases.push(case(
            format!("body {}", clip(&body)),
            post(f, body.as_bytes()),
            Shape(400),
        ));
    }

    // --- deep nesting, within the size limit ---
    let deep_value = format!(
        r#"{{"image_id": {}{}, "tenant_id_dst": "{TENANT_A}"}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let deep_array = format!("{}{}", "[".repeat(8000), "]".repeat(8000));
    let deep_object = format!("{}1{}", r#"{"a":"#.repeat(1500), "}".repeat(1500));
    for (name, body) in [
        ("5000-deep array value", deep_value),
        ("8000-deep array", deep_array),
        ("1500-deep object", deep_object),
    ] {
        cases.push(case(name, post(f, body.as_bytes()), Shape(400)));
    }

    // --- duplicate, extra, misnamed and missing keys ---
    let keyed = [
        format!(r#"{{"image_id": "{img}", "image_id": "{img}", "tenant_id_dst": "{TENANT_A}"}}"#),
        format!(
            r#"{{"image_id": "{img}", "image_id": "{UNKNOWN_UUID}", "tenant_id_dst": "{TENANT_A}"}}"#
        ),
        format!(
            r#"{{"image_id": "{img}", "tenant_id_dst": "{TENANT_A}", "tenant_id_dst": "{TENANT_A}"}}"#
        ),
        format!(r#"{{"image_id": "{img}", "tenant_id_dst": "{TENANT_A}", "x": 1}}"#),
        format!(r#"{{"image_id": "{img}", "tenant_id_dst": "{TENANT_A}", "__proto__": {{}}}}"#),
        format!(r#"{{"IMAGE_ID": "{img}", "tenant_id_dst": "{TENANT_A}"}}"#),
        format!(r#"{{"image_id ": "{img}", "tenant_id_dst": "{TENANT_A}"}}"#),
        format!(r#"{{"": 1, "image_id": "{img}", "tenant_id_dst": "{TENANT_A}"}}"#),
        format!(r#"{{"image_id": "{img}"}}"#),
        format!(r#"{{"tenant_id_dst": "{TENANT_A}"}}"#),
        "{}".to_string(),
    ];
    for (i, body) in keyed.iter().enumerate() {
        cases.push(case(
            format!("keys #{i}"),
            post(f, body.as_bytes()),
            Shape(400),
        ));
    }

    // --- long strings within the limit, invalid UTF-8, values that are not ids ---
    let long_image = format!(
        r#"{{"image_id": "{}", "tenant_id_dst": "{TENANT_A}"}}"#,
        "a".repeat(16_000)
    );
    let long_tenant = format!(
        r#"{{"image_id": "{img}", "tenant_id_dst": "{}"}}"#,
        "f".repeat(16_000)
    );
    cases.push(case(
        "16000-char image_id",
        post(f, long_image.as_bytes()),
        Shape(400),
    ));
    cases.push(case(
        "16000-char tenant_id_dst",
        post(f, long_tenant.as_bytes()),
        Shape(400),
    ));
    let utf8: [&[u8]; 5] = [
        b"\xff\xfe",
        b"\xc0\xaf",
        b"\xe2\x82",
        b"\xed\xa0\x80",
        b"a\x80b",
    ];
    for (i, bad) in utf8.iter().enumerate() {
        let mut body = br#"{"image_id": ""#.to_vec();
        body.extend_from_slice(bad);
        body.extend_from_slice(format!(r#"", "tenant_id_dst": "{TENANT_A}"}}"#).as_bytes());
        cases.push(case(
            format!("invalid UTF-8 value #{i}"),
            post(f, &body),
            Shape(400),
        ));
    }
    let mut bad_key = b"{\"\xff\xfe\": 1, ".to_vec();
    bad_key.extend_from_slice(&valid.as_bytes()[1..]);
    cases.push(case("invalid UTF-8 key", post(f, &bad_key), Shape(400)));
    for id in [
        "not-a-uuid",
        "",
        " ",
        "00000000-0000-0000-0000-00000000000g",
        "../../etc/passwd",
        &format!("{img}x"),
        &format!("{img}/../{img}"),
    ] {
        let body = json!({"image_id": id, "tenant_id_dst": TENANT_A}).to_string();
        cases.push(case(
            format!("image_id {id:?}"),
            post(f, body.as_bytes()),
            Shape(400),
        ));
    }
    for tenant in [
        "",
        "xyz",
        "../..",
        &TENANT_A[..31],
        &format!("{TENANT_A}0"),
        "236ae314-ef69-44f4-ab98-fa7519e54325x",
        "g36ae314ef6944f4ab98fa7519e54325",
    ] {
        let body = json!({"image_id": img, "tenant_id_dst": tenant}).to_string();
        cases.push(case(
            format!("tenant_id_dst {tenant:?}"),
            post(f, body.as_bytes()),
            Shape(400),
        ));
    }

    // --- well-formed requests for what does not exist or is not theirs ---
    let body = json!({"image_id": UNKNOWN_UUID, "tenant_id_dst": TENANT_A}).to_string();
    cases.push(case("unknown image", post(f, body.as_bytes()), Shape(404)));
    let body = json!({"image_id": img, "tenant_id_dst": UNKNOWN_TENANT}).to_string();
    cases.push(case("unknown tenant", post(f, body.as_bytes()), Shape(404)));
    let body = json!({"image_id": img, "tenant_id_dst": TENANT_B}).to_string();
    cases.push(case(
        "a tenant alice is not in",
        post(f, body.as_bytes()),
        Shape(401),
    ));

    // --- bodies over the limit, with and without Content-Length ---
    let mut over = valid.clone().into_bytes();
    over.resize(16 * KIB + 1, b' ');
    let mib_string = format!(
        r#"{{"image_id": "{}", "tenant_id_dst": "{TENANT_A}"}}"#,
        "a".repeat(MIB)
    );
    let auth: [(&str, &[u8]); 2] = [("X-Auth-Token", alice), json_ct];
    cases.push(case(
        "16 KiB + 1, Content-Length",
        post(f, &over),
        Shape(413),
    ));
    cases.push(case(
        "16 KiB + 1, chunked",
        chunked_post(&auth, &over),
        Shape(413),
    ));
    cases.push(case(
        "1 MiB string, Content-Length",
        post(f, mib_string.as_bytes()),
        Shape(413),
    ));
    cases.push(case(
        "1 MiB string, chunked",
        chunked_post(&auth, mib_string.as_bytes()),
        Shape(413),
    ));
    let mut gib = request("POST", JOBS, &[("X-Auth-Token", alice), json_ct], None);
    let at = gib.len() - 2;
    gib.splice(at..at, b"Content-Length: 1073741824\r\n".iter().copied());
    gib.extend_from_slice(b"{\"image_id\"");
    cases.push(case("1 GiB declared", gib, Shape(413)));
    cases.push(case(
        "over the limit without a token",
        request("POST", JOBS, &[json_ct], Some(&over)),
        Shape(401),
    ));

    // --- content types ---
    let content_types: [&[u8]; 9] = [
        b"text/plain",
        b"application/x-www-form-urlencoded",
        b"multipart/form-data; boundary=x",
        b"",
        b"application/jsonx",
        b"json",
        b"application/\xffjson",
        b"application/json-patch+json",
        b"application/xml",
    ];
    for ct in content_types {
        cases.push(case(
            format!("Content-Type {:?}", String::from_utf8_lossy(ct)),
            request(
                "POST",
                JOBS,
                &[("X-Auth-Token", alice), ("Content-Type", ct)],
                Some(valid.as_bytes()),
            ),
            Shape(415),
        ));
    }
    cases.push(case(
        "no Content-Type",
        request(
            "POST",
            JOBS,
            &[("X-Auth-Token", alice)],
            Some(valid.as_bytes()),
        ),
        Shape(415),
    ));

    // --- X-Auth-Token: missing, empty, repeated, malformed ---
    let upper = f.alice.to_ascii_uppercase();
    let short = &f.alice[..31];
    let longer = format!("{}x", f.alice);
    let bearer = format!("Bearer {}", f.alice);
    let too_long = "t".repeat(257);
    let bad_tokens: Vec<(&str, Headers)> = vec![
        ("no token", vec![]),
        ("empty token", vec![("X-Auth-Token", b"")]),
        (
            "repeated token",
            vec![("X-Auth-Token", alice), ("X-Auth-Token", alice)],
        ),
        (
            "token and garbage",
            vec![
                ("X-Auth-Token", alice),
                ("X-Auth-Token", b"garbage-garbage"),
            ],
        ),
        ("7 characters", vec![("X-Auth-Token", b"abcdefg")]),
        (
            "257 characters",
            vec![("X-Auth-Token", too_long.as_bytes())],
        ),
        ("space inside", vec![("X-Auth-Token", b"abcd efgh ijkl")]),
        ("tab inside", vec![("X-Auth-Token", b"abcd\tefgh")]),
        ("upper case", vec![("X-Auth-Token", upper.as_bytes())]),
        ("obs-text", vec![("X-Auth-Token", b"abc\xffdefghij")]),
        ("Bearer prefix", vec![("X-Auth-Token", bearer.as_bytes())]),
        (
            "one more character",
            vec![("X-Auth-Token", longer.as_bytes())],
        ),
        (
            "one less character",
            vec![("X-Auth-Token", short.as_bytes())],
        ),
        ("Authorization instead", vec![("Authorization", alice)]),
    ];
    for (name, headers) in &bad_tokens {
        cases.push(case(
            format!("GET, {name}"),
            request("GET", JOBS, headers, None),
            Shape(401),
        ));
    }
    for (name, headers) in &bad_tokens[..4] {
        let mut with_type = headers.clone();
        with_type.push(json_ct);
        cases.push(case(
            format!("POST, {name}"),
            request("POST", JOBS, &with_type, Some(valid.as_bytes())),
            Shape(401),
        ));
    }
    let job_path = format!("{JOBS}/{}", made.job);
    for (name, headers) in &bad_tokens[..3] {
        cases.push(case(
            format!("DELETE, {name}"),
            request("DELETE", &job_path, headers, None),
            Shape(401),
        ));
    }

    // --- job ids that are not, traversals, encodings, other tenants' ---
    let ids: Vec<String> = vec![
        "x".into(),
        "null".into(),
        "0".into(),
        "-1".into(),
        "'%20OR%201=1--".into(),
        "%3Cscript%3Ealert(1)%3C%2Fscript%3E".into(),
        "%00".into(),
        "%0a".into(),
        "%20".into(),
        "..%2f..%2fetc%2fpasswd".into(),
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd".into(),
        "..%5c..%5cwindows".into(),
        "%252e%252e%252f".into(),
        "..;".into(),
        ".".into(),
        "..".into(),
        "~root".into(),
        "%ff%fe".into(),
        format!("{{{UNKNOWN_UUID}}}"),
        format!("urn:uuid:{UNKNOWN_UUID}"),
        format!("{UNKNOWN_UUID}%00"),
        format!("{}%2F", made.job),
        format!("..%2f{}", made.job),
        "a".repeat(4096),
        "a".repeat(60_000),
        made.bob_job.clone(),
    ];
    for id in &ids {
        let target = format!("{JOBS}/{id}");
        // A request line and headers over 16 KiB are a 431 (issue 13), in the same shape.
        let expect = if target.len() > 16 * 1024 {
            Shape(431)
        } else {
            Shape(404)
        };
        for method in ["GET", "DELETE"] {
            cases.push(case(
                format!("{method} job {}", clip(id)),
                request(method, &target, &[("X-Auth-Token", alice)], None),
                expect,
            ));
        }
    }

    // --- list parameters ---
    let marker = format!("marker={}", made.bob_job);
    for query in [
        "limit=-1",
        "limit=1e3",
        "limit=99999999999999999999999",
        "limit=",
        "limit=0x10",
        "status=",
        "status=REPLICATED",
        "marker=x",
        "marker=",
        marker.as_str(),
        "limit=1&limit=1",
        "foo=bar",
        "%ff=1",
        "status",
        "=",
        "limit=1;status=error",
    ] {
        cases.push(case(
            format!("list ?{}", clip(query)),
            get_with_token(&format!("{JOBS}?{query}"), alice),
            Shape(400),
        ));
    }

    // --- methods ---
    for method in [
        "PUT", "PATCH", "OPTIONS", "TRACE", "FOO", "get", "M-SEARCH", "CONNECT",
    ] {
        cases.push(case(
            format!("{method} on the jobs"),
            request(
                method,
                JOBS,
                &[("X-Auth-Token", alice), json_ct],
                Some(b"{}"),
            ),
            Shape(405),
        ));
    }
    for method in ["POST", "PUT", "PATCH"] {
        cases.push(case(
            format!("{method} on a job"),
            request(
                method,
                &job_path,
                &[("X-Auth-Token", alice), json_ct],
                Some(b"{}"),
            ),
            Shape(405),
        ));
    }
    cases.push(case(
        "PUT without a token",
        request("PUT", JOBS, &[], None),
        Shape(405),
    ));
    cases.push(case(
        "POST on a job without a token",
        request("POST", &job_path, &[], Some(b"{}")),
        Shape(405),
    ));
    cases.push(case(
        "HEAD on the jobs",
        request("HEAD", JOBS, &[("X-Auth-Token", alice)], None),
        Head(405),
    ));
    cases.push(case(
        "HEAD on a job",
        request("HEAD", &job_path, &[("X-Auth-Token", alice)], None),
        Head(405),
    ));

    // --- paths ---
    let encoded_slash = format!("{JOBS}%2f{}", made.job);
    for path in [
        "*",
        "/v3/",
        "//v2/extension/image_replicator/jobs",
        &format!("{JOBS}/"),
        &format!("{JOBS}//"),
        &format!("{JOBS}/./x"),
        &format!("{JOBS}/../jobs"),
        &encoded_slash,
        "/V2/EXTENSION/IMAGE_REPLICATOR/JOBS",
        "http://evil.example/v2/other",
    ] {
        cases.push(case(
            format!("path {path}"),
            get_with_token(path, alice),
            Shape(404),
        ));
    }

    // --- chunked oddities ---
    // A chunked POST as alice with `extra` headers before Transfer-Encoding; `raw` is the body.
    let chunked_raw = |extra: &[(&str, &[u8])], raw: &[u8]| {
        let mut headers: Headers = vec![("X-Auth-Token", alice), json_ct];
        headers.extend_from_slice(extra);
        headers.push(("Transfer-Encoding", b"chunked"));
        let mut out = request("POST", JOBS, &headers, None);
        out.extend_from_slice(raw);
        out
    };
    cases.push(case(
        "chunk size zz",
        chunked_raw(&[], b"zz\r\n{}\r\n0\r\n\r\n"),
        Shape(400),
    ));
    cases.push(case(
        "chunk size overflow",
        chunked_raw(&[], b"ffffffffffffffffff\r\n{}\r\n0\r\n\r\n"),
        Shape(400),
    ));
    let typed = format!(r#"{{"image_id": 1, "tenant_id_dst": "{TENANT_A}"}}"#);
    cases.push(case(
        "chunked wrong type",
        chunked_post(&auth, typed.as_bytes()),
        Shape(400),
    ));
    cases.push(case(
        "chunked and Content-Length",
        chunked_raw(&[("Content-Length", b"5")], b"2\r\n{}\r\n0\r\n\r\n"),
        Shape(400),
    ));
    cases.push(case(
        "chunk extension",
        chunked_raw(&[], b"2;name=value\r\n{}\r\n0\r\n\r\n"),
        Shape(400),
    ));

    cases
}

/// Malformed HTTP: hyper refuses it before the application sees it.
fn framing_corpus(f: &Fixture) -> Vec<Case> {
    let alice = f.alice.as_bytes();
    let mut cases = Vec::new();
    for (name, token) in [
        ("NUL in a token", b"abc\x00defghij".as_slice()),
        ("SOH in a token", b"abc\x01defghij"),
        ("ESC in a token", b"abc\x1b[31mdefghij"),
        ("DEL in a token", b"abc\x7fdefghij"),
        ("CR in a token", b"abc\rdefghij"),
    ] {
        cases.push(case(name, get_with_token(JOBS, token), Expect::Framing));
    }
    let line = |text: &str| -> Vec<u8> {
        let mut raw = format!("GET {JOBS} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: ").into_bytes();
        raw.extend_from_slice(alice);
        raw.extend_from_slice(b"\r\n");
        raw.extend_from_slice(text.as_bytes());
        raw.extend_from_slice(b"Connection: close\r\n\r\n");
        raw
    };
    for (name, extra) in [
        ("folded header", "X-Other: a\r\n folded\r\n"),
        ("space before colon", "X-Other : a\r\n"),
        ("header without colon", "X-Other\r\n"),
        ("Content-Length abc", "Content-Length: abc\r\n"),
        ("Content-Length -1", "Content-Length: -1\r\n"),
        (
            "Content-Length huge",
            "Content-Length: 99999999999999999999999\r\n",
        ),
        (
            "two Content-Lengths",
            "Content-Length: 2\r\nContent-Length: 3\r\n",
        ),
        ("Content-Length list", "Content-Length: 1, 2\r\n"),
        ("Transfer-Encoding gzip", "Transfer-Encoding: gzip\r\n"),
    ] {
        cases.push(case(name, line(extra), Expect::Framing));
    }
    let many: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    cases.push(case("120 headers", line(&many), Expect::Framing));
    let huge = format!("X-Auth-Token-2: {}\r\n", "a".repeat(MIB));
    cases.push(case("1 MiB header", line(&huge), Expect::Framing));
    for (name, raw) in [
        (
            "HTTP/9.9",
            format!("GET {JOBS} HTTP/9.9\r\nHost: x\r\n\r\n").into_bytes(),
        ),
        ("HTTP/0.9", b"GET /\r\n\r\n".to_vec()),
        ("garbage line", b"HELLO\r\n\r\n".to_vec()),
        ("method only", b"GET\r\n\r\n".to_vec()),
        (
            "double space",
            format!("GET  {JOBS} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes(),
        ),
        (
            "NUL in the path",
            b"GET /v2/\x00 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "byte 0xff in the path",
            b"GET /v2/\xff HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "70 KB URI",
            get_with_token(&format!("{JOBS}/{}", "a".repeat(70_000)), alice),
        ),
        (
            "1 MiB URI",
            get_with_token(&format!("{JOBS}?marker={}", "a".repeat(MIB)), alice),
        ),
    ] {
        cases.push(case(name, raw, Expect::Framing));
    }
    cases
}

#[test]
fn hostile_requests_get_their_documented_4xx_in_the_plain_text_shape() {
    let (mut f, made) = fixture();
    let cases = corpus(&f, &made);
    assert!(cases.len() >= 100, "only {} cases", cases.len());
    let (seen, mut problems) = run_then_check_health(&mut f, &cases);
    // The only jobs are the fixture's and the final health check's: nothing hostile got in.
    let listed = jobs(f.server.get(JOBS, Some(&f.alice)));
    if listed.len() != 2 {
        problems.push(format!("{} jobs exist, not 2", listed.len()));
    }
    figures(
        "hostile corpus",
        &[
            ("cases", cases.len().to_string()),
            ("answers", format!("{seen:?}").replace(' ', "")),
            ("problems", problems.len().to_string()),
        ],
    );
    assert_no_problems(&problems);
}

#[test]
fn malformed_http_gets_a_4xx_or_a_close_never_a_5xx() {
    let (mut f, _made) = fixture();
    let cases = framing_corpus(&f);
    let (seen, problems) = run_then_check_health(&mut f, &cases);
    // What hyper answers itself is not in the plain-text shape: counted, for the record.
    let bare = cases
        .iter()
        .filter(|c| {
            let outcome = exchange(&f.server.addr(), &c.raw, Duration::from_secs(10));
            matches!(outcome, Outcome::Answer { .. }) && !shape_problems(&outcome, None).is_empty()
        })
        .count();
    figures(
        "malformed HTTP",
        &[
            ("cases", cases.len().to_string()),
            ("answers", format!("{seen:?}").replace(' ', "")),
            ("answered_outside_the_plain_text_shape", bare.to_string()),
            ("problems", problems.len().to_string()),
        ],
    );
    assert_no_problems(&problems);
}

/// The client's input must not shape the answer: control characters it sends are not echoed
/// raw, and input ending in `!` or `?` does not stand in for the sentence's full stop.
#[test]
fn error_sentences_are_not_shaped_by_client_input() {
    let (mut f, _made) = fixture();
    let img = f.img_a.clone();
    let alice = f.alice.clone();
    let mut cases = Vec::new();
    for key in ["a\nb", "x\r\ny", "\u{0}", "\u{1b}[31mred"] {
        let body = json!({key: 1, "image_id": img, "tenant_id_dst": TENANT_A}).to_string();
        cases.push(case(
            format!("key {key:?}"),
            post(&f, body.as_bytes()),
            Expect::Shape(400),
        ));
    }
    let body = json!({"image_id": "a\nb", "tenant_id_dst": TENANT_A}).to_string();
    cases.push(case(
        "image_id with LF",
        post(&f, body.as_bytes()),
        Expect::Shape(400),
    ));
    let body = json!({"image_id": img, "tenant_id_dst": "a\r\nb"}).to_string();
    cases.push(case(
        "tenant_id_dst with CRLF",
        post(&f, body.as_bytes()),
        Expect::Shape(400),
    ));
    for query in [
        "limit=%0A1",
        "status=a%0D%0Ab",
        "status=replicated%00",
        "%0A=1",
        "marker=%0A%1B",
    ] {
        cases.push(case(
            format!("list ?{query}"),
            get_with_token(&format!("{JOBS}?{query}"), alice.as_bytes()),
            Expect::Shape(400),
        ));
    }
    for id in ["!", "wow!", "what%3F"] {
        for method in ["GET", "DELETE"] {
            cases.push(case(
                format!("{method} job {id}"),
                request(
                    method,
                    &format!("{JOBS}/{id}"),
                    &[("X-Auth-Token", alice.as_bytes())],
                    None,
                ),
                Expect::Shape(404),
            ));
        }
    }
    let (_, problems) = run_then_check_health(&mut f, &cases);
    figures(
        "sentences shaped by input",
        &[
            ("cases", cases.len().to_string()),
            ("problems", problems.len().to_string()),
        ],
    );
    assert_no_problems(&problems);
}

/// A target that is not a path (authority form, whatever the method) never reaches warp's
/// path filters, which panic on it: a 4xx in the plain-text shape, and no panic in the log.
#[test]
fn a_request_target_without_a_path_gets_a_4xx_not_a_panic() {
    let (mut f, _made) = fixture();
    let raw = |method: &str, target: &str| {
        format!(
            "{method} {target} HTTP/1.1\r\nHost: {target}\r\nX-Auth-Token: {}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n",
            f.alice
        )
        .into_bytes()
    };
    let cases = vec![
        case(
            "CONNECT host:port",
            raw("CONNECT", "127.0.0.1:22"),
            Expect::AnyShape4xx,
        ),
        case(
            "CONNECT name:443",
            raw("CONNECT", "evil.example:443"),
            Expect::AnyShape4xx,
        ),
        case(
            "GET host:port",
            raw("GET", "127.0.0.1:22"),
            Expect::AnyShape4xx,
        ),
        case(
            "POST name:80",
            raw("POST", "evil.example:80"),
            Expect::AnyShape4xx,
        ),
        case("DELETE a:1", raw("DELETE", "a:1"), Expect::AnyShape4xx),
    ];
    let (seen, problems) = run_then_check_health(&mut f, &cases);
    figures(
        "targets without a path",
        &[("answers", format!("{seen:?}").replace(' ', ""))],
    );
    assert_no_problems(&problems);
}

// ===== mutations =====

const INTERESTING: [u8; 16] = [
    0x00, b'\r', b'\n', b':', b' ', b'{', b'}', b'"', b'\\', 0xff, b'0', b'%', b'/', 0x7f, b'\t',
    b',',
];

/// One to four random edits of `seed`: bit flips, interesting bytes, insertions, deletions,
/// duplications, truncations, splices from `other`.
fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for _ in 0..1 + rng.index(4) {
        let len = out.len().max(1);
        let at = rng.index(len).min(out.len());
        match rng.index(7) {
            0 if at < out.len() => out[at] ^= 1 << rng.index(8),
            1 if at < out.len() => out[at] = INTERESTING[rng.index(INTERESTING.len())],
            2 => {
                let bytes: Vec<u8> = (0..1 + rng.index(16)).map(|_| rng.next() as u8).collect();
                out.splice(at..at, bytes);
            }
            3 => {
                let end = (at + 1 + rng.index(32)).min(out.len());
                out.drain(at..end);
            }
            4 => {
                let end = (at + 1 + rng.index(64)).min(out.len());
                let copy = out[at..end].to_vec();
                out.splice(at..at, copy);
            }
            5 => out.truncate(at),
            _ => {
                let from = rng.index(other.len().max(1)).min(other.len());
                let end = (from + 1 + rng.index(64)).min(other.len());
                out.splice(at..at, other[from..end].iter().copied());
            }
        }
    }
    out
}

#[test]
fn mutated_requests_never_get_a_5xx_and_the_server_stays_healthy() {
    let count = env_count("HOSTILE_MUTATIONS", 600);
    let seed = Rng::for_test("mutations").0;
    let (mut f, made) = fixture();
    let alice = f.alice.as_bytes();
    let json_ct: (&str, &[u8]) = ("Content-Type", b"application/json");
    let valid = valid_body(&f);
    let seeds: Vec<Vec<u8>> = vec![
        get_with_token(JOBS, alice),
        get_with_token(&format!("{JOBS}/{}", made.job), alice),
        get_with_token(&format!("{JOBS}?status=replicate_requested&limit=1"), alice),
        request(
            "DELETE",
            &format!("{JOBS}/{UNKNOWN_UUID}"),
            &[("X-Auth-Token", alice)],
            None,
        ),
        post(&f, valid.as_bytes()),
        chunked_post(&[("X-Auth-Token", alice), json_ct], valid.as_bytes()),
    ];
    let threads = 16;
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (addr, seeds) = (f.server.addr(), seeds.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(seed ^ (t as u64).wrapping_mul(0x5851_f42d_4c95_7f2d));
                let mut seen: BTreeMap<String, usize> = BTreeMap::new();
                let mut five_xx = Vec::new();
                for _ in 0..count.div_ceil(threads) {
                    let base = &seeds[rng.index(seeds.len())];
                    let other = &seeds[rng.index(seeds.len())];
                    let raw = mutate(&mut rng, base, other);
                    let mut stream = send(&addr, &raw);
                    let mut outcome = read_answer(&mut stream, Duration::from_millis(400));
                    let mut waited = "";
                    if matches!(outcome, Outcome::Hung) {
                        // The server waits for bytes that will never come (a Content-Length
                        // made larger, a head never ended): say so, as a client would.
                        let _ = stream.shutdown(Shutdown::Write);
                        outcome = read_answer(&mut stream, Duration::from_secs(3));
                        waited = "_after_half_close";
                    }
                    let key = match &outcome {
                        Outcome::Answer { status, .. } => format!("{}xx{waited}", status / 100),
                        Outcome::Closed => format!("closed{waited}"),
                        Outcome::Hung => "hung".into(),
                    };
                    *seen.entry(key).or_default() += 1;
                    if outcome.status().is_some_and(|s| s >= 500) {
                        five_xx.push(String::from_utf8_lossy(&raw).into_owned());
                    }
                }
                (seen, five_xx)
            })
        })
        .collect();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut five_xx = Vec::new();
    for worker in workers {
        let (s, x) = worker.join().expect("mutation thread");
        for (k, n) in s {
            *seen.entry(k).or_default() += n;
        }
        five_xx.extend(x);
    }
    let problems = final_health(&mut f);
    figures(
        "mutations",
        &[
            ("requests", (count.div_ceil(threads) * threads).to_string()),
            ("answers", format!("{seen:?}").replace(' ', "")),
            ("five_xx", five_xx.len().to_string()),
        ],
    );
    assert!(five_xx.is_empty(), "5xx for: {five_xx:#?}");
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(
        seen.get("hung"),
        None,
        "requests neither answered nor closed"
    );
}
