//! One job's copy: attempts with backoff, the destination image, the transfer with progress,
//! cancel and the bandwidth cap, and the end of a successful copy.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{recovery::conclude, Ctx};
use crate::copy::{Control, Stop};
use crate::error::{Result, ServiceError};
use crate::model::{now, Image, ImageStatus, Job, JobStatus, Region, TenantKey};
use crate::regions::{transfer, verify, ImageStore, Recorded, StoreError, TransferError};
use crate::store::ImageChange;
use crate::text::escape;

/// Attempts of a copy that meets transient errors, the first included.
const ATTEMPTS: u32 = 4;
/// Backoff before the first retry; doubled each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Progress is persisted at most this often (and only when a whole percent was gained).
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// How a copy attempt ended, when not with success.
enum Failure {
    Stopped(Stop),
    /// Worth another attempt (an I/O error that may pass).
    Transient(String),
    /// Final: the job ends in `error` with this reason.
    Fatal(String),
    /// The destination has no room now: the job waits for some (see [`super::SPACE_WAIT`]).
    NoSpace(String),
}

impl From<ServiceError> for Failure {
    fn from(e: ServiceError) -> Self {
        Failure::Transient(e.to_string())
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Transient(why) => Failure::Transient(why),
            StoreError::Fatal(why) => Failure::Fatal(why),
            StoreError::NoSpace(why) => Failure::NoSpace(why),
        }
    }
}

impl From<TransferError> for Failure {
    fn from(e: TransferError) -> Self {
        match e {
            TransferError::Stopped(stop) => Failure::Stopped(stop),
            TransferError::Failed(e) => e.into(),
        }
    }
}

pub(super) fn replicate(ctx: &Ctx, id: Uuid, cancel: &AtomicBool) -> Result<()> {
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let reason = match copy_once(ctx, id, cancel) {
            Ok(()) => return Ok(()),
            Err(Failure::Stopped(Stop::Cancel)) => return conclude(ctx, id, None),
            Err(Failure::Stopped(Stop::Shutdown)) => {
                tracing::info!(job = %id, "copy paused for shutdown; it resumes at the next start");
                return Ok(());
            }
            Err(Failure::Fatal(reason)) => return conclude(ctx, id, Some(reason)),
            Err(Failure::NoSpace(reason)) => return wait_for_space(ctx, id, reason),
            Err(Failure::Transient(reason)) => reason,
        };
        if attempt == ATTEMPTS {
            return conclude(
                ctx,
                id,
                Some(format!("{reason} (gave up after {ATTEMPTS} attempts)")),
            );
        }
        tracing::warn!(job = %id, attempt, "copy failed, retrying in {backoff:?}: {}", escape(&reason));
        let until = Instant::now() + backoff;
        while Instant::now() < until {
            if ctx.stopping() {
                return Ok(());
            }
            if cancel.load(Ordering::SeqCst) {
                return conclude(ctx, id, None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        backoff *= 2;
    }
    Ok(())
}

/// The copy found no room at its destination (before writing, or while writing, when what
/// it wrote is already gone): it is parked and tried again once space may be back, or ends in
/// `error` after [`super::SPACE_WAIT`].
fn wait_for_space(ctx: &Ctx, id: Uuid, reason: String) -> Result<()> {
    match ctx.wait_for_space(id) {
        Some(wait) => {
            tracing::warn!(job = %id, "no room at the destination, trying again in {wait:?}: {}", escape(&reason));
            ctx.park(id, wait);
            Ok(())
        }
        None => conclude(
            ctx,
            id,
            Some(format!(
                "{reason} (no room came back within {} s)",
                super::SPACE_WAIT.as_secs()
            )),
        ),
    }
}

/// A region of the job, or why the copy cannot happen.
fn region(ctx: &Ctx, id: &str, which: &str) -> std::result::Result<Region, Failure> {
    ctx.parts
        .store
        .region(id)?
        .ok_or_else(|| Failure::Fatal(format!("{which} region {id} was removed")))
}

/// The source image as its region records it now; it must still be active.
fn source_image(
    ctx: &Ctx,
    job: &Job,
    store: &dyn ImageStore,
) -> std::result::Result<Image, Failure> {
    let source_id = job.wire.source_image_id;
    let source = match store.records() {
        Some(records) => records.image(source_id)?,
        None => ctx.parts.store.image(source_id)?,
    };
    match source {
        Some(image) if image.status == ImageStatus::Active => Ok(image),
        Some(image) => Err(Failure::Fatal(format!(
            "source image {source_id} is {}, not active",
            image.status
        ))),
        None => Err(Failure::Fatal(format!(
            "source image {source_id} does not exist"
        ))),
    }
}

fn copy_once(ctx: &Ctx, id: Uuid, cancel: &AtomicBool) -> std::result::Result<(), Failure> {
    let store = &ctx.parts.store;
    let Some(job) = store.job(id)? else {
        return Ok(());
    };
    if job.cancel_asked() {
        return Err(Failure::Stopped(Stop::Cancel));
    }
    let src_region = region(ctx, &job.wire.source_region_id, "source")?;
    let src_store = ctx.parts.stores.get(&src_region)?;
    let source = source_image(ctx, &job, &*src_store)?;
    let dst_region = region(ctx, &job.wire.destination_region_id, "destination")?;
    let dst_store = ctx.parts.stores.get(&dst_region)?;
    let dst_key = TenantKey::parse(&job.wire.destination_tenant_id).ok_or_else(|| {
        Failure::Fatal(format!(
            "destination tenant id {} is malformed",
            job.wire.destination_tenant_id
        ))
    })?;
    // Where the appliance keeps the destination's record, a previous attempt's `saving` image
    // is reused; a store with records of its own gets a new image, the previous one deleted
    // first. Never one named only by the wire field (a seeded job's belongs to someone else).
    let keeps_record = dst_store.records().is_none();
    let existing = match (keeps_record, job.created_destination) {
        (true, Some(d)) => store
            .image(d)?
            .filter(|i| i.status == ImageStatus::Saving && i.region == dst_region.id),
        (false, Some(d)) => {
            dst_store.remove(d)?;
            None
        }
        (_, None) => None,
    };
    let dst_image = existing.clone().unwrap_or_else(|| Image {
        id: Uuid::new_v4(),
        name: source.name.clone(),
        owner: job.wire.destination_tenant_id.clone(),
        region: dst_region.id.clone(),
        status: ImageStatus::Saving,
        disk_format: source.disk_format.clone(),
        container_format: source.container_format.clone(),
        size: 0,
        checksum: None,
        os_hash_algo: None,
        os_hash_value: None,
        created_at: now(),
        updated_at: now(),
    });
    // Room for the whole image beside the reserve and what other accepted copies will write,
    // checked before anything is written; then promised to this copy.
    if let Some(space) = dst_store.space() {
        let reserve = ctx.parts.min_free.of(space.total);
        let others = ctx.parts.space.promised(space.device, Some(id));
        crate::worker::space::room_for(&space, reserve, others, source.size).map_err(|why| {
            Failure::NoSpace(format!(
                "destination region {} has no room for image {}: {why}",
                dst_region.id, source.id
            ))
        })?;
        ctx.parts.space.promise(id, space.device, source.size);
    }
    let insert_record = keeps_record && existing.is_none();
    let started = store.update_job(id, &|job| {
        if !job.start(dst_image.id, source.size, now()) {
            return Ok(ImageChange::None);
        }
        Ok(if insert_record {
            ImageChange::Insert(dst_key, dst_image.clone())
        } else {
            ImageChange::None
        })
    })?;
    // The new image's id must be on disk before any file or remote record carries it.
    store.flush()?;
    match started {
        Some(job) if job.wire.status == JobStatus::Replicating => {}
        Some(job) if job.cancel_asked() => return Err(Failure::Stopped(Stop::Cancel)),
        _ => return Ok(()),
    }
    tracing::info!(job = %id, image = %dst_image.id, from = %src_region.id, to = %dst_region.id, "replicating");

    let copy = Copy {
        ctx,
        id,
        cancel,
        source: &source,
    };
    let mut input = src_store.open(&source)?;
    let stopping = || copy.stopping().is_some();
    let sink = dst_store.create(&dst_image, &source, &stopping)?;
    let recorded = copy.run(&mut *input, sink)?;
    let active = keeps_record.then(|| {
        let mut active = dst_image.clone();
        active.status = ImageStatus::Active;
        active.size = recorded.size;
        // Equal SHA-512 means equal bytes, so the source's MD5 is the copy's.
        active.checksum = recorded.checksum.or_else(|| source.checksum.clone());
        active.os_hash_algo = recorded.os_hash_algo;
        active.os_hash_value = recorded.os_hash_value;
        active.updated_at = now();
        active
    });
    let finished = store.update_job(id, &|job| {
        if !job.complete(now()) {
            return Ok(ImageChange::None);
        }
        Ok(match &active {
            Some(image) => ImageChange::Put(image.clone()),
            None => ImageChange::None,
        })
    })?;
    store.flush()?;
    match finished.map(|j| j.wire.status) {
        Some(JobStatus::Replicated) => {
            tracing::info!(job = %id, bytes = source.size, "replicated");
            Ok(())
        }
        // A cancel won the race against the last chunk: it is honoured.
        _ => Err(Failure::Stopped(Stop::Cancel)),
    }
}

/// One copy attempt's stream of bytes, with progress, cancel and the bandwidth cap.
struct Copy<'a> {
    ctx: &'a Ctx,
    id: Uuid,
    cancel: &'a AtomicBool,
    source: &'a Image,
}

impl Copy<'_> {
    /// Whether the copy must stop now (a cancel or shutdown), and which.
    fn stopping(&self) -> Option<Stop> {
        if self.ctx.stopping() {
            Some(Stop::Shutdown)
        } else if self.cancel.load(Ordering::SeqCst) {
            Some(Stop::Cancel)
        } else {
            None
        }
    }

    /// Streams `input` into `sink` with this job's progress, stop and bandwidth control; the
    /// destination publishes the image only if what it recorded matches the source record.
    fn run(
        &self,
        input: &mut dyn std::io::Read,
        sink: Box<dyn crate::regions::Sink + '_>,
    ) -> std::result::Result<Recorded, Failure> {
        let (ctx, id, size) = (self.ctx, self.id, self.source.size);
        let store = &ctx.parts.store;
        let cancel_seen = Cell::new(false);
        let stop = || {
            self.stopping()
                .or_else(|| cancel_seen.get().then_some(Stop::Cancel))
        };
        let mut persisted = (0u8, Instant::now());
        let mut counted = 0u64;
        let mut progress = |copied: u64| {
            ctx.parts.space.progress(id, copied);
            ctx.parts
                .metrics
                .bytes_copied
                .fetch_add(copied.saturating_sub(counted), Ordering::Relaxed);
            counted = copied;
            let percent = (copied.min(size) * 100)
                .checked_div(size)
                .map_or(100, |p| p as u8);
            if percent <= persisted.0 || persisted.1.elapsed() < PROGRESS_INTERVAL {
                return;
            }
            persisted = (percent, Instant::now());
            let update = store.update_job(id, &|job| {
                job.progress(copied, now());
                Ok(ImageChange::None)
            });
            match update {
                Ok(Some(job)) if job.wire.status == JobStatus::CancelRequested => {
                    cancel_seen.set(true)
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(job = %id, "cannot record progress: {e}"),
            }
        };
        let mut control = Control {
            stop: &stop,
            progress: &mut progress,
            limiter: ctx.limiter.as_ref(),
        };
        Ok(transfer(input, sink, &mut control, &|recorded| {
            verify(self.source, recorded)
        })?)
    }
}
