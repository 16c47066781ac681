//! One job's copy: attempts with backoff, the destination image, the transfer with progress,
//! cancel and the bandwidth cap, and the end of a successful copy.

use std::borrow::Cow;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{
    recovery::{conclude, conclude_keeping},
    Ctx,
};
use crate::copy::{Control, Copied, Plan, Progress, Source, Stop, CHUNK};
use crate::error::{Result, ServiceError};
use crate::manifest::{self, Entry, Manifest, CHUNK_SIZE};
use crate::model::{now, now_ms, Image, ImageStatus, Job, JobStatus, Region, TenantKey};
use crate::peer::{Delta, DeltaFigures};
use crate::regions::{
    make_manifest, transfer, verify, ImageStore, Reading, Recorded, StoreError, TransferError,
};
use crate::reuse::{LocalChunks, Reuse};
use crate::store::ImageChange;
use crate::text::escape;

/// Attempts of a copy that meets transient errors, the first included.
const ATTEMPTS: u32 = 4;
/// Backoff before the first retry; doubled each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Progress is persisted at most this often (and only when a whole percent was gained).
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Longest a copy waits for the manifests (and chunk index entries) of copies that just ended
/// (about 0.3 s per GiB of their data): a copy from another store, to reuse their chunks, and
/// a copy of an image without a manifest, before it reads the image whole to make one.
const INDEXING_WAIT: Duration = Duration::from_secs(30);
/// A streamed copy's partial manifest is rewritten once a second per this many chunks (1 GiB).
const PARTIAL_CHUNKS_PER_SECOND: usize = (1 << 30) / CHUNK_SIZE;

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
                tracing::info!(job = %id, "copy paused (the appliance stops, or its claim was lost); it resumes from what it verified");
                return Ok(());
            }
            Err(Failure::Fatal(reason)) => return conclude(ctx, id, Some(reason)),
            Err(Failure::NoSpace(reason)) => return wait_for_space(ctx, id, reason),
            Err(Failure::Transient(reason)) => reason,
        };
        if attempt == ATTEMPTS {
            // What the destination verified stays for a retry (`job retry`).
            return conclude_keeping(
                ctx,
                id,
                format!("{reason} (gave up after {ATTEMPTS} attempts)"),
            );
        }
        tracing::warn!(job = %id, attempt, "copy failed, retrying in {backoff:?}: {}", escape(&reason));
        let until = Instant::now() + backoff;
        while Instant::now() < until {
            if ctx.must_pause(id) {
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
    // is reused; a store with records of its own continues the previous attempt's image if
    // it can (a peer's upload), or gets a new one, the previous one deleted first. Never one
    // named only by the wire field (a seeded job's belongs to someone else).
    let keeps_record = dst_store.records().is_none();
    let mut continued = None;
    let existing = match (keeps_record, job.created_destination) {
        (true, Some(d)) => store
            .image(d)?
            .filter(|i| i.status == ImageStatus::Saving && i.region == dst_region.id),
        (false, Some(d)) if dst_store.continues_partial() => {
            continued = Some(d);
            None
        }
        (false, Some(d)) => {
            dst_store.remove(d)?;
            None
        }
        (_, None) => None,
    };
    let dst_image = existing.clone().unwrap_or_else(|| Image {
        id: continued.unwrap_or_else(Uuid::new_v4),
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
        meta: source.meta.for_copy(),
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
    // What a copy between appliances moves, from the source's manifest on.
    let delta = Arc::new(Delta::default());
    // The source's manifest where the appliance keeps the source's record (made once for an
    // image that predates manifests) or the source's store has one (a peer); a source
    // without one streams, hashed whole.
    let src_manifest = match src_store.records() {
        None if source.os_hash_algo.as_deref() == Some("sha512") => {
            Some(source_manifest(ctx, &*src_store, &source, &copy)?)
        }
        None => None,
        Some(_) => src_store.manifest(&source, &delta)?,
    };
    let stopping = || copy.stopping().is_some();
    let mut sink = dst_store.create(&dst_image, &source, &stopping)?;
    let Kept {
        done,
        held,
        verified,
    } = kept_part(
        ctx,
        &mut *sink,
        src_manifest.as_ref(),
        keeps_record.then_some(&dst_image),
        &source,
    )?;
    let began = store.update_job(id, &|job| {
        job.begin_attempt(verified, held, CHUNK as u64, now());
        job.begin_rate(verified, now_ms());
        Ok(ImageChange::None)
    })?;
    store.flush()?;
    let read_before = began.as_ref().map_or(0, |j| j.source_bytes_read);
    if verified > 0 {
        tracing::info!(job = %id, verified, of = source.size, "resuming after the verified part of the destination");
        ctx.parts.metrics.resumes.fetch_add(1, Ordering::Relaxed);
        ctx.parts
            .metrics
            .bytes_resumed
            .fetch_add(verified, Ordering::Relaxed);
    }
    let plan = Plan {
        manifest: src_manifest.as_ref(),
        prefix: (src_manifest.is_none() && verified > 0)
            .then(|| sink.prefix(verified))
            .flatten(),
        done,
        hashes: sink.hashes(),
    };
    // Chunks the destination tenant holds already at this appliance need not be fetched,
    // including those of copies that just ended.
    if keeps_record && src_store.records().is_some() {
        ctx.indexing.wait(INDEXING_WAIT);
    }
    let local = keeps_record.then(|| {
        Arc::new(Reuse::new(
            Arc::clone(&ctx.parts.store),
            Arc::clone(&ctx.parts.stores),
            dst_key,
        )) as Arc<dyn LocalChunks>
    });
    let mut input = src_store.open_for_copy(
        &source,
        Reading {
            offset: verified,
            manifest: src_manifest.as_ref(),
            local,
            reflinks: sink.reflinks(),
            delta: Arc::clone(&delta),
            stopping: &stopping,
        },
    )?;
    let partial = Partial {
        image: keeps_record.then_some(dst_image.id),
        streamed: src_manifest.is_none(),
        read_before,
        moved: Moved {
            before: began.as_ref().map(Job::moved).unwrap_or_default(),
            counters: [Some(delta), sink.delta()].into_iter().flatten().collect(),
        },
    };
    let (recorded, copied) = copy.run(&mut *input, sink, plan, &partial)?;
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
    let made = active
        .as_ref()
        .map(|image| manifest::complete(image.size, image.os_hash_value.clone(), copied.chunks));
    let read = read_before + copied.read;
    let moved = partial.moved.total();
    let finished = store.update_job(id, &|job| {
        if !job.complete(now()) {
            return Ok(ImageChange::None);
        }
        job.measure_rate(job.bytes_total, now_ms());
        job.source_bytes_read = read;
        job.set_moved(moved);
        Ok(match &active {
            Some(image) => ImageChange::Put(image.clone()),
            None => ImageChange::None,
        })
    })?;
    store.flush()?;
    match finished.map(|j| j.wire.status) {
        Some(JobStatus::Replicated) => {
            tracing::info!(job = %id, bytes = source.size, read = copied.read, "replicated");
            // Stored after the job ends: a copy of it that needs it first makes it (see
            // `source_manifest`), and a copy from a peer waits for it (`Indexing`).
            if let (Some(image), Some(made)) = (&active, made) {
                ctx.indexing.store(store, image.id, made.encode());
            }
            Ok(())
        }
        // A cancel won the race against the last chunk: it is honoured.
        _ => Err(Failure::Stopped(Stop::Cancel)),
    }
}

/// What an interrupted attempt left at the destination that this one keeps.
struct Kept {
    /// The entries of the chunks kept, from the first on.
    done: Vec<Entry>,
    /// Bytes the destination held before it was checked.
    held: u64,
    /// Bytes the kept chunks cover.
    verified: u64,
}

/// Checks what an interrupted attempt left in `sink` against the source's manifest, or else
/// against the partial manifest that attempt recorded for `destination` (an image whose record
/// the appliance keeps); what this attempt keeps of it.
fn kept_part(
    ctx: &Ctx,
    sink: &mut dyn crate::regions::Sink,
    src_manifest: Option<&Manifest>,
    destination: Option<&Image>,
    source: &Image,
) -> std::result::Result<Kept, Failure> {
    // The source's manifest is borrowed, not copied: it may list a few hundred thousand chunks.
    let reference = match (src_manifest, destination) {
        (Some(m), _) => Some(Cow::Borrowed(m)),
        (None, Some(dst)) => manifest::load_as(&*ctx.parts.store, dst.id, |m| {
            m.size == source.size && m.chunk_size as usize == CHUNK_SIZE
        })?
        .map(Cow::Owned),
        (None, None) => None,
    };
    let Some(reference) = reference else {
        return Ok(Kept {
            done: Vec::new(),
            held: 0,
            verified: 0,
        });
    };
    let (mut n, held) = sink.resume(&reference)?;
    if src_manifest.is_none() {
        // A stream resumes after whole chunks only.
        n = n.min((source.size / CHUNK_SIZE as u64) as usize);
    }
    Ok(Kept {
        done: reference.chunks[..n].to_vec(),
        held,
        verified: reference.offset(n).min(reference.size),
    })
}

/// The manifest of a source image whose record the appliance keeps. One that predates
/// manifests (or whose manifest is damaged) gets one now, once: the image is read whole with
/// its SHA-512, which must match the record, as a copy without a manifest would check it.
fn source_manifest(
    ctx: &Ctx,
    store: &dyn ImageStore,
    source: &Image,
    copy: &Copy,
) -> std::result::Result<Manifest, Failure> {
    if let Some(m) = manifest::load(&*ctx.parts.store, source)? {
        return Ok(m);
    }
    // A copy that just made the image may still be storing its manifest.
    ctx.indexing.wait(INDEXING_WAIT);
    if let Some(m) = manifest::load(&*ctx.parts.store, source)? {
        return Ok(m);
    }
    tracing::info!(image = %source.id, "making the image's manifest (it has none yet)");
    let mut input = store.open(source, 0)?;
    let stop = || copy.stopping();
    let m = make_manifest(&mut *input, source, &stop)?;
    ctx.parts.store.put_manifest(source.id, &m.encode())?;
    Ok(m)
}

/// What a copy attempt records at its checkpoints besides the job's counters.
struct Partial {
    /// The destination image whose partial manifest is kept, where the appliance keeps its
    /// record (a stream source's resume checks against it).
    image: Option<Uuid>,
    /// The source streams (has no manifest).
    streamed: bool,
    /// Bytes read from the source by earlier attempts.
    read_before: u64,
    moved: Moved,
}

/// What a copy between appliances moved: the job's figures before this attempt, and this
/// attempt's counters (the source's and the destination's).
struct Moved {
    before: DeltaFigures,
    counters: Vec<Arc<Delta>>,
}

impl Moved {
    /// The job's figures with this attempt's.
    fn total(&self) -> DeltaFigures {
        self.counters
            .iter()
            .map(|c| c.figures())
            .fold(self.before, |a, b| DeltaFigures {
                reused: a.reused + b.reused,
                fetched: a.fetched + b.fetched,
                wire: a.wire + b.wire,
            })
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
        if self.ctx.must_pause(self.id) {
            Some(Stop::Shutdown)
        } else if self.cancel.load(Ordering::SeqCst) {
            Some(Stop::Cancel)
        } else {
            None
        }
    }

    /// Copies `input` into `sink` as `plan` says with this job's progress, checkpoints, stop
    /// and bandwidth control; the destination publishes the image only if what it recorded
    /// matches the source record.
    fn run(
        &self,
        input: &mut dyn Source,
        sink: Box<dyn crate::regions::Sink + '_>,
        plan: Plan,
        partial: &Partial,
    ) -> std::result::Result<(Recorded, Copied), Failure> {
        let (ctx, id, size) = (self.ctx, self.id, self.source.size);
        let store = &ctx.parts.store;
        let metrics = &ctx.parts.metrics;
        let cancel_seen = Cell::new(false);
        let stop = || {
            self.stopping()
                .or_else(|| cancel_seen.get().then_some(Stop::Cancel))
        };
        let mut persisted = (0u8, Instant::now());
        let mut counted = Progress {
            done: plan.done_bytes(size),
            read: 0,
        };
        let mut moved = partial.moved.before;
        let mut progress = |now_at: Progress| {
            let total = partial.moved.total();
            for (metric, now_at, was) in [
                (&metrics.peer_reused, total.reused, moved.reused),
                (&metrics.peer_fetched, total.fetched, moved.fetched),
                (&metrics.peer_wire, total.wire, moved.wire),
            ] {
                metric.fetch_add(now_at.saturating_sub(was), Ordering::Relaxed);
            }
            moved = total;
            ctx.parts.space.progress(id, now_at.done);
            metrics
                .bytes_copied
                .fetch_add(now_at.done.saturating_sub(counted.done), Ordering::Relaxed);
            metrics
                .source_bytes_read
                .fetch_add(now_at.read.saturating_sub(counted.read), Ordering::Relaxed);
            counted = now_at;
            let copied = now_at.done;
            let percent = (copied.min(size) * 100)
                .checked_div(size)
                .map_or(100, |p| p as u8);
            if percent <= persisted.0 || persisted.1.elapsed() < PROGRESS_INTERVAL {
                return;
            }
            persisted = (percent, Instant::now());
            let update = store.update_job(id, &|job| {
                job.progress(copied, now());
                job.measure_rate(copied, now_ms());
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
        let mut last_partial: Option<Instant> = None;
        let mut checkpoint = |chunks: &[Entry], read: u64| {
            let paused = self.stopping() == Some(Stop::Shutdown);
            let mut verified = Some(((chunks.len() * CHUNK_SIZE) as u64).min(size));
            if let (Some(image), true) = (partial.image, partial.streamed) {
                // The partial manifest is rewritten whole: once a second per GiB it covers,
                // so its writes stay near 0.5 MiB/s whatever the image's size.
                let every =
                    PROGRESS_INTERVAL * (1 + (chunks.len() / PARTIAL_CHUNKS_PER_SECOND) as u32);
                if paused || last_partial.is_none_or(|at| at.elapsed() >= every) {
                    let mut m = Manifest::new(size);
                    m.chunks = chunks.to_vec();
                    if let Err(e) = store.put_manifest(image, &m.encode()) {
                        tracing::warn!(job = %id, "cannot record the verified part: {e}");
                        return;
                    }
                    last_partial = Some(Instant::now());
                } else {
                    verified = None;
                }
            }
            let read = partial.read_before + read;
            let moved = partial.moved.total();
            let recorded = store
                .update_job(id, &|job| {
                    job.checkpoint(verified, read, paused, now());
                    job.set_moved(moved);
                    Ok(ImageChange::None)
                })
                .and_then(|_| store.flush());
            if let Err(e) = recorded {
                tracing::warn!(job = %id, "cannot record the verified part: {e}");
            }
        };
        let mut control = Control {
            stop: &stop,
            progress: &mut progress,
            checkpoint: Some(&mut checkpoint),
            limiter: ctx.limiter.as_ref(),
        };
        Ok(transfer(input, sink, plan, &mut control, &|recorded| {
            verify(self.source, recorded)
        })?)
    }
}
