//! Chunk manifests: an image's content as fixed-size chunks, each with its BLAKE3 hash, and
//! the chunks that hold only zeros recorded as holes (no hash, nothing to read or write).
//!
//! Chunk `i` covers bytes `i × chunk_size ..` up to the next chunk or the image's end, so a
//! manifest is its chunk size, the image's size and one entry per chunk. A complete manifest
//! names the SHA-512 of the image it describes: it is used for an image only while the
//! image's record has that hash and size. A copy that is still running keeps a partial one
//! (fewer entries, no SHA-512) of what it has verified so far, to resume from.
//!
//! Stored encoded ([`Manifest::encode`]): a magic and version, the fields, the entries (a tag
//! byte, then 32 bytes of hash for data), and a BLAKE3 of all of it, so that a damaged record
//! is detected ([`Manifest::decode`]) and never trusted.

use uuid::Uuid;

use crate::error::Result;
use crate::model::Image;
use crate::store::Registry;
use crate::text::escape;

/// The chunk size of manifests: see BENCHMARKS.md, "Chunk size of manifests" (64 KiB sends
/// a quarter of what 1 MiB does between successive builds of an image, for a manifest of
/// 0.05 % of the image).
pub const CHUNK_SIZE: usize = 64 << 10;

/// A BLAKE3-256 hash.
pub type Hash = [u8; 32];

/// One chunk of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Only zeros: kept as a hole, never read from a hole in the source's file.
    Hole,
    Data(Hash),
}

impl Entry {
    /// The entry of a chunk's bytes.
    pub fn of(bytes: &[u8]) -> Entry {
        if is_zero(bytes) {
            Entry::Hole
        } else {
            Entry::Data(*blake3::hash(bytes).as_bytes())
        }
    }
}

/// Whether `bytes` are all zero.
pub fn is_zero(bytes: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets the aligned middle.
    let (head, body, tail) = unsafe { bytes.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub chunk_size: u32,
    /// The image's size in bytes.
    pub size: u64,
    /// The SHA-512 (hex) of the image a complete manifest describes; `None` while partial.
    pub sha512: Option<String>,
    /// Entries of the chunks from the first on: all of them once complete.
    pub chunks: Vec<Entry>,
}

const MAGIC: &[u8; 4] = b"IRMF";
const VERSION: u8 = 1;
const HOLE: u8 = 0;
const DATA: u8 = 1;

impl Manifest {
    /// An empty (partial) manifest of an image of `size` bytes.
    pub fn new(size: u64) -> Manifest {
        Manifest {
            chunk_size: CHUNK_SIZE as u32,
            size,
            sha512: None,
            chunks: Vec::new(),
        }
    }

    /// How many chunks the whole image has.
    pub fn chunk_count(&self) -> usize {
        self.size.div_ceil(u64::from(self.chunk_size.max(1))) as usize
    }

    /// Where chunk `i` starts.
    pub fn offset(&self, i: usize) -> u64 {
        i as u64 * u64::from(self.chunk_size)
    }

    /// The length of chunk `i` (the last one may be short).
    pub fn chunk_len(&self, i: usize) -> usize {
        let start = self.offset(i);
        (self.size.saturating_sub(start)).min(u64::from(self.chunk_size)) as usize
    }

    /// The run of chunks from `index` on that are all holes or all data (at most `max_data`
    /// of those): where it ends, and whether it is holes.
    pub fn run_from(&self, index: usize, max_data: usize) -> (usize, bool) {
        let hole = |i: usize| self.chunks.get(i).map(|e| *e == Entry::Hole);
        let kind = hole(index);
        let mut end = index + 1;
        while hole(end).is_some() && hole(end) == kind {
            if kind == Some(false) && end - index >= max_data {
                break;
            }
            end += 1;
        }
        (end, kind == Some(true))
    }

    /// Bytes the entries cover, from the image's start.
    pub fn covered(&self) -> u64 {
        self.offset(self.chunks.len()).min(self.size)
    }

    /// Bytes in data chunks (not holes).
    pub fn data_bytes(&self) -> u64 {
        (0..self.chunks.len())
            .filter(|&i| self.chunks[i] != Entry::Hole)
            .map(|i| self.chunk_len(i) as u64)
            .sum()
    }

    /// Whether this is the complete manifest of `image` as its record stands: same size, same
    /// SHA-512, every chunk present.
    pub fn describes(&self, image: &Image) -> bool {
        self.chunk_size as usize == CHUNK_SIZE
            && self.chunks.len() == self.chunk_count()
            && self.size == image.size
            && self.sha512.is_some()
            && image.os_hash_algo.as_deref() == Some("sha512")
            && self.sha512 == image.os_hash_value
    }

    /// Whether this manifest is whole in this binary's chunk size (every chunk listed, the
    /// SHA-512 named), whatever its image's record says now: what the chunk index takes.
    pub fn is_complete(&self) -> bool {
        self.chunk_size as usize == CHUNK_SIZE
            && self.sha512.is_some()
            && self.chunks.len() == self.chunk_count()
    }

    /// Each data chunk's hash once, with the first chunk index that has it (holes left out):
    /// the image's entries in the chunk index.
    pub fn first_indexes(&self) -> Vec<(Hash, u32)> {
        let mut seen = std::collections::HashSet::with_capacity(self.chunks.len());
        let mut out = Vec::with_capacity(self.chunks.len());
        for (i, entry) in self.chunks.iter().enumerate() {
            let (Entry::Data(hash), Ok(i)) = (entry, u32::try_from(i)) else {
                continue;
            };
            if seen.insert(*hash) {
                out.push((*hash, i));
            }
        }
        out
    }

    pub fn encode(&self) -> Vec<u8> {
        let sha = self.sha512.as_deref().unwrap_or_default().as_bytes();
        let mut out = Vec::with_capacity(64 + sha.len() + self.chunks.len() * 33);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        // A SHA-512 in hex is 128 bytes: it fits the length byte.
        out.push(sha.len().min(255) as u8);
        out.extend_from_slice(&sha[..sha.len().min(255)]);
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for entry in &self.chunks {
            match entry {
                Entry::Hole => out.push(HOLE),
                Entry::Data(hash) => {
                    out.push(DATA);
                    out.extend_from_slice(hash);
                }
            }
        }
        let check = *blake3::hash(&out).as_bytes();
        out.extend_from_slice(&check);
        out
    }

    /// Reads an encoded manifest; why it cannot be trusted if it is damaged or inconsistent.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, String> {
        let body_len = bytes
            .len()
            .checked_sub(32)
            .ok_or("the manifest record is too short")?;
        let (body, check) = bytes.split_at(body_len);
        if blake3::hash(body).as_bytes() != check {
            return Err("the manifest record is damaged (its check does not match)".into());
        }
        let mut r = Reader(body);
        if r.take(4)? != MAGIC {
            return Err("the record is not a manifest".into());
        }
        let version = r.take(1)?[0];
        if version != VERSION {
            return Err(format!(
                "the manifest has format version {version}, this binary reads {VERSION}"
            ));
        }
        let chunk_size = u32::from_le_bytes(r.array()?);
        let size = u64::from_le_bytes(r.array()?);
        let sha_len = r.take(1)?[0] as usize;
        let sha = std::str::from_utf8(r.take(sha_len)?)
            .map_err(|_| "the manifest's SHA-512 is not text")?
            .to_string();
        let count = u64::from_le_bytes(r.array()?);
        if chunk_size == 0 {
            return Err("the manifest's chunk size is 0".into());
        }
        let mut manifest = Manifest {
            chunk_size,
            size,
            sha512: (!sha.is_empty()).then_some(sha),
            chunks: Vec::new(),
        };
        if count > manifest.chunk_count() as u64 {
            return Err(format!(
                "the manifest lists {count} chunks, more than {} bytes hold",
                size
            ));
        }
        for _ in 0..count {
            manifest.chunks.push(match r.take(1)?[0] {
                HOLE => Entry::Hole,
                DATA => Entry::Data(r.array()?),
                tag => return Err(format!("the manifest has an unknown entry tag {tag}")),
            });
        }
        if !r.0.is_empty() {
            return Err("the manifest record has bytes after its last entry".into());
        }
        Ok(manifest)
    }
}

/// The manifest the store keeps for `image` if it is the complete one of the image as its
/// record stands; a damaged or stale one is reported in the log and not used.
pub fn load(store: &dyn Registry, image: &Image) -> Result<Option<Manifest>> {
    load_as(store, image.id, |m| m.describes(image))
}

/// The manifest the store keeps under `id` if it passes `fits`.
pub fn load_as(
    store: &dyn Registry,
    id: Uuid,
    fits: impl Fn(&Manifest) -> bool,
) -> Result<Option<Manifest>> {
    let Some(bytes) = store.manifest(id)? else {
        return Ok(None);
    };
    match Manifest::decode(&bytes) {
        Ok(m) if fits(&m) => Ok(Some(m)),
        Ok(_) => {
            tracing::info!(image = %id, "the stored manifest does not describe the image as recorded now; not used");
            Ok(None)
        }
        Err(why) => {
            tracing::warn!(image = %id, "not using the stored manifest: {}", escape(&why));
            Ok(None)
        }
    }
}

/// The complete manifest of an image of `size` bytes with SHA-512 `sha512` and these chunks.
pub fn complete(size: u64, sha512: Option<String>, chunks: Vec<Entry>) -> Manifest {
    Manifest {
        chunk_size: CHUNK_SIZE as u32,
        size,
        sha512,
        chunks,
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("the manifest record ends early".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut m = Manifest::new(3 * CHUNK_SIZE as u64 + 5);
        m.sha512 = Some("ab".repeat(64));
        m.chunks = vec![
            Entry::of(&[1u8; 10]),
            Entry::Hole,
            Entry::of(&[2u8; 10]),
            Entry::of(&[3u8; 5]),
        ];
        m
    }

    #[test]
    fn a_manifest_round_trips_and_knows_its_chunks() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode()), Ok(m.clone()));
        assert_eq!(m.chunk_count(), 4);
        assert_eq!(m.chunk_len(3), 5);
        assert_eq!(m.covered(), m.size);
        assert_eq!(m.data_bytes(), 2 * CHUNK_SIZE as u64 + 5);
        assert_eq!(m.run_from(0, 16), (1, false));
        assert_eq!(m.run_from(1, 16), (2, true));
        assert_eq!(m.run_from(2, 16), (4, false));
        assert_eq!(m.run_from(2, 1), (3, false));
        let partial = Manifest::new(10);
        assert_eq!(Manifest::decode(&partial.encode()), Ok(partial));
    }

    #[test]
    fn a_damaged_manifest_is_refused() {
        let bytes = sample().encode();
        for at in [0, 5, 20, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            assert!(Manifest::decode(&bad).is_err(), "flipped byte {at}");
        }
        assert!(Manifest::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(Manifest::decode(&[]).is_err());
    }

    #[test]
    fn zero_chunks_are_holes() {
        assert_eq!(Entry::of(&[0u8; 4097]), Entry::Hole);
        let mut one = vec![0u8; 4097];
        one[4096] = 1;
        assert_ne!(Entry::of(&one), Entry::Hole);
    }
}
