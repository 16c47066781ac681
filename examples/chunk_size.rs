//! Which chunk size the image manifests should use (issue 20), and fixed against
//! content-defined chunks for the peer protocol (issue 14): a measurement, not product code.
//!
//! ```text
//! cargo run --release --example chunk_size -- [--throughput FILE] [--cpu FILE] [--cdc]
//!     [--fastcdc] [--threads N] [--pair LABEL OLD NEW]...
//! ```
//!
//! A manifest here is the one issue 20 describes: the image cut into fixed-size chunks aligned
//! to the start of the file (offset = index × size), each chunk a BLAKE3-256 hash (32 bytes and
//! a tag byte) or, when all its bytes are zero, a hole (the tag byte alone). It prints Markdown:
//!
//! - `--throughput FILE`: BLAKE3 chunk by chunk over FILE, page cache warm, best of 3, in MiB/s:
//!   `pread` of one chunk then its hash on one thread and on two (chunks handed out in turn),
//!   and the hash alone over the file held in memory (the first GiB of it).
//! - `--cpu FILE`: per chunking, on one thread over FILE held in memory, best of 3: cutting
//!   alone, cutting + BLAKE3 of every chunk, and zstd level 1 of every data chunk, in MiB/s;
//! - the size of a manifest per GiB of image;
//! - for each `--pair LABEL OLD NEW`: of NEW's data bytes (the bytes of its chunks that are not
//!   holes), the share in chunks whose hash is not among OLD's hashes, which is what a delta
//!   transfer would send, and how many of NEW's bytes are holes; then what those chunks weigh
//!   after zstd level 1 (each chunk compressed alone, the smaller of compressed and raw) with
//!   NEW's manifest, as a share of NEW's size, and the chunk index NEW's chunks need.
//!
//! Besides the four candidates (64 KiB, 256 KiB, 1 MiB, 4 MiB) it measures 4 KiB, the ext4
//! block, as the floor fixed-size chunks can reach; with `--cdc` content-defined chunks cut by
//! a plain gear rolling hash written here (mean sizes 64 KiB and 1 MiB), and with `--fastcdc`
//! those of the fastcdc crate (`v2020`, normalisation level 1, averages 16 KiB and 64 KiB,
//! minimum average / 4, maximum average × 4), to compare fixed with content-defined chunking on
//! the same files. Run it with `--release`: blake3 is not optimised in dev builds.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Fixed chunk sizes measured: the ext4 block (a floor, not a candidate), then the candidates.
const SIZES: [u64; 5] = [4 * KIB, 64 * KIB, 256 * KIB, MIB, 4 * MIB];
/// Mean sizes of the gear-hash chunkings measured with `--cdc`.
const CDC_TARGETS: [u64; 2] = [64 * KIB, MIB];
/// Average sizes of the fastcdc chunkings measured with `--fastcdc`.
const FASTCDC_AVERAGES: [u32; 2] = [16 * KIB as u32, 64 * KIB as u32];
/// Files are read in blocks of the largest fixed size.
const BLOCK: usize = 4 * MIB as usize;
/// Bytes of a manifest entry: a BLAKE3-256 hash and a tag byte, or the tag byte of a hole.
const HASH_ENTRY: u64 = 33;
const HOLE_ENTRY: u64 = 1;
/// Bytes of a chunk index entry counted per data chunk: keys of 64 bytes (owner 16, hash 32,
/// image 16) and a guess of 4 for sled's overhead.
const INDEX_ENTRY: u64 = 68;
/// The peer protocol's frame: a 9-byte header; raw unless zstd saves a sixteenth.
const FRAME_HEADER: u64 = 9;
const ZSTD_LEVEL: i32 = 1;

type Hash = [u8; 32];

struct Chunk {
    offset: u64,
    len: u64,
    /// `None`: every byte of the chunk is zero (a hole in the manifest).
    hash: Option<Hash>,
}

/// One way of cutting a file: "64 KiB" (fixed), "gear CDC ~64 KiB" or "FastCDC ~64 KiB".
struct Chunking {
    label: String,
    chunks: Vec<Chunk>,
}

struct Scan {
    len: u64,
    chunkings: Vec<Chunking>,
}

struct Options {
    throughput: Option<PathBuf>,
    cpu: Option<PathBuf>,
    cdc: bool,
    fastcdc: bool,
    threads: usize,
    pairs: Vec<(String, PathBuf, PathBuf)>,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("chunk_size: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let options = parse(std::env::args().skip(1).collect())?;
    if cfg!(debug_assertions) {
        eprintln!("chunk_size: a debug build; run with --release for figures that mean anything.");
    }
    if let Some(path) = &options.throughput {
        throughput_table(path)?;
    }
    if let Some(path) = &options.cpu {
        cpu_table(path, options.cdc, options.fastcdc)?;
    }
    manifest_size_table();
    if options.pairs.is_empty() {
        return Ok(());
    }
    let mut paths: Vec<PathBuf> = Vec::new();
    for (_, old, new) in &options.pairs {
        for path in [old, new] {
            if !paths.contains(path) {
                paths.push(path.clone());
            }
        }
    }
    let started = Instant::now();
    let scans = scan_all(&paths, options.cdc, options.fastcdc, options.threads)?;
    eprintln!(
        "chunk_size: scanned {} files in {:.1} s",
        paths.len(),
        started.elapsed().as_secs_f64()
    );
    for (label, old, new) in &options.pairs {
        let (Some(old_scan), Some(new_scan)) = (scans.get(old), scans.get(new)) else {
            return Err("a file of a pair was not scanned.".into());
        };
        delta_table(label, old, new, old_scan, new_scan)?;
    }
    Ok(())
}

fn parse(args: Vec<String>) -> Result<Options, String> {
    let mut options = Options {
        throughput: None,
        cpu: None,
        cdc: false,
        fastcdc: false,
        threads: 2,
        pairs: Vec::new(),
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--throughput" => {
                let path = args.next().ok_or("--throughput needs a file.")?;
                options.throughput = Some(PathBuf::from(path));
            }
            "--cpu" => {
                let path = args.next().ok_or("--cpu needs a file.")?;
                options.cpu = Some(PathBuf::from(path));
            }
            "--cdc" => options.cdc = true,
            "--fastcdc" => options.fastcdc = true,
            "--threads" => {
                let n = args.next().ok_or("--threads needs a number.")?;
                options.threads = n
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or("--threads needs a number above 0.")?;
            }
            "--pair" => {
                let (Some(label), Some(old), Some(new)) = (args.next(), args.next(), args.next())
                else {
                    return Err("--pair needs a label, the old file and the new file.".into());
                };
                options.pairs.push((label, old.into(), new.into()));
            }
            "-h" | "--help" => {
                println!(
                    "usage: chunk_size [--throughput FILE] [--cpu FILE] [--cdc] [--fastcdc] \
                     [--threads N] [--pair LABEL OLD NEW]..."
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}; see --help.")),
        }
    }
    if options.throughput.is_none() && options.cpu.is_none() && options.pairs.is_empty() {
        return Err(
            "nothing to measure: give --throughput FILE, --cpu FILE or --pair LABEL OLD NEW."
                .into(),
        );
    }
    Ok(options)
}

// ---------------------------------------------------------------- hashing throughput

fn throughput_table(path: &Path) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}.", path.display()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("cannot stat {}: {e}.", path.display()))?
        .len();
    if len == 0 {
        return Err(format!("{} is empty.", path.display()));
    }
    // Warm the page cache, and keep the first GiB in memory for the hash-only column.
    let in_memory = read_prefix(&file, len.min(GIB))?;
    read_through(&file, len)?;

    println!(
        "### BLAKE3 throughput, chunk by chunk\n\n`{}`: {} MiB, page cache warm, best of 3. \
         \"read + hash\": `pread` of one chunk into a buffer, then `blake3::hash` of it; \
         with 2 threads each takes the next chunk in turn. \"hash only\": the first {} MiB \
         already in memory.\n",
        path.display(),
        fmt_int(len / MIB),
        fmt_int(in_memory.len() as u64 / MIB)
    );
    println!(
        "| chunk size | read + hash, 1 thread (MiB/s) | read + hash, 2 threads (MiB/s) | \
         hash only, 1 thread (MiB/s) | per chunk, 1 thread (µs) |"
    );
    println!("|---|---|---|---|---|");
    for &size in &SIZES {
        let one = best_of_3(|| read_and_hash(&file, len, size, 1))?;
        let two = best_of_3(|| read_and_hash(&file, len, size, 2))?;
        let memory = best_of_3(|| {
            let started = Instant::now();
            for chunk in in_memory.chunks(size as usize) {
                black_box(blake3::hash(chunk));
            }
            Ok(started.elapsed().as_secs_f64())
        })?;
        let one_rate = mib_per_s(len, one);
        println!(
            "| {} | {} | {} | {} | {:.1} |",
            size_label(size),
            fmt_int(one_rate as u64),
            fmt_int(mib_per_s(len, two) as u64),
            fmt_int(mib_per_s(in_memory.len() as u64, memory) as u64),
            size as f64 / MIB as f64 / one_rate * 1e6
        );
    }
    println!();
    Ok(())
}

fn best_of_3(mut run: impl FnMut() -> Result<f64, String>) -> Result<f64, String> {
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        best = best.min(run()?);
    }
    Ok(best)
}

fn mib_per_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / MIB as f64 / seconds
}

/// Seconds to `pread` and hash every chunk of the file, on `threads` threads.
fn read_and_hash(file: &File, len: u64, size: u64, threads: usize) -> Result<f64, String> {
    let count = len.div_ceil(size);
    let next = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> Result<(), String> {
                    let mut buf = vec![0u8; size as usize];
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        if index >= count {
                            return Ok(());
                        }
                        let offset = index * size;
                        let want = size.min(len - offset) as usize;
                        file.read_exact_at(&mut buf[..want], offset)
                            .map_err(|e| format!("cannot read at {offset}: {e}."))?;
                        black_box(blake3::hash(&buf[..want]));
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|worker| {
            worker
                .join()
                .map_err(|_| "a hashing thread panicked.".to_string())?
        })
    })?;
    Ok(started.elapsed().as_secs_f64())
}

fn read_prefix(file: &File, len: u64) -> Result<Vec<u8>, String> {
    let mut data = vec![0u8; len as usize];
    file.read_exact_at(&mut data, 0)
        .map_err(|e| format!("cannot read: {e}."))?;
    Ok(data)
}

fn read_through(file: &File, len: u64) -> Result<(), String> {
    let mut buf = vec![0u8; BLOCK];
    let mut offset = 0;
    while offset < len {
        let want = (len - offset).min(BLOCK as u64) as usize;
        file.read_exact_at(&mut buf[..want], offset)
            .map_err(|e| format!("cannot read at {offset}: {e}."))?;
        offset += want as u64;
    }
    Ok(())
}

// ---------------------------------------------------------------- CPU per chunking

/// Cuts of `data` by the chunking named `label` (as `chunkings` names them).
fn cuts(data: &[u8], label: &str) -> Vec<(usize, usize)> {
    if let Some(&size) = SIZES.iter().find(|&&size| size_label(size) == label) {
        return fixed_cuts(data.len(), size as usize).collect();
    }
    if let Some(&average) = FASTCDC_AVERAGES
        .iter()
        .find(|&&average| fastcdc_label(average) == label)
    {
        return fastcdc_cuts(data, average).collect();
    }
    let target = CDC_TARGETS
        .iter()
        .copied()
        .find(|&target| format!("gear CDC ~{}", size_label(target)) == label)
        .unwrap_or(CDC_TARGETS[0]);
    let mut chunker = Cdc::new(target);
    for block in data.chunks(BLOCK) {
        chunker.feed(block);
    }
    chunker
        .finish()
        .iter()
        .map(|c| (c.offset as usize, c.len as usize))
        .collect()
}

fn cpu_table(path: &Path, cdc: bool, fastcdc: bool) -> Result<(), String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}.", path.display()))?;
    if data.is_empty() {
        return Err(format!("{} is empty.", path.display()));
    }
    let len = data.len() as u64;
    let mut labels: Vec<String> = SIZES.iter().map(|&size| size_label(size)).collect();
    if cdc {
        labels.extend(
            CDC_TARGETS
                .iter()
                .map(|&t| format!("gear CDC ~{}", size_label(t))),
        );
    }
    if fastcdc {
        labels.extend(FASTCDC_AVERAGES.iter().map(|&a| fastcdc_label(a)));
    }
    println!(
        "### CPU per chunking, one thread\n\n`{}`: {} MiB held in memory, best of 3. \"Cut\": \
         finding the chunk boundaries alone (nothing for fixed sizes). \"Cut + BLAKE3\": \
         boundaries and `blake3::hash` of every chunk, what building a manifest costs beside \
         reading. \"zstd-1\": `zstd::bulk::Compressor` at level 1 over every chunk that is not \
         all zeros, each alone (MiB/s of input), and what it leaves of them.\n",
        path.display(),
        fmt_int(len / MIB)
    );
    println!(
        "| chunking | mean chunk (KiB) | cut (MiB/s) | cut + BLAKE3 (MiB/s) | \
         zstd-1 (MiB/s) | zstd-1 size, % of the data chunks |"
    );
    println!("|---|---|---|---|---|---|");
    let mut compressor =
        zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(|e| format!("cannot start zstd: {e}."))?;
    for label in &labels {
        let cut_only = best_of_3(|| {
            let started = Instant::now();
            black_box(cuts(&data, label).len());
            Ok(started.elapsed().as_secs_f64())
        })?;
        let cut_hash = best_of_3(|| {
            let started = Instant::now();
            for (offset, length) in cuts(&data, label) {
                black_box(blake3::hash(&data[offset..offset + length]));
            }
            Ok(started.elapsed().as_secs_f64())
        })?;
        let pieces = cuts(&data, label);
        let data_pieces: Vec<&[u8]> = pieces
            .iter()
            .map(|&(offset, length)| &data[offset..offset + length])
            .filter(|bytes| !is_zero(bytes))
            .collect();
        let data_bytes: u64 = data_pieces.iter().map(|b| b.len() as u64).sum();
        let mut packed = 0u64;
        let zstd_time = best_of_3(|| {
            packed = 0;
            let started = Instant::now();
            for bytes in &data_pieces {
                let out = compressor
                    .compress(bytes)
                    .map_err(|e| format!("zstd failed: {e}."))?;
                packed += out.len() as u64;
            }
            Ok(started.elapsed().as_secs_f64())
        })?;
        println!(
            "| {label} | {:.1} | {} | {} | {} | {} |",
            len as f64 / KIB as f64 / pieces.len().max(1) as f64,
            if SIZES.iter().any(|&size| size_label(size) == *label) {
                "-".to_string()
            } else {
                fmt_int(mib_per_s(len, cut_only) as u64)
            },
            fmt_int(mib_per_s(len, cut_hash) as u64),
            fmt_int(mib_per_s(data_bytes, zstd_time) as u64),
            percent(packed, data_bytes)
        );
    }
    println!();
    Ok(())
}

// ---------------------------------------------------------------- manifest size

fn manifest_size_table() {
    println!(
        "### Manifest size\n\nAn entry is {HASH_ENTRY} bytes (BLAKE3-256 and a tag byte), a hole \
         {HOLE_ENTRY} byte; no header counted. \"All data\" is the most a manifest can weigh \
         (no holes).\n"
    );
    println!(
        "| chunk size | chunks per GiB | manifest per GiB, all data (bytes) | \
         manifest of a 20 GiB image, all data (KiB) | chunks of a 20 GiB image |"
    );
    println!("|---|---|---|---|---|");
    for &size in &SIZES {
        let per_gib = GIB / size;
        println!(
            "| {} | {} | {} | {} | {} |",
            size_label(size),
            fmt_int(per_gib),
            fmt_int(per_gib * HASH_ENTRY),
            fmt_int(20 * per_gib * HASH_ENTRY / KIB),
            fmt_int(20 * per_gib)
        );
    }
    println!();
}

// ---------------------------------------------------------------- scanning files

/// Scans every file once, `threads` files at a time.
fn scan_all(
    paths: &[PathBuf],
    cdc: bool,
    fastcdc: bool,
    threads: usize,
) -> Result<HashMap<PathBuf, Scan>, String> {
    let next = AtomicUsize::new(0);
    let results = Mutex::new(HashMap::new());
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.min(paths.len()))
            .map(|_| {
                scope.spawn(|| -> Result<(), String> {
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some(path) = paths.get(index) else {
                            return Ok(());
                        };
                        let data = std::fs::read(path)
                            .map_err(|e| format!("cannot read {}: {e}.", path.display()))?;
                        let scan = Scan {
                            len: data.len() as u64,
                            chunkings: chunkings(&data, cdc, fastcdc),
                        };
                        results
                            .lock()
                            .map_err(|_| "a scanning thread panicked.".to_string())?
                            .insert(path.clone(), scan);
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|worker| {
            worker
                .join()
                .map_err(|_| "a scanning thread panicked.".to_string())?
        })
    })?;
    results
        .into_inner()
        .map_err(|_| "a scanning thread panicked.".to_string())
}

/// A chunk of `data` at `offset`: a hole when all its bytes are zero, else hashed.
fn chunk_of(data: &[u8], offset: usize, len: usize) -> Chunk {
    let bytes = &data[offset..offset + len];
    Chunk {
        offset: offset as u64,
        len: len as u64,
        hash: (!is_zero(bytes)).then(|| *blake3::hash(bytes).as_bytes()),
    }
}

/// Every chunking measured, in table order: fixed sizes, gear CDC, FastCDC.
fn chunkings(data: &[u8], cdc: bool, fastcdc: bool) -> Vec<Chunking> {
    let mut out: Vec<Chunking> = SIZES
        .iter()
        .map(|&size| Chunking {
            label: size_label(size),
            chunks: fixed_cuts(data.len(), size as usize)
                .map(|(offset, len)| chunk_of(data, offset, len))
                .collect(),
        })
        .collect();
    if cdc {
        for &target in &CDC_TARGETS {
            let mut chunker = Cdc::new(target);
            for block in data.chunks(BLOCK) {
                chunker.feed(block);
            }
            out.push(Chunking {
                label: format!("gear CDC ~{}", size_label(target)),
                chunks: chunker.finish(),
            });
        }
    }
    if fastcdc {
        for &average in &FASTCDC_AVERAGES {
            out.push(Chunking {
                label: fastcdc_label(average),
                chunks: fastcdc_cuts(data, average)
                    .map(|(offset, len)| chunk_of(data, offset, len))
                    .collect(),
            });
        }
    }
    out
}

fn fixed_cuts(len: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len)
        .step_by(size)
        .map(move |offset| (offset, size.min(len - offset)))
}

/// FastCDC (2020) with the given average, minimum average / 4, maximum average × 4.
fn fastcdc_cuts(data: &[u8], average: u32) -> impl Iterator<Item = (usize, usize)> + '_ {
    fastcdc::v2020::FastCDC::new(data, average / 4, average, average * 4)
        .map(|chunk| (chunk.offset, chunk.length))
}

fn fastcdc_label(average: u32) -> String {
    format!("FastCDC ~{}", size_label(average as u64))
}

fn is_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(64);
    let blocks_zero = blocks
        .by_ref()
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0);
    blocks_zero && blocks.remainder().iter().all(|&b| b == 0)
}

// ---------------------------------------------------------------- content-defined chunks

/// A gear rolling hash (as in FastCDC): the hash depends on the last 64 bytes; a chunk ends
/// where it falls below a threshold, after at least `min` bytes and at most `max`.
struct Cdc {
    min: u64,
    max: u64,
    threshold: u64,
    rolling: u64,
    offset: u64,
    len: u64,
    nonzero: u8,
    hasher: blake3::Hasher,
    chunks: Vec<Chunk>,
}

const GEAR: [u64; 256] = gear_table();

const fn gear_table() -> [u64; 256] {
    // splitmix64 from a fixed seed: the same table on every run.
    let mut table = [0u64; 256];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut i = 0;
    while i < 256 {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        table[i] = z ^ (z >> 31);
        i += 1;
    }
    table
}

impl Cdc {
    fn new(target: u64) -> Self {
        let min = target / 4;
        Cdc {
            min,
            max: target * 4,
            // A cut is due with probability 1 / (target - min) per byte after `min`.
            threshold: u64::MAX / (target - min),
            rolling: 0,
            offset: 0,
            len: 0,
            nonzero: 0,
            hasher: blake3::Hasher::new(),
            chunks: Vec::new(),
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let mut cut = None;
            for (i, &byte) in data.iter().enumerate() {
                self.rolling = (self.rolling << 1).wrapping_add(GEAR[byte as usize]);
                let len = self.len + i as u64 + 1;
                if (len >= self.min && self.rolling < self.threshold) || len >= self.max {
                    cut = Some(i + 1);
                    break;
                }
            }
            let (piece, rest) = data.split_at(cut.unwrap_or(data.len()));
            self.hasher.update(piece);
            self.nonzero |= piece.iter().fold(0u8, |acc, &b| acc | b);
            self.len += piece.len() as u64;
            if cut.is_some() {
                self.emit();
            }
            data = rest;
        }
    }

    fn emit(&mut self) {
        let hash = (self.nonzero != 0).then(|| *self.hasher.finalize().as_bytes());
        self.chunks.push(Chunk {
            offset: self.offset,
            len: self.len,
            hash,
        });
        self.hasher.reset();
        self.rolling = 0;
        self.offset += self.len;
        self.len = 0;
        self.nonzero = 0;
    }

    fn finish(mut self) -> Vec<Chunk> {
        if self.len > 0 {
            self.emit();
        }
        self.chunks
    }
}

// ---------------------------------------------------------------- deltas

fn delta_table(
    label: &str,
    old: &Path,
    new: &Path,
    old_scan: &Scan,
    new_scan: &Scan,
) -> Result<(), String> {
    println!(
        "### {label}\n\nA = `{}` ({} MiB), B = `{}` ({} MiB). \"Sent\": B's data bytes in chunks \
         whose hash is not among A's; \"distinct\" counts each such hash once (what a delta \
         transfer that sends a chunk once would send). \"Wire\" adds B's manifest to the \
         distinct bytes. \"Runs\": stretches of consecutive sent chunks in B, the requests a \
         transfer needs if it asks for each stretch as one range.\n",
        old.display(),
        fmt_int(old_scan.len / MIB),
        new.display(),
        fmt_int(new_scan.len / MIB),
    );
    println!(
        "| chunking | B's data (MiB) | sent (MiB) | sent, % of B's data | distinct sent (MiB) | runs | \
         B's holes (MiB) | holes, % of B | B's chunks | B's manifest (KiB) | \
         manifest per GiB of B (bytes) | wire (MiB) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let file = File::open(new).map_err(|e| format!("cannot open {}: {e}.", new.display()))?;
    let mut compressor =
        zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(|e| format!("cannot start zstd: {e}."))?;
    let mut buf = Vec::new();
    let mut second = Vec::new();
    for (a, b) in old_scan.chunkings.iter().zip(&new_scan.chunkings) {
        let known: HashSet<&Hash> = a.chunks.iter().filter_map(|c| c.hash.as_ref()).collect();
        let mut sent_once: HashSet<&Hash> = HashSet::new();
        let (mut data, mut holes, mut sent, mut distinct) = (0u64, 0u64, 0u64, 0u64);
        let (mut data_chunks, mut hole_chunks, mut runs) = (0u64, 0u64, 0u64);
        // After zstd-1: the smaller of compressed and raw; as the protocol frames it.
        let (mut packed, mut framed) = (0u64, 0u64);
        let mut previous_sent = false;
        for chunk in &b.chunks {
            let mut this_sent = false;
            match &chunk.hash {
                None => {
                    holes += chunk.len;
                    hole_chunks += 1;
                }
                Some(hash) => {
                    data += chunk.len;
                    data_chunks += 1;
                    if !known.contains(hash) {
                        this_sent = true;
                        sent += chunk.len;
                        if sent_once.insert(hash) {
                            distinct += chunk.len;
                            buf.resize(chunk.len as usize, 0);
                            file.read_exact_at(&mut buf, chunk.offset).map_err(|e| {
                                format!("cannot read {} at {}: {e}.", new.display(), chunk.offset)
                            })?;
                            let compressed = compressor
                                .compress(&buf)
                                .map_err(|e| format!("zstd failed: {e}."))?
                                .len() as u64;
                            packed += compressed.min(chunk.len);
                            let worth = chunk.len - chunk.len / 16;
                            framed += FRAME_HEADER
                                + if compressed < worth {
                                    compressed
                                } else {
                                    chunk.len
                                };
                        }
                    }
                }
            }
            if this_sent && !previous_sent {
                runs += 1;
            }
            previous_sent = this_sent;
        }
        let manifest = data_chunks * HASH_ENTRY + hole_chunks * HOLE_ENTRY;
        let mut chunking = b.label.clone();
        if b.label == size_label(SIZES[0]) {
            chunking.push_str(" (floor)");
        }
        println!(
            "| {chunking} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            mib(data),
            mib(sent),
            percent(sent, data),
            mib(distinct),
            fmt_int(runs),
            mib(holes),
            percent(holes, new_scan.len),
            fmt_int(data_chunks + hole_chunks),
            fmt_int(manifest / KIB),
            fmt_int((manifest as f64 * GIB as f64 / new_scan.len.max(1) as f64) as u64),
            mib(distinct + manifest),
        );
        let index_per_gib = (data_chunks as f64 * GIB as f64 / data.max(1) as f64) as u64;
        second.push(format!(
            "| {chunking} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            mib(distinct),
            mib(packed),
            fmt_int(manifest / KIB),
            mib(packed + manifest),
            percent(packed + manifest, new_scan.len),
            mib(framed + manifest),
            percent(framed + manifest, new_scan.len),
            fmt_int(index_per_gib),
            fmt_int(index_per_gib * INDEX_ENTRY / KIB),
        ));
    }
    println!(
        "\nAfter zstd level 1: each distinct sent chunk compressed alone, the smaller of \
         compressed and raw, plus B's manifest ({HASH_ENTRY} bytes a data chunk, {HOLE_ENTRY} a \
         hole), as a share of B's size ({} MiB). \"Framed\": as the peer protocol sends them, a \
         {FRAME_HEADER}-byte header a chunk and raw unless zstd saves a sixteenth. Index: entries \
         for B's data chunks per GiB of B's data, at {INDEX_ENTRY} bytes an entry.\n",
        mib(new_scan.len)
    );
    println!(
        "| chunking | distinct sent (MiB) | after zstd-1 (MiB) | B's manifest (KiB) | \
         wire after zstd-1 (MiB) | wire after zstd-1, % of B | framed wire (MiB) | \
         framed wire, % of B | index entries per GiB of data | index per GiB of data (KiB) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in second {
        println!("{row}");
    }
    println!();
    Ok(())
}

// ---------------------------------------------------------------- formatting

fn size_label(size: u64) -> String {
    if size >= MIB {
        format!("{} MiB", size / MIB)
    } else {
        format!("{} KiB", size / KIB)
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / MIB as f64)
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".into();
    }
    format!("{:.2} %", part as f64 * 100.0 / whole as f64)
}

/// 1234567 → "1,234,567", as BENCHMARKS.md writes figures.
fn fmt_int(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
