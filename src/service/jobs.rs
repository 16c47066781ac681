//! Jobs: seeding and listing for the admin, and the four routes' operations (list, show,
//! copy, cancel) with their room and quota checks.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;

use bytes::Bytes;
use uuid::Uuid;

use super::{parse_tenant, Service};
use crate::auth::Principal;
use crate::error::{Result, ServiceError};
use crate::model::{
    now, size_text, Image, ImageStatus, Job, JobStatus, JobWire, Region, Step, Tenant, TenantKey,
    JOB_KEYS,
};
use crate::store::{Exclusive, ImageChange, JobQuery, StoreLock};
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

    /// Imports the JSON array of jobs in the list-response format that `input` holds
    /// (`source` names it in messages), reading it element by element: memory stays bounded
    /// whatever its size. All or nothing: on a bad entry, a duplicate, a conflict, a store
    /// failure or input that breaks off, every job this seed inserted is removed again. With
    /// `enqueue` the worker gets the seeded jobs only once every one is in (and a crash before
    /// that leaves them unenqueued: seeding the same file again enqueues them).
    pub fn job_seed(
        &self,
        input: &mut dyn Read,
        source: &str,
        enqueue: bool,
    ) -> Result<SeedOutcome> {
        // One seed at a time in this process, and on the store (several appliances on one
        // database): the sequence numbers from its first to its last are then its own jobs'
        // and the API's (never seeded).
        let _one = self.seeding.lock().unwrap_or_else(|e| e.into_inner());
        let _everywhere = self.store.lock(Exclusive::Seed)?;
        let mut seed = Seed {
            svc: self,
            enqueue,
            range: None,
            batch: Vec::with_capacity(SEED_BATCH),
            batch_ids: HashSet::with_capacity(SEED_BATCH),
            outcome: SeedOutcome {
                inserted: 0,
                unchanged: 0,
            },
            present: Vec::new(),
        };
        let created = now();
        let read = read_seed(input, source, &mut |number, entry| {
            seed.add(number, &entry, created)
        });
        if let Err(e) = read.and_then(|()| seed.write_batch()) {
            let undone = seed.roll_back();
            if let Err(f) = self.flush() {
                tracing::error!("job seed: flushing after the rollback failed: {f}");
            }
            return Err(match undone {
                Ok(()) => e,
                Err(undo) => {
                    tracing::error!("job seed: the rollback of a refused seed failed: {undo}");
                    ServiceError::internal(
                        &format!("{e}; removing the jobs the seed had inserted failed too"),
                        undo,
                    )
                }
            });
        }
        if enqueue {
            seed.enqueue()?;
        }
        self.flush()?;
        if enqueue {
            self.board.wake();
        }
        Ok(seed.outcome)
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
        let inputs = self.store.copy_inputs(image_uuid, dst_key)?;
        let (image, answered) = match inputs.image {
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
        let dst_tenant = inputs
            .tenant
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
        let known = |id: &str| inputs.regions.iter().find(|r| r.id == id).cloned();
        let src_region = match answered {
            Some(region) => region,
            None => self.usable(&image.region, known(&image.region))?,
        };
        let dst_region = if dst_tenant.region == src_region.id {
            src_region.clone()
        } else {
            self.usable(&dst_tenant.region, known(&dst_tenant.region))?
        };
        let owner = TenantKey::parse(&image.owner).ok_or_else(|| {
            ServiceError::Internal(format!("image {image_id} has a malformed owner"))
        })?;
        // The checks of room and quotas, one request at a time: the room is promised before
        // the lock goes, so the next request counts it; quotas count stored jobs, so with a
        // quota the lock, and the store's quota lock that orders every appliance's requests,
        // are held until the job is stored too.
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
        let job = Job::new_queued(wire, inputs.seq, now(), image.size);
        let id = job.wire.job_id;
        if let Some(device) = admitted.device {
            self.space.promise(id, device, job.bytes_total);
        }
        let admission = admitted.quotas.is_some().then_some(admission);
        if let Err(e) = self.store.insert_jobs(&[(owner, job.clone())]) {
            self.space.release(id);
            return Err(e);
        }
        drop(admitted.quotas);
        drop(admission);
        self.flush()?;
        self.board.wake();
        tracing::info!(job = %job.wire.job_id, image = %image_uuid, to = %job.wire.destination_tenant_id, "replicate_requested");
        Ok(job)
    }
}

/// What [`Service::admit`] found.
pub(super) struct Admitted<'a> {
    /// The device whose room the job is to be promised.
    pub device: Option<u64>,
    /// Held if a quota applied: then the job must be stored before the next admission, on
    /// any appliance of the store.
    pub quotas: Option<StoreLock<'a>>,
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
    ) -> Result<Admitted<'_>> {
        if let Some(image) = image {
            super::check_accepts(dst_region, &image.disk_format)?;
        }
        self.check_store_room()?;
        let Some(image) = image else {
            return Ok(Admitted {
                device: None,
                quotas: None,
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
    /// (whose region receives the copy). If a quota applies, the store's quota lock, taken
    /// before counting: the caller keeps it until the job is stored.
    pub(super) fn check_quotas(
        &self,
        source: TenantKey,
        destination: TenantKey,
        dst_tenant: &Tenant,
        image: &Image,
    ) -> Result<Option<StoreLock<'_>>> {
        let src_tenant = if source == destination {
            Some(dst_tenant.clone())
        } else {
            self.store.tenant(source)?
        };
        let quota_jobs = src_tenant.as_ref().and_then(|t| t.quota_jobs);
        let quota_bytes = dst_tenant.quota_bytes;
        if quota_jobs.is_none() && quota_bytes.is_none() {
            return Ok(None);
        }
        let hold = self.store.lock(Exclusive::Quotas)?;
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
        Ok(Some(hold))
    }

    pub(super) fn usable_region(&self, id: &str) -> Result<Region> {
        self.usable(id, self.store.region(id)?)
    }

    /// Region `id` as read (`None`: it is gone), if its store is usable.
    fn usable(&self, id: &str, region: Option<Region>) -> Result<Region> {
        let region = region
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

/// Jobs written to the store in one transaction by `job seed`. sled holds a transaction's
/// writes several times over in memory (a batch of 5,000 jobs took some 80 MB more than one
/// of 500, which seeds as fast).
const SEED_BATCH: usize = 500;

/// A `job seed` under way: the batch being filled and what is written so far.
struct Seed<'a> {
    svc: &'a Service,
    enqueue: bool,
    /// The first and the last sequence number this seed took.
    range: Option<(u64, u64)>,
    batch: Vec<(TenantKey, Job)>,
    /// The ids in `batch`.
    batch_ids: HashSet<Uuid>,
    outcome: SeedOutcome,
    /// Jobs of the file already present, seeded and not yet enqueued (left by a seed that
    /// crashed or ran without `--enqueue`): `--enqueue` enqueues them with the new ones.
    present: Vec<Uuid>,
}

impl Seed<'_> {
    /// Job `number` (from 1) of the file.
    fn add(&mut self, number: usize, entry: &serde_json::Value, created: u64) -> Result<()> {
        let (key, wire) = parse_seed_entry(entry)
            .map_err(|why| ServiceError::BadRequest(format!("job #{number} in the file: {why}")))?;
        if !self.batch_ids.insert(wire.job_id) {
            return Err(twice(wire.job_id));
        }
        let seq = self.svc.store.next_seq()?;
        self.range = Some((self.range.map_or(seq, |(first, _)| first), seq));
        let mut job = Job::new_queued(wire, seq, created, 0);
        job.seeded = true;
        // The worker gets nothing before the whole file is in (a rollback could remove what it
        // started); a terminal job is never queued, so it is marked as it ends up at once.
        job.enqueued = self.enqueue && job.wire.status.is_terminal();
        self.batch.push((key, job));
        if self.batch.len() >= SEED_BATCH {
            self.write_batch()?;
        }
        Ok(())
    }

    /// Whether `job` (found in the store) was written by this seed.
    fn wrote(&self, job: &Job) -> bool {
        job.seeded
            && self
                .range
                .is_some_and(|(first, last)| (first..=last).contains(&job.seq))
    }

    /// Inserts the batch in one transaction.
    fn write_batch(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let inserted = match self.svc.store.insert_jobs(&self.batch) {
            Ok(inserted) => inserted,
            Err(ServiceError::Conflict(why)) => {
                // None of the batch is in: an id with a job of this seed is a duplicate of an
                // earlier batch's, which is what to say.
                for (_, job) in &self.batch {
                    if let Some(old) = self.svc.store.job(job.wire.job_id)? {
                        if self.wrote(&old) {
                            return Err(twice(job.wire.job_id));
                        }
                    }
                }
                return Err(ServiceError::Conflict(why));
            }
            Err(e) => return Err(e),
        };
        if inserted < self.batch.len() {
            // Some were present already, identical: of an earlier seed, or of an earlier batch
            // of this one (a duplicate in the file).
            for (_, job) in &self.batch {
                let Some(old) = self.svc.store.job(job.wire.job_id)? else {
                    continue;
                };
                if old.seq == job.seq {
                    continue;
                }
                if self.wrote(&old) {
                    return Err(twice(job.wire.job_id));
                }
                if self.enqueue && old.seeded && !old.enqueued && !old.wire.status.is_terminal() {
                    self.present.push(old.wire.job_id);
                }
            }
        }
        self.outcome.inserted += inserted;
        self.outcome.unchanged += self.batch.len() - inserted;
        self.batch.clear();
        self.batch_ids.clear();
        Ok(())
    }

    /// Pages through this seed's jobs that pass `keep`, handing each page to `each`.
    fn pages(
        &self,
        keep: &dyn Fn(&Job) -> bool,
        each: &mut dyn FnMut(Vec<Job>) -> Result<()>,
    ) -> Result<()> {
        let Some((first, _)) = self.range else {
            return Ok(());
        };
        let mut after = first.checked_sub(1);
        loop {
            let query = JobQuery {
                tenant: None,
                after,
                limit: SEED_BATCH,
            };
            // Past the last sequence number nothing is kept, so a page stops there short.
            let page = self.svc.store.jobs(&query, &|j| self.wrote(j) && keep(j))?;
            let full = page.len() >= SEED_BATCH;
            after = page.last().map(|j| j.seq);
            each(page)?;
            if !full {
                return Ok(());
            }
        }
    }

    /// Removes every job this seed inserted.
    fn roll_back(&self) -> Result<()> {
        let mut removed = 0;
        self.pages(&|_| true, &mut |page| {
            let ids: Vec<Uuid> = page.iter().map(|j| j.wire.job_id).collect();
            removed += self.svc.store.remove_jobs(&ids, &|j| self.wrote(j))?.len();
            Ok(())
        })?;
        tracing::info!(removed, "job seed refused: its jobs are removed again");
        Ok(())
    }

    /// Lets the worker take this seed's jobs that are not terminal (and those of the file
    /// that a seed before left unenqueued).
    fn enqueue(&self) -> Result<()> {
        let waiting = |j: &Job| !j.enqueued && !j.wire.status.is_terminal();
        let set = |id: Uuid| {
            self.svc.store.update_job(id, &|j| {
                j.enqueued = true;
                Ok(ImageChange::None)
            })
        };
        self.pages(&waiting, &mut |page| {
            page.iter().try_for_each(|j| set(j.wire.job_id).map(drop))
        })?;
        self.present.iter().try_for_each(|id| set(*id).map(drop))
    }
}

fn twice(id: Uuid) -> ServiceError {
    ServiceError::BadRequest(format!("job {id} appears twice in the file"))
}

/// Reads the JSON array of a seed file element by element, handing each with its number in
/// the file (from 1) to `each`; the first error `each` returns ends the reading.
fn read_seed(
    input: &mut dyn Read,
    source: &str,
    each: &mut dyn FnMut(usize, serde_json::Value) -> Result<()>,
) -> Result<()> {
    use serde::de::{Deserializer as _, SeqAccess, Visitor};

    struct Elements<'a> {
        each: &'a mut dyn FnMut(usize, serde_json::Value) -> Result<()>,
        /// What `each` refused with (serde carries only a message).
        refused: &'a mut Option<ServiceError>,
    }

    impl<'de> Visitor<'de> for Elements<'_> {
        type Value = ();

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON array of jobs")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
            let mut number = 0;
            while let Some(entry) = seq.next_element::<serde_json::Value>()? {
                number += 1;
                if let Err(e) = (self.each)(number, entry) {
                    *self.refused = Some(e);
                    return Err(serde::de::Error::custom("refused"));
                }
            }
            Ok(())
        }
    }

    let mut refused = None;
    let mut de =
        serde_json::Deserializer::from_reader(std::io::BufReader::with_capacity(64 * 1024, input));
    let read = de
        .deserialize_seq(Elements {
            each,
            refused: &mut refused,
        })
        .and_then(|()| de.end());
    if let Some(e) = refused {
        return Err(e);
    }
    match read {
        Ok(()) => Ok(()),
        Err(e) if e.is_io() => Err(ServiceError::BadRequest(format!(
            "cannot read {source}: {e}"
        ))),
        Err(e) if e.is_data() => Err(ServiceError::BadRequest(format!(
            "{source} must hold a JSON array of jobs, as GET /v2/extension/image_replicator/jobs returns"
        ))),
        Err(e) => Err(ServiceError::BadRequest(format!(
            "{source} is not valid JSON: {e}"
        ))),
    }
}
