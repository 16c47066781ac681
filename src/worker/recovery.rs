//! Endings and repairs: a job's ending after removing what it wrote, the start-up cleanup,
//! and the sweep of destination images that a region could not delete when their job ended.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{Ctx, Parts};
use crate::error::{Result, ServiceError};
use crate::model::{now, ImageStatus, TenantKey};
use crate::store::ImageChange;
use crate::text::escape;

/// How often images that could not be deleted from a region are tried again.
const ORPHAN_SWEEP: Duration = Duration::from_secs(2);

/// Start-up cleanup, before anything else uses the store: what interrupted copies and imports
/// left in the regions, and images an interrupted import left `saving`.
pub fn recover(parts: &Parts) -> Result<()> {
    let store = &parts.store;
    if store.shared() {
        // A file without a record, an image `saving`, may be another appliance's import or
        // upload going on now: nothing is removed. Copies need no cleanup to resume.
        tracing::info!("the store is shared with other appliances: the start-up cleanup of the regions is left out");
        return Ok(());
    }
    // The partial images of queued jobs stay: their copies resume from them.
    let mut destinations = HashSet::new();
    for id in store.queued()? {
        if let Some(job) = store.job(id)? {
            destinations.extend(job.created_destination);
        }
    }
    // So do the partial files of peer uploads (their senders go on with them) and the
    // partial images failed jobs keep for a retry (the image names the job, which must still
    // name the image: one lookup per such image, not a scan of the jobs).
    let mut saving = Vec::new();
    for image in store.images(None)? {
        match image.status {
            ImageStatus::Uploading => {
                destinations.insert(image.id);
            }
            ImageStatus::Saving => saving.push(image),
            _ => {}
        }
    }
    for image in &saving {
        if let Some(job) = image.meta.kept_for {
            if store
                .job(job)?
                .is_some_and(|j| j.story.kept_destination == Some(image.id))
            {
                destinations.insert(image.id);
            }
        }
    }
    for region in store.regions()? {
        match parts.stores.get(&region) {
            Ok(images) => images.sweep(&destinations),
            Err(e) => tracing::warn!(region = %region.id, "cannot clean up the region: {e}"),
        }
    }
    for mut image in saving {
        if destinations.contains(&image.id) {
            continue;
        }
        tracing::warn!(image = %image.id, "an interrupted import left this image saving; marking it killed");
        if let Some(region) = store.region(&image.region)? {
            if let Ok(images) = parts.stores.get(&region) {
                let _ = images.remove(image.id);
            }
        }
        image.status = ImageStatus::Killed;
        image.updated_at = now();
        store.update_image(&image)?;
    }
    store.flush()
}

/// Ends a job: `canceled` (no reason) or `error` (with the reason), after removing whatever it
/// wrote at the destination. A cancel requested meanwhile wins over an error ([`Job::end`]).
///
/// [`Job::end`]: crate::model::Job::end
pub(super) fn conclude(ctx: &Ctx, id: Uuid, error: Option<String>) -> Result<()> {
    let store = &ctx.parts.store;
    let Some(job) = store.job(id)? else {
        return Ok(());
    };
    if job.wire.status.is_terminal() {
        return Ok(());
    }
    // Say where the job is going before touching the destination, so a crash in between
    // finishes this instead of copying again.
    store.update_job(id, &|job| {
        job.begin_ending(error.clone(), now());
        Ok(ImageChange::None)
    })?;
    store.flush()?;
    let removal = match job.created_destination {
        Some(dst) => remove_destination(&ctx.parts, dst, &job.wire.destination_region_id)?,
        None => ImageChange::None,
    };
    let ended = store.update_job(id, &|job| {
        if job.wire.status.is_terminal() {
            return Ok(ImageChange::None);
        }
        job.end(now());
        Ok(match &removal {
            ImageChange::Remove(owner, dst) => ImageChange::Remove(*owner, *dst),
            _ => ImageChange::None,
        })
    })?;
    store.flush()?;
    if let Some(job) = ended {
        match &job.error {
            Some(reason) => tracing::warn!(job = %id, reason = %escape(reason), "job failed"),
            None => tracing::info!(job = %id, status = %job.wire.status, "job ended"),
        }
    }
    Ok(())
}

/// Ends a job in `error` after transient failures, keeping the verified part its destination
/// holds for a retry: where the appliance keeps the destination's record (a directory
/// region) and a checkpoint verified some of it, the partial image stays `saving` and the job
/// names it (`kept_destination`); a retry continues it, a purge removes it. Otherwise, or if a
/// cancel came meanwhile, as [`conclude`].
pub(super) fn conclude_keeping(ctx: &Ctx, id: Uuid, reason: String) -> Result<()> {
    let store = &ctx.parts.store;
    let Some(job) = store.job(id)? else {
        return Ok(());
    };
    let kept = match job.created_destination {
        Some(dst) if job.bytes_verified > 0 => store.image(dst)?.filter(|i| {
            i.status == ImageStatus::Saving && i.region == job.wire.destination_region_id
        }),
        _ => None,
    };
    let Some(mut kept) = kept else {
        return conclude(ctx, id, Some(reason));
    };
    // The image names the job first: a crash before the job names it leaves a mark that the
    // start-up cleanup ignores.
    kept.meta.kept_for = Some(id);
    store.update_image(&kept)?;
    let ended = store.update_job(id, &|job| {
        if job.wire.status.is_terminal() || job.cancel_asked() {
            return Ok(ImageChange::None);
        }
        let at = now();
        job.begin_ending(Some(reason.clone()), at);
        job.end(at);
        job.story.kept_destination = Some(kept.id);
        Ok(ImageChange::None)
    })?;
    store.flush()?;
    match ended {
        Some(job) if job.story.kept_destination == Some(kept.id) => {
            tracing::warn!(job = %id, reason = %escape(&reason), kept = %kept.id, "job failed; its verified part is kept for a retry");
            Ok(())
        }
        Some(job) if !job.wire.status.is_terminal() => conclude(ctx, id, Some(reason)),
        _ => Ok(()),
    }
}

/// Removes a job's destination image from its region; the record change that goes with the
/// job's ending. Where the appliance keeps the record, the bytes must go first (a failure is
/// retried later); a region that keeps its own records and cannot delete now gets the image
/// remembered as an orphan, so the job can end now.
fn remove_destination(parts: &Parts, dst: Uuid, region_id: &str) -> Result<ImageChange> {
    let store = &parts.store;
    if let Some(image) = store.image(dst)? {
        if let Some(region) = store.region(&image.region)? {
            let images = parts
                .stores
                .get(&region)
                .map_err(|e| ServiceError::internal("cannot reach the destination region", e))?;
            images.remove(dst).map_err(|e| {
                ServiceError::internal("cannot remove the partial destination image", e)
            })?;
        }
        return Ok(match TenantKey::parse(&image.owner) {
            Some(owner) => ImageChange::Remove(owner, dst),
            None => ImageChange::None,
        });
    }
    if let Some(region) = store.region(region_id)? {
        let removed = parts
            .stores
            .get(&region)
            .and_then(|images| images.remove(dst));
        if let Err(e) = removed {
            tracing::warn!(image = %dst, region = %region.id, "cannot delete the destination image yet, will retry: {e}");
            store.add_orphan(dst, &region.id)?;
            store.flush()?;
        }
    }
    Ok(ImageChange::None)
}

/// The orphan sweep's thread: every [`ORPHAN_SWEEP`] until shutdown.
pub(super) fn sweep_orphans(ctx: &Ctx) {
    let mut last: Option<Instant> = None;
    let mut failing = false;
    while !ctx.stopping() {
        if last.is_none_or(|at| at.elapsed() >= ORPHAN_SWEEP) {
            last = Some(Instant::now());
            match ctx.parts.store.orphans() {
                Ok(orphans) => {
                    failing = false;
                    sweep_once(&ctx.parts, orphans);
                }
                // Said once, not every sweep, while the store fails.
                Err(e) if !std::mem::replace(&mut failing, true) => {
                    tracing::error!("cannot read the orphaned images: {e}");
                }
                Err(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sweep_once(parts: &Parts, orphans: Vec<(Uuid, String)>) {
    let store = &parts.store;
    // A region that failed once is left alone until the next sweep: a service that does not
    // answer costs one timeout per sweep, not one per orphan.
    let mut failed = HashSet::new();
    for (image, region_id) in orphans {
        if failed.contains(&region_id) {
            continue;
        }
        let deleted = match store.region(&region_id) {
            Ok(Some(region)) => parts.stores.get(&region).and_then(|s| s.remove(image)),
            // The region is gone: nothing left to delete from.
            Ok(None) => Ok(()),
            Err(e) => Err(crate::regions::StoreError::Transient(e.to_string())),
        };
        match deleted {
            Ok(()) => {
                tracing::info!(%image, region = %region_id, "deleted an orphaned destination image");
                if let Err(e) = store.remove_orphan(image) {
                    tracing::error!(%image, "cannot forget the orphan: {e}");
                }
            }
            Err(e) => {
                if e.is_transient() {
                    tracing::debug!(%image, "orphan still there: {e}");
                } else {
                    tracing::warn!(%image, region = %region_id, "the region refuses to delete an orphaned image: {e}");
                }
                failed.insert(region_id);
            }
        }
    }
}
