//! The serving end of the peer protocol (README, "Peer protocol"): what another appliance may
//! read of the images whose records this appliance keeps, and uploads into them.
//!
//! Scope: an image is visible to a principal that is an admin or belongs to the image's owner
//! tenant; anything else, a missing image or a deleted one is the same "there is no image"
//! (404), so an id tells nothing of other tenants' images.
//!
//! An upload is an image record with status `uploading`, its manifest (stored at once) and its
//! partial file in a directory region. Chunks arrive in any order, each checked against the
//! manifest before it is written; whatever the file holds is checked again, chunk by chunk,
//! when the sender asks what is missing and when it commits. The commit fills what is still
//! missing from the appliance's own chunks of the same owner, checks every chunk and the whole
//! image's SHA-512, makes the file durable and renames it into place, and only then makes the
//! record `active`: a crash never leaves an active image without its bytes.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex, RwLock};

use uuid::Uuid;

use super::{check_format, Service};
use crate::auth::Principal;
use crate::copy::{Source, WholeHash};
use crate::error::{Result, ServiceError};
use crate::manifest::{self, Entry, Manifest, CHUNK_SIZE};
use crate::model::{
    now, Image, ImageStatus, Region, RegionKind, TenantKey, CONTAINER_FORMATS, DISK_FORMATS,
};
use crate::peer::{FrameReader, Ranges, Upload, MAX_CHUNKS};
use crate::regions::{self, Part};
use crate::reuse::LocalChunks;
use crate::store::Registry;
use crate::text::excerpt;

/// Why a peer request is refused, where the appliance's usual errors do not say it.
#[derive(Debug)]
pub enum Refusal {
    Service(ServiceError),
    /// The token may not do this, although it may see what it names (403).
    Forbidden(String),
    /// A chunk that is not what the manifest says (422).
    Unprocessable(String),
    /// Chunks the upload still lacks (409, answered as JSON).
    Missing(Ranges),
}

impl From<ServiceError> for Refusal {
    fn from(e: ServiceError) -> Self {
        Refusal::Service(e)
    }
}

/// What a `PUT` of an upload did.
#[derive(Debug)]
pub struct Begun {
    /// A new upload (201), or one that goes on (200).
    pub created: bool,
    /// The non-hole chunks the sender must still send.
    pub missing: Ranges,
}

/// What the serving end keeps between requests (a field of [`Service`]).
#[derive(Default)]
pub struct PeerState {
    /// Held while an upload's file is read or written: chunk uploads share it, a `PUT`, a
    /// commit and a removal have it alone (a commit must not rename a file that chunks are
    /// still being written into).
    uploads: Mutex<HashMap<Uuid, Arc<RwLock<()>>>>,
    /// The manifests decoded last: a chunk request or upload names one image many times, and
    /// a manifest of 100 GiB is 54 MB to check and decode. One is used only while it
    /// describes the image's record as it stands. The last used first.
    manifests: Mutex<Vec<(Uuid, Arc<Manifest>)>>,
}

/// Images whose manifests [`PeerState`] keeps.
const KEPT_MANIFESTS: usize = 8;

impl PeerState {
    fn upload_lock(&self, id: Uuid) -> Arc<RwLock<()>> {
        let mut table = self.uploads.lock().unwrap_or_else(|e| e.into_inner());
        // Locks nobody holds are forgotten, so the table stays as small as the uploads under
        // way.
        table.retain(|_, lock| Arc::strong_count(lock) > 1);
        Arc::clone(table.entry(id).or_default())
    }

    /// The manifest of `image` as kept, or `load`ed (and kept).
    fn kept_manifest(
        &self,
        image: &Image,
        load: impl FnOnce() -> Result<Option<Manifest>>,
    ) -> Result<Option<Arc<Manifest>>> {
        let lock = || self.manifests.lock().unwrap_or_else(|e| e.into_inner());
        let found = lock()
            .iter()
            .find(|(id, m)| *id == image.id && m.describes(image))
            .map(|(_, m)| Arc::clone(m));
        if found.is_some() {
            return Ok(found);
        }
        let Some(m) = load()? else {
            return Ok(None);
        };
        let m = Arc::new(m);
        let mut kept = lock();
        kept.retain(|(id, _)| *id != image.id);
        kept.insert(0, (image.id, Arc::clone(&m)));
        kept.truncate(KEPT_MANIFESTS);
        Ok(Some(m))
    }

    /// Drops what is kept of image `id`'s manifest (its upload began, ended or went).
    fn forget_manifest(&self, id: Uuid) {
        self.manifests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(kept, _)| *kept != id);
    }
}

fn no_image(id: &str) -> ServiceError {
    ServiceError::NotFound(format!("there is no image {}", excerpt(id, 64)))
}

/// Whether the appliance keeps the records of `region`'s images (a directory region).
fn keeps_records(region: &Region) -> bool {
    matches!(region.kind, RegionKind::Directory { .. })
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn read_failed(e: std::io::Error) -> ServiceError {
    ServiceError::internal("cannot read the upload's partial file", e)
}

fn write_failed(e: std::io::Error) -> ServiceError {
    if crate::disk::is_disk_full(&e) {
        ServiceError::DiskFull(format!("the region's disk is full: {e}"))
    } else {
        ServiceError::internal("cannot write the upload's partial file", e)
    }
}

fn store_failed(e: regions::StoreError) -> ServiceError {
    match e {
        regions::StoreError::NoSpace(why) => {
            ServiceError::DiskFull(format!("the region's disk is full: {why}"))
        }
        e => ServiceError::internal("the region's image store failed", e),
    }
}

/// Checks the fields of an upload's record; the record as it will be kept.
fn upload_record(id: Uuid, upload: &Upload, owner: &str, m: &Manifest) -> Result<Image> {
    let bad = |why: String| Err(ServiceError::BadRequest(why));
    let i = &upload.image;
    if i.name.is_empty() || i.name.len() > 255 {
        return bad("an image name must be 1 to 255 characters".into());
    }
    if i.disk_format.len() > 32 || i.container_format.len() > 32 {
        return bad("the image's disk or container format is not one this appliance knows".into());
    }
    check_format("disk format", &i.disk_format, &DISK_FORMATS)?;
    check_format("container format", &i.container_format, &CONTAINER_FORMATS)?;
    if i.checksum.as_deref().is_some_and(|c| !is_hex(c, 32)) {
        return bad("the image's checksum must be an MD5 in 32 lowercase hex digits".into());
    }
    if i.os_hash_algo.as_deref() != Some("sha512")
        || !i.os_hash_value.as_deref().is_some_and(|v| is_hex(v, 128))
    {
        return bad(
            "the image needs os_hash_algo sha512 and its os_hash_value in 128 lowercase hex digits"
                .into(),
        );
    }
    let created = now();
    let image = Image {
        id,
        name: i.name.clone(),
        owner: owner.to_string(),
        region: upload.region.clone(),
        status: ImageStatus::Uploading,
        disk_format: i.disk_format.clone(),
        container_format: i.container_format.clone(),
        size: i.size,
        checksum: i.checksum.clone(),
        os_hash_algo: i.os_hash_algo.clone(),
        os_hash_value: i.os_hash_value.clone(),
        created_at: created,
        updated_at: created,
        meta: Default::default(),
    };
    if !m.describes(&image) {
        return bad(format!(
            "the manifest does not describe the image: it must have chunks of {CHUNK_SIZE} bytes, all {} of them, size {} and SHA-512 {}",
            m.chunk_count(),
            image.size,
            excerpt(i.os_hash_value.as_deref().unwrap_or_default(), 128)
        ));
    }
    Ok(image)
}

/// Keeps an upload's manifest until its commit, without its SHA-512 (which the record holds):
/// as a partial manifest, it is not in the chunk index, whose chunks must be readable from
/// active images.
fn keep_upload_manifest(store: &dyn Registry, id: Uuid, m: &Manifest) -> Result<()> {
    let kept = Manifest {
        sha512: None,
        ..m.clone()
    };
    store.put_manifest(id, &kept.encode())
}

/// The manifest an upload of `image` keeps ([`keep_upload_manifest`]), whole again.
fn upload_manifest(store: &dyn Registry, image: &Image) -> Result<Option<Manifest>> {
    let fits = |m: &Manifest| {
        m.chunk_size as usize == CHUNK_SIZE
            && m.size == image.size
            && m.chunks.len() == m.chunk_count()
            && m.sha512.is_none()
    };
    Ok(manifest::load_as(store, image.id, fits)?.map(|m| Manifest {
        sha512: image.os_hash_value.clone(),
        ..m
    }))
}

/// Decodes an upload's manifest (standard base64 of the manifest encoding).
fn decode_manifest(text: &str) -> Result<Manifest> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| ServiceError::BadRequest(format!("the manifest is not base64: {e}")))?;
    Manifest::decode(&bytes)
        .map_err(|why| ServiceError::BadRequest(format!("the manifest cannot be read: {why}")))
}

/// Whether chunk `i` of `m` is in `part` as the manifest says (a hole: zeros); reads into
/// `buf`. A chunk whose bytes are unallocated in the file is not read.
fn held(part: &dyn Part, m: &Manifest, i: usize, buf: &mut Vec<u8>) -> Result<bool> {
    let (offset, len) = (m.offset(i), m.chunk_len(i));
    let entry = m.chunks[i];
    if part.is_hole(offset, len as u64) {
        return Ok(entry == Entry::Hole);
    }
    buf.resize(len, 0);
    part.read_at(buf, offset).map_err(read_failed)?;
    Ok(Entry::of(buf) == entry)
}

/// The data chunks of `m` that `part` does not hold, and that `local` does not have either.
fn missing(part: &dyn Part, m: &Manifest, local: Option<&dyn LocalChunks>) -> Result<Ranges> {
    let mut buf = Vec::new();
    let mut lacking = Vec::new();
    for (i, entry) in m.chunks.iter().enumerate() {
        let Entry::Data(hash) = entry else { continue };
        if held(part, m, i, &mut buf)? || local.is_some_and(|l| l.has(hash)) {
            continue;
        }
        lacking.push(i);
    }
    Ok(Ranges::of(lacking))
}

/// Completes `part` as `m` says: every chunk checked, holes made zeros, missing chunks taken
/// from `local`; the SHA-512 of the whole image, or the chunks that could not be had.
fn assemble(
    part: &dyn Part,
    m: &Manifest,
    local: Option<&dyn LocalChunks>,
) -> Result<std::result::Result<String, Ranges>> {
    let zeros: Arc<Vec<u8>> = Arc::new(vec![0; CHUNK_SIZE]);
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Arc<Vec<u8>>, usize)>(16);
    // The SHA-512 on a thread of its own: it is slower than the reads and BLAKE3 together.
    let mut sha = WholeHash::sha512().map_err(|e| ServiceError::internal("cannot hash", e))?;
    let hasher = std::thread::spawn(move || {
        for (bytes, len) in rx {
            sha.update(&bytes[..len])?;
        }
        sha.hex()
    });
    let mut lacking = Vec::new();
    let mut buf = Vec::new();
    for i in 0..m.chunk_count() {
        let len = m.chunk_len(i);
        let ok = held(part, m, i, &mut buf)?;
        let bytes = match m.chunks[i] {
            Entry::Hole if ok => Arc::clone(&zeros),
            Entry::Hole => {
                // Whatever the file holds there goes: the image has zeros.
                part.write_at(&zeros[..len], m.offset(i))
                    .map_err(write_failed)?;
                Arc::clone(&zeros)
            }
            Entry::Data(_) if ok => Arc::new(std::mem::take(&mut buf)),
            Entry::Data(hash) => {
                buf.resize(len, 0);
                let found = local.is_some_and(|l| l.read(&hash, &mut buf))
                    && Entry::of(&buf) == m.chunks[i];
                if !found {
                    lacking.push(i);
                    continue;
                }
                part.write_at(&buf, m.offset(i)).map_err(write_failed)?;
                Arc::new(std::mem::take(&mut buf))
            }
        };
        if lacking.is_empty() && tx.send((bytes, len)).is_err() {
            return Err(ServiceError::Internal("the hashing thread stopped".into()));
        }
    }
    drop(tx);
    let sha512 = hasher
        .join()
        .map_err(|_| ServiceError::Internal("the hashing thread failed".into()))?
        .map_err(|e| ServiceError::internal("cannot hash", e))?;
    Ok(if lacking.is_empty() {
        Ok(sha512)
    } else {
        Err(Ranges::of(lacking))
    })
}

impl Service {
    /// The chunks of `owner`'s own images a copy into this appliance may take.
    fn local_chunks(&self, owner: TenantKey) -> Option<Box<dyn LocalChunks>> {
        Some(Box::new(crate::reuse::Reuse::new(
            Arc::clone(&self.store),
            Arc::clone(&self.stores),
            owner,
        )))
    }

    /// An image `who` may see, and its region.
    fn visible(&self, who: &Principal, id: &str) -> Result<(Image, Region)> {
        let uuid = Uuid::try_parse(id).map_err(|_| no_image(id))?;
        let image = self.store.image(uuid)?.ok_or_else(|| no_image(id))?;
        let owned = TenantKey::parse(&image.owner) == Some(who.tenant_key);
        if image.status == ImageStatus::Deleted || !(who.admin || owned) {
            return Err(no_image(id));
        }
        let region = self
            .store
            .region(&image.region)?
            .filter(keeps_records)
            .ok_or_else(|| no_image(id))?;
        Ok((image, region))
    }

    /// `GET /peer/v1/images?region=R`: the images of `region` that `who` may see.
    pub fn peer_images(&self, who: &Principal, region: &str) -> Result<Vec<Image>> {
        let region = self
            .store
            .region(region)?
            .filter(keeps_records)
            .ok_or_else(|| {
                ServiceError::NotFound(format!(
                    "there is no directory region {} on this appliance",
                    excerpt(region, 64)
                ))
            })?;
        let owner = (!who.admin).then_some(who.tenant_key);
        let mut images: Vec<Image> = self
            .store
            .images(owner)?
            .into_iter()
            .filter(|i| i.region == region.id && i.status != ImageStatus::Deleted)
            .collect();
        images.sort_by_key(|i| (i.created_at, i.id));
        Ok(images)
    }

    /// `GET /peer/v1/images/{id}`.
    pub fn peer_image(&self, who: &Principal, id: &str) -> Result<Image> {
        self.visible(who, id).map(|(image, _)| image)
    }

    /// An active image `who` may see (409 for another status), and its region.
    fn active(&self, who: &Principal, id: &str) -> Result<(Image, Region)> {
        let (image, region) = self.visible(who, id)?;
        if image.status != ImageStatus::Active {
            return Err(ServiceError::Conflict(format!(
                "image {} is {}, not active",
                image.id, image.status
            )));
        }
        Ok((image, region))
    }

    /// The complete manifest of an active image; one is made now (the image read whole, its
    /// SHA-512 checked against the record) for an image that has none.
    pub fn peer_manifest(&self, who: &Principal, id: &str) -> Result<(Image, Arc<Manifest>)> {
        let (image, region) = self.active(who, id)?;
        if let Some(m) = self
            .peer
            .kept_manifest(&image, || manifest::load(&*self.store, &image))?
        {
            return Ok((image, m));
        }
        tracing::info!(image = %image.id, "making the image's manifest (it has none yet)");
        let mut input = self
            .images_of(&region)?
            .open(&image, 0)
            .map_err(|e| ServiceError::Conflict(format!("cannot read image {}: {e}", image.id)))?;
        let m = regions::make_manifest(&mut *input, &image, &|| None).map_err(|e| {
            tracing::warn!(image = %image.id, "cannot make the image's manifest: {e:?}");
            ServiceError::Conflict(format!(
                "the manifest of image {} cannot be made: its bytes cannot be read or differ from its record",
                image.id
            ))
        })?;
        self.store.put_manifest(image.id, &m.encode())?;
        self.flush()?;
        Ok((image, Arc::new(m)))
    }

    /// The bytes of an active image `who` may see, from `offset` on, and its record.
    pub fn peer_read(
        &self,
        who: &Principal,
        id: &str,
        offset: u64,
    ) -> Result<(Image, Box<dyn Source>)> {
        let (image, region) = self.active(who, id)?;
        let source = self.peer_source(&image, &region, offset)?;
        Ok((image, source))
    }

    /// The bytes of `image` (in `region`) from `offset` on.
    pub fn peer_source(
        &self,
        image: &Image,
        region: &Region,
        offset: u64,
    ) -> Result<Box<dyn Source>> {
        self.images_of(region)?
            .open(image, offset)
            .map_err(|e| ServiceError::Conflict(format!("cannot read image {}: {e}", image.id)))
    }

    /// The region of an image `who` may see (for reading its chunks after its manifest).
    pub fn peer_region(&self, who: &Principal, id: &str) -> Result<Region> {
        self.visible(who, id).map(|(_, region)| region)
    }

    /// `DELETE /peer/v1/images/{id}`: as `image delete`, for an image `who` may see.
    pub fn peer_delete(&self, who: &Principal, id: &str) -> Result<()> {
        let (image, _) = self.visible(who, id)?;
        self.peer.forget_manifest(image.id);
        self.image_delete(&image.id.to_string()).map(drop)
    }

    /// An upload in progress that `who` may see, its region and its manifest.
    fn upload_of(&self, who: &Principal, id: &str) -> Result<(Image, Region, Arc<Manifest>)> {
        let (image, region) = self.visible(who, id)?;
        if image.status != ImageStatus::Uploading {
            return Err(ServiceError::Conflict(format!(
                "image {} is {}, not an upload in progress",
                image.id, image.status
            )));
        }
        let m = self
            .peer
            .kept_manifest(&image, || upload_manifest(&*self.store, &image))?
            .ok_or_else(|| {
                ServiceError::Conflict(format!(
                    "upload {} has no manifest kept; send its PUT again",
                    image.id
                ))
            })?;
        Ok((image, region, m))
    }

    fn part_of(&self, image: &Image, region: &Region) -> Result<Box<dyn Part>> {
        self.images_of(region)?
            .part(image)
            .ok_or_else(|| {
                ServiceError::NotFound(format!(
                    "there is no directory region {} on this appliance",
                    region.id
                ))
            })?
            .map_err(store_failed)
    }

    /// `PUT /peer/v1/uploads/{id}`: a new upload, or one that goes on; what it still needs.
    pub fn upload_begin(
        &self,
        who: &Principal,
        id: &str,
        upload: &Upload,
    ) -> std::result::Result<Begun, Refusal> {
        let uuid = Uuid::try_parse(id).map_err(|_| {
            ServiceError::BadRequest(format!(
                "the upload's id '{}' is not a UUID",
                excerpt(id, 64)
            ))
        })?;
        let region = self
            .store
            .region(&upload.region)?
            .filter(keeps_records)
            .ok_or_else(|| {
                ServiceError::NotFound(format!(
                    "there is no directory region {} on this appliance",
                    excerpt(&upload.region, 64)
                ))
            })?;
        let owner = &upload.image.owner;
        let key = TenantKey::parse(owner).ok_or_else(|| {
            ServiceError::BadRequest(format!(
                "the owner '{}' is not a tenant id",
                excerpt(owner, 64)
            ))
        })?;
        if !who.admin && key != who.tenant_key {
            return Err(Refusal::Forbidden(
                "a token may upload only images of its own tenant".into(),
            ));
        }
        let tenant = self
            .store
            .tenant(key)?
            .filter(|t| t.region == region.id)
            .ok_or_else(|| {
                ServiceError::NotFound(format!(
                    "there is no tenant {} in region {}",
                    excerpt(owner, 64),
                    region.id
                ))
            })?;
        let m = decode_manifest(&upload.manifest)?;
        let image = upload_record(uuid, upload, &tenant.id, &m)?;
        super::check_accepts(&region, &image.disk_format)?;
        let lock = self.peer.upload_lock(uuid);
        let _alone = lock.write().unwrap_or_else(|e| e.into_inner());
        self.peer.forget_manifest(uuid);
        let created = match self.store.image(uuid)? {
            Some(kept) => {
                let same = kept.status == ImageStatus::Uploading
                    && kept.owner == image.owner
                    && kept.region == image.region;
                if !same {
                    return Err(ServiceError::Conflict(format!("image id {uuid} is taken")).into());
                }
                match upload_manifest(&*self.store, &kept)? {
                    Some(old) if old != m || kept.os_hash_value != image.os_hash_value => {
                        return Err(ServiceError::Conflict(format!(
                            "upload {uuid} is under way with a different manifest; delete it first"
                        ))
                        .into())
                    }
                    Some(_) => {}
                    None => keep_upload_manifest(&*self.store, uuid, &m)?,
                }
                false
            }
            None => {
                self.check_upload_room(key, &tenant, &region, &image)?;
                self.store.insert_image(key, &image)?;
                keep_upload_manifest(&*self.store, uuid, &m)?;
                true
            }
        };
        self.flush()?;
        let part = match self.part_of(&image, &region) {
            Ok(part) => part,
            Err(e) => {
                if created {
                    self.store.remove_image(key, uuid)?;
                    self.flush()?;
                }
                return Err(e.into());
            }
        };
        let local = self.local_chunks(key);
        let missing = missing(&*part, &m, local.as_deref())?;
        Ok(Begun { created, missing })
    }

    /// A new upload must fit the region's file system beside its reserve and the copies
    /// under way (409), and the owner's quota of stored bytes (413).
    fn check_upload_room(
        &self,
        key: TenantKey,
        tenant: &crate::model::Tenant,
        region: &Region,
        image: &Image,
    ) -> Result<()> {
        if let Some(space) = self.images_of(region)?.space() {
            let reserve = self.min_free.of(space.total);
            let promised = self.space.promised(space.device, None);
            crate::worker::space::room_for(&space, reserve, promised, image.size).map_err(
                |why| {
                    ServiceError::Conflict(format!(
                        "region {} has no room for image {}: {why}",
                        region.id, image.id
                    ))
                },
            )?;
        }
        if let Some(max) = tenant.quota_bytes {
            let held = self.stored_bytes(key)?;
            if held.saturating_add(image.size) > max {
                return Err(ServiceError::OverQuota(format!(
                    "tenant {} is over its quota of {max} bytes stored: it holds {held}, and image {} needs {} more",
                    tenant.id, image.id, image.size
                )));
            }
        }
        Ok(())
    }

    /// `POST /peer/v1/uploads/{id}/chunks`: the frames of `input`, each checked against the
    /// upload's manifest and written at its offset; how many were.
    pub fn upload_receive(
        &self,
        who: &Principal,
        id: &str,
        input: &mut dyn Read,
    ) -> std::result::Result<usize, Refusal> {
        let (image, region, m) = self.upload_of(who, id)?;
        let lock = self.peer.upload_lock(image.id);
        let _shared = lock.read().unwrap_or_else(|e| e.into_inner());
        // The record again under the lock: a commit or a removal may have come first.
        self.upload_of(who, id)?;
        let part = self.part_of(&image, &region)?;
        let mut frames = FrameReader::new(input, &m)
            .map_err(|e| ServiceError::internal("cannot start a zstd decoder", e))?;
        let mut received = 0;
        loop {
            let frame = match frames.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(
                        ServiceError::BadRequest("the body ends inside a frame".into()).into(),
                    )
                }
                Err(e) => {
                    return Err(ServiceError::BadRequest(format!(
                        "frame {} of the body cannot be read: {e}",
                        received + 1
                    ))
                    .into())
                }
            };
            if received == MAX_CHUNKS {
                return Err(ServiceError::BadRequest(format!(
                    "the body holds more than {MAX_CHUNKS} frames; send at most {MAX_CHUNKS} per request"
                ))
                .into());
            }
            let entry = m.chunks[frame.index];
            if Entry::of(&frame.bytes) != entry {
                return Err(Refusal::Unprocessable(format!(
                    "chunk {} does not match the manifest",
                    frame.index
                )));
            }
            if entry != Entry::Hole {
                part.write_at(&frame.bytes, m.offset(frame.index))
                    .map_err(write_failed)?;
            }
            received += 1;
        }
        Ok(received)
    }

    /// `POST /peer/v1/uploads/{id}/commit`: the upload becomes an active image, or the chunks
    /// it still lacks are named.
    pub fn upload_commit(&self, who: &Principal, id: &str) -> std::result::Result<Image, Refusal> {
        let (image, _, _) = self.upload_of(who, id)?;
        let lock = self.peer.upload_lock(image.id);
        let _alone = lock.write().unwrap_or_else(|e| e.into_inner());
        let (mut image, region, m) = self.upload_of(who, id)?;
        let part = self.part_of(&image, &region)?;
        let key = TenantKey::parse(&image.owner)
            .ok_or_else(|| ServiceError::Internal(format!("image {} has no owner", image.id)))?;
        let local = self.local_chunks(key);
        let sha512 = assemble(&*part, &m, local.as_deref())?.map_err(Refusal::Missing)?;
        if Some(&sha512) != m.sha512.as_ref() {
            return Err(Refusal::Unprocessable(format!(
                "every chunk matches the manifest, but the image's SHA-512 is {sha512}, not the {} its manifest and record name",
                m.sha512.as_deref().map(|s| excerpt(s, 128)).unwrap_or_default()
            )));
        }
        // The bytes first, durable and in place; then the manifest; then the record.
        part.publish(m.size).map_err(store_failed)?;
        self.peer.forget_manifest(image.id);
        self.store.put_manifest(image.id, &m.encode())?;
        image.status = ImageStatus::Active;
        image.updated_at = now();
        self.store.update_image(&image)?;
        self.flush()?;
        tracing::info!(image = %image.id, size = image.size, "an upload became an active image");
        Ok(image)
    }

    /// `DELETE /peer/v1/uploads/{id}`: the upload's record and partial file go.
    pub fn upload_abandon(&self, who: &Principal, id: &str) -> Result<()> {
        let (image, _) = self.visible(who, id)?;
        let lock = self.peer.upload_lock(image.id);
        let _alone = lock.write().unwrap_or_else(|e| e.into_inner());
        let (image, region) = self.visible(who, id)?;
        if image.status != ImageStatus::Uploading {
            return Err(ServiceError::Conflict(format!(
                "image {} is {}, not an upload in progress",
                image.id, image.status
            )));
        }
        // The partial file, and a file a commit interrupted after its rename left.
        self.images_of(&region)?
            .remove(image.id)
            .map_err(store_failed)?;
        let key = TenantKey::parse(&image.owner)
            .ok_or_else(|| ServiceError::Internal(format!("image {} has no owner", image.id)))?;
        self.store.remove_image(key, image.id)?;
        self.peer.forget_manifest(image.id);
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regions::directory::Directory;
    use crate::regions::ImageStore;
    use sha2::{Digest, Sha512};

    /// Chunks the appliance "holds" elsewhere, as the chunk index would name them.
    struct Held(HashMap<crate::manifest::Hash, Vec<u8>>);

    impl LocalChunks for Held {
        fn has(&self, hash: &crate::manifest::Hash) -> bool {
            self.0.contains_key(hash)
        }

        fn read(&self, hash: &crate::manifest::Hash, buf: &mut [u8]) -> bool {
            match self.0.get(hash) {
                Some(bytes) if bytes.len() == buf.len() => {
                    buf.copy_from_slice(bytes);
                    true
                }
                _ => false,
            }
        }
    }

    fn image(id: Uuid) -> Image {
        Image {
            id,
            name: "i".into(),
            owner: "o".into(),
            region: "r".into(),
            status: ImageStatus::Uploading,
            disk_format: "raw".into(),
            container_format: "bare".into(),
            size: 0,
            checksum: None,
            os_hash_algo: None,
            os_hash_value: None,
            created_at: 0,
            updated_at: 0,
            meta: Default::default(),
        }
    }

    #[test]
    fn missing_chunks_are_those_neither_received_nor_held_and_the_commit_takes_the_held_ones() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Directory::new(dir.path());
        // Chunks: 0 received, 1 a hole, 2 held locally, 3 missing, 4 (short) received.
        let mut data = vec![0u8; 4 * CHUNK_SIZE + 100];
        for (i, b) in data.iter_mut().enumerate() {
            if i / CHUNK_SIZE != 1 {
                *b = (i % 251) as u8 ^ ((i / CHUNK_SIZE) as u8 + 1);
            }
        }
        let chunk = |i: usize| &data[i * CHUNK_SIZE..data.len().min((i + 1) * CHUNK_SIZE)];
        let chunks = (0..5).map(|i| Entry::of(chunk(i))).collect();
        let sha = crate::model::to_hex(&Sha512::digest(&data));
        let m = manifest::complete(data.len() as u64, Some(sha.clone()), chunks);
        let id = Uuid::new_v4();
        let part = store.part(&image(id)).expect("directory").expect("part");
        part.write_at(chunk(0), 0).expect("write");
        part.write_at(chunk(4), m.offset(4)).expect("write");
        // Garbage where the image has a hole: the commit makes it zeros.
        part.write_at(&[9u8; 10], m.offset(1) + 5).expect("write");
        let Entry::Data(h2) = m.chunks[2] else {
            panic!("chunk 2 has data")
        };
        let held = Held(HashMap::from([(h2, chunk(2).to_vec())]));
        let local: Option<&dyn LocalChunks> = Some(&held);
        assert_eq!(
            missing(&*part, &m, local).expect("missing").ranges,
            vec![(3, 1)]
        );
        assert_eq!(
            missing(&*part, &m, None).expect("missing").ranges,
            vec![(2, 2)]
        );
        assert_eq!(
            assemble(&*part, &m, local).expect("assemble"),
            Err(Ranges::of([3]))
        );
        part.write_at(chunk(3), m.offset(3)).expect("write");
        assert_eq!(assemble(&*part, &m, local).expect("assemble"), Ok(sha));
        part.publish(m.size).expect("publish");
        let placed = std::fs::read(dir.path().join(id.to_string())).expect("placed");
        assert!(placed == data);
    }
}
