//! The sled store: one tree per record kind plus index trees.
//!
//! Keys:
//! - `regions`: region id; `users`: user name; `tenants`: [`TenantKey`] bytes
//! - `tokens`: token id (16 bytes); `token_lookup`: lookup bytes ‖ token id → (), the lookup
//!   being the token's SHA-256 (32 bytes; 4 in records written before, until first use)
//! - `images`: image id; `images_by_tenant`: owner key ‖ image id → ()
//! - `jobs`: job id; `jobs_by_seq`: seq (u64 BE) → job id;
//!   `jobs_by_tenant`: source tenant key ‖ seq (u64 BE) → job id
//! - `queue`: seq (u64 BE) → job id, for every job the replication worker still has to act on
//!   (enqueued and not terminal); kept in step with the job in the same transaction
//!
//! Values are a format version byte followed by JSON. A record and its index entries are always
//! written in one transaction, so an index never points at nothing.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::{Transactional, Tree};
use uuid::Uuid;

use crate::error::{Result, ServiceError};
use crate::model::{Image, Job, Region, Tenant, TenantKey, TokenRecord, User};

const FORMAT_VERSION: u8 = 1;
/// sled's page cache (its default is 1 GiB, far beyond what an appliance at the edge spares).
const CACHE_BYTES: u64 = 16 << 20;

/// Why the store could not be opened.
#[derive(thiserror::Error, Debug)]
pub enum OpenError {
    /// Another process (a running server, or another admin command) has the database open.
    #[error("the store at {0} is in use by another image-replicator process")]
    Locked(String),
    #[error("cannot open the store at {path}: {reason}")]
    Other { path: String, reason: String },
}

pub struct Store {
    db: sled::Db,
    regions: Tree,
    tenants: Tree,
    users: Tree,
    tokens: Tree,
    token_lookup: Tree,
    images: Tree,
    images_by_tenant: Tree,
    jobs: Tree,
    jobs_by_seq: Tree,
    jobs_by_tenant: Tree,
    queue: Tree,
    /// Images in Glance regions that a job created and could not delete yet: id → region id.
    orphans: Tree,
    durability: Durability,
    /// Bumped after every committed change to a job: readers that cache what they derive from
    /// jobs (list bodies, status counts) compare it before and after.
    jobs_version: AtomicU64,
}

/// sled 0.34 makes its log stable with `sync_file_range`, which neither writes the file's
/// metadata nor flushes the drive's write cache: enough for a process crash, not for a power
/// cut. So after sled's flush the log file is also `fdatasync`ed. Concurrent callers share
/// one sync: whoever holds the lock syncs for everyone who had finished writing before it.
struct Durability {
    log: std::fs::File,
    /// Callers that finished their sled flush so far.
    written: AtomicU64,
    /// How many of those the last completed `fdatasync` covered.
    synced: std::sync::Mutex<u64>,
}

impl Durability {
    fn sync(&self) -> Result<()> {
        let mine = self.written.fetch_add(1, Ordering::SeqCst) + 1;
        let mut synced = self
            .synced
            .lock()
            .map_err(|_| ServiceError::Internal("the sync lock is poisoned".into()))?;
        if *synced >= mine {
            return Ok(());
        }
        let covered = self.written.load(Ordering::SeqCst);
        self.log
            .sync_data()
            .map_err(|e| ServiceError::internal("cannot sync the store to disk", e))?;
        *synced = covered;
        Ok(())
    }
}

/// What a job update does to an image in the same transaction.
pub enum ImageChange {
    None,
    /// A new image (the destination of a copy), with its owner's key.
    Insert(TenantKey, Image),
    /// Rewrites an existing image (same owner).
    Put(Image),
    /// Removes an image record and its owner index entry.
    Remove(TenantKey, Uuid),
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut out = vec![FORMAT_VERSION];
    serde_json::to_writer(&mut out, value).map_err(|e| ServiceError::internal("encode", e))?;
    Ok(out)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, body)) => {
            serde_json::from_slice(body).map_err(|e| ServiceError::internal("corrupt record", e))
        }
        Some((version, _)) => Err(ServiceError::Internal(format!(
            "record has format version {version}, this binary reads {FORMAT_VERSION}"
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

fn tx_encode<T: Serialize>(
    value: &T,
) -> Result<Vec<u8>, ConflictableTransactionError<ServiceError>> {
    encode(value).map_err(abort)
}

impl Store {
    pub fn open(dir: &Path) -> std::result::Result<Store, OpenError> {
        let path = dir.join("db");
        let shown = path.display().to_string();
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(|e| {
            let text = e.to_string();
            let locked = matches!(&e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock)
                || text.contains("could not acquire lock");
            if locked {
                OpenError::Locked(shown.clone())
            } else {
                OpenError::Other {
                    path: shown.clone(),
                    reason: text,
                }
            }
        })?;
        let tree = |name: &str| {
            db.open_tree(name).map_err(|e| OpenError::Other {
                path: shown.clone(),
                reason: e.to_string(),
            })
        };
        let log = std::fs::File::open(path.join("db")).map_err(|e| OpenError::Other {
            path: shown.clone(),
            reason: format!("cannot open its log for syncing: {e}"),
        })?;
        Ok(Store {
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
            jobs: tree("jobs")?,
            jobs_by_seq: tree("jobs_by_seq")?,
            jobs_by_tenant: tree("jobs_by_tenant")?,
            queue: tree("queue")?,
            orphans: tree("orphans")?,
            jobs_version: Default::default(),
            db,
        })
    }

    /// Makes everything written so far durable, power cuts included.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        self.durability.sync()
    }

    /// A new, strictly increasing sequence number (creation order of jobs).
    pub fn next_seq(&self) -> Result<u64> {
        Ok(self.db.generate_id()?)
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

    fn put<T: Serialize>(tree: &Tree, key: &[u8], value: &T) -> Result<()> {
        tree.insert(key, encode(value)?)?;
        Ok(())
    }

    // ----- regions, tenants, users: one tree each, no index -----

    pub fn region(&self, id: &str) -> Result<Option<Region>> {
        Self::get(&self.regions, id.as_bytes())
    }
    pub fn regions(&self) -> Result<Vec<Region>> {
        Self::all(&self.regions)
    }
    /// Inserts a region unless one with that id exists; returns whether it was inserted.
    pub fn insert_region(&self, region: &Region) -> Result<bool> {
        let swapped = self.regions.compare_and_swap(
            region.id.as_bytes(),
            None as Option<&[u8]>,
            Some(encode(region)?),
        )?;
        Ok(swapped.is_ok())
    }
    pub fn remove_region(&self, id: &str) -> Result<()> {
        self.regions.remove(id.as_bytes())?;
        Ok(())
    }

    pub fn tenant(&self, key: TenantKey) -> Result<Option<Tenant>> {
        Self::get(&self.tenants, &key.0)
    }
    pub fn tenants(&self) -> Result<Vec<Tenant>> {
        Self::all(&self.tenants)
    }
    pub fn insert_tenant(&self, key: TenantKey, tenant: &Tenant) -> Result<bool> {
        let swapped =
            self.tenants
                .compare_and_swap(key.0, None as Option<&[u8]>, Some(encode(tenant)?))?;
        Ok(swapped.is_ok())
    }
    pub fn remove_tenant(&self, key: TenantKey) -> Result<()> {
        self.tenants.remove(key.0)?;
        Ok(())
    }

    pub fn user(&self, name: &str) -> Result<Option<User>> {
        Self::get(&self.users, name.as_bytes())
    }
    pub fn users(&self) -> Result<Vec<User>> {
        Self::all(&self.users)
    }
    pub fn insert_user(&self, user: &User) -> Result<bool> {
        let swapped = self.users.compare_and_swap(
            user.name.as_bytes(),
            None as Option<&[u8]>,
            Some(encode(user)?),
        )?;
        Ok(swapped.is_ok())
    }

    /// Removes a user and every token of that user in one transaction.
    pub fn remove_user(&self, name: &str) -> Result<usize> {
        let tokens: Vec<TokenRecord> = self
            .tokens()?
            .into_iter()
            .filter(|t| t.user == name)
            .collect();
        tx_result((&self.users, &self.tokens, &self.token_lookup).transaction(
            |(users, tok, look)| {
                users.remove(name.as_bytes())?;
                for t in &tokens {
                    remove_token_tx(tok, look, t)?;
                }
                Ok(())
            },
        ))?;
        Ok(tokens.len())
    }

    // ----- tokens -----

    pub fn token(&self, id: Uuid) -> Result<Option<TokenRecord>> {
        Self::get(&self.tokens, id.as_bytes())
    }
    pub fn tokens(&self) -> Result<Vec<TokenRecord>> {
        Self::all(&self.tokens)
    }

    /// Tokens that `lookup` (a token's full SHA-256) finds: the record with that lookup, and
    /// records with the 4-byte lookup of earlier versions that is its prefix (usually none).
    pub fn token_candidates(&self, lookup: &[u8]) -> Result<Vec<TokenRecord>> {
        const ID_LEN: usize = 16;
        let prefix = lookup
            .get(..crate::auth::LEGACY_LOOKUP_LEN)
            .unwrap_or(lookup);
        let mut out = Vec::new();
        for entry in self.token_lookup.scan_prefix(prefix) {
            let (key, _) = entry?;
            let Some(split) = key.len().checked_sub(ID_LEN) else {
                continue;
            };
            let (entry_lookup, id) = key.split_at(split);
            let found = entry_lookup == lookup
                || (entry_lookup.len() == crate::auth::LEGACY_LOOKUP_LEN
                    && lookup.starts_with(entry_lookup));
            if !found {
                continue;
            }
            if let Some(token) = Self::get(&self.tokens, id)? {
                out.push(token);
            }
        }
        Ok(out)
    }

    pub fn insert_token(&self, token: &TokenRecord, lookup: &[u8]) -> Result<()> {
        tx_result(
            (&self.tokens, &self.token_lookup).transaction(|(tok, look)| {
                tok.insert(token.id.as_bytes(), tx_encode(token)?)?;
                look.insert(cat(&[lookup, token.id.as_bytes()]), &[])?;
                Ok(())
            }),
        )
    }

    /// Gives token `id` a new lookup (its full SHA-256, replacing a legacy prefix): record and
    /// index entry in one transaction. Nothing happens if the token is gone.
    pub fn set_token_lookup(&self, id: Uuid, lookup: &[u8]) -> Result<()> {
        tx_result(
            (&self.tokens, &self.token_lookup).transaction(|(tok, look)| {
                let Some(value) = tok.get(id.as_bytes())? else {
                    return Ok(());
                };
                let mut token: TokenRecord =
                    decode(&value).map_err(ConflictableTransactionError::Abort)?;
                if let Some(old) = crate::auth::lookup_from_hex(&token.lookup) {
                    look.remove(cat(&[&old, id.as_bytes()]))?;
                }
                token.lookup = crate::auth::to_hex(lookup);
                tok.insert(id.as_bytes(), tx_encode(&token)?)?;
                look.insert(cat(&[lookup, id.as_bytes()]), &[])?;
                Ok(())
            }),
        )
    }

    /// Rewrites a token record whose lookup did not change (a revoke).
    pub fn update_token(&self, token: &TokenRecord) -> Result<()> {
        Self::put(&self.tokens, token.id.as_bytes(), token)
    }

    // ----- images -----

    pub fn image(&self, id: Uuid) -> Result<Option<Image>> {
        Self::get(&self.images, id.as_bytes())
    }

    pub fn images(&self, owner: Option<TenantKey>) -> Result<Vec<Image>> {
        let Some(owner) = owner else {
            return Self::all(&self.images);
        };
        let mut out = Vec::new();
        for entry in self.images_by_tenant.scan_prefix(owner.0) {
            let (key, _) = entry?;
            if let Some(image) = Self::get(&self.images, key.get(16..).unwrap_or_default())? {
                out.push(image);
            }
        }
        Ok(out)
    }

    /// Inserts a new image with its owner index entry; fails if the id is taken.
    pub fn insert_image(&self, owner: TenantKey, image: &Image) -> Result<()> {
        tx_result(
            (&self.images, &self.images_by_tenant).transaction(|(images, by_tenant)| {
                if images.get(image.id.as_bytes())?.is_some() {
                    return Err(abort(ServiceError::Conflict(format!(
                        "an image with id {} already exists",
                        image.id
                    ))));
                }
                images.insert(image.id.as_bytes(), tx_encode(image)?)?;
                by_tenant.insert(cat(&[&owner.0, image.id.as_bytes()]), &[])?;
                Ok(())
            }),
        )
    }

    /// Rewrites an image whose owner did not change.
    pub fn update_image(&self, image: &Image) -> Result<()> {
        Self::put(&self.images, image.id.as_bytes(), image)
    }

    /// Removes an image record and its owner index entry (an import that failed).
    pub fn remove_image(&self, owner: TenantKey, id: Uuid) -> Result<()> {
        tx_result(
            (&self.images, &self.images_by_tenant).transaction(|(images, by_tenant)| {
                images.remove(id.as_bytes())?;
                by_tenant.remove(cat(&[&owner.0, id.as_bytes()]))?;
                Ok(())
            }),
        )
    }

    // ----- orphans -----

    /// Remembers an image in a Glance region that must still be deleted.
    pub fn add_orphan(&self, id: Uuid, region: &str) -> Result<()> {
        self.orphans.insert(id.as_bytes(), region.as_bytes())?;
        Ok(())
    }

    pub fn orphans(&self) -> Result<Vec<(Uuid, String)>> {
        let mut out = Vec::new();
        for entry in self.orphans.iter() {
            let (key, value) = entry?;
            let id =
                Uuid::from_slice(&key).map_err(|e| ServiceError::internal("corrupt orphan", e))?;
            out.push((id, String::from_utf8_lossy(&value).into_owned()));
        }
        Ok(out)
    }

    pub fn remove_orphan(&self, id: Uuid) -> Result<()> {
        self.orphans.remove(id.as_bytes())?;
        Ok(())
    }

    // ----- jobs -----

    /// Changes whenever a job changes (see the field).
    pub fn jobs_version(&self) -> u64 {
        self.jobs_version.load(Ordering::SeqCst)
    }

    /// Called only after a job write has committed, so a reader that saw the old version
    /// cannot have cached what the write replaced under the new one.
    fn jobs_changed(&self) {
        self.jobs_version.fetch_add(1, Ordering::SeqCst);
    }

    pub fn job(&self, id: Uuid) -> Result<Option<Job>> {
        Self::get(&self.jobs, id.as_bytes())
    }

    /// Applies `change` to a job and the image change it returns, in one transaction that also
    /// keeps the work queue in step. `change` may refuse with an error; then nothing is written.
    /// It may run more than once (sled retries conflicting transactions).
    pub fn update_job(
        &self,
        id: Uuid,
        change: impl Fn(&mut Job) -> Result<ImageChange>,
    ) -> Result<Option<Job>> {
        let job = tx_result(
            (
                &self.jobs,
                &self.queue,
                &self.images,
                &self.images_by_tenant,
            )
                .transaction(|(jobs, queue, images, by_tenant)| {
                    let Some(old) = jobs.get(id.as_bytes())? else {
                        return Ok(None);
                    };
                    let mut job: Job = decode(&old).map_err(abort)?;
                    match change(&mut job).map_err(abort)? {
                        ImageChange::None => {}
                        ImageChange::Insert(owner, image) => {
                            images.insert(image.id.as_bytes(), tx_encode(&image)?)?;
                            by_tenant.insert(cat(&[&owner.0, image.id.as_bytes()]), &[])?;
                        }
                        ImageChange::Put(image) => {
                            images.insert(image.id.as_bytes(), tx_encode(&image)?)?;
                        }
                        ImageChange::Remove(owner, image_id) => {
                            images.remove(image_id.as_bytes())?;
                            by_tenant.remove(cat(&[&owner.0, image_id.as_bytes()]))?;
                        }
                    }
                    jobs.insert(id.as_bytes(), tx_encode(&job)?)?;
                    sync_queue(queue, &job)?;
                    Ok(Some(job))
                }),
        )?;
        if job.is_some() {
            self.jobs_changed();
        }
        Ok(job)
    }

    /// Ids of the jobs the worker has to act on, oldest first.
    pub fn queued(&self) -> impl Iterator<Item = Result<Uuid>> + '_ {
        self.queue.iter().values().map(|v| {
            let v = v?;
            Uuid::from_slice(&v).map_err(|e| ServiceError::internal("corrupt queue entry", e))
        })
    }

    /// Removes the queue entry of a job whose record is gone (only after corruption).
    pub fn drop_queue_entry(&self, id: Uuid) -> Result<()> {
        for entry in self.queue.iter() {
            let (key, value) = entry?;
            if value.as_ref() == id.as_bytes() {
                self.queue.remove(key)?;
            }
        }
        Ok(())
    }

    /// Images in the `saving` state (a crash interrupted their import or copy).
    pub fn images_saving(&self) -> Result<Vec<Image>> {
        Ok(self
            .images(None)?
            .into_iter()
            .filter(|i| i.status == crate::model::ImageStatus::Saving)
            .collect())
    }

    /// Inserts jobs with their index entries in one transaction. A job whose id exists already
    /// is left alone if identical in its wire fields, and is an error otherwise.
    /// Returns how many were inserted.
    pub fn insert_jobs(&self, jobs: &[(TenantKey, Job)]) -> Result<usize> {
        let inserted = tx_result(
            (
                &self.jobs,
                &self.jobs_by_seq,
                &self.jobs_by_tenant,
                &self.queue,
            )
                .transaction(|(tx_jobs, by_seq, by_tenant, queue)| {
                    let mut inserted = 0;
                    for (tenant, job) in jobs {
                        let id = job.wire.job_id;
                        if let Some(old) = tx_jobs.get(id.as_bytes())? {
                            let old: Job = decode(&old).map_err(abort)?;
                            if old.wire == job.wire {
                                continue;
                            }
                            return Err(abort(ServiceError::Conflict(format!(
                                "job {id} already exists with different content"
                            ))));
                        }
                        let seq = job.seq.to_be_bytes();
                        tx_jobs.insert(id.as_bytes(), tx_encode(job)?)?;
                        by_seq.insert(&seq, id.as_bytes())?;
                        by_tenant.insert(cat(&[&tenant.0, &seq]), id.as_bytes())?;
                        sync_queue(queue, job)?;
                        inserted += 1;
                    }
                    Ok(inserted)
                }),
        )?;
        if inserted > 0 {
            self.jobs_changed();
        }
        Ok(inserted)
    }

    /// Jobs in creation order, of one source tenant or of all, after the job with sequence
    /// number `after`, that pass `keep`, at most `limit` of them. `T` is [`Job`], or
    /// [`JobWire`](crate::model::JobWire) when only the API's ten keys are needed (cheaper).
    pub fn jobs<T: DeserializeOwned>(
        &self,
        tenant: Option<TenantKey>,
        after: Option<u64>,
        keep: impl Fn(&T) -> bool,
        limit: usize,
    ) -> Result<Vec<T>> {
        let start = after.map_or(0, |s| s.saturating_add(1));
        if after == Some(u64::MAX) {
            return Ok(Vec::new());
        }
        let ids = match tenant {
            Some(t) => self
                .jobs_by_tenant
                .range(cat(&[&t.0, &start.to_be_bytes()])..=cat(&[&t.0, &u64::MAX.to_be_bytes()])),
            None => self.jobs_by_seq.range(start.to_be_bytes()..),
        };
        let mut out = Vec::new();
        for entry in ids {
            if out.len() >= limit {
                break;
            }
            let (_, id) = entry?;
            if let Some(job) = Self::get::<T>(&self.jobs, &id)? {
                if keep(&job) {
                    out.push(job);
                }
            }
        }
        Ok(out)
    }

    /// How many jobs there are in each status. Decodes only the status of each record.
    pub fn job_status_counts(
        &self,
    ) -> Result<std::collections::BTreeMap<crate::model::JobStatus, u64>> {
        #[derive(serde::Deserialize)]
        struct StatusOnly {
            status: crate::model::JobStatus,
        }
        let mut counts = std::collections::BTreeMap::new();
        for value in self.jobs.iter().values() {
            let job: StatusOnly = decode(&value?)?;
            *counts.entry(job.status).or_default() += 1;
        }
        Ok(counts)
    }

    /// Whether any job names `key` as its source or destination tenant.
    pub fn tenant_has_jobs(&self, key: TenantKey, id_as_stored: &str) -> Result<Option<Uuid>> {
        if let Some(entry) = self.jobs_by_tenant.scan_prefix(key.0).next() {
            let (_, id) = entry?;
            return Ok(Uuid::from_slice(&id).ok());
        }
        for value in self.jobs.iter().values() {
            let job: Job = decode(&value?)?;
            let dst = &job.wire.destination_tenant_id;
            if dst == id_as_stored || TenantKey::parse(dst) == Some(key) {
                return Ok(Some(job.wire.job_id));
            }
        }
        Ok(None)
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
    tokens.remove(token.id.as_bytes())?;
    if let Some(prefix) = crate::auth::lookup_from_hex(&token.lookup) {
        lookup.remove(cat(&[&prefix, token.id.as_bytes()]))?;
    }
    Ok(())
}
