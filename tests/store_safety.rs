//! The store and the regions against what power cuts and full disks leave behind: every
//! partial file sled can write while it opens, a disk that fills up under a running server, a
//! destination region that fills up mid-copy (its jobs fail cleanly while others go on), and
//! file modes.
//!
//! The tmpfs tests need root (mount); the store's skip without it, the destination's fails.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// How many copies are acknowledged (202) before the damage.
const JOBS_BEFORE: usize = 12;

/// A lab with [`JOBS_BEFORE`] acknowledged jobs, its server stopped; the copier's token and
/// the job ids.
fn acknowledged() -> (Lab, String, Vec<String>) {
    let (lab, token) = Lab::standard_with_copier();
    let image = lab.image(TENANT_A, "base", 4096);
    let mut server = lab.serve();
    let ids = (0..JOBS_BEFORE)
        .map(|_| server.copy_ok(&token, &image, TENANT_B))
        .collect();
    assert!(server.stop());
    (lab, token, ids)
}

fn db_dir(lab: &Lab) -> PathBuf {
    lab.data_dir().join("db")
}

/// The snapshot sled wrote at its last open (there is exactly one).
fn snapshot(db: &Path) -> PathBuf {
    let snaps: Vec<PathBuf> = std::fs::read_dir(db)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("snap.")
        })
        .collect();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    snaps[0].clone()
}

/// A snapshot name that sorts after every real one, as the next open would write it.
const NEWER: &str = "snap.7FFFFFFFFFFFFFFF";

/// Every acknowledged job is listed by `job list` (the CLI opening the store itself).
fn all_listed_by_cli(lab: &Lab, ids: &[String]) {
    let list = lab.ok_json(&["job", "list"]);
    let listed = job_ids(list.as_array().expect("job list array"));
    for id in ids {
        assert!(listed.contains(id), "job {id} is missing from {listed:?}");
    }
}

/// Every acknowledged job is listed by the API of a server started on the store.
fn all_listed_by_server(lab: &Lab, token: &str, ids: &[String], repaired: bool) {
    let server = lab.serve();
    let listed = job_ids(&jobs(server.get(JOBS, Some(token))));
    for id in ids {
        assert!(listed.contains(id), "job {id} is missing from {listed:?}");
    }
    assert_eq!(
        server.log_text().contains("store repair:"),
        repaired,
        "a repair is logged exactly when one was needed: {}",
        server.log_text()
    );
}

/// Damages a store the way a cut at one step of sled's start-up would, then checks that the
/// CLI and, on a copy of the same damage, the server both open it with every job.
fn opens_after(damage: impl Fn(&Path)) {
    opens_after_with(true, damage)
}

fn opens_after_with(repaired: bool, damage: impl Fn(&Path)) {
    let (lab, token, ids) = acknowledged();
    damage(&db_dir(&lab));
    let twin = Lab::new();
    copy_tree(&lab.data_dir(), &twin.data_dir());
    all_listed_by_cli(&lab, &ids);
    all_listed_by_server(&twin, &token, &ids, repaired);
    // And the repaired store keeps opening.
    all_listed_by_cli(&twin, &ids);
}

// Step 1: `conf`, written in place without a sync.

#[test]
fn store_opens_after_a_conf_cut_before_its_checksum() {
    opens_after(|db| {
        let conf = std::fs::read(db.join("conf")).unwrap();
        std::fs::write(db.join("conf"), &conf[..conf.len() - 4]).unwrap();
    });
}

#[test]
fn store_opens_after_a_conf_cut_mid_text() {
    opens_after(|db| {
        let conf = std::fs::read(db.join("conf")).unwrap();
        std::fs::write(db.join("conf"), &conf[..20]).unwrap();
    });
}

#[test]
fn store_opens_after_a_zero_filled_conf() {
    // A file system that persisted the size but not the data.
    opens_after(|db| {
        let len = std::fs::metadata(db.join("conf")).unwrap().len() as usize;
        std::fs::write(db.join("conf"), vec![0u8; len]).unwrap();
    });
}

#[test]
fn store_opens_after_an_empty_conf() {
    opens_after(|db| std::fs::write(db.join("conf"), b"").unwrap());
}

// Step 3: `snap.<lsn>.generating`, written, fsynced, renamed.

#[test]
fn store_opens_after_an_empty_snapshot_generating() {
    // What ENOSPC at the snapshot's first write leaves (spacejam/sled#1527).
    opens_after(|db| std::fs::write(db.join(format!("{NEWER}.generating")), b"").unwrap());
}

#[test]
fn store_opens_after_a_truncated_snapshot_generating() {
    opens_after(|db| {
        let snap = std::fs::read(snapshot(db)).unwrap();
        std::fs::write(
            db.join(format!("{NEWER}.generating")),
            &snap[..snap.len() / 2],
        )
        .unwrap();
    });
}

#[test]
fn store_opens_after_a_snapshot_generating_cut_before_its_checksum() {
    opens_after(|db| {
        let snap = std::fs::read(snapshot(db)).unwrap();
        std::fs::write(
            db.join(format!("{NEWER}.generating")),
            &snap[..snap.len() - 4],
        )
        .unwrap();
    });
}

#[test]
fn store_opens_after_a_complete_snapshot_generating_not_yet_renamed() {
    opens_after(|db| {
        std::fs::copy(snapshot(db), db.join(format!("{NEWER}.generating"))).unwrap();
    });
}

#[test]
fn store_opens_after_a_cut_between_rename_and_removing_the_old_snapshot() {
    // sled reads the newest, whole, snapshot: nothing to repair.
    opens_after_with(false, |db| {
        std::fs::copy(snapshot(db), db.join("snap.0000000000000000")).unwrap();
    });
}

#[test]
fn store_opens_after_a_renamed_snapshot_lost_its_data() {
    // Renamed but its blocks never reached the disk: a file system that ignored the fsync.
    opens_after(|db| {
        let snap = snapshot(db);
        let len = std::fs::metadata(&snap).unwrap().len() as usize;
        std::fs::write(&snap, vec![0u8; len]).unwrap();
    });
}

#[test]
fn store_opens_after_a_renamed_snapshot_is_truncated() {
    opens_after(|db| {
        let snap = std::fs::read(snapshot(db)).unwrap();
        std::fs::write(db.join(NEWER), &snap[..snap.len() / 3]).unwrap();
    });
}

/// A real full disk: sled's snapshot write at open fails with ENOSPC, and once space is back
/// the store opens with every job (it stayed broken for good before).
#[test]
fn store_opens_once_space_is_back_after_a_full_disk_at_start_up() {
    let lab = Lab::new();
    let Some(fs) = Tmpfs::mount(&lab.data_dir(), "24m") else {
        return;
    };
    let token = lab.copier();
    let image = lab.image(TENANT_A, "base", 4096);
    // No reserve: the store itself must meet the full disk here (a reserve keeps it from it).
    let mut server = lab.serve_with(&["--no-worker", "--min-free", "0"]);
    let ids: Vec<String> = (0..JOBS_BEFORE)
        .map(|_| server.copy_ok(&token, &image, TENANT_B))
        .collect();
    assert!(server.stop());

    let filler = lab.data_dir().join("filler");
    assert!(fs.fill(&filler) > 0);
    let err = lab.fails(&["job", "list"]);
    assert!(err.contains("disk is full"), "{err}");
    let left: Vec<String> = std::fs::read_dir(db_dir(&lab))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    eprintln!("left in db/ by the failed open: {left:?}");
    std::fs::remove_file(&filler).unwrap();

    all_listed_by_cli(&lab, &ids);
    let server = lab.serve();
    let listed = job_ids(&jobs(server.get(JOBS, Some(&token))));
    for id in &ids {
        assert!(listed.contains(id), "job {id} is missing from {listed:?}");
    }
    drop(server);
    drop(fs);
}

/// A lab whose store is on a tmpfs of `size` (its regions are not: copies never take the
/// store's space) with the copier's token and an image of tenant A.
fn lab_on_tmpfs(size: &str) -> Option<(Lab, Tmpfs, String, String)> {
    let lab = Lab::new();
    let fs = Tmpfs::mount(&lab.data_dir(), size)?;
    for region in ["ot1", "ot2"] {
        let dir = lab.dir.path().join(region);
        lab.ok(&["region", "add", region, "--dir", dir.to_str().unwrap()]);
    }
    lab.ok(&["tenant", "add", TENANT_A, "--region", "ot1"]);
    lab.ok(&["tenant", "add", TENANT_B, "--region", "ot2"]);
    lab.ok(&[
        "user", "add", "alice2", "--tenant", TENANT_A, "--tenant", TENANT_B,
    ]);
    let token = lab.token("alice2", TENANT_A);
    let image = lab.image(TENANT_A, "base", 4096);
    Some((lab, fs, token, image))
}

fn metric(server: &Server, name: &str) -> String {
    let text = server.get("/metrics", None).text().unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_string))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// The disk fills under a running server: writes answer 507 naming the full disk, /healthz
/// answers 503 naming the store, the gauge drops to 0, admin commands say the same; once space
/// is freed the server takes writes again within seconds, with no restart, and no acknowledged
/// job is lost (also across a restart afterwards).
#[test]
fn a_full_disk_answers_507_and_the_server_recovers_by_itself_once_space_is_back() {
    let Some((lab, fs, token, image)) = lab_on_tmpfs("24m") else {
        return;
    };
    // No reserve: the store itself must meet the full disk here (a reserve keeps it from it).
    let mut server = lab.serve_with(&["--no-worker", "--min-free", "0"]);
    let mut acked: Vec<String> = (0..JOBS_BEFORE)
        .map(|_| server.copy_ok(&token, &image, TENANT_B))
        .collect();
    assert_eq!(metric(&server, "image_replicator_store_writable"), "1");

    let filler = lab.data_dir().join("filler");
    fs.fill(&filler);
    let mut refused = None;
    for _ in 0..5000 {
        let resp = server.copy(&token, &image, TENANT_B);
        match resp.status().as_u16() {
            202 => acked.push(
                resp.json::<serde_json::Value>().unwrap()["job_id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            ),
            _ => {
                refused = Some(resp);
                break;
            }
        }
    }
    let refused = refused.expect("a write fails once the disk is full");
    let body = assert_error(refused, 507);
    assert!(body.contains("disk is full"), "{body}");
    // Still full: every write keeps being refused the same way, reads keep working or say so.
    let body = assert_error(server.copy(&token, &image, TENANT_B), 507);
    assert!(body.contains("disk is full"), "{body}");
    let health = server.get("/healthz", None);
    assert_eq!(health.status(), 503);
    let health = health.text().unwrap();
    assert!(
        health.contains("store") && health.contains("disk is full"),
        "{health}"
    );
    assert_eq!(metric(&server, "image_replicator_store_writable"), "0");
    let err = lab.fails(&[
        "tenant",
        "add",
        "0123456789abcdef0123456789abcdef",
        "--region",
        "ot1",
    ]);
    assert!(err.contains("disk is full"), "{err}");

    std::fs::remove_file(&filler).unwrap();
    let freed = std::time::Instant::now();
    poll(
        "the server to take writes again",
        std::time::Duration::from_secs(15),
        || (server.get("/healthz", None).status() == 200).then_some(()),
    );
    let recovery = freed.elapsed();
    let id = server.copy_ok(&token, &image, TENANT_B);
    acked.push(id);
    assert_eq!(metric(&server, "image_replicator_store_writable"), "1");
    lab.ok(&[
        "tenant",
        "add",
        "0123456789abcdef0123456789abcdef",
        "--region",
        "ot1",
    ]);

    let listed = job_ids(&jobs(server.get(JOBS, Some(&token))));
    for id in &acked {
        assert!(listed.contains(id), "acknowledged job {id} is missing");
    }
    assert!(server.stop());
    let server = lab.serve();
    let listed = job_ids(&jobs(server.get(JOBS, Some(&token))));
    for id in &acked {
        assert!(
            listed.contains(id),
            "acknowledged job {id} is missing after a restart"
        );
    }
    figures(
        "full_disk",
        &[
            ("acknowledged", acked.len().to_string()),
            ("lost", "0".into()),
            ("recovery_ms", recovery.as_millis().to_string()),
        ],
    );
    drop(server);
    drop(fs);
}

/// A region on a 4 MiB tmpfs that fills up: the copies that do not fit end in error saying
/// so, leaving nothing half-written; the others, and what still fits later, replicate.
#[test]
fn a_destination_that_fills_up_fails_its_jobs_cleanly_while_others_go_on() {
    let lab = Lab::new();
    let mount = lab.dir.path().join("ot2-tmpfs");
    let _tmpfs =
        Tmpfs::mount(&mount, "4m").expect("a 4 MiB tmpfs (this test needs root and mount rights)");
    lab.ok(&["region", "add", "ot1"]);
    lab.ok(&[
        "region",
        "add",
        "ot2",
        "--dir",
        mount.to_str().expect("path"),
    ]);
    lab.ok(&["tenant", "add", TENANT_A, "--region", "ot1"]);
    lab.ok(&["tenant", "add", TENANT_B, "--region", "ot2"]);
    lab.ok(&[
        "user", "add", "alice2", "--tenant", TENANT_A, "--tenant", TENANT_B,
    ]);
    let token = lab.token("alice2", TENANT_A);
    let big = lab.image(TENANT_A, "big", 6 * MIB);
    let mids: Vec<String> = (0..3)
        .map(|i| lab.image(TENANT_A, &format!("mid{i}"), 3 * MIB / 2))
        .collect();
    let small = lab.image(TENANT_A, "small", 256 * KIB);
    let bytes_of = |id: &str| std::fs::read(lab.region_dir("ot1").join(id)).expect("source bytes");
    // No reserve: the 4 MiB are all for copies (the default reserve is at least 64 MiB).
    let server = lab.serve_with(&["--workers", "2", "--min-free", "0"]);
    let mut ends: Vec<(String, String, String)> = Vec::new();
    // A copy without room is refused at once (409), before anything is written.
    let mut refused = 0;
    let mut ask = |source: &str| -> Option<(String, String)> {
        let resp = server.copy(&token, source, TENANT_B);
        if resp.status() == 409 {
            let body = assert_error(resp, 409);
            assert!(body.contains("has no room"), "{body}");
            refused += 1;
            return None;
        }
        assert_eq!(resp.status(), 202, "{:?}", resp.text());
        let body: Value = resp.json().expect("202 body");
        Some((
            body["job_id"].as_str().expect("id").to_string(),
            source.to_string(),
        ))
    };

    // The destination's state after every phase: only complete copies, nothing half-written.
    let check = |ends: &[(String, String, String)]| {
        let files = names_in(&mount);
        assert!(
            files.iter().all(|f| !f.starts_with('.')),
            "temporary files left: {files:?}"
        );
        let images = lab.ok_json(&["image", "list", "--region", "ot2"]);
        let active: BTreeSet<String> = images
            .as_array()
            .expect("images")
            .iter()
            .map(|i| {
                assert_eq!(i["status"], "active", "{i}");
                i["id"].as_str().expect("id").to_string()
            })
            .collect();
        assert_eq!(files, active, "files and image records differ");
        let mut replicated = BTreeSet::new();
        for (id, source, end) in ends {
            let job = lab.ok_json(&["job", "show", id]);
            match end.as_str() {
                "replicated" => {
                    let dst = job["destination_image_id"]
                        .as_str()
                        .expect("dst")
                        .to_string();
                    let copy = std::fs::read(mount.join(&dst)).expect("copy bytes");
                    assert!(
                        copy == bytes_of(source),
                        "copy {dst} differs from its source"
                    );
                    replicated.insert(dst);
                }
                "error" => {
                    let reason = job["error"].as_str().unwrap_or_default();
                    assert!(
                        reason.contains("No space left on device"),
                        "job {id} failed for another reason: {reason}"
                    );
                    assert_eq!(job["destination_image_id"], Value::Null);
                }
                other => panic!("job {id} ended {other}"),
            }
        }
        assert_eq!(replicated, active, "active images that no job replicated");
        assert_eq!(server.get(JOBS, Some(&token)).status(), 200);
    };
    let run = |ids: &[(String, String)], ends: &mut Vec<(String, String, String)>| {
        for (id, source) in ids {
            let job = wait_terminal(&lab, id, Duration::from_secs(60));
            ends.push((id.clone(), source.clone(), job_status(&job).to_string()));
        }
    };

    // 1. A copy larger than the whole store is refused and leaves the store empty.
    assert!(ask(&big).is_none(), "a 6 MiB copy into 4 MiB");
    check(&ends);
    assert!(names_in(&mount).is_empty());

    // 2. Again, with a small copy beside it: that one goes.
    assert!(ask(&big).is_none(), "a 6 MiB copy into 4 MiB");
    let batch: Vec<(String, String)> = ask(&small).into_iter().collect();
    run(&batch, &mut ends);
    assert_eq!(ends.last().expect("end").2, "replicated");
    check(&ends);

    // 3. Three copies that do not all fit: what the first ones will write is promised, so
    //    the last is refused (or, if the store fills up on the way, fails consistent).
    let first = ends.len();
    let batch: Vec<(String, String)> = mids.iter().filter_map(|m| ask(m)).collect();
    let refused_here = mids.len() - batch.len();
    run(&batch, &mut ends);
    let phase: Vec<&str> = ends[first..].iter().map(|e| e.2.as_str()).collect();
    assert!(phase.contains(&"replicated"), "{phase:?}");
    assert!(
        phase.contains(&"error") || refused_here > 0,
        "4.5 MiB fit into 4 MiB: {phase:?}"
    );
    check(&ends);

    // 4. What still fits still goes.
    let batch: Vec<(String, String)> = ask(&small).into_iter().collect();
    run(&batch, &mut ends);
    assert_eq!(ends.last().expect("end").2, "replicated");
    check(&ends);
    let errors = ends.iter().filter(|e| e.2 == "error").count();
    figures(
        "full destination",
        &[
            ("jobs", ends.len().to_string()),
            ("errors", errors.to_string()),
            ("refused_409", refused.to_string()),
            ("replicated", (ends.len() - errors).to_string()),
            ("tmpfs_files", names_in(&mount).len().to_string()),
        ],
    );
    assert!(log_panics(&server.log_text()).is_empty());
    drop(server);
}

/// Modes that are not `0700` for directories or `0600` for files, under `dir` (and `dir`).
fn loose_modes(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(path) = todo.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        let wanted = if meta.is_dir() { 0o700 } else { 0o600 };
        if mode != wanted {
            out.push(format!("{} {mode:04o}", path.display()));
        }
        if meta.is_dir() {
            todo.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out.sort();
    out
}

/// Under umask 000 every directory the appliance makes is 0700 and every file 0600: the store
/// (sled's files), regions, imported and replicated images, the admin socket.
#[test]
fn everything_the_appliance_creates_is_private_under_umask_000() {
    let lab = Lab::new();
    let run = |args: &[&str]| lab.ok_under_umask("000", args).0;
    run(&["region", "add", "ot1"]);
    run(&["region", "add", "ot2"]);
    run(&["tenant", "add", TENANT_A, "--region", "ot1"]);
    run(&["tenant", "add", TENANT_B, "--region", "ot2"]);
    run(&[
        "user", "add", "alice2", "--tenant", TENANT_A, "--tenant", TENANT_B,
    ]);
    let token = run(&["token", "issue", "--user", "alice2", "--tenant", TENANT_A])
        .trim()
        .to_string();
    let file = lab.file("base.raw", 64 * 1024);
    let image = run(&import_args(file.to_str().unwrap(), TENANT_A, "base", &[]))
        .trim()
        .to_string();
    assert_eq!(loose_modes(&lab.data_dir()), Vec::<String>::new());

    let mut server = lab.serve_under_umask("000");
    let id = server.copy_ok(&token, &image, TENANT_B);
    server.wait_job(
        &token,
        &id,
        std::time::Duration::from_secs(30),
        status_is("replicated"),
    );
    assert_eq!(
        loose_modes(&lab.data_dir()),
        Vec::<String>::new(),
        "while serving (admin socket included)"
    );
    assert!(server.stop());
    assert_eq!(lab.files_in("ot2").len(), 1, "the replicated image");
    assert_eq!(loose_modes(&lab.data_dir()), Vec::<String>::new());
}

/// A data directory left 0755 (and a store whose files are 0644) is tightened at the next
/// open, with a warning naming the old mode.
#[test]
fn a_looser_existing_data_dir_is_tightened_and_logged() {
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::new();
    lab.ok(&["region", "add", "ot1"]);
    let loose = std::fs::Permissions::from_mode(0o755);
    std::fs::set_permissions(lab.data_dir(), loose.clone()).unwrap();
    std::fs::set_permissions(db_dir(&lab), loose).unwrap();
    std::fs::set_permissions(
        db_dir(&lab).join("db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (_, stderr) = lab.ok_under_umask("000", &["region", "list"]);
    assert!(stderr.contains("was mode 0755; made it 0700"), "{stderr}");
    assert_eq!(loose_modes(&lab.data_dir()), Vec::<String>::new());
}

/// A data directory that belongs to another user is refused with a sentence.
#[test]
fn a_data_dir_of_another_user_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: chown to another user needs root");
        return;
    }
    let lab = Lab::new();
    lab.ok(&["region", "add", "ot1"]);
    std::os::unix::fs::chown(lab.data_dir(), Some(65534), None).unwrap();
    // Root acts as the directory's owner (issue 17), who may not use the root-owned store
    // inside: refused, saying so.
    let err = lab.fails(&["region", "list"]);
    assert!(
        err.contains("Permission denied") && err.contains("root acts as uid 65534"),
        "{err}"
    );
}
