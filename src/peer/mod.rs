//! The peer protocol: how two appliances move an image's record, manifest and chunks (README,
//! "Peer protocol"). This module holds what both ends share: the version, the chunk ranges of a
//! request, the JSON bodies and the frames chunks travel in. The serving end is
//! `http::peer`; the client end is [`client`], used by the peer region kind.
//!
//! A frame is `index: u32 BE | encoding: u8 | length: u32 BE | payload`. Its chunk is the
//! payload (raw), the payload's zstd frame decompressed (never beyond the chunk's length), or
//! zeros (a hole, no payload). A sender compresses with zstd level 1 and sends a chunk raw when
//! that does not save at least a sixteenth of it.

pub mod client;

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::manifest::{Manifest, CHUNK_SIZE};

/// The protocol version this appliance speaks (and serves under `/peer/v1/`).
pub const VERSION: u32 = 1;
/// Where the protocol lives on an appliance.
pub const PREFIX: &str = "/peer";
/// The name in `GET /peer`'s answer.
pub const PROTOCOL: &str = "image-replicator-peer";
/// The media type of a body of frames.
pub const FRAMES: &str = "application/x-image-replicator-chunks";
/// Most chunks one request asks for or carries (64 MiB of data).
pub const MAX_CHUNKS: usize = 1024;
/// Bytes of a frame's header.
pub const FRAME_HEADER: usize = 9;
/// zstd level of chunks on the wire: level 1 keeps compression faster than most links.
const ZSTD_LEVEL: i32 = 1;

const RAW: u8 = 0;
const ZSTD: u8 = 1;
const HOLE: u8 = 2;

/// What a copy between appliances moved, counted as it goes (the job's `bytes_reused`,
/// `bytes_fetched` and `bytes_on_wire`).
#[derive(Debug, Default)]
pub struct Delta {
    /// Chunk bytes the receiving appliance took from its own images.
    pub reused: AtomicU64,
    /// Chunk bytes that crossed the link, as chunks.
    pub fetched: AtomicU64,
    /// Bytes those took on the wire: frames after compression, and the manifest.
    pub wire: AtomicU64,
}

/// A [`Delta`]'s figures at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeltaFigures {
    pub reused: u64,
    pub fetched: u64,
    pub wire: u64,
}

impl Delta {
    pub fn figures(&self) -> DeltaFigures {
        DeltaFigures {
            reused: self.reused.load(Ordering::Relaxed),
            fetched: self.fetched.load(Ordering::Relaxed),
            wire: self.wire.load(Ordering::Relaxed),
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// `GET /peer`'s answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Versions {
    pub protocol: String,
    pub versions: Vec<u32>,
}

impl Versions {
    pub fn ours() -> Versions {
        Versions {
            protocol: PROTOCOL.into(),
            versions: vec![VERSION],
        }
    }
}

/// Chunk indexes as runs `[first, count]`, the form requests and answers list chunks in.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranges {
    pub ranges: Vec<(u32, u32)>,
}

impl Ranges {
    /// The runs of consecutive indexes in `indexes` (ascending).
    pub fn of(indexes: impl IntoIterator<Item = usize>) -> Ranges {
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        for i in indexes {
            let i = i as u32;
            match ranges.last_mut() {
                Some((first, count)) if *first + *count == i => *count += 1,
                _ => ranges.push((i, 1)),
            }
        }
        Ranges { ranges }
    }

    /// Every index, in order.
    pub fn indexes(&self) -> impl Iterator<Item = usize> + '_ {
        self.ranges
            .iter()
            .flat_map(|&(first, count)| (first as usize)..(first as usize + count as usize))
    }

    pub fn count(&self) -> usize {
        self.ranges.iter().map(|&(_, c)| c as usize).sum()
    }

    /// Checks the ranges against a manifest of `chunks` chunks and [`MAX_CHUNKS`]; why not.
    pub fn check(&self, chunks: usize) -> Result<(), String> {
        let mut total = 0usize;
        for &(first, count) in &self.ranges {
            let end = first as usize + count as usize;
            if count == 0 || end > chunks {
                return Err(format!(
                    "the range [{first}, {count}] is not inside the image's {chunks} chunks"
                ));
            }
            total += count as usize;
        }
        if total > MAX_CHUNKS {
            return Err(format!(
                "{total} chunks were asked for; at most {MAX_CHUNKS} per request"
            ));
        }
        Ok(())
    }
}

/// `POST /peer/v1/images/{id}/chunks`'s body: the chunks, and whether the receiver can use
/// compressed ones (`false` while its own work, not the link, holds the copy back).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ChunkRequest {
    #[serde(flatten)]
    pub ranges: Ranges,
    #[serde(default = "yes")]
    pub compress: bool,
}

fn yes() -> bool {
    true
}

/// The record an upload creates (`PUT /peer/v1/uploads/{id}`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct UploadImage {
    pub name: String,
    pub owner: String,
    pub disk_format: String,
    pub container_format: String,
    pub size: u64,
    pub checksum: Option<String>,
    pub os_hash_algo: Option<String>,
    pub os_hash_value: Option<String>,
}

/// `PUT /peer/v1/uploads/{id}`'s body.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Upload {
    pub region: String,
    pub image: UploadImage,
    /// The manifest's encoding, standard base64.
    pub manifest: String,
}

/// What an upload still needs from its sender: `{"missing":[[first,count],...]}`.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Missing {
    #[serde(with = "runs")]
    pub missing: Ranges,
}

/// [`Ranges`] as their bare list of runs.
mod runs {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Ranges;

    pub fn serialize<S: Serializer>(ranges: &Ranges, s: S) -> Result<S::Ok, S::Error> {
        ranges.ranges.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Ranges, D::Error> {
        Vec::deserialize(d).map(|ranges| Ranges { ranges })
    }
}

/// `POST /peer/v1/uploads/{id}/chunks`'s answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub received: usize,
}

/// Appends chunk `index`'s frame to `out`: compressed where that saves a sixteenth, a hole
/// for zeros; the bytes the frame takes.
pub fn encode_frame(out: &mut Vec<u8>, index: usize, chunk: &[u8]) -> usize {
    encode_frame_as(out, index, chunk, true)
}

/// [`encode_frame`], compressing only if `compress` (see [`Compression`]).
pub fn encode_frame_as(out: &mut Vec<u8>, index: usize, chunk: &[u8], compress: bool) -> usize {
    let start = out.len();
    out.extend_from_slice(&(index as u32).to_be_bytes());
    if crate::manifest::is_zero(chunk) {
        out.push(HOLE);
        out.extend_from_slice(&0u32.to_be_bytes());
        return out.len() - start;
    }
    let worth = chunk.len() - chunk.len() / 16;
    let packed = compress.then(|| zstd_compress(chunk)).flatten();
    match packed {
        Some(packed) if packed.len() < worth => {
            out.push(ZSTD);
            out.extend_from_slice(&(packed.len() as u32).to_be_bytes());
            out.extend_from_slice(&packed);
        }
        _ => {
            out.push(RAW);
            out.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
            out.extend_from_slice(chunk);
        }
    }
    out.len() - start
}

thread_local! {
    /// One compression context per thread: making one per chunk was 4 % of a serving
    /// appliance's CPU.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// `chunk` compressed with zstd at [`ZSTD_LEVEL`]; `None` if zstd fails.
fn zstd_compress(chunk: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut kept = cell.try_borrow_mut().ok()?;
        if kept.is_none() {
            *kept = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        kept.as_mut()?.compress(chunk).ok()
    })
}

/// Whether a transfer's chunks travel compressed, chosen by measuring. zstd level 1 makes a
/// few hundred MB/s per core: over a link slower than that it shrinks the transfer, over a
/// faster one (a LAN, loopback) it is what holds the copy back, on either end. Which end or
/// the link limits a copy cannot be told from one side, and changes as it runs, so each batch
/// of chunks is timed: the copy keeps to whichever way moved more of the image per second,
/// and tries the other again every [`PROBE_EVERY`] batches. It starts compressed.
#[derive(Debug, Default)]
pub struct Compression {
    /// Image bytes per second moved raw and compressed, smoothed; `None` until tried.
    rate: [Option<f64>; 2],
    batches: u32,
}

/// Batches between two tries of the way not taken.
pub const PROBE_EVERY: u32 = 16;

impl Compression {
    /// Whether the next batch goes compressed.
    pub fn choose(&mut self) -> bool {
        self.batches += 1;
        match self.rate {
            [_, None] => true,
            [None, _] => false,
            [Some(raw), Some(packed)] => {
                (packed >= raw) != self.batches.is_multiple_of(PROBE_EVERY)
            }
        }
    }

    /// A batch moved `bytes` of the image in `took`, compressed or not.
    pub fn moved(&mut self, compressed: bool, bytes: u64, took: std::time::Duration) {
        let now = bytes as f64 / took.as_secs_f64().max(1e-6);
        let slot = &mut self.rate[usize::from(compressed)];
        *slot = Some(slot.map_or(now, |was| (was + now) / 2.0));
    }
}

/// A decoded frame.
#[derive(Debug)]
pub struct Frame {
    pub index: usize,
    /// The chunk's bytes (zeros for a hole).
    pub bytes: Vec<u8>,
    /// Bytes the frame took on the wire, header included.
    pub wire: usize,
}

/// Reads frames of chunks of `manifest` from a stream.
pub struct FrameReader<R> {
    input: R,
    chunks: usize,
    size: u64,
    decompressor: zstd::bulk::Decompressor<'static>,
}

fn bad(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

impl<R: Read> FrameReader<R> {
    pub fn new(input: R, manifest: &Manifest) -> io::Result<FrameReader<R>> {
        FrameReader::for_size(input, manifest.size)
    }

    /// Frames of chunks of an image of `size` bytes.
    pub fn for_size(input: R, size: u64) -> io::Result<FrameReader<R>> {
        Ok(FrameReader {
            input,
            chunks: size.div_ceil(CHUNK_SIZE as u64) as usize,
            size,
            decompressor: zstd::bulk::Decompressor::new()?,
        })
    }

    fn chunk_len(&self, index: usize) -> usize {
        let start = index as u64 * CHUNK_SIZE as u64;
        (self.size - start).min(CHUNK_SIZE as u64) as usize
    }

    /// The next frame; `None` at the end of the stream (only between frames).
    pub fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        let mut header = [0u8; FRAME_HEADER];
        let mut got = 0;
        while got < FRAME_HEADER {
            match self.input.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let index = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let encoding = header[4];
        let length = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) as usize;
        if index >= self.chunks {
            return Err(bad(format!(
                "a frame names chunk {index}, beyond the image's {} chunks",
                self.chunks
            )));
        }
        let want = self.chunk_len(index);
        let wire = FRAME_HEADER + length;
        let bytes = match encoding {
            HOLE if length == 0 => vec![0; want],
            RAW if length == want => {
                let mut bytes = vec![0; want];
                self.input.read_exact(&mut bytes)?;
                bytes
            }
            ZSTD if length <= want + CHUNK_SIZE => {
                let mut packed = vec![0; length];
                self.input.read_exact(&mut packed)?;
                let bytes = self
                    .decompressor
                    .decompress(&packed, want)
                    .map_err(|e| bad(format!("chunk {index} does not decompress: {e}")))?;
                if bytes.len() != want {
                    return Err(bad(format!(
                        "chunk {index} decompresses to {} bytes, not {want}",
                        bytes.len()
                    )));
                }
                bytes
            }
            _ => {
                return Err(bad(format!(
                    "the frame of chunk {index} has encoding {encoding} and length {length}, which do not fit a chunk of {want} bytes"
                )))
            }
        };
        Ok(Some(Frame { index, bytes, wire }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Entry;

    fn manifest_of(data: &[u8]) -> Manifest {
        let mut m = Manifest::new(data.len() as u64);
        m.chunks = data.chunks(CHUNK_SIZE).map(Entry::of).collect();
        m
    }

    #[test]
    fn frames_carry_raw_compressed_and_hole_chunks_back_to_their_bytes() {
        let mut data = vec![0u8; CHUNK_SIZE * 3 + 100];
        // Chunk 0: incompressible; chunk 1: compressible; chunk 2: zeros; chunk 3: a short tail.
        let mut x = 1u64;
        for b in &mut data[..CHUNK_SIZE] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        for (i, b) in data[CHUNK_SIZE..2 * CHUNK_SIZE].iter_mut().enumerate() {
            *b = (i % 7) as u8;
        }
        data[3 * CHUNK_SIZE..].fill(9);
        let m = manifest_of(&data);
        let mut wire = Vec::new();
        let mut sizes = Vec::new();
        for i in [3, 0, 1, 2] {
            sizes.push(encode_frame(
                &mut wire,
                i,
                &data[i * CHUNK_SIZE..(data.len()).min((i + 1) * CHUNK_SIZE)],
            ));
        }
        assert!(
            sizes[1] == FRAME_HEADER + CHUNK_SIZE,
            "random data goes raw"
        );
        assert!(sizes[2] < CHUNK_SIZE / 4, "repetitive data is compressed");
        assert_eq!(sizes[3], FRAME_HEADER, "zeros are a hole");
        let mut reader = FrameReader::new(&wire[..], &m).unwrap();
        for (i, size) in [3, 0, 1, 2].into_iter().zip(sizes) {
            let frame = reader.next_frame().unwrap().unwrap();
            assert_eq!(frame.index, i);
            assert_eq!(frame.wire, size);
            let end = data.len().min((i + 1) * CHUNK_SIZE);
            assert_eq!(frame.bytes, &data[i * CHUNK_SIZE..end]);
        }
        assert!(reader.next_frame().unwrap().is_none());
    }

    #[test]
    fn frames_that_do_not_fit_their_chunk_are_refused() {
        let data = vec![5u8; CHUNK_SIZE + 10];
        let m = manifest_of(&data);
        let frame = |index: u32, encoding: u8, payload: &[u8]| {
            let mut f = index.to_be_bytes().to_vec();
            f.push(encoding);
            f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            f.extend_from_slice(payload);
            f
        };
        let cases = [
            frame(2, RAW, &[0; 10]),
            frame(1, RAW, &[0; 11]),
            frame(0, 7, &[]),
            frame(1, ZSTD, b"not zstd"),
            frame(1, ZSTD, &zstd::bulk::compress(&[1u8; 20], 1).unwrap()),
        ];
        for case in cases {
            let mut reader = FrameReader::new(&case[..], &m).unwrap();
            let e = reader.next_frame().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        }
        // A frame cut short is an early end, not a bad frame.
        let cut = &frame(1, RAW, &[0; 10])[..12];
        let e = FrameReader::new(cut, &m).unwrap().next_frame().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn missing_chunks_travel_as_a_bare_list_of_runs() {
        let missing = Missing {
            missing: Ranges::of([2, 5, 6]),
        };
        let text = serde_json::to_string(&missing).unwrap();
        assert_eq!(text, r#"{"missing":[[2,1],[5,2]]}"#);
        assert_eq!(serde_json::from_str::<Missing>(&text).unwrap(), missing);
    }

    #[test]
    fn compression_is_tried_both_ways_then_kept_to_the_faster_with_a_retry_now_and_then() {
        use std::time::Duration;
        let second = Duration::from_secs(1);
        let mut c = Compression::default();
        assert!(c.choose(), "a transfer starts compressed");
        c.moved(true, 100, second);
        assert!(!c.choose(), "then tries raw");
        c.moved(false, 300, second);
        // Raw moved more per second: raw it stays, but for one try of zstd per 16 batches.
        let ways: Vec<bool> = (0..2 * PROBE_EVERY).map(|_| c.choose()).collect();
        assert_eq!(ways.iter().filter(|&&w| w).count(), 2, "{ways:?}");
        // zstd turns out faster now (a thin link): it is kept.
        c.moved(true, 1000, second);
        c.moved(true, 1000, second);
        let ways: Vec<bool> = (0..PROBE_EVERY).map(|_| c.choose()).collect();
        assert_eq!(ways.iter().filter(|&&w| !w).count(), 1, "{ways:?}");
    }

    #[test]
    fn ranges_are_runs_of_indexes_and_are_checked_against_the_image() {
        let r = Ranges::of([0, 1, 2, 5, 7, 8]);
        assert_eq!(r.ranges, vec![(0, 3), (5, 1), (7, 2)]);
        assert_eq!(r.indexes().collect::<Vec<_>>(), vec![0, 1, 2, 5, 7, 8]);
        assert_eq!(r.count(), 6);
        assert!(r.check(9).is_ok());
        assert!(r.check(8).is_err());
        assert!(Ranges {
            ranges: vec![(0, 0)]
        }
        .check(9)
        .is_err());
        let big = Ranges::of(0..MAX_CHUNKS + 1);
        assert!(big.check(MAX_CHUNKS + 1).is_err());
    }
}
