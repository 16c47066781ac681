//! The clients OpenStack users script with, from the test venv (scripts/openstack-venv.sh):
//! the `openstack` CLI (python-openstackclient) and openstacksdk, each run with a clean
//! environment: no `OS_*` variable (nor proxy) of the host, `HOME` a temp dir of its own so no
//! `clouds.yaml` is read, and a time limit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// How a client authenticates and finds the image service.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Password auth through a real Keystone: the client takes the `image` endpoint of `region`
    /// from its catalog and discovers the version there (`GET /`).
    Keystone {
        auth_url: String,
        user: String,
        password: String,
        project: String,
        region: String,
    },
    /// keystoneauth's `admin_token` plugin: no Keystone and no discovery, so `endpoint` carries
    /// the version (`http://HOST:PORT/v2`), as it must against a stock Glance too.
    AdminToken { endpoint: String, token: String },
}

impl Auth {
    fn cli_args(&self) -> Vec<String> {
        match self {
            Auth::Keystone {
                auth_url,
                user,
                password,
                project,
                region,
            } => [
                "--os-auth-type",
                "password",
                "--os-auth-url",
                auth_url,
                "--os-identity-api-version",
                "3",
                "--os-username",
                user,
                "--os-password",
                password,
                "--os-project-name",
                project,
                "--os-user-domain-name",
                "Default",
                "--os-project-domain-name",
                "Default",
                "--os-region-name",
                region,
                "--os-interface",
                "public",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            Auth::AdminToken { endpoint, token } => [
                "--os-auth-type",
                "admin_token",
                "--os-endpoint",
                endpoint,
                "--os-token",
                token,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        }
    }

    fn json(&self) -> Value {
        match self {
            Auth::Keystone {
                auth_url,
                user,
                password,
                project,
                region,
            } => serde_json::json!({"type": "keystone", "auth_url": auth_url, "user": user,
                "password": password, "project": project, "region": region}),
            Auth::AdminToken { endpoint, token } => {
                serde_json::json!({"type": "admin_token", "endpoint": endpoint, "token": token})
            }
        }
    }
}

/// What every openstacksdk snippet starts with: `conn` (from the JSON in argv[1]) and `args`
/// (the JSON in argv[2]). A snippet prints one JSON value as its last line.
const SDK_PRELUDE: &str = r#"
import json, sys
import openstack
auth = json.loads(sys.argv[1])
args = json.loads(sys.argv[2])
if auth["type"] == "keystone":
    conn = openstack.connect(
        auth_url=auth["auth_url"], username=auth["user"], password=auth["password"],
        project_name=auth["project"], user_domain_name="Default",
        project_domain_name="Default", region_name=auth["region"], interface="public")
else:
    conn = openstack.connect(
        auth_type="admin_token", auth={"endpoint": auth["endpoint"], "token": auth["token"]})
"#;

/// The clients, with a home directory (and scratch space) of their own.
pub struct Clients {
    home: tempfile::TempDir,
    bin: PathBuf,
}

impl Clients {
    pub fn new() -> Clients {
        Clients {
            home: tempfile::tempdir().expect("temp home"),
            bin: super::venv_bin(),
        }
    }

    /// The clients' home, also a scratch directory for the files they upload and save.
    pub fn dir(&self) -> &Path {
        self.home.path()
    }

    fn command(&self, program: &str) -> Command {
        // coreutils' timeout: a client that hangs fails the test instead of blocking it.
        let mut command = Command::new("timeout");
        command
            .args(["-k", "5", "180"])
            .arg(self.bin.join(program))
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", self.home.path())
            .env("LANG", "C.UTF-8")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .current_dir(self.home.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// Runs `openstack ARGS` (authenticated by `auth`) and returns what it did.
    pub fn openstack(&self, auth: &Auth, args: &[&str]) -> Output {
        self.command("openstack")
            .args(auth.cli_args())
            .args(args)
            .output()
            .expect("run openstack")
    }

    /// `openstack ARGS`, which must succeed; its stdout.
    pub fn ok(&self, auth: &Auth, args: &[&str]) -> String {
        let out = self.openstack(auth, args);
        assert!(
            out.status.success(),
            "openstack {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    /// `openstack ARGS -f json`, which must succeed; its output parsed.
    pub fn json(&self, auth: &Auth, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-f", "json"]);
        let text = self.ok(auth, &all);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("openstack {}: not JSON ({e}): {text}", args.join(" ")))
    }

    /// `openstack ARGS`, which must fail; its stderr.
    pub fn fails(&self, auth: &Auth, args: &[&str]) -> String {
        let out = self.openstack(auth, args);
        assert!(
            !out.status.success(),
            "openstack {} succeeded: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Runs a python snippet with openstacksdk: `conn` is connected by `auth`, `args` is
    /// `args`; returns the JSON value the snippet prints last.
    pub fn sdk(&self, auth: &Auth, snippet: &str, args: &Value) -> Value {
        let code = format!("{SDK_PRELUDE}\n{snippet}");
        let out = self
            .command("python")
            .arg("-c")
            .arg(code)
            .arg(auth.json().to_string())
            .arg(args.to_string())
            .output()
            .expect("run python");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "the openstacksdk snippet failed ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let last = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("the snippet printed no JSON last ({e}): {stdout}"))
    }
}
