//! What a directory region's files go through: a file swapped in during a copy, files of
//! others beside the appliance's, and image files that are not regular files.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Issue 13 item 6: the file published under an image's name is the one the copy verified.
#[test]
fn a_file_swapped_in_during_a_copy_is_never_published() {
    let (lab, token) = Lab::standard_with_copier();
    let image = lab.image(TENANT_A, "big", 4 << 20);
    let server = lab.serve_with(&["--max-bandwidth", "1M"]);
    let job = server.copy_ok(&token, &image, TENANT_B);
    let dst_dir = lab.region_dir("ot2");
    // Wait for the copy's temporary file, then replace it by name with other content.
    let deadline = Instant::now() + Duration::from_secs(20);
    let temp = loop {
        let found = names_in(&dst_dir)
            .into_iter()
            .find(|n| n.starts_with('.') && n.ends_with(".part"));
        if let Some(name) = found {
            break dst_dir.join(name);
        }
        assert!(Instant::now() < deadline, "no temporary file appeared");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::fs::remove_file(&temp).expect("remove the temporary file");
    std::fs::write(&temp, b"forged content").expect("plant a file");
    let done = server.wait_job(&token, &job, Duration::from_secs(60), terminal);
    assert_eq!(done["status"], "error", "{done}");
    let shown = lab.ok(&["job", "show", &job]);
    assert!(shown.contains("replaced by another file"), "{shown}");
    // Nothing under an image's name, and no image record left for the copy.
    let left: Vec<String> = names_in(&dst_dir)
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "published: {left:?}");
    let images = lab.ok_json(&["image", "list", "--tenant", TENANT_B]);
    assert_eq!(images.as_array().map(Vec::len), Some(0), "{images}");
}

/// Issue 13 item 12: a start-up removes only the temporary files the appliance writes.
#[test]
fn a_start_removes_only_its_own_temporary_files() {
    let lab = Lab::new();
    lab.standard();
    let dir = lab.region_dir("ot1");
    let ours = format!(".{}.part", uuid_like());
    for name in [ours.as_str(), ".notes.part", ".backup.part"] {
        std::fs::write(dir.join(name), b"x").expect("write");
    }
    let mut server = lab.serve();
    assert!(server.stop());
    let names = names_in(&dir);
    assert!(!names.contains(&ours), "{names:?}");
    assert!(names.contains(".notes.part"), "{names:?}");
    assert!(names.contains(".backup.part"), "{names:?}");
}

fn uuid_like() -> String {
    "0b7e1c9a-3f2d-4e8b-9a6c-5d4f3e2b1a09".to_string()
}

/// Issue 13 item 11: importing a FIFO is refused at once instead of hanging.
#[test]
fn importing_a_fifo_is_refused_at_once() {
    let lab = Lab::new();
    lab.standard();
    let fifo = lab.dir.path().join("pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let mut child = std::process::Command::new(BIN)
        .arg("--data-dir")
        .arg(lab.data_dir())
        .args(import_args(
            fifo.to_str().expect("path"),
            TENANT_A,
            "pipe",
            &[],
        ))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the CLI");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("image import of a FIFO still runs after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(!status.success());
    assert!(err.contains("not a regular file"), "{err}");
    let images = lab.ok_json(&["image", "list"]);
    assert_eq!(images.as_array().map(Vec::len), Some(0), "{images}");
}

/// Issue 13 item 9: a region directory that another user replaced with a link of theirs is
/// not followed: no copy goes into it, and health names the region.
#[test]
fn a_region_directory_replaced_by_another_users_link_is_not_followed() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: needs root to make a link owned by another user");
        return;
    }
    let (lab, token) = Lab::standard_with_copier();
    let image = lab.image(TENANT_A, "img", 4096);
    let region = lab.region_dir("ot2");
    let elsewhere = lab.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("target dir");
    std::fs::remove_dir_all(&region).expect("remove the region dir");
    std::os::unix::fs::symlink(&elsewhere, &region).expect("plant a link");
    std::os::unix::fs::lchown(&region, Some(65534), Some(65534)).expect("give it to nobody");
    let server = lab.serve_with(&[]);
    let sentence = assert_error(server.copy(&token, &image, TENANT_B), 409);
    assert!(sentence.contains("region ot2"), "{sentence}");
    let health = server.get("/healthz", None);
    assert_eq!(health.status(), 503);
    let body = health.text().expect("body");
    assert!(body.contains("region ot2"), "{body}");
    assert!(
        server.log_text().contains("symbolic link of uid 65534"),
        "the log says why"
    );
    assert!(
        names_in(&elsewhere).is_empty(),
        "nothing went through the link"
    );
}
