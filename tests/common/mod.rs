//! Test support: a temporary data directory, the real binary as CLI, and the real server on
//! 127.0.0.1:0 talked to over HTTP.
#![allow(dead_code)] // each test crate uses its own part of this module

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::blocking::{Client, Response};
use serde_json::Value;

pub mod cli;
pub mod openstack;
pub mod proxy;
pub mod raw;

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
    /// Environment of every command and server of the lab (a database URL, say).
    pub env: Vec<(String, String)>,
}

impl Lab {
    pub fn new() -> Lab {
        Lab {
            dir: tempfile::tempdir().expect("temp dir"),
            env: Vec::new(),
        }
    }

    /// A lab whose records are in the PostgreSQL database `url` (its data directory holds
    /// the admin socket and the default region directories).
    pub fn on_database(url: &str) -> Lab {
        let mut lab = Lab::new();
        lab.env
            .push(("IMAGE_REPLICATOR_DATABASE_URL".into(), url.to_string()));
        lab
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
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
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

    /// Runs a command that must succeed with `--json`; returns its parsed stdout.
    pub fn ok_json(&self, args: &[&str]) -> Value {
        let all = json_args(args);
        parse_json(&all, &self.ok(&all))
    }

    /// The directory of a region's images.
    pub fn region_dir(&self, region: &str) -> PathBuf {
        self.data_dir().join("regions").join(region)
    }

    /// Names of the files in a region's directory, sorted.
    pub fn files_in(&self, region: &str) -> Vec<String> {
        names_in(&self.region_dir(region)).into_iter().collect()
    }

    /// Seeds `jobs` (list-format objects) from a file; all of them must be new.
    pub fn seed_jobs(&self, jobs: &[Value]) {
        let path = self.dir.path().join("seed.json");
        std::fs::write(&path, Value::Array(jobs.to_vec()).to_string()).expect("seed file");
        let out = self.ok(&["job", "seed", path.to_str().expect("path")]);
        assert_eq!(
            out,
            format!("{} job(s) seeded, 0 already present\n", jobs.len())
        );
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
        self.ok(&import_args(
            file.to_str().expect("path"),
            tenant,
            name,
            &[],
        ))
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

    /// A standard lab plus alice2, a member of tenants A and B (so that she may copy A's images
    /// into B); returns it with alice2's token for A.
    pub fn standard_with_copier() -> (Lab, String) {
        let lab = Lab::new();
        let token = lab.copier();
        (lab, token)
    }

    /// Makes this lab the standard one plus alice2 (see [`Lab::standard_with_copier`]); her
    /// token for A.
    pub fn copier(&self) -> String {
        self.standard();
        self.ok(&[
            "user", "add", "alice2", "--tenant", TENANT_A, "--tenant", TENANT_B,
        ]);
        self.token("alice2", TENANT_A)
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
        self.spawn_server(args, env, None)
    }

    /// Starts `serve --listen 127.0.0.1:0` with `args` and `env`, under `umask` if given;
    /// returns once it listens and its admin socket exists.
    fn spawn_server(&self, args: &[&str], env: &[(&str, &str)], umask: Option<&str>) -> Server {
        let log = self.dir.path().join("server.log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let dir = self.data_dir();
        let mut all = vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.to_str().expect("path"),
        ];
        all.extend_from_slice(args);
        let mut command = match umask {
            Some(umask) => command_under_umask(umask, &all),
            None => {
                let mut command = Command::new(BIN);
                command.args(&all);
                command
            }
        };
        let mut child = command
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
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
        server.wait_for_socket(&dir);
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

    /// `127.0.0.1:PORT`, for raw sockets.
    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
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
        let body: Value = resp.json().expect("202 body");
        body["job_id"].as_str().expect("job_id").to_string()
    }

    /// The job as `GET /jobs/{id}` shows it: a 200 with a JSON body.
    pub fn job(&self, token: &str, id: &str) -> Value {
        let resp = self.get(&job_path(id), Some(token));
        assert_eq!(resp.status(), 200, "GET {id}: {:?}", resp.text());
        assert_eq!(
            resp.headers()["content-type"],
            "application/json; charset=UTF-8"
        );
        resp.json().expect("job JSON")
    }

    /// Polls a job every 50 ms until `done` holds; returns it.
    pub fn wait_job(
        &self,
        token: &str,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_job_progress(token, id, timeout, done).0
    }

    /// [`Server::wait_job`], also returning the `copy_progress` of every poll, in order.
    pub fn wait_job_progress(
        &self,
        token: &str,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> (Value, Vec<u64>) {
        let mut progress = Vec::new();
        let job = poll_every(
            Duration::from_millis(50),
            timeout,
            || {
                let job = self.job(token, id);
                progress.push(job["copy_progress"].as_u64().expect("progress"));
                done(&job).then_some(job)
            },
            || {
                format!(
                    "job {id}, which is now {}; log:\n{}",
                    self.job(token, id),
                    self.log_text()
                )
            },
        );
        (job, progress)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited in time.
    /// A process already reaped is not signalled again: its pid may belong to another.
    pub fn stop(&mut self) -> bool {
        if let Ok(Some(_)) = self.child.try_wait() {
            return true;
        }
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

    /// SIGKILLs the server and reaps it (a later [`Server::stop`] or drop signals nothing).
    pub fn kill_9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap the killed server");
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

// ----- the standard fixture -----

/// The standard lab with its server running (`serve --no-worker`), a token per user and one
/// image per tenant. `server` is declared first so it stops before the lab's directory goes
/// away.
pub struct Fixture {
    pub server: Server,
    pub lab: Lab,
    pub alice: String,
    pub bob: String,
    pub carol: String,
    pub root: String,
    /// alice's image (tenant A, region ot1), 3,000 bytes.
    pub img_a: String,
    /// bob's image (tenant B, region ot2), 2,000 bytes.
    pub img_b: String,
    /// carol's image (tenant C, region ot1), 1,000 bytes.
    pub img_c: String,
}

impl Fixture {
    pub fn new() -> Fixture {
        let lab = Lab::new();
        lab.standard();
        let alice = lab.token("alice", TENANT_A);
        let bob = lab.token("bob", TENANT_B);
        let carol = lab.token("carol", TENANT_C);
        let root = lab.token("root", TENANT_A);
        let img_a = lab.image(TENANT_A, "alpha-image", 3000);
        let img_b = lab.image(TENANT_B, "beta-image", 2000);
        let img_c = lab.image(TENANT_C, "gamma-image", 1000);
        let server = lab.serve();
        Fixture {
            server,
            lab,
            alice,
            bob,
            carol,
            root,
            img_a,
            img_b,
            img_c,
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
    error_sentence(&resp.text().expect("error body"), code)
}

/// The sentence of an error body, asserted to be `<code> <reason>\n\n<sentence>\n\n`.
pub fn error_sentence(body: &str, code: u16) -> String {
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
pub fn jobs(resp: Response) -> Vec<Value> {
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/json; charset=UTF-8"
    );
    resp.json().expect("a JSON array")
}

/// Every job `token` may list, page after page (a page holds at most 1,000).
pub fn all_jobs(server: &Server, token: &str) -> Vec<Value> {
    let mut all: Vec<Value> = jobs(server.get(JOBS, Some(token)));
    let mut page = all.len();
    while page == 1000 {
        let marker = all
            .last()
            .and_then(|j| j["job_id"].as_str())
            .expect("job_id")
            .to_string();
        let next = jobs(server.get(&format!("{JOBS}?marker={marker}"), Some(token)));
        page = next.len();
        all.extend(next);
    }
    all
}

pub fn job_path(id: &str) -> String {
    format!("{JOBS}/{id}")
}

/// The keys of a JSON object, in its map's order.
pub fn keys_of(object: &Value) -> Vec<&str> {
    object
        .as_object()
        .expect("a JSON object")
        .keys()
        .map(String::as_str)
        .collect()
}

/// The `job_id`s of a list of jobs, in order.
pub fn job_ids(list: &[Value]) -> Vec<String> {
    list.iter()
        .map(|j| j["job_id"].as_str().expect("job_id").to_string())
        .collect()
}

/// SHA-512 of `bytes`, hex, as records carry it in `os_hash_value`.
pub fn sha512_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    image_replicator::model::to_hex(&sha2::Sha512::digest(bytes))
}

/// A `wait_job` condition: the job has this status.
pub fn status_is(status: &'static str) -> impl Fn(&Value) -> bool {
    move |job: &Value| job["status"] == status
}

/// A `wait_job` condition: the job has ended (replicated, canceled or error).
pub fn terminal(job: &Value) -> bool {
    matches!(
        job["status"].as_str(),
        Some("replicated" | "canceled" | "error")
    )
}

/// The status of a job object.
pub fn job_status(job: &Value) -> &str {
    job["status"].as_str().expect("status")
}

/// Waits until the job is terminal (as the CLI sees it); returns it.
pub fn wait_terminal(lab: &Lab, id: &str, timeout: Duration) -> Value {
    poll(&format!("job {id} to end"), timeout, || {
        let job = lab.ok_json(&["job", "show", id]);
        terminal(&job).then_some(job)
    })
}

/// The `auth` figures of `status`: argon2 verifications, cache hits, cached tokens.
pub fn auth_stats(lab: &Lab) -> Value {
    lab.ok_json(&["status"])["auth"].clone()
}

/// The `X-Openstack-Request-Id` of a response.
pub fn request_id(resp: &Response) -> String {
    resp.headers()["x-openstack-request-id"]
        .to_str()
        .expect("request id")
        .to_string()
}

/// Asserts the reference 401, a line of the server's log with its request id that names
/// `cause`, and no trace of `token` in the log.
pub fn assert_401_logged(server: &Server, resp: Response, cause: &str, token: &str) {
    let id = request_id(&resp);
    assert_401(resp);
    let lines = log_lines_of(server, &id);
    assert!(
        lines.iter().any(|l| l.contains(cause)),
        "{cause}: {lines:?}"
    );
    assert!(!server.log_text().contains(token), "a token is in the log");
}

/// The server log's lines that name `request_id`, once there are at least two (the request's
/// own line and one more, such as a 401's cause).
pub fn log_lines_of(server: &Server, request_id: &str) -> Vec<String> {
    poll("the request's log lines", Duration::from_secs(5), || {
        let lines: Vec<String> = server
            .log_text()
            .lines()
            .filter(|l| l.contains(request_id))
            .map(String::from)
            .collect();
        (lines.len() >= 2).then_some(lines)
    })
}

/// The lines of a server log that report a panic.
pub fn log_panics(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("panicked"))
        .map(String::from)
        .collect()
}

// ----- the CLI's JSON -----

/// `args` with `--json` in front.
pub fn json_args<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    all
}

/// What a command run with `args` printed, parsed as JSON.
pub fn parse_json(args: &[&str], stdout: &str) -> Value {
    serde_json::from_str::<Value>(stdout)
        .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {stdout}"))
}

/// `token issue --user <user> --tenant <tenant>` followed by `extra`.
pub fn issue_args<'a>(user: &'a str, tenant: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["token", "issue", "--user", user, "--tenant", tenant];
    args.extend_from_slice(extra);
    args
}

/// The id of `user`'s first token in a `token list`.
pub fn token_id_of(list: &Value, user: &str) -> String {
    list.as_array()
        .expect("a token list")
        .iter()
        .find(|t| t["user"] == user)
        .and_then(|t| t["id"].as_str())
        .unwrap_or_else(|| panic!("no token id of {user} in {list}"))
        .to_string()
}

/// `image import <file> --tenant <tenant> --name <name>` followed by `extra`.
pub fn import_args<'a>(
    file: &'a str,
    tenant: &'a str,
    name: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec!["image", "import", file, "--tenant", tenant, "--name", name];
    args.extend_from_slice(extra);
    args
}

/// An RFC 3339 time of the CLI's JSON, in seconds since 1970.
pub fn epoch(rfc3339: &Value) -> u64 {
    let text = rfc3339.as_str().expect("a time string");
    humantime::parse_rfc3339(text)
        .expect("RFC 3339")
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

// ----- files -----

/// Names of the files in a directory, sorted.
pub fn names_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if path.is_file() {
            out.push(path);
        }
    }
    out
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Asserts that no file of `files` holds any of `secrets`.
pub fn assert_secrets_absent(files: &[PathBuf], secrets: &[String]) {
    for path in files {
        let bytes = std::fs::read(path).expect("read file");
        for secret in secrets {
            assert!(
                !contains(&bytes, secret.as_bytes()),
                "token {secret} found in {}",
                path.display()
            );
        }
    }
}

// ----- waiting -----

/// Calls `probe` every `every` until it returns `Some`; after `timeout`, fails saying it timed
/// out waiting for `what()`.
pub fn poll_every<T>(
    every: Duration,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
    what: impl FnOnce() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {}",
            what()
        );
        std::thread::sleep(every);
    }
}

/// Repeats `probe` every 20 ms until it returns `Some`, for at most `timeout`.
pub fn poll<T>(what: &str, timeout: Duration, probe: impl FnMut() -> Option<T>) -> T {
    poll_every(Duration::from_millis(20), timeout, probe, || {
        what.to_string()
    })
}

// ----- soak and fuzz runs -----

/// A count from the environment variable `name`, or `default`.
pub fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Prints the figures of a run as one line (`cargo test -- --nocapture` shows it).
pub fn figures(test: &str, pairs: &[(&str, String)]) {
    let text: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("figures: {test}: {}", text.join(" "));
}

/// splitmix64: small, seedable, good enough to pick moments and mutations.
pub struct Rng(pub u64);

impl Rng {
    /// Seeded from `RELIABILITY_SEED` or the clock; the seed is printed to replay a run.
    pub fn for_test(test: &str) -> Rng {
        let seed = std::env::var("RELIABILITY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        println!("{test}: RELIABILITY_SEED={seed}");
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 for `n` = 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// An index below `len` (0 for `len` = 0).
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// A generator for another thread, derived from this one.
    pub fn fork(&mut self) -> Rng {
        Rng(self.next())
    }
}

// ----- raw HTTP -----

/// `body` in chunked transfer encoding, in chunks of 4 KiB, with the final empty chunk.
pub fn chunk_encode(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in body.chunks(4096) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

// ----- small file systems -----

/// A tmpfs the test mounted itself (root only), unmounted when dropped: a real file system
/// that fills up. Declare it after the [`Lab`] whose directory it sits in, so that it is
/// unmounted before the lab's directory is removed.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it, e.g. `16m`) on `path`, which is
    /// created; `None`, with a line on stderr saying why, when mounting is impossible here.
    pub fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(path)
            .output();
        match out {
            Ok(out) if out.status.success() => Some(Tmpfs {
                path: path.to_path_buf(),
            }),
            Ok(out) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs on {} (root is needed): {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }

    /// Writes `filler` until the file system is full; returns the bytes written.
    pub fn fill(&self, filler: &Path) -> u64 {
        use std::io::Write;
        let mut file = std::fs::File::create(filler).expect("filler");
        let mut written = 0u64;
        for size in [1 << 16, 4096, 1] {
            let chunk = vec![0xa5u8; size];
            while let Ok(n) = file.write(&chunk) {
                if n == 0 {
                    break;
                }
                written += n as u64;
            }
        }
        let _ = file.sync_all();
        written
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Copies a directory tree (files and directories only).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let kind = entry.file_type().expect("file type");
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target);
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

// ----- umask -----

/// `sh -c 'umask MASK; exec "$0" "$@"' BIN ARGS…`: the binary started under another umask.
pub fn command_under_umask(umask: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("umask {umask}; exec \"$0\" \"$@\""))
        .arg(BIN)
        .args(args);
    cmd
}

impl Lab {
    /// Runs the CLI under `umask`; it must succeed. Returns stdout and stderr.
    pub fn ok_under_umask(&self, umask: &str, args: &[&str]) -> (String, String) {
        let dir = self.data_dir();
        let mut all = vec!["--data-dir", dir.to_str().expect("path")];
        all.extend_from_slice(args);
        let out = command_under_umask(umask, &all)
            .stdin(Stdio::null())
            .output()
            .expect("run the CLI");
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts `serve` (with the worker) on 127.0.0.1:0 under `umask`.
    pub fn serve_under_umask(&self, umask: &str) -> Server {
        self.spawn_server(&[], &[], Some(umask))
    }
}

/// Bytes an unprivileged process may still write on the file system holding `path`.
pub fn free_bytes(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: statvfs only writes the struct passed; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0, "statvfs");
    (st.f_bavail as u64) * (st.f_frsize as u64)
}
