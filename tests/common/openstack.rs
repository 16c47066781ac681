//! Real OpenStack services for tests: Glance (and Keystone) from PyPI on loopback, run by
//! `tests/openstack/lab.py` in the virtualenv `scripts/openstack-venv.sh` makes (once; later
//! runs reuse it). The lab stops every service when its stdin closes, which dropping
//! [`OpenStack`] does (and the death of the test process does too).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::Value;

#[path = "clients.rs"]
pub mod clients;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The venv's python, made or found by the project's script (which serializes concurrent
/// callers with a lock).
fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let out = Command::new("bash")
                .arg(format!("{ROOT}/scripts/openstack-venv.sh"))
                .stderr(Stdio::inherit())
                .output()
                .expect("run scripts/openstack-venv.sh");
            assert!(out.status.success(), "scripts/openstack-venv.sh failed");
            let text = String::from_utf8_lossy(&out.stdout);
            let venv = text
                .lines()
                .last()
                .expect("the venv path")
                .trim()
                .to_string();
            PathBuf::from(venv).join("bin/python")
        })
        .clone()
}

/// The venv's `bin` directory: its `python`, `openstack` (python-openstackclient) …
pub fn venv_bin() -> PathBuf {
    python()
        .parent()
        .expect("the venv's bin directory")
        .to_path_buf()
}

pub struct OpenStack {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// What the lab printed: `glance[i].url`, `keystone` (credentials, projects) …
    pub info: Value,
    pub http: Client,
    _dir: tempfile::TempDir,
}

impl OpenStack {
    /// Starts `glances` Glance services, without authentication or (`keystone`) behind a
    /// Keystone of their own.
    pub fn start(glances: usize, keystone: bool) -> OpenStack {
        Self::start_with(glances, keystone, &[])
    }

    pub fn start_with(glances: usize, keystone: bool, extra: &[&str]) -> OpenStack {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new(python())
            .arg(format!("{ROOT}/tests/openstack/lab.py"))
            .arg("--dir")
            .arg(dir.path())
            .args(["--glance", &glances.to_string()])
            .args(["--auth", if keystone { "keystone" } else { "none" }])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the OpenStack lab");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("lab stdout"));
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("read the lab's description");
        let info: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            let _ = child.kill();
            panic!("the OpenStack lab did not start ({e}); it said {line:?}")
        });
        OpenStack {
            child,
            stdin,
            stdout,
            info,
            http: Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .expect("client"),
            _dir: dir,
        }
    }

    pub fn glance_url(&self, i: usize) -> String {
        self.info["glance"][i]["url"]
            .as_str()
            .expect("glance url")
            .to_string()
    }

    /// Sends a lab command (`stop glance 1`, `start glance 1`, …) and waits for its `ok`.
    pub fn command(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("lab stdin");
        writeln!(stdin, "{command}").expect("write a lab command");
        stdin.flush().expect("flush");
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).expect("lab answer");
        assert_eq!(answer.trim(), "ok", "lab command {command:?} failed");
    }

    /// Sends `signal` ("STOP", "CONT") to every process of Glance `i`: a frozen Glance keeps
    /// its connections open and never answers.
    pub fn signal_glance(&mut self, i: usize, signal: &str) {
        let stdin = self.stdin.as_mut().expect("lab stdin");
        writeln!(stdin, "status").expect("write a lab command");
        stdin.flush().expect("flush");
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).expect("lab answer");
        let status: Value = serde_json::from_str(&answer).expect("lab status JSON");
        let pgid = status["pgids"]["glance"][i]
            .as_i64()
            .expect("a running Glance");
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg("--")
            .arg(format!("-{pgid}"))
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill -{signal} of Glance {i} failed");
    }

    /// A Keystone token for the lab's user `who` ("admin", "service" or a project name),
    /// scoped to that user's project.
    pub fn user_token(&self, who: &str) -> String {
        let ks = &self.info["keystone"];
        let text = |v: &Value| v.as_str().expect("lab credentials").to_string();
        match who {
            "admin" | "service" => self.token(
                &text(&ks[who]["username"]),
                &text(&ks[who]["password"]),
                &text(&ks[who]["project"]),
            ),
            project => self.token(
                &text(&ks["projects"][project]["user"]),
                &text(&ks["projects"][project]["password"]),
                project,
            ),
        }
    }

    /// A project-scoped Keystone token by password (Default domain).
    pub fn token(&self, user: &str, password: &str, project: &str) -> String {
        let body = serde_json::json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": user, "domain": {"name": "Default"}, "password": password}}},
            "scope": {"project": {"name": project, "domain": {"name": "Default"}}}
        }});
        let resp = self
            .http
            .post(format!("{}/auth/tokens", self.keystone_url()))
            .json(&body)
            .send()
            .expect("Keystone auth");
        assert_eq!(
            resp.status(),
            201,
            "Keystone auth as {user}: {:?}",
            resp.text()
        );
        resp.headers()["x-subject-token"]
            .to_str()
            .expect("token")
            .to_string()
    }

    /// Requests Keystone's log shows for `GET /v3/auth/tokens` (token validations).
    pub fn keystone_validations(&self) -> usize {
        let log = self.info["keystone"]["log"].as_str().expect("keystone log");
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"GET /v3/auth/tokens "))
            .count()
    }

    /// Keystone's v3 URL, such as `http://127.0.0.1:PORT/v3`.
    pub fn keystone_url(&self) -> String {
        let url = self.info["keystone"]["url"].as_str().expect("keystone url");
        if url.ends_with("/v3") {
            url.to_string()
        } else {
            format!("{}/v3", url.trim_end_matches('/'))
        }
    }

    fn glance_request(
        &self,
        i: usize,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::blocking::RequestBuilder {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.glance_url(i)));
        if let Some(t) = token {
            req = req.header("x-auth-token", t);
        }
        req
    }

    /// Creates an image in Glance `i` owned by `owner` and uploads `data`; returns its id.
    pub fn upload(
        &self,
        i: usize,
        token: Option<&str>,
        owner: &str,
        disk_format: &str,
        data: Vec<u8>,
    ) -> String {
        let body = serde_json::json!({
            "name": "test image", "disk_format": disk_format,
            "container_format": "bare", "owner": owner,
        });
        let resp = self
            .glance_request(i, reqwest::Method::POST, "/v2/images", token)
            .json(&body)
            .send()
            .expect("create a Glance image");
        assert_eq!(resp.status(), 201, "create: {:?}", resp.text());
        let id = resp.json::<Value>().expect("image JSON")["id"]
            .as_str()
            .expect("id")
            .to_string();
        let resp = self
            .glance_request(
                i,
                reqwest::Method::PUT,
                &format!("/v2/images/{id}/file"),
                token,
            )
            .header("content-type", "application/octet-stream")
            .body(data)
            .send()
            .expect("upload to Glance");
        assert_eq!(resp.status(), 204, "upload: {:?}", resp.text());
        id
    }

    /// Glance `i`'s record of image `id`, or `None` (404).
    pub fn image(&self, i: usize, token: Option<&str>, id: &str) -> Option<Value> {
        let resp = self
            .glance_request(i, reqwest::Method::GET, &format!("/v2/images/{id}"), token)
            .send()
            .expect("GET image");
        if resp.status() == 404 {
            return None;
        }
        assert_eq!(resp.status(), 200);
        Some(resp.json().expect("image JSON"))
    }

    /// The bytes of image `id` in Glance `i`.
    pub fn data(&self, i: usize, token: Option<&str>, id: &str) -> Vec<u8> {
        let resp = self
            .glance_request(
                i,
                reqwest::Method::GET,
                &format!("/v2/images/{id}/file"),
                token,
            )
            .send()
            .expect("GET data");
        assert_eq!(resp.status(), 200);
        resp.bytes().expect("bytes").to_vec()
    }

    /// Waits up to 30 s until Glance `i` no longer has image `id` (an orphan's deletion).
    pub fn wait_image_gone(&self, i: usize, token: Option<&str>, id: &str) {
        super::poll_every(
            Duration::from_millis(200),
            Duration::from_secs(30),
            || self.image(i, token, id).is_none().then_some(()),
            || format!("image {id} to leave Glance {i}"),
        );
    }

    /// Ids of every image in Glance `i`, whatever its state.
    pub fn image_ids(&self, i: usize, token: Option<&str>) -> Vec<String> {
        let resp = self
            .glance_request(i, reqwest::Method::GET, "/v2/images?limit=1000", token)
            .send()
            .expect("list images");
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().expect("list JSON");
        body["images"]
            .as_array()
            .expect("images")
            .iter()
            .map(|i| i["id"].as_str().expect("id").to_string())
            .collect()
    }
}

impl Drop for OpenStack {
    fn drop(&mut self) {
        // EOF on its stdin makes the lab stop everything it started.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real qcow2 image of about `mib` MiB of pseudo-random data (Glance checks that uploads
/// match their disk format), made with qemu-img.
pub fn qcow2(dir: &std::path::Path, mib: usize, seed: u64) -> Vec<u8> {
    let raw = dir.join(format!("src-{seed}.raw"));
    let qcow = dir.join(format!("src-{seed}.qcow2"));
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut data = vec![0u8; mib << 20];
    for chunk in data.chunks_mut(8) {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    std::fs::write(&raw, &data).expect("write raw");
    let status = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .status()
        .expect("run qemu-img");
    assert!(status.success(), "qemu-img convert failed");
    let _ = std::fs::remove_file(&raw);
    std::fs::read(&qcow).expect("read qcow2")
}
