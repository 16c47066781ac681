//! What the chunk index costs `put_manifest` and the disk (RELIABILITY.md, "A sled transaction
//! holds up the whole store"): stores complete manifests of 1 GiB and 10 GiB all-data images
//! into a fresh sled store with and without their records (without one a manifest is stored and
//! not indexed: the baseline), then times a put, a lookup, a replace and a removal while another
//! thread reads the store, and prints what each took and the longest that read waited.
//!
//!   cargo run --release --example chunk_index_cost

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use image_replicator::manifest::{self, Entry, Manifest, CHUNK_SIZE};
use image_replicator::model::{Image, ImageStatus, TenantKey};
use image_replicator::store::Repo;
use uuid::Uuid;

const OWNER: &str = "236ae314ef6944f4ab98fa7519e54325";

fn image() -> Image {
    Image {
        id: Uuid::new_v4(),
        name: "big".into(),
        owner: OWNER.into(),
        region: "r".into(),
        status: ImageStatus::Active,
        disk_format: "raw".into(),
        container_format: "bare".into(),
        size: 0,
        checksum: None,
        os_hash_algo: None,
        os_hash_value: None,
        created_at: 1,
        updated_at: 1,
        meta: Default::default(),
    }
}

/// The complete manifest of an image of `chunks` data chunks, all different.
fn all_data(chunks: usize, seed: u64) -> Vec<u8> {
    let entries = (0..chunks as u64)
        .map(|i| {
            Entry::Data(*blake3::hash(&[seed.to_le_bytes(), i.to_le_bytes()].concat()).as_bytes())
        })
        .collect();
    let size = (chunks * CHUNK_SIZE) as u64;
    manifest::complete(size, Some("ab".repeat(64)), entries).encode()
}

fn bytes_on_disk(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match entry.metadata() {
            Ok(meta) if meta.is_dir() => total += bytes_on_disk(&entry.path()),
            Ok(meta) => total += meta.blocks() * 512,
            Err(_) => {}
        }
    }
    total
}

/// The longest a store read waits on another thread while `f` runs.
fn longest_wait_during(store: &dyn Repo, f: impl FnOnce()) -> Duration {
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let mut longest = Duration::ZERO;
            while !done.load(Ordering::SeqCst) {
                let t = Instant::now();
                let _ = store.region("none");
                longest = longest.max(t.elapsed());
                std::thread::sleep(Duration::from_micros(200));
            }
            longest
        });
        f();
        done.store(true, Ordering::SeqCst);
        reader.join().unwrap_or_default()
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let key = TenantKey::parse(OWNER).ok_or("bad owner")?;
    for (label, chunks) in [("1 GiB", 16_384), ("10 GiB", 163_840)] {
        let images = 10 * 16_384 / chunks;
        let mut on_disk = Vec::new();
        for indexed in [false, true] {
            let dir = tempfile::tempdir()?;
            let store = image_replicator::store::open(
                dir.path(),
                &image_replicator::store::StoreConfig::embedded(),
            )?;
            let mut put = Duration::ZERO;
            for n in 0..images {
                let image = image();
                if indexed {
                    store.insert_image(key, &image)?;
                }
                let first = all_data(chunks, 2 * n as u64);
                let t = Instant::now();
                store.put_manifest(image.id, &first)?;
                put += t.elapsed();
            }
            store.flush()?;
            let bytes = bytes_on_disk(dir.path());
            on_disk.push(bytes);
            println!(
                "{label}, {images} images, indexed {indexed}: put {:?} each, {:.1} MiB on disk",
                put / images as u32,
                bytes as f64 / f64::from(1 << 20)
            );
            if !indexed {
                continue;
            }
            let last = all_data(chunks, 999);
            let Some(Entry::Data(hash)) = Manifest::decode(&last)?.chunks.last().copied() else {
                return Err("the manifest has no data chunk".into());
            };
            let image = image();
            store.insert_image(key, &image)?;
            let t = Instant::now();
            let wait = longest_wait_during(&*store, || {
                let _ = store.put_manifest(image.id, &last);
            });
            println!(
                "{label}: put {:?}, a read on another thread waited up to {wait:?}",
                t.elapsed()
            );
            let t = Instant::now();
            let found = store.chunk_holders(key, &hash, 4)?;
            println!(
                "{label}: chunk_holders {:?} ({} holder)",
                t.elapsed(),
                found.len()
            );
            let second = all_data(chunks, 1000);
            let t = Instant::now();
            let wait = longest_wait_during(&*store, || {
                let _ = store.put_manifest(image.id, &second);
            });
            println!(
                "{label}: replace {:?}, a read waited up to {wait:?}",
                t.elapsed()
            );
            let t = Instant::now();
            let wait = longest_wait_during(&*store, || {
                let _ = store.remove_manifest(image.id);
            });
            println!(
                "{label}: remove {:?}, a read waited up to {wait:?}",
                t.elapsed()
            );
        }
        let entries = (images * chunks) as u64;
        println!(
            "{label}: the index costs {} bytes on disk per entry ({entries} entries)",
            on_disk[1].saturating_sub(on_disk[0]) / entries
        );
    }
    Ok(())
}
