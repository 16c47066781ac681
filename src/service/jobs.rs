//! Jobs: seeding and listing for the admin, and the four routes' operations (list, show,
//! copy, cancel) with their room and quota checks.

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;
use uuid::Uuid;

use super::{parse_tenant, Service};
use crate::auth::Principal;
use crate::error::{Result, ServiceError};
use crate::model::{
    now, size_text, Image, ImageStatus, Job, JobStatus, JobWire, Region, Step, Tenant, TenantKey,
    JOB_KEYS,
};
use crate::store::{ImageChange, JobQuery};
use crate::worker::space::room_for;

/// Who asked for a job list (a tenant, or an admin: `None`) and with what query.
#[derive(PartialEq, Eq, Hash)]
pub(super) struct ListKey {
    scope: Option<TenantKey>,
    status: Option<JobStatus>,
    marker: Option<String>,
    limit: Option<usize>,
}

impl ListKey {
    fn new(
        who: &Principal,
        status: Option<JobStatus>,
        marker: Option<&str>,
        limit: Option<usize>,
    ) -> ListKey {
        ListKey {
            scope: (!who.admin).then_some(who.tenant_key),
            status,
            marker: marker.map(str::to_owned),
            limit: Some(page_limit(limit)),
        }
    }
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
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
pub struct SeedOutcome {
    pub inserted: usize,
    pub unchanged: usize,
}

impl Service {
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
            let mut job = Job::new_queued(wire, self.store.next_seq()?, created, 0);
            job.seeded = true;
            job.enqueued = enqueue;
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
    pub(super) fn visible_job(&self, who: Option<&Principal>, id: &str) -> Result<Job> {
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

    /// The kept body of [`Service::list_jobs_body`], if no job changed since it was made.
    /// Reads only the job version, so the HTTP door answers a poll without leaving the
    /// executor: sending each of them to the blocking pool cost 0.64 of the requests per
    /// second (BENCHMARKS.md, P1 side by side).
    pub fn kept_list_body(
        &self,
        who: &Principal,
        status: Option<JobStatus>,
        marker: Option<&str>,
        limit: Option<usize>,
    ) -> Option<Bytes> {
        let version = self.store.jobs_version();
        self.list_bodies
            .get(&ListKey::new(who, status, marker, limit), version)
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
        let key = ListKey::new(who, status, marker, limit);
        if let Some(body) = self.list_bodies.get(&key, version) {
            return Ok(body);
        }
        let jobs = self.list_jobs(who, status, marker, key.limit)?;
        let body = Bytes::from(
            crate::http::reply::reference_json(&jobs)
                .map_err(|e| ServiceError::internal("cannot encode the job list", e))?,
        );
        if body.len() <= MAX_KEPT_LIST_BODY {
            self.list_bodies.put(key, version, body.clone());
        }
        Ok(body)
    }

    /// The `/metrics` exposition.
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

    /// How many jobs there are in each status: sled keeps them with every job write;
    /// PostgreSQL counts its rows when a job has changed since the last call.
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
        if !who.admin && !who.projects.contains(&dst_key) {
            return Err(ServiceError::Unauthorized(format!(
                "not a member of the destination tenant: user {} may not use tenant {tenant_dst}",
                who.user
            )));
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
        let dst_region = if dst_tenant.region == src_region.id {
            src_region.clone()
        } else {
            self.usable_region(&dst_tenant.region)?
        };
        let owner = TenantKey::parse(&image.owner).ok_or_else(|| {
            ServiceError::Internal(format!("image {image_id} has a malformed owner"))
        })?;
        // The checks of room and quotas, one request at a time: the room is promised before
        // the lock goes, so the next request counts it; quotas count stored jobs, so with a
        // quota the lock is held until the job is stored too.
        let admission = self
            .admission
            .lock()
            .map_err(|_| ServiceError::Internal("the admission lock is poisoned".into()))?;
        let admitted = self.admit(owner, dst_key, &dst_tenant, &dst_region, Some(&image))?;
        let wire = JobWire {
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
        };
        let job = Job::new_queued(wire, self.store.next_seq()?, now(), image.size);
        let id = job.wire.job_id;
        if let Some(device) = admitted.device {
            self.space.promise(id, device, job.bytes_total);
        }
        let admission = admitted.quotas.then_some(admission);
        if let Err(e) = self.store.insert_jobs(&[(owner, job.clone())]) {
            self.space.release(id);
            return Err(e);
        }
        drop(admission);
        self.flush()?;
        self.board.wake();
        tracing::info!(job = %job.wire.job_id, image = %image_uuid, to = %job.wire.destination_tenant_id, "replicate_requested");
        Ok(job)
    }
}

/// What [`Service::admit`] found.
pub(super) struct Admitted {
    /// The device whose room the job is to be promised.
    pub device: Option<u64>,
    /// Whether a quota applied (then the job must be stored before the next admission).
    pub quotas: bool,
}

impl Service {
    /// The checks a new job passes, under the admission lock: the destination region takes
    /// the image's disk format, the store's own reserve, and, where the source's record is
    /// known, the quotas and the room at the destination. The device whose room the job is to
    /// be promised, if any. Copy requests and retries both come through here.
    pub(super) fn admit(
        &self,
        owner: TenantKey,
        dst_key: TenantKey,
        dst_tenant: &Tenant,
        dst_region: &Region,
        image: Option<&Image>,
    ) -> Result<Admitted> {
        if let Some(image) = image {
            super::check_accepts(dst_region, &image.disk_format)?;
        }
        self.check_store_room()?;
        let Some(image) = image else {
            return Ok(Admitted {
                device: None,
                quotas: false,
            });
        };
        let quotas = self.check_quotas(owner, dst_key, dst_tenant, image)?;
        Ok(Admitted {
            device: self.check_room(dst_region, image)?,
            quotas,
        })
    }

    /// New jobs are refused (507) while the store's own file system is below its reserve: the
    /// store then never runs out of space because of copies.
    pub(super) fn check_store_room(&self) -> Result<()> {
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
    pub(super) fn check_room(&self, region: &Region, image: &Image) -> Result<Option<u64>> {
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
    pub(super) fn check_quotas(
        &self,
        source: TenantKey,
        destination: TenantKey,
        dst_tenant: &Tenant,
        image: &Image,
    ) -> Result<bool> {
        let src_tenant = if source == destination {
            Some(dst_tenant.clone())
        } else {
            self.store.tenant(source)?
        };
        let quota_jobs = src_tenant.as_ref().and_then(|t| t.quota_jobs);
        let quota_bytes = dst_tenant.quota_bytes;
        if quota_jobs.is_none() && quota_bytes.is_none() {
            return Ok(false);
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
            let stored = self.stored_bytes(destination)?;
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
        Ok(true)
    }

    pub(super) fn usable_region(&self, id: &str) -> Result<Region> {
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
