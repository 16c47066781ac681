//! A job's life after it ended: retries (a new job from an `error` or `canceled` one) and the
//! purge of terminal jobs (`job purge`, `serve --job-retention`).

use uuid::Uuid;

use super::Service;
use crate::auth::Principal;
use crate::error::{Result, ServiceError};
use crate::model::{now, ImageStatus, Job, JobStatus, JobStory, JobWire, TenantKey};
use crate::store::JobQuery;

/// Jobs removed per store transaction by a purge.
const PURGE_BATCH: usize = 512;

/// Which jobs a purge removes: terminal ones that ended `older_than_secs` ago or longer, of
/// `statuses` (every terminal status when empty).
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
pub struct PurgeRule {
    pub older_than_secs: u64,
    #[serde(default)]
    pub statuses: Vec<JobStatus>,
}

impl PurgeRule {
    /// Refuses a status that is not terminal (those jobs are still being worked on).
    pub fn check(&self) -> Result<()> {
        if let Some(s) = self.statuses.iter().find(|s| !s.is_terminal()) {
            return Err(ServiceError::BadRequest(format!(
                "jobs that are {s} are not finished and cannot be purged; purge replicated, canceled or error jobs"
            )));
        }
        Ok(())
    }

    /// Whether `job` goes at `now`: it ended (its `finished_at`, else its last change, for
    /// jobs from before that was recorded) at least `older_than_secs` before `now`.
    pub fn takes(&self, job: &Job, now: u64) -> bool {
        let status = job.wire.status;
        let ended = job.story.finished_at.unwrap_or(job.updated_at);
        status.is_terminal()
            && (self.statuses.is_empty() || self.statuses.contains(&status))
            && ended.saturating_add(self.older_than_secs) <= now
    }
}

impl Service {
    /// The admin's `job retry`.
    pub fn job_retry(&self, id: &str) -> Result<Job> {
        self.retry_job(None, id)
    }

    /// A new `replicate_requested` job with the same source and destination as job `id`,
    /// which must be `error` or `canceled` (409 otherwise) and visible to `who` (`None`: the
    /// admin CLI). It passes the checks of a new copy request (room, quotas), and its
    /// `retries` is the old job's plus one. The old job names it (`retried_by`): a job is
    /// retried once; retry the new one next. A partial destination image the old job kept
    /// (it gave up after transient failures) is the new job's to continue.
    pub fn retry_job(&self, who: Option<&Principal>, id: &str) -> Result<Job> {
        // From the checks to the insert, one request at a time (two retries of one job, or a
        // retry beside a new copy request, cannot both pass the same check).
        let _admission = self
            .admission
            .lock()
            .map_err(|_| ServiceError::Internal("the admission lock is poisoned".into()))?;
        let old = self.visible_job(who, id)?;
        let old_id = old.wire.job_id;
        match old.wire.status {
            JobStatus::Error | JobStatus::Canceled => {}
            JobStatus::Replicated => {
                return Err(ServiceError::Conflict(format!(
                    "job {old_id} is replicated; only error or canceled jobs can be retried"
                )))
            }
            status => {
                return Err(ServiceError::Conflict(format!(
                    "job {old_id} is {status} and has not ended; only error or canceled jobs can be retried"
                )))
            }
        }
        if let Some(by) = old.story.retried_by {
            if self.store.job(by)?.is_some() {
                return Err(ServiceError::Conflict(format!(
                    "job {old_id} was retried already as job {by}; retry that one if it failed too"
                )));
            }
        }
        let dst_key = TenantKey::parse(&old.wire.destination_tenant_id).ok_or_else(|| {
            ServiceError::Internal(format!("job {old_id} has a malformed destination tenant"))
        })?;
        let owner = TenantKey::parse(&old.wire.source_tenant_id).ok_or_else(|| {
            ServiceError::Internal(format!("job {old_id} has a malformed source tenant"))
        })?;
        let dst_tenant = self.store.tenant(dst_key)?.ok_or_else(|| {
            ServiceError::Conflict(format!(
                "the destination tenant {} of job {old_id} no longer exists",
                old.wire.destination_tenant_id
            ))
        })?;
        // A source whose record the appliance keeps must still be there and active; another
        // region's is checked by the copy itself.
        let image = self.store.image(old.wire.source_image_id)?;
        if let Some(image) = &image {
            if image.status != ImageStatus::Active {
                return Err(ServiceError::Conflict(format!(
                    "the source image {} of job {old_id} is {}, not active",
                    image.id, image.status
                )));
            }
        }
        let dst_region = self.usable_region(&dst_tenant.region)?;
        // Kept to the end: a quota's hold must outlast the insert.
        let admitted = self.admit(owner, dst_key, &dst_tenant, &dst_region, image.as_ref())?;
        let device = admitted.device;
        let wire = JobWire {
            copy_progress: 0,
            destination_image_id: None,
            job_id: Uuid::new_v4(),
            status: JobStatus::ReplicateRequested,
            // Where the destination tenant lives now, as a new copy request would say.
            destination_region_id: dst_region.id.clone(),
            ..old.wire.clone()
        };
        let bytes_total = image.as_ref().map_or(old.bytes_total, |i| i.size);
        let mut job = Job::new_queued(wire, self.store.next_seq()?, now(), bytes_total);
        // The partial image the failed job kept: the new job continues it, from what it
        // holds verified (the copy checks it chunk by chunk before going on).
        job.created_destination = match old.story.kept_destination {
            Some(kept) => self
                .store
                .image(kept)?
                .filter(|i| i.status == ImageStatus::Saving && i.region == dst_region.id)
                .map(|i| i.id),
            None => None,
        };
        job.story = JobStory {
            retries: old.story.retries.saturating_add(1),
            retry_of: Some(old_id),
            ..JobStory::default()
        };
        let new_id = job.wire.job_id;
        // The old job names its retry first: a crash before the insert leaves it naming a job
        // that does not exist, which does not stop the next retry.
        self.store.update_job(old_id, &|j| {
            j.story.retried_by = Some(new_id);
            j.story.kept_destination = None;
            Ok(crate::store::ImageChange::None)
        })?;
        self.store.insert_jobs(&[(owner, job.clone())])?;
        if let Some(device) = device {
            self.space.promise(new_id, device, job.bytes_total);
        }
        drop(_admission);
        self.flush()?;
        self.board.wake();
        tracing::info!(job = %new_id, retry_of = %old_id, retries = job.story.retries, "replicate_requested (a retry)");
        Ok(job)
    }

    /// Removes the terminal jobs `rule` takes, with their index and queue entries; the job
    /// list bodies and counts kept in memory follow (they are keyed by the jobs' version).
    /// The tenants they named are free to be removed afterwards. How many went.
    pub fn purge_jobs(&self, rule: &PurgeRule) -> Result<usize> {
        rule.check()?;
        let at = now();
        let mut doomed = Vec::new();
        for job in self
            .store
            .jobs(&JobQuery::all(None), &|j| rule.takes(j, at))?
        {
            // A partial image kept for a retry goes first; if it cannot, the job stays for
            // the next purge.
            if let Some(kept) = job.story.kept_destination {
                if let Err(e) = self.remove_kept(kept) {
                    tracing::warn!(job = %job.wire.job_id, image = %kept, "cannot remove the partial image kept for a retry; the job is purged later: {e}");
                    continue;
                }
            }
            doomed.push(job.wire.job_id);
        }
        let mut purged = 0;
        for batch in doomed.chunks(PURGE_BATCH) {
            purged += self.store.remove_jobs(batch, &|j| rule.takes(j, at))?.len();
        }
        if purged > 0 {
            self.flush()?;
            tracing::info!(
                purged,
                older_than_secs = rule.older_than_secs,
                "terminal jobs purged"
            );
        }
        Ok(purged)
    }

    /// Removes a partial destination image a failed job kept: its bytes, then its record.
    fn remove_kept(&self, id: Uuid) -> Result<()> {
        let Some(image) = self.store.image(id)? else {
            return Ok(());
        };
        if let Some(region) = self.store.region(&image.region)? {
            self.images_of(&region)?
                .remove(id)
                .map_err(|e| ServiceError::internal("cannot remove the partial image", e))?;
        }
        if let Some(owner) = TenantKey::parse(&image.owner) {
            self.store.remove_image(owner, id)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(status: JobStatus, updated_at: u64, finished_at: Option<u64>) -> Job {
        let text = format!(
            r#"{{"copy_progress":0,"destination_image_id":null,"destination_region_id":"ot2","destination_tenant_id":"91b5c7c09cbd45caa3c146fd67ae471e","job_id":"0fa2817d-4e54-455d-a676-c78e863297e9","source_image_id":"335eef3f-551d-46e1-8781-173f43209d48","source_image_name":"cirros","source_region_id":"ot1","source_tenant_id":"236ae314ef6944f4ab98fa7519e54325","status":"{status}","seq":1,"created_at":"2026-01-01T00:00:00Z","updated_at":"{}","bytes_copied":0,"bytes_total":0,"error":null,"seeded":false,"enqueued":true}}"#,
            crate::model::rfc3339(updated_at)
        );
        let mut job: Job = serde_json::from_str(&text).expect("job");
        job.story.finished_at = finished_at;
        job
    }

    #[test]
    fn a_purge_removes_the_partial_image_a_failed_job_kept_with_the_job() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = crate::store::open(
            &dir.path().join("data"),
            &crate::store::StoreConfig::embedded(),
        )
        .expect("store");
        let svc = Service::new(store, dir.path().join("data"));
        let region = svc.region_add("ot2", None, None, None).expect("region");
        let tenant = "91b5c7c09cbd45caa3c146fd67ae471e";
        svc.tenant_add_with_quotas(tenant, "ot2", None, None, None)
            .expect("tenant");
        let kept = Uuid::new_v4();
        let image: crate::model::Image = serde_json::from_value(serde_json::json!({
            "id": kept, "name": "part", "owner": tenant, "region": "ot2", "status": "saving",
            "disk_format": "raw", "container_format": "bare", "size": 0, "checksum": null,
            "os_hash_algo": null, "os_hash_value": null,
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"
        }))
        .expect("image");
        let key = TenantKey::parse(tenant).expect("key");
        svc.store.insert_image(key, &image).expect("insert image");
        let crate::model::RegionKind::Directory { dir: ot2 } = &region.kind else {
            panic!("a directory region");
        };
        let part = ot2.join(format!(".{kept}.part"));
        std::fs::write(&part, b"verified bytes").expect("partial file");
        let mut failed = job(JobStatus::Error, 0, Some(1));
        failed.story.kept_destination = Some(kept);
        let owner = TenantKey::parse(&failed.wire.source_tenant_id).expect("owner");
        svc.store
            .insert_jobs(&[(owner, failed.clone())])
            .expect("job");
        let rule = PurgeRule {
            older_than_secs: 1,
            statuses: vec![],
        };
        assert_eq!(svc.purge_jobs(&rule).expect("purge"), 1);
        assert_eq!(svc.store.job(failed.wire.job_id).expect("job"), None);
        assert_eq!(svc.store.image(kept).expect("image"), None);
        assert!(!part.exists(), "the partial file is gone");
        // The tenant is free to go.
        svc.tenant_remove(tenant).expect("tenant remove");
    }

    #[test]
    fn a_purge_takes_only_terminal_jobs_that_ended_long_enough_ago() {
        let rule = PurgeRule {
            older_than_secs: 100,
            statuses: vec![],
        };
        assert!(rule.takes(&job(JobStatus::Error, 0, Some(1000)), 1100));
        assert!(!rule.takes(&job(JobStatus::Error, 0, Some(1001)), 1100));
        // Without an end time (an older record), its last change counts.
        assert!(rule.takes(&job(JobStatus::Canceled, 1000, None), 1100));
        assert!(!rule.takes(&job(JobStatus::Replicating, 0, None), 1100));
        let only_errors = PurgeRule {
            older_than_secs: 100,
            statuses: vec![JobStatus::Error],
        };
        assert!(!only_errors.takes(&job(JobStatus::Replicated, 0, Some(0)), 1100));
        assert!(only_errors.check().is_ok());
        let wrong = PurgeRule {
            older_than_secs: 1,
            statuses: vec![JobStatus::Replicating],
        };
        assert!(matches!(wrong.check(), Err(ServiceError::BadRequest(_))));
    }
}
