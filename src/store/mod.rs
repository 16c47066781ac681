//! The appliance's records behind domain-level traits: a [`Registry`] (regions, tenants, users,
//! tokens, image records) and a job repository ([`Jobs`]: jobs, their queue and claims, the
//! change version, orphaned images). [`open`] picks the backend; the embedded default is
//! [`sled`]. Every backend passes the same contract suite (`cargo test contract`).
//!
//! Anything a caller was promised is made durable with [`Repo::flush`] before it is
//! acknowledged. Every call blocks: async callers use `spawn_blocking`.

mod repair;
pub mod sled;

#[cfg(test)]
mod contract;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use uuid::Uuid;

use crate::error::{Result, ServiceError};
use crate::manifest::Hash;
use crate::model::{Image, Job, JobStatus, JobWire, Region, Tenant, TenantKey, TokenRecord, User};

/// Why the store could not be opened.
#[derive(thiserror::Error, Debug)]
pub enum OpenError {
    /// Another process (a running server, or another admin command) has the database open.
    #[error("the store at {0} is in use by another image-replicator process")]
    Locked(String),
    #[error("cannot open the store at {path}: {reason}")]
    Other { path: String, reason: String },
}

/// Opens the store of the data directory `dir`.
pub fn open(dir: &Path) -> std::result::Result<Arc<dyn Repo>, OpenError> {
    Ok(Arc::new(self::sled::SledStore::open(dir)?))
}

/// Everything the appliance keeps.
pub trait Repo: Registry + Jobs {
    /// Makes everything written so far durable, power cuts included.
    fn flush(&self) -> Result<()>;
    /// Whether the store takes writes now; why not (a full disk: a 507).
    fn writable(&self) -> std::result::Result<(), ServiceError>;
}

/// Regions, tenants, users, tokens and the image records of the regions whose records the
/// appliance keeps. Inserts refuse an existing key; a record and its index entries change
/// together.
pub trait Registry: Send + Sync {
    fn region(&self, id: &str) -> Result<Option<Region>>;
    fn regions(&self) -> Result<Vec<Region>>;
    /// Inserts a region unless one with that id exists; whether it was inserted.
    fn insert_region(&self, region: &Region) -> Result<bool>;
    fn remove_region(&self, id: &str) -> Result<()>;

    fn tenant(&self, key: TenantKey) -> Result<Option<Tenant>>;
    fn tenants(&self) -> Result<Vec<Tenant>>;
    /// Inserts a tenant unless one with that key exists; whether it was inserted.
    fn insert_tenant(&self, key: TenantKey, tenant: &Tenant) -> Result<bool>;
    /// Rewrites an existing tenant (its quotas); false if there is no such tenant.
    fn update_tenant(&self, key: TenantKey, tenant: &Tenant) -> Result<bool>;
    fn remove_tenant(&self, key: TenantKey) -> Result<()>;

    fn user(&self, name: &str) -> Result<Option<User>>;
    fn users(&self) -> Result<Vec<User>>;
    /// Inserts a user unless one with that name exists; whether it was inserted.
    fn insert_user(&self, user: &User) -> Result<bool>;
    /// Rewrites an existing user (its tenants, its admin flag); false if there is no such
    /// user (none is created).
    fn update_user(&self, user: &User) -> Result<bool>;
    /// Removes a user and every token of that user together; how many tokens went.
    fn remove_user(&self, name: &str) -> Result<usize>;

    fn token(&self, id: Uuid) -> Result<Option<TokenRecord>>;
    fn tokens(&self) -> Result<Vec<TokenRecord>>;
    /// The tokens that `lookup` (a token's SHA-256) finds (usually none or one): the record
    /// with that lookup, and records whose lookup is the 4-byte prefix of earlier versions.
    fn token_candidates(&self, lookup: &[u8]) -> Result<Vec<TokenRecord>>;
    fn insert_token(&self, token: &TokenRecord, lookup: &[u8]) -> Result<()>;
    /// Rewrites a token record whose lookup did not change (a revoke).
    fn update_token(&self, token: &TokenRecord) -> Result<()>;
    /// Gives token `id` a new lookup, record and index together (a legacy prefix becomes the
    /// full SHA-256); nothing if the token is gone.
    fn set_token_lookup(&self, id: Uuid, lookup: &[u8]) -> Result<()>;

    fn image(&self, id: Uuid) -> Result<Option<Image>>;
    /// Every image, or those of one owner.
    fn images(&self, owner: Option<TenantKey>) -> Result<Vec<Image>>;
    /// Inserts a new image with its owner; a conflict if the id is taken. A complete manifest
    /// stored before the record is indexed now.
    fn insert_image(&self, owner: TenantKey, image: &Image) -> Result<()>;
    /// Rewrites an image whose owner did not change.
    fn update_image(&self, image: &Image) -> Result<()>;
    /// Removes an image record, its owner index entry, its manifest and its chunk index
    /// entries.
    fn remove_image(&self, owner: TenantKey, id: Uuid) -> Result<()>;
    /// The encoded chunk manifest of image `id` ([`crate::manifest`]): complete, or the
    /// partial one of a copy that is writing it.
    fn manifest(&self, id: Uuid) -> Result<Option<Vec<u8>>>;
    /// Stores image `id`'s manifest, replacing the one before. A complete manifest
    /// ([`Manifest::is_complete`](crate::manifest::Manifest::is_complete)) of an image with a
    /// record goes into the chunk index under the record's owner, together with the manifest;
    /// the entries of the one it replaces go (a partial one, or bytes that do not decode, are
    /// stored and not indexed).
    fn put_manifest(&self, id: Uuid, manifest: &[u8]) -> Result<()>;
    /// Removes image `id`'s manifest and its chunk index entries.
    fn remove_manifest(&self, id: Uuid) -> Result<()>;
    /// The chunk index: images of `owner` whose complete manifest lists a data chunk with
    /// BLAKE3 `hash` (holes are not indexed), each with the first chunk index that has it; at
    /// most `limit`. Only within one owner: across tenants it would tell one tenant whether
    /// another holds some data. An image inserted after its complete manifest was stored is
    /// indexed by its insert.
    fn chunk_holders(
        &self,
        owner: TenantKey,
        hash: &Hash,
        limit: usize,
    ) -> Result<Vec<(Uuid, u32)>>;
}

/// Which jobs a listing wants: of one source tenant or of all, in creation order after the
/// job with sequence number `after`, at most `limit`.
#[derive(Clone, Copy, Debug)]
pub struct JobQuery {
    pub tenant: Option<TenantKey>,
    pub after: Option<u64>,
    pub limit: usize,
}

impl JobQuery {
    /// Every job of `tenant` (or of all).
    pub fn all(tenant: Option<TenantKey>) -> JobQuery {
        JobQuery {
            tenant,
            after: None,
            limit: usize::MAX,
        }
    }
}

/// What a job update does to an image in the same transaction.
pub enum ImageChange {
    None,
    /// A new image (the destination of a copy), with its owner's key.
    Insert(TenantKey, Image),
    /// Rewrites an existing image (same owner).
    Put(Image),
    /// Removes an image record, its owner index entry, its manifest and its chunk index
    /// entries.
    Remove(TenantKey, Uuid),
}

/// The job repository. A job is queued for the worker exactly while it is enqueued and not
/// terminal; a queued job is worked on by whoever claimed it, until released.
pub trait Jobs: Send + Sync {
    /// A new, strictly increasing sequence number (creation order of jobs).
    fn next_seq(&self) -> Result<u64>;
    fn job(&self, id: Uuid) -> Result<Option<Job>>;
    /// Inserts jobs with their indexes, all or none. A job whose id exists already is left
    /// alone if identical in its wire fields, and a conflict otherwise. How many were new.
    fn insert_jobs(&self, jobs: &[(TenantKey, Job)]) -> Result<usize>;
    /// Applies `change` to a job and the image change it returns, together, keeping the queue
    /// in step. `change` may refuse with an error: then nothing is written. It may run more
    /// than once. `None` if there is no such job.
    fn update_job(
        &self,
        id: Uuid,
        change: &dyn Fn(&mut Job) -> Result<ImageChange>,
    ) -> Result<Option<Job>>;
    /// The jobs of `query` that pass `keep`.
    fn jobs(&self, query: &JobQuery, keep: &dyn Fn(&Job) -> bool) -> Result<Vec<Job>>;
    /// [`Jobs::jobs`] with only the API's ten keys (cheaper).
    fn job_wires(&self, query: &JobQuery, keep: &dyn Fn(&JobWire) -> bool) -> Result<Vec<JobWire>>;
    /// Removes the jobs of `ids` that pass `only` (checked again in the same transaction),
    /// each with its index entries and queue entry, all in one transaction; the ids removed.
    /// An id with no job is left out. What is derived from jobs changes with them.
    fn remove_jobs(&self, ids: &[Uuid], only: &dyn Fn(&Job) -> bool) -> Result<Vec<Uuid>>;
    /// How many jobs there are in each status.
    fn job_status_counts(&self) -> Result<BTreeMap<JobStatus, u64>>;
    /// A job that names `key` as its source or destination tenant (`id_as_stored` is the
    /// tenant's id as its record spells it).
    fn tenant_has_jobs(&self, key: TenantKey, id_as_stored: &str) -> Result<Option<Uuid>>;
    /// Changes whenever a job changes (after the write has committed): what is derived from
    /// jobs (list bodies, counts) is valid while it stays the same.
    fn jobs_version(&self) -> u64;

    /// Ids of the queued jobs, oldest first.
    fn queued(&self) -> Result<Vec<Uuid>>;
    /// Takes a queued job for this worker; false if another worker has it.
    fn claim(&self, id: Uuid) -> Result<bool>;
    /// Gives a claimed job back.
    fn release(&self, id: Uuid);
    /// Removes the queue entry of a job whose record is gone (only after corruption).
    fn drop_queue_entry(&self, id: Uuid) -> Result<()>;

    /// Remembers a destination image that a region must still delete.
    fn add_orphan(&self, id: Uuid, region: &str) -> Result<()>;
    fn orphans(&self) -> Result<Vec<(Uuid, String)>>;
    fn remove_orphan(&self, id: Uuid) -> Result<()>;
}
