//! Regions' image stores: one [`ImageStore`] trait over every kind of region, built by
//! [`Stores::get`] with the one match on [`RegionKind`]; nothing else asks what kind a region is.
//!
//! - [`directory`]: a local directory, one file per image; the appliance keeps the records.
//! - [`glance`]: an OpenStack Glance v2 service, which keeps its own records.
//! - [`peer`]: a region of another image-replicator appliance, by the peer protocol; the peer
//!   keeps the records, and a copy moves only the chunks the receiving side lacks.
//!
//! A copy reads the source store's [`ImageStore::open`] and moves it into the destination's
//! [`Sink`] with [`transfer`] (chunk by chunk, checked against the source's manifest where it
//! has one, after what the sink holds verified already where it can resume); the sink's
//! `finish` says what the destination recorded, and the one [`verify`] rule compares that
//! with the source record before the image is published. Everything here blocks: the worker
//! copies on threads.

pub mod directory;
pub mod glance;
pub mod peer;

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::copy::{
    copy, Control, Copied, CopyError, Digests, Discard, Hashes, Output, Plan, Source, Stop,
};
use crate::disk::Space;
use crate::manifest::Manifest;
use crate::model::{Image, Region, RegionKind};
use crate::peer::Delta;
use crate::remote::RemoteError;
use crate::reuse::{LocalChunks, Reflinks};
use crate::text::excerpt;

/// Why an image store could not do what was asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// It may pass: an I/O error that can be retried, a service that does not answer.
    #[error("{0}")]
    Transient(String),
    /// It will not pass by retrying.
    #[error("{0}")]
    Fatal(String),
    /// The destination has no room (ENOSPC, EDQUOT): it may pass once space is freed.
    #[error("{0}")]
    NoSpace(String),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient(_))
    }

    /// An I/O error while doing `what`, transient if it may pass.
    pub fn io(what: &str, e: io::Error) -> StoreError {
        use io::ErrorKind::*;
        let transient = matches!(
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
        ) || e.raw_os_error() == Some(libc::EIO);
        let text = format!("{what}: {e}");
        if crate::disk::is_disk_full(&e) {
            StoreError::NoSpace(text)
        } else if transient {
            StoreError::Transient(text)
        } else {
            StoreError::Fatal(text)
        }
    }
}

impl From<RemoteError> for StoreError {
    fn from(e: RemoteError) -> Self {
        match e {
            RemoteError::Unavailable(text) => StoreError::Transient(text),
            RemoteError::Refused(text) => StoreError::Fatal(text),
        }
    }
}

/// What a destination holds after a copy, as it recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub size: u64,
    /// MD5, hex.
    pub checksum: Option<String>,
    pub os_hash_algo: Option<String>,
    pub os_hash_value: Option<String>,
}

/// The image store of one region.
pub trait ImageStore: Send + Sync {
    /// Whether the store can take and give images now; why not.
    fn probe(&self) -> Result<(), String>;
    /// Makes a new region's store ready (creates its directory, checks its settings).
    fn prepare(&self) -> crate::error::Result<()>;
    /// The store's own image records, for a store that keeps them (Glance); `None` where the
    /// appliance's store keeps them.
    fn records(&self) -> Option<&dyn ImageRecords> {
        None
    }
    /// The bytes of `image`, from byte `offset` on.
    fn open(&self, image: &Image, offset: u64) -> Result<Box<dyn Source>, StoreError>;
    /// The manifest of one of the store's own records (a peer's); `None` where the store has
    /// none to give (Glance) or the appliance keeps the record and its manifest.
    /// What fetching it took on the wire is counted in `delta`.
    fn manifest(&self, _image: &Image, _delta: &Delta) -> Result<Option<Manifest>, StoreError> {
        Ok(None)
    }
    /// The bytes of `image` for a copy, as [`Reading`] says; a store that has no cheaper way
    /// than reading the whole image ignores all but the offset.
    fn open_for_copy<'a>(
        &'a self,
        image: &Image,
        reading: Reading<'a>,
    ) -> Result<Box<dyn Source + 'a>, StoreError> {
        self.open(image, reading.offset)
    }
    /// A sink for the bytes of the new image `image`, a copy of `source`. A copy must stop
    /// waiting on the destination as soon as `stopping` says so.
    fn create<'a>(
        &'a self,
        image: &Image,
        source: &Image,
        stopping: &'a dyn Fn() -> bool,
    ) -> Result<Box<dyn Sink + 'a>, StoreError>;
    /// Whether a copy into a store with records of its own can continue an interrupted
    /// attempt's image (a peer's upload) instead of starting a new one.
    fn continues_partial(&self) -> bool {
        false
    }
    /// Removes an image and whatever a copy left of it; one already gone is fine.
    fn remove(&self, id: Uuid) -> Result<(), StoreError>;
    /// Start-up: removes what interrupted copies left behind, but for the partial images in
    /// `keep` (of copies that will resume).
    fn sweep(&self, _keep: &HashSet<Uuid>) {}
    /// The room on the store's file system; `None` for a store that keeps its own quotas
    /// (Glance) or cannot tell.
    fn space(&self) -> Option<Space> {
        None
    }
    /// The partial file of an upload of `image` (peer protocol), created empty or reopened
    /// as an earlier upload left it; `None` for a store that has no such files (Glance).
    fn part(&self, _image: &Image) -> Option<Result<Box<dyn Part>, StoreError>> {
        None
    }
}

/// The partial file of an upload: chunks arrive in any order and are written at their
/// offsets; nothing is visible under the image's name until [`Part::publish`].
pub trait Part: Send {
    /// Writes `bytes` at `offset`; zero blocks over a hole stay a hole.
    fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()>;
    /// Fills `buf` from `offset` (zeros past the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Whether the `len` bytes at `offset` are unallocated (a hole or past the end).
    fn is_hole(&self, offset: u64, len: u64) -> bool;
    /// Sets the length to `size`, makes the file durable and renames it into place.
    fn publish(self: Box<Self>, size: u64) -> Result<(), StoreError>;
}

/// A remote region's settings can be used: its URL is HTTP(S), and its secret (read by the
/// serving process at each use) is readable now.
fn check_remote(
    kind: &str,
    url: &str,
    secret: Option<&crate::model::SecretSource>,
) -> crate::error::Result<()> {
    use crate::error::ServiceError;
    if !crate::model::is_http_url(url) {
        return Err(ServiceError::BadRequest(format!(
            "the {kind} URL '{url}' must start with http:// or https://"
        )));
    }
    match secret {
        Some(secret) => secret.read().map(drop).map_err(ServiceError::BadRequest),
        None => Ok(()),
    }
}

/// What a copy tells the store it reads from.
pub struct Reading<'a> {
    /// Bytes the destination holds already (a whole number of the manifest's chunks).
    pub offset: u64,
    /// The source's manifest, where it has one.
    pub manifest: Option<&'a Manifest>,
    /// Chunks the receiving appliance holds already, which need not be fetched.
    pub local: Option<Arc<dyn LocalChunks>>,
    /// Where the destination takes the local chunks it can share the blocks of.
    pub reflinks: Option<Arc<Reflinks>>,
    /// Where a store that fetches chunks counts what it moved.
    pub delta: Arc<Delta>,
    /// Whether the copy must stop now (a source waiting on the network gives up at once).
    pub stopping: &'a (dyn Fn() -> bool + Sync),
}

/// Image records kept by the store itself.
pub trait ImageRecords {
    fn image(&self, id: Uuid) -> Result<Option<Image>, StoreError>;
    /// Every image, or those of one owner (a tenant id as stored).
    fn images(&self, owner: Option<&str>) -> Result<Vec<Image>, StoreError>;
}

/// Where a copy's bytes go, chunk by chunk, in order ([`Output`]).
pub trait Sink: Output {
    /// The hashes a stream must compute for [`Sink::finish`].
    fn hashes(&self) -> Hashes;
    /// A copy starts again: how many leading chunks of `reference` (the source's manifest, or
    /// the partial manifest the copy recorded) the sink holds already, checked now, and how
    /// many bytes it held; what follows them is discarded. `(0, 0)` where a partial image
    /// cannot be continued (Glance).
    fn resume(&mut self, _reference: &Manifest) -> Result<(usize, u64), StoreError> {
        Ok((0, 0))
    }
    /// The first `len` bytes the sink holds (to hash the part a resumed stream skips).
    fn prefix(&self, _len: u64) -> Option<Box<dyn Read>> {
        None
    }
    /// After the last chunk: makes the image durable and returns what the destination
    /// recorded, publishing it only if `verify` accepts that.
    fn finish(
        self: Box<Self>,
        streamed: &Digests,
        verify: &dyn Fn(&Recorded) -> Result<(), StoreError>,
    ) -> Result<Recorded, StoreError>;
    /// Where the sink counts what it sends to another appliance (a peer's).
    fn delta(&self) -> Option<Arc<Delta>> {
        None
    }
    /// Where a sink that can share blocks with a local file (a reflink) is told which chunks
    /// the copy took from local files, so it shares them instead of writing them again.
    fn reflinks(&self) -> Option<Arc<Reflinks>> {
        None
    }
    /// The copy reads a local file: a sink that writes past the page cache writes through it
    /// instead. Such a copy is bound by the disk, not the CPU, and the kernel's writeback
    /// moves more than direct writes do (BENCHMARKS.md, the P5 side by side).
    fn reads_a_local_file(&mut self) {}
    /// Leaves the image after a failure or a stop (what resumes keeps its partial file; the
    /// job's ending removes it); the destination's own failure, if it had one (it explains
    /// the stream's).
    fn abort(self: Box<Self>) -> Option<StoreError>;
}

/// How a transfer ended, when not with success.
#[derive(Debug)]
pub enum TransferError {
    Stopped(Stop),
    Failed(StoreError),
}

/// Copies `source` into `sink` as `plan` says under `ctl`, then finishes the sink with
/// `verify`; what the destination recorded, and what the copy did.
pub fn transfer(
    source: &mut dyn Source,
    mut sink: Box<dyn Sink + '_>,
    plan: Plan,
    ctl: &mut Control,
    verify: &dyn Fn(&Recorded) -> Result<(), StoreError>,
) -> Result<(Recorded, Copied), TransferError> {
    if source.as_file().is_some() {
        sink.reads_a_local_file();
    }
    match copy(source, &mut *sink, plan, ctl) {
        Ok(copied) => sink
            .finish(&copied.digests, verify)
            .map(|recorded| (recorded, copied))
            .map_err(TransferError::Failed),
        Err(e) => {
            let own = sink.abort();
            if let Some(stop) = (ctl.stop)() {
                return Err(TransferError::Stopped(stop));
            }
            Err(match (e, own) {
                (CopyError::Stopped(stop), _) => TransferError::Stopped(stop),
                (CopyError::Changed(why), _) => TransferError::Failed(StoreError::Fatal(format!(
                    "the source image changed since it was recorded: {why}"
                ))),
                (_, Some(own)) => TransferError::Failed(own),
                (CopyError::Io(e), None) => TransferError::Failed(StoreError::io("copy failed", e)),
            })
        }
    }
}

/// Makes the manifest of `image` from its bytes (`source`, from its start), for an image that
/// predates manifests: its SHA-512 must match the record, as a copy without a manifest would
/// check it.
pub fn make_manifest(
    source: &mut dyn Source,
    image: &Image,
    stop: &dyn Fn() -> Option<Stop>,
) -> Result<Manifest, TransferError> {
    let mut control = Control {
        stop,
        progress: &mut |_| {},
        checkpoint: None,
        limiter: None,
    };
    let hashes = Hashes {
        sha512: true,
        md5: false,
    };
    let made = crate::copy::copy(source, &mut Discard, Plan::whole(hashes), &mut control).map_err(
        |e| match e {
            CopyError::Stopped(stop) => TransferError::Stopped(stop),
            CopyError::Io(e) => TransferError::Failed(StoreError::io("cannot read the image", e)),
            CopyError::Changed(why) => TransferError::Failed(StoreError::Fatal(why)),
        },
    )?;
    let read = Recorded {
        size: made.digests.size,
        checksum: None,
        os_hash_algo: Some("sha512".into()),
        os_hash_value: made.digests.sha512.clone(),
    };
    verify(image, &read).map_err(TransferError::Failed)?;
    Ok(crate::manifest::complete(
        image.size,
        made.digests.sha512,
        made.chunks,
    ))
}

/// The one verification rule: the destination holds as many bytes as the source record says,
/// and every hash both records have agrees (at least one is compared where the source has any).
pub fn verify(source: &Image, got: &Recorded) -> Result<(), StoreError> {
    let md5 = (source.checksum.is_some() && got.checksum.is_some())
        .then(|| source.checksum == got.checksum);
    let os_hash = (source.os_hash_value.is_some()
        && got.os_hash_value.is_some()
        && source.os_hash_algo == got.os_hash_algo)
        .then(|| source.os_hash_value == got.os_hash_value);
    let source_has_hash = source.checksum.is_some() || source.os_hash_value.is_some();
    let compared = md5.is_some() || os_hash.is_some();
    let agree = md5.unwrap_or(true) && os_hash.unwrap_or(true) && (compared || !source_has_hash);
    if got.size == source.size && agree {
        return Ok(());
    }
    // Hashes and algorithm names may come from a remote service: escaped for logs.
    let none = |v: &Option<String>| match v {
        Some(v) => excerpt(v, 200),
        None => "(none)".into(),
    };
    let algo = |v: &Option<String>| match v {
        Some(v) => excerpt(v, 40),
        None => "hash".into(),
    };
    Err(StoreError::Fatal(format!(
        "source image {} changed since it was recorded, or its copy differs: the source has {} bytes with MD5 {} and {} {}; the destination recorded {} bytes with MD5 {} and {} {}",
        source.id,
        source.size,
        none(&source.checksum),
        algo(&source.os_hash_algo),
        none(&source.os_hash_value),
        got.size,
        none(&got.checksum),
        algo(&got.os_hash_algo),
        none(&got.os_hash_value),
    )))
}

/// The image stores of the regions, built on first use and kept while a region's settings
/// stay the same (a Glance store keeps its client and token).
#[derive(Default)]
pub struct Stores {
    by_region: Mutex<HashMap<String, Built>>,
}

/// A store and the settings it was built from.
type Built = (RegionKind, Arc<dyn ImageStore>);

impl Stores {
    pub fn get(&self, region: &Region) -> Result<Arc<dyn ImageStore>, StoreError> {
        let mut map = self
            .by_region
            .lock()
            .map_err(|_| StoreError::Fatal("the image store table is poisoned".into()))?;
        if let Some((kind, store)) = map.get(&region.id) {
            if *kind == region.kind {
                return Ok(Arc::clone(store));
            }
        }
        let store: Arc<dyn ImageStore> = match &region.kind {
            RegionKind::Directory { dir } => Arc::new(directory::Directory::new(dir)),
            RegionKind::Glance { glance } => {
                Arc::new(glance::GlanceStore::new(&region.id, glance)?)
            }
            RegionKind::Peer { peer } => Arc::new(peer::PeerStore::new(&region.id, peer)?),
        };
        map.insert(region.id.clone(), (region.kind.clone(), Arc::clone(&store)));
        Ok(store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ImageStatus;

    fn source(checksum: Option<&str>, sha512: Option<&str>) -> Image {
        Image {
            id: Uuid::nil(),
            name: "s".into(),
            owner: "o".into(),
            region: "r".into(),
            status: ImageStatus::Active,
            disk_format: "raw".into(),
            container_format: "bare".into(),
            size: 10,
            checksum: checksum.map(String::from),
            os_hash_algo: sha512.map(|_| "sha512".into()),
            os_hash_value: sha512.map(String::from),
            created_at: 0,
            updated_at: 0,
            meta: Default::default(),
        }
    }

    fn recorded(size: u64, checksum: Option<&str>, sha512: Option<&str>) -> Recorded {
        Recorded {
            size,
            checksum: checksum.map(String::from),
            os_hash_algo: sha512.map(|_| "sha512".into()),
            os_hash_value: sha512.map(String::from),
        }
    }

    #[test]
    fn verify_compares_size_and_every_shared_hash() {
        let src = source(Some("m"), Some("s"));
        assert!(verify(&src, &recorded(10, Some("m"), Some("s"))).is_ok());
        assert!(verify(&src, &recorded(10, None, Some("s"))).is_ok());
        assert!(verify(&src, &recorded(10, Some("m"), None)).is_ok());
        assert!(verify(&src, &recorded(9, Some("m"), Some("s"))).is_err());
        assert!(verify(&src, &recorded(10, Some("x"), Some("s"))).is_err());
        assert!(verify(&src, &recorded(10, Some("m"), Some("x"))).is_err());
        // Nothing to compare although the source has hashes: not verified.
        assert!(verify(&src, &recorded(10, None, None)).is_err());
        // A source without hashes is compared by size alone.
        assert!(verify(&source(None, None), &recorded(10, None, None)).is_ok());
    }
}
