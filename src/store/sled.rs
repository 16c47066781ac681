//! The sled store, the embedded default: one tree per record kind plus index trees.
//!
//! Keys:
//! - `regions`: region id; `users`: user name; `tenants`: [`TenantKey`] bytes
//! - `tokens`: token id (16 bytes); `token_lookup`: lookup bytes ‖ token id → (), the lookup
//!   being the token's SHA-256 (32 bytes; 4 in records written before, until first use)
//! - `images`: image id; `images_by_tenant`: owner key ‖ image id → ()
//! - `manifests`: image id → encoded manifest
//! - the chunk index: `chunks`: owner key ‖ chunk hash (32 bytes) ‖ generation (u64 BE) →
//!   image id ‖ first chunk index (u32 BE), one per distinct data chunk of a complete manifest,
//!   so that an owner's holders of a hash are one prefix scan; `chunks_indexed`: image id →
//!   owner key ‖ generation, the entries that count (an entry of another generation is
//!   ignored); `chunks_stale`: generation → owner key ‖ image id ‖ manifest, entries still to
//!   delete (of a replaced or removed manifest, or of one being indexed when a crash came)
//! - jobs, many to a key: `job_blocks`, `job_ids`, `tenant_jobs` (see [`blocks`]); a store
//!   from before them (`jobs`: job id → job, `jobs_by_seq`, `jobs_by_tenant`: one key per
//!   job) is moved into them at open
//! - `queue`: seq (u64 BE) → job id, for every job the replication worker still has to act on
//!   (enqueued and not terminal); kept in step with the job in the same transaction
//! - `job_counts`: status name → how many jobs have it (u64 BE), kept in the transaction of
//!   every job write, so that `/metrics` reads a handful of keys instead of every job; the key
//!   [`COUNTS_KEPT`] says they are kept (a store from before them is counted once, at open)
//!
//! The chunk index is written in batches of [`INDEX_BATCH`] entries outside any transaction,
//! and made to count (or to stop counting) in the one transaction that writes the manifest:
//! sled's transactions hold a process-wide lock, and one over a 10 GiB image's 163,840 entries
//! held up every other store call for seconds. Stale entries are deleted after the manifest's
//! transaction, and at start-up what a crash left.
//!
//! Values are a format version byte followed by JSON (jobs: JSON packed with zstd, see
//! [`packed`]; manifests and the chunk index: bytes). A
//! record and its index entries are always written in one transaction, so an index never points
//! at nothing; the chunk index's entries are the exception (above), and count only through
//! `chunks_indexed`, which is.

mod blocks;
mod packed;
mod upgrade;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::{Transactional, Tree};
use uuid::Uuid;

use super::{ImageChange, JobQuery, Jobs, OpenError, Registry, Repo};
use crate::disk::is_disk_full;
use crate::error::{Result, ServiceError, STORE_ERROR};
use crate::manifest::{Hash, Manifest};
use crate::model::{Image, Job, JobStatus, JobWire, Region, Tenant, TenantKey, TokenRecord, User};

const FORMAT_VERSION: u8 = 1;
/// Jobs: the JSON packed with zstd against [`packed::JOBS`] (about a seventh of the bytes).
const JOB_FORMAT_VERSION: u8 = 2;
/// sled's page cache (its default is 1 GiB, far beyond what an appliance at the edge spares).
const CACHE_BYTES: u64 = 16 << 20;

pub struct SledStore {
    /// sled's directory (`<data-dir>/db`).
    path: PathBuf,
    /// The open database; `None` while a reopen after a failed write has not succeeded yet.
    open: RwLock<Option<Arc<Inner>>>,
    /// A write failed for a reason of storage (a full disk, an I/O error): sled keeps that
    /// error and fails every later operation, so the database must be reopened.
    failed: AtomicBool,
    /// What the last storage failure was, for the callers while there is no database.
    failure: Mutex<Option<ServiceError>>,
    /// When the last reopen was tried; held while one runs.
    reopening: Mutex<Option<Instant>>,
    /// Bumped after every committed change to a job: readers that cache what they derive from
    /// jobs (list bodies, status counts) compare it before and after.
    jobs_version: AtomicU64,
    /// Queued jobs a worker of this process has taken.
    claims: Mutex<HashSet<Uuid>>,
    /// Held by every job write: where a job goes in `tenant_jobs` is worked out before its
    /// transaction (sled's transactions cannot read ranges), so no other job write may come
    /// between.
    job_writes: Mutex<()>,
    /// This appliance's name (the only one: sled's lock keeps other processes out).
    node: String,
}

/// One opening of the sled database and its trees.
struct Inner {
    db: sled::Db,
    regions: Tree,
    tenants: Tree,
    users: Tree,
    tokens: Tree,
    token_lookup: Tree,
    images: Tree,
    images_by_tenant: Tree,
    /// Chunk manifests of images (encoded by [`crate::manifest`]): image id → manifest.
    manifests: Tree,
    /// The chunk index: owner ‖ hash ‖ image id → first chunk index.
    chunks: Tree,
    /// Image id → owner ‖ generation of the entries that count.
    chunks_indexed: Tree,
    /// Generation → owner ‖ image id ‖ manifest: entries still to delete.
    chunks_stale: Tree,
    /// Jobs, many to a key (see [`blocks`]).
    job_blocks: Tree,
    job_ids: Tree,
    tenant_jobs: Tree,
    queue: Tree,
    /// Status name → number of jobs in it.
    job_counts: Tree,
    /// Images in Glance regions that a job created and could not delete yet: id → region id.
    orphans: Tree,
    durability: Durability,
}

/// sled 0.34 makes its log stable with `sync_file_range`, which neither writes the file's
/// metadata nor flushes the drive's write cache: enough for a process crash, not for a power
/// cut. So after sled's flush the log file is also `fdatasync`ed. Concurrent callers share
/// one flush and one sync (group commit): whoever holds the lock does both for everyone who
/// had finished writing before it started, and those behind it find their writes covered.
struct Durability {
    log: std::fs::File,
    /// Callers that finished writing so far.
    written: AtomicU64,
    /// How many of those the last completed flush and `fdatasync` covered.
    synced: std::sync::Mutex<u64>,
}

impl Durability {
    /// Makes every write this thread finished before the call durable.
    fn sync(&self, db: &sled::Db) -> Result<()> {
        let mine = self.written.fetch_add(1, Ordering::SeqCst) + 1;
        let mut synced = self
            .synced
            .lock()
            .map_err(|_| ServiceError::Internal("the sync lock is poisoned".into()))?;
        if *synced >= mine {
            return Ok(());
        }
        // Every caller counted so far had written before counting itself: the flush below
        // starts after all of them and covers their writes.
        let covered = self.written.load(Ordering::SeqCst);
        db.flush()?;
        self.log.sync_data().map_err(|e| store_io_error(&e))?;
        *synced = covered;
        Ok(())
    }
}

/// Opens sled at `path` after clearing what a power cut or a full disk left half-written
/// there ([`repair`](super::repair)). If sled still finds its snapshot corrupt, the
/// snapshots are moved aside and sled reads its whole log instead (once).
fn open_db(path: &Path) -> std::result::Result<sled::Db, OpenError> {
    let shown = path.display().to_string();
    let repair_failed = |e: std::io::Error| OpenError::Other {
        path: shown.clone(),
        reason: format!("cannot clear the partial files a power cut or a full disk left: {e}"),
    };
    super::repair::repair(path).map_err(repair_failed)?;
    let open = || {
        sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            .open()
    };
    let db = match open() {
        Err(sled::Error::Corruption { .. }) => {
            super::repair::quarantine_snapshots(path).map_err(repair_failed)?;
            open()
        }
        other => other,
    };
    db.map_err(|e| open_error(&shown, e))
}

/// Opens sled at `path` once a handle just closed has let go of its lock (sled's flusher
/// thread holds it a moment longer), waiting at most `wait`.
fn open_db_when_free(path: &Path, wait: Duration) -> std::result::Result<sled::Db, OpenError> {
    let deadline = Instant::now() + wait;
    loop {
        match open_db(path) {
            Err(OpenError::Locked(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn open_error(shown: &str, e: sled::Error) -> OpenError {
    let text = e.to_string();
    let locked = matches!(&e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock)
        || text.contains("could not acquire lock");
    if locked {
        OpenError::Locked(shown.to_string())
    } else if matches!(&e, sled::Error::Io(io) if is_disk_full(io)) {
        OpenError::Other {
            path: shown.to_string(),
            reason: "the disk is full (sled must write to open it); free some space and try again"
                .into(),
        }
    } else {
        OpenError::Other {
            path: shown.to_string(),
            reason: text,
        }
    }
}

/// The data directory holds token hashes: it must be its owner's alone (0700), whatever the
/// umask of whoever created it. A looser one of ours is tightened, with a warning; one that
/// belongs to another user is refused (it could be read or swapped under us).
fn secure_data_dir(dir: &Path) -> std::result::Result<(), OpenError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let refuse = |reason: String| OpenError::Other {
        path: dir.display().to_string(),
        reason,
    };
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| refuse(format!("cannot create the data directory: {e}")))?;
            std::fs::symlink_metadata(dir)
                .map_err(|e| refuse(format!("cannot read the data directory: {e}")))?
        }
        Err(e) => return Err(refuse(format!("cannot read the data directory: {e}"))),
    };
    if !meta.is_dir() {
        return Err(refuse(
            "the data directory is not a directory (a symbolic link is refused too)".into(),
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(refuse(format!(
            "the data directory belongs to uid {}, not to this user (uid {me}), so another \
             user could read or replace the store; chown it or use another --data-dir",
            meta.uid()
        )));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| refuse(format!("cannot make the data directory private: {e}")))?;
        tracing::warn!(
            data_dir = %dir.display(),
            "the data directory was mode {mode:04o}; made it 0700 (it holds token hashes)"
        );
    }
    Ok(())
}

/// sled's directory and everything in it: directories 0700, files 0600 (sled creates them
/// with the caller's umask; stores made before this check are tightened too).
fn restrict_tree(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(dir)?;
    let wanted = if meta.is_dir() {
        0o700
    } else if meta.is_file() {
        0o600
    } else {
        return Ok(());
    };
    if meta.permissions().mode() & 0o7777 != wanted {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(wanted))?;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            restrict_tree(&entry?.path())?;
        }
    }
    Ok(())
}

/// The key in sled's default tree that a reopen writes to learn whether writes work again.
const PROBE_KEY: &[u8] = b"image-replicator/write-probe";
/// How often a failed store tries to reopen (on a request or a health check).
const REOPEN_EVERY: Duration = Duration::from_secs(1);
/// How long a reopen waits for callers still in the old database, and for sled's lock.
const REOPEN_DRAIN: Duration = Duration::from_secs(3);
/// Below this much free space a reopen is not tried: sled writes a snapshot as it opens.
const REOPEN_MIN_FREE: u64 = 1 << 20;
/// How long an open waits for the handles of the move into blocks to let go of sled's lock.
const MOVE_DRAIN: Duration = Duration::from_secs(10);

/// A storage failure as callers see it: a full disk is a 507, anything else a 500.
fn store_io_error(e: &std::io::Error) -> ServiceError {
    if is_disk_full(e) {
        ServiceError::disk_full()
    } else {
        ServiceError::Internal(format!("{STORE_ERROR}: {e}"))
    }
}

/// What the callers are told while a failed store cannot be opened again.
fn open_failure(e: &OpenError) -> ServiceError {
    match e {
        OpenError::Other { reason, .. } if reason.contains("disk is full") => {
            ServiceError::disk_full()
        }
        other => ServiceError::Internal(format!("{STORE_ERROR}: {other}")),
    }
}

/// Errors after which sled must be reopened.
fn is_storage_failure(e: &ServiceError) -> bool {
    match e {
        ServiceError::DiskFull(_) => true,
        ServiceError::Internal(m) => m.starts_with(STORE_ERROR),
        _ => false,
    }
}

impl From<sled::Error> for ServiceError {
    fn from(err: sled::Error) -> Self {
        match &err {
            sled::Error::Io(io) if is_disk_full(io) => ServiceError::disk_full(),
            _ => ServiceError::internal(STORE_ERROR, err),
        }
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut out = vec![FORMAT_VERSION];
    serde_json::to_writer(&mut out, value).map_err(|e| ServiceError::internal("encode", e))?;
    Ok(out)
}

/// A job record: packed (see [`packed`]); other records are few and stay plain JSON.
fn encode_job(job: &Job) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(job).map_err(|e| ServiceError::internal("encode", e))?;
    let mut out = vec![JOB_FORMAT_VERSION];
    packed::pack(&json, &mut out)?;
    Ok(out)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, body)) => {
            serde_json::from_slice(body).map_err(|e| ServiceError::internal("corrupt record", e))
        }
        Some((&JOB_FORMAT_VERSION, body)) => {
            let json = packed::unpack(body)?;
            serde_json::from_slice(&json).map_err(|e| ServiceError::internal("corrupt record", e))
        }
        Some((version, _)) => Err(ServiceError::Internal(format!(
            "record has format version {version}, this binary reads {FORMAT_VERSION} and \
             {JOB_FORMAT_VERSION}"
        ))),
        None => Err(ServiceError::Internal("empty record".into())),
    }
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Runs a multi-tree transaction, turning sled's nested error types into ours.
fn tx_result<A>(r: std::result::Result<A, TransactionError<ServiceError>>) -> Result<A> {
    r.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => e.into(),
    })
}

fn abort(e: ServiceError) -> ConflictableTransactionError<ServiceError> {
    ConflictableTransactionError::Abort(e)
}

fn tx_encode_job(job: &Job) -> Result<Vec<u8>, ConflictableTransactionError<ServiceError>> {
    encode_job(job).map_err(abort)
}

fn tx_encode<T: Serialize>(
    value: &T,
) -> Result<Vec<u8>, ConflictableTransactionError<ServiceError>> {
    encode(value).map_err(abort)
}

impl Inner {
    fn open(path: &Path) -> std::result::Result<Inner, OpenError> {
        Inner::with_db(path, open_db(path)?)
    }

    /// The trees of `db`, opened at `path`.
    fn with_db(path: &Path, db: sled::Db) -> std::result::Result<Inner, OpenError> {
        let shown = path.display().to_string();
        restrict_tree(path).map_err(|e| OpenError::Other {
            path: shown.clone(),
            reason: format!("cannot make its files private: {e}"),
        })?;
        let tree = |name: &str| db.open_tree(name).map_err(|e| open_error(&shown, e));
        let log = std::fs::File::open(path.join("db")).map_err(|e| OpenError::Other {
            path: shown.clone(),
            reason: format!("cannot open its log for syncing: {e}"),
        })?;
        Ok(Inner {
            durability: Durability {
                log,
                written: Default::default(),
                synced: Default::default(),
            },
            regions: tree("regions")?,
            tenants: tree("tenants")?,
            users: tree("users")?,
            tokens: tree("tokens")?,
            token_lookup: tree("token_lookup")?,
            images: tree("images")?,
            images_by_tenant: tree("images_by_tenant")?,
            manifests: tree("manifests")?,
            chunks: tree("chunks")?,
            chunks_indexed: tree("chunks_indexed")?,
            chunks_stale: tree("chunks_stale")?,
            job_blocks: tree("job_blocks")?,
            job_ids: tree("job_ids")?,
            tenant_jobs: tree("tenant_jobs")?,
            queue: tree("queue")?,
            job_counts: tree("job_counts")?,
            orphans: tree("orphans")?,
            db,
        })
    }

    /// Writes and syncs a few bytes: whether the store can take writes again.
    fn probe(&self) -> Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        self.db.insert(PROBE_KEY, &now.to_be_bytes())?;
        self.durability.sync(&self.db)
    }
}

impl SledStore {
    /// Opens the store of data directory `dir` for appliance `node`.
    pub fn open(dir: &Path, node: &str) -> std::result::Result<SledStore, OpenError> {
        secure_data_dir(dir)?;
        let path = dir.join("db");
        upgrade::settle(&path)?;
        let mut inner = Inner::open(&path)?;
        if upgrade::needed(&inner.db) {
            drop(inner);
            upgrade::into_blocks(&path)?;
            inner = Inner::with_db(&path, open_db_when_free(&path, MOVE_DRAIN)?)?;
        }
        inner.sweep_all().map_err(|e| OpenError::Other {
            path: path.display().to_string(),
            reason: format!("cannot delete stale chunk index entries: {e}"),
        })?;
        inner.count_jobs_once().map_err(|e| OpenError::Other {
            path: path.display().to_string(),
            reason: format!("cannot count its jobs: {e}"),
        })?;
        Ok(SledStore {
            path,
            open: RwLock::new(Some(Arc::new(inner))),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            reopening: Mutex::new(None),
            jobs_version: Default::default(),
            claims: Default::default(),
            job_writes: Default::default(),
            node: node.to_string(),
        })
    }

    fn claims(&self) -> Result<std::sync::MutexGuard<'_, HashSet<Uuid>>> {
        self.claims
            .lock()
            .map_err(|_| ServiceError::Internal("the claims lock is poisoned".into()))
    }

    /// Runs `f` on the open database; a storage failure marks the store for reopening.
    fn with<T>(&self, f: impl FnOnce(&Inner) -> Result<T>) -> Result<T> {
        if self.failed.load(Ordering::SeqCst) {
            self.reopen();
        }
        let inner = self.current()?;
        let result = f(&inner);
        if let Err(e) = &result {
            self.note(e);
        }
        result
    }

    fn current(&self) -> Result<Arc<Inner>> {
        let open = self
            .open
            .read()
            .map_err(|_| ServiceError::Internal("the store lock is poisoned".into()))?;
        match open.as_ref() {
            Some(inner) => Ok(Arc::clone(inner)),
            None => Err(self.failure()),
        }
    }

    fn failure(&self) -> ServiceError {
        self.failure
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .unwrap_or_else(|| ServiceError::Unavailable("the store is reopening".into()))
    }

    /// Remembers a storage failure (other errors pass).
    fn note(&self, e: &ServiceError) {
        if !is_storage_failure(e) {
            return;
        }
        if let Ok(mut failure) = self.failure.lock() {
            *failure = Some(e.clone());
        }
        if !self.failed.swap(true, Ordering::SeqCst) {
            tracing::error!(store = %self.path.display(), "the store cannot write: {e}");
        }
    }

    /// Closes the failed database and opens it again, once the disk has room. Whoever comes
    /// while a reopen runs, or within [`REOPEN_EVERY`] of the last try, goes on without one.
    fn reopen(&self) {
        let Ok(mut last) = self.reopening.try_lock() else {
            return;
        };
        if last.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        if !self.failed.load(Ordering::SeqCst) {
            return;
        }
        match crate::disk::space_of(&self.path).map(|space| space.free) {
            Ok(free) if free < REOPEN_MIN_FREE => return,
            _ => {}
        }
        // Take the database out of use and wait for the callers still in it to leave: sled
        // holds a lock on its files until the last reference is gone.
        let old = match self.open.write() {
            Ok(mut open) => open.take(),
            Err(_) => return,
        };
        if let Some(old) = old {
            let weak = Arc::downgrade(&old);
            drop(old);
            let deadline = Instant::now() + REOPEN_DRAIN;
            while weak.strong_count() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Some(still) = weak.upgrade() {
                tracing::warn!("the store is still in use; its reopen waits for the next try");
                if let Ok(mut open) = self.open.write() {
                    *open = Some(still);
                }
                return;
            }
        }
        let inner = match open_db_when_free(&self.path, REOPEN_DRAIN)
            .and_then(|db| Inner::with_db(&self.path, db))
        {
            Ok(inner) => inner,
            Err(e) => {
                tracing::warn!("the store does not reopen yet: {e}");
                if let Ok(mut failure) = self.failure.lock() {
                    *failure = Some(open_failure(&e));
                }
                return;
            }
        };
        if let Err(e) = inner.probe() {
            tracing::warn!("the reopened store cannot write yet: {e}");
            if let Ok(mut failure) = self.failure.lock() {
                *failure = Some(e);
            }
            // Leave it open: the next try closes it again.
            if let Ok(mut open) = self.open.write() {
                *open = Some(Arc::new(inner));
            }
            return;
        }
        if let Ok(mut open) = self.open.write() {
            *open = Some(Arc::new(inner));
        }
        if let Ok(mut failure) = self.failure.lock() {
            *failure = None;
        }
        self.failed.store(false, Ordering::SeqCst);
        // Everything cached from jobs may predate the failure.
        self.jobs_changed();
        tracing::info!(store = %self.path.display(), "the store writes again (reopened)");
    }

    fn get<T: DeserializeOwned>(tree: &Tree, key: &[u8]) -> Result<Option<T>> {
        tree.get(key)?.map(|v| decode(&v)).transpose()
    }

    fn all<T: DeserializeOwned>(tree: &Tree) -> Result<Vec<T>> {
        tree.iter()
            .values()
            .map(|v| decode(&v?))
            .collect::<Result<Vec<T>>>()
    }

    /// Inserts `value` unless `key` is taken; whether it was inserted.
    fn insert_new<T: Serialize>(tree: &Tree, key: &[u8], value: &T) -> Result<bool> {
        let swapped = tree.compare_and_swap(key, None as Option<&[u8]>, Some(encode(value)?))?;
        Ok(swapped.is_ok())
    }

    fn put<T: Serialize>(tree: &Tree, key: &[u8], value: &T) -> Result<()> {
        tree.insert(key, encode(value)?)?;
        Ok(())
    }

    /// Called only after a job write has committed, so a reader that saw the old version
    /// cannot have cached what the write replaced under the new one.
    fn jobs_changed(&self) {
        self.jobs_version.fetch_add(1, Ordering::SeqCst);
    }

    /// [`Jobs::jobs`] and [`Jobs::job_wires`]: `T` is [`Job`], or [`JobWire`] when only the
    /// API's ten keys are needed (decoding skips the rest).
    fn select<T: DeserializeOwned>(
        &self,
        query: &JobQuery,
        keep: &dyn Fn(&T) -> bool,
    ) -> Result<Vec<T>> {
        let JobQuery {
            tenant,
            after,
            limit,
        } = *query;
        self.with(|s| {
            let start = after.map_or(0, |s| s.saturating_add(1));
            if after == Some(u64::MAX) || limit == 0 {
                return Ok(Vec::new());
            }
            let mut out = Vec::new();
            let mut take = |seq: u64, record: &[u8]| -> Result<bool> {
                if seq >= start {
                    let job: T = decode(record)?;
                    if keep(&job) {
                        out.push(job);
                    }
                }
                Ok(out.len() < limit)
            };
            match tenant {
                None => {
                    'blocks: for block in s.job_blocks.range(blocks::block_key(start)..) {
                        let (_, block) = block?;
                        for (seq, record) in blocks::entries(&block)? {
                            if !take(seq, record)? {
                                break 'blocks;
                            }
                        }
                    }
                }
                Some(t) => {
                    let last = cat(&[&t.0, &u64::MAX.to_be_bytes()]);
                    let first = match s.tenant_block_of(t, start)? {
                        Some((key, _)) => key,
                        None => tenant_span(t, 0).0,
                    };
                    let mut block: Option<([u8; 8], sled::IVec)> = None;
                    'tenant: for seqs in s.tenant_jobs.range(first..=last) {
                        let (_, seqs) = seqs?;
                        for seq in blocks::seqs(&seqs)? {
                            if seq < start {
                                continue;
                            }
                            let key = blocks::block_key(seq);
                            if block.as_ref().is_none_or(|(k, _)| *k != key) {
                                block = s.job_blocks.get(key)?.map(|b| (key, b));
                            }
                            let record = match &block {
                                Some((_, b)) => blocks::find(b, seq)?,
                                None => None,
                            };
                            if let Some(record) = record {
                                if !take(seq, record)? {
                                    break 'tenant;
                                }
                            }
                        }
                    }
                }
            }
            Ok(out)
        })
    }

    fn job_writes(&self) -> Result<std::sync::MutexGuard<'_, ()>> {
        self.job_writes
            .lock()
            .map_err(|_| ServiceError::Internal("the job write lock is poisoned".into()))
    }
}

impl Repo for SledStore {
    fn writable(&self) -> std::result::Result<(), ServiceError> {
        if self.failed.load(Ordering::SeqCst) {
            self.reopen();
        }
        if !self.failed.load(Ordering::SeqCst) {
            return Ok(());
        }
        Err(self.failure())
    }

    fn flush(&self) -> Result<()> {
        self.with(|s| s.durability.sync(&s.db))
    }

    fn node(&self) -> &str {
        &self.node
    }
}

impl Registry for SledStore {
    fn region(&self, id: &str) -> Result<Option<Region>> {
        self.with(|s| Self::get(&s.regions, id.as_bytes()))
    }

    fn regions(&self) -> Result<Vec<Region>> {
        self.with(|s| Self::all(&s.regions))
    }

    fn insert_region(&self, region: &Region) -> Result<bool> {
        self.with(|s| Self::insert_new(&s.regions, region.id.as_bytes(), region))
    }

    fn remove_region(&self, id: &str) -> Result<()> {
        self.with(|s| {
            s.regions.remove(id.as_bytes())?;
            Ok(())
        })
    }

    fn tenant(&self, key: TenantKey) -> Result<Option<Tenant>> {
        self.with(|s| Self::get(&s.tenants, &key.0))
    }

    fn tenants(&self) -> Result<Vec<Tenant>> {
        self.with(|s| Self::all(&s.tenants))
    }

    fn insert_tenant(&self, key: TenantKey, tenant: &Tenant) -> Result<bool> {
        self.with(|s| Self::insert_new(&s.tenants, &key.0, tenant))
    }

    fn update_tenant(&self, key: TenantKey, tenant: &Tenant) -> Result<bool> {
        self.with(|s| {
            let new = encode(tenant)?;
            tx_result(s.tenants.transaction(|tenants| {
                if tenants.get(key.0)?.is_none() {
                    return Ok(false);
                }
                tenants.insert(&key.0, new.as_slice())?;
                Ok(true)
            }))
        })
    }

    fn remove_tenant(&self, key: TenantKey) -> Result<()> {
        self.with(|s| {
            s.tenants.remove(key.0)?;
            Ok(())
        })
    }

    fn user(&self, name: &str) -> Result<Option<User>> {
        self.with(|s| Self::get(&s.users, name.as_bytes()))
    }

    fn users(&self) -> Result<Vec<User>> {
        self.with(|s| Self::all(&s.users))
    }

    fn insert_user(&self, user: &User) -> Result<bool> {
        self.with(|s| Self::insert_new(&s.users, user.name.as_bytes(), user))
    }

    fn update_user(&self, user: &User) -> Result<bool> {
        self.with(|s| {
            let new = encode(user)?;
            tx_result(s.users.transaction(|users| {
                if users.get(user.name.as_bytes())?.is_none() {
                    return Ok(false);
                }
                users.insert(user.name.as_bytes(), new.as_slice())?;
                Ok(true)
            }))
        })
    }

    fn remove_user(&self, name: &str) -> Result<usize> {
        let tokens: Vec<TokenRecord> = self
            .tokens()?
            .into_iter()
            .filter(|t| t.info.user == name)
            .collect();
        self.with(|s| {
            tx_result(
                (&s.users, &s.tokens, &s.token_lookup).transaction(|(users, tok, look)| {
                    users.remove(name.as_bytes())?;
                    for t in &tokens {
                        remove_token_tx(tok, look, t)?;
                    }
                    Ok(())
                }),
            )
        })?;
        Ok(tokens.len())
    }

    fn token(&self, id: Uuid) -> Result<Option<TokenRecord>> {
        self.with(|s| Self::get(&s.tokens, id.as_bytes()))
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.with(|s| Self::all(&s.tokens))
    }

    fn token_candidates(&self, lookup: &[u8]) -> Result<Vec<TokenRecord>> {
        // The record with that lookup, and records with the 4-byte lookup of earlier versions
        // that is its prefix (usually none).
        const ID_LEN: usize = 16;
        let prefix = lookup
            .get(..crate::model::LEGACY_LOOKUP_LEN)
            .unwrap_or(lookup);
        self.with(|s| {
            let mut out = Vec::new();
            for entry in s.token_lookup.scan_prefix(prefix) {
                let (key, _) = entry?;
                let Some(split) = key.len().checked_sub(ID_LEN) else {
                    continue;
                };
                let (entry_lookup, id) = key.split_at(split);
                let found = entry_lookup == lookup
                    || (entry_lookup.len() == crate::model::LEGACY_LOOKUP_LEN
                        && lookup.starts_with(entry_lookup));
                if !found {
                    continue;
                }
                if let Some(token) = Self::get(&s.tokens, id)? {
                    out.push(token);
                }
            }
            Ok(out)
        })
    }

    fn insert_token(&self, token: &TokenRecord, lookup: &[u8]) -> Result<()> {
        self.with(|s| {
            tx_result((&s.tokens, &s.token_lookup).transaction(|(tok, look)| {
                tok.insert(token.info.id.as_bytes(), tx_encode(token)?)?;
                look.insert(cat(&[lookup, token.info.id.as_bytes()]), &[])?;
                Ok(())
            }))
        })
    }

    fn update_token(&self, token: &TokenRecord) -> Result<()> {
        self.with(|s| Self::put(&s.tokens, token.info.id.as_bytes(), token))
    }

    fn set_token_lookup(&self, id: Uuid, lookup: &[u8]) -> Result<()> {
        self.with(|s| {
            tx_result((&s.tokens, &s.token_lookup).transaction(|(tok, look)| {
                let Some(value) = tok.get(id.as_bytes())? else {
                    return Ok(());
                };
                let mut token: TokenRecord = decode(&value).map_err(abort)?;
                if let Some(old) = token.lookup_key() {
                    look.remove(cat(&[&old, id.as_bytes()]))?;
                }
                token.lookup = crate::model::to_hex(lookup);
                tok.insert(id.as_bytes(), tx_encode(&token)?)?;
                look.insert(cat(&[lookup, id.as_bytes()]), &[])?;
                Ok(())
            }))
        })
    }

    fn image(&self, id: Uuid) -> Result<Option<Image>> {
        self.with(|s| Self::get(&s.images, id.as_bytes()))
    }

    fn images(&self, owner: Option<TenantKey>) -> Result<Vec<Image>> {
        self.with(|s| {
            let Some(owner) = owner else {
                return Self::all(&s.images);
            };
            let mut out = Vec::new();
            for entry in s.images_by_tenant.scan_prefix(owner.0) {
                let (key, _) = entry?;
                if let Some(image) = Self::get(&s.images, key.get(16..).unwrap_or_default())? {
                    out.push(image);
                }
            }
            Ok(out)
        })
    }

    fn insert_image(&self, owner: TenantKey, image: &Image) -> Result<()> {
        self.with(|s| {
            tx_result(
                (
                    &s.images,
                    &s.images_by_tenant,
                    &s.manifests,
                    &s.chunks,
                    &s.chunks_indexed,
                )
                    .transaction(
                        |(images, by_tenant, manifests, chunks, indexed)| {
                            if images.get(image.id.as_bytes())?.is_some() {
                                return Err(abort(ServiceError::Conflict(format!(
                                    "an image with id {} already exists",
                                    image.id
                                ))));
                            }
                            images.insert(image.id.as_bytes(), tx_encode(image)?)?;
                            by_tenant.insert(cat(&[&owner.0, image.id.as_bytes()]), &[])?;
                            let index = TxIndex {
                                manifests,
                                chunks,
                                indexed,
                            };
                            index.index_stored(owner, image.id)
                        },
                    ),
            )
        })
    }

    fn update_image(&self, image: &Image) -> Result<()> {
        self.with(|s| Self::put(&s.images, image.id.as_bytes(), image))
    }

    fn remove_image(&self, owner: TenantKey, id: Uuid) -> Result<()> {
        self.with(|s| {
            let retired = tx_result(
                (
                    &s.images,
                    &s.images_by_tenant,
                    &s.manifests,
                    &s.chunks_indexed,
                    &s.chunks_stale,
                )
                    .transaction(
                        |(images, by_tenant, manifests, indexed, stale)| {
                            images.remove(id.as_bytes())?;
                            by_tenant.remove(cat(&[&owner.0, id.as_bytes()]))?;
                            let retired = retire(manifests, indexed, stale, id)?;
                            manifests.remove(id.as_bytes())?;
                            Ok(retired)
                        },
                    ),
            )?;
            s.sweep_quietly(retired);
            Ok(())
        })
    }

    fn manifest(&self, id: Uuid) -> Result<Option<Vec<u8>>> {
        self.with(|s| Ok(s.manifests.get(id.as_bytes())?.map(|v| v.to_vec())))
    }

    fn put_manifest(&self, id: Uuid, manifest: &[u8]) -> Result<()> {
        let entries = Manifest::decode(manifest)
            .ok()
            .filter(Manifest::is_complete)
            .map(|m| m.first_indexes());
        self.with(|s| {
            let indexed_now = s.chunks_indexed.get(id.as_bytes())?.is_some();
            if indexed_now
                && s.manifests
                    .get(id.as_bytes())?
                    .is_some_and(|m| m == manifest)
            {
                // The same complete manifest again: its entries are there.
                return Ok(());
            }
            // The owner is the record's (checked again when the entries are made to count).
            let owner = match &entries {
                Some(_) => Self::get::<Image>(&s.images, id.as_bytes())?
                    .and_then(|image| TenantKey::parse(&image.owner)),
                None => None,
            };
            let fresh = match (&entries, owner) {
                (Some(entries), Some(owner)) => {
                    Some((s.write_entries(owner, id, manifest, entries)?, owner))
                }
                _ => None,
            };
            let committed = tx_result(
                (&s.images, &s.manifests, &s.chunks_indexed, &s.chunks_stale).transaction(
                    |(images, manifests, indexed, stale)| {
                        let retired = retire(manifests, indexed, stale, id)?;
                        manifests.insert(id.as_bytes(), manifest)?;
                        let Some((generation, owner)) = fresh else {
                            return Ok((retired, false));
                        };
                        let Some(record) = images.get(id.as_bytes())? else {
                            return Ok((retired, false));
                        };
                        let image = decode::<Image>(&record).ok();
                        if image.and_then(|i| TenantKey::parse(&i.owner)) != Some(owner) {
                            return Ok((retired, false));
                        }
                        indexed.insert(id.as_bytes(), cat(&[&owner.0, &generation]))?;
                        stale.remove(&generation)?;
                        Ok((retired, true))
                    },
                ),
            );
            let (retired, counted) = match committed {
                Ok(done) => done,
                Err(e) => {
                    s.sweep_quietly(fresh.map(|(generation, _)| generation));
                    return Err(e);
                }
            };
            s.sweep_quietly(retired);
            if let (Some((generation, _)), false) = (fresh, counted) {
                s.sweep_quietly(Some(generation));
            }
            Ok(())
        })
    }

    fn remove_manifest(&self, id: Uuid) -> Result<()> {
        self.with(|s| {
            let retired = tx_result(
                (&s.manifests, &s.chunks_indexed, &s.chunks_stale).transaction(
                    |(manifests, indexed, stale)| {
                        let retired = retire(manifests, indexed, stale, id)?;
                        manifests.remove(id.as_bytes())?;
                        Ok(retired)
                    },
                ),
            )?;
            s.sweep_quietly(retired);
            Ok(())
        })
    }

    fn chunk_holders(
        &self,
        owner: TenantKey,
        hash: &Hash,
        limit: usize,
    ) -> Result<Vec<(Uuid, u32)>> {
        self.with(|s| {
            let mut out = Vec::new();
            if limit == 0 {
                return Ok(out);
            }
            for entry in s.chunks.scan_prefix(cat(&[&owner.0, hash])) {
                let (key, value) = entry?;
                let (Some(generation), Some(image), Some(index)) = (
                    key.get(CHUNK_PREFIX..),
                    value.get(..16).and_then(|id| Uuid::from_slice(id).ok()),
                    value.get(16..).and_then(|i| <[u8; 4]>::try_from(i).ok()),
                ) else {
                    return Err(ServiceError::Internal("corrupt chunk index entry".into()));
                };
                // Only the entries of the generation that counts for the image.
                let counts = s.chunks_indexed.get(image.as_bytes())?.is_some_and(|v| {
                    v.get(..16) == Some(&owner.0[..]) && v.get(16..) == Some(generation)
                });
                if counts {
                    out.push((image, u32::from_be_bytes(index)));
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            Ok(out)
        })
    }
}

impl Jobs for SledStore {
    fn next_seq(&self) -> Result<u64> {
        self.with(|s| Ok(s.db.generate_id()?))
    }

    fn add_orphan(&self, id: Uuid, region: &str) -> Result<()> {
        self.with(|s| {
            s.orphans.insert(id.as_bytes(), region.as_bytes())?;
            Ok(())
        })
    }

    fn orphans(&self) -> Result<Vec<(Uuid, String)>> {
        self.with(|s| {
            let mut out = Vec::new();
            for entry in s.orphans.iter() {
                let (key, value) = entry?;
                let id = Uuid::from_slice(&key)
                    .map_err(|e| ServiceError::internal("corrupt orphan", e))?;
                out.push((id, String::from_utf8_lossy(&value).into_owned()));
            }
            Ok(out)
        })
    }

    fn remove_orphan(&self, id: Uuid) -> Result<()> {
        self.with(|s| {
            s.orphans.remove(id.as_bytes())?;
            Ok(())
        })
    }

    fn jobs_version(&self) -> u64 {
        self.jobs_version.load(Ordering::SeqCst)
    }

    fn job(&self, id: Uuid) -> Result<Option<Job>> {
        self.with(|s| Ok(s.locate(id)?.map(|(_, job)| job)))
    }

    fn update_job(
        &self,
        id: Uuid,
        change: &(dyn Fn(&mut Job) -> Result<ImageChange> + Sync),
    ) -> Result<Option<Job>> {
        let _writes = self.job_writes()?;
        self.with(|s| {
            let candidates = s.candidates(id)?;
            if candidates.is_empty() {
                return Ok(None);
            }
            let (job, retired) = tx_result(
                (
                    &s.job_blocks,
                    &s.queue,
                    &s.images,
                    &s.images_by_tenant,
                    &s.manifests,
                    &s.chunks,
                    &s.chunks_indexed,
                    &s.chunks_stale,
                    &s.job_counts,
                )
                    .transaction(
                        |(
                            job_blocks,
                            queue,
                            images,
                            by_tenant,
                            manifests,
                            chunks,
                            indexed,
                            stale,
                            counts,
                        )| {
                            let mut found = None;
                            for &seq in &candidates {
                                let Some(block) = job_blocks.get(blocks::block_key(seq))? else {
                                    continue;
                                };
                                if let Some(old) = blocks::find(&block, seq).map_err(abort)? {
                                    let job: Job = decode(old).map_err(abort)?;
                                    if job.wire.job_id == id {
                                        found = Some((seq, block, job));
                                        break;
                                    }
                                }
                            }
                            let Some((seq, block, mut job)) = found else {
                                return Ok((None, None));
                            };
                            let was = job.wire.status;
                            let mut retired = None;
                            match change(&mut job).map_err(abort)? {
                                ImageChange::None => {}
                                ImageChange::Insert(owner, image) => {
                                    images.insert(image.id.as_bytes(), tx_encode(&image)?)?;
                                    by_tenant.insert(cat(&[&owner.0, image.id.as_bytes()]), &[])?;
                                    let index = TxIndex {
                                        manifests,
                                        chunks,
                                        indexed,
                                    };
                                    index.index_stored(owner, image.id)?;
                                }
                                ImageChange::Put(image) => {
                                    images.insert(image.id.as_bytes(), tx_encode(&image)?)?;
                                }
                                ImageChange::Remove(owner, image_id) => {
                                    images.remove(image_id.as_bytes())?;
                                    by_tenant.remove(cat(&[&owner.0, image_id.as_bytes()]))?;
                                    retired = retire(manifests, indexed, stale, image_id)?;
                                    manifests.remove(image_id.as_bytes())?;
                                }
                            }
                            let record = tx_encode_job(&job)?;
                            let block = blocks::with(Some(&block), seq, &record).map_err(abort)?;
                            job_blocks.insert(&blocks::block_key(seq), block)?;
                            sync_queue(queue, &job)?;
                            if job.wire.status != was {
                                count(counts, was, -1)?;
                                count(counts, job.wire.status, 1)?;
                            }
                            Ok((Some(job), retired))
                        },
                    ),
            )?;
            s.sweep_quietly(retired);
            if job.is_some() {
                self.jobs_changed();
            }
            Ok(job)
        })
    }

    fn queued(&self) -> Result<Vec<Uuid>> {
        // Read whole, so that no caller holds the database while it works through them (a
        // reopen waits for every holder).
        self.with(|s| {
            s.queue
                .iter()
                .values()
                .map(|v| {
                    let v = v?;
                    Uuid::from_slice(&v)
                        .map_err(|e| ServiceError::internal("corrupt queue entry", e))
                })
                .collect()
        })
    }

    fn claim_next(&self, skip: &HashSet<Uuid>) -> Result<Option<Uuid>> {
        // One process has the database open (sled's lock): its memory is the truth.
        let elsewhere: HashSet<String> = self
            .regions()?
            .into_iter()
            .filter(|r| r.pin.as_ref().is_some_and(|pin| *pin != self.node))
            .map(|r| r.id)
            .collect();
        for id in self.queued()? {
            if skip.contains(&id) || self.claims()?.contains(&id) {
                continue;
            }
            if !elsewhere.is_empty() {
                match self.job(id)? {
                    Some(job)
                        if elsewhere.contains(&job.wire.source_region_id)
                            || elsewhere.contains(&job.wire.destination_region_id) =>
                    {
                        continue
                    }
                    _ => {}
                }
            }
            if self.claims()?.insert(id) {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    fn release(&self, id: Uuid) {
        if let Ok(mut claims) = self.claims.lock() {
            claims.remove(&id);
        }
    }

    fn renew_claims(&self, ids: &[Uuid]) -> Result<Vec<(Uuid, bool)>> {
        // Nobody else can take a claim over.
        let claims = self.claims()?;
        let held: Vec<Uuid> = ids
            .iter()
            .filter(|id| claims.contains(id))
            .copied()
            .collect();
        drop(claims);
        let mut renewed = Vec::with_capacity(held.len());
        for id in held {
            if let Some(job) = self.job(id)? {
                renewed.push((id, job.cancel_asked()));
            }
        }
        Ok(renewed)
    }

    fn holder(&self, id: Uuid) -> Result<Option<String>> {
        Ok(self.claims()?.contains(&id).then(|| self.node.clone()))
    }

    fn drop_queue_entry(&self, id: Uuid) -> Result<()> {
        self.with(|s| {
            for entry in s.queue.iter() {
                let (key, value) = entry?;
                if value.as_ref() == id.as_bytes() {
                    s.queue.remove(key)?;
                }
            }
            Ok(())
        })
    }

    fn insert_jobs(&self, jobs: &[(TenantKey, Job)]) -> Result<usize> {
        let _writes = self.job_writes()?;
        let inserted = self.with(|s| s.insert_new_jobs(jobs))?;
        if inserted > 0 {
            self.jobs_changed();
        }
        Ok(inserted)
    }

    fn jobs(&self, query: &JobQuery, keep: &dyn Fn(&Job) -> bool) -> Result<Vec<Job>> {
        self.select(query, keep)
    }

    fn job_wires(&self, query: &JobQuery, keep: &dyn Fn(&JobWire) -> bool) -> Result<Vec<JobWire>> {
        self.select(query, keep)
    }

    fn remove_jobs(&self, ids: &[Uuid], only: &(dyn Fn(&Job) -> bool + Sync)) -> Result<Vec<Uuid>> {
        let _writes = self.job_writes()?;
        self.with(|s| {
            // The jobs that go, and what that leaves in `tenant_jobs`: worked out first, under
            // `job_writes`, so nothing changes them before the transaction.
            let mut going: Vec<Job> = Vec::new();
            let mut tenants = TenantBlocks::default();
            for id in ids {
                let Some((_, job)) = s.locate(*id)? else {
                    continue;
                };
                if !only(&job) || going.iter().any(|g| g.wire.job_id == *id) {
                    continue;
                }
                if let Some(tenant) = TenantKey::parse(&job.wire.source_tenant_id) {
                    tenants.remove(s, tenant, job.seq)?;
                }
                going.push(job);
            }
            if going.is_empty() {
                return Ok(Vec::new());
            }
            tx_result(s.job_trees().transaction(
                |(job_blocks, job_ids, tenant_jobs, queue, counts)| {
                    for job in &going {
                        let key = blocks::block_key(job.seq);
                        if let Some(block) = job_blocks.get(key)? {
                            match blocks::without(&block, job.seq).map_err(abort)? {
                                Some(block) => job_blocks.insert(&key, block)?,
                                None => job_blocks.remove(&key)?,
                            };
                        }
                        let (bucket, tag) = blocks::id_place(&job.wire.job_id);
                        if let Some(ids) = job_ids.get(bucket)? {
                            match blocks::bucket_without(&ids, tag, job.seq) {
                                Some(ids) => job_ids.insert(&bucket, ids)?,
                                None => job_ids.remove(&bucket)?,
                            };
                        }
                        queue.remove(&job.seq.to_be_bytes())?;
                        count(counts, job.wire.status, -1)?;
                    }
                    tenants.write(tenant_jobs)
                },
            ))?;
            self.jobs_changed();
            Ok(going.into_iter().map(|j| j.wire.job_id).collect())
        })
    }

    fn job_status_counts(&self) -> Result<std::collections::BTreeMap<JobStatus, u64>> {
        self.with(|s| {
            let mut counts = std::collections::BTreeMap::new();
            for status in JobStatus::ALL {
                let n = s
                    .job_counts
                    .get(status.as_str())?
                    .map_or(0, |n| read_count(&n));
                if n > 0 {
                    counts.insert(status, n);
                }
            }
            Ok(counts)
        })
    }

    fn tenant_has_jobs(&self, key: TenantKey, id_as_stored: &str) -> Result<Option<Uuid>> {
        self.with(|s| {
            for seqs in s.tenant_jobs.scan_prefix(key.0) {
                let (_, seqs) = seqs?;
                if let Some(seq) = blocks::seqs(&seqs)?.first() {
                    if let Some(job) = s.job_at::<Job>(*seq)? {
                        return Ok(Some(job.wire.job_id));
                    }
                }
            }
            #[derive(serde::Deserialize)]
            struct Ends {
                job_id: Uuid,
                destination_tenant_id: String,
            }
            for block in s.job_blocks.iter().values() {
                for (_, record) in blocks::entries(&block?)? {
                    let job: Ends = decode(record)?;
                    let dst = &job.destination_tenant_id;
                    if dst == id_as_stored || TenantKey::parse(dst) == Some(key) {
                        return Ok(Some(job.job_id));
                    }
                }
            }
            Ok(None)
        })
    }
}

impl Inner {
    /// The trees a job's insert or removal writes in one transaction.
    fn job_trees(&self) -> (&Tree, &Tree, &Tree, &Tree, &Tree) {
        (
            &self.job_blocks,
            &self.job_ids,
            &self.tenant_jobs,
            &self.queue,
            &self.job_counts,
        )
    }

    /// The sequence numbers where job `id` may be (its bucket's entries with its tag: almost
    /// always one, or none); the record there says whose it is.
    fn candidates(&self, id: Uuid) -> Result<Vec<u64>> {
        let (bucket, tag) = blocks::id_place(&id);
        Ok(match self.job_ids.get(bucket)? {
            Some(bucket) => blocks::bucket_find(&bucket, tag),
            None => Vec::new(),
        })
    }

    /// Job `id` and its sequence number.
    fn locate(&self, id: Uuid) -> Result<Option<(u64, Job)>> {
        for seq in self.candidates(id)? {
            if let Some(job) = self.job_at::<Job>(seq)? {
                if job.wire.job_id == id {
                    return Ok(Some((seq, job)));
                }
            }
        }
        Ok(None)
    }

    /// The job with sequence number `seq` (`T`: [`Job`] or [`JobWire`]).
    fn job_at<T: DeserializeOwned>(&self, seq: u64) -> Result<Option<T>> {
        let Some(block) = self.job_blocks.get(blocks::block_key(seq))? else {
            return Ok(None);
        };
        blocks::find(&block, seq)?.map(decode).transpose()
    }

    /// The key of `tenant`'s block of `tenant_jobs` that `seq` falls in (the last key up to
    /// tenant ‖ seq), if it has one.
    fn tenant_block_of(&self, tenant: TenantKey, seq: u64) -> Result<Option<(Vec<u8>, Vec<u64>)>> {
        let (first, probe) = tenant_span(tenant, seq);
        let last = self
            .tenant_jobs
            .range(first..=probe)
            .next_back()
            .transpose()?;
        last.map(|(key, seqs)| Ok((key.to_vec(), blocks::seqs(&seqs)?)))
            .transpose()
    }

    /// [`Jobs::insert_jobs`], under `job_writes`.
    fn insert_new_jobs(&self, jobs: &[(TenantKey, Job)]) -> Result<usize> {
        let s = self;
        // Which are new (an identical job is left as it is, another one is a conflict),
        // and where they go in `tenant_jobs`: worked out first, under `job_writes`.
        let mut new: Vec<(&Job, blocks::IdPlace)> = Vec::new();
        let mut in_batch: std::collections::HashMap<Uuid, &Job> = Default::default();
        let mut tenants = TenantBlocks::default();
        for (tenant, job) in jobs {
            let id = job.wire.job_id;
            let same = match in_batch.get(&id) {
                Some(old) => Some(old.wire == job.wire),
                None => s.locate(id)?.map(|(_, old)| old.wire == job.wire),
            };
            if let Some(same) = same {
                if same {
                    continue;
                }
                return Err(ServiceError::Conflict(format!(
                    "job {id} already exists with different content"
                )));
            }
            in_batch.insert(id, job);
            tenants.insert(s, *tenant, job.seq)?;
            new.push((job, blocks::id_place(&id)));
        }
        if new.is_empty() {
            return Ok(0);
        }
        tx_result(s.job_trees().transaction(
            |(job_blocks, job_ids, tenant_jobs, queue, counts)| {
                for (job, (bucket, tag)) in &new {
                    let key = blocks::block_key(job.seq);
                    let record = tx_encode_job(job)?;
                    let block = job_blocks.get(key)?;
                    if let Some(taken) = &block {
                        if blocks::find(taken, job.seq).map_err(abort)?.is_some() {
                            return Err(abort(ServiceError::Conflict(format!(
                                "job {}: its sequence number {} is another job's",
                                job.wire.job_id, job.seq
                            ))));
                        }
                    }
                    let block = blocks::with(block.as_deref(), job.seq, &record).map_err(abort)?;
                    job_blocks.insert(&key, block)?;
                    let ids = job_ids.get(bucket)?;
                    let ids = blocks::bucket_with(ids.as_deref(), *tag, job.seq);
                    job_ids.insert(bucket, ids)?;
                    sync_queue(queue, job)?;
                    count(counts, job.wire.status, 1)?;
                }
                tenants.write(tenant_jobs)
            },
        ))?;
        Ok(new.len())
    }
}

/// The keys of `tenant_jobs` from `tenant`'s first to where `seq` would go.
fn tenant_span(tenant: TenantKey, seq: u64) -> (Vec<u8>, Vec<u8>) {
    (
        cat(&[&tenant.0, &0u64.to_be_bytes()]),
        cat(&[&tenant.0, &seq.to_be_bytes()]),
    )
}

/// Changes to `tenant_jobs` worked out before a job write's transaction, under `job_writes`:
/// each block touched, with its sequence numbers as they will be (none: the block goes).
#[derive(Default)]
struct TenantBlocks {
    blocks: std::collections::BTreeMap<Vec<u8>, Vec<u64>>,
}

impl TenantBlocks {
    /// The key of the block `seq` of `tenant` falls in, as it will be; the block is then in
    /// `self.blocks`.
    fn block_of(&mut self, s: &Inner, tenant: TenantKey, seq: u64) -> Result<Option<Vec<u8>>> {
        let (first, probe) = tenant_span(tenant, seq);
        let pending = self
            .blocks
            .range(first..=probe)
            .next_back()
            .map(|(k, _)| k.clone());
        let stored = s.tenant_block_of(tenant, seq)?;
        // A block changed already is taken as it will be, not as it is stored.
        Ok(match (stored, pending) {
            (Some((key, seqs)), pending) if pending.as_ref().is_none_or(|p| *p < key) => {
                self.blocks.entry(key.clone()).or_insert(seqs);
                Some(key)
            }
            (_, pending) => pending,
        })
    }

    fn insert(&mut self, s: &Inner, tenant: TenantKey, seq: u64) -> Result<()> {
        let own_key = cat(&[&tenant.0, &seq.to_be_bytes()]);
        let Some(key) = self.block_of(s, tenant, seq)? else {
            self.blocks.insert(own_key, vec![seq]);
            return Ok(());
        };
        let Some(seqs) = self.blocks.get_mut(&key) else {
            return Err(ServiceError::Internal(
                "a tenant job block went missing".into(),
            ));
        };
        let Err(at) = seqs.binary_search(&seq) else {
            return Ok(());
        };
        if seqs.len() < blocks::SEQS_PER_TENANT_BLOCK {
            seqs.insert(at, seq);
        } else {
            // Full: `seq` starts a block of its own, with what comes after it.
            let mut rest = seqs.split_off(at);
            rest.insert(0, seq);
            self.blocks.insert(own_key, rest);
        }
        Ok(())
    }

    fn remove(&mut self, s: &Inner, tenant: TenantKey, seq: u64) -> Result<()> {
        if let Some(key) = self.block_of(s, tenant, seq)? {
            if let Some(seqs) = self.blocks.get_mut(&key) {
                seqs.retain(|&x| x != seq);
            }
        }
        Ok(())
    }

    fn write(&self, tenant_jobs: &TransactionalTree) -> TxResult<()> {
        for (key, seqs) in &self.blocks {
            if seqs.is_empty() {
                tenant_jobs.remove(key.as_slice())?;
            } else {
                tenant_jobs.insert(key.as_slice(), blocks::seqs_bytes(seqs))?;
            }
        }
        Ok(())
    }
}

/// Length of a `chunks` key's owner ‖ hash prefix.
const CHUNK_PREFIX: usize = 16 + 32;
/// Chunk index entries written or deleted per batch: sled holds its process-wide lock for a
/// batch, some milliseconds for this many.
const INDEX_BATCH: usize = 1024;

type TxResult<T> = Result<T, ConflictableTransactionError<ServiceError>>;

/// The `job_counts` key present once the counts are kept with every job write.
const COUNTS_KEPT: &[u8] = b"*kept";

fn read_count(bytes: &[u8]) -> u64 {
    <[u8; 8]>::try_from(bytes).map_or(0, u64::from_be_bytes)
}

/// Adds `delta` to the number of jobs in `status`, in a job write's transaction (sled's
/// transactions take a process-wide lock, so the one hot key costs no retries).
fn count(counts: &TransactionalTree, status: JobStatus, delta: i64) -> TxResult<()> {
    let key = status.as_str().as_bytes();
    let now = counts.get(key)?.map_or(0, |v| read_count(&v));
    counts.insert(key, &now.saturating_add_signed(delta).to_be_bytes())?;
    Ok(())
}

fn chunk_key(owner: &[u8], hash: &Hash, generation: &[u8]) -> Vec<u8> {
    cat(&[owner, hash, generation])
}

impl Inner {
    /// Writes the entries of image `id`'s complete manifest under a new generation, in
    /// batches, after recording them as stale: they count once the manifest's transaction says
    /// so, and a crash before that leaves them to [`Inner::sweep_all`].
    fn write_entries(
        &self,
        owner: TenantKey,
        id: Uuid,
        manifest: &[u8],
        entries: &[(Hash, u32)],
    ) -> Result<[u8; 8]> {
        let generation = self.db.generate_id()?.to_be_bytes();
        self.chunks_stale
            .insert(generation, cat(&[&owner.0, id.as_bytes(), manifest]))?;
        for part in entries.chunks(INDEX_BATCH) {
            let mut batch = sled::Batch::default();
            for (hash, index) in part {
                batch.insert(
                    chunk_key(&owner.0, hash, &generation),
                    cat(&[id.as_bytes(), &index.to_be_bytes()]),
                );
            }
            self.chunks.apply_batch(batch)?;
        }
        Ok(generation)
    }

    /// Deletes the entries of a stale generation, in batches, then its record.
    fn sweep(&self, generation: [u8; 8]) -> Result<()> {
        let Some(record) = self.chunks_stale.get(generation)? else {
            return Ok(());
        };
        let (Some(owner), Some(manifest)) = (record.get(..16), record.get(32..)) else {
            return Err(ServiceError::Internal(
                "corrupt stale chunk index record".into(),
            ));
        };
        match Manifest::decode(manifest) {
            Ok(m) => {
                for part in m.first_indexes().chunks(INDEX_BATCH) {
                    let mut batch = sled::Batch::default();
                    for (hash, _) in part {
                        batch.remove(chunk_key(owner, hash, &generation));
                    }
                    self.chunks.apply_batch(batch)?;
                }
            }
            Err(why) => tracing::warn!(
                "a stale manifest of the chunk index no longer decodes, its entries stay: {}",
                crate::text::escape(&why)
            ),
        }
        self.chunks_stale.remove(generation)?;
        Ok(())
    }

    /// [`Inner::sweep`] after a committed change: a failure leaves the entries (which no longer
    /// count) to the next start.
    fn sweep_quietly(&self, generation: Option<[u8; 8]>) {
        if let Some(generation) = generation {
            if let Err(e) = self.sweep(generation) {
                tracing::warn!("stale chunk index entries stay until the next start: {e}");
            }
        }
    }

    /// Start-up: deletes the stale entries a crash or a failed sweep left.
    /// Counts the jobs of a store written before `job_counts` was kept (once: one scan).
    fn count_jobs_once(&self) -> Result<()> {
        if self.job_counts.contains_key(COUNTS_KEPT)? {
            return Ok(());
        }
        #[derive(serde::Deserialize)]
        struct StatusOnly {
            status: JobStatus,
        }
        let started = Instant::now();
        let mut counts = std::collections::BTreeMap::<JobStatus, u64>::new();
        for block in self.job_blocks.iter().values() {
            for (_, record) in blocks::entries(&block?)? {
                let job: StatusOnly = decode(record)?;
                *counts.entry(job.status).or_default() += 1;
            }
        }
        let mut batch = sled::Batch::default();
        for status in JobStatus::ALL {
            let n = counts.get(&status).copied().unwrap_or(0);
            batch.insert(status.as_str().as_bytes(), &n.to_be_bytes());
        }
        batch.insert(COUNTS_KEPT, &[]);
        self.job_counts.apply_batch(batch)?;
        self.db.flush()?;
        let jobs: u64 = counts.values().sum();
        if jobs == 0 {
            return Ok(());
        }
        tracing::info!(
            jobs,
            took_ms = started.elapsed().as_millis() as u64,
            "counted the jobs by status once (a store from before the counts were kept)"
        );
        Ok(())
    }

    fn sweep_all(&self) -> Result<()> {
        for key in self.chunks_stale.iter().keys() {
            if let Ok(generation) = <[u8; 8]>::try_from(key?.as_ref()) {
                self.sweep(generation)?;
            }
        }
        Ok(())
    }
}

/// Makes image `id`'s chunk index entries stop counting (before its manifest is replaced or
/// removed in the same transaction): their generation becomes stale, with the manifest that
/// lists them. The generation to sweep once the transaction has committed.
fn retire(
    manifests: &TransactionalTree,
    indexed: &TransactionalTree,
    stale: &TransactionalTree,
    id: Uuid,
) -> TxResult<Option<[u8; 8]>> {
    let Some(counted) = indexed.remove(id.as_bytes())? else {
        return Ok(None);
    };
    let (Some(owner), Some(generation)) = (
        counted.get(..16),
        counted.get(16..).and_then(|g| <[u8; 8]>::try_from(g).ok()),
    ) else {
        return Ok(None);
    };
    let manifest = manifests.get(id.as_bytes())?.unwrap_or_default();
    stale.insert(&generation, cat(&[owner, id.as_bytes(), &manifest]))?;
    Ok(Some(generation))
}

/// The chunk index inside a transaction that inserts an image record.
struct TxIndex<'a> {
    manifests: &'a TransactionalTree,
    chunks: &'a TransactionalTree,
    indexed: &'a TransactionalTree,
}

impl TxIndex<'_> {
    /// Indexes a complete manifest stored before its image's record, inside the record's
    /// transaction (no caller stores a manifest before the record today, so this long
    /// transaction is rare).
    fn index_stored(&self, owner: TenantKey, id: Uuid) -> TxResult<()> {
        if self.indexed.get(id.as_bytes())?.is_some() {
            return Ok(());
        }
        let Some(bytes) = self.manifests.get(id.as_bytes())? else {
            return Ok(());
        };
        let m = match Manifest::decode(&bytes) {
            Ok(m) if m.is_complete() => m,
            _ => return Ok(()),
        };
        let generation = self.chunks.generate_id()?.to_be_bytes();
        let mut batch = sled::Batch::default();
        for (hash, index) in m.first_indexes() {
            batch.insert(
                chunk_key(&owner.0, &hash, &generation),
                cat(&[id.as_bytes(), &index.to_be_bytes()]),
            );
        }
        self.chunks.apply_batch(&batch)?;
        self.indexed
            .insert(id.as_bytes(), cat(&[&owner.0, &generation]))?;
        Ok(())
    }
}

/// A job is queued for the worker exactly while it is enqueued and not terminal.
fn sync_queue(
    queue: &TransactionalTree,
    job: &Job,
) -> Result<(), ConflictableTransactionError<ServiceError>> {
    let key = job.seq.to_be_bytes();
    if job.enqueued && !job.wire.status.is_terminal() {
        queue.insert(&key, job.wire.job_id.as_bytes())?;
    } else {
        queue.remove(&key)?;
    }
    Ok(())
}

fn remove_token_tx(
    tokens: &TransactionalTree,
    lookup: &TransactionalTree,
    token: &TokenRecord,
) -> Result<(), ConflictableTransactionError<ServiceError>> {
    tokens.remove(token.info.id.as_bytes())?;
    if let Some(prefix) = token.lookup_key() {
        lookup.remove(cat(&[&prefix, token.info.id.as_bytes()]))?;
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::manifest::{Entry, CHUNK_SIZE};
    use crate::model::ImageStatus;

    const OWNER: &str = "236ae314ef6944f4ab98fa7519e54325";

    fn image() -> Image {
        Image {
            id: Uuid::new_v4(),
            name: "big".into(),
            owner: OWNER.into(),
            region: "r".into(),
            status: ImageStatus::Active,
            disk_format: "raw".into(),
            container_format: "bare".into(),
            size: 0,
            checksum: None,
            os_hash_algo: None,
            os_hash_value: None,
            created_at: 1,
            updated_at: 1,
            meta: Default::default(),
        }
    }

    /// The complete manifest of an image of `chunks` data chunks, all different.
    fn all_data(chunks: usize, seed: u64) -> Vec<u8> {
        let entries = (0..chunks as u64)
            .map(|i| {
                Entry::Data(
                    *blake3::hash(&[seed.to_le_bytes(), i.to_le_bytes()].concat()).as_bytes(),
                )
            })
            .collect();
        let size = (chunks * CHUNK_SIZE) as u64;
        crate::manifest::complete(size, Some("ab".repeat(64)), entries).encode()
    }

    /// Opens the store at `dir` again, waiting for a store just dropped to let go of sled's
    /// lock (its flusher thread holds it a moment longer).
    pub(in crate::store) fn reopen(dir: &Path) -> SledStore {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match SledStore::open(dir, "test-node") {
                Err(OpenError::Locked(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                other => return other.expect("reopen"),
            }
        }
    }

    #[test]
    fn a_store_with_one_key_per_job_is_moved_into_blocks_at_open() {
        use crate::store::contract::job;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = reopen(dir.path());
        const OTHER: &str = "5d9a3f0e2b7c4c1e9f3a7e6b1d2c4a5f";
        // 2,500 jobs (more than one chunk of the move) of two tenants, as the layout before
        // the blocks kept them: one key per job in three trees, records in format 1.
        let jobs: Vec<(TenantKey, Job)> = (0..2500)
            .map(|i| {
                let status = [JobStatus::Replicated, JobStatus::ReplicateRequested][i % 2];
                job(&store, if i % 3 == 0 { OTHER } else { OWNER }, status)
            })
            .collect();
        {
            let inner = store.current().expect("open");
            let tree = |name: &str| inner.db.open_tree(name).expect("tree");
            let (old, by_seq, by_tenant) =
                (tree("jobs"), tree("jobs_by_seq"), tree("jobs_by_tenant"));
            for (tenant, j) in &jobs {
                let id = j.wire.job_id;
                old.insert(id.as_bytes(), encode(j).expect("encode"))
                    .expect("insert");
                by_seq
                    .insert(j.seq.to_be_bytes(), id.as_bytes())
                    .expect("insert");
                by_tenant
                    .insert(cat(&[&tenant.0, &j.seq.to_be_bytes()]), id.as_bytes())
                    .expect("insert");
                if j.wire.status == JobStatus::ReplicateRequested {
                    inner
                        .queue
                        .insert(j.seq.to_be_bytes(), id.as_bytes())
                        .expect("queue");
                }
            }
            inner.job_counts.clear().expect("no counts yet");
        }
        drop(store);
        let store = reopen(dir.path());
        let all = store.jobs(&JobQuery::all(None), &|_| true).expect("all");
        assert_eq!(all.len(), 2500);
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "in order");
        assert_eq!(all, jobs.iter().map(|(_, j)| j.clone()).collect::<Vec<_>>());
        let other = store
            .jobs(&JobQuery::all(TenantKey::parse(OTHER)), &|_| true)
            .expect("other's");
        assert_eq!(other.len(), 834);
        let (_, one) = &jobs[1234];
        assert_eq!(store.job(one.wire.job_id).expect("job").as_ref(), Some(one));
        assert_eq!(store.queued().expect("queue").len(), 1250);
        let counts = store.job_status_counts().expect("counts");
        assert_eq!(counts.get(&JobStatus::Replicated), Some(&1250));
        assert_eq!(counts.get(&JobStatus::ReplicateRequested), Some(&1250));
        let names = store.current().expect("open").db.tree_names();
        assert!(
            !names.iter().any(|n| n.as_ref() == b"jobs"),
            "the old trees go"
        );
        let last = jobs.iter().map(|(_, j)| j.seq).max().expect("jobs");
        assert!(
            store.next_seq().expect("seq") > last,
            "new jobs come after the moved ones"
        );
        assert!(!dir.path().join("db.moving").exists());
        assert!(!dir.path().join("db.before-blocks").exists());
    }

    #[test]
    fn a_store_from_before_the_counts_is_counted_once_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = reopen(dir.path());
        let jobs = [
            crate::store::contract::job(&store, OWNER, JobStatus::Replicated),
            crate::store::contract::job(&store, OWNER, JobStatus::Replicated),
            crate::store::contract::job(&store, OWNER, JobStatus::Error),
        ];
        store.insert_jobs(&jobs).expect("insert");
        // What a binary from before the counts left: no job_counts at all.
        store
            .current()
            .expect("open")
            .job_counts
            .clear()
            .expect("clear");
        drop(store);
        let store = reopen(dir.path());
        let counts = store.job_status_counts().expect("counts");
        assert_eq!(counts.get(&JobStatus::Replicated), Some(&2));
        assert_eq!(counts.get(&JobStatus::Error), Some(&1));
        assert_eq!(counts.len(), 2, "{counts:?}");
        // Kept from then on, without another scan.
        store
            .update_job(jobs[2].1.wire.job_id, &|j| {
                j.wire.status = JobStatus::Replicated;
                Ok(ImageChange::None)
            })
            .expect("update");
        let counts = store.job_status_counts().expect("counts");
        assert_eq!(counts.get(&JobStatus::Replicated), Some(&3));
        assert_eq!(counts.get(&JobStatus::Error), None);
    }

    #[test]
    fn entries_a_crash_left_never_count_and_go_at_the_next_start() {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = TenantKey::parse(OWNER).expect("key");
        let image = image();
        let bytes = all_data(4, 1);
        let Entry::Data(hash) = Manifest::decode(&bytes).expect("decode").chunks[0] else {
            unreachable!()
        };
        {
            let store = SledStore::open(dir.path(), "test-node").expect("open");
            store.insert_image(key, &image).expect("insert");
            // A put that a crash stopped after its entries, before its transaction.
            let inner = store.current().expect("inner");
            let m = Manifest::decode(&bytes).expect("decode");
            inner
                .write_entries(key, image.id, &bytes, &m.first_indexes())
                .expect("entries");
            assert_eq!(inner.chunks.len(), 4);
            assert!(store
                .chunk_holders(key, &hash, 4)
                .expect("holders")
                .is_empty());
            store.flush().expect("flush");
        }
        let store = reopen(dir.path());
        let inner = store.current().expect("inner");
        assert_eq!(inner.chunks.len(), 0, "swept at the start");
        assert!(inner.chunks_stale.is_empty());
        // Replaced and removed manifests leave nothing behind either.
        store.put_manifest(image.id, &bytes).expect("put");
        assert_eq!(
            store.chunk_holders(key, &hash, 4).expect("holders"),
            vec![(image.id, 0)]
        );
        store
            .put_manifest(image.id, &bytes)
            .expect("the same again");
        assert_eq!(inner.chunks.len(), 4);
        store
            .put_manifest(image.id, &all_data(4, 2))
            .expect("replace");
        assert_eq!(inner.chunks.len(), 4);
        assert!(store
            .chunk_holders(key, &hash, 4)
            .expect("holders")
            .is_empty());
        store.remove_image(key, image.id).expect("remove");
        assert_eq!(inner.chunks.len(), 0);
        assert!(inner.chunks_stale.is_empty());
        assert!(inner.chunks_indexed.is_empty());
    }
}
