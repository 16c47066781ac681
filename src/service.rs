//! The operations of the appliance. The HTTP routes and the admin socket (or the CLI, when no
//! server runs) are two doors into these functions, so every rule lives here once.
//!
//! Everything here blocks (sled, files, argon2): async callers use `spawn_blocking`.
//! Anything reported as done is flushed to disk before the function returns.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::{self, Authenticator, Principal};
use crate::cache::JobsCache;
use crate::copy::Control;
use crate::error::{Result, ServiceError};
use crate::metrics::Metrics;
use crate::model::{
    now, now_ceil, size_text, Image, ImageStatus, Job, JobStatus, JobWire, Limit, Region,
    RegionKind, Step, Tenant, TenantKey, TokenInfo, TokenRecord, User, CONTAINER_FORMATS,
    DISK_FORMATS, JOB_KEYS,
};
use crate::regions::{self, ImageStore, Stores};
use crate::store::{ImageChange, JobQuery, Repo};
use crate::worker::{self, space::room_for, Board, Ledger, MinFree};

/// Longest token lifetime `--expires-in` takes (100 years).
const MAX_LIFETIME_SECS: u64 = 100 * 365 * 24 * 3600;

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
    /// Encoded `GET /jobs` bodies and the counts by status, while no job changes.
    list_bodies: JobsCache<ListKey, Bytes>,
    status_counts: JobsCache<(), BTreeMap<JobStatus, u64>>,
}

/// Who asked for a job list (a tenant, or an admin: `None`) and with what query.
#[derive(PartialEq, Eq, Hash)]
struct ListKey {
    scope: Option<TenantKey>,
    status: Option<JobStatus>,
    marker: Option<String>,
    limit: Option<usize>,
}

/// Larger list bodies are not kept (an admin's list of everything, say).
const MAX_KEPT_LIST_BODY: usize = 16 * 1024;
/// Jobs in one page of `GET /jobs`, by default and at most (Glance's `api_limit_max` default):
/// a list of up to 1,000 jobs keeps the reference's unpaged answer; one page is ~450 KB.
pub const PAGE_LIMIT: usize = 1000;

/// The page size a request gets: its `limit`, lowered to [`PAGE_LIMIT`]; that when none.
fn page_limit(limit: Option<usize>) -> usize {
    limit.map_or(PAGE_LIMIT, |l| l.min(PAGE_LIMIT))
}

/// What `job seed` did.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SeedOutcome {
    pub inserted: usize,
    pub unchanged: usize,
}

/// A new token, shown once.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub info: TokenInfo,
}

/// `image import`'s arguments.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ImportRequest {
    /// Absolute path of the file to import.
    pub file: PathBuf,
    pub tenant: String,
    pub name: String,
    pub disk_format: String,
    pub container_format: String,
    pub id: Option<Uuid>,
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
            list_bodies: JobsCache::default(),
            status_counts: JobsCache::default(),
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

    // ----- regions -----

    /// Adds a region: a directory (`dir`, by default under the data directory) or a Glance.
    pub fn region_add(
        &self,
        id: &str,
        kind: Option<RegionKind>,
        disk_formats: Option<Vec<String>>,
    ) -> Result<Region> {
        check_name("region id", id)?;
        let kind = kind.unwrap_or_else(|| RegionKind::Directory {
            dir: self.data_dir.join("regions").join(id),
        });
        let mut formats: Vec<String> = Vec::new();
        for f in disk_formats.unwrap_or_else(|| DISK_FORMATS.map(String::from).to_vec()) {
            check_format("disk format", &f, &DISK_FORMATS)?;
            if !formats.contains(&f) {
                formats.push(f);
            }
        }
        if formats.is_empty() {
            return Err(ServiceError::BadRequest(
                "a region must accept at least one disk format".into(),
            ));
        }
        let region = Region {
            id: id.to_string(),
            kind,
            disk_formats: formats,
            created_at: now(),
        };
        let images = self
            .stores
            .get(&region)
            .map_err(|e| ServiceError::BadRequest(e.to_string()))?;
        if self.store.region(id)?.is_some() {
            return Err(ServiceError::Conflict(format!(
                "region {id} already exists"
            )));
        }
        images.prepare()?;
        if !self.store.insert_region(&region)? {
            return Err(ServiceError::Conflict(format!(
                "region {id} already exists"
            )));
        }
        self.flush()?;
        Ok(region)
    }

    pub fn region_list(&self) -> Result<Vec<Region>> {
        self.store.regions()
    }

    pub fn region_remove(&self, id: &str) -> Result<Region> {
        let region = self.region(id)?;
        let tenants: Vec<String> = self
            .store
            .tenants()?
            .into_iter()
            .filter(|t| t.region == id)
            .map(|t| t.id)
            .collect();
        if !tenants.is_empty() {
            return Err(ServiceError::Conflict(format!(
                "region {id} is still the region of tenant(s) {}; remove them first",
                tenants.join(", ")
            )));
        }
        if let Some(image) = self
            .store
            .images(None)?
            .into_iter()
            .find(|i| i.region == id && i.status != ImageStatus::Deleted)
        {
            return Err(ServiceError::Conflict(format!(
                "region {id} still holds image {}; delete it first",
                image.id
            )));
        }
        self.store.remove_region(id)?;
        self.flush()?;
        Ok(region)
    }

    // ----- tenants -----

    pub fn tenant_add(&self, id: &str, region: &str, name: Option<String>) -> Result<Tenant> {
        self.tenant_add_with_quotas(id, region, name, None, None)
    }

    /// Adds a tenant with quotas of stored bytes and of active jobs (`None`: no limit).
    pub fn tenant_add_with_quotas(
        &self,
        id: &str,
        region: &str,
        name: Option<String>,
        quota_bytes: Option<u64>,
        quota_jobs: Option<u64>,
    ) -> Result<Tenant> {
        let key = parse_tenant(id)?;
        self.region(region)?;
        let tenant = Tenant {
            id: id.to_string(),
            region: region.to_string(),
            name,
            created_at: now(),
            quota_bytes,
            quota_jobs,
        };
        if !self.store.insert_tenant(key, &tenant)? {
            return Err(ServiceError::Conflict(format!(
                "tenant {id} already exists"
            )));
        }
        self.flush()?;
        Ok(tenant)
    }

    pub fn tenant_list(&self) -> Result<Vec<Tenant>> {
        self.store.tenants()
    }

    /// Sets or clears a tenant's quotas (`None`: left as they are). They apply to the next
    /// request; nothing accepted already is undone.
    pub fn tenant_update(
        &self,
        id: &str,
        quota_bytes: Option<Limit>,
        quota_jobs: Option<Limit>,
    ) -> Result<Tenant> {
        if quota_bytes.is_none() && quota_jobs.is_none() {
            return Err(ServiceError::BadRequest(
                "tenant update needs --quota-bytes or --quota-jobs".into(),
            ));
        }
        let (key, mut tenant) = self.tenant(id)?;
        if let Some(limit) = quota_bytes {
            tenant.quota_bytes = limit.value();
        }
        if let Some(limit) = quota_jobs {
            tenant.quota_jobs = limit.value();
        }
        if !self.store.update_tenant(key, &tenant)? {
            return Err(ServiceError::NotFound(format!("no tenant {id}")));
        }
        self.flush()?;
        Ok(tenant)
    }

    pub fn tenant_remove(&self, id: &str) -> Result<Tenant> {
        let (key, tenant) = self.tenant(id)?;
        let members: Vec<String> = self
            .store
            .users()?
            .into_iter()
            .filter(|u| u.tenants.iter().any(|t| TenantKey::parse(t) == Some(key)))
            .map(|u| u.name)
            .collect();
        if !members.is_empty() {
            return Err(ServiceError::Conflict(format!(
                "tenant {id} still has member(s) {}; remove them first",
                members.join(", ")
            )));
        }
        let images = self.store.images(Some(key))?;
        if let Some(image) = images.iter().find(|i| i.status != ImageStatus::Deleted) {
            return Err(ServiceError::Conflict(format!(
                "tenant {id} still owns image {}; delete it first",
                image.id
            )));
        }
        if let Some(job) = self.store.tenant_has_jobs(key, &tenant.id)? {
            return Err(ServiceError::Conflict(format!(
                "tenant {id} is still named by job {job}"
            )));
        }
        self.store.remove_tenant(key)?;
        self.flush()?;
        Ok(tenant)
    }

    // ----- users -----

    pub fn user_add(&self, name: &str, tenants: &[String], admin: bool) -> Result<User> {
        check_name("user name", name)?;
        if tenants.is_empty() {
            return Err(ServiceError::BadRequest(
                "a user needs at least one --tenant".into(),
            ));
        }
        let mut stored: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for t in tenants {
            let (key, tenant) = self.tenant(t)?;
            if seen.insert(key) {
                stored.push(tenant.id);
            }
        }
        let user = User {
            name: name.to_string(),
            tenants: stored,
            admin,
            created_at: now(),
        };
        if !self.store.insert_user(&user)? {
            return Err(ServiceError::Conflict(format!(
                "user {name} already exists"
            )));
        }
        self.flush()?;
        Ok(user)
    }

    pub fn user_list(&self) -> Result<Vec<User>> {
        self.store.users()
    }

    /// Removes a user and its tokens; returns the user and how many tokens went with it.
    pub fn user_remove(&self, name: &str) -> Result<(User, usize)> {
        let user = self
            .store
            .user(name)?
            .ok_or_else(|| ServiceError::NotFound(format!("no user {name}")))?;
        let ids: Vec<Uuid> = self
            .store
            .tokens()?
            .into_iter()
            .filter(|t| t.info.user == name)
            .map(|t| t.info.id)
            .collect();
        let removed = self.store.remove_user(name)?;
        self.flush()?;
        for id in ids {
            self.auth.forget_token(id);
        }
        Ok((user, removed))
    }

    // ----- tokens -----

    pub fn token_issue(
        &self,
        user: &str,
        tenant: &str,
        expires_in_secs: Option<u64>,
        value: Option<String>,
    ) -> Result<IssuedToken> {
        let user = self
            .store
            .user(user)?
            .ok_or_else(|| ServiceError::NotFound(format!("no user {user}")))?;
        let (key, tenant) = self.tenant(tenant)?;
        if !user
            .tenants
            .iter()
            .any(|t| TenantKey::parse(t) == Some(key))
        {
            return Err(ServiceError::Conflict(format!(
                "user {} is not a member of tenant {}",
                user.name, tenant.id
            )));
        }
        if expires_in_secs == Some(0) {
            return Err(ServiceError::BadRequest(
                "--expires-in must be longer than zero".into(),
            ));
        }
        if expires_in_secs.is_some_and(|s| s > MAX_LIFETIME_SECS) {
            return Err(ServiceError::BadRequest(
                "--expires-in can be at most 100 years; leave it out for a token that never expires"
                    .into(),
            ));
        }
        let token = match value {
            Some(v) => {
                auth::check_imported(&v)?;
                if self.auth.exists(&*self.store, &v)? {
                    return Err(ServiceError::Conflict(
                        "that token value is already registered".into(),
                    ));
                }
                v
            }
            None => auth::generate()?,
        };
        let created_at = now();
        let lookup = auth::lookup(&auth::digest(&token));
        let record = TokenRecord {
            info: TokenInfo {
                id: Uuid::new_v4(),
                user: user.name,
                tenant: tenant.id,
                created_at,
                // Rounded up: a token lives at least as long as asked, never shorter.
                expires_at: expires_in_secs.map(|s| now_ceil().saturating_add(s)),
                revoked_at: None,
            },
            hash: auth::hash(&token)?,
            lookup: crate::model::to_hex(&lookup),
        };
        self.store.insert_token(&record, &lookup)?;
        self.flush()?;
        self.auth.token_added();
        Ok(IssuedToken {
            token,
            info: record.info,
        })
    }

    pub fn token_list(&self) -> Result<Vec<TokenInfo>> {
        Ok(self.store.tokens()?.into_iter().map(|t| t.info).collect())
    }

    pub fn token_revoke(&self, id: &str) -> Result<TokenInfo> {
        let missing = || ServiceError::NotFound(format!("no token with id {id}"));
        let uuid = Uuid::try_parse(id).map_err(|_| missing())?;
        let mut record = self.store.token(uuid)?.ok_or_else(missing)?;
        if record.info.revoked_at.is_none() {
            record.info.revoked_at = Some(now());
            self.store.update_token(&record)?;
            self.flush()?;
        }
        self.auth.forget_token(uuid);
        Ok(record.info)
    }

    // ----- images -----

    pub fn image_import(&self, req: &ImportRequest) -> Result<Image> {
        check_format("disk format", &req.disk_format, &DISK_FORMATS)?;
        check_format(
            "container format",
            &req.container_format,
            &CONTAINER_FORMATS,
        )?;
        if req.name.is_empty() || req.name.len() > 255 {
            return Err(ServiceError::BadRequest(
                "an image name must be 1 to 255 characters".into(),
            ));
        }
        let (key, tenant) = self.tenant(&req.tenant)?;
        let region = self.region(&tenant.region)?;
        if !region.disk_formats.contains(&req.disk_format) {
            return Err(ServiceError::Conflict(format!(
                "region {} does not accept disk format {}",
                region.id, req.disk_format
            )));
        }
        let images = self.images_of(&region)?;
        if images.records().is_some() {
            return Err(ServiceError::Conflict(format!(
                "region {} keeps its own image records: upload images with its own API",
                region.id
            )));
        }
        images.probe().map_err(|why| {
            ServiceError::Conflict(format!("region {} store is unusable: {why}", region.id))
        })?;
        let mut file = open_regular(&req.file)?;
        let created = now();
        let mut image = Image {
            id: req.id.unwrap_or_else(Uuid::new_v4),
            name: req.name.clone(),
            owner: tenant.id,
            region: region.id.clone(),
            status: ImageStatus::Saving,
            disk_format: req.disk_format.clone(),
            container_format: req.container_format.clone(),
            size: 0,
            checksum: None,
            os_hash_algo: None,
            os_hash_value: None,
            created_at: created,
            updated_at: created,
        };
        // The record reserves the id first; the bytes follow; then it becomes active. An
        // import is a copy with nothing to verify against (the image is its own source).
        self.store.insert_image(key, &image)?;
        let mut control = Control {
            stop: &|| None,
            progress: &mut |_| {},
            limiter: None,
        };
        let written = images
            .create(&image, &image, &|| false)
            .map_err(regions::TransferError::Failed)
            .and_then(|sink| regions::transfer(&mut file, sink, &mut control, &|_| Ok(())));
        match written {
            Ok(written) => {
                image.status = ImageStatus::Active;
                image.size = written.size;
                image.checksum = written.checksum;
                image.os_hash_algo = written.os_hash_algo;
                image.os_hash_value = written.os_hash_value;
                image.updated_at = now();
                self.store.update_image(&image)?;
                self.flush()?;
                Ok(image)
            }
            Err(e) => {
                self.store.remove_image(key, image.id)?;
                self.flush()?;
                let why = match e {
                    regions::TransferError::Failed(e) => e.to_string(),
                    regions::TransferError::Stopped(_) => "the import was stopped".into(),
                };
                Err(ServiceError::Conflict(format!(
                    "cannot import {} into region {}: {why}",
                    req.file.display(),
                    region.id
                )))
            }
        }
    }

    pub fn image_list(&self, tenant: Option<&str>, region: Option<&str>) -> Result<Vec<Image>> {
        let owner = tenant.map(parse_tenant).transpose()?;
        if let Some(region) = region.map(|r| self.region(r)).transpose()? {
            let images = self.images_of(&region)?;
            if let Some(records) = images.records() {
                let mut listed = records.images(tenant).map_err(|e| {
                    ServiceError::Conflict(format!(
                        "cannot list the images of region {}: {e}",
                        region.id
                    ))
                })?;
                listed.sort_by_key(|i| (i.created_at, i.id));
                return Ok(listed);
            }
        }
        let mut images = self.store.images(owner)?;
        if let Some(region) = region {
            images.retain(|i| i.region == region);
        }
        images.sort_by_key(|i| (i.created_at, i.id));
        Ok(images)
    }

    /// An image in the region of `who`'s tenant, where that region keeps its own records
    /// (Glance), that `who` may copy (its tenant owns it, or `who` is an admin), or `None`. A
    /// job's source tenant is its image's owner, so other owners' public images are not
    /// offered: their jobs would belong to that owner.
    fn remote_source(&self, who: &Principal, id: Uuid) -> Result<Option<(Image, Region)>> {
        let Some(tenant) = self.store.tenant(who.tenant_key)? else {
            return Ok(None);
        };
        let region = self.region(&tenant.region)?;
        let images = self.images_of(&region)?;
        let Some(records) = images.records() else {
            return Ok(None);
        };
        let Some(found) = records.image(id).map_err(|e| {
            tracing::warn!(region = %region.id, "image lookup failed: {e}");
            ServiceError::Conflict(if e.is_transient() {
                format!(
                    "the image service of region {} cannot be reached",
                    region.id
                )
            } else {
                format!(
                    "the image service of region {} refused the appliance's request",
                    region.id
                )
            })
        })?
        else {
            return Ok(None);
        };
        // A job's source tenant is the image's owner: one that is not a tenant id is no source.
        let Some(owner) = TenantKey::parse(&found.owner) else {
            return Ok(None);
        };
        Ok((who.admin || owner == who.tenant_key).then_some((found, region)))
    }

    pub fn image_show(&self, id: &str) -> Result<Image> {
        let missing = || ServiceError::NotFound(format!("no image {id}"));
        let uuid = Uuid::try_parse(id).map_err(|_| missing())?;
        self.store.image(uuid)?.ok_or_else(missing)
    }

    /// Marks an image deleted and removes its bytes; refused while a running job uses it.
    pub fn image_delete(&self, id: &str) -> Result<Image> {
        let mut image = self.image_show(id)?;
        if image.status == ImageStatus::Deleted {
            return Err(ServiceError::Conflict(format!(
                "image {id} is already deleted"
            )));
        }
        if image.status == ImageStatus::Saving {
            return Err(ServiceError::Conflict(format!(
                "image {id} is still being written by a copy or an import"
            )));
        }
        let owner = parse_tenant(&image.owner)?;
        let busy = self.store.jobs(
            &JobQuery {
                limit: 1,
                ..JobQuery::all(Some(owner))
            },
            &|j| {
                !j.wire.status.is_terminal()
                    && (j.wire.source_image_id == image.id
                        || j.wire.destination_image_id == Some(image.id))
            },
        )?;
        if let Some(job) = busy.first() {
            return Err(ServiceError::Conflict(format!(
                "image {id} is in use by job {} ({}); cancel it first",
                job.wire.job_id, job.wire.status
            )));
        }
        if let Some(region) = self.store.region(&image.region)? {
            self.images_of(&region)?
                .remove(image.id)
                .map_err(|e| ServiceError::internal("cannot remove the image's bytes", e))?;
        }
        image.status = ImageStatus::Deleted;
        image.updated_at = now();
        self.store.update_image(&image)?;
        self.flush()?;
        Ok(image)
    }

    // ----- jobs: admin -----

    /// Imports jobs written in the list-response format. All are checked before any is written.
    pub fn job_seed(&self, entries: &[serde_json::Value], enqueue: bool) -> Result<SeedOutcome> {
        let mut jobs = Vec::with_capacity(entries.len());
        let mut ids = HashSet::new();
        for (i, entry) in entries.iter().enumerate() {
            let (key, wire) = parse_seed_entry(entry).map_err(|why| {
                ServiceError::BadRequest(format!("job #{} in the file: {why}", i + 1))
            })?;
            if !ids.insert(wire.job_id) {
                return Err(ServiceError::BadRequest(format!(
                    "job {} appears twice in the file",
                    wire.job_id
                )));
            }
            jobs.push((key, wire));
        }
        let created = now();
        let mut records = Vec::with_capacity(jobs.len());
        for (key, wire) in jobs {
            let job = Job {
                seq: self.store.next_seq()?,
                created_at: created,
                updated_at: created,
                bytes_copied: 0,
                bytes_total: 0,
                error: None,
                seeded: true,
                enqueued: enqueue,
                created_destination: None,
                wire,
            };
            records.push((key, job));
        }
        let inserted = self.store.insert_jobs(&records)?;
        self.flush()?;
        self.board.wake();
        Ok(SeedOutcome {
            inserted,
            unchanged: records.len() - inserted,
        })
    }

    pub fn job_list(&self, tenant: Option<&str>, status: Option<JobStatus>) -> Result<Vec<Job>> {
        let key = tenant.map(parse_tenant).transpose()?;
        self.store.jobs(&JobQuery::all(key), &|j| {
            status.is_none_or(|s| j.wire.status == s)
        })
    }

    /// Jobs the worker still has to act on, oldest first.
    pub fn active_jobs(&self) -> Result<Vec<Job>> {
        let mut jobs = Vec::new();
        for id in self.store.queued()? {
            jobs.extend(self.store.job(id)?);
        }
        Ok(jobs)
    }

    pub fn job_show(&self, id: &str) -> Result<Job> {
        self.visible_job(None, id)
    }

    pub fn job_cancel(&self, id: &str) -> Result<Job> {
        self.cancel(None, id)
    }

    // ----- jobs: the API -----

    /// A job the caller may see (`None`: the admin CLI, sees all), else 404.
    fn visible_job(&self, who: Option<&Principal>, id: &str) -> Result<Job> {
        let missing = || ServiceError::NotFound(format!("no job {id}"));
        // A path segment that is not even a UUID is quoted: it is the client's text.
        let uuid = Uuid::try_parse(id)
            .map_err(|_| ServiceError::NotFound(format!("no job with the id \"{id}\"")))?;
        let job = self.store.job(uuid)?.ok_or_else(missing)?;
        if may_see(who, &job) {
            Ok(job)
        } else {
            Err(missing())
        }
    }

    /// One page of the caller's jobs, oldest first: the jobs after `marker`, at most `limit`
    /// of them, [`PAGE_LIMIT`] when no limit is given and at most that (Glance's
    /// `api_limit_max` rule: a larger limit is lowered, not refused). A page of exactly the
    /// limit may have more after it: ask again with its last `job_id` as the marker.
    pub fn list_jobs(
        &self,
        who: &Principal,
        status: Option<JobStatus>,
        marker: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<JobWire>> {
        let limit = page_limit(limit);
        let after = match marker {
            Some(m) => {
                let job = self.visible_job(Some(who), m).map_err(|_| {
                    ServiceError::BadRequest(format!("marker {m} is not a job you can see"))
                })?;
                Some(job.seq)
            }
            None => None,
        };
        let scope = (!who.admin).then_some(who.tenant_key);
        let query = JobQuery {
            tenant: scope,
            after,
            limit,
        };
        self.store
            .job_wires(&query, &|j| status.is_none_or(|s| j.status == s))
    }

    /// [`Service::list_jobs`] encoded as the API's JSON body. Clients poll their list, so a
    /// small body is kept until a job changes.
    pub fn list_jobs_body(
        &self,
        who: &Principal,
        status: Option<JobStatus>,
        marker: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Bytes> {
        let version = self.store.jobs_version();
        let limit = Some(page_limit(limit));
        let key = ListKey {
            scope: (!who.admin).then_some(who.tenant_key),
            status,
            marker: marker.map(str::to_owned),
            limit,
        };
        if let Some(body) = self.list_bodies.get(&key, version) {
            return Ok(body);
        }
        let jobs = self.list_jobs(who, status, marker, limit)?;
        let body = Bytes::from(
            serde_json::to_vec(&jobs)
                .map_err(|e| ServiceError::internal("cannot encode the job list", e))?,
        );
        if body.len() <= MAX_KEPT_LIST_BODY {
            self.list_bodies.put(key, version, body.clone());
        }
        Ok(body)
    }

    /// The `/metrics` exposition (a scan of every job when one has changed).
    pub fn metrics_text(&self) -> String {
        let job_counts = self
            .job_status_counts()
            .inspect_err(|e| tracing::warn!("metrics: cannot count jobs: {e}"))
            .ok();
        let readings = crate::metrics::Readings {
            store_writable: self.store.writable().is_ok(),
            job_counts,
            active_copies: self.board.active(),
            auth: self.auth.stats(),
            keystone_calls: self.auth.keystone_calls(),
        };
        crate::metrics::render(&self.metrics, &readings)
    }

    /// How many jobs there are in each status (a scan of every job when one has changed).
    pub fn job_status_counts(&self) -> Result<BTreeMap<JobStatus, u64>> {
        let version = self.store.jobs_version();
        if let Some(counts) = self.status_counts.get(&(), version) {
            return Ok(counts);
        }
        let counts = self.store.job_status_counts()?;
        self.status_counts.put((), version, counts.clone());
        Ok(counts)
    }

    pub fn show_job(&self, who: &Principal, id: &str) -> Result<Job> {
        self.visible_job(Some(who), id)
    }

    /// POST /jobs: checks the request and stores a new `replicate_requested` job.
    pub fn create_job(&self, who: &Principal, image_id: &str, tenant_dst: &str) -> Result<Job> {
        let image_uuid = Uuid::try_parse(image_id).map_err(|_| {
            ServiceError::BadRequest(format!("the image_id '{image_id}' is not a UUID"))
        })?;
        let dst_key = TenantKey::parse(tenant_dst).ok_or_else(|| {
            ServiceError::BadRequest(format!(
                "the tenant_id_dst '{tenant_dst}' is not 32 hex digits or a hyphenated UUID"
            ))
        })?;
        let no_image = || ServiceError::NotFound(format!("no image {image_id}"));
        // A Glance source's region has just answered: it needs no probe of its own below.
        let (image, answered) = match self.store.image(image_uuid)? {
            Some(image) => {
                let owner = TenantKey::parse(&image.owner);
                if image.status == ImageStatus::Deleted
                    || !(who.admin || owner == Some(who.tenant_key))
                {
                    return Err(no_image());
                }
                (image, None)
            }
            None => {
                let (image, region) = self.remote_source(who, image_uuid)?.ok_or_else(no_image)?;
                (image, Some(region))
            }
        };
        let dst_tenant = self
            .store
            .tenant(dst_key)?
            .ok_or_else(|| ServiceError::NotFound(format!("no tenant {tenant_dst}")))?;
        if !who.admin {
            let member = match &who.projects {
                Some(projects) => projects.contains(&dst_key),
                None => self.store.user(&who.user)?.is_some_and(|u| {
                    u.tenants
                        .iter()
                        .any(|t| TenantKey::parse(t) == Some(dst_key))
                }),
            };
            if !member {
                return Err(ServiceError::Unauthorized(format!(
                    "user {} may not use tenant {tenant_dst}",
                    who.user
                )));
            }
        }
        if image.status != ImageStatus::Active {
            return Err(ServiceError::Conflict(format!(
                "image {image_id} is {}, not active",
                image.status
            )));
        }
        let src_region = match answered {
            Some(region) => region,
            None => self.usable_region(&image.region)?,
        };
        let dst_region = self.usable_region(&dst_tenant.region)?;
        if !dst_region.disk_formats.contains(&image.disk_format) {
            return Err(ServiceError::Conflict(format!(
                "region {} does not accept disk format {}",
                dst_region.id, image.disk_format
            )));
        }
        let owner = TenantKey::parse(&image.owner).ok_or_else(|| {
            ServiceError::Internal(format!("image {image_id} has a malformed owner"))
        })?;
        // From the checks of room and quotas to the insert, one request at a time.
        let _admission = self
            .admission
            .lock()
            .map_err(|_| ServiceError::Internal("the admission lock is poisoned".into()))?;
        self.check_store_room()?;
        self.check_quotas(owner, dst_key, &dst_tenant, &image)?;
        let device = self.check_room(&dst_region, &image)?;
        let created = now();
        let job = Job {
            wire: JobWire {
                copy_progress: 0,
                destination_image_id: None,
                destination_region_id: dst_region.id,
                destination_tenant_id: dst_tenant.id,
                job_id: Uuid::new_v4(),
                source_image_id: image.id,
                source_image_name: image.name,
                source_region_id: src_region.id,
                source_tenant_id: image.owner,
                status: JobStatus::ReplicateRequested,
            },
            seq: self.store.next_seq()?,
            created_at: created,
            updated_at: created,
            bytes_copied: 0,
            bytes_total: image.size,
            error: None,
            seeded: false,
            enqueued: true,
            created_destination: None,
        };
        self.store.insert_jobs(&[(owner, job.clone())])?;
        if let Some(device) = device {
            self.space.promise(job.wire.job_id, device, job.bytes_total);
        }
        drop(_admission);
        self.flush()?;
        self.board.wake();
        tracing::info!(job = %job.wire.job_id, image = %image_uuid, to = %job.wire.destination_tenant_id, "replicate_requested");
        Ok(job)
    }

    /// New jobs are refused (507) while the store's own file system is below its reserve: the
    /// store then never runs out of space because of copies.
    fn check_store_room(&self) -> Result<()> {
        let Ok(space) = crate::disk::space_of(&self.data_dir) else {
            return Ok(());
        };
        let reserve = self.min_free.of(space.total);
        if space.free >= reserve {
            return Ok(());
        }
        Err(ServiceError::DiskFull(format!(
            "New jobs are refused because the store's disk is full: {} are free, less than the reserve of {} kept for the store (serve --min-free); they are accepted again once space is freed",
            size_text(space.free),
            size_text(reserve)
        )))
    }

    /// Whether the image fits into the destination beside the reserve and the copies already
    /// accepted (409 if not); the destination's file system, for the new job's promise.
    fn check_room(&self, region: &Region, image: &Image) -> Result<Option<u64>> {
        let Some(space) = self.images_of(region)?.space() else {
            return Ok(None);
        };
        let reserve = self.min_free.of(space.total);
        let promised = self.space.promised(space.device, None);
        room_for(&space, reserve, promised, image.size).map_err(|why| {
            ServiceError::Conflict(format!(
                "region {} has no room for image {}: {why}",
                region.id, image.id
            ))
        })?;
        Ok(Some(space.device))
    }

    /// The quotas a new job must stay within (413 if not): active jobs of its source tenant
    /// (the tenant that sees, lists and cancels it), bytes stored by its destination tenant
    /// (whose region receives the copy).
    fn check_quotas(
        &self,
        source: TenantKey,
        destination: TenantKey,
        dst_tenant: &Tenant,
        image: &Image,
    ) -> Result<()> {
        let src_tenant = if source == destination {
            Some(dst_tenant.clone())
        } else {
            self.store.tenant(source)?
        };
        let quota_jobs = src_tenant.as_ref().and_then(|t| t.quota_jobs);
        let quota_bytes = dst_tenant.quota_bytes;
        if quota_jobs.is_none() && quota_bytes.is_none() {
            return Ok(());
        }
        let mut queued = Vec::new();
        for id in self.store.queued()? {
            queued.extend(self.store.job(id)?);
        }
        if let (Some(max), Some(tenant)) = (quota_jobs, &src_tenant) {
            let active = queued
                .iter()
                .filter(|j| TenantKey::parse(&j.wire.source_tenant_id) == Some(source))
                .count() as u64;
            if active >= max {
                return Err(ServiceError::OverQuota(format!(
                    "tenant {} is over its quota of {max} active jobs: {active} of its jobs are queued or copying; new ones are accepted once some end or are canceled",
                    tenant.id
                )));
            }
        }
        if let Some(max) = quota_bytes {
            let stored: u64 = self
                .store
                .images(Some(destination))?
                .iter()
                .filter(|i| i.status != ImageStatus::Deleted)
                .map(|i| i.size)
                .sum();
            let coming: u64 = queued
                .iter()
                .filter(|j| {
                    TenantKey::parse(&j.wire.destination_tenant_id) == Some(destination)
                        && j.next_step() == Step::Copy
                })
                .map(|j| j.bytes_total)
                .sum();
            let held = stored.saturating_add(coming);
            if held.saturating_add(image.size) > max {
                return Err(ServiceError::OverQuota(format!(
                    "tenant {} is over its quota of {} stored: it holds {} (copies under way included), and image {} needs {} more",
                    dst_tenant.id,
                    size_text(max),
                    size_text(held),
                    image.id,
                    size_text(image.size)
                )));
            }
        }
        Ok(())
    }

    fn usable_region(&self, id: &str) -> Result<Region> {
        let region = self
            .store
            .region(id)?
            .ok_or_else(|| ServiceError::Conflict(format!("region {id} no longer exists")))?;
        self.check_region(&region).map_err(|why| {
            tracing::warn!(region = id, "region store unusable: {why}");
            ServiceError::Conflict(format!(
                "the image store of region {id} is down or not writable"
            ))
        })?;
        Ok(region)
    }

    pub fn cancel_job(&self, who: &Principal, id: &str) -> Result<Job> {
        self.cancel(Some(who), id)
    }

    fn cancel(&self, who: Option<&Principal>, id: &str) -> Result<Job> {
        let job = self.visible_job(who, id)?;
        let updated = self.store.update_job(job.wire.job_id, &|job| {
            if !job.request_cancel(now()) {
                return Err(ServiceError::Conflict(format!(
                    "job {id} is {}; only replicate_requested or replicating jobs can be canceled",
                    job.wire.status
                )));
            }
            Ok(ImageChange::None)
        })?;
        let updated = updated.ok_or_else(|| ServiceError::NotFound(format!("no job {id}")))?;
        self.flush()?;
        self.board.cancel(updated.wire.job_id);
        tracing::info!(job = %updated.wire.job_id, "cancel_requested");
        Ok(updated)
    }
}

fn may_see(who: Option<&Principal>, job: &Job) -> bool {
    match who {
        None => true,
        Some(p) if p.admin => true,
        Some(p) => TenantKey::parse(&job.wire.source_tenant_id) == Some(p.tenant_key),
    }
}

/// One element of a seed file: an object with exactly the ten keys of the job object.
fn parse_seed_entry(
    entry: &serde_json::Value,
) -> std::result::Result<(TenantKey, JobWire), String> {
    let object = entry.as_object().ok_or("not a JSON object")?;
    if let Some(missing) = JOB_KEYS.iter().find(|k| !object.contains_key(**k)) {
        return Err(format!("key \"{missing}\" is missing"));
    }
    if let Some(unknown) = object.keys().find(|k| !JOB_KEYS.contains(&k.as_str())) {
        return Err(format!(
            "unknown key \"{unknown}\"; a job has exactly the ten keys of the list response"
        ));
    }
    let wire: JobWire = serde_json::from_value(entry.clone()).map_err(|e| e.to_string())?;
    if wire.copy_progress > 100 {
        return Err(format!(
            "job {}: copy_progress {} is over 100",
            wire.job_id, wire.copy_progress
        ));
    }
    let source = TenantKey::parse(&wire.source_tenant_id).ok_or_else(|| {
        format!(
            "job {}: source_tenant_id '{}' is not 32 hex digits or a hyphenated UUID",
            wire.job_id, wire.source_tenant_id
        )
    })?;
    if TenantKey::parse(&wire.destination_tenant_id).is_none() {
        return Err(format!(
            "job {}: destination_tenant_id '{}' is not 32 hex digits or a hyphenated UUID",
            wire.job_id, wire.destination_tenant_id
        ));
    }
    Ok((source, wire))
}

/// Opens a file to import: a regular file only (a FIFO or a device would block or never end;
/// it is opened without blocking to find out).
fn open_regular(path: &std::path::Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| ServiceError::BadRequest(format!("cannot read {}: {e}", path.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| ServiceError::BadRequest(format!("cannot read {}: {e}", path.display())))?;
    if meta.is_dir() {
        return Err(ServiceError::BadRequest(format!(
            "{} is a directory, not an image file",
            path.display()
        )));
    }
    if !meta.is_file() {
        return Err(ServiceError::BadRequest(format!(
            "{} is not a regular file (a FIFO, socket or device cannot be imported)",
            path.display()
        )));
    }
    Ok(file)
}
