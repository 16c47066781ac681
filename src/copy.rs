//! The copy engine: streams bytes to a sink while computing SHA-512 (and MD5) beside it.
//!
//! Reading and writing happen on the calling thread; each chunk is shared (not copied) with
//! the hashing threads through bounded channels, so hashing overlaps the I/O and memory stays
//! at a few chunks whatever the file size. Blocks of zeros are not written, so holes stay
//! holes (like `cp --sparse=always`), and the file is extended to its full length at the end.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use md5::Md5;
use sha2::{Digest, Sha512};

/// A chunk of an image, shared by the writer and the hashing threads.
pub type Chunk = Arc<Vec<u8>>;

/// Read unit of copies.
pub const CHUNK: usize = 1 << 20;
/// Unit of hole detection: a block of this many zero bytes is skipped, not written.
const BLOCK: usize = 4096;
/// Chunks in flight to each hashing thread.
pub const IN_FLIGHT: usize = 4;
/// Longest sleep between checks for a cancel while the bandwidth cap holds a copy back.
const SLICE: Duration = Duration::from_millis(50);

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

/// What a copy asks of its caller while it runs.
pub struct Control<'a> {
    /// Polled once per chunk (and while throttled): `Some` stops the copy.
    pub stop: &'a dyn Fn() -> Option<Stop>,
    /// Told the bytes copied so far after each chunk.
    pub progress: &'a mut dyn FnMut(u64),
    pub limiter: Option<&'a RateLimiter>,
}

fn hash_thread<D: Digest>(rx: Receiver<Chunk>) -> Vec<u8> {
    let mut digest = D::new();
    for chunk in rx {
        digest.update(chunk.as_slice());
    }
    digest.finalize().to_vec()
}

fn is_zero(block: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets the aligned middle.
    let (head, body, tail) = unsafe { block.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Writes `chunk` at `offset`, skipping whole zero blocks.
pub fn write_sparse(out: &File, chunk: &[u8], offset: u64) -> io::Result<()> {
    let mut start: Option<usize> = None;
    let mut pos = 0;
    while pos < chunk.len() {
        let end = (pos + BLOCK).min(chunk.len());
        let zero = is_zero(&chunk[pos..end]);
        match (zero, start) {
            (false, None) => start = Some(pos),
            (true, Some(s)) => {
                out.write_all_at(&chunk[s..pos], offset + s as u64)?;
                start = None;
            }
            _ => {}
        }
        pos = end;
    }
    if let Some(s) = start {
        out.write_all_at(&chunk[s..], offset + s as u64)?;
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

/// Reads `input` to its end in chunks, hands each chunk and its offset to `out`, and computes
/// the `hashes` on separate threads meanwhile.
pub fn stream(
    input: &mut dyn Read,
    out: &mut dyn FnMut(&Chunk, u64) -> io::Result<()>,
    ctl: &mut Control,
    hashes: Hashes,
) -> Result<Digests, CopyError> {
    let (sha_tx, sha_rx) = sync_channel::<Chunk>(IN_FLIGHT);
    let (md5_tx, md5_rx) = sync_channel::<Chunk>(IN_FLIGHT);
    let sha_tx = hashes.sha512.then_some(sha_tx);
    let md5_tx = hashes.md5.then_some(md5_tx);
    std::thread::scope(|scope| {
        let sha = hashes
            .sha512
            .then(|| scope.spawn(move || hash_thread::<Sha512>(sha_rx)));
        let md5 = hashes
            .md5
            .then(|| scope.spawn(move || hash_thread::<Md5>(md5_rx)));
        let mut size = 0u64;
        let copied = (|| -> Result<(), CopyError> {
            loop {
                if let Some(stop) = (ctl.stop)() {
                    return Err(CopyError::Stopped(stop));
                }
                let mut buf = vec![0u8; CHUNK];
                let n = read_full(input, &mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                buf.truncate(n);
                throttle(ctl, n)?;
                let chunk = Arc::new(buf);
                let hashers_gone = || io::Error::other("a hashing thread stopped");
                for tx in sha_tx.iter().chain(&md5_tx) {
                    tx.send(Arc::clone(&chunk)).map_err(|_| hashers_gone())?;
                }
                out(&chunk, size)?;
                size += n as u64;
                (ctl.progress)(size);
            }
        })();
        drop(sha_tx);
        drop(md5_tx);
        let sha = sha
            .map(|t| t.join())
            .transpose()
            .map_err(|_| io::Error::other("the SHA-512 thread panicked"))?;
        let md5 = md5
            .map(|t| t.join())
            .transpose()
            .map_err(|_| io::Error::other("the MD5 thread panicked"))?;
        copied?;
        Ok(Digests {
            size,
            md5: md5.map(|d| crate::model::to_hex(&d)),
            sha512: sha.map(|d| crate::model::to_hex(&d)),
        })
    })
}
