//! The replication worker: threads inside `serve` that take queued jobs oldest first and move
//! each through its lifecycle by really copying the bytes.
//!
//! - `replicate_requested` / `replicating`: create (or reuse) the destination image as `saving`,
//!   copy the source file into a temporary file in the destination region, verify size, MD5 and
//!   SHA-512 against the source record, fsync, rename into place, then mark the image `active`
//!   and the job `replicated` in one transaction.
//! - `cancel_requested` / `canceling`: remove whatever was written at the destination, then
//!   `canceled`. A running copy sees a cancel at its next chunk.
//! - On failure: retry transient I/O errors with exponential backoff, then `error` with a reason,
//!   leaving nothing at the destination.
//! - On shutdown a copy stops at a chunk boundary and stays `replicating`; the next start
//!   resumes it from the beginning. At start-up, temporary files a crash left are removed.

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::copy::{copy_into, Control, CopyError, Digests, RateLimiter, Stop};
use crate::error::{Result, ServiceError};
use crate::model::{now, Image, ImageStatus, Job, JobStatus, Region, TenantKey};
use crate::regions;
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

fn run(ctx: &Ctx) {
    let board = &ctx.svc.board;
    while !ctx.shutdown.load(Ordering::SeqCst) {
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
        Interrupted | TimedOut | WouldBlock | ResourceBusy | UnexpectedEof
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

/// The source image, its region and the destination region, or why the copy cannot happen.
fn endpoints(ctx: &Ctx, job: &Job) -> std::result::Result<(Image, Region, Region), Failure> {
    let store = &ctx.svc.store;
    let source_id = job.wire.source_image_id;
    let source = match store.image(source_id)? {
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
    let region = |id: &str, which: &str| {
        store.region(id).map_err(Failure::from).and_then(|r| {
            r.ok_or_else(|| Failure::Fatal(format!("{which} region {id} was removed")))
        })
    };
    let src_region = region(&source.region, "source")?;
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
    regions::check_writable(&dst_region).map_err(|why| {
        Failure::Fatal(format!(
            "the image store of destination region {} is unusable: {why}",
            dst_region.id
        ))
    })?;

    // The destination image: the one a previous attempt of this job created, or a new one.
    // Never one named only by the wire field (a seeded job's image belongs to someone else).
    let existing = job
        .created_destination
        .map(|d| store.image(d))
        .transpose()?
        .flatten()
        .filter(|i| i.status == ImageStatus::Saving && i.region == dst_region.id);
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
        Ok(if existing.is_some() {
            ImageChange::None
        } else {
            ImageChange::Insert(dst_key, dst_image.clone())
        })
    })?;
    // The new image's id must be on disk before any file carries it.
    store.flush()?;
    match started.map(|j| j.wire.status) {
        Some(JobStatus::Replicating) => {}
        Some(JobStatus::CancelRequested | JobStatus::Canceling) => {
            return Err(Failure::Stopped(Stop::Cancel))
        }
        _ => return Ok(()),
    }
    tracing::info!(job = %id, image = %dst_image.id, from = %src_region.id, to = %dst_region.id, "replicating");

    let temp = regions::temp_path(&dst_region, dst_image.id);
    let _ = fs::remove_file(&temp);
    let result = copy_verified(ctx, id, cancel, &source, &src_region, &temp);
    let written = match result {
        Ok(written) => written,
        Err(failure) => {
            let _ = fs::remove_file(&temp);
            return Err(failure);
        }
    };
    let final_path = regions::image_path(&dst_region, dst_image.id);
    fs::rename(&temp, &final_path)
        .and_then(|()| regions::sync_dir(&dst_region))
        .map_err(|e| {
            let _ = fs::remove_file(&temp);
            io_failure("cannot move the copy into place", e)
        })?;

    let mut active = dst_image.clone();
    active.status = ImageStatus::Active;
    active.size = written.size;
    // Equal SHA-512 means equal bytes, so the source's MD5 is the copy's.
    active.checksum = source.checksum.clone();
    active.os_hash_algo = Some("sha512".into());
    active.os_hash_value = Some(written.sha512.clone());
    active.updated_at = now();
    let finished = store.update_job(id, |job| {
        if job.wire.status != JobStatus::Replicating {
            return Ok(ImageChange::None);
        }
        job.wire.status = JobStatus::Replicated;
        job.wire.copy_progress = 100;
        job.bytes_copied = written.size;
        job.updated_at = now();
        Ok(ImageChange::Put(active.clone()))
    })?;
    store.flush()?;
    match finished.map(|j| j.wire.status) {
        Some(JobStatus::Replicated) => {
            tracing::info!(job = %id, bytes = written.size, "replicated");
            Ok(())
        }
        // A cancel won the race against the last chunk: it is honoured.
        _ => Err(Failure::Stopped(Stop::Cancel)),
    }
}

/// Copies the source file into `temp` and checks it against the source record.
fn copy_verified(
    ctx: &Ctx,
    id: Uuid,
    cancel: &AtomicBool,
    source: &Image,
    src_region: &Region,
    temp: &std::path::Path,
) -> std::result::Result<Digests, Failure> {
    let store = &ctx.svc.store;
    let src_path = regions::image_path(src_region, source.id);
    let mut input = File::open(&src_path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Failure::Fatal(format!(
                "the data of source image {} is missing ({})",
                source.id,
                src_path.display()
            ))
        } else {
            io_failure("cannot open the source image", e)
        }
    })?;
    let size = source.size;
    let cancel_seen = Cell::new(false);
    let stop = || {
        if ctx.shutdown.load(Ordering::SeqCst) {
            Some(Stop::Shutdown)
        } else if cancel.load(Ordering::SeqCst) || cancel_seen.get() {
            Some(Stop::Cancel)
        } else {
            None
        }
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
            Ok(Some(job)) if job.wire.status == JobStatus::CancelRequested => cancel_seen.set(true),
            Ok(_) => {}
            Err(e) => tracing::warn!(job = %id, "cannot record progress: {e}"),
        }
    };
    let mut control = Control {
        stop: &stop,
        progress: &mut progress,
        limiter: ctx.limiter.as_ref(),
    };
    let written = copy_into(&mut input, temp, &mut control, false).map_err(|e| match e {
        CopyError::Stopped(stop) => Failure::Stopped(stop),
        CopyError::Io(e) => io_failure("copy failed", e),
    })?;
    let expected = (source.size, source.os_hash_value.as_deref());
    let got = (written.size, Some(written.sha512.as_str()));
    if expected != got {
        return Err(Failure::Fatal(format!(
            "source image {} changed since it was recorded: expected {} bytes with SHA-512 {}, read {} bytes with SHA-512 {}",
            source.id,
            source.size,
            source.os_hash_value.as_deref().unwrap_or("(none)"),
            written.size,
            written.sha512
        )));
    }
    Ok(written)
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
