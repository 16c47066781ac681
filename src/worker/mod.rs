//! The replication worker: threads inside `serve` that take queued jobs oldest first and move
//! each through its life cycle (the rules are [`Job`]'s methods) by really copying the bytes.
//!
//! - [`copy`]: `replicate_requested` / `replicating`: create the destination image (`saving`),
//!   keep what an interrupted attempt verified there, copy the rest of the source's bytes into
//!   the destination region's sink (checked chunk by chunk against the source's manifest, or
//!   hashed whole), verify what the destination recorded against the source record, then
//!   `replicated`. Transient failures are retried with exponential backoff.
//! - [`recovery`]: the ending of a job (`canceled`, or `error` with a reason) after removing
//!   whatever it wrote at the destination; the start-up cleanup; the sweep of destination
//!   images a region could not delete yet (orphans), on a thread of its own.
//! - [`board`]: which jobs this process runs, their cancel flags, the wake-up.
//! - [`space`]: the free-space reserve and the bytes promised to accepted copies. A copy
//!   that finds no room, before it writes or when its destination runs out of space while it
//!   writes, waits for room (parked, retried with backoff) for up to [`SPACE_WAIT`], then ends
//!   in `error`.
//!
//! On shutdown a copy stops at a chunk boundary, records what it verified and stays
//! `replicating`; the next start resumes it from there (a copy into Glance starts over).
//!
//! The worker is handed its [`Parts`]; it never goes through the service.

pub mod board;
mod copy;
mod recovery;
pub mod space;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::copy::RateLimiter;
use crate::error::{Result, ServiceError};
use crate::metrics::Metrics;
use crate::model::Step;
use crate::regions::Stores;
use crate::store::{ImageChange, Repo, LEASE, RENEW_EVERY};
pub use board::Board;
pub use recovery::recover;
pub use space::{Ledger, MinFree};

/// How long an idle worker sleeps when nothing wakes it.
const IDLE: Duration = Duration::from_millis(500);
/// How long a job whose processing failed is left alone before the next try.
const PARK: Duration = Duration::from_secs(5);
/// How long a copy waits for room at its destination before it ends in `error`.
pub const SPACE_WAIT: Duration = Duration::from_secs(300);
/// The first wait for room; doubled each time, up to [`SPACE_MAX_BACKOFF`].
const SPACE_FIRST_BACKOFF: Duration = Duration::from_millis(500);
const SPACE_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the worker works with.
#[derive(Clone)]
pub struct Parts {
    pub store: Arc<dyn Repo>,
    pub stores: Arc<Stores>,
    pub board: Arc<Board>,
    pub metrics: Arc<Metrics>,
    /// Bytes promised to accepted copies, shared with the service.
    pub space: Arc<Ledger>,
    /// The reserve copies leave free on every file system.
    pub min_free: MinFree,
}

pub struct WorkerConfig {
    pub threads: usize,
    /// Bytes per second for all copies together.
    pub max_bandwidth: Option<u64>,
}

struct Ctx {
    parts: Parts,
    limiter: Option<RateLimiter>,
    shutdown: AtomicBool,
    /// Jobs whose processing failed (a store error, a region that cannot be cleaned), left
    /// alone until the given time so they neither spin nor starve the jobs behind them.
    parked: Mutex<HashMap<Uuid, Instant>>,
    /// Jobs waiting for room at their destination: since when, and the next wait.
    space_waits: Mutex<HashMap<Uuid, (Instant, Duration)>>,
    /// Manifests of finished copies being stored (with their chunk index entries).
    indexing: Arc<Indexing>,
    /// Jobs whose claim this appliance lost (it could not renew it for a lease, and another
    /// appliance may have taken the job over): their copies stop as for a shutdown.
    lost: Mutex<HashSet<Uuid>>,
}

/// Manifests being stored on threads of their own after their copies ended: with sled, the
/// chunk index entries of a manifest take about 0.3 s per GiB of data, which a job should not
/// wait for before it is `replicated`.
#[derive(Default)]
struct Indexing {
    pending: Mutex<usize>,
    done: std::sync::Condvar,
}

impl Indexing {
    /// Stores `manifest` as image `id`'s on a thread of its own (on this one if none starts).
    fn store(self: &Arc<Self>, repo: &Arc<dyn crate::store::Repo>, id: Uuid, manifest: Vec<u8>) {
        fn put(store: &dyn crate::store::Repo, id: Uuid, manifest: &[u8]) {
            if let Err(e) = store.put_manifest(id, manifest) {
                tracing::warn!(image = %id, "cannot store the manifest of the copy (it is made again when needed): {e}");
            }
        }
        let manifest = Arc::new(manifest);
        self.change(1);
        let (me, store, bytes) = (Arc::clone(self), Arc::clone(repo), Arc::clone(&manifest));
        let spawned = std::thread::Builder::new()
            .name("manifest".into())
            .spawn(move || {
                put(&*store, id, &bytes);
                me.change(-1);
            });
        if spawned.is_err() {
            put(&**repo, id, &manifest);
            self.change(-1);
        }
    }

    fn change(&self, by: isize) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        *pending = pending.saturating_add_signed(by);
        self.done.notify_all();
    }

    /// Waits up to `limit` for the manifests being stored.
    fn wait(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        while *pending > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            pending = match self.done.wait_timeout(pending, left) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

/// The running worker threads.
pub struct Workers {
    ctx: Arc<Ctx>,
    threads: Vec<JoinHandle<()>>,
}

/// Starts the worker threads and the orphan sweep (after [`recover`]).
pub fn start(parts: Parts, config: &WorkerConfig) -> Result<Workers> {
    let ctx = Arc::new(Ctx {
        parts,
        limiter: config.max_bandwidth.map(RateLimiter::new),
        shutdown: AtomicBool::new(false),
        parked: Mutex::new(HashMap::new()),
        space_waits: Mutex::new(HashMap::new()),
        indexing: Arc::new(Indexing::default()),
        lost: Mutex::new(HashSet::new()),
    });
    let mut threads = Vec::new();
    let mut spawn = |name: String, body: fn(&Ctx)| {
        let ctx = Arc::clone(&ctx);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || body(&ctx))
            .map(|thread| threads.push(thread))
            .map_err(|e| ServiceError::internal("cannot start a worker thread", e))
    };
    for n in 0..config.threads.max(1) {
        spawn(format!("worker-{n}"), run)?;
    }
    spawn("orphan-sweep".into(), recovery::sweep_orphans)?;
    spawn("claims".into(), renew_claims)?;
    Ok(Workers { ctx, threads })
}

impl Workers {
    /// Stops taking jobs, stops copies at a chunk boundary, and waits up to `grace` for them.
    pub fn stop(self, grace: Duration) {
        self.ctx.shutdown.store(true, Ordering::SeqCst);
        self.ctx.parts.board.wake();
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
        self.ctx
            .indexing
            .wait(deadline.saturating_duration_since(Instant::now()));
    }
}

impl Ctx {
    fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    /// Whether job `id` must stop as for a shutdown: the process stops, or its claim was lost.
    fn must_pause(&self, id: Uuid) -> bool {
        self.stopping() || self.lost.lock().is_ok_and(|lost| lost.contains(&id))
    }

    fn lose(&self, ids: impl IntoIterator<Item = Uuid>) {
        if let Ok(mut lost) = self.lost.lock() {
            lost.extend(ids);
        }
    }

    /// Leaves job `id` alone for `wait`.
    fn park(&self, id: Uuid, wait: Duration) {
        if let Ok(mut parked) = self.parked.lock() {
            parked.insert(id, Instant::now() + wait);
        }
    }

    /// Job `id` found no room: how long it waits before the next try, or `None` once it has
    /// waited [`SPACE_WAIT`].
    fn wait_for_space(&self, id: Uuid) -> Option<Duration> {
        let mut waits = self.space_waits.lock().ok()?;
        let (since, next) = waits
            .entry(id)
            .or_insert((Instant::now(), SPACE_FIRST_BACKOFF));
        if since.elapsed() >= SPACE_WAIT {
            waits.remove(&id);
            return None;
        }
        let wait = *next;
        *next = (*next * 2).min(SPACE_MAX_BACKOFF);
        Some(wait)
    }

    /// Job `id` is no longer this worker's to run: what was kept for it goes.
    fn forget(&self, id: Uuid) {
        self.parts.space.release(id);
        if let Ok(mut waits) = self.space_waits.lock() {
            waits.remove(&id);
        }
    }
}

fn run(ctx: &Ctx) {
    let board = &ctx.parts.board;
    // While the store fails (a database that does not answer), one line a minute, not two a
    // second per worker.
    let mut failing_since: Option<Instant> = None;
    let mut logged = Instant::now();
    while !ctx.stopping() {
        let queue = next(ctx);
        match (&queue, failing_since) {
            (Err(e), None) => {
                tracing::error!(
                    "worker cannot read the queue (it tries again every {IDLE:?}): {e}"
                );
                (failing_since, logged) = (Some(Instant::now()), Instant::now());
            }
            (Err(e), Some(since)) if logged.elapsed() >= Duration::from_secs(60) => {
                tracing::error!(
                    "worker still cannot read the queue, for {:?} now: {e}",
                    since.elapsed()
                );
                logged = Instant::now();
            }
            (Ok(_), Some(since)) => {
                tracing::info!("worker reads the queue again after {:?}", since.elapsed());
                failing_since = None;
            }
            _ => {}
        }
        match queue {
            Ok(Some((id, cancel))) => {
                if let Err(e) = process(ctx, id, &cancel) {
                    tracing::error!(job = %id, "worker failed on this job, retrying in {PARK:?}: {e}");
                    ctx.park(id, PARK);
                }
                match ctx.parts.store.job(id) {
                    Ok(Some(job)) if !job.wire.status.is_terminal() => {}
                    Ok(_) => ctx.forget(id),
                    Err(_) => {}
                }
                board.untrack(id);
                ctx.parts.store.release(id);
            }
            Ok(None) | Err(_) => board.wait(IDLE),
        }
    }
}

/// The oldest queued job that no other worker has and that is not parked, claimed; its
/// cancel flag.
fn next(ctx: &Ctx) -> Result<Option<(Uuid, Arc<AtomicBool>)>> {
    let now = Instant::now();
    let parked: HashSet<Uuid> = match ctx.parked.lock() {
        Ok(mut parked) => {
            parked.retain(|_, until| *until > now);
            parked.keys().copied().collect()
        }
        Err(_) => HashSet::new(),
    };
    let Some(id) = ctx.parts.store.claim_next(&parked)? else {
        return Ok(None);
    };
    if let Ok(mut lost) = ctx.lost.lock() {
        lost.remove(&id);
    }
    Ok(Some((id, ctx.parts.board.track(id))))
}

/// Renews the claims of the jobs this appliance runs every [`RENEW_EVERY`], passes on the
/// cancels asked for them on other appliances, and stops the copies whose claims are lost: a
/// claim another appliance took over, or every claim once renewing has failed for nearly a
/// [`LEASE`] (the others take them over after one).
fn renew_claims(ctx: &Ctx) {
    let board = &ctx.parts.board;
    let mut renewed = Instant::now();
    let mut failing = false;
    while !ctx.stopping() {
        let running = board.running();
        if !running.is_empty() {
            match ctx.parts.store.renew_claims(&running) {
                Ok(held) => {
                    renewed = Instant::now();
                    if std::mem::take(&mut failing) {
                        tracing::info!("claims renewed again");
                    }
                    let held: HashMap<Uuid, bool> = held.into_iter().collect();
                    for id in &running {
                        match held.get(id) {
                            Some(true) => board.cancel(*id),
                            Some(false) => {}
                            None => {
                                tracing::warn!(job = %id, "the claim on this job was lost (another appliance may have taken it over); its copy stops here");
                                ctx.lose([*id]);
                            }
                        }
                    }
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!("cannot renew the claims of the running jobs: {e}");
                    }
                    if renewed.elapsed() + 2 * RENEW_EVERY >= LEASE {
                        tracing::warn!(
                            jobs = running.len(),
                            "claims not renewed for {:?}: their copies stop, to be taken over",
                            renewed.elapsed()
                        );
                        ctx.lose(running);
                    }
                }
            }
        } else {
            renewed = Instant::now();
        }
        let until = Instant::now() + RENEW_EVERY;
        while Instant::now() < until && !ctx.stopping() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn process(ctx: &Ctx, id: Uuid, cancel: &AtomicBool) -> Result<()> {
    let store = &ctx.parts.store;
    let Some(job) = store.job(id)? else {
        return store.drop_queue_entry(id);
    };
    match job.next_step() {
        Step::Copy => copy::replicate(ctx, id, cancel),
        Step::Cancel => recovery::conclude(ctx, id, None),
        // A failure was being cleaned up when the process stopped: finish that.
        Step::Fail(reason) => recovery::conclude(ctx, id, Some(reason)),
        // Only a stale queue entry; rewriting the job drops it.
        Step::Forget => store.update_job(id, &|_| Ok(ImageChange::None)).map(drop),
    }
}
