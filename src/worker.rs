//! The replication worker: threads inside `serve` that take queued jobs oldest first and move
//! each through its lifecycle by really copying the bytes.
//!
//! - `replicate_requested` / `replicating`: create the destination image as `saving` (a record
//!   here for a directory region, `POST /v2/images` for a Glance one), stream the source (its
//!   file, or a Glance download) into a temporary file while hashing it with SHA-512 and verify
//!   size and SHA-512 against the source record, then fsync and rename; or stream it into the
//!   Glance upload and compare Glance's own record of what it stored with the source's. Then
//!   mark the job `replicated`.
//! - `cancel_requested` / `canceling`: remove whatever was written at the destination, then
//!   `canceled`. A running copy sees a cancel at its next chunk.
//! - On failure: retry transient errors (I/O, a Glance that does not answer) with exponential
//!   backoff, then `error` with a reason, leaving nothing at the destination (a Glance image
//!   that cannot be deleted yet is remembered and deleted once its Glance answers).
//! - On shutdown a copy stops at a chunk boundary and stays `replicating`; the next start
//!   resumes it from the beginning. At start-up, temporary files a crash left are removed.

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::copy::{
    copy_into, stream, Chunk, Control, CopyError, Digests, Hashes, RateLimiter, Stop, IN_FLIGHT,
};
use crate::error::{Result, ServiceError};
use crate::glance::Glance;
use crate::model::{now, Image, ImageStatus, Job, JobStatus, Region, TenantKey};
use crate::regions;
use crate::remote::RemoteError;
use crate::service::Service;
use crate::store::ImageChange;

/// Attempts of a copy that meets transient I/O errors, the first included.
const ATTEMPTS: u32 = 4;
/// Backoff before the first retry; doubled each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Progress is persisted at most this often (and only when a whole percent was gained).
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// How long an idle worker sleeps when nothing wakes it.
const IDLE: Duration = Duration::from_millis(500);
/// How often images that could not be deleted from a Glance are tried again.
const ORPHAN_SWEEP: Duration = Duration::from_secs(2);
/// How long a job whose processing failed is left alone before the next try.
const PARK: Duration = Duration::from_secs(5);

/// Shared between the service (which wakes the workers and signals cancels) and the workers.
#[derive(Default)]
pub struct Board {
    /// Jobs being worked on → their cancel flag.
    running: Mutex<HashMap<Uuid, Arc<AtomicBool>>>,
    wake: (Mutex<u64>, Condvar),
}

impl Board {
    /// Tells idle workers there is new work.
    pub fn wake(&self) {
        if let Ok(mut generation) = self.wake.0.lock() {
            *generation += 1;
            self.wake.1.notify_all();
        }
    }

    fn wait(&self, timeout: Duration) {
        if let Ok(generation) = self.wake.0.lock() {
            let start = *generation;
            let _ = self
                .wake
                .1
                .wait_timeout_while(generation, timeout, |g| *g == start);
        }
    }

    /// Signals a running copy of job `id` to stop for a cancel.
    pub fn cancel(&self, id: Uuid) {
        if let Some(flag) = self.running.lock().ok().and_then(|r| r.get(&id).cloned()) {
            flag.store(true, Ordering::SeqCst);
        }
        self.wake();
    }

    fn claim(&self, id: Uuid) -> Option<Arc<AtomicBool>> {
        let mut running = self.running.lock().ok()?;
        if running.contains_key(&id) {
            return None;
        }
        let flag = Arc::new(AtomicBool::new(false));
        running.insert(id, Arc::clone(&flag));
        Some(flag)
    }

    fn release(&self, id: Uuid) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(&id);
        }
    }

    pub fn active(&self) -> usize {
        self.running.lock().map_or(0, |r| r.len())
    }
}

pub struct WorkerConfig {
    pub threads: usize,
    /// Bytes per second for all copies together.
    pub max_bandwidth: Option<u64>,
}

struct Ctx {
    svc: Arc<Service>,
    limiter: Option<RateLimiter>,
    shutdown: AtomicBool,
    /// Jobs whose processing failed (a store error, a region that cannot be cleaned), left
    /// alone until the given time so they neither spin nor starve the jobs behind them.
    parked: Mutex<HashMap<Uuid, Instant>>,
    /// When orphaned Glance images were last tried.
    last_sweep: Mutex<Instant>,
}

/// The running worker threads.
pub struct Workers {
    ctx: Arc<Ctx>,
    threads: Vec<JoinHandle<()>>,
}

/// Starts the worker threads (after [`recover`]).
pub fn start(svc: Arc<Service>, config: &WorkerConfig) -> Result<Workers> {
    let ctx = Arc::new(Ctx {
        svc,
        limiter: config.max_bandwidth.map(RateLimiter::new),
        shutdown: AtomicBool::new(false),
        parked: Mutex::new(HashMap::new()),
        last_sweep: Mutex::new(
            Instant::now()
                .checked_sub(ORPHAN_SWEEP)
                .unwrap_or_else(Instant::now),
        ),
    });
    let mut threads = Vec::new();
    for n in 0..config.threads.max(1) {
        let ctx = Arc::clone(&ctx);
        let thread = std::thread::Builder::new()
            .name(format!("worker-{n}"))
            .spawn(move || run(&ctx))
            .map_err(|e| ServiceError::internal("cannot start a worker thread", e))?;
        threads.push(thread);
    }
    Ok(Workers { ctx, threads })
}

impl Workers {
    /// Stops taking jobs, stops copies at a chunk boundary, and waits up to `grace` for them.
    pub fn stop(self, grace: Duration) {
        self.ctx.shutdown.store(true, Ordering::SeqCst);
        self.ctx.svc.board.wake();
        let deadline = Instant::now() + grace;
        while self.threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for thread in self.threads {
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::warn!("a worker did not stop within {grace:?}");
            }
        }
    }
}

/// Start-up cleanup, before anything else uses the store: temporary files of interrupted
/// copies and imports, and images an interrupted import left `saving`.
pub fn recover(svc: &Service) -> Result<()> {
    for region in svc.store.regions()? {
        if region.glance.is_some() {
            continue;
        }
        let Ok(entries) = fs::read_dir(&region.dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".part") {
                tracing::info!(file = %entry.path().display(), "removing a leftover temporary file");
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    let mut destinations = std::collections::HashSet::new();
    for id in svc.store.queued() {
        if let Some(job) = svc.store.job(id?)? {
            destinations.extend(job.created_destination);
        }
    }
    for mut image in svc.store.images_saving()? {
        if destinations.contains(&image.id) {
            continue;
        }
        tracing::warn!(image = %image.id, "an interrupted import left this image saving; marking it killed");
        if let Some(region) = svc.store.region(&image.region)? {
            let _ = regions::remove_image(&region, image.id);
        }
        image.status = ImageStatus::Killed;
        image.updated_at = now();
        svc.store.update_image(&image)?;
    }
    svc.store.flush()
}

/// Deletes a job's image from a Glance region; if Glance cannot be reached it is remembered
/// as an orphan and deleted later, so the job can end now.
fn delete_from_glance(ctx: &Ctx, image: Uuid, region: &Region) -> Result<()> {
    let deleted = ctx
        .svc
        .glance
        .get(region)
        .and_then(|glance| glance.delete(image));
    if let Err(e) = deleted {
        tracing::warn!(%image, region = %region.id, "cannot delete the destination image yet, will retry: {e}");
        ctx.svc.store.add_orphan(image, &region.id)?;
        ctx.svc.store.flush()?;
    }
    Ok(())
}

/// Retries the deletion of orphaned Glance images (at most every [`ORPHAN_SWEEP`]).
fn sweep_orphans(ctx: &Ctx) {
    let Ok(mut last) = ctx.last_sweep.try_lock() else {
        return;
    };
    if last.elapsed() < ORPHAN_SWEEP {
        return;
    }
    *last = Instant::now();
    let orphans = match ctx.svc.store.orphans() {
        Ok(orphans) => orphans,
        Err(e) => {
            tracing::error!("cannot read the orphaned images: {e}");
            return;
        }
    };
    // A region that failed once is left alone until the next sweep: a Glance that does not
    // answer costs one timeout per sweep, not one per orphan.
    let mut failed = std::collections::HashSet::new();
    for (image, region_id) in orphans {
        if failed.contains(&region_id) {
            continue;
        }
        let deleted = match ctx.svc.store.region(&region_id) {
            Ok(Some(region)) => ctx
                .svc
                .glance
                .get(&region)
                .and_then(|glance| glance.delete(image)),
            // The region is gone: nothing left to delete from.
            Ok(None) => Ok(()),
            Err(e) => Err(RemoteError::Unavailable(e.to_string())),
        };
        match deleted {
            Ok(()) => {
                tracing::info!(%image, region = %region_id, "deleted an orphaned destination image");
                if let Err(e) = ctx.svc.store.remove_orphan(image) {
                    tracing::error!(%image, "cannot forget the orphan: {e}");
                }
            }
            Err(e) => {
                if e.is_transient() {
                    tracing::debug!(%image, "orphan still there: {e}");
                } else {
                    tracing::warn!(%image, region = %region_id, "Glance refuses to delete an orphaned image: {e}");
                }
                failed.insert(region_id);
            }
        }
    }
}

fn run(ctx: &Ctx) {
    let board = &ctx.svc.board;
    while !ctx.shutdown.load(Ordering::SeqCst) {
        sweep_orphans(ctx);
        match next(ctx) {
            Ok(Some((id, cancel))) => {
                if let Err(e) = process(ctx, id, &cancel) {
                    tracing::error!(job = %id, "worker failed on this job, retrying in {PARK:?}: {e}");
                    if let Ok(mut parked) = ctx.parked.lock() {
                        parked.insert(id, Instant::now() + PARK);
                    }
                }
                board.release(id);
            }
            Ok(None) => board.wait(IDLE),
            Err(e) => {
                tracing::error!("worker cannot read the queue: {e}");
                board.wait(IDLE);
            }
        }
    }
}

/// The oldest queued job that no other worker has and that is not parked.
fn next(ctx: &Ctx) -> Result<Option<(Uuid, Arc<AtomicBool>)>> {
    let now = Instant::now();
    if let Ok(mut parked) = ctx.parked.lock() {
        parked.retain(|_, until| *until > now);
    }
    for id in ctx.svc.store.queued() {
        let id = id?;
        if ctx.parked.lock().is_ok_and(|p| p.contains_key(&id)) {
            continue;
        }
        if let Some(flag) = ctx.svc.board.claim(id) {
            return Ok(Some((id, flag)));
        }
    }
    Ok(None)
}

/// How a copy attempt ended, when not with success.
enum Failure {
    Stopped(Stop),
    /// Worth another attempt (an I/O error that may pass).
    Transient(String),
    /// Final: the job ends in `error` with this reason.
    Fatal(String),
}

impl From<ServiceError> for Failure {
    fn from(e: ServiceError) -> Self {
        Failure::Transient(e.to_string())
    }
}

fn is_transient(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        Interrupted
            | TimedOut
            | WouldBlock
            | ResourceBusy
            | UnexpectedEof
            | ConnectionAborted
            | ConnectionReset
            | ConnectionRefused
            | BrokenPipe
    ) || e.raw_os_error() == Some(libc::EIO)
}

fn process(ctx: &Ctx, id: Uuid, cancel: &AtomicBool) -> Result<()> {
    let Some(job) = ctx.svc.store.job(id)? else {
        return ctx.svc.store.drop_queue_entry(id);
    };
    match job.wire.status {
        // A failure was being cleaned up when the process stopped: finish that.
        JobStatus::Replicating if job.error.is_some() => conclude(ctx, id, job.error),
        JobStatus::ReplicateRequested | JobStatus::Replicating => replicate(ctx, id, cancel),
        JobStatus::CancelRequested | JobStatus::Canceling => conclude(ctx, id, None),
        // Terminal: only a stale queue entry; rewriting the job drops it.
        _ => ctx
            .svc
            .store
            .update_job(id, |_| Ok(ImageChange::None))
            .map(drop),
    }
}

fn replicate(ctx: &Ctx, id: Uuid, cancel: &AtomicBool) -> Result<()> {
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
            Err(Failure::Transient(reason)) => reason,
        };
        if attempt == ATTEMPTS {
            return conclude(
                ctx,
                id,
                Some(format!("{reason} (gave up after {ATTEMPTS} attempts)")),
            );
        }
        tracing::warn!(job = %id, attempt, "copy failed, retrying in {backoff:?}: {reason}");
        let until = Instant::now() + backoff;
        while Instant::now() < until {
            if ctx.shutdown.load(Ordering::SeqCst) {
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

fn io_failure(what: &str, e: io::Error) -> Failure {
    let reason = format!("{what}: {e}");
    if is_transient(&e) {
        Failure::Transient(reason)
    } else {
        Failure::Fatal(reason)
    }
}

impl From<RemoteError> for Failure {
    fn from(e: RemoteError) -> Self {
        if e.is_transient() {
            Failure::Transient(e.to_string())
        } else {
            Failure::Fatal(e.to_string())
        }
    }
}

/// The source image, its region and the destination region, or why the copy cannot happen.
fn endpoints(ctx: &Ctx, job: &Job) -> std::result::Result<(Image, Region, Region), Failure> {
    let store = &ctx.svc.store;
    let region = |id: &str, which: &str| {
        store.region(id).map_err(Failure::from).and_then(|r| {
            r.ok_or_else(|| Failure::Fatal(format!("{which} region {id} was removed")))
        })
    };
    let source_id = job.wire.source_image_id;
    let src_region = region(&job.wire.source_region_id, "source")?;
    let source = match &src_region.glance {
        Some(_) => ctx
            .svc
            .glance
            .get(&src_region)?
            .image(source_id)?
            .map(|g| g.to_image(&src_region.id)),
        None => store.image(source_id)?,
    };
    let source = match source {
        Some(image) if image.status == ImageStatus::Active => image,
        Some(image) => {
            return Err(Failure::Fatal(format!(
                "source image {source_id} is {}, not active",
                image.status
            )))
        }
        None => {
            return Err(Failure::Fatal(format!(
                "source image {source_id} does not exist"
            )))
        }
    };
    let dst_region = region(&job.wire.destination_region_id, "destination")?;
    Ok((source, src_region, dst_region))
}

fn copy_once(ctx: &Ctx, id: Uuid, cancel: &AtomicBool) -> std::result::Result<(), Failure> {
    let store = &ctx.svc.store;
    let Some(job) = store.job(id)? else {
        return Ok(());
    };
    if matches!(
        job.wire.status,
        JobStatus::CancelRequested | JobStatus::Canceling
    ) {
        return Err(Failure::Stopped(Stop::Cancel));
    }
    let (source, src_region, dst_region) = endpoints(ctx, &job)?;
    let dst_key = TenantKey::parse(&job.wire.destination_tenant_id).ok_or_else(|| {
        Failure::Fatal(format!(
            "destination tenant id {} is malformed",
            job.wire.destination_tenant_id
        ))
    })?;
    let dst_glance = match &dst_region.glance {
        Some(_) => Some(ctx.svc.glance.get(&dst_region)?),
        None => {
            regions::check_writable(&dst_region).map_err(|why| {
                Failure::Fatal(format!(
                    "the image store of destination region {} is unusable: {why}",
                    dst_region.id
                ))
            })?;
            None
        }
    };

    // The destination image: in a directory region the one a previous attempt of this job
    // created, or a new one; in Glance always a new one (a previous attempt's is deleted
    // first). Never one named only by the wire field (a seeded job's belongs to someone else).
    let existing = match (&dst_glance, job.created_destination) {
        (None, Some(d)) => store
            .image(d)?
            .filter(|i| i.status == ImageStatus::Saving && i.region == dst_region.id),
        (Some(glance), Some(d)) => {
            glance.delete(d)?;
            None
        }
        _ => None,
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
    let record_here = existing.is_none() && dst_glance.is_none();
    let started = store.update_job(id, |job| {
        if !matches!(
            job.wire.status,
            JobStatus::ReplicateRequested | JobStatus::Replicating
        ) {
            return Ok(ImageChange::None);
        }
        job.wire.status = JobStatus::Replicating;
        job.wire.destination_image_id = Some(dst_image.id);
        job.created_destination = Some(dst_image.id);
        job.bytes_total = source.size;
        job.updated_at = now();
        Ok(if record_here {
            ImageChange::Insert(dst_key, dst_image.clone())
        } else {
            ImageChange::None
        })
    })?;
    // The new image's id must be on disk before any file or Glance record carries it.
    store.flush()?;
    match started.map(|j| j.wire.status) {
        Some(JobStatus::Replicating) => {}
        Some(JobStatus::CancelRequested | JobStatus::Canceling) => {
            return Err(Failure::Stopped(Stop::Cancel))
        }
        _ => return Ok(()),
    }
    tracing::info!(job = %id, image = %dst_image.id, from = %src_region.id, to = %dst_region.id, "replicating");

    let mut input = open_source(ctx, &source, &src_region)?;
    let copy = Copy {
        ctx,
        id,
        cancel,
        source: &source,
    };
    let active = match &dst_glance {
        None => copy.to_directory(&mut *input, &dst_region, &dst_image)?,
        Some(glance) => {
            glance.create(dst_image.id, &source, &job.wire.destination_tenant_id)?;
            copy.to_glance(&mut *input, glance, dst_image.id)?;
            dst_image.clone()
        }
    };
    let finished = store.update_job(id, |job| {
        if job.wire.status != JobStatus::Replicating {
            return Ok(ImageChange::None);
        }
        job.wire.status = JobStatus::Replicated;
        job.wire.copy_progress = 100;
        job.bytes_copied = source.size;
        job.updated_at = now();
        Ok(if dst_glance.is_none() {
            ImageChange::Put(active.clone())
        } else {
            ImageChange::None
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

/// The source image's bytes: its file, or a download from its Glance.
fn open_source(
    ctx: &Ctx,
    source: &Image,
    region: &Region,
) -> std::result::Result<Box<dyn Read + Send>, Failure> {
    if region.glance.is_some() {
        let glance = ctx.svc.glance.get(region)?;
        return Ok(Box::new(glance.download(source.id, source.size)?));
    }
    let path = regions::image_path(region, source.id);
    let file = File::open(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Failure::Fatal(format!(
                "the data of source image {} is missing ({})",
                source.id,
                path.display()
            ))
        } else {
            io_failure("cannot open the source image", e)
        }
    })?;
    Ok(Box::new(file))
}

/// One copy attempt's stream of bytes, with progress, cancel and the bandwidth cap.
struct Copy<'a> {
    ctx: &'a Ctx,
    id: Uuid,
    cancel: &'a AtomicBool,
    source: &'a Image,
}

impl Copy<'_> {
    /// Copies into a temporary file of the destination region, verifies, renames it into
    /// place; returns the destination image as it is now (`active`).
    fn to_directory(
        &self,
        input: &mut dyn Read,
        region: &Region,
        image: &Image,
    ) -> std::result::Result<Image, Failure> {
        let temp = regions::temp_path(region, image.id);
        let _ = fs::remove_file(&temp);
        // SHA-512 for the record; MD5 too when that is all the source has to compare.
        let hashes = Hashes {
            sha512: true,
            md5: !self.source_has_sha512(),
        };
        let written = self
            .run(hashes, &mut |ctl| copy_into(input, &temp, ctl, hashes))
            .inspect_err(|_| {
                let _ = fs::remove_file(&temp);
            })?;
        fs::rename(&temp, regions::image_path(region, image.id))
            .and_then(|()| regions::sync_dir(region))
            .map_err(|e| {
                let _ = fs::remove_file(&temp);
                io_failure("cannot move the copy into place", e)
            })?;
        let mut active = image.clone();
        active.status = ImageStatus::Active;
        active.size = written.size;
        // Equal SHA-512 means equal bytes, so the source's MD5 is the copy's.
        active.checksum = written.md5.or_else(|| self.source.checksum.clone());
        active.os_hash_algo = Some("sha512".into());
        active.os_hash_value = written.sha512;
        active.updated_at = now();
        Ok(active)
    }

    /// Uploads into the (created, empty) Glance image `id`, then checks Glance's own record
    /// of what it stored against the source.
    fn to_glance(
        &self,
        input: &mut dyn Read,
        glance: &Arc<Glance>,
        id: Uuid,
    ) -> std::result::Result<(), Failure> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Option<Chunk>>(IN_FLIGHT);
        let uploader = Arc::clone(glance);
        let abort = tokio::sync::Notify::new();
        let (streamed, uploaded) = std::thread::scope(|scope| {
            let upload = scope.spawn(|| uploader.upload(id, rx, &abort));
            // Glance hashes what it receives; its record is compared with the source below.
            let none = Hashes {
                sha512: false,
                md5: false,
            };
            let streamed = self.run(none, &mut |ctl| {
                stream(
                    input,
                    &mut |chunk, _| self.hand_over(&tx, Some(Arc::clone(chunk))),
                    ctl,
                    none,
                )
            });
            let streamed = streamed.and_then(|digests| {
                self.hand_over(&tx, None)
                    .map_err(|e| io_failure("copy failed", e))?;
                Ok(digests)
            });
            if streamed.is_err() {
                // Stopped, or reading failed: the upload must not wait for more.
                abort.notify_one();
            }
            drop(tx);
            let uploaded = upload
                .join()
                .unwrap_or_else(|_| Err(RemoteError::Refused("the upload thread panicked".into())));
            (streamed, uploaded)
        });
        let streamed = streamed.map_err(|e| match self.stopping() {
            // The stop came while a stalled upload held the chunk back.
            Some(stop) => Failure::Stopped(stop),
            None => e,
        });
        match (streamed, uploaded) {
            (Err(Failure::Stopped(stop)), _) => return Err(Failure::Stopped(stop)),
            // The stream broke because the upload did: the upload's error says why.
            (_, Err(e)) => return Err(e.into()),
            (Err(e), Ok(())) => return Err(e),
            (Ok(_), Ok(())) => {}
        }
        let stored = glance.image(id)?.ok_or_else(|| {
            Failure::Transient(format!("image {id} vanished from Glance after its upload"))
        })?;
        let src = self.source;
        // Each hash both records have must agree, and at least one must be there to compare.
        let md5 = (src.checksum.is_some() && stored.checksum.is_some())
            .then(|| src.checksum == stored.checksum);
        let os_hash = (src.os_hash_value.is_some() && src.os_hash_algo == stored.os_hash_algo)
            .then(|| src.os_hash_value == stored.os_hash_value);
        let hashes_agree = match (md5, os_hash) {
            (None, None) => false,
            (a, b) => a.unwrap_or(true) && b.unwrap_or(true),
        };
        if stored.status != ImageStatus::Active || stored.size != Some(src.size) || !hashes_agree {
            return Err(Failure::Fatal(format!(
                "Glance recorded image {id} as {} with {} bytes, MD5 {} and {} {}; the source has {} bytes, MD5 {} and SHA-512 {}",
                stored.status,
                stored.size.unwrap_or(0),
                stored.checksum.as_deref().unwrap_or("(none)"),
                stored.os_hash_algo.as_deref().unwrap_or("hash"),
                stored.os_hash_value.as_deref().unwrap_or("(none)"),
                src.size,
                src.checksum.as_deref().unwrap_or("(none)"),
                src.os_hash_value.as_deref().unwrap_or("(none)"),
            )));
        }
        Ok(())
    }

    /// Whether the copy must stop now (a cancel or shutdown), and which.
    fn stopping(&self) -> Option<Stop> {
        if self.ctx.shutdown.load(Ordering::SeqCst) {
            Some(Stop::Shutdown)
        } else if self.cancel.load(Ordering::SeqCst) {
            Some(Stop::Cancel)
        } else {
            None
        }
    }

    /// Gives a chunk (or the end, `None`) to the upload, waiting while its queue is full but
    /// not past a cancel or shutdown: a Glance that stops reading must not hold a job.
    fn hand_over(
        &self,
        tx: &tokio::sync::mpsc::Sender<Option<Chunk>>,
        mut item: Option<Chunk>,
    ) -> io::Result<()> {
        use tokio::sync::mpsc::error::TrySendError;
        loop {
            match tx.try_send(item) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(_)) => return Err(io::Error::other("the upload stopped")),
                Err(TrySendError::Full(back)) => {
                    if self.stopping().is_some() {
                        return Err(io::Error::other("stopped while the upload was stalled"));
                    }
                    item = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    fn source_has_sha512(&self) -> bool {
        self.source.os_hash_algo.as_deref() == Some("sha512") && self.source.os_hash_value.is_some()
    }

    /// Runs `copy` (which computes `hashes`) with this job's progress, stop and bandwidth
    /// control, then checks what was read against the source record: its size, and SHA-512
    /// (or else MD5) if computed.
    fn run(
        &self,
        hashes: Hashes,
        copy: &mut dyn FnMut(&mut Control) -> std::result::Result<Digests, CopyError>,
    ) -> std::result::Result<Digests, Failure> {
        let (ctx, id, source) = (self.ctx, self.id, self.source);
        let store = &ctx.svc.store;
        let size = source.size;
        let cancel_seen = Cell::new(false);
        let stop = || {
            self.stopping()
                .or_else(|| cancel_seen.get().then_some(Stop::Cancel))
        };
        let mut persisted = (0u8, Instant::now());
        let mut counted = 0u64;
        let mut progress = |copied: u64| {
            ctx.svc
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
            let update = store.update_job(id, |job| {
                job.bytes_copied = copied;
                job.wire.copy_progress = job.wire.copy_progress.max(percent);
                job.updated_at = now();
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
        let read = copy(&mut control).map_err(|e| match e {
            CopyError::Stopped(stop) => Failure::Stopped(stop),
            CopyError::Io(e) => io_failure("copy failed", e),
        })?;
        let (algo, expected, got) = if hashes.sha512 && self.source_has_sha512() {
            (
                "SHA-512",
                source.os_hash_value.as_deref(),
                read.sha512.as_deref(),
            )
        } else if hashes.md5 {
            ("MD5", source.checksum.as_deref(), read.md5.as_deref())
        } else {
            ("no hash", None, None)
        };
        if read.size != source.size || expected != got {
            return Err(Failure::Fatal(format!(
                "source image {} changed since it was recorded: expected {} bytes with {algo} {}, read {} bytes with {algo} {}",
                source.id,
                source.size,
                expected.unwrap_or("(none)"),
                read.size,
                got.unwrap_or("(none)")
            )));
        }
        Ok(read)
    }
}

/// Ends a job: `canceled` (no reason) or `error` (with the reason), after removing whatever it
/// wrote at the destination. A cancel requested meanwhile wins over an error.
fn conclude(ctx: &Ctx, id: Uuid, error: Option<String>) -> Result<()> {
    let store = &ctx.svc.store;
    let Some(job) = store.job(id)? else {
        return Ok(());
    };
    if job.wire.status.is_terminal() {
        return Ok(());
    }
    let canceling = error.is_none()
        || matches!(
            job.wire.status,
            JobStatus::CancelRequested | JobStatus::Canceling
        );
    // Say where the job is going before touching the destination, so a crash in between
    // finishes this instead of copying again.
    store.update_job(id, |job| {
        if job.wire.status.is_terminal() {
            return Ok(ImageChange::None);
        }
        if canceling {
            job.wire.status = JobStatus::Canceling;
        } else {
            job.error = error.clone();
        }
        job.updated_at = now();
        Ok(ImageChange::None)
    })?;
    store.flush()?;
    // Remove the destination's bytes first, then its record with the job's final state.
    let mut removal = ImageChange::None;
    if let Some(dst_id) = job.created_destination {
        if let Some(image) = store.image(dst_id)? {
            if let Some(region) = store.region(&image.region)? {
                let _ = fs::remove_file(regions::temp_path(&region, dst_id));
                regions::remove_image(&region, dst_id).map_err(|e| {
                    ServiceError::internal("cannot remove the partial destination image", e)
                })?;
                let _ = regions::sync_dir(&region);
            }
            if let Some(owner) = TenantKey::parse(&image.owner) {
                removal = ImageChange::Remove(owner, dst_id);
            }
        } else if let Some(region) = store.region(&job.wire.destination_region_id)? {
            if region.glance.is_some() {
                delete_from_glance(ctx, dst_id, &region)?;
            }
        }
    }
    let ended = store.update_job(id, |job| {
        if job.wire.status.is_terminal() {
            return Ok(ImageChange::None);
        }
        let canceled = error.is_none()
            || matches!(
                job.wire.status,
                JobStatus::CancelRequested | JobStatus::Canceling
            );
        job.wire.status = if canceled {
            JobStatus::Canceled
        } else {
            JobStatus::Error
        };
        job.error = if canceled { None } else { error.clone() };
        job.wire.destination_image_id = None;
        job.created_destination = None;
        job.updated_at = now();
        Ok(match &removal {
            ImageChange::Remove(owner, dst) => ImageChange::Remove(*owner, *dst),
            _ => ImageChange::None,
        })
    })?;
    store.flush()?;
    if let Some(job) = ended {
        match &job.error {
            Some(reason) => tracing::warn!(job = %id, reason = %reason, "job failed"),
            None => tracing::info!(job = %id, status = %job.wire.status, "job ended"),
        }
    }
    Ok(())
}
