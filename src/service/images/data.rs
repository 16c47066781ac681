//! The images API's data: `PUT /v2/images/{id}/file` (an upload: queued → saving → active,
//! its hashes and chunk manifest computed on the way by the copy engine, as an import's) and
//! `GET /v2/images/{id}/file` (a download of the file the region holds).
//!
//! An upload's bytes arrive through [`UploadSource`], which checks them as they pass: their
//! disk format against the image's ([`crate::formats`]) and their count against the room the
//! upload may take (the tenant's quota, the file system's free space beside its reserve and
//! the copies under way). A refused, failed or interrupted upload leaves the image `queued`
//! with no bytes, as Glance does.

use std::io::{self, Read};

use super::super::Service;
use crate::auth::Principal;
use crate::copy::Source;
use crate::error::{Result, ServiceError};
use crate::formats::Sniffer;
use crate::model::{now, size_text, Image, ImageStatus};
use crate::regions::{StoreError, TransferError};

/// The bytes of an upload as the copy engine reads them, checked on the way.
pub struct UploadSource<'a> {
    inner: &'a mut (dyn Read + Send),
    disk_format: String,
    sniffer: Sniffer,
    /// Whether the head's format was checked already.
    head_checked: bool,
    read: u64,
    /// Most bytes the upload may take, and why (for the refusal).
    limit: Option<(u64, String)>,
    /// Why the upload was refused, once it was.
    refusal: Option<ServiceError>,
    /// The body could not be read (the client went away, or it stopped arriving).
    input_failed: bool,
}

impl UploadSource<'_> {
    fn refuse(&mut self, e: ServiceError) -> io::Error {
        let error = io::Error::new(io::ErrorKind::InvalidData, e.to_string());
        self.refusal = Some(e);
        error
    }

    fn check_format(&mut self, found: &'static str) -> io::Result<()> {
        match crate::formats::mismatch(&self.disk_format, found) {
            Some(why) => Err(self.refuse(ServiceError::Unsupported(why))),
            None => Ok(()),
        }
    }
}

impl Read for UploadSource<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self
            .inner
            .read(buf)
            .inspect_err(|_| self.input_failed = true)?;
        self.read += n as u64;
        if let Some((max, why)) = &self.limit {
            if self.read > *max {
                let why = why.clone();
                return Err(self.refuse(ServiceError::OverQuota(why)));
            }
        }
        self.sniffer.feed(&buf[..n]);
        // A VHD is told by its footer: only the whole stream says whether it is one.
        if !self.head_checked && self.sniffer.head_done() && self.disk_format != "vhd" {
            self.head_checked = true;
            let found = self.sniffer.head_format();
            self.check_format(found)?;
        }
        if n == 0 {
            let found = self.sniffer.format();
            self.check_format(found)?;
        }
        Ok(n)
    }
}

impl Source for UploadSource<'_> {
    fn skip_to(&mut self, offset: u64) -> io::Result<()> {
        if offset == self.read {
            Ok(())
        } else {
            Err(io::Error::other("an upload is read from its first byte on"))
        }
    }
}

/// Glance's sentence for an image whose status does not take data.
fn no_transition(image: &Image) -> ServiceError {
    ServiceError::Conflict(format!(
        "Image status transition from {} to saving is not allowed",
        image.status
    ))
}

impl Service {
    /// `PUT /v2/images/{id}/file`: the bytes of `input` (`length` of them if the request
    /// said so) become the data of queued image `id`.
    pub fn api_upload(
        &self,
        who: &Principal,
        id: &str,
        input: &mut (dyn Read + Send),
        length: Option<u64>,
    ) -> Result<Image> {
        let image = self.api_own(who, id)?;
        if image.status != ImageStatus::Queued {
            return Err(no_transition(&image));
        }
        if image.disk_format.is_empty() || image.container_format.is_empty() {
            return Err(ServiceError::BadRequest(
                "Properties disk_format, container_format must be set prior to saving data".into(),
            ));
        }
        let region = self.region(&image.region)?;
        super::super::check_accepts(&region, &image.disk_format)?;
        let images = self.images_of(&region)?;
        images.probe().map_err(|why| {
            ServiceError::Conflict(format!("region {} store is unusable: {why}", region.id))
        })?;
        let limit = self.upload_room(&image)?;
        if let (Some(len), Some((max, why))) = (length, &limit) {
            if len > *max {
                return Err(ServiceError::OverQuota(why.clone()));
            }
        }
        // queued → saving under the admission lock: of two uploads at once, one gets it.
        let mut image = {
            let _one = self.admission.lock().unwrap_or_else(|e| e.into_inner());
            let mut now_image = self
                .store
                .image(image.id)?
                .ok_or_else(|| ServiceError::NotFound(format!("No image found with ID {id}")))?;
            if now_image.status != ImageStatus::Queued {
                return Err(no_transition(&now_image));
            }
            now_image.status = ImageStatus::Saving;
            now_image.updated_at = now();
            self.store.update_image(&now_image)?;
            self.flush()?;
            now_image
        };
        let mut source = UploadSource {
            inner: input,
            disk_format: image.disk_format.clone(),
            sniffer: Sniffer::new(),
            head_checked: false,
            read: 0,
            limit,
            refusal: None,
            input_failed: false,
        };
        let written = self.write_whole(&*images, &mut image, &mut source, |source, image| {
            image.meta.virtual_size = virtual_size(&image.disk_format, source, image.size);
        });
        let refusal = source.refusal.take();
        let why = match written {
            Ok(Ok(())) => return Ok(image),
            Ok(Err(TransferError::Failed(e))) => match e {
                _ if refusal.is_some() => None,
                StoreError::NoSpace(why) => Some(ServiceError::OverQuota(format!(
                    "Image storage media is full: {why}"
                ))),
                e if source.input_failed => Some(ServiceError::BadRequest(format!(
                    "the upload of image {} failed and the image is queued again: {e}",
                    image.id
                ))),
                e => Some(ServiceError::internal("an upload failed", e)),
            },
            Ok(Err(TransferError::Stopped(_))) => Some(ServiceError::Conflict(format!(
                "the upload of image {} was stopped and the image is queued again",
                image.id
            ))),
            Err(e) => Some(e),
        };
        // Nothing of it stays: the image is queued again, without data (best effort when
        // the store itself failed).
        let _ = images.remove(image.id);
        let _ = self.store.remove_manifest(image.id);
        image.status = ImageStatus::Queued;
        image.size = 0;
        image.checksum = None;
        image.os_hash_algo = None;
        image.os_hash_value = None;
        image.meta.virtual_size = None;
        image.updated_at = now();
        self.store.update_image(&image)?;
        self.flush()?;
        let e = refusal.or(why).unwrap_or_else(|| {
            ServiceError::Internal(format!("the upload of image {} failed", image.id))
        });
        tracing::warn!(image = %image.id, "an upload was refused or failed: {e}");
        Err(e)
    }

    /// The most bytes an upload of `image` may take, and why not more: the owner's quota of
    /// stored bytes and the room on the region's file system beside its reserve and the
    /// copies under way. `None`: no limit known.
    fn upload_room(&self, image: &Image) -> Result<Option<(u64, String)>> {
        let mut limit: Option<(u64, String)> = None;
        let mut tighter = |max: u64, why: String| {
            if limit.as_ref().is_none_or(|(m, _)| max < *m) {
                limit = Some((max, why));
            }
        };
        let key = super::super::parse_tenant(&image.owner)?;
        if let Some(max) = self.store.tenant(key)?.and_then(|t| t.quota_bytes) {
            let held = self.stored_bytes(key)?;
            let left = max.saturating_sub(held);
            tighter(
                left,
                format!(
                    "tenant {} is over its quota of {} stored: it holds {}, so an upload may take {} at most",
                    image.owner,
                    size_text(max),
                    size_text(held),
                    size_text(left)
                ),
            );
        }
        let region = self.region(&image.region)?;
        if let Some(space) = self.images_of(&region)?.space() {
            let reserve = self.min_free.of(space.total);
            let promised = self.space.promised(space.device, None);
            let left = space.free.saturating_sub(reserve).saturating_sub(promised);
            tighter(
                left,
                format!(
                    "Image storage media is full: region {} has {} free, with {} kept free as the reserve (serve --min-free) and {} promised to copies, so an upload may take {} at most",
                    region.id,
                    size_text(space.free),
                    size_text(reserve),
                    size_text(promised),
                    size_text(left)
                ),
            );
        }
        Ok(limit)
    }

    /// `GET /v2/images/{id}/file`: the image and its bytes from `offset`, or `None` for an
    /// image without data (Glance's 204).
    pub fn api_download(
        &self,
        who: &Principal,
        id: &str,
        offset: u64,
    ) -> Result<Option<(Image, Box<dyn Source>)>> {
        let image = self.api_image(who, id)?;
        if image.status != ImageStatus::Active {
            return Ok(None);
        }
        let region = self.region(&image.region)?;
        let source = self
            .images_of(&region)?
            .open(&image, offset)
            .map_err(|e| ServiceError::internal("cannot read the image's data", e))?;
        Ok(Some((image, source)))
    }
}

/// The size of the disk the bytes describe, where it can be told: a raw image's own size,
/// a qcow2 header's `size` field (bytes 24 to 32, big-endian).
fn virtual_size(disk_format: &str, source: &UploadSource, size: u64) -> Option<u64> {
    match disk_format {
        "raw" | "iso" => Some(size),
        "qcow2" => source.sniffer.qcow2_size(),
        _ => None,
    }
}
