//! The operations of the appliance. The HTTP routes and the admin socket (or the CLI, when no
//! server runs) are two doors into these functions, so every rule lives here once.
//!
//! By concern: [`registry`] (regions, tenants, users, tokens), [`images`] (image records and
//! imports), [`jobs`] (the job routes and the admin's job commands, with room and quota
//! checks); this file holds the service itself, its health and what it shares.
//!
//! Everything here blocks (sled, files, argon2): async callers use `spawn_blocking`.
//! Anything reported as done is flushed to disk before the function returns.

mod images;
mod jobs;
mod lifecycle;
mod peer;
mod registry;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

pub use images::{
    AnyOf, ImagePage, ImageQuery, ImportRequest, NewImage, PatchOp, SortKey, LIMIT_DEFAULT,
    LIMIT_MAX,
};
use jobs::ListKey;
pub use jobs::{SeedOutcome, PAGE_LIMIT};
pub use lifecycle::PurgeRule;
pub use peer::{Begun, Refusal};
pub use registry::IssuedToken;

use crate::auth::Authenticator;
use crate::cache::JobsCache;
use crate::error::{Result, ServiceError};
use crate::metrics::Metrics;
use crate::model::{JobStatus, Region, Step, Tenant, TenantKey};
use crate::regions::{ImageStore, Stores};
use crate::store::Repo;
use crate::worker::{self, Board, Ledger, MinFree};

pub struct Service {
    pub store: Arc<dyn Repo>,
    pub auth: Arc<Authenticator>,
    /// Where the replication worker is woken and running copies are told of cancels.
    pub board: Arc<Board>,
    pub metrics: Arc<Metrics>,
    pub data_dir: PathBuf,
    /// The regions' image stores.
    pub stores: Arc<Stores>,
    /// The reserve copies and new jobs leave free on every file system (`serve --min-free`).
    pub min_free: MinFree,
    /// Bytes promised to accepted copies, shared with the worker.
    pub space: Arc<Ledger>,
    /// Held from a new job's room and quota checks to its insert, so that concurrent requests
    /// cannot all pass the same check.
    admission: Mutex<()>,
    /// Held by `job seed` from start to end: one seed at a time, so that the sequence numbers
    /// it took are its own (what a rollback removes).
    seeding: Mutex<()>,
    /// Encoded `GET /jobs` bodies and the counts by status, while no job changes.
    list_bodies: JobsCache<ListKey, Bytes>,
    status_counts: JobsCache<(), BTreeMap<JobStatus, u64>>,
    /// What the peer protocol's serving end keeps between requests.
    peer: peer::PeerState,
    /// The API is served over HTTPS (`serve --tls-cert`): the links it writes say so.
    pub https: bool,
}

fn check_name(kind: &str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
        && !value.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(ServiceError::BadRequest(format!(
            "{kind} '{value}' is not valid: use 1-64 letters, digits, '-', '_', '.' or '@', not starting with '.'"
        )))
    }
}

fn parse_tenant(value: &str) -> Result<TenantKey> {
    TenantKey::parse(value).ok_or_else(|| {
        ServiceError::BadRequest(format!(
            "tenant id '{value}' is not valid: use 32 hex digits or a hyphenated UUID"
        ))
    })
}

/// A 409 unless `region` takes images of disk format `format` (`region add --disk-formats`).
fn check_accepts(region: &Region, format: &str) -> Result<()> {
    if region.disk_formats.iter().any(|f| f == format) {
        Ok(())
    } else {
        Err(ServiceError::Conflict(format!(
            "region {} does not accept disk format {format}",
            region.id
        )))
    }
}

fn check_format(kind: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(ServiceError::BadRequest(format!(
            "unknown {kind} '{value}'; expected one of {}",
            allowed.join(", ")
        )))
    }
}

impl Service {
    pub fn new(store: Arc<dyn Repo>, data_dir: PathBuf) -> Service {
        Service {
            store,
            auth: Arc::new(Authenticator::default()),
            board: Arc::new(Board::default()),
            metrics: Arc::new(Metrics::default()),
            data_dir,
            stores: Arc::new(Stores::default()),
            min_free: MinFree::default(),
            space: Arc::new(Ledger::default()),
            admission: Mutex::new(()),
            seeding: Mutex::new(()),
            list_bodies: JobsCache::default(),
            status_counts: JobsCache::default(),
            peer: peer::PeerState::default(),
            https: false,
        }
    }

    fn flush(&self) -> Result<()> {
        self.store.flush()
    }

    /// What the replication worker works with.
    pub fn worker_parts(&self) -> worker::Parts {
        worker::Parts {
            store: Arc::clone(&self.store),
            stores: Arc::clone(&self.stores),
            board: Arc::clone(&self.board),
            metrics: Arc::clone(&self.metrics),
            space: Arc::clone(&self.space),
            min_free: self.min_free,
        }
    }

    /// Start-up: the copies still queued get their promises back (each starts from the
    /// beginning), so new jobs are checked against them.
    pub fn load_promises(&self) -> Result<()> {
        for id in self.store.queued()? {
            let Some(job) = self.store.job(id)? else {
                continue;
            };
            if job.next_step() != Step::Copy {
                continue;
            }
            let Some(region) = self.store.region(&job.wire.destination_region_id)? else {
                continue;
            };
            if let Some(space) = self.stores.get(&region).ok().and_then(|s| s.space()) {
                self.space
                    .promise_if_absent(id, space.device, job.bytes_total);
            }
        }
        Ok(())
    }

    /// The image store of `region`.
    fn images_of(&self, region: &Region) -> Result<Arc<dyn ImageStore>> {
        self.stores.get(region).map_err(|e| {
            ServiceError::Conflict(format!(
                "the image store of region {} is unusable: {e}",
                region.id
            ))
        })
    }

    fn tenant(&self, id: &str) -> Result<(TenantKey, Tenant)> {
        let key = parse_tenant(id)?;
        let tenant = self
            .store
            .tenant(key)?
            .ok_or_else(|| ServiceError::NotFound(format!("no tenant {id}")))?;
        Ok((key, tenant))
    }

    fn region(&self, id: &str) -> Result<Region> {
        self.store
            .region(id)?
            .ok_or_else(|| ServiceError::NotFound(format!("no region {id}")))
    }

    /// Whether the store answers and every region's image store is usable; what is not.
    pub fn health(&self) -> std::result::Result<(), Vec<String>> {
        // First: a store that failed a write reopens itself here once the disk has room.
        let store = match self.store.writable() {
            Ok(()) => None,
            Err(ServiceError::DiskFull(_)) => {
                Some("the store cannot write because its disk is full".to_string())
            }
            // The database does not answer: its sentence says so (without a password).
            Err(ServiceError::Unavailable(why)) => Some(why),
            Err(e) => {
                tracing::warn!("health: the store cannot write: {e}");
                Some("the store cannot write (the log says why)".to_string())
            }
        };
        let regions = match self.store.regions() {
            Ok(regions) => regions,
            Err(e) => {
                tracing::warn!("health: the store fails: {e}");
                return Err(vec![
                    store.unwrap_or_else(|| "the store is not usable".into())
                ]);
            }
        };
        let problems: Vec<String> = store
            .into_iter()
            .chain(regions.iter().filter_map(|r| {
                let why = self.check_region(r).err()?;
                tracing::warn!(region = %r.id, "health: {why}");
                Some(format!(
                    "the image store of region {} is down or not writable",
                    r.id
                ))
            }))
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// Whether a region can take and give images now: its directory is writable, or its
    /// Glance answers and accepts the appliance's credentials.
    fn check_region(&self, region: &Region) -> std::result::Result<(), String> {
        self.stores.get(region).map_err(|e| e.to_string())?.probe()
    }
}
