//! Test support: a temporary data directory, the real binary as CLI, and the real server on
//! 127.0.0.1:0 talked to over HTTP.
#![allow(dead_code)] // each test crate uses its own part of this module

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, Response};

pub mod openstack;

pub const BIN: &str = env!("CARGO_BIN_EXE_image-replicator");
pub const JOBS: &str = "/v2/extension/image_replicator/jobs";
/// The reference's 401 body: 44 bytes.
pub const BODY_401: &str = "401 Unauthorized\n\nAuthentication required.\n\n";

/// Tenants of the standard lab.
pub const TENANT_A: &str = "236ae314ef6944f4ab98fa7519e54325";
pub const TENANT_B: &str = "91b5c7c09cbd45caa3c146fd67ae471e";
/// A third tenant written as a hyphenated UUID.
pub const TENANT_C: &str = "5d9a3f0e-2b7c-4c1e-9f3a-7e6b1d2c4a5f";

/// A temporary data directory, removed when dropped.
pub struct Lab {
    pub dir: tempfile::TempDir,
}

impl Lab {
    pub fn new() -> Lab {
        Lab {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs the binary with `--data-dir` on this lab.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_stdin(args, None)
    }

    pub fn cli_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.arg("--data-dir").arg(self.data_dir()).args(args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn the CLI");
        if let Some(input) = stdin {
            use std::io::Write;
            let mut pipe = child.stdin.take().expect("stdin");
            pipe.write_all(input).expect("write stdin");
        }
        child.wait_with_output().expect("run the CLI")
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs a command that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "{args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).expect("utf-8 stderr")
    }

    /// Writes a file of `size` bytes in the lab and returns its path.
    pub fn file(&self, name: &str, size: usize) -> PathBuf {
        let path = self.dir.path().join(name);
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
        std::fs::write(&path, bytes).expect("write file");
        path
    }

    /// Imports a file as an image of `tenant`; returns the image id.
    pub fn image(&self, tenant: &str, name: &str, size: usize) -> String {
        let file = self.file(&format!("{name}.raw"), size);
        self.ok(&[
            "image",
            "import",
            file.to_str().expect("path"),
            "--tenant",
            tenant,
            "--name",
            name,
        ])
        .trim()
        .to_string()
    }

    pub fn token(&self, user: &str, tenant: &str) -> String {
        self.ok(&["token", "issue", "--user", user, "--tenant", tenant])
            .trim()
            .to_string()
    }

    /// Regions ot1 and ot2; tenant A and C in ot1, B in ot2; users alice (A), bob (B),
    /// carol (C, and also member of B) and admin root (A).
    pub fn standard(&self) {
        self.ok(&["region", "add", "ot1"]);
        self.ok(&["region", "add", "ot2"]);
        self.ok(&[
            "tenant", "add", TENANT_A, "--region", "ot1", "--name", "alpha",
        ]);
        self.ok(&[
            "tenant", "add", TENANT_B, "--region", "ot2", "--name", "beta",
        ]);
        self.ok(&["tenant", "add", TENANT_C, "--region", "ot1"]);
        self.ok(&["user", "add", "alice", "--tenant", TENANT_A]);
        self.ok(&["user", "add", "bob", "--tenant", TENANT_B]);
        self.ok(&[
            "user", "add", "carol", "--tenant", TENANT_C, "--tenant", TENANT_B,
        ]);
        self.ok(&["user", "add", "root", "--tenant", TENANT_A, "--admin"]);
    }

    /// Starts `serve --no-worker` on 127.0.0.1:0 (the API alone: jobs stay in the state the
    /// API gives them); stopped when the returned value is dropped.
    pub fn serve(&self) -> Server {
        self.serve_with(&["--no-worker"])
    }

    /// Starts `serve` with extra arguments on 127.0.0.1:0.
    pub fn serve_with(&self, args: &[&str]) -> Server {
        self.serve_env(args, &[])
    }

    /// Starts `serve` with extra arguments and environment variables on 127.0.0.1:0.
    pub fn serve_env(&self, args: &[&str], env: &[(&str, &str)]) -> Server {
        let log = self.dir.path().join("server.log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(self.data_dir())
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn the server");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut base = None;
        for line in lines.by_ref() {
            let line = line.expect("server stdout");
            if let Some(addr) = line.strip_prefix("image-replicator listening on ") {
                base = Some(addr.trim().to_string());
                break;
            }
        }
        // Keep draining stdout so the server never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        let Some(base) = base else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the server did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        let mut server = Server {
            child,
            base,
            log,
            client: Client::new(),
        };
        server.wait_for_socket(&self.data_dir());
        server
    }
}

pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub log: PathBuf,
    pub client: Client,
}

impl Server {
    fn wait_for_socket(&mut self, data_dir: &Path) {
        let socket = data_dir.join("admin.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "no admin socket appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str, token: Option<&str>) -> Response {
        let mut req = self.client.get(self.url(path));
        if let Some(t) = token {
            req = req.header("X-Auth-Token", t);
        }
        req.send().expect("GET")
    }

    pub fn delete(&self, path: &str, token: Option<&str>) -> Response {
        let mut req = self.client.delete(self.url(path));
        if let Some(t) = token {
            req = req.header("X-Auth-Token", t);
        }
        req.send().expect("DELETE")
    }

    /// POSTs a raw body with `Content-Type: application/json`.
    pub fn post(&self, token: Option<&str>, body: &str) -> Response {
        let mut req = self
            .client
            .post(self.url(JOBS))
            .header("Content-Type", "application/json")
            .body(body.to_string());
        if let Some(t) = token {
            req = req.header("X-Auth-Token", t);
        }
        req.send().expect("POST")
    }

    /// POSTs a copy request; returns the response.
    pub fn copy(&self, token: &str, image_id: &str, tenant_dst: &str) -> Response {
        let body = serde_json::json!({"image_id": image_id, "tenant_id_dst": tenant_dst});
        self.post(Some(token), &body.to_string())
    }

    /// POSTs a copy request that must succeed; returns the new job id.
    pub fn copy_ok(&self, token: &str, image_id: &str, tenant_dst: &str) -> String {
        let resp = self.copy(token, image_id, tenant_dst);
        assert_eq!(resp.status(), 202, "copy failed: {:?}", resp.text());
        let body: serde_json::Value = resp.json().expect("202 body");
        body["job_id"].as_str().expect("job_id").to_string()
    }

    /// The job as `GET /jobs/{id}` shows it.
    pub fn job(&self, token: &str, id: &str) -> serde_json::Value {
        let resp = self.get(&format!("{JOBS}/{id}"), Some(token));
        assert_eq!(resp.status(), 200);
        resp.json().expect("job JSON")
    }

    /// Polls a job every 50 ms until `done` holds; returns it.
    pub fn wait_job(
        &self,
        token: &str,
        id: &str,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.job(token, id);
            if done(&job) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting; job is {job}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited in time.
    pub fn stop(&mut self) -> bool {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.stop() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Asserts the exact reference 401: status, body bytes, Vary and Content-Type.
pub fn assert_401(resp: Response) {
    assert_eq!(resp.status(), 401);
    let headers = resp.headers().clone();
    assert_eq!(headers["vary"], "X-Auth-Token");
    assert_eq!(headers["content-type"], "text/plain; charset=UTF-8");
    let body = resp.text().expect("401 body");
    assert_eq!(body, BODY_401);
    assert_eq!(body.len(), 44);
}

/// Asserts an error response in the plain-text shape `<code> <reason>\n\n<sentence>\n\n`.
/// Returns the sentence.
pub fn assert_error(resp: Response, code: u16) -> String {
    assert_eq!(resp.status(), code, "unexpected status");
    assert_eq!(resp.headers()["content-type"], "text/plain; charset=UTF-8");
    let body = resp.text().expect("error body");
    let reason = reqwest::StatusCode::from_u16(code)
        .expect("code")
        .canonical_reason()
        .expect("reason");
    let head = format!("{code} {reason}\n\n");
    assert!(
        body.starts_with(&head),
        "body {body:?} does not start with {head:?}"
    );
    assert!(body.ends_with(".\n\n"), "body {body:?} is not one sentence");
    body[head.len()..body.len() - 2].to_string()
}

/// The job objects of a list response.
pub fn jobs(resp: Response) -> Vec<serde_json::Value> {
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/json; charset=UTF-8"
    );
    resp.json().expect("a JSON array")
}
