//! Image records of the regions whose records the appliance keeps, and the images of those
//! that keep their own (Glance), as the appliance shows them.

mod api;
mod data;

pub use api::{AnyOf, ImagePage, ImageQuery, NewImage, PatchOp, SortKey, LIMIT_DEFAULT, LIMIT_MAX};

use std::fs::File;
use std::path::PathBuf;

use uuid::Uuid;

use super::{check_format, parse_tenant, Service};
use crate::auth::Principal;
use crate::copy::{Control, Plan};
use crate::error::{Result, ServiceError};
use crate::manifest;
use crate::model::{now, Image, ImageStatus, Region, TenantKey, CONTAINER_FORMATS, DISK_FORMATS};
use crate::regions;
use crate::regions::ImageStore;
use crate::store::JobQuery;

/// `image import`'s arguments.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct ImportRequest {
    /// Absolute path of the file to import.
    pub file: PathBuf,
    pub tenant: String,
    pub name: String,
    /// `None`: the one the file's bytes show ([`crate::formats`]).
    #[serde(default)]
    pub disk_format: Option<String>,
    pub container_format: String,
    pub id: Option<Uuid>,
    /// `--property`, `--visibility`, `--protected`.
    #[serde(default)]
    pub meta: crate::model::ImageMeta,
}

impl Service {
    pub fn image_import(&self, req: &ImportRequest) -> Result<Image> {
        if let Some(format) = &req.disk_format {
            check_format("disk format", format, &DISK_FORMATS)?;
        }
        check_format(
            "container format",
            &req.container_format,
            &CONTAINER_FORMATS,
        )?;
        if req.name.is_empty() || req.name.len() > 255 {
            return Err(ServiceError::BadRequest(
                "an image name must be 1 to 255 characters".into(),
            ));
        }
        for key in req.meta.properties.keys() {
            if !crate::model::is_user_property(key) {
                return Err(ServiceError::BadRequest(format!(
                    "'{key}' is one of Glance's own fields, not a property"
                )));
            }
        }
        let (key, tenant) = self.tenant(&req.tenant)?;
        let region = self.region(&tenant.region)?;
        if let Some(format) = &req.disk_format {
            super::check_accepts(&region, format)?;
        }
        let images = self.images_of(&region)?;
        if images.records().is_some() {
            return Err(ServiceError::Conflict(format!(
                "region {} keeps its own image records: upload images with its own API",
                region.id
            )));
        }
        images.probe().map_err(|why| {
            ServiceError::Conflict(format!("region {} store is unusable: {why}", region.id))
        })?;
        let mut file = open_regular(&req.file)?;
        let found = file_format(&file).map_err(|e| {
            ServiceError::BadRequest(format!("cannot read {}: {e}", req.file.display()))
        })?;
        let disk_format = match &req.disk_format {
            Some(format) => {
                if crate::formats::mismatch(format, found).is_some() {
                    return Err(ServiceError::BadRequest(format!(
                        "{} holds {found} data, not {format}: import it with --disk-format {found}, or without --disk-format",
                        req.file.display()
                    )));
                }
                format.clone()
            }
            None => {
                let found = found.to_string();
                super::check_accepts(&region, &found)?;
                found
            }
        };
        let created = now();
        let mut image = Image {
            id: req.id.unwrap_or_else(Uuid::new_v4),
            name: req.name.clone(),
            owner: tenant.id,
            region: region.id.clone(),
            status: ImageStatus::Saving,
            disk_format,
            container_format: req.container_format.clone(),
            size: 0,
            checksum: None,
            os_hash_algo: None,
            os_hash_value: None,
            created_at: created,
            updated_at: created,
            meta: req.meta.clone(),
        };
        // The record reserves the id first; the bytes follow; then it becomes active. An
        // import is a copy with nothing to verify against (the image is its own source).
        self.store.insert_image(key, &image)?;
        match self.write_whole(&*images, &mut image, &mut file, |_, _| {})? {
            Ok(()) => Ok(image),
            Err(e) => {
                let _ = images.remove(image.id);
                self.store.remove_image(key, image.id)?;
                self.flush()?;
                let why = match e {
                    regions::TransferError::Failed(e) => e.to_string(),
                    regions::TransferError::Stopped(_) => "the import was stopped".into(),
                };
                Err(ServiceError::Conflict(format!(
                    "cannot import {} into region {}: {why}",
                    req.file.display(),
                    region.id
                )))
            }
        }
    }

    /// Writes the whole of `source` as the data of the new image `image` (an import or an
    /// upload: the image is its own source, so there is nothing to verify against, and both
    /// hashes are computed); then records its manifest and makes it active with its size and
    /// hashes, `finish` adding what it learnt from the source. A transfer that failed is the
    /// inner error, for the caller to clean up after.
    fn write_whole<S: crate::copy::Source>(
        &self,
        images: &dyn ImageStore,
        image: &mut Image,
        source: &mut S,
        finish: impl FnOnce(&S, &mut Image),
    ) -> Result<std::result::Result<(), regions::TransferError>> {
        let mut control = Control {
            stop: &|| None,
            progress: &mut |_| {},
            checkpoint: None,
            limiter: None,
        };
        let written = images
            .create(image, image, &|| false)
            .map_err(regions::TransferError::Failed)
            .and_then(|sink| {
                let plan = Plan::whole(sink.hashes());
                regions::transfer(source, sink, plan, &mut control, &|_| Ok(()))
            });
        let (written, copied) = match written {
            Ok(done) => done,
            Err(e) => return Ok(Err(e)),
        };
        let made = manifest::complete(written.size, written.os_hash_value.clone(), copied.chunks);
        self.store.put_manifest(image.id, &made.encode())?;
        image.status = ImageStatus::Active;
        image.size = written.size;
        image.checksum = written.checksum;
        image.os_hash_algo = written.os_hash_algo;
        image.os_hash_value = written.os_hash_value;
        image.updated_at = now();
        finish(source, image);
        self.store.update_image(image)?;
        self.flush()?;
        Ok(Ok(()))
    }

    /// Bytes of images the tenant `key` holds (deleted ones not counted).
    pub(super) fn stored_bytes(&self, key: TenantKey) -> Result<u64> {
        Ok(self
            .store
            .images(Some(key))?
            .iter()
            .filter(|i| i.status != ImageStatus::Deleted)
            .map(|i| i.size)
            .sum())
    }

    pub fn image_list(&self, tenant: Option<&str>, region: Option<&str>) -> Result<Vec<Image>> {
        let owner = tenant.map(parse_tenant).transpose()?;
        if let Some(region) = region.map(|r| self.region(r)).transpose()? {
            let images = self.images_of(&region)?;
            if let Some(records) = images.records() {
                let mut listed = records.images(tenant).map_err(|e| {
                    ServiceError::Conflict(format!(
                        "cannot list the images of region {}: {e}",
                        region.id
                    ))
                })?;
                listed.sort_by_key(|i| (i.created_at, i.id));
                return Ok(listed);
            }
        }
        let mut images = self.store.images(owner)?;
        if let Some(region) = region {
            images.retain(|i| i.region == region);
        }
        images.sort_by_key(|i| (i.created_at, i.id));
        Ok(images)
    }

    /// An image in the region of `who`'s tenant, where that region keeps its own records
    /// (Glance), that `who` may copy (its tenant owns it, or `who` is an admin), or `None`. A
    /// job's source tenant is its image's owner, so other owners' public images are not
    /// offered: their jobs would belong to that owner.
    pub(super) fn remote_source(
        &self,
        who: &Principal,
        id: Uuid,
    ) -> Result<Option<(Image, Region)>> {
        let Some(tenant) = self.store.tenant(who.tenant_key)? else {
            return Ok(None);
        };
        let region = self.region(&tenant.region)?;
        let images = self.images_of(&region)?;
        let Some(records) = images.records() else {
            return Ok(None);
        };
        let Some(found) = records.image(id).map_err(|e| {
            tracing::warn!(region = %region.id, "image lookup failed: {e}");
            ServiceError::Conflict(if e.is_transient() {
                format!(
                    "the image service of region {} cannot be reached",
                    region.id
                )
            } else {
                format!(
                    "the image service of region {} refused the appliance's request",
                    region.id
                )
            })
        })?
        else {
            return Ok(None);
        };
        // A job's source tenant is the image's owner: one that is not a tenant id is no source.
        let Some(owner) = TenantKey::parse(&found.owner) else {
            return Ok(None);
        };
        Ok((who.admin || owner == who.tenant_key).then_some((found, region)))
    }

    pub fn image_show(&self, id: &str) -> Result<Image> {
        let missing = || ServiceError::NotFound(format!("no image {id}"));
        let uuid = Uuid::try_parse(id).map_err(|_| missing())?;
        self.store.image(uuid)?.ok_or_else(missing)
    }

    /// Marks an image deleted and removes its bytes; refused while a running job uses it.
    pub fn image_delete(&self, id: &str) -> Result<Image> {
        let mut image = self.image_show(id)?;
        if image.status == ImageStatus::Deleted {
            return Err(ServiceError::Conflict(format!(
                "image {id} is already deleted"
            )));
        }
        if image.status == ImageStatus::Saving {
            return Err(ServiceError::Conflict(format!(
                "image {id} is still being written by a copy or an import"
            )));
        }
        let owner = parse_tenant(&image.owner)?;
        let busy = self.store.jobs(
            &JobQuery {
                limit: 1,
                ..JobQuery::all(Some(owner))
            },
            &|j| {
                !j.wire.status.is_terminal()
                    && (j.wire.source_image_id == image.id
                        || j.wire.destination_image_id == Some(image.id))
            },
        )?;
        if let Some(job) = busy.first() {
            return Err(ServiceError::Conflict(format!(
                "image {id} is in use by job {} ({}); cancel it first",
                job.wire.job_id, job.wire.status
            )));
        }
        if let Some(region) = self.store.region(&image.region)? {
            self.images_of(&region)?
                .remove(image.id)
                .map_err(|e| ServiceError::internal("cannot remove the image's bytes", e))?;
        }
        image.status = ImageStatus::Deleted;
        image.updated_at = now();
        self.store.update_image(&image)?;
        self.store.remove_manifest(image.id)?;
        self.flush()?;
        Ok(image)
    }
}

/// The disk format of a file's bytes, from its head and its last 512 bytes.
fn file_format(file: &File) -> std::io::Result<&'static str> {
    use std::os::unix::fs::FileExt;
    let size = file.metadata()?.len();
    let read = |offset: u64, len: usize| -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            match file.read_at(&mut buf[filled..], offset + filled as u64)? {
                0 => break,
                n => filled += n,
            }
        }
        buf.truncate(filled);
        Ok(buf)
    };
    let head = read(0, crate::formats::HEAD.min(size as usize))?;
    let tail_len = crate::formats::TAIL.min(size as usize);
    let tail = read(size - tail_len as u64, tail_len)?;
    Ok(crate::formats::detect(&head, &tail))
}

/// Opens a file to import: a regular file only (a FIFO or a device would block or never end;
/// it is opened without blocking to find out).
fn open_regular(path: &std::path::Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| ServiceError::BadRequest(format!("cannot read {}: {e}", path.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| ServiceError::BadRequest(format!("cannot read {}: {e}", path.display())))?;
    if meta.is_dir() {
        return Err(ServiceError::BadRequest(format!(
            "{} is a directory, not an image file",
            path.display()
        )));
    }
    if !meta.is_file() {
        return Err(ServiceError::BadRequest(format!(
            "{} is not a regular file (a FIFO, socket or device cannot be imported)",
            path.display()
        )));
    }
    Ok(file)
}
