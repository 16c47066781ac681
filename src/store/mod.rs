//! The appliance's records behind domain-level traits: a [`Registry`] (regions, tenants, users,
//! tokens, image records) and a job repository ([`Jobs`]: jobs, their queue and claims, the
//! change version, orphaned images). [`open`] picks the backend; the embedded default is
//! [`sled`]. Every backend passes the same contract suite (`cargo test contract`).
//!
//! Anything a caller was promised is made durable with [`Repo::flush`] before it is
//! acknowledged. Every call blocks: async callers use `spawn_blocking`.

pub mod postgres;
pub use postgres::redacted;
mod repair;
pub mod sled;

#[cfg(test)]
mod contract;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
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

/// Which store an appliance opens, and as whom.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// `postgres://…`: the records are in that PostgreSQL database, which several
    /// appliances may share. `None`: in sled, in the data directory.
    pub database_url: Option<String>,
    /// PEM certificates the database's TLS certificate may chain to, besides the system's
    /// roots (`--database-ca-file`; it turns TLS on).
    pub database_ca_file: Option<PathBuf>,
    /// Connections to PostgreSQL.
    pub pool: usize,
    /// This appliance's name, the holder of its claims.
    pub node: String,
}

impl StoreConfig {
    /// The sled store in the data directory, opened by this host.
    pub fn embedded() -> StoreConfig {
        StoreConfig {
            database_url: None,
            database_ca_file: None,
            pool: DEFAULT_POOL,
            node: host_name(),
        }
    }
}

/// Connections to PostgreSQL unless `--database-pool` says otherwise.
pub const DEFAULT_POOL: usize = 16;

/// This machine's host name: the default node name.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer given.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..len]) {
        Ok(name) if ok && !name.is_empty() => name.to_string(),
        _ => "localhost".to_string(),
    }
}

/// Opens the store: sled in the data directory `dir`, or the PostgreSQL database.
pub fn open(dir: &Path, config: &StoreConfig) -> std::result::Result<Arc<dyn Repo>, OpenError> {
    match &config.database_url {
        None => Ok(Arc::new(self::sled::SledStore::open(dir, &config.node)?)),
        Some(url) => Ok(Arc::new(self::postgres::PgStore::connect(
            url,
            config.pool,
            &config.node,
            config.database_ca_file.as_deref(),
        )?)),
    }
}

/// How long a claim on a queued job lasts unless its appliance renews it; a claim not renewed
/// for this long is taken over by another appliance of the same store.
pub const LEASE: Duration = Duration::from_secs(10);
/// How often an appliance renews its claims (and learns of cancels asked elsewhere).
pub const RENEW_EVERY: Duration = Duration::from_millis(500);

/// Everything the appliance keeps.
pub trait Repo: Registry + Jobs {
    /// Makes everything written so far durable, power cuts included.
    fn flush(&self) -> Result<()>;
    /// Whether the store takes writes now; why not (a full disk: a 507).
    fn writable(&self) -> std::result::Result<(), ServiceError>;
    /// This appliance's name (`serve --node-name`): the holder of the claims it makes.
    fn node(&self) -> &str;
    /// Whether other appliances may use the store at the same time (PostgreSQL): then what
    /// looks abandoned at start-up may be another appliance's work in progress.
    fn shared(&self) -> bool {
        false
    }
    /// Takes lock `what`, held until the guard goes: a process's own lock orders its work,
    /// this one that of every appliance sharing the store (PostgreSQL). sled: nothing to take.
    fn lock(&self, _what: Exclusive) -> Result<StoreLock<'_>> {
        Ok(StoreLock::none())
    }
    /// What a copy request reads before its job is made, with the job's sequence number: one
    /// round trip on PostgreSQL instead of four.
    fn copy_inputs(&self, image: Uuid, tenant: TenantKey) -> Result<CopyInputs> {
        let image = self.image(image)?;
        let tenant = self.tenant(tenant)?;
        let mut regions = Vec::new();
        for id in image
            .iter()
            .map(|i| &i.region)
            .chain(tenant.iter().map(|t| &t.region))
        {
            if !regions.iter().any(|r: &Region| &r.id == id) {
                regions.extend(self.region(id)?);
            }
        }
        Ok(CopyInputs {
            image,
            tenant,
            regions,
            seq: self.next_seq()?,
        })
    }
}

/// What [`Repo::lock`] orders across the appliances of one store.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Exclusive {
    /// A new job checked against its tenants' quotas and stored.
    Quotas,
    /// A `job seed`, from its first insert to its end (its rollback tells its jobs by their
    /// sequence numbers, which another seed's must not interleave).
    Seed,
}

/// A lock held until dropped ([`Repo::lock`]); dropping it releases it.
#[must_use = "the lock goes when the guard does"]
pub struct StoreLock<'a>(Option<Box<dyn FnOnce() + Send + 'a>>);

impl<'a> StoreLock<'a> {
    pub fn none() -> StoreLock<'a> {
        StoreLock(None)
    }

    /// A lock that `release` ends.
    pub fn releasing(release: impl FnOnce() + Send + 'a) -> StoreLock<'a> {
        StoreLock(Some(Box::new(release)))
    }
}

impl Drop for StoreLock<'_> {
    fn drop(&mut self) {
        if let Some(release) = self.0.take() {
            release();
        }
    }
}

/// What [`Repo::copy_inputs`] reads.
#[derive(Debug, PartialEq)]
pub struct CopyInputs {
    pub image: Option<Image>,
    pub tenant: Option<Tenant>,
    /// Those of the image's and the tenant's regions that exist.
    pub regions: Vec<Region>,
    /// From [`Jobs::next_seq`].
    pub seq: u64,
}

/// What [`Registry::token_holder`] reads.
#[derive(Debug, PartialEq)]
pub struct TokenHolder {
    pub token: TokenRecord,
    /// `None`: the token's user is gone.
    pub user: Option<User>,
    /// Whether the token's tenant names a registered tenant.
    pub tenant_exists: bool,
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
    /// Token `id` with its user and whether the tenant it is for exists: what authentication
    /// reads for every request, which PostgreSQL answers in one query instead of three.
    fn token_holder(&self, id: Uuid) -> Result<Option<TokenHolder>> {
        let Some(token) = self.token(id)? else {
            return Ok(None);
        };
        let user = self.user(&token.info.user)?;
        let tenant_exists = match TenantKey::parse(&token.info.tenant) {
            Some(key) => self.tenant(key)?.is_some(),
            None => false,
        };
        Ok(Some(TokenHolder {
            token,
            user,
            tenant_exists,
        }))
    }
    /// [`Registry::token_holder`] for a task of an async runtime: a store whose reads wait
    /// on the network answers without blocking the runtime's worker.
    fn token_holder_async(&self, id: Uuid) -> BoxFuture<'_, Result<Option<TokenHolder>>> {
        Box::pin(std::future::ready(self.token_holder(id)))
    }
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
    /// than once, and on another thread (PostgreSQL runs it in the call's transaction).
    /// `None` if there is no such job.
    fn update_job(
        &self,
        id: Uuid,
        change: &(dyn Fn(&mut Job) -> Result<ImageChange> + Sync),
    ) -> Result<Option<Job>>;
    /// The jobs of `query` that pass `keep`.
    fn jobs(&self, query: &JobQuery, keep: &dyn Fn(&Job) -> bool) -> Result<Vec<Job>>;
    /// [`Jobs::jobs`] with only the API's ten keys (cheaper).
    fn job_wires(&self, query: &JobQuery, keep: &dyn Fn(&JobWire) -> bool) -> Result<Vec<JobWire>>;
    /// Removes the jobs of `ids` that pass `only` (checked again in the same transaction),
    /// each with its index entries and queue entry, all in one transaction; the ids removed.
    /// An id with no job is left out. What is derived from jobs changes with them.
    fn remove_jobs(&self, ids: &[Uuid], only: &(dyn Fn(&Job) -> bool + Sync)) -> Result<Vec<Uuid>>;
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
    /// Claims for a worker of this appliance the oldest queued job that is not in `skip`, has
    /// no live claim (of another worker here, or of another appliance whose lease has not run
    /// out) and touches no region pinned to another node ([`Region::pin`]); its id.
    fn claim_next(&self, skip: &HashSet<Uuid>) -> Result<Option<Uuid>>;
    /// Gives a claimed job back.
    fn release(&self, id: Uuid);
    /// Renews this appliance's claims on the jobs `ids` (those its workers run) for another
    /// [`LEASE`]: the ones it still holds, each with whether a cancel was asked for it (its
    /// status is `cancel_requested` or `canceling`). A claim that ran out and was taken over
    /// is not among them; nor is a claim of this node that no worker runs (left by a process
    /// of the same name that died): it runs out and is taken over.
    fn renew_claims(&self, ids: &[Uuid]) -> Result<Vec<(Uuid, bool)>>;
    /// The node holding job `id`'s live claim, if one does.
    fn holder(&self, id: Uuid) -> Result<Option<String>>;
    /// Removes the queue entry of a job whose record is gone (only after corruption).
    fn drop_queue_entry(&self, id: Uuid) -> Result<()>;

    /// Remembers a destination image that a region must still delete.
    fn add_orphan(&self, id: Uuid, region: &str) -> Result<()>;
    fn orphans(&self) -> Result<Vec<(Uuid, String)>>;
    fn remove_orphan(&self, id: Uuid) -> Result<()>;
}
