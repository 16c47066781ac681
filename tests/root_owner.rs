//! Root administering a stopped service's data directory (issue 17): what the command
//! creates belongs to the directory's owner, so the service can use it when it starts.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};

use common::*;

/// The service's user in this test: nobody.
const SERVICE_UID: u32 = 65534;
/// A tenant the standard lab lacks.
const TENANT_D: &str = "0123456789abcdef0123456789abcdef";

/// Every path under `dir` (itself included) that `owner` does not own.
fn not_owned_by(dir: &std::path::Path, owner: u32) -> Vec<String> {
    let mut wrong = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.uid() != owner {
            wrong.push(format!("{} (uid {})", path.display(), meta.uid()));
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
        }
    }
    wrong
}

#[test]
fn root_running_an_admin_command_on_a_stopped_service_creates_what_its_user_owns() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not run: acting for the data directory's owner needs root");
        return;
    }
    let lab = Lab::new();
    lab.standard();
    let data = lab.data_dir();
    // The data directory becomes the service user's, as systemd's StateDirectory= makes it;
    // the service user may pass through the lab's directory to reach it.
    std::fs::set_permissions(lab.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let chown = Command::new("chown")
        .args(["-R", &format!("{SERVICE_UID}:{SERVICE_UID}")])
        .arg(&data)
        .status()
        .unwrap();
    assert!(chown.success());

    // Root, with the service stopped.
    lab.ok(&["region", "add", "ot3"]);
    lab.ok(&["tenant", "add", TENANT_D, "--region", "ot3"]);
    lab.ok(&["user", "add", "dora", "--tenant", TENANT_D]);
    let token = lab.token("dora", TENANT_D);
    assert_eq!(not_owned_by(&data, SERVICE_UID), Vec::<String>::new());

    // The service, run as its user, opens the store and writes every region.
    let mut child = Command::new("setpriv")
        .args([
            &format!("--reuid={SERVICE_UID}"),
            &format!("--regid={SERVICE_UID}"),
            "--clear-groups",
            BIN,
            "serve",
            "--no-worker",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("setpriv (util-linux)");
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a line").unwrap();
    let base = first
        .strip_prefix("image-replicator listening on ")
        .unwrap_or_else(|| panic!("{first}"))
        .to_string();
    let client = reqwest::blocking::Client::new();
    let health = client.get(format!("{base}/healthz")).send().unwrap();
    let status = health.status();
    let body = health.text().unwrap();
    let jobs = client
        .get(format!("{base}{JOBS}"))
        .header("X-Auth-Token", &token)
        .send()
        .unwrap()
        .status();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    assert_eq!((status.as_u16(), body.as_str()), (200, "ok\n"));
    assert_eq!(jobs, 200);
}
