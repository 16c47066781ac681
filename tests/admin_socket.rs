//! The admin socket: private to the server's own user. While a server runs the socket is mode
//! 0600 and goes away with the server; the server refuses a peer of another uid whatever the
//! file modes, and says why every time; the CLI refuses a socket it cannot trust (not a
//! socket, writable by others, in a directory others may write to, of another owner, or with
//! a listener of another uid) before it sends anything.
//!
//! The peer-uid tests run a client as `nobody` and need root (setpriv), as CI has here.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use common::cli::{ids, ok, ok_json, path, refused};
use common::*;
use serde_json::json;

#[test]
fn admin_socket_is_private_while_serving_and_gone_after() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let lab = Lab::new();
    lab.standard();
    let socket = lab.data_dir().join("admin.sock");
    let server = lab.serve();
    let meta = fs::metadata(&socket).expect("the admin socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "admin socket mode"
    );
    ok(&lab, &["region", "add", "served"]);
    drop(server);
    assert!(!socket.exists(), "a stopped server removes its socket");
    // With the server gone, the CLI opens the store itself and sees what the server wrote.
    let mut listed = ids(&ok_json(&lab, &["region", "list"]), "id");
    listed.sort();
    assert_eq!(listed, ["ot1", "ot2", "served"]);
    refused(&lab, &["status"], &["no server is running"]);
}

/// Runs the CLI as `nobody` (uid 65534) against the lab.
fn cli_as_nobody(lab: &Lab, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(BIN)
        .arg("--data-dir")
        .arg(lab.data_dir())
        .args(args)
        .current_dir("/")
        .output()
        .expect("run setpriv (util-linux)")
}

/// Sends one admin request line (`request`, JSON) to the lab's socket as `nobody`, with a
/// plain client (the CLI refuses a socket others may write to before sending anything),
/// `delay` seconds after its connect; the server's reply line goes to stderr (read up to its
/// newline, as the CLI does), and the exit status is 0 only if it carried out the request.
fn raw_admin_as_nobody(lab: &Lab, request: &str, delay: f64) -> std::process::Output {
    let client = "import socket, sys, time\n\
        s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); time.sleep(float(sys.argv[3]))\n\
        try: s.sendall(sys.argv[2].encode() + b'\\n')\n\
        except OSError: pass\n\
        reply = b''\n\
        while not reply.endswith(b'\\n'):\n    part = s.recv(65536)\n    reply += part\n    if not part: break\n\
        sys.stderr.write(reply.decode())\n\
        sys.exit(0 if reply.startswith(b'{\"Ok\"') else 1)\n";
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["/usr/bin/python3", "-c", client])
        .arg(lab.data_dir().join("admin.sock"))
        .arg(request)
        .arg(delay.to_string())
        .current_dir("/")
        .output()
        .expect("run setpriv (util-linux) and /usr/bin/python3")
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn the_admin_socket_refuses_a_peer_with_another_uid() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "this test runs the client as nobody and needs root");
    let lab = Lab::new();
    lab.standard();
    let server = lab.serve();
    let socket = lab.data_dir().join("admin.sock");
    let tokens_before = lab.ok_json(&["token", "list"]);

    // With the data directory's own modes, nobody cannot even reach the socket.
    let out = cli_as_nobody(&lab, &["region", "add", "evil1"]);
    assert!(!out.status.success(), "nobody added a region");
    assert!(out.stdout.is_empty());

    // Even with the path and the socket opened to everyone, the server refuses by peer uid.
    chmod(lab.dir.path(), 0o711);
    chmod(&lab.data_dir(), 0o711);
    chmod(&socket, 0o666);
    // nobody's CLI now refuses such a socket itself, before sending anything.
    let out = cli_as_nobody(&lab, &["region", "add", "evil2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nobody added a region");
    assert!(stderr.contains("refusing the admin socket"), "{stderr}");
    // A plain client gets to the server, which refuses by peer uid.
    let refusals = [
        json!({"op": "region_add", "id": "evil2", "dir": null, "disk_formats": null}),
        json!({"op": "token_issue", "user": "root", "tenant": TENANT_A,
               "expires_in_secs": null, "value": null}),
        json!({"op": "user_add", "name": "mallory", "tenants": [TENANT_A], "admin": true}),
        json!({"op": "token_list"}),
        json!({"op": "status"}),
    ];
    // Ten times each: the refusal must say why every time, not only when the race is won.
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for request in &refusals {
        for _ in 0..10 {
            let out = raw_admin_as_nobody(&lab, &request.to_string(), 0.0);
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(!out.status.success(), "nobody ran {request}: {stderr}");
            assert!(out.stdout.is_empty(), "{request} printed {:?}", out.stdout);
            *answers.entry(stderr).or_default() += 1;
        }
    }
    // A client that is slow to send its request (300 ms after its connect) must be told why
    // too, not find the socket already closed.
    let out = raw_admin_as_nobody(&lab, &json!({"op": "region_list"}).to_string(), 0.3);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    *answers
        .entry(format!("(slow client) {stderr}"))
        .or_default() += 1;
    chmod(&socket, 0o600);
    chmod(&lab.data_dir(), 0o700);
    chmod(lab.dir.path(), 0o700);

    let regions = lab.ok_json(&["region", "list"]).to_string();
    assert!(!regions.contains("evil"), "{regions}");
    let users = lab.ok_json(&["user", "list"]).to_string();
    assert!(!users.contains("mallory"), "{users}");
    assert_eq!(lab.ok_json(&["token", "list"]), tokens_before);
    let log = server.log_text();
    assert!(
        log.matches("admin request refused").count() >= refusals.len() * 10,
        "the server does not log every refusal"
    );
    lab.ok(&["status"]);
    let unexplained: Vec<(&String, &usize)> = answers
        .iter()
        .filter(|(a, _)| !(a.contains("permission denied") && a.contains("65534")))
        .collect();
    figures(
        "admin socket uid",
        &[("answers", format!("{answers:?}").replace(' ', "_"))],
    );
    assert!(
        unexplained.is_empty(),
        "refusals that do not say why (of {} tries): {unexplained:?}",
        refusals.len() * 10
    );
}

/// A Unix socket at `path` that records every connection and closes it unanswered.
fn impostor_socket(path: &Path) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    let connections = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = std::sync::Arc::clone(&connections);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            seen.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    connections
}

#[test]
fn the_cli_refuses_an_admin_socket_it_cannot_trust() {
    use std::sync::atomic::Ordering;
    let lab = Lab::new();
    lab.standard();
    let data = lab.data_dir();
    let socket = data.join("admin.sock");
    let shown = path(&socket).to_string();
    let list = ["region", "list"];

    // Not a socket: without the check the CLI took it for no server and went on.
    fs::write(&socket, "").unwrap();
    refused(
        &lab,
        &list,
        &["refusing the admin socket", &shown, "not a socket"],
    );
    fs::remove_file(&socket).unwrap();

    // A socket that group or others may write to.
    let connections = impostor_socket(&socket);
    chmod(&socket, 0o666);
    refused(&lab, &list, &["refusing", "mode 666", "group or others"]);
    // In a directory others may write to (and so replace the socket in).
    chmod(&socket, 0o600);
    chmod(&data, 0o777);
    refused(
        &lab,
        &list,
        &["refusing", "its directory", "777", "chmod go-w"],
    );
    chmod(&data, 0o700);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        // Another user's socket.
        std::os::unix::fs::lchown(&socket, Some(65534), Some(65534)).unwrap();
        refused(&lab, &list, &["refusing", "belongs to uid 65534"]);
    } else {
        println!("not root: a socket of another uid is not checked");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "the CLI talked to it"
    );
    fs::remove_file(&socket).unwrap();

    // A socket whose file looks right but whose listener runs as another user (a path that
    // changed hands between the checks and the connect): refused by the peer's uid.
    let python = Path::new("/usr/bin/python3");
    if root && python.exists() {
        let spot = lab.dir.path().join("spot");
        fs::create_dir(&spot).unwrap();
        chmod(lab.dir.path(), 0o711);
        chmod(&spot, 0o777);
        let planted = spot.join("s");
        let script = "import socket, sys\n\
            s = socket.socket(socket.AF_UNIX)\n\
            s.bind(sys.argv[1]); s.listen(8)\n\
            print('ready', flush=True)\n\
            sys.stdin.read()\n";
        let mut nobody = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(python)
            .args(["-c", script])
            .arg(&planted)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(nobody.stdout.take().unwrap()),
            &mut ready,
        )
        .unwrap();
        assert_eq!(ready.trim(), "ready");
        fs::rename(&planted, &socket).unwrap();
        std::os::unix::fs::lchown(&socket, Some(0), Some(0)).unwrap();
        chmod(&socket, 0o600);
        refused(&lab, &list, &["refusing", "runs as uid 65534"]);
        drop(nobody.stdin.take());
        let _ = nobody.kill();
        let _ = nobody.wait();
        fs::remove_file(&socket).unwrap();
        chmod(lab.dir.path(), 0o700);
    } else {
        println!("not root or no /usr/bin/python3: a listener of another uid is not checked");
    }

    // With the impostors gone, the real server's socket is trusted.
    let _server = lab.serve();
    let regions = ok_json(&lab, &list);
    assert_eq!(regions.as_array().map(Vec::len), Some(2), "{regions}");
}
