//! Chunks the appliance already holds: what a copy into it need not fetch (README, "Peer
//! regions"). The chunk index of the store names, for an owner and a chunk hash, the complete
//! images of that owner that hold such a chunk; a chunk is read from the image's file and
//! checked against its hash before it is used. Reuse stays within one owner: across tenants it
//! would tell one tenant whether another holds some data.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::copy::Source;
use crate::manifest::{Hash, CHUNK_SIZE};
use crate::model::{ImageStatus, TenantKey};
use crate::regions::Stores;
use crate::store::Repo;

/// The chunks a copy may take from the appliance's own images instead of fetching them.
pub trait LocalChunks: Send + Sync {
    /// Whether the index names a local chunk with this hash (no read; the chunk may still
    /// turn out to be gone or different when read).
    fn has(&self, hash: &Hash) -> bool;
    /// Fills `buf` (the chunk's length) with a local chunk whose BLAKE3 is `hash`; `false` when
    /// none can be read or none matches.
    fn read(&self, hash: &Hash, buf: &mut [u8]) -> bool;
    /// [`LocalChunks::read`], and where the bytes are: the file and offset, where they were
    /// read from a file (a destination on the same file system can share their blocks).
    fn read_held(&self, hash: &Hash, buf: &mut [u8]) -> Option<Held> {
        self.read(hash, buf).then_some(Held {
            file: None,
            offset: 0,
        })
    }
}

/// Where a local chunk was read.
pub struct Held {
    pub file: Option<Arc<File>>,
    pub offset: u64,
}

/// Local chunks a copy took, by chunk index, for a destination that can share their blocks
/// with a reflink instead of writing them again (each is taken once, when it is written).
#[derive(Default)]
pub struct Reflinks {
    chunks: Mutex<HashMap<usize, (Arc<File>, u64)>>,
}

impl Reflinks {
    pub fn offer(&self, index: usize, file: Arc<File>, offset: u64) {
        if let Ok(mut chunks) = self.chunks.lock() {
            chunks.insert(index, (file, offset));
        }
    }

    pub fn take(&self, index: usize) -> Option<(Arc<File>, u64)> {
        self.chunks.lock().ok()?.remove(&index)
    }
}

/// How many holders of a chunk a read tries before it gives up.
const HOLDERS: usize = 4;
/// How many images' files a [`Reuse`] keeps open (the last read ones).
const KEPT_OPEN: usize = 4;

/// [`LocalChunks`] over the store's chunk index and the files of the owner's images in
/// directory regions. Only `active` images are read; every chunk is checked against its
/// BLAKE3 before it is used. The file of the image last read is kept open, so that reading
/// on where the last read stopped (a whole image, in order) costs a file read, not an open.
pub struct Reuse {
    store: Arc<dyn Repo>,
    stores: Arc<Stores>,
    owner: TenantKey,
    /// The sources last read, the most recent first, each at the offset it stands.
    open: Mutex<Vec<Opened>>,
    /// How many times a file was opened (tests, figures).
    opens: AtomicU64,
}

struct Opened {
    image: Uuid,
    at: u64,
    source: Box<dyn Source>,
    /// The file read, for reflinks, where the source is one.
    file: Option<Arc<File>>,
}

impl Reuse {
    /// Reuse of the chunks of `owner`'s images.
    pub fn new(store: Arc<dyn Repo>, stores: Arc<Stores>, owner: TenantKey) -> Reuse {
        Reuse {
            store,
            stores,
            owner,
            open: Mutex::new(Vec::new()),
            opens: AtomicU64::new(0),
        }
    }

    /// How many times an image's file was opened so far.
    pub fn opens(&self) -> u64 {
        self.opens.load(Ordering::Relaxed)
    }

    /// Reads chunk `index` of image `id` into `buf` if the image may be read and the chunk's
    /// BLAKE3 is `hash`.
    fn read_from(&self, id: Uuid, index: u32, hash: &Hash, buf: &mut [u8]) -> Option<Held> {
        let image = match self.store.image(id) {
            Ok(Some(image)) => image,
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(image = %id, "no chunk reuse from the image: {e}");
                return None;
            }
        };
        if image.status != ImageStatus::Active || TenantKey::parse(&image.owner) != Some(self.owner)
        {
            return None;
        }
        let offset = u64::from(index) * CHUNK_SIZE as u64;
        if offset.saturating_add(buf.len() as u64) > image.size {
            return None;
        }
        let region = match self.store.region(&image.region) {
            Ok(Some(region)) => region,
            _ => return None,
        };
        let images = match self.stores.get(&region) {
            Ok(images) if images.records().is_none() => images,
            _ => return None,
        };
        let mut opened = match self.take(id, offset) {
            Some(opened) => opened,
            None => match images.open(&image, offset) {
                Ok(source) => {
                    self.opens.fetch_add(1, Ordering::Relaxed);
                    let file = source.as_file().and_then(|f| f.try_clone().ok());
                    Opened {
                        image: id,
                        at: offset,
                        source,
                        file: file.map(Arc::new),
                    }
                }
                Err(e) => {
                    tracing::debug!(image = %id, "no chunk reuse from the image: {e}");
                    return None;
                }
            },
        };
        if let Err(e) = opened.source.read_exact(buf) {
            tracing::debug!(image = %id, chunk = index, "cannot read a chunk to reuse: {e}");
            return None;
        }
        opened.at = offset + buf.len() as u64;
        let file = opened.file.clone();
        self.keep(opened);
        if blake3::hash(buf).as_bytes() != hash {
            tracing::warn!(image = %id, chunk = index, "a local image's bytes differ from its manifest; the chunk is not reused");
            return None;
        }
        Some(Held { file, offset })
    }

    /// The kept source of image `id` if it can go on at `offset` (at or after where it stands).
    fn take(&self, id: Uuid, offset: u64) -> Option<Opened> {
        let mut open = self.open.lock().ok()?;
        let at = open.iter().position(|o| o.image == id)?;
        let mut opened = open.remove(at);
        drop(open);
        let stands = opened.at;
        if stands == offset || (stands < offset && opened.source.skip_to(offset).is_ok()) {
            Some(opened)
        } else {
            None
        }
    }

    fn keep(&self, opened: Opened) {
        if let Ok(mut open) = self.open.lock() {
            open.retain(|o| o.image != opened.image);
            open.insert(0, opened);
            open.truncate(KEPT_OPEN);
        }
    }
}

impl LocalChunks for Reuse {
    fn has(&self, hash: &Hash) -> bool {
        match self.store.chunk_holders(self.owner, hash, 1) {
            Ok(holders) => !holders.is_empty(),
            Err(e) => {
                tracing::debug!("the chunk index cannot be read: {e}");
                false
            }
        }
    }

    fn read(&self, hash: &Hash, buf: &mut [u8]) -> bool {
        self.read_held(hash, buf).is_some()
    }

    fn read_held(&self, hash: &Hash, buf: &mut [u8]) -> Option<Held> {
        let holders = match self.store.chunk_holders(self.owner, hash, HOLDERS) {
            Ok(holders) => holders,
            Err(e) => {
                tracing::debug!("the chunk index cannot be read: {e}");
                return None;
            }
        };
        holders
            .into_iter()
            .find_map(|(image, index)| self.read_from(image, index, hash, buf))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::path::PathBuf;

    use super::*;
    use crate::model::Image;
    use crate::service::{ImportRequest, Service};

    const A: &str = "236ae314ef6944f4ab98fa7519e54325";
    const B: &str = "91b5c7c09cbd45caa3c146fd67ae471e";
    /// Three whole chunks, a hole and a short last one.
    const SIZE: usize = 4 * CHUNK_SIZE + 1000;

    struct Lab {
        dir: tempfile::TempDir,
        svc: Service,
    }

    impl Lab {
        fn new() -> Lab {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = crate::store::open(
                &dir.path().join("data"),
                &crate::store::StoreConfig::embedded(),
            )
            .expect("store");
            let svc = Service::new(store, dir.path().join("data"));
            svc.region_add("r1", None, None, None).expect("region");
            svc.tenant_add(A, "r1", None).expect("tenant A");
            svc.tenant_add(B, "r1", None).expect("tenant B");
            Lab { dir, svc }
        }

        /// Imports `bytes` for tenant `owner`.
        fn import(&self, owner: &str, bytes: &[u8]) -> Image {
            let file = self.dir.path().join(format!("{}.raw", Uuid::new_v4()));
            std::fs::write(&file, bytes).expect("write");
            self.svc
                .image_import(&ImportRequest {
                    file,
                    tenant: owner.into(),
                    name: "cirros".into(),
                    disk_format: Some("raw".into()),
                    container_format: "bare".into(),
                    meta: Default::default(),
                    id: None,
                })
                .expect("import")
        }

        fn reuse(&self, owner: &str) -> Reuse {
            Reuse::new(
                Arc::clone(&self.svc.store),
                Arc::clone(&self.svc.stores),
                TenantKey::parse(owner).expect("key"),
            )
        }

        fn file(&self, image: &Image) -> PathBuf {
            self.dir
                .path()
                .join("data/regions/r1")
                .join(image.id.to_string())
        }
    }

    /// Distinct chunks (seeded by `seed`), chunk 3 zeros.
    fn content(seed: u8) -> Vec<u8> {
        let mut bytes: Vec<u8> = (0..SIZE)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
            .collect();
        bytes[3 * CHUNK_SIZE..4 * CHUNK_SIZE].fill(0);
        bytes
    }

    fn chunk(bytes: &[u8], i: usize) -> &[u8] {
        &bytes[i * CHUNK_SIZE..((i + 1) * CHUNK_SIZE).min(bytes.len())]
    }

    fn hash(bytes: &[u8]) -> Hash {
        *blake3::hash(bytes).as_bytes()
    }

    /// Reads the chunk whose bytes are `want` through `reuse`; whether it came back equal.
    fn reads(reuse: &Reuse, want: &[u8]) -> bool {
        let mut buf = vec![0u8; want.len()];
        reuse.read(&hash(want), &mut buf) && buf == want
    }

    #[test]
    fn an_owners_chunks_are_read_by_hash_in_one_open_per_image() {
        let lab = Lab::new();
        let bytes = content(1);
        lab.import(A, &bytes);
        let reuse = lab.reuse(A);
        for i in [0, 1, 2, 4] {
            assert!(reuse.has(&hash(chunk(&bytes, i))), "chunk {i}");
            assert!(reads(&reuse, chunk(&bytes, i)), "chunk {i}");
        }
        assert_eq!(reuse.opens(), 1, "read on where the last read stopped");
        // A hole is no chunk to reuse; neither is one nobody has.
        assert!(!reuse.has(&hash(chunk(&bytes, 3))));
        assert!(!reads(&reuse, &[7u8; CHUNK_SIZE]));
        // Reading back opens the file again.
        assert!(reads(&reuse, chunk(&bytes, 0)));
        assert_eq!(reuse.opens(), 2);
    }

    #[test]
    fn another_owners_chunks_are_neither_named_nor_read() {
        let lab = Lab::new();
        let bytes = content(2);
        lab.import(A, &bytes);
        let reuse = lab.reuse(B);
        assert!(!reuse.has(&hash(chunk(&bytes, 0))));
        assert!(!reads(&reuse, chunk(&bytes, 0)));
        assert_eq!(reuse.opens(), 0);
    }

    #[test]
    fn a_chunk_overwritten_in_the_file_is_not_reused_but_another_holders_is() {
        let lab = Lab::new();
        let bytes = content(3);
        // The index lists holders in the order they were indexed: the damaged one first.
        let image = lab.import(A, &bytes);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(lab.file(&image))
            .expect("open the image's file");
        file.write_all_at(&[0xee; 100], CHUNK_SIZE as u64 + 10)
            .expect("overwrite");
        let reuse = lab.reuse(A);
        assert!(
            reuse.has(&hash(chunk(&bytes, 1))),
            "the index still names it"
        );
        assert!(!reads(&reuse, chunk(&bytes, 1)), "a mismatch");
        assert!(reads(&reuse, chunk(&bytes, 2)), "the rest is fine");
        // A second image with the same chunks: the read goes on to it.
        lab.import(A, &bytes);
        assert!(reads(&reuse, chunk(&bytes, 1)));
    }

    #[test]
    fn a_deleted_or_unfinished_image_is_not_read() {
        let lab = Lab::new();
        let bytes = content(4);
        let image = lab.import(A, &bytes);
        let reuse = lab.reuse(A);
        assert!(reads(&reuse, chunk(&bytes, 0)));
        // A record that is not active (its manifest still there) is not read.
        let mut saving = image.clone();
        saving.status = ImageStatus::Saving;
        lab.svc.store.update_image(&saving).expect("update");
        assert!(reuse.has(&hash(chunk(&bytes, 1))));
        assert!(!reads(&reuse, chunk(&bytes, 1)));
        lab.svc.store.update_image(&image).expect("active again");
        assert!(reads(&reuse, chunk(&bytes, 1)));
        lab.svc.image_delete(&image.id.to_string()).expect("delete");
        assert!(!reuse.has(&hash(chunk(&bytes, 2))));
        assert!(!reads(&reuse, chunk(&bytes, 2)));
    }
}
