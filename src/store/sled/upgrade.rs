//! The one-time move of a store with one key per job (`jobs`, `jobs_by_seq`, `jobs_by_tenant`)
//! into the blocks of [`super::blocks`].
//!
//! The move writes a new database beside the old one, `db.moving`, and swaps it in: moving the
//! jobs inside the old database left its file several times larger and sled holding the old
//! trees' pages in memory, which is what the blocks are there to avoid. The old database is
//! not changed until the new one is complete, flushed and marked so; a crash at any point is
//! settled at the next open ([`settle`]): a complete new database is swapped in, anything else
//! of it removed, and the old one kept.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{decode, open_db_when_free, Inner, OpenError, COUNTS_KEPT, MOVE_DRAIN};
use crate::error::ServiceError;
use crate::model::{Job, TenantKey};

/// The trees of the layout before the blocks.
const OLD_TREES: [&[u8]; 3] = [b"jobs", b"jobs_by_seq", b"jobs_by_tenant"];
/// Trees made again from the jobs as they are moved, not copied.
const REMADE: [&[u8]; 5] = [
    b"queue",
    b"job_counts",
    b"job_blocks",
    b"job_ids",
    b"tenant_jobs",
];
/// Written into the new database's directory once it is complete.
const COMPLETE: &str = "MOVED-INTO-BLOCKS";
/// Jobs moved per store write, and entries per batch of a copied tree.
const CHUNK: usize = 1000;

fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

fn failed(path: &Path, what: &str, e: impl std::fmt::Display) -> OpenError {
    OpenError::Other {
        path: path.display().to_string(),
        reason: format!("moving its jobs into blocks: {what}: {e}"),
    }
}

/// Finishes or undoes what a crash left of a move of the store at `path` (before it opens).
pub(super) fn settle(path: &Path) -> Result<(), OpenError> {
    let moving = beside(path, "moving");
    let before = beside(path, "before-blocks");
    let complete = moving.join(COMPLETE).exists();
    let io = |what: &str, e: std::io::Error| failed(path, what, e);
    if complete {
        // The new database is whole: finish the swap.
        if path.exists() && !before.exists() {
            std::fs::rename(path, &before).map_err(|e| io("keeping the old database", e))?;
        }
        if !path.exists() {
            std::fs::rename(&moving, path).map_err(|e| io("putting the new database in", e))?;
            sync_dir(path).map_err(|e| io("syncing the data directory", e))?;
        }
    } else if !path.exists() && before.exists() {
        std::fs::rename(&before, path).map_err(|e| io("putting the old database back", e))?;
    }
    let _ = std::fs::remove_file(path.join(COMPLETE));
    if before.exists() && path.exists() {
        std::fs::remove_dir_all(&before).map_err(|e| io("removing the old database", e))?;
    }
    if moving.exists() {
        std::fs::remove_dir_all(&moving).map_err(|e| io("removing a half-made database", e))?;
    }
    Ok(())
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(parent) => std::fs::File::open(parent)?.sync_all(),
        None => Ok(()),
    }
}

/// Whether the database has jobs in the layout before the blocks.
pub(super) fn needed(db: &sled::Db) -> bool {
    db.tree_names().iter().any(|n| n.as_ref() == OLD_TREES[0])
}

/// Moves the store at `path` (closed) into the blocks: a new database with every other tree
/// copied and the jobs written anew, swapped in once complete.
pub(super) fn into_blocks(path: &Path) -> Result<(), OpenError> {
    let started = Instant::now();
    let moving = beside(path, "moving");
    let store = |what: &'static str| move |e: ServiceError| failed(path, what, e);
    let sled_error = |what: &'static str| move |e: sled::Error| failed(path, what, e);
    let old = open_db_when_free(path, MOVE_DRAIN)?;
    let moved = {
        let new = Inner::open(&moving)?;
        for name in old.tree_names() {
            if OLD_TREES.contains(&name.as_ref()) || REMADE.contains(&name.as_ref()) {
                continue;
            }
            let from = old.open_tree(&name).map_err(sled_error("reading a tree"))?;
            let to = new
                .db
                .open_tree(&name)
                .map_err(sled_error("writing a tree"))?;
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for entry in from.iter() {
                let (key, value) = entry.map_err(sled_error("reading a tree"))?;
                batch.insert(key, value);
                n += 1;
                if n % (10 * CHUNK) == 0 {
                    to.apply_batch(std::mem::take(&mut batch))
                        .map_err(sled_error("writing a tree"))?;
                }
            }
            to.apply_batch(batch)
                .map_err(sled_error("writing a tree"))?;
        }
        // In creation order, so that the blocks fill one after the other.
        let jobs = old.open_tree("jobs").map_err(sled_error("reading jobs"))?;
        let by_seq = old
            .open_tree("jobs_by_seq")
            .map_err(sled_error("reading jobs"))?;
        let mut chunk: Vec<(TenantKey, Job)> = Vec::with_capacity(CHUNK);
        let mut moved = 0;
        let mut last_seq = 0;
        for entry in by_seq.iter() {
            let (_, id) = entry.map_err(sled_error("reading jobs"))?;
            let Some(value) = jobs.get(&id).map_err(sled_error("reading jobs"))? else {
                continue;
            };
            let job: Job = decode(&value).map_err(store("reading a job"))?;
            let tenant = TenantKey::parse(&job.wire.source_tenant_id).ok_or_else(|| {
                failed(
                    path,
                    "reading a job",
                    format!(
                        "job {} names a source tenant that is not a tenant id",
                        job.wire.job_id
                    ),
                )
            })?;
            last_seq = last_seq.max(job.seq);
            chunk.push((tenant, job));
            if chunk.len() == CHUNK {
                moved += new.insert_new_jobs(&chunk).map_err(store("writing jobs"))?;
                chunk.clear();
            }
        }
        moved += new.insert_new_jobs(&chunk).map_err(store("writing jobs"))?;
        // New jobs must come after the moved ones (sled's id counter starts again at 0).
        let mut next = new
            .db
            .generate_id()
            .map_err(sled_error("sequence numbers"))?;
        let floor = last_seq.max(old.generate_id().map_err(sled_error("sequence numbers"))?);
        while next <= floor {
            next = new
                .db
                .generate_id()
                .map_err(sled_error("sequence numbers"))?;
        }
        // The moved jobs were counted as they went in.
        new.job_counts
            .insert(COUNTS_KEPT, &[])
            .map_err(sled_error("counting jobs"))?;
        new.durability
            .sync(&new.db)
            .map_err(store("flushing the new database"))?;
        moved
    };
    drop(old);
    let io = |what: &'static str| move |e: std::io::Error| failed(path, what, e);
    let mark = std::fs::File::create(moving.join(COMPLETE)).map_err(io("marking it complete"))?;
    mark.sync_all().map_err(io("marking it complete"))?;
    sync_dir(&moving.join(COMPLETE)).map_err(io("marking it complete"))?;
    settle(path)?;
    tracing::info!(
        jobs = moved,
        took_ms = started.elapsed().as_millis() as u64,
        "moved the jobs into blocks (a store from before them), in a new database"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let (moving, before) = (beside(&path, "moving"), beside(&path, "before-blocks"));
        (dir, path, moving, before)
    }

    fn mark(dir: &Path, what: &str) {
        std::fs::create_dir_all(dir).expect("dir");
        std::fs::write(dir.join("which"), what).expect("write");
    }

    fn which(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("which")).expect("read")
    }

    #[test]
    fn a_crash_before_the_new_database_is_complete_keeps_the_old_one() {
        let (_dir, path, moving, before) = dirs();
        mark(&path, "old");
        mark(&moving, "half");
        settle(&path).expect("settle");
        assert_eq!(which(&path), "old");
        assert!(!moving.exists() && !before.exists());
        // Crashed between the two renames without the new one complete: the old goes back.
        mark(&before, "old");
        std::fs::remove_dir_all(&path).expect("rm");
        mark(&moving, "half");
        settle(&path).expect("settle");
        assert_eq!(which(&path), "old");
        assert!(!moving.exists() && !before.exists());
    }

    #[test]
    fn a_crash_once_the_new_database_is_complete_finishes_the_swap() {
        for step in 0..3 {
            let (_dir, path, moving, before) = dirs();
            mark(&moving, "new");
            std::fs::write(moving.join(COMPLETE), "").expect("complete");
            match step {
                0 => mark(&path, "old"),   // before the first rename
                1 => mark(&before, "old"), // between the two
                _ => {
                    // after both, before the old one was removed
                    mark(&before, "old");
                    std::fs::rename(&moving, &path).expect("rename");
                }
            }
            settle(&path).expect("settle");
            assert_eq!(which(&path), "new", "step {step}");
            assert!(!moving.exists() && !before.exists(), "step {step}");
        }
    }
}
