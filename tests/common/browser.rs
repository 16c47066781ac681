//! A real headless Chromium driven through chromedriver's W3C WebDriver HTTP API, with the
//! blocking reqwest client the other tests use (no Python, no selenium, no second virtualenv).
//!
//! Each [`Browser`] has its own chromedriver on a free port of 127.0.0.1 (chromedriver picks
//! it: `--port=0`) and its own Chromium profile in a temporary directory, so tests run in
//! parallel. Dropping it ends the session, then kills chromedriver's process group and any
//! process still running with that profile, even when the test panicked.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::blocking::Client;
use serde_json::{json, Value};

/// The key of an element reference in W3C WebDriver.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The Chromium binary and its driver, or a sentence saying which Debian packages to install.
pub fn chromium() -> Result<(PathBuf, PathBuf), String> {
    let find = |names: &[&str]| -> Option<PathBuf> {
        names.iter().find_map(|name| {
            let path = PathBuf::from(name);
            if path.is_absolute() {
                return path.is_file().then_some(path);
            }
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|p| p.is_file())
            })
        })
    };
    // Debian's /usr/bin/chromium is a shell wrapper; the real binary is behind it.
    let browser = find(&["/usr/lib/chromium/chromium", "chromium"]);
    let driver = find(&["chromedriver"]);
    match (browser, driver) {
        (Some(b), Some(d)) => Ok((b, d)),
        _ => Err(
            "Headless Chromium is missing: install Debian's packages chromium and \
                  chromium-driver (scripts/test.sh installs them when run as root)."
                .into(),
        ),
    }
}

pub struct Browser {
    driver: Child,
    /// `http://127.0.0.1:PORT` of chromedriver.
    base: String,
    session: String,
    http: Client,
    profile: tempfile::TempDir,
}

/// One element of the page.
#[derive(Clone, Debug)]
pub struct Element(String);

impl Browser {
    /// Starts chromedriver and a headless Chromium with a fresh profile, window 1280×900.
    pub fn start() -> Browser {
        let (chromium, chromedriver) = chromium().unwrap_or_else(|sentence| panic!("{sentence}"));
        let profile = tempfile::tempdir().expect("profile dir");
        let log = profile.path().join("chromedriver.log");
        let mut command = Command::new(chromedriver);
        command
            .arg("--port=0")
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // Its own process group, so that the browser it starts is killed with it.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut driver = command.spawn().expect("spawn chromedriver");
        let stdout = driver.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut port = None;
        for line in lines.by_ref() {
            let line = line.expect("chromedriver stdout");
            if let Some(rest) = line.split("started successfully on port ").nth(1) {
                port = rest.trim().trim_end_matches('.').parse::<u16>().ok();
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        let http = Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        let mut browser = Browser {
            driver,
            base: String::new(),
            session: String::new(),
            http,
            profile,
        };
        let Some(port) = port else {
            panic!("chromedriver did not say its port");
        };
        browser.base = format!("http://127.0.0.1:{port}");
        let data_dir = browser.profile.path().join("chromium");
        let args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1280,900".into(),
            format!("--user-data-dir={}", data_dir.display()),
        ];
        let capabilities = json!({
            "capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": chromium, "args": args},
                "unhandledPromptBehavior": "ignore",
            }}
        });
        let created = browser.call("POST", "/session", capabilities);
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_string();
        browser
    }

    /// A WebDriver command; its `value`. Panics on a WebDriver error.
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        match self.try_call(method, path, body) {
            Ok(value) => value,
            Err(error) => panic!("WebDriver {method} {path}: {error}"),
        }
    }

    /// A WebDriver command: `Ok(value)`, or `Err` with the error object.
    fn try_call(&self, method: &str, path: &str, body: Value) -> Result<Value, Value> {
        let url = format!("{}{path}", self.base);
        let request = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body),
        };
        let response = request.send().expect("chromedriver answers");
        let ok = response.status().is_success();
        let reply: Value = response.json().expect("WebDriver JSON");
        let value = reply.get("value").cloned().unwrap_or(Value::Null);
        if ok {
            Ok(value)
        } else {
            Err(value)
        }
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", &self.session_path("/url"), json!({ "url": url }));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page; its result.
    /// WebDriver runs it outside the page's Content-Security-Policy.
    pub fn script(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            &self.session_path("/execute/sync"),
            json!({ "script": script, "args": args }),
        )
    }

    /// The elements matching a CSS selector.
    pub fn all(&self, css: &str) -> Vec<Element> {
        let found = self.call(
            "POST",
            &self.session_path("/elements"),
            json!({"using": "css selector", "value": css}),
        );
        found
            .as_array()
            .expect("elements")
            .iter()
            .map(|e| {
                let id = e[ELEMENT].as_str();
                Element(
                    id.unwrap_or_else(|| panic!("no element id in {e}"))
                        .to_string(),
                )
            })
            .collect()
    }

    /// The one element matching `css`.
    pub fn one(&self, css: &str) -> Element {
        let mut all = self.all(css);
        assert_eq!(all.len(), 1, "elements matching {css}");
        all.remove(0)
    }

    /// The rendered text of an element (empty when hidden).
    pub fn text(&self, element: &Element) -> String {
        let value = self.call(
            "GET",
            &self.session_path(&format!("/element/{}/text", element.0)),
            Value::Null,
        );
        value.as_str().unwrap_or_default().to_string()
    }

    /// The rendered text (`innerText`) of the first element matching `css`, read in one
    /// step (no stale reference when the page replaces it meanwhile); `None` without one.
    pub fn text_at(&self, css: &str) -> Option<String> {
        let value = self.script(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;",
            json!([css]),
        );
        value.as_str().map(str::to_string)
    }

    /// The rendered text of every element matching `css`, in one step.
    pub fn texts_at(&self, css: &str) -> Vec<String> {
        let value = self.script(
            "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText);",
            json!([css]),
        );
        value
            .as_array()
            .map(|all| {
                all.iter()
                    .map(|t| t.as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn click(&self, element: &Element) {
        self.call(
            "POST",
            &self.session_path(&format!("/element/{}/click", element.0)),
            json!({}),
        );
    }

    /// Types `text` into an element (WebDriver key codes such as `\u{E007}`, Enter, work).
    pub fn type_into(&self, element: &Element, text: &str) {
        self.call(
            "POST",
            &self.session_path(&format!("/element/{}/value", element.0)),
            json!({ "text": text }),
        );
    }

    /// Presses and releases one key (a WebDriver key code) where the focus is.
    pub fn press(&self, key: &str) {
        let actions = json!({"actions": [{"type": "key", "id": "keyboard", "actions": [
            {"type": "keyDown", "value": key}, {"type": "keyUp", "value": key}
        ]}]});
        self.call("POST", &self.session_path("/actions"), actions);
        self.call("DELETE", &self.session_path("/actions"), Value::Null);
    }

    /// The text of an open alert, confirm or prompt, if one is open.
    pub fn alert_text(&self) -> Option<String> {
        self.try_call("GET", &self.session_path("/alert/text"), Value::Null)
            .ok()
            .map(|v| v.as_str().unwrap_or_default().to_string())
    }

    /// The window's content as PNG bytes.
    pub fn screenshot(&self) -> Vec<u8> {
        let encoded = self.call("GET", &self.session_path("/screenshot"), Value::Null);
        base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("base64"))
            .expect("a PNG")
    }

    pub fn resize(&self, width: u32, height: u32) {
        self.call(
            "POST",
            &self.session_path("/window/rect"),
            json!({"width": width, "height": height}),
        );
    }

    /// Evaluates `probe` every 50 ms until it returns `Some`; after `timeout`, fails naming
    /// `what` and showing the page's text.
    pub fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut(&Browser) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = probe(self) {
                return found;
            }
            if Instant::now() > deadline {
                let page = self.script("return document.body.innerText;", json!([]));
                panic!("timed out waiting for {what}; the page says:\n{page}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills every process still running with this browser's profile (found in /proc by
    /// that unique path), then chromedriver's process group.
    fn kill_all(&mut self) {
        let marker = self.profile.path().to_string_lossy().into_owned();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<i32>().ok())
                else {
                    continue;
                };
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&marker) {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if let Ok(None) = self.driver.try_wait() {
            // SAFETY: as above; the negative pid names chromedriver's own process group.
            unsafe { libc::kill(-(self.driver.id() as i32), libc::SIGKILL) };
        }
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.try_call("DELETE", &self.session_path(""), Value::Null);
        }
        self.kill_all();
    }
}
