//! Text from a tenant or a remote service (image names, Glance's error bodies) holding
//! control characters: escaped (`\u{1b}`) wherever a person reads it (the CLI's tables and
//! fields, its error messages, the server log), exact in the JSON outputs.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use common::openstack::OpenStack;
use common::*;
use serde_json::Value;

/// A name that, printed raw, clears the screen, returns to the line's start, forges a second
/// row, rings the bell and reverses what follows.
const EVIL: &str = "evil\u{1b}[2J\rFAKE\nJOB-ROW\u{7}\u{202e}txt";
/// How the CLI and the log show it.
const EVIL_SHOWN: &str = "evil\\u{1b}[2J\\u{d}FAKE\\u{a}JOB-ROW\\u{7}\\u{202e}txt";

/// No character a terminal or a log reader would act on.
fn assert_inert(what: &str, text: &str) {
    for c in text.chars() {
        let control = (c.is_control() && c != '\n') || ('\u{202a}'..='\u{202e}').contains(&c);
        assert!(!control, "{what} holds a raw {c:?}: {text:?}");
    }
}

/// A text table: a header and `rows` rows, each shown on its own line.
fn assert_rows(what: &str, table: &str, rows: usize) {
    assert_eq!(table.lines().count(), rows + 1, "{what}: {table:?}");
}

#[test]
fn image_name_with_control_characters_is_escaped_in_text_and_exact_in_json() {
    let (lab, token) = Lab::standard_with_copier();
    let file = lab.file("evil.raw", 4096);
    let image = lab
        .ok(&import_args(file.to_str().unwrap(), TENANT_A, EVIL, &[]))
        .trim()
        .to_string();

    let list = lab.ok(&["image", "list"]);
    assert_inert("image list", &list);
    assert_rows("image list", &list, 1);
    assert!(list.contains(EVIL_SHOWN), "{list}");
    let show = lab.ok(&["image", "show", &image]);
    assert_inert("image show", &show);
    assert!(show.contains(&format!("name: {EVIL_SHOWN}\n")), "{show}");
    assert_eq!(lab.ok_json(&["image", "list"])[0]["name"], EVIL);
    assert_eq!(lab.ok_json(&["image", "show", &image])["name"], EVIL);

    // The name in an error message main prints.
    let refused = lab.fails(&["image", "show", EVIL]);
    assert_inert("an error message", &refused);
    assert!(refused.contains(EVIL_SHOWN), "{refused}");

    let server = lab.serve();
    let job = server.copy_ok(&token, &image, TENANT_B);
    assert_job_texts(&lab, &server, &token, &job);
    assert_eq!(lab.ok_json(&["job", "list"])[0]["source_image_name"], EVIL);
    assert_eq!(
        lab.ok_json(&["job", "show", &job])["source_image_name"],
        EVIL
    );
    assert_inert("the server log", &server.log_text());
}

#[test]
fn glance_image_name_with_control_characters_is_escaped_in_text_and_exact_in_json() {
    const TENANT_DIR: &str = "3c4d5e6f708192a3b4c5d6e7f8091a2b";
    let os = OpenStack::start(1, false);
    let lab = Lab::new();
    lab.ok(&["region", "add", "g0", "--glance-url", &os.glance_url(0)]);
    lab.ok(&["region", "add", "d"]);
    lab.ok(&["tenant", "add", TENANT_A, "--region", "g0"]);
    lab.ok(&["tenant", "add", TENANT_DIR, "--region", "d"]);
    lab.ok(&[
        "user", "add", "alice", "--tenant", TENANT_A, "--tenant", TENANT_DIR,
    ]);
    let token = lab.token("alice", TENANT_A);

    // The tenant names its image in Glance itself.
    let glance = os.glance_url(0);
    let created = os
        .http
        .post(format!("{glance}/v2/images"))
        .json(&serde_json::json!({
            "name": EVIL, "disk_format": "raw", "container_format": "bare", "owner": TENANT_A,
        }))
        .send()
        .unwrap();
    assert_eq!(created.status(), 201, "{:?}", created.text());
    let image = created.json::<Value>().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let uploaded = os
        .http
        .put(format!("{glance}/v2/images/{image}/file"))
        .header("content-type", "application/octet-stream")
        .body(vec![7u8; 4096])
        .send()
        .unwrap();
    assert_eq!(uploaded.status(), 204, "{:?}", uploaded.text());
    assert_eq!(os.image(0, None, &image).unwrap()["name"], EVIL);

    let list = lab.ok(&["image", "list", "--region", "g0"]);
    assert_inert("image list", &list);
    assert_rows("image list", &list, 1);
    assert!(list.contains(EVIL_SHOWN), "{list}");
    assert_eq!(
        lab.ok_json(&["image", "list", "--region", "g0"])[0]["name"],
        EVIL
    );

    let server = lab.serve();
    let job = server.copy_ok(&token, &image, TENANT_DIR);
    assert_job_texts(&lab, &server, &token, &job);
    assert_eq!(
        lab.ok_json(&["job", "show", &job])["source_image_name"],
        EVIL
    );
    assert_inert("the server log", &server.log_text());
}

/// An HTTP service on 127.0.0.1 standing for a hostile (or compromised) Glance, which the
/// lab's real Glance cannot play: an empty image list for the appliance's probe, and `400`
/// with `body` for every other request. Returns its base URL; it lives as long as the test.
fn hostile_glance(body: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut reader = BufReader::new(&stream);
                let mut request = String::new();
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if request.is_empty() {
                        request = line.clone();
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(n) = lower.strip_prefix("content-length:") {
                        length = n.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut sink = vec![0; length];
                let _ = reader.read_exact(&mut sink);
                let (status, text) = if request.starts_with("GET /v2/images?limit=1 ") {
                    ("200 OK", "{\"images\": []}")
                } else {
                    ("400 Bad Request", body)
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                );
                let _ = (&stream).write_all(answer.as_bytes());
            });
        }
    });
    url
}

#[test]
fn glance_error_body_is_escaped_and_capped_in_the_log_and_the_job_error() {
    // One line (only the first line of a body is kept), then far more than is kept.
    const BODY: &str = "denied\u{1b}]0;owned\u{7}\rINFO all copies verified\u{1b}[8m\u{9b}hidden \
        xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\
        xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\
        xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\
        \nsecond line";
    const SHOWN: &str =
        "denied\\u{1b}]0;owned\\u{7}\\u{d}INFO all copies verified\\u{1b}[8m\\u{9b}hidden";
    let lab = Lab::new();
    lab.ok(&["region", "add", "d"]);
    lab.ok(&["region", "add", "h", "--glance-url", &hostile_glance(BODY)]);
    lab.ok(&["tenant", "add", TENANT_A, "--region", "d"]);
    lab.ok(&["tenant", "add", TENANT_B, "--region", "h"]);
    lab.ok(&[
        "user", "add", "alice", "--tenant", TENANT_A, "--tenant", TENANT_B,
    ]);
    let token = lab.token("alice", TENANT_A);
    let image = lab.image(TENANT_A, "plain", 4096);

    let server = lab.serve_with(&[]);
    let job = server.copy_ok(&token, &image, TENANT_B);
    let ended = server.wait_job(&token, &job, Duration::from_secs(60), terminal);
    assert_eq!(ended["status"], "error", "{ended}");

    let error = lab.ok_json(&["job", "show", &job])["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(error.contains(SHOWN), "{error:?}");
    assert!(!error.contains("second line"), "{error:?}");
    let kept = error.split(": ").last().unwrap();
    assert!(
        kept.ends_with('…') && kept.chars().count() <= 201,
        "{} characters kept of the body: {error:?}",
        kept.chars().count()
    );
    let show = lab.ok(&["job", "show", &job]);
    assert_inert("job show", &show);
    assert!(show.contains(SHOWN), "{show}");
    // The job ended in error: job watch says so with exit status 3.
    let out = lab.cli(&["job", "watch", &job]);
    assert_eq!(out.status.code(), Some(3));
    let watched = String::from_utf8(out.stdout).expect("utf-8");
    assert_inert("job watch", &watched);
    assert!(watched.contains(SHOWN), "{watched}");

    let log = poll("the failure in the log", Duration::from_secs(10), || {
        let log = server.log_text();
        log.contains("job failed").then_some(log)
    });
    assert_inert("the server log", &log);
    let line = log
        .lines()
        .find(|l| l.contains("job failed"))
        .unwrap()
        .to_string();
    assert!(line.contains(SHOWN), "{line}");
    assert!(!log.contains("\nINFO all copies verified"), "{log}");
}

/// The job of a copy of the evil image: exact in the API, escaped in `job list` (one row) and
/// `job show`.
fn assert_job_texts(lab: &Lab, server: &Server, token: &str, job: &str) {
    assert_eq!(server.job(token, job)["source_image_name"], EVIL);
    let list = lab.ok(&["job", "list"]);
    assert_inert("job list", &list);
    assert_rows("job list", &list, 1);
    assert!(list.contains(EVIL_SHOWN), "{list}");
    let show = lab.ok(&["job", "show", job]);
    assert_inert("job show", &show);
    assert!(
        show.contains(&format!("source_image_name: {EVIL_SHOWN}\n")),
        "{show}"
    );
}
