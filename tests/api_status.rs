//! One test per status-code row of API.md, through the real server.

mod common;

use std::time::Duration;

use common::*;
use image_replicator::model::JOB_KEYS;
use reqwest::blocking::Response;
use serde_json::{json, Value};

const UNKNOWN_UUID: &str = "7d444840-9dc0-11d1-b245-5ffdce74fad2";
const OTHER_UNKNOWN_UUID: &str = "0c6f1a9e-3b1d-4f5e-8a2b-9d7c6e5f4a3b";

/// A job in the list format with all ten keys, for `job seed`.
fn seeded_job(id: &str, status: &str, tenant: &str) -> Value {
    json!({
        "copy_progress": if status == "replicated" { 100 } else { 40 },
        "destination_image_id": if status == "replicated" {
            json!("e3b0c442-98fc-4c14-9afb-f4c8996fb924")
        } else {
            Value::Null
        },
        "destination_region_id": "ot2",
        "destination_tenant_id": TENANT_B,
        "job_id": id,
        "source_image_id": "9b805919-8acb-4880-8904-cd2f9a32c1ad",
        "source_image_name": "Seeded-image",
        "source_region_id": "ot1",
        "source_tenant_id": tenant,
        "status": status,
    })
}

/// The sentence of a 400 for a POST of `body`.
fn post_400(f: &Fixture, body: &str) -> String {
    assert_error(f.server.post(Some(&f.alice), body), 400)
}

/// The sentence with every occurrence of `id` replaced by a placeholder.
fn shape(sentence: &str, id: &str) -> String {
    assert!(
        sentence.contains(id),
        "sentence {sentence:?} does not name {id}"
    );
    sentence.replace(id, "<id>")
}

fn request_id(resp: &Response) -> String {
    let value = resp
        .headers()
        .get("x-openstack-request-id")
        .unwrap_or_else(|| panic!("no x-openstack-request-id on a {}", resp.status()))
        .to_str()
        .expect("ASCII request id")
        .to_string();
    let uuid = value
        .strip_prefix("req-")
        .unwrap_or_else(|| panic!("request id {value:?} does not start with req-"));
    uuid::Uuid::try_parse(uuid)
        .unwrap_or_else(|_| panic!("request id {value:?} is not req-<uuid>"));
    assert_eq!(
        uuid.len(),
        36,
        "request id {value:?} is not a hyphenated UUID"
    );
    value
}

// ===== POST /jobs: 202 =====

#[test]
fn copy_is_202_with_job_id_and_the_job_starts_replicate_requested() {
    let f = Fixture::new();
    let resp = f.server.copy(&f.carol, &f.img_c, TENANT_B);
    assert_eq!(resp.status(), 202);
    assert_eq!(
        resp.headers()["content-type"],
        "application/json; charset=UTF-8"
    );
    let body: Value = resp.json().expect("202 JSON");
    let object = body.as_object().expect("an object");
    assert_eq!(object.len(), 1, "202 body is only job_id: {body}");
    let job_id = body["job_id"].as_str().expect("job_id string");
    uuid::Uuid::try_parse(job_id).expect("job_id is a UUID");

    let job = f.server.job(&f.carol, job_id);
    assert_eq!(
        job,
        json!({
            "copy_progress": 0,
            "destination_image_id": null,
            "destination_region_id": "ot2",
            "destination_tenant_id": TENANT_B,
            "job_id": job_id,
            "source_image_id": f.img_c,
            "source_image_name": "gamma-image",
            "source_region_id": "ot1",
            "source_tenant_id": TENANT_C,
            "status": "replicate_requested",
        })
    );
}

#[test]
fn copy_within_the_own_tenant_is_202_with_the_same_region() {
    let f = Fixture::new();
    let job_id = f.server.copy_ok(&f.bob, &f.img_b, TENANT_B);
    let job = f.server.job(&f.bob, &job_id);
    assert_eq!(job["status"], "replicate_requested");
    assert_eq!(job["source_region_id"], "ot2");
    assert_eq!(job["destination_region_id"], "ot2");
    assert_eq!(job["source_tenant_id"], TENANT_B);
    assert_eq!(job["destination_tenant_id"], TENANT_B);
    assert_eq!(job["source_image_name"], "beta-image");
}

#[test]
fn copy_job_survives_a_kill_9_right_after_the_202() {
    let Fixture {
        mut server,
        lab,
        alice,
        img_a,
        ..
    } = Fixture::new();
    let job_id = server.copy_ok(&alice, &img_a, TENANT_A);
    server.kill_9();
    drop(server);
    let server = lab.serve();
    let job = server.job(&alice, &job_id);
    assert_eq!(job["status"], "replicate_requested");
    assert_eq!(job["source_image_id"], img_a.as_str());
    assert_eq!(job_ids(&jobs(server.get(JOBS, Some(&alice)))), [job_id]);
}

#[test]
fn copy_with_json_charset_content_type_is_202() {
    let f = Fixture::new();
    let body = json!({"image_id": f.img_a, "tenant_id_dst": TENANT_A}).to_string();
    let resp = post_as_alice(&f, Some("application/json; charset=UTF-8"), body);
    assert_eq!(resp.status(), 202);
}

#[test]
fn copy_to_hyphenated_spelling_of_a_32_hex_tenant_is_the_same_tenant() {
    let f = Fixture::new();
    let hyphenated = uuid::Uuid::try_parse(TENANT_A)
        .expect("tenant A")
        .hyphenated()
        .to_string();
    assert_ne!(hyphenated, TENANT_A);
    let job_id = f.server.copy_ok(&f.alice, &f.img_a, &hyphenated);
    let job = f.server.job(&f.alice, &job_id);
    // Printed as the tenant record stores it, not as the request spelled it.
    assert_eq!(job["destination_tenant_id"], TENANT_A);
    assert_eq!(job["destination_region_id"], "ot1");

    // Upper-case hex digits are the same value too.
    let upper = TENANT_A.to_uppercase();
    let job_id = f.server.copy_ok(&f.alice, &f.img_a, &upper);
    let job = f.server.job(&f.alice, &job_id);
    assert_eq!(job["destination_tenant_id"], TENANT_A);
}

#[test]
fn copy_to_32_hex_spelling_of_a_hyphenated_tenant_is_the_same_tenant() {
    let f = Fixture::new();
    let simple = TENANT_C.replace('-', "");
    assert_eq!(simple.len(), 32);
    let job_id = f.server.copy_ok(&f.carol, &f.img_c, &simple);
    let job = f.server.job(&f.carol, &job_id);
    // Printed as the tenant record stores it: hyphenated.
    assert_eq!(job["destination_tenant_id"], TENANT_C);
    assert_eq!(job["source_tenant_id"], TENANT_C);
    assert_eq!(job["destination_region_id"], "ot1");
}

// ===== POST /jobs: 400 =====

#[test]
fn copy_body_not_json_is_400() {
    let f = Fixture::new();
    for body in [
        "hello",
        "image_id=x&tenant_id_dst=y",
        "{image_id: 1}",
        "\u{1}",
    ] {
        post_400(&f, body);
    }
}

#[test]
fn copy_empty_body_is_400() {
    let f = Fixture::new();
    post_400(&f, "");
}

#[test]
fn copy_truncated_json_is_400() {
    let f = Fixture::new();
    let full = json!({"image_id": f.img_a, "tenant_id_dst": TENANT_A}).to_string();
    for cut in [1, 10, full.len() / 2, full.len() - 1] {
        post_400(&f, &full[..cut]);
    }
}

#[test]
fn copy_body_json_string_or_null_instead_of_object_is_400() {
    let f = Fixture::new();
    let string = json!(f.img_a).to_string();
    for body in [string.as_str(), "\"a string\"", "null", "42", "true"] {
        post_400(&f, body);
    }
}

#[test]
fn copy_body_empty_json_array_is_400() {
    let f = Fixture::new();
    post_400(&f, "[]");
}

#[test]
fn copy_body_json_array_of_the_two_values_is_400() {
    let f = Fixture::new();
    // The two values in field order: valid as a request only if arrays were taken for objects.
    post_400(&f, &json!([f.img_a, TENANT_A]).to_string());
    assert!(jobs(f.server.get(JOBS, Some(&f.alice))).is_empty());
}

#[test]
fn copy_without_image_id_is_400() {
    let f = Fixture::new();
    post_400(&f, &json!({"tenant_id_dst": TENANT_A}).to_string());
    post_400(&f, "{}");
}

#[test]
fn copy_without_tenant_id_dst_is_400() {
    let f = Fixture::new();
    post_400(&f, &json!({"image_id": f.img_a}).to_string());
}

#[test]
fn copy_with_non_string_values_is_400() {
    let f = Fixture::new();
    let uuid_bytes: Vec<u8> = uuid::Uuid::try_parse(&f.img_a)
        .expect("uuid")
        .as_bytes()
        .to_vec();
    let bodies = [
        json!({"image_id": 42, "tenant_id_dst": TENANT_A}),
        json!({"image_id": null, "tenant_id_dst": TENANT_A}),
        json!({"image_id": [f.img_a], "tenant_id_dst": TENANT_A}),
        json!({"image_id": {"id": f.img_a}, "tenant_id_dst": TENANT_A}),
        json!({"image_id": uuid_bytes, "tenant_id_dst": TENANT_A}),
        json!({"image_id": f.img_a, "tenant_id_dst": 236}),
        json!({"image_id": f.img_a, "tenant_id_dst": null}),
        json!({"image_id": f.img_a, "tenant_id_dst": true}),
        json!({"image_id": f.img_a, "tenant_id_dst": [TENANT_A]}),
    ];
    for body in bodies {
        post_400(&f, &body.to_string());
    }
}

#[test]
fn copy_with_image_id_not_a_uuid_is_400() {
    let f = Fixture::new();
    let truncated = &f.img_a[..35];
    let bad_digit = format!("{}g", &f.img_a[..35]);
    for image_id in [
        "",
        "image",
        "335eef3f",
        truncated,
        bad_digit.as_str(),
        "../335eef3f-551d-46e1-8781-173f43209d48",
        "335eef3f-551d-46e1-8781-173f43209d48x",
    ] {
        let sentence = post_400(
            &f,
            &json!({"image_id": image_id, "tenant_id_dst": TENANT_A}).to_string(),
        );
        assert!(
            sentence.to_lowercase().contains("image_id"),
            "sentence {sentence:?} should name image_id"
        );
    }
}

#[test]
fn copy_with_malformed_tenant_id_dst_is_400() {
    let f = Fixture::new();
    let short = &TENANT_A[..31];
    let long = format!("{TENANT_A}0");
    let non_hex = format!("{}z", &TENANT_A[..31]);
    for tenant in [
        "",
        "alpha",
        short,
        long.as_str(),
        non_hex.as_str(),
        "236ae314-ef69-44f4-ab98-fa7519e5432",
        "236ae314ef69-44f4-ab98-fa7519e54325",
        " 236ae314ef6944f4ab98fa7519e54325",
    ] {
        let sentence = post_400(
            &f,
            &json!({"image_id": f.img_a, "tenant_id_dst": tenant}).to_string(),
        );
        assert!(
            sentence.to_lowercase().contains("tenant_id_dst"),
            "sentence {sentence:?} should name tenant_id_dst"
        );
    }
}

#[test]
fn copy_with_unknown_extra_key_is_400() {
    let f = Fixture::new();
    post_400(
        &f,
        &json!({"image_id": f.img_a, "tenant_id_dst": TENANT_A, "name": "copy"}).to_string(),
    );
    post_400(
        &f,
        &json!({"image_id": f.img_a, "tenant_id_dst": TENANT_A, "image id": f.img_a}).to_string(),
    );
    // Nothing was created.
    assert!(jobs(f.server.get(JOBS, Some(&f.alice))).is_empty());
}

#[test]
fn copy_with_duplicate_key_is_400() {
    let f = Fixture::new();
    let img = &f.img_a;
    let other = &f.img_c;
    post_400(
        &f,
        &format!(r#"{{"image_id": "{img}", "image_id": "{img}", "tenant_id_dst": "{TENANT_A}"}}"#),
    );
    post_400(
        &f,
        &format!(
            r#"{{"image_id": "{other}", "tenant_id_dst": "{TENANT_A}", "image_id": "{img}"}}"#
        ),
    );
    post_400(
        &f,
        &format!(
            r#"{{"image_id": "{img}", "tenant_id_dst": "{TENANT_B}", "tenant_id_dst": "{TENANT_A}"}}"#
        ),
    );
    assert!(jobs(f.server.get(JOBS, Some(&f.alice))).is_empty());
}

// ===== POST /jobs: 401 =====

#[test]
fn copy_with_bad_token_is_401() {
    let f = Fixture::new();
    let body = json!({"image_id": f.img_a, "tenant_id_dst": TENANT_A}).to_string();
    assert_401(f.server.post(None, &body));
    assert_401(f.server.post(Some("not-a-token-at-all"), &body));
    assert_401(f.server.post(Some(""), &body));
    assert!(jobs(f.server.get(JOBS, Some(&f.alice))).is_empty());
}

#[test]
fn copy_to_tenant_the_user_is_not_member_of_is_401() {
    let f = Fixture::new();
    assert_401(f.server.copy(&f.alice, &f.img_a, TENANT_B));
    assert_401(f.server.copy(&f.alice, &f.img_a, TENANT_C));
    assert_401(f.server.copy(&f.bob, &f.img_b, TENANT_A));
    assert!(jobs(f.server.get(JOBS, Some(&f.alice))).is_empty());
    assert!(jobs(f.server.get(JOBS, Some(&f.bob))).is_empty());
}

// ===== POST /jobs: 404 =====

#[test]
fn copy_of_unknown_image_is_404() {
    let f = Fixture::new();
    let sentence = assert_error(f.server.copy(&f.alice, UNKNOWN_UUID, TENANT_A), 404);
    assert!(sentence.contains(UNKNOWN_UUID), "{sentence:?}");
}

#[test]
fn copy_of_another_tenants_image_is_404_like_an_unknown_image() {
    let f = Fixture::new();
    let unknown = assert_error(f.server.copy(&f.alice, UNKNOWN_UUID, TENANT_A), 404);
    let foreign = assert_error(f.server.copy(&f.alice, &f.img_b, TENANT_A), 404);
    assert_eq!(shape(&foreign, &f.img_b), shape(&unknown, UNKNOWN_UUID));
    let foreign = assert_error(f.server.copy(&f.bob, &f.img_c, TENANT_B), 404);
    assert_eq!(shape(&foreign, &f.img_c), shape(&unknown, UNKNOWN_UUID));
    assert!(jobs(f.server.get(JOBS, Some(&f.alice))).is_empty());
}

#[test]
fn copy_of_deleted_image_is_404() {
    let f = Fixture::new();
    f.lab.ok(&["image", "delete", &f.img_a]);
    let unknown = assert_error(f.server.copy(&f.alice, UNKNOWN_UUID, TENANT_A), 404);
    let deleted = assert_error(f.server.copy(&f.alice, &f.img_a, TENANT_A), 404);
    assert_eq!(shape(&deleted, &f.img_a), shape(&unknown, UNKNOWN_UUID));
}

#[test]
fn copy_to_unknown_destination_tenant_is_404() {
    let f = Fixture::new();
    let unknown_tenant = "0123456789abcdef0123456789abcdef";
    let sentence = assert_error(f.server.copy(&f.alice, &f.img_a, unknown_tenant), 404);
    assert!(sentence.contains(unknown_tenant), "{sentence:?}");
    let hyphenated = "fedcba98-7654-3210-fedc-ba9876543210";
    assert_error(f.server.copy(&f.root, &f.img_a, hyphenated), 404);
}

// ===== POST /jobs: 409 =====

/// An image that is `saving` (the destination of a copy still running) cannot be copied; once
/// its copy is done it can.
#[test]
fn copy_of_image_not_active_is_409() {
    let (lab, alice2) = Lab::standard_with_copier();
    let bob = lab.token("bob", TENANT_B);
    let source = lab.image(TENANT_A, "slow-image", 2 << 20);
    let server = lab.serve_with(&["--max-bandwidth", "1M"]);
    let copy = server.copy_ok(&alice2, &source, TENANT_B);
    let saving = poll(
        "the copy's destination image",
        Duration::from_secs(10),
        || {
            let job = server.job(&alice2, &copy);
            job["destination_image_id"].as_str().map(String::from)
        },
    );
    let image: Value =
        serde_json::from_str(&lab.ok(&["--json", "image", "show", &saving])).expect("JSON");
    assert_eq!(image["status"], "saving");
    let sentence = assert_error(server.copy(&bob, &saving, TENANT_B), 409);
    assert!(sentence.contains("active"), "{sentence:?}");
    assert!(jobs(server.get(JOBS, Some(&bob))).is_empty());

    server.wait_job(
        &alice2,
        &copy,
        Duration::from_secs(30),
        status_is("replicated"),
    );
    let image: Value =
        serde_json::from_str(&lab.ok(&["--json", "image", "show", &saving])).expect("JSON");
    assert_eq!(image["status"], "active");
    assert_eq!(image["size"], 2 << 20);

    let job_id = server.copy_ok(&bob, &saving, TENANT_B);
    let job = server.job(&bob, &job_id);
    assert_eq!(job["source_image_name"], "slow-image");
    assert!(["replicate_requested", "replicating", "replicated"]
        .contains(&job["status"].as_str().unwrap_or("")));
}

#[test]
fn copy_when_destination_region_store_is_missing_is_409() {
    let f = Fixture::new();
    std::fs::remove_dir_all(f.lab.data_dir().join("regions").join("ot2")).expect("remove ot2");
    assert_error(f.server.copy(&f.carol, &f.img_c, TENANT_B), 409);
    assert!(jobs(f.server.get(JOBS, Some(&f.carol))).is_empty());
    // The source region alone is fine.
    f.server.copy_ok(&f.carol, &f.img_c, TENANT_C);
}

#[test]
fn copy_when_source_region_store_is_missing_is_409() {
    let f = Fixture::new();
    std::fs::remove_dir_all(f.lab.data_dir().join("regions").join("ot1")).expect("remove ot1");
    assert_error(f.server.copy(&f.carol, &f.img_c, TENANT_B), 409);
    assert!(jobs(f.server.get(JOBS, Some(&f.carol))).is_empty());
}

#[test]
fn copy_to_region_refusing_the_disk_format_is_409() {
    let f = Fixture::new();
    let tenant_d = "4f3e2d1c0b0a49f8a7e6d5c4b3a29180";
    f.lab
        .ok(&["region", "add", "ot3", "--disk-formats", "qcow2"]);
    f.lab.ok(&["tenant", "add", tenant_d, "--region", "ot3"]);
    f.lab.ok(&[
        "user", "add", "dave", "--tenant", TENANT_A, "--tenant", tenant_d,
    ]);
    let dave = f.lab.token("dave", TENANT_A);
    let sentence = assert_error(f.server.copy(&dave, &f.img_a, tenant_d), 409);
    assert!(sentence.contains("raw"), "{sentence:?}");
    assert!(jobs(f.server.get(JOBS, Some(&dave))).is_empty());
    // A region accepting every format takes the same image.
    f.server.copy_ok(&dave, &f.img_a, TENANT_A);
}

// ===== POST /jobs: 413 =====

/// A client that never reuses a connection, for requests whose body the server may not read.
fn fresh_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

/// POSTs `body` as alice on a connection of its own, with `content_type` if given.
fn post_as_alice(
    f: &Fixture,
    content_type: Option<&str>,
    body: impl Into<reqwest::blocking::Body>,
) -> Response {
    let mut req = fresh_client()
        .post(f.server.url(JOBS))
        .header("X-Auth-Token", &f.alice);
    if let Some(content_type) = content_type {
        req = req.header("Content-Type", content_type);
    }
    req.body(body).send().expect("POST")
}

/// The same bytes streamed: sent chunked, without Content-Length.
fn chunked(bytes: Vec<u8>) -> reqwest::blocking::Body {
    reqwest::blocking::Body::new(std::io::Cursor::new(bytes))
}

/// A valid copy request padded with spaces to exactly `size` bytes.
fn padded_body(f: &Fixture, size: usize) -> Vec<u8> {
    let mut body = json!({"image_id": f.img_a, "tenant_id_dst": TENANT_A})
        .to_string()
        .into_bytes();
    assert!(body.len() <= size);
    body.resize(size, b' ');
    body
}

/// POSTs an over-sized body as alice over a raw socket, with `Content-Length` or chunked.
///
/// The server answers a 413 without reading the whole body and closes the connection, so an
/// HTTP client still sending may see its write fail before it reads the answer. Here the whole
/// request is written first (write errors ignored: the server may have closed already), then
/// the answer is read; Linux hands out data received before a reset before the reset itself.
fn raw_post(f: &Fixture, body: &[u8], chunked: bool) -> raw::Outcome {
    let addr = f.server.addr();
    let mut request = format!(
        "POST {JOBS} HTTP/1.1\r\nHost: {addr}\r\nX-Auth-Token: {}\r\n\
         Content-Type: application/json\r\nConnection: close\r\n",
        f.alice
    )
    .into_bytes();
    if chunked {
        request.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
        request.extend_from_slice(&chunk_encode(body));
    } else {
        request.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        request.extend_from_slice(body);
    }
    let response = raw::exchange(&addr, &request, Duration::from_secs(10));
    assert!(
        response.status().is_some(),
        "no complete answer: {response:?}"
    );
    let length: usize = response
        .header("content-length")
        .expect("a Content-Length")
        .parse()
        .expect("a number");
    assert!(response.body().len() >= length, "response body cut short");
    response
}

/// [`assert_error`] for a raw response; returns the sentence.
fn assert_raw_error(resp: &raw::Outcome, code: u16) -> String {
    assert_eq!(resp.status(), Some(code), "unexpected status");
    assert_eq!(
        resp.header("content-type"),
        Some("text/plain; charset=UTF-8")
    );
    error_sentence(std::str::from_utf8(resp.body()).expect("UTF-8 body"), code)
}

#[test]
fn copy_body_over_16_kib_is_413() {
    let f = Fixture::new();
    for size in [16 * 1024 + 1, 64 * 1024, 1 << 20] {
        let resp = raw_post(&f, &padded_body(&f, size), false);
        let sentence = assert_raw_error(&resp, 413);
        assert!(sentence.contains("16384"), "{sentence:?}");
    }
    assert!(jobs(f.server.get(JOBS, Some(&f.alice))).is_empty());
}

#[test]
fn copy_body_over_16_kib_chunked_is_413() {
    let f = Fixture::new();
    for size in [16 * 1024 + 1, 64 * 1024, 1 << 20] {
        let resp = raw_post(&f, &padded_body(&f, size), true);
        assert_raw_error(&resp, 413);
    }
    assert!(jobs(f.server.get(JOBS, Some(&f.alice))).is_empty());
}

#[test]
fn copy_body_of_exactly_16_kib_is_202() {
    let f = Fixture::new();
    let resp = post_as_alice(&f, Some("application/json"), padded_body(&f, 16 * 1024));
    assert_eq!(resp.status(), 202);
    let resp = post_as_alice(
        &f,
        Some("application/json"),
        chunked(padded_body(&f, 16 * 1024)),
    );
    assert_eq!(resp.status(), 202);
}

// ===== POST /jobs: 415 =====

#[test]
fn copy_without_content_type_is_415() {
    let f = Fixture::new();
    let resp = post_as_alice(
        &f,
        None,
        json!({"image_id": f.img_a, "tenant_id_dst": TENANT_A}).to_string(),
    );
    assert!(resp.headers().get("content-type").is_some());
    let sentence = assert_error(resp, 415);
    assert!(sentence.contains("application/json"), "{sentence:?}");
    assert!(jobs(f.server.get(JOBS, Some(&f.alice))).is_empty());
}

#[test]
fn copy_with_text_plain_is_415() {
    let f = Fixture::new();
    for content_type in ["text/plain", "text/plain; charset=UTF-8", "application/xml"] {
        let resp = post_as_alice(
            &f,
            Some(content_type),
            json!({"image_id": f.img_a, "tenant_id_dst": TENANT_A}).to_string(),
        );
        let sentence = assert_error(resp, 415);
        assert!(sentence.contains("application/json"), "{sentence:?}");
    }
    assert!(jobs(f.server.get(JOBS, Some(&f.alice))).is_empty());
}

// ===== GET /jobs/{id} =====

#[test]
fn show_job_is_200_with_the_ten_keys() {
    let f = Fixture::new();
    let job_id = f.server.copy_ok(&f.alice, &f.img_a, TENANT_A);
    let job = f.server.job(&f.alice, &job_id);
    assert_eq!(keys_of(&job), JOB_KEYS);
    assert_eq!(job["job_id"], job_id.as_str());
    let listed = jobs(f.server.get(JOBS, Some(&f.alice)));
    assert_eq!(listed, vec![job]);
}

#[test]
fn show_job_with_bad_token_is_401() {
    let f = Fixture::new();
    let job_id = f.server.copy_ok(&f.alice, &f.img_a, TENANT_A);
    assert_401(f.server.get(&job_path(&job_id), None));
    assert_401(f.server.get(&job_path(&job_id), Some("wrong-token-value")));
    assert_401(
        f.server
            .get(&job_path(UNKNOWN_UUID), Some("wrong-token-value")),
    );
}

#[test]
fn show_unknown_job_is_404() {
    let f = Fixture::new();
    let sentence = assert_error(f.server.get(&job_path(UNKNOWN_UUID), Some(&f.alice)), 404);
    assert!(sentence.contains(UNKNOWN_UUID), "{sentence:?}");
}

#[test]
fn show_non_uuid_job_id_is_404() {
    let f = Fixture::new();
    for id in [
        "x",
        "job",
        "12345",
        "0fa2817d-4e54-455d-a676-c78e863297e",
        "null",
    ] {
        assert_error(f.server.get(&job_path(id), Some(&f.alice)), 404);
    }
}

#[test]
fn show_path_traversal_job_id_is_404() {
    let f = Fixture::new();
    let job_id = f.server.copy_ok(&f.alice, &f.img_a, TENANT_A);
    let sneaky = format!("..%2f{job_id}");
    for id in [
        "..%2f..%2fetc",
        "..%2f..%2fetc%2fpasswd",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "..%5c..%5cetc",
        "%2fetc%2fpasswd",
        "..;",
        "%00",
        sneaky.as_str(),
    ] {
        let resp = f.server.get(&job_path(id), Some(&f.alice));
        assert_error(resp, 404);
        let resp = f.server.delete(&job_path(id), Some(&f.alice));
        assert_error(resp, 404);
    }
    assert_eq!(
        f.server.job(&f.alice, &job_id)["status"],
        "replicate_requested"
    );
}

#[test]
fn show_another_tenants_job_is_404_like_an_unknown_job() {
    let f = Fixture::new();
    let job_id = f.server.copy_ok(&f.bob, &f.img_b, TENANT_B);
    let unknown = f.server.get(&job_path(UNKNOWN_UUID), Some(&f.alice));
    let foreign = f.server.get(&job_path(&job_id), Some(&f.alice));
    assert_eq!(
        unknown.headers()["content-length"],
        foreign.headers()["content-length"]
    );
    let unknown = assert_error(unknown, 404);
    let foreign = assert_error(foreign, 404);
    assert_eq!(shape(&foreign, &job_id), shape(&unknown, UNKNOWN_UUID));
    // The owner still sees it.
    assert_eq!(f.server.job(&f.bob, &job_id)["job_id"], job_id.as_str());
}

// ===== DELETE /jobs/{id} =====

#[test]
fn cancel_is_204_with_empty_body_and_job_becomes_cancel_requested() {
    let f = Fixture::new();
    let job_id = f.server.copy_ok(&f.alice, &f.img_a, TENANT_A);
    let resp = f.server.delete(&job_path(&job_id), Some(&f.alice));
    assert_eq!(resp.status(), 204);
    if let Some(length) = resp.headers().get("content-length") {
        assert_eq!(length, "0");
    }
    assert_eq!(resp.bytes().expect("body").len(), 0);
    let job = f.server.job(&f.alice, &job_id);
    assert_eq!(job["status"], "cancel_requested");
    assert_eq!(job["copy_progress"], 0);
    assert_eq!(job["destination_image_id"], Value::Null);
}

#[test]
fn cancel_of_replicating_job_is_204() {
    let f = Fixture::new();
    let id = "5b1c0f6a-7d2e-4a3b-9c8d-1e2f3a4b5c6d";
    f.lab.seed_jobs(&[seeded_job(id, "replicating", TENANT_A)]);
    let resp = f.server.delete(&job_path(id), Some(&f.alice));
    assert_eq!(resp.status(), 204);
    assert_eq!(resp.bytes().expect("body").len(), 0);
    let job = f.server.job(&f.alice, id);
    assert_eq!(job["status"], "cancel_requested");
}

#[test]
fn cancel_with_bad_token_is_401() {
    let f = Fixture::new();
    let job_id = f.server.copy_ok(&f.alice, &f.img_a, TENANT_A);
    assert_401(f.server.delete(&job_path(&job_id), None));
    assert_401(
        f.server
            .delete(&job_path(&job_id), Some("wrong-token-value")),
    );
    assert_eq!(
        f.server.job(&f.alice, &job_id)["status"],
        "replicate_requested"
    );
}

#[test]
fn cancel_of_unknown_job_is_404() {
    let f = Fixture::new();
    let sentence = assert_error(
        f.server.delete(&job_path(UNKNOWN_UUID), Some(&f.alice)),
        404,
    );
    assert!(sentence.contains(UNKNOWN_UUID), "{sentence:?}");
    assert_error(
        f.server.delete(&job_path("not-a-uuid"), Some(&f.alice)),
        404,
    );
}

#[test]
fn cancel_of_another_tenants_job_is_404_like_an_unknown_job() {
    let f = Fixture::new();
    let job_id = f.server.copy_ok(&f.bob, &f.img_b, TENANT_B);
    let unknown = assert_error(
        f.server.delete(&job_path(UNKNOWN_UUID), Some(&f.alice)),
        404,
    );
    let foreign = assert_error(f.server.delete(&job_path(&job_id), Some(&f.alice)), 404);
    assert_eq!(shape(&foreign, &job_id), shape(&unknown, UNKNOWN_UUID));
    assert_eq!(
        f.server.job(&f.bob, &job_id)["status"],
        "replicate_requested"
    );
}

#[test]
fn cancel_of_cancel_requested_job_is_409() {
    let f = Fixture::new();
    let job_id = f.server.copy_ok(&f.alice, &f.img_a, TENANT_A);
    assert_eq!(
        f.server.delete(&job_path(&job_id), Some(&f.alice)).status(),
        204
    );
    let sentence = assert_error(f.server.delete(&job_path(&job_id), Some(&f.alice)), 409);
    assert!(sentence.contains("cancel_requested"), "{sentence:?}");
    assert_eq!(
        f.server.job(&f.alice, &job_id)["status"],
        "cancel_requested"
    );
}

/// Seeds one job of tenant A in `status`, cancels it as alice: 409, status unchanged.
fn assert_cancel_is_409(status: &str) {
    let f = Fixture::new();
    let id = "6c2d1e0f-8a9b-4c3d-8e7f-2a3b4c5d6e7f";
    let job = seeded_job(id, status, TENANT_A);
    f.lab.seed_jobs(std::slice::from_ref(&job));
    let sentence = assert_error(f.server.delete(&job_path(id), Some(&f.alice)), 409);
    assert!(sentence.contains(status), "{sentence:?}");
    assert_eq!(f.server.job(&f.alice, id), job);
}

#[test]
fn cancel_of_replicated_job_is_409() {
    assert_cancel_is_409("replicated");
}

#[test]
fn cancel_of_canceled_job_is_409() {
    assert_cancel_is_409("canceled");
}

#[test]
fn cancel_of_error_job_is_409() {
    assert_cancel_is_409("error");
}

#[test]
fn cancel_of_canceling_job_is_409() {
    assert_cancel_is_409("canceling");
}

#[test]
fn cancel_of_seeded_cancel_requested_job_is_409() {
    assert_cancel_is_409("cancel_requested");
}

// ===== GET /jobs =====

#[test]
fn list_shows_only_the_tenants_jobs_oldest_first() {
    let f = Fixture::new();
    let a1 = f.server.copy_ok(&f.alice, &f.img_a, TENANT_A);
    let b1 = f.server.copy_ok(&f.bob, &f.img_b, TENANT_B);
    let a2 = f.server.copy_ok(&f.alice, &f.img_a, TENANT_A);
    let c1 = f.server.copy_ok(&f.carol, &f.img_c, TENANT_B);
    let a3 = f.server.copy_ok(&f.alice, &f.img_a, TENANT_A);

    let listed = jobs(f.server.get(JOBS, Some(&f.alice)));
    assert_eq!(job_ids(&listed), [a1.clone(), a2, a3]);
    for job in &listed {
        assert_eq!(job["source_tenant_id"], TENANT_A);
        let id = job["job_id"].as_str().expect("id");
        assert_eq!(job, &f.server.job(&f.alice, id));
    }
    assert_eq!(job_ids(&jobs(f.server.get(JOBS, Some(&f.bob)))), [b1]);
    // carol's copy goes to B but is C's job.
    assert_eq!(job_ids(&jobs(f.server.get(JOBS, Some(&f.carol)))), [c1]);
    assert!(job_ids(&jobs(f.server.get(JOBS, Some(&f.alice)))).contains(&a1));
}

#[test]
fn list_without_jobs_is_an_empty_array() {
    let f = Fixture::new();
    let resp = f.server.get(JOBS, Some(&f.alice));
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/json; charset=UTF-8"
    );
    assert_eq!(resp.text().expect("body"), "[]");
}

#[test]
fn list_status_filter_keeps_only_that_status() {
    let f = Fixture::new();
    let a1 = f.server.copy_ok(&f.alice, &f.img_a, TENANT_A);
    let a2 = f.server.copy_ok(&f.alice, &f.img_a, TENANT_A);
    let a3 = f.server.copy_ok(&f.alice, &f.img_a, TENANT_A);
    f.server.copy_ok(&f.bob, &f.img_b, TENANT_B);
    let b_cancelled = f.server.copy_ok(&f.bob, &f.img_b, TENANT_B);
    for id in [&a2, &b_cancelled] {
        let token = if id == &a2 { &f.alice } else { &f.bob };
        assert_eq!(f.server.delete(&job_path(id), Some(token)).status(), 204);
    }
    let seeded = "7e3f2a1b-9c8d-4e5f-a6b7-c8d9e0f1a2b3";
    f.lab
        .seed_jobs(&[seeded_job(seeded, "replicated", TENANT_A)]);

    let get = |query: &str| jobs(f.server.get(&format!("{JOBS}?{query}"), Some(&f.alice)));
    assert_eq!(job_ids(&get("status=replicate_requested")), [a1, a3]);
    assert_eq!(job_ids(&get("status=cancel_requested")), [a2]);
    assert_eq!(job_ids(&get("status=replicated")), [seeded]);
    for status in ["replicating", "canceling", "canceled", "error"] {
        assert!(get(&format!("status={status}")).is_empty(), "{status}");
    }
    assert_eq!(
        get("status=cancel_requested")[0]["status"],
        "cancel_requested"
    );
}

#[test]
fn list_limit_caps_the_count() {
    let f = Fixture::new();
    let created: Vec<String> = (0..4)
        .map(|_| f.server.copy_ok(&f.alice, &f.img_a, TENANT_A))
        .collect();
    let get = |query: &str| {
        job_ids(&jobs(
            f.server.get(&format!("{JOBS}?{query}"), Some(&f.alice)),
        ))
    };
    assert_eq!(get("limit=2"), created[..2]);
    assert_eq!(get("limit=1"), created[..1]);
    assert_eq!(get("limit=4"), created);
    assert_eq!(get("limit=100"), created);
    assert!(get("limit=0").is_empty());
}

#[test]
fn list_marker_returns_the_jobs_after_it() {
    let f = Fixture::new();
    let created: Vec<String> = (0..4)
        .map(|_| f.server.copy_ok(&f.alice, &f.img_a, TENANT_A))
        .collect();
    f.server.copy_ok(&f.bob, &f.img_b, TENANT_B);
    let get = |query: &str| {
        job_ids(&jobs(
            f.server.get(&format!("{JOBS}?{query}"), Some(&f.alice)),
        ))
    };
    assert_eq!(get(&format!("marker={}", created[0])), created[1..]);
    assert_eq!(get(&format!("marker={}", created[2])), created[3..]);
    assert!(get(&format!("marker={}", created[3])).is_empty());
    assert_eq!(
        get(&format!("marker={}&limit=2", created[0])),
        created[1..3]
    );
}

#[test]
fn list_marker_and_limit_page_through_every_job_once() {
    let f = Fixture::new();
    let created: Vec<String> = (0..5)
        .map(|_| f.server.copy_ok(&f.alice, &f.img_a, TENANT_A))
        .collect();
    let mut seen: Vec<String> = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let query = match &marker {
            Some(m) => format!("limit=2&marker={m}"),
            None => "limit=2".to_string(),
        };
        let page = job_ids(&jobs(
            f.server.get(&format!("{JOBS}?{query}"), Some(&f.alice)),
        ));
        assert!(page.len() <= 2);
        if page.is_empty() {
            break;
        }
        marker = page.last().cloned();
        seen.extend(page);
        assert!(seen.len() <= created.len(), "paging does not end: {seen:?}");
    }
    assert_eq!(seen, created);
}

#[test]
fn list_with_bad_status_is_400() {
    let f = Fixture::new();
    for query in [
        "status=bogus",
        "status=",
        "status=REPLICATED",
        "status=active",
        "status=replicate%20requested",
    ] {
        assert_error(
            f.server.get(&format!("{JOBS}?{query}"), Some(&f.alice)),
            400,
        );
    }
}

#[test]
fn list_with_non_integer_limit_is_400() {
    let f = Fixture::new();
    for query in ["limit=abc", "limit=-1", "limit=1.5", "limit=", "limit=2x"] {
        assert_error(
            f.server.get(&format!("{JOBS}?{query}"), Some(&f.alice)),
            400,
        );
    }
}

#[test]
fn list_with_unknown_marker_is_400() {
    let f = Fixture::new();
    f.server.copy_ok(&f.alice, &f.img_a, TENANT_A);
    for marker in [UNKNOWN_UUID, "not-a-uuid", ""] {
        assert_error(
            f.server
                .get(&format!("{JOBS}?marker={marker}"), Some(&f.alice)),
            400,
        );
    }
}

#[test]
fn list_with_unknown_parameter_is_400() {
    let f = Fixture::new();
    for query in [
        "sort_key=created_at",
        "tenant_id=236ae314ef6944f4ab98fa7519e54325",
        "all_tenants=1",
        "Status=error",
    ] {
        assert_error(
            f.server.get(&format!("{JOBS}?{query}"), Some(&f.alice)),
            400,
        );
    }
}

#[test]
fn list_with_bad_token_is_401() {
    let f = Fixture::new();
    assert_401(f.server.get(JOBS, None));
    assert_401(f.server.get(JOBS, Some("wrong-token-value")));
    assert_401(
        f.server
            .get(&format!("{JOBS}?status=bogus"), Some("wrong-token-value")),
    );
}

#[test]
fn admin_lists_every_tenants_jobs() {
    let f = Fixture::new();
    let a1 = f.server.copy_ok(&f.alice, &f.img_a, TENANT_A);
    let b1 = f.server.copy_ok(&f.bob, &f.img_b, TENANT_B);
    let c1 = f.server.copy_ok(&f.carol, &f.img_c, TENANT_C);
    let c2 = f.server.copy_ok(&f.carol, &f.img_c, TENANT_B);
    let mut all = job_ids(&jobs(f.server.get(JOBS, Some(&f.root))));
    all.sort();
    let mut expected = vec![a1, b1, c1, c2];
    expected.sort();
    assert_eq!(all, expected);
    // The admin's filters work across tenants too.
    assert_eq!(
        jobs(f.server.get(&format!("{JOBS}?limit=3"), Some(&f.root))).len(),
        3
    );
    // alice, of the same tenant but no admin, sees only A's.
    assert_eq!(jobs(f.server.get(JOBS, Some(&f.alice))).len(), 1);
}

// ===== 405 and unknown paths =====

fn send(f: &Fixture, method: &str, path: &str) -> Response {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    f.server
        .client
        .request(method, f.server.url(path))
        .header("X-Auth-Token", &f.alice)
        .header("Content-Type", "application/json")
        .body("{}")
        .send()
        .expect("request")
}

fn assert_405(resp: Response, allow: &[&str]) {
    let header = resp
        .headers()
        .get("allow")
        .expect("an Allow header")
        .to_str()
        .expect("ASCII")
        .to_string();
    let mut methods: Vec<&str> = header.split(',').map(str::trim).collect();
    methods.sort();
    let mut expected = allow.to_vec();
    expected.sort();
    assert_eq!(methods, expected, "Allow: {header}");
    assert_error(resp, 405);
}

#[test]
fn put_and_patch_on_the_collection_are_405_with_allow() {
    let f = Fixture::new();
    for method in ["PUT", "PATCH", "DELETE"] {
        assert_405(send(&f, method, JOBS), &["GET", "POST"]);
    }
}

#[test]
fn post_on_a_job_is_405_with_allow() {
    let f = Fixture::new();
    let job_id = f.server.copy_ok(&f.alice, &f.img_a, TENANT_A);
    for method in ["POST", "PUT", "PATCH"] {
        assert_405(send(&f, method, &job_path(&job_id)), &["GET", "DELETE"]);
    }
    assert_eq!(
        f.server.job(&f.alice, &job_id)["status"],
        "replicate_requested"
    );
}

#[test]
fn unknown_paths_are_404() {
    let f = Fixture::new();
    let job_id = f.server.copy_ok(&f.alice, &f.img_a, TENANT_A);
    let nested = format!("{JOBS}/{job_id}/cancel");
    for path in [
        "/v2/extension/image_replicator/jobs/x/y",
        nested.as_str(),
        "/v2/other",
        "/v2/extension/image_replicator",
        "/v2/extension/image_replicator/jobsx",
        // `/` is Glance's version document since the images API (issue 15).
        "/v3",
        "/v1/extension/image_replicator/jobs",
    ] {
        assert_error(f.server.get(path, Some(&f.alice)), 404);
        assert_error(send(&f, "POST", path), 404);
        assert_error(f.server.delete(path, Some(&f.alice)), 404);
    }
}

// ===== headers and shapes =====

#[test]
fn every_response_carries_a_request_id() {
    let f = Fixture::new();
    let mut responses: Vec<Response> = Vec::new();
    let job_id = {
        let resp = f.server.copy(&f.alice, &f.img_a, TENANT_A);
        assert_eq!(resp.status(), 202);
        let id = request_id(&resp);
        let body: Value = resp.json().expect("202");
        assert!(id.starts_with("req-"));
        body["job_id"].as_str().expect("id").to_string()
    };
    responses.push(f.server.get(JOBS, Some(&f.alice))); // 200
    responses.push(f.server.get(&job_path(&job_id), Some(&f.alice))); // 200
    responses.push(f.server.delete(&job_path(&job_id), Some(&f.alice))); // 204
    responses.push(f.server.delete(&job_path(&job_id), Some(&f.alice))); // 409
    responses.push(f.server.get(&format!("{JOBS}?limit=x"), Some(&f.alice))); // 400
    responses.push(f.server.get(JOBS, None)); // 401
    responses.push(f.server.get(&job_path(UNKNOWN_UUID), Some(&f.alice))); // 404
    responses.push(f.server.get("/v2/other", None)); // 404
    responses.push(send(&f, "PUT", JOBS)); // 405
    responses.push(post_as_alice(&f, None, "{}")); // 415
    let statuses: Vec<u16> = responses.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(statuses, [200, 200, 204, 409, 400, 401, 404, 404, 405, 415]);
    let mut seen = std::collections::HashSet::new();
    for resp in &responses {
        let id = request_id(resp);
        assert!(seen.insert(id.clone()), "request id {id} was used twice");
    }
    for chunked in [false, true] {
        let resp = raw_post(&f, &[b' '; 20_000], chunked);
        assert_eq!(resp.status(), Some(413));
        let id = resp
            .header("x-openstack-request-id")
            .expect("request id on the 413");
        let uuid = id.strip_prefix("req-").expect("req- prefix");
        assert_eq!(
            uuid::Uuid::try_parse(uuid)
                .expect("uuid")
                .hyphenated()
                .to_string(),
            uuid
        );
        assert!(
            seen.insert(id.to_string()),
            "request id {id} was used twice"
        );
    }
}

#[test]
fn every_error_has_the_plain_text_shape() {
    let f = Fixture::new();
    let job_id = f.server.copy_ok(&f.alice, &f.img_a, TENANT_A);
    assert_eq!(
        f.server.delete(&job_path(&job_id), Some(&f.alice)).status(),
        204
    );
    let errors: Vec<(Response, u16)> = vec![
        (f.server.post(Some(&f.alice), "{"), 400),
        (
            f.server.get(&format!("{JOBS}?status=x"), Some(&f.alice)),
            400,
        ),
        (f.server.get(JOBS, Some("nope-nope-nope")), 401),
        (f.server.copy(&f.alice, &f.img_a, TENANT_B), 401),
        (f.server.get(&job_path(UNKNOWN_UUID), Some(&f.alice)), 404),
        (f.server.copy(&f.alice, UNKNOWN_UUID, TENANT_A), 404),
        (f.server.get("/v2/other", Some(&f.alice)), 404),
        (send(&f, "PATCH", JOBS), 405),
        (f.server.delete(&job_path(&job_id), Some(&f.alice)), 409),
        (post_as_alice(&f, Some("text/plain"), "{}"), 415),
    ];
    for (resp, code) in errors {
        let length: Option<usize> = resp
            .headers()
            .get("content-length")
            .map(|v| v.to_str().expect("ASCII").parse().expect("a number"));
        let sentence = assert_error(resp, code);
        assert!(!sentence.is_empty());
        assert!(
            !sentence.contains('\n'),
            "{code}: {sentence:?} is not one line"
        );
        assert!(
            sentence.starts_with(|c: char| c.is_ascii_uppercase()),
            "{code}: {sentence:?} does not start with a capital"
        );
        if code == 401 {
            assert_eq!(sentence, "Authentication required.");
        }
        if let Some(length) = length {
            let reason = reqwest::StatusCode::from_u16(code)
                .expect("code")
                .canonical_reason()
                .expect("reason");
            assert_eq!(
                length,
                format!("{code} {reason}\n\n{sentence}\n\n").len(),
                "{code}: Content-Length does not match the body"
            );
        }
    }
    for chunked in [false, true] {
        let resp = raw_post(&f, &[b' '; 16 * 1024 + 1], chunked);
        let sentence = assert_raw_error(&resp, 413);
        assert!(!sentence.contains('\n'), "{sentence:?} is not one line");
        assert_eq!(
            resp.header("content-length"),
            Some(resp.body().len().to_string().as_str())
        );
    }
}

#[test]
fn two_unknown_jobs_differ_only_by_the_id() {
    let f = Fixture::new();
    let one = assert_error(f.server.get(&job_path(UNKNOWN_UUID), Some(&f.bob)), 404);
    let two = assert_error(
        f.server.get(&job_path(OTHER_UNKNOWN_UUID), Some(&f.bob)),
        404,
    );
    assert_eq!(shape(&one, UNKNOWN_UUID), shape(&two, OTHER_UNKNOWN_UUID));
}
