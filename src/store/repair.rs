//! Clears what a power cut or a full disk can leave half-written in sled's directory, so that
//! opening the store never needs a person (upstream spacejam/sled#1527).
//!
//! What sled 0.34.7 writes while it opens a database, in order, and what a cut leaves:
//! 1. `conf` (its storage parameters, a text followed by a CRC-32), written in place without
//!    a sync: a cut leaves it empty, truncated or zero-filled. sled rewrites one of 8 bytes or
//!    fewer itself but refuses a longer one that does not parse.
//! 2. `db`, the log, opened (created) and read; sled zeroes a torn tail itself.
//! 3. `snap.<lsn>.generating`, a snapshot of the page table: written, fsynced, renamed to
//!    `snap.<lsn>`, then older snapshots are removed. A cut or ENOSPC before the rename leaves
//!    an empty, partial or complete `.generating` file, and sled reads whichever `snap.*` name
//!    sorts last, so it takes that file for the newest snapshot and refuses to open.
//!
//! A snapshot only saves sled reading the log from its start, so removing one costs time,
//! never data: everything acknowledged is in the log (fsynced by [`Store::flush`]).
//!
//! [`Store::flush`]: crate::store::Store::flush

use std::io::Read;
use std::path::{Path, PathBuf};

/// Where snapshots that fail their checksum under their final name are moved (a file system
/// that lost data it had acknowledged; kept for a post-mortem, renamed so it costs no space).
const QUARANTINE: &str = "db.quarantine";

/// What [`repair`] did: one sentence per file.
#[derive(Debug, Default)]
pub struct Repairs(pub Vec<String>);

/// Removes or quarantines every partial file in sled's directory `db_dir` that would keep sled
/// from opening, and syncs the log so that the snapshot sled writes next never describes log
/// bytes a power cut could still take away. Each action is logged at warn.
pub fn repair(db_dir: &Path) -> std::io::Result<Repairs> {
    let mut done = Repairs::default();
    if !db_dir.is_dir() {
        return Ok(done);
    }
    let log = db_dir.join("db");
    if log.is_file() {
        std::fs::File::open(&log)?.sync_all()?;
    }
    let conf = db_dir.join("conf");
    if conf.is_file() && !conf_is_whole(&conf)? {
        std::fs::remove_file(&conf)?;
        done.note(format!(
            "removed the partial sled configuration {} (sled writes it anew)",
            conf.display()
        ));
    }
    for path in snapshot_files(db_dir)? {
        let name = file_name(&path);
        if name.ends_with(".generating") {
            std::fs::remove_file(&path)?;
            done.note(format!(
                "removed the unfinished sled snapshot {} ({} bytes; sled renames a snapshot only once it is complete)",
                path.display(),
                len_of(&path)
            ));
        } else if !snapshot_is_whole(&path)? {
            let to = quarantine(db_dir, &path)?;
            done.note(format!(
                "moved the corrupt sled snapshot {} to {} (sled reads the log instead)",
                path.display(),
                to.display()
            ));
        }
    }
    if !done.0.is_empty() {
        // The removals and renames must outlive a power cut as well.
        std::fs::File::open(db_dir)?.sync_all()?;
    }
    Ok(done)
}

/// Moves every snapshot aside: the last resort when sled still finds its snapshot corrupt
/// (one that passed its checksum but describes a log a power cut shortened).
pub fn quarantine_snapshots(db_dir: &Path) -> std::io::Result<Repairs> {
    let mut done = Repairs::default();
    for path in snapshot_files(db_dir)? {
        let to = quarantine(db_dir, &path)?;
        done.note(format!(
            "moved the sled snapshot {} to {} because sled found it inconsistent with its log (sled reads the whole log instead)",
            path.display(),
            to.display()
        ));
    }
    if !done.0.is_empty() {
        std::fs::File::open(db_dir)?.sync_all()?;
    }
    Ok(done)
}

impl Repairs {
    fn note(&mut self, what: String) {
        tracing::warn!("store repair: {what}");
        self.0.push(what);
    }
}

/// sled's snapshot candidates: every `snap.*` name except its `.in___motion` files.
fn snapshot_files(db_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(db_dir)? {
        let path = entry?.path();
        let name = file_name(&path);
        if name.starts_with("snap.") && !name.ends_with(".in___motion") && path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn len_of(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn read_all(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut buf)?;
    Ok(buf)
}

/// sled's own check: the body, its length (8 bytes) and the body's CRC-32 (4 bytes, LE).
fn snapshot_is_whole(path: &Path) -> std::io::Result<bool> {
    let buf = read_all(path)?;
    if buf.len() <= 12 {
        return Ok(false);
    }
    let (body, tail) = buf.split_at(buf.len() - 12);
    Ok(crc_matches(body, &tail[8..]))
}

/// The configuration text followed by its CRC-32 (4 bytes, LE), and the text parses: sled
/// would refuse to open with anything else, or misread it.
fn conf_is_whole(path: &Path) -> std::io::Result<bool> {
    let buf = read_all(path)?;
    if buf.len() <= 8 {
        return Ok(false);
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    if !crc_matches(body, crc) {
        return Ok(false);
    }
    let Ok(text) = std::str::from_utf8(body) else {
        return Ok(false);
    };
    let keys: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once(": ").map(|(k, _)| k))
        .collect();
    Ok(["segment_size", "use_compression", "version"]
        .iter()
        .all(|k| keys.contains(k)))
}

fn crc_matches(body: &[u8], crc: &[u8]) -> bool {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(body);
    crc == hasher.finalize().to_le_bytes()
}

fn quarantine(db_dir: &Path, path: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = db_dir.with_file_name(QUARANTINE);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let to = dir.join(format!("{}.{stamp}", file_name(path)));
    std::fs::rename(path, &to)?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(db: &sled::Db, rounds: u32) {
        for round in 0..rounds {
            for i in 0u32..4000 {
                let value = format!("{round}-{i}-{}", "x".repeat(200));
                db.insert(i.to_be_bytes(), value.as_bytes()).unwrap();
            }
        }
        db.flush().unwrap();
    }

    /// Opens sled at `dir`, waiting (up to 5 s) for a Db just dropped to let go of its lock:
    /// sled's flusher thread holds it a moment longer.
    fn open(dir: &Path) -> sled::Result<sled::Db> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match sled::Config::new().path(dir).open() {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// Many overwrites (so sled reuses segments), a reopen (so it writes a snapshot), then the
    /// snapshot moved aside: sled reads the whole log and every last value is there.
    #[test]
    fn a_store_without_its_snapshot_keeps_every_value() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("db");
        fill(&open(&dir).unwrap(), 8);
        drop(open(&dir).unwrap());
        let log_len = std::fs::metadata(dir.join("db")).unwrap().len();
        assert!(
            log_len < 8 * 4000 * 200,
            "sled reused segments: {log_len} bytes"
        );
        let snaps = snapshot_files(&dir).unwrap();
        assert_eq!(snaps.len(), 1, "{snaps:?}");
        std::fs::write(&snaps[0], b"").unwrap();
        assert!(open(&dir).is_err(), "sled refuses an empty snapshot");
        let done = repair(&dir).unwrap();
        assert_eq!(done.0.len(), 1, "{:?}", done.0);
        let db = open(&dir).unwrap();
        for i in 0u32..4000 {
            let v = db.get(i.to_be_bytes()).unwrap().unwrap();
            assert!(v.starts_with(format!("7-{i}-").as_bytes()));
        }
    }

    #[test]
    fn whole_files_are_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("db");
        fill(&open(&dir).unwrap(), 1);
        drop(open(&dir).unwrap());
        let before: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(repair(&dir).unwrap().0.is_empty());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), before.len());
    }
}
