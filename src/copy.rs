//! The copy engine: moves an image chunk by chunk from a [`Source`] to an [`Output`].
//!
//! Every chunk gets its manifest [`Entry`] (BLAKE3, or a hole) on a hashing thread. A source
//! with a [`Manifest`] has each chunk checked against it, and its holes are neither read nor
//! written; a source without one streams, with SHA-512 (and MD5) computed beside it for the
//! record. A copy can start after chunks the destination already holds verified (a resume),
//! and says at a bounded rate, once what it wrote is durable, how far it has verified (a
//! checkpoint).
//!
//! Reading and writing happen on the calling thread; each chunk is shared (not copied) with
//! the hashing threads through bounded channels, so hashing overlaps the I/O and memory stays
//! at a few chunks whatever the file size. Blocks of zeros are not written, so holes stay
//! holes (like `cp --sparse=always`), and the file is extended to its full length at the end.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::direct;
use crate::manifest::{is_zero, Entry, Manifest, CHUNK_SIZE};

/// A chunk of an image, shared by the writer and the hashing threads.
pub type Chunk = Arc<Vec<u8>>;

/// Read unit of copies: whole manifest chunks ([`CHUNK_SIZE`]) at a time.
pub const CHUNK: usize = 1 << 20;
/// Manifest chunks per read.
const PER_READ: usize = CHUNK / CHUNK_SIZE;
/// Unit of hole detection: a block of this many zero bytes is skipped, not written.
const BLOCK: usize = 4096;
/// Chunks in flight to each hashing thread.
pub const IN_FLIGHT: usize = 4;
/// Longest sleep between checks for a cancel while the bandwidth cap holds a copy back.
const SLICE: Duration = Duration::from_millis(50);
/// How often a copy makes what it wrote durable and says how far it has verified.
pub const CHECKPOINT: Duration = Duration::from_secs(1);

/// Why a copy stopped before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Cancel,
    Shutdown,
}

#[derive(Debug)]
pub enum CopyError {
    Stopped(Stop),
    Io(io::Error),
    /// The source's bytes differ from its manifest (what differs).
    Changed(String),
}

impl From<io::Error> for CopyError {
    fn from(e: io::Error) -> Self {
        CopyError::Io(e)
    }
}

/// A byte budget shared by every copy: `rate` bytes per second, bursting up to one second's.
pub struct RateLimiter {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    pub fn new(bytes_per_second: u64) -> RateLimiter {
        RateLimiter {
            rate: bytes_per_second.max(1) as f64,
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    /// Takes `n` bytes from the budget; returns how long the caller must wait before using them.
    fn take(&self, n: usize) -> Duration {
        let Ok(mut state) = self.state.lock() else {
            return Duration::ZERO;
        };
        let (tokens, last) = &mut *state;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.rate);
        *last = now;
        *tokens -= n as f64;
        if *tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-*tokens / self.rate)
        }
    }
}

/// How far a copy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Bytes of the image at the destination (resumed, copied or holes).
    pub done: u64,
    /// Bytes this copy read from the source.
    pub read: u64,
}

/// What a copy tells its caller at a checkpoint ([`Control::checkpoint`]).
pub type Checkpoint<'a> = &'a mut dyn FnMut(&[Entry], u64);

/// What a copy asks of its caller while it runs.
pub struct Control<'a> {
    /// Polled once per chunk (and while throttled): `Some` stops the copy.
    pub stop: &'a dyn Fn() -> Option<Stop>,
    /// Told how far the copy is after each chunk.
    pub progress: &'a mut dyn FnMut(Progress),
    /// Every [`CHECKPOINT`], and when a shutdown stops the copy, once the output made what
    /// it wrote durable: the entries verified so far (from the first chunk on) and the bytes
    /// read from the source. `None`: nothing resumes from a checkpoint (an upload, an
    /// import), so the copy makes nothing durable before its end (the sink's finish does):
    /// an fdatasync a second stalled the reading thread while the hashers ran dry.
    pub checkpoint: Option<Checkpoint<'a>>,
    pub limiter: Option<&'a RateLimiter>,
}

/// Where a copy's bytes go, chunk by chunk, in order.
pub trait Output {
    fn write(&mut self, chunk: &Chunk, offset: u64) -> io::Result<()>;
    /// Makes everything written so far durable (before a checkpoint).
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Whether holes must be written as zeros too (a stream such as an upload); a file keeps
    /// them as holes.
    fn every_byte(&self) -> bool {
        false
    }
    /// What the writes since the last call cost the bandwidth cap, given what reading their
    /// bytes cost: an output that sends only some of them over a link (a peer) says what it
    /// sent.
    fn cost(&mut self, read_cost: u64) -> u64 {
        read_cost
    }
}

/// An output that keeps nothing (a pass that only hashes).
pub struct Discard;

impl Output for Discard {
    fn write(&mut self, _chunk: &Chunk, _offset: u64) -> io::Result<()> {
        Ok(())
    }
}

/// Where a copy's bytes come from.
pub trait Source: Read + Send {
    /// Whether the `len` bytes at `offset` are a hole in the source file's extent map; false
    /// when that cannot be told. It may move the position.
    fn is_hole(&mut self, _offset: u64, _len: u64) -> bool {
        false
    }
    /// Goes on reading at `offset`, at or after the current position.
    fn skip_to(&mut self, offset: u64) -> io::Result<()>;
    /// What reading the last `n` bytes took from the source's link: a source that fetches
    /// only some of them (a peer) says what it received.
    fn cost(&mut self, n: u64) -> u64 {
        n
    }
    /// The file read, where the source is one (its blocks can be shared by a reflink).
    fn as_file(&self) -> Option<&File> {
        None
    }
    /// Whether the source checks every chunk it gives against the copy's manifest itself (a
    /// peer's, as chunks arrive): the copy then does not hash them again.
    fn checks_chunks(&self) -> bool {
        false
    }
}

impl Source for File {
    fn as_file(&self) -> Option<&File> {
        Some(self)
    }

    fn is_hole(&mut self, offset: u64, len: u64) -> bool {
        is_hole(self, offset, len)
    }

    fn skip_to(&mut self, offset: u64) -> io::Result<()> {
        use std::io::Seek;
        self.seek(io::SeekFrom::Start(offset)).map(drop)
    }
}

/// Whether the `len` bytes of `file` at `offset` are a hole in its extent map (`SEEK_DATA`
/// finds no data before their end); false when that cannot be told.
/// It moves the file's offset.
pub fn is_hole(file: &File, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(start) = libc::off_t::try_from(offset) else {
        return false;
    };
    // SAFETY: lseek on an open descriptor; it only moves the file offset.
    let data = unsafe { libc::lseek(file.as_raw_fd(), start, libc::SEEK_DATA) };
    if data < 0 {
        // ENXIO: no data at or after `offset`.
        return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    data as u64 >= offset.saturating_add(len)
}

impl<T: AsRef<[u8]> + Send> Source for io::Cursor<T> {
    fn skip_to(&mut self, offset: u64) -> io::Result<()> {
        self.set_position(offset);
        Ok(())
    }
}

/// A whole-image digest (an image's MD5 `checksum`, its SHA-512 `os_hash_value`), with
/// OpenSSL's libcrypto: on this project's machines its assembly takes 1.0 s per GiB for
/// SHA-512 against ring's 1.34 s (ring uses its AVX code on Intel only) and 1.33 s for MD5
/// against md5-asm's 1.62 s, and every upload, import and copy into a directory pays them.
pub struct WholeHash(openssl::hash::Hasher);

impl WholeHash {
    pub fn sha512() -> io::Result<Self> {
        Self::new(openssl::hash::MessageDigest::sha512(), "SHA-512")
    }

    pub fn md5() -> io::Result<Self> {
        Self::new(openssl::hash::MessageDigest::md5(), "MD5")
    }

    fn new(kind: openssl::hash::MessageDigest, name: &str) -> io::Result<Self> {
        openssl::hash::Hasher::new(kind).map(Self).map_err(|e| {
            io::Error::other(format!(
                "OpenSSL refuses to compute {name} (a FIPS-only configuration?): {e}"
            ))
        })
    }

    pub fn update(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.update(bytes).map_err(io::Error::other)
    }

    /// The digest in lower-case hex.
    pub fn hex(mut self) -> io::Result<String> {
        let digest = self.0.finish().map_err(io::Error::other)?;
        Ok(crate::model::to_hex(&digest))
    }
}

/// The digest of the chunks, on a thread of its own.
fn digest_thread(mut hash: WholeHash, rx: Receiver<Chunk>) -> io::Result<String> {
    for chunk in rx {
        hash.update(chunk.as_slice())?;
    }
    hash.hex()
}

/// The manifest entries of each read's chunks.
fn entry_thread(rx: Receiver<Chunk>, tx: Sender<Vec<Entry>>) {
    for read in rx {
        if tx
            .send(read.chunks(CHUNK_SIZE).map(Entry::of).collect())
            .is_err()
        {
            return;
        }
    }
}

/// Writes `len` zero bytes at `offset` to an output that takes every byte, under the cap.
fn write_zeros(
    out: &mut dyn Output,
    ctl: &Control,
    offset: u64,
    len: u64,
) -> Result<(), CopyError> {
    let mut at = 0;
    while at < len {
        let n = (len - at).min(CHUNK as u64) as usize;
        throttle(ctl, n)?;
        out.write(&Arc::new(vec![0u8; n]), offset + at)?;
        at += n as u64;
    }
    Ok(())
}

/// Writes `chunk` at `offset`, skipping whole zero blocks, through `direct` where it can.
pub fn write_sparse(
    out: &File,
    direct: &mut Option<direct::Writer>,
    chunk: &[u8],
    offset: u64,
) -> io::Result<()> {
    let mut start: Option<usize> = None;
    let mut pos = 0;
    while pos < chunk.len() {
        let end = (pos + BLOCK).min(chunk.len());
        let zero = is_zero(&chunk[pos..end]);
        match (zero, start) {
            (false, None) => start = Some(pos),
            (true, Some(s)) => {
                direct::write_at(out, direct, &chunk[s..pos], offset + s as u64)?;
                start = None;
            }
            _ => {}
        }
        pos = end;
    }
    if let Some(s) = start {
        direct::write_at(out, direct, &chunk[s..], offset + s as u64)?;
    }
    Ok(())
}

fn read_full(src: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match src.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn throttle(ctl: &Control, n: usize) -> Result<(), CopyError> {
    let Some(limiter) = ctl.limiter else {
        return Ok(());
    };
    let deadline = Instant::now() + limiter.take(n);
    loop {
        if let Some(stop) = (ctl.stop)() {
            return Err(CopyError::Stopped(stop));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(SLICE));
    }
}

/// Which hashes a stream computes. Imports need both; a copy into a directory needs SHA-512
/// only (equal SHA-512 proves equal bytes, so it takes the source's MD5); a copy into Glance
/// needs none (Glance hashes what it receives, and its record is compared with the source's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hashes {
    pub sha512: bool,
    pub md5: bool,
}

/// What a stream yields besides its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Digests {
    pub size: u64,
    /// MD5, hex, if asked for.
    pub md5: Option<String>,
    /// SHA-512, hex, if asked for.
    pub sha512: Option<String>,
}

/// What a copy is to do.
pub struct Plan<'a> {
    /// The source's manifest: every chunk is checked against it, and its holes are not read.
    pub manifest: Option<&'a Manifest>,
    /// Entries of the leading chunks the destination holds already, verified: they are not
    /// read again. Without a manifest, whole chunks only.
    pub done: Vec<Entry>,
    /// Whole-image digests to compute (for a source without a manifest).
    pub hashes: Hashes,
    /// The destination's bytes of the `done` chunks, for those digests.
    pub prefix: Option<Box<dyn Read + 'a>>,
}

impl Plan<'_> {
    /// Bytes of an image of `size` bytes that the `done` chunks cover.
    pub fn done_bytes(&self, size: u64) -> u64 {
        ((self.done.len() * CHUNK_SIZE) as u64).min(size)
    }

    /// A copy from the first byte on, computing `hashes`.
    pub fn whole(hashes: Hashes) -> Plan<'static> {
        Plan {
            manifest: None,
            done: Vec::new(),
            hashes,
            prefix: None,
        }
    }
}

/// What a copy did.
#[derive(Debug)]
pub struct Copied {
    pub digests: Digests,
    /// Every chunk's entry: the manifest of what the destination holds.
    pub chunks: Vec<Entry>,
    /// Bytes read from the source.
    pub read: u64,
}

/// Chunks whose entries are known, or on their way from the hashing thread (one read's).
enum Pending {
    Holes(usize),
    /// Chunks the source checked against the manifest already: their entries.
    Checked(Vec<Entry>),
    Hashed {
        /// Index of the read's first chunk.
        index: usize,
        /// What the manifest says of each of its chunks (nothing without a manifest).
        expected: Vec<Entry>,
    },
}

/// The reads in flight, resolved in order into `chunks`.
struct InFlight {
    pending: VecDeque<Pending>,
    results: Receiver<Vec<Entry>>,
    chunks: Vec<Entry>,
    /// Index of the next chunk to read.
    next: usize,
}

impl InFlight {
    /// Moves resolved entries into `chunks`, checking each against what the manifest expects;
    /// waits for every one if `wait`.
    fn drain(&mut self, wait: bool) -> Result<(), CopyError> {
        while let Some(front) = self.pending.front() {
            match front {
                Pending::Holes(n) => {
                    let n = *n;
                    self.chunks.extend(std::iter::repeat_n(Entry::Hole, n));
                }
                Pending::Checked(entries) => self.chunks.extend_from_slice(entries),
                Pending::Hashed { index, expected } => {
                    let got = if wait {
                        self.results.recv().map_err(|_| hasher_gone())?
                    } else {
                        match self.results.try_recv() {
                            Ok(got) => got,
                            Err(TryRecvError::Empty) => return Ok(()),
                            Err(TryRecvError::Disconnected) => return Err(hasher_gone().into()),
                        }
                    };
                    if let Some(bad) = (0..expected.len()).find(|&i| expected[i] != got[i]) {
                        let chunk = index + bad;
                        let offset = (chunk * CHUNK_SIZE) as u64;
                        return Err(CopyError::Changed(format!(
                            "chunk {chunk} (bytes {offset} to {}) differs from the image's manifest",
                            offset + CHUNK_SIZE as u64
                        )));
                    }
                    self.chunks.extend(got);
                }
            }
            self.pending.pop_front();
        }
        Ok(())
    }
}

fn hasher_gone() -> io::Error {
    io::Error::other("a hashing thread stopped")
}

/// Read buffers, used again once no hashing thread or output holds them: a fresh megabyte for
/// every read cost a page fault per 4 KiB, 42 % of a copy's CPU (BENCHMARKS.md, P5).
#[derive(Default)]
struct Buffers {
    kept: VecDeque<Chunk>,
}

impl Buffers {
    /// At most this many are kept: what the channels can hold, and a few.
    const MOST: usize = 3 * IN_FLIGHT + 2;

    /// A buffer of `len` bytes (what it held before is left: a read overwrites it).
    fn take(&mut self, len: usize) -> Vec<u8> {
        let free = self.kept.iter().position(|c| Arc::strong_count(c) == 1);
        let mut buf = free
            .and_then(|i| self.kept.remove(i))
            .and_then(|c| Arc::try_unwrap(c).ok())
            .unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    /// Keeps `chunk` to use its buffer again once everyone is done with it.
    fn keep(&mut self, chunk: Chunk) {
        if self.kept.len() == Self::MOST {
            self.kept.pop_front();
        }
        self.kept.push_back(chunk);
    }
}

/// Hands the first `len` bytes a resumed copy holds to the whole-image hashers.
fn feed_prefix(
    mut prefix: Box<dyn Read + '_>,
    len: u64,
    hashers: &[&std::sync::mpsc::SyncSender<Chunk>],
) -> Result<(), CopyError> {
    let mut fed = 0u64;
    while fed < len {
        let mut buf = vec![0u8; CHUNK.min((len - fed) as usize)];
        let n = read_full(&mut *prefix, &mut buf)?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        fed += n as u64;
        let chunk = Arc::new(buf);
        for tx in hashers {
            tx.send(Arc::clone(&chunk)).map_err(|_| hasher_gone())?;
        }
    }
    if fed != len {
        return Err(io::Error::other(format!(
            "the destination holds {fed} of the {len} bytes it verified"
        ))
        .into());
    }
    Ok(())
}

/// Copies `source` to `out` as `plan` says, under `ctl`.
pub fn copy(
    source: &mut dyn Source,
    out: &mut dyn Output,
    plan: Plan,
    ctl: &mut Control,
) -> Result<Copied, CopyError> {
    let Plan {
        manifest,
        done,
        hashes,
        prefix,
    } = plan;
    // Checked against a manifest, a copy computes no whole-image digest: it reports the
    // SHA-512 the manifest names, which every chunk matched.
    let hashes = match manifest {
        Some(_) => Hashes {
            sha512: false,
            md5: false,
        },
        None => hashes,
    };
    let start = match manifest {
        Some(m) => m.offset(done.len()).min(m.size),
        None => (done.len() * CHUNK_SIZE) as u64,
    };
    let (entry_tx, entry_rx) = sync_channel::<Chunk>(IN_FLIGHT);
    let (result_tx, results) = channel::<Vec<Entry>>();
    let (sha_tx, sha_rx) = sync_channel::<Chunk>(IN_FLIGHT);
    let (md5_tx, md5_rx) = sync_channel::<Chunk>(IN_FLIGHT);
    let sha_tx = hashes.sha512.then_some(sha_tx);
    let md5_tx = hashes.md5.then_some(md5_tx);
    let sha = hashes.sha512.then(WholeHash::sha512).transpose()?;
    let md5 = hashes.md5.then(WholeHash::md5).transpose()?;
    std::thread::scope(|scope| {
        scope.spawn(move || entry_thread(entry_rx, result_tx));
        let sha = sha.map(|hash| scope.spawn(move || digest_thread(hash, sha_rx)));
        let md5 = md5.map(|hash| scope.spawn(move || digest_thread(hash, md5_rx)));
        let mut flight = InFlight {
            pending: VecDeque::new(),
            results,
            next: done.len(),
            chunks: done,
        };
        let mut read = 0u64;
        let mut end_at = start;
        let mut buffers = Buffers::default();
        let copied = (|| -> Result<(), CopyError> {
            if start > 0 && (hashes.sha512 || hashes.md5) {
                let prefix = prefix.ok_or_else(|| {
                    io::Error::other("a resumed copy needs the bytes it holds already")
                })?;
                let hashers: Vec<_> = sha_tx.iter().chain(&md5_tx).collect();
                feed_prefix(prefix, start, &hashers)?;
            }
            let mut at = 0u64;
            let mut last_checkpoint = Instant::now();
            loop {
                if let Some(stop) = (ctl.stop)() {
                    return Err(CopyError::Stopped(stop));
                }
                let index = flight.next;
                let offset = (index * CHUNK_SIZE) as u64;
                // This read: up to a megabyte of chunks, those the manifest says hold data,
                // or a run of holes that turned out not to be holes in the source's file.
                let (len, expected) = match manifest {
                    Some(m) if index >= m.chunk_count() => return Ok(()),
                    Some(m) => {
                        let (mut end, hole) = m.run_from(index, PER_READ);
                        if hole {
                            let run = m.offset(end).min(m.size) - offset;
                            let is_hole = source.is_hole(offset, run);
                            // Asking may have moved the source's position.
                            at = u64::MAX;
                            if is_hole {
                                if out.every_byte() {
                                    write_zeros(out, ctl, offset, run)?;
                                }
                                flight.pending.push_back(Pending::Holes(end - index));
                                flight.next = end;
                                end_at = offset + run;
                                (ctl.progress)(Progress { done: end_at, read });
                                continue;
                            }
                            end = end.min(index + PER_READ);
                        }
                        let len = (m.offset(end).min(m.size) - offset) as usize;
                        (len, m.chunks[index..end].to_vec())
                    }
                    None => (CHUNK, Vec::new()),
                };
                if at != offset {
                    source.skip_to(offset)?;
                    at = offset;
                }
                let mut buf = buffers.take(len);
                let n = read_full(source, &mut buf)?;
                at += n as u64;
                if let Some(m) = manifest.filter(|_| n < len) {
                    return Err(CopyError::Changed(format!(
                        "it ends at byte {}, its manifest says {}",
                        offset + n as u64,
                        m.size
                    )));
                }
                if n == 0 {
                    return Ok(());
                }
                buf.truncate(n);
                let cost = source.cost(n as u64);
                read += cost;
                let chunk = Arc::new(buf);
                let checked = manifest.is_some() && source.checks_chunks();
                let hashers = (!checked).then_some(&entry_tx);
                for tx in hashers.into_iter().chain(&sha_tx).chain(&md5_tx) {
                    tx.send(Arc::clone(&chunk)).map_err(|_| hasher_gone())?;
                }
                out.write(&chunk, offset)?;
                throttle(ctl, out.cost(cost) as usize)?;
                buffers.keep(chunk);
                flight.next = index + n.div_ceil(CHUNK_SIZE);
                flight.pending.push_back(if checked {
                    Pending::Checked(expected)
                } else {
                    Pending::Hashed { index, expected }
                });
                flight.drain(false)?;
                end_at = offset + n as u64;
                (ctl.progress)(Progress { done: end_at, read });
                if manifest.is_none() && n < CHUNK {
                    return Ok(());
                }
                if let Some(checkpoint) = ctl
                    .checkpoint
                    .as_mut()
                    .filter(|_| last_checkpoint.elapsed() >= CHECKPOINT)
                {
                    flight.drain(true)?;
                    out.sync()?;
                    checkpoint(&flight.chunks, read);
                    last_checkpoint = Instant::now();
                }
            }
        })();
        let copied = copied.and_then(|()| flight.drain(true));
        // Paused for a shutdown: what was verified is recorded, to resume from exactly there.
        if let (Err(CopyError::Stopped(Stop::Shutdown)), Some(checkpoint)) =
            (&copied, ctl.checkpoint.as_mut())
        {
            if flight.drain(true).is_ok() && out.sync().is_ok() {
                checkpoint(&flight.chunks, read);
            }
        }
        drop(entry_tx);
        drop(sha_tx);
        drop(md5_tx);
        let sha = sha
            .map(|t| t.join())
            .transpose()
            .map_err(|_| io::Error::other("the SHA-512 thread panicked"))?
            .transpose()?;
        let md5 = md5
            .map(|t| t.join())
            .transpose()
            .map_err(|_| io::Error::other("the MD5 thread panicked"))?
            .transpose()?;
        copied?;
        Ok(Copied {
            digests: Digests {
                size: manifest.map_or(end_at, |m| m.size),
                md5,
                sha512: match manifest {
                    Some(m) => m.sha512.clone(),
                    None => sha,
                },
            },
            chunks: flight.chunks,
            read,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::WholeHash;
    use md5::{Digest, Md5};
    use sha2::Sha512;

    /// libcrypto's digests, fed in uneven pieces, against the RustCrypto crates' of the whole.
    #[test]
    fn whole_hashes_agree_with_other_implementations_whatever_the_pieces() {
        let data: Vec<u8> = (0..3_000_017u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for piece in [1, 63, 64, 127, 4096, 1 << 20, data.len()] {
            let fed = &data[..data.len().min(piece * 1000)];
            let (mut md5, mut sha) = (WholeHash::md5().unwrap(), WholeHash::sha512().unwrap());
            for part in fed.chunks(piece) {
                md5.update(part).unwrap();
                sha.update(part).unwrap();
            }
            let hex = crate::model::to_hex;
            assert_eq!(
                md5.hex().unwrap(),
                hex(&Md5::digest(fed)),
                "MD5, pieces of {piece}"
            );
            assert_eq!(
                sha.hex().unwrap(),
                hex(&Sha512::digest(fed)),
                "SHA-512, pieces of {piece}"
            );
        }
        assert_eq!(
            WholeHash::md5().unwrap().hex().unwrap(),
            "d41d8cd98f00b204e9800998ecf8427e"
        );
    }
}
