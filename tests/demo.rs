//! `serve --demo` as a new user meets it (issue 17): the commands it prints run as printed,
//! over HTTP and HTTPS, from a shell whose PATH lacks the binary; it gives its user and token
//! back when they were removed or revoked; plain HTTP to the HTTPS port gets a readable 400.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const SAMPLE_TOKEN: &str = "f4328bab05ff4502b397b88657baaefd";

/// A `serve --demo` and what it printed up to its last command.
struct Demo {
    child: Child,
    /// The lines after "demo: try these:", continuation lines joined.
    commands: Vec<String>,
    /// Everything it printed.
    printed: String,
}

impl Drop for Demo {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Demo {
    fn start(lab: &Lab, extra: &[&str]) -> Demo {
        let mut child = Command::new(BIN)
            .args(["serve", "--demo", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(lab.data_dir())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the demo");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut printed = String::new();
        for line in lines.by_ref() {
            let line = line.expect("stdout");
            printed.push_str(&line);
            printed.push('\n');
            if line.trim_start().starts_with("image-replicator --data-dir") {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        let mut commands: Vec<String> = Vec::new();
        let mut joining = false;
        for line in printed
            .lines()
            .skip_while(|l| *l != "demo: try these:")
            .skip(1)
        {
            let text = line.trim();
            match (joining, commands.last_mut()) {
                (true, Some(last)) => {
                    last.push(' ');
                    last.push_str(text.trim_end_matches('\\'));
                }
                _ => commands.push(text.trim_end_matches('\\').to_string()),
            }
            joining = text.ends_with('\\');
        }
        assert!(commands.len() >= 5, "no commands printed:\n{printed}");
        Demo {
            child,
            commands,
            printed,
        }
    }

    /// `http://127.0.0.1:PORT` (or `https://…`), as it printed.
    fn base(&self) -> String {
        self.printed
            .lines()
            .find_map(|l| l.strip_prefix("image-replicator listening on "))
            .expect("the listening line")
            .to_string()
    }

    /// `127.0.0.1:PORT`.
    fn addr(&self) -> String {
        let base = self.base();
        base.split_once("://")
            .map_or(base.clone(), |(_, a)| a.to_string())
    }

    /// The token the demo says to use.
    fn token(&self) -> String {
        let line = self.commands[0].clone();
        let at = line.find("TOKEN=").expect("TOKEN=") + "TOKEN=".len();
        line[at..].split_whitespace().next().unwrap().to_string()
    }

    /// Runs the printed commands in one bash whose PATH does not hold the binary; the output.
    fn run_commands(&self) -> String {
        let script = self.commands.join("\n");
        let out = Command::new("bash")
            .args(["--norc", "--noprofile", "-c", &script])
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .stdin(Stdio::null())
            .output()
            .expect("bash");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("command not found"),
            "{stderr}\nscript:\n{script}"
        );
        // job watch ends the script: 0, or 4 when it saw the canceled job end.
        assert!(
            matches!(out.status.code(), Some(0) | Some(4)),
            "{:?} {stderr}\nscript:\n{script}\n{stdout}",
            out.status
        );
        stdout
    }
}

/// Runs the demo's commands; checks each answer and that the cancel caught the copy running.
fn printed_commands_run(lab: &Lab, extra: &[&str], scheme: &str) {
    let demo = Demo::start(lab, extra);
    assert!(
        demo.commands[0].contains(&format!("API={scheme}://127.0.0.1:")),
        "{}",
        demo.printed
    );
    assert!(
        demo.commands[0].ends_with("/v2/extension/image_replicator"),
        "{}",
        demo.printed
    );
    let out = demo.run_commands();
    let mut lines = out.lines();
    let listed: Value = serde_json::from_str(lines.next().expect("list")).expect("JSON list");
    assert_eq!(listed.as_array().map(Vec::len), Some(3), "{out}");
    let job = lines.next().expect("job id").to_string();
    assert!(uuid::Uuid::try_parse(&job).is_ok(), "{out}");
    let shown: Value = serde_json::from_str(lines.next().expect("show")).expect("JSON job");
    assert_eq!(shown["job_id"], job.as_str());
    assert_eq!(lines.next(), Some("204"), "{out}");
    let images: Value = serde_json::from_str(lines.next().expect("images")).expect("JSON images");
    assert_eq!(images["images"].as_array().map(Vec::len), Some(2), "{out}");
    let page = demo
        .printed
        .lines()
        .find_map(|l| l.strip_prefix("demo: the web page: "))
        .expect("the web page's address");
    assert!(
        page.starts_with(&format!("{scheme}://127.0.0.1:"))
            && page.ends_with(&format!("/ui#token={}", demo.token())),
        "{page}"
    );
    let final_status = poll("the canceled job", Duration::from_secs(20), || {
        let shown = lab.ok_json(&["job", "show", &job]);
        let status = shown["status"].as_str().unwrap().to_string();
        (status == "canceled" || status == "replicated").then_some(status)
    });
    assert_eq!(final_status, "canceled", "the cancel came too late");
}

#[test]
fn the_demos_printed_commands_run_as_printed() {
    printed_commands_run(&Lab::new(), &[], "http");
    // The README's $API is the demo's.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    assert!(readme.contains("API=http://127.0.0.1:9292/v2/extension/image_replicator`"));
    assert!(readme.contains("export PATH=$PWD/target/release:$PATH"));
}

/// A self-signed certificate for 127.0.0.1, written as PEM files.
fn certificate(lab: &Lab) -> (String, String) {
    let generated =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("certificate");
    let cert = lab.dir.path().join("cert.pem");
    let key = lab.dir.path().join("key.pem");
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    (
        cert.to_str().unwrap().to_string(),
        key.to_str().unwrap().to_string(),
    )
}

#[test]
fn the_demo_over_tls_prints_https_commands_that_run() {
    let lab = Lab::new();
    let (cert, key) = certificate(&lab);
    printed_commands_run(&lab, &["--tls-cert", &cert, "--tls-key", &key], "https");
}

#[test]
fn plain_http_to_the_tls_port_gets_a_readable_400() {
    let lab = Lab::new();
    let (cert, key) = certificate(&lab);
    let demo = Demo::start(&lab, &["--tls-cert", &cert, "--tls-key", &key]);
    let addr = demo.addr();
    let mut tcp = std::net::TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"GET /v2/extension/image_replicator/jobs HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{answer}");
    assert!(
        head.contains("content-type: text/plain; charset=UTF-8"),
        "{head}"
    );
    assert_eq!(
        body,
        "400 Bad Request\n\nThe plain HTTP request was sent to an HTTPS port: use https:// instead of http://.\n\n"
    );
    // HTTPS still works beside it.
    let out = Command::new("curl")
        .args(["-s", "--cacert", &cert, &format!("https://{addr}/healthz")])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
}

#[test]
fn the_demo_gives_its_user_and_token_back_when_removed_or_revoked() {
    let lab = Lab::new();
    let reach = |demo: &Demo, token: &str| {
        reqwest::blocking::Client::new()
            .get(format!("{}{JOBS}", demo.base()))
            .header("X-Auth-Token", token)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    let demo = Demo::start(&lab, &[]);
    assert_eq!(demo.token(), SAMPLE_TOKEN);
    drop(demo);

    // Revoked: the sample stays refused; the demo prints a new token that works.
    let id = token_id_of(&lab.ok_json(&["token", "list"]), "demo");
    lab.ok(&["token", "revoke", &id]);
    let demo = Demo::start(&lab, &[]);
    let fresh = demo.token();
    assert_ne!(fresh, SAMPLE_TOKEN, "{}", demo.printed);
    assert!(
        demo.printed.contains("the sample token is revoked"),
        "{}",
        demo.printed
    );
    assert_eq!(reach(&demo, &fresh), 200);
    assert_eq!(reach(&demo, SAMPLE_TOKEN), 401);
    drop(demo);
    // Nor can anyone register the revoked value again.
    let refused = lab.fails(&issue_args("demo", TENANT_A, &["--token", SAMPLE_TOKEN]));
    assert!(refused.contains("already registered"), "{refused}");

    // Removed, with its tokens: the user and the sample token come back.
    lab.ok(&["user", "remove", "demo"]);
    let demo = Demo::start(&lab, &[]);
    assert_eq!(demo.token(), SAMPLE_TOKEN, "{}", demo.printed);
    assert!(
        demo.printed.contains("user demo was removed"),
        "{}",
        demo.printed
    );
    assert_eq!(reach(&demo, SAMPLE_TOKEN), 200);
}

/// The README's "The API with curl" section: its `TOKEN` and `API`, and each ```sh block's
/// command (continuation lines joined) with the `# ` lines that follow it (the answer shown).
fn readme_curl_section() -> (String, String, Vec<(String, Vec<String>)>) {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section: Vec<&str> = readme
        .lines()
        .skip_while(|l| *l != "## The API with curl")
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .collect();
    let value = |name: &str| {
        let intro = section
            .iter()
            .find(|l| l.starts_with("With the demo running"))
            .expect("the intro line");
        let at = intro.find(&format!("`{name}=")).expect(name) + name.len() + 2;
        intro[at..].split('`').next().unwrap().to_string()
    };
    let mut blocks = Vec::new();
    let mut lines = section.iter();
    while let Some(line) = lines.next() {
        if *line != "```sh" {
            continue;
        }
        let mut command = String::new();
        let mut shown = Vec::new();
        for line in lines.by_ref() {
            if *line == "```" {
                break;
            }
            if let Some(answer) = line.strip_prefix('#') {
                shown.push(answer.trim().to_string());
            } else {
                command.push_str(line.trim().trim_end_matches('\\'));
                command.push(' ');
            }
        }
        blocks.push((command.trim().to_string(), shown));
    }
    (value("TOKEN"), value("API"), blocks)
}

#[test]
fn the_readmes_curl_commands_run_against_the_demo_as_written() {
    let lab = Lab::new();
    let demo = Demo::start(&lab, &[]);
    let addr = demo.addr();
    let (token, api, blocks) = readme_curl_section();
    assert_eq!(token, demo.token());
    let api = api.replace("127.0.0.1:9292", &addr);
    assert_eq!(blocks.len(), 7, "{blocks:?}");
    // Figures in the shown answers stand for any: compared with each run of digits as one 0.
    let masked = |text: &str| {
        let mut out = String::new();
        for c in text.chars() {
            if !c.is_ascii_digit() {
                out.push(c);
            } else if !out.ends_with('0') {
                out.push('0');
            }
        }
        out
    };
    let status_of = |id: &str| lab.ok_json(&["job", "show", id])["status"].clone();
    let mut job: Option<String> = None;
    let mut retried: Option<String> = None;
    for (command, shown) in blocks {
        let command = match &job {
            Some(id) => command.replace("<job_id>", id),
            None => command,
        };
        if command.contains("/retry") {
            // A retry needs the canceled job to have ended.
            let id = job.clone().expect("the copy's job");
            let ended = poll("the canceled job", Duration::from_secs(20), || {
                let status = status_of(&id);
                (status == "canceled" || status == "replicated").then_some(status)
            });
            assert_eq!(ended, "canceled");
        }
        let out = Command::new("bash")
            .args(["--norc", "--noprofile", "-c", &command])
            .env("TOKEN", &token)
            .env("API", &api)
            .output()
            .unwrap();
        let answer = String::from_utf8_lossy(&out.stdout).replace('\r', "");
        let (head, body) = answer.split_once("\n\n").unwrap_or((&answer, ""));
        let Some(status) = shown.first() else {
            assert!(head.starts_with("HTTP/1.1 200 OK"), "{command}: {answer}");
            continue;
        };
        assert!(head.starts_with(status.as_str()), "{command}: {answer}");
        for line in &shown[1..] {
            if line.contains(':') && !line.starts_with('[') && !line.starts_with('{') {
                assert!(
                    head.contains(line.as_str()),
                    "{command}: no {line:?} in {head}"
                );
            } else if let Some((start, _)) = line.split_once(" ...") {
                assert!(
                    masked(body).starts_with(&masked(start)),
                    "{command}: {body} is not {line}"
                );
            }
        }
        if command.contains("-X POST") {
            let created: Value = serde_json::from_str(body).expect("202 body");
            let id = created["job_id"].as_str().expect("a job_id").to_string();
            if command.contains("/retry") {
                retried = Some(id);
            } else {
                assert!(body.starts_with(r#"{"job_id": ""#), "{body}");
                job = Some(id);
            }
        }
    }
    let retried = retried.expect("the retry's job");
    assert_ne!(Some(&retried), job.as_ref());
    let detail = lab.ok_json(&["job", "show", &retried]);
    assert_eq!(detail["retries"], 1, "{detail}");
}
