//! Image bytes between the appliance's buffers and the disk, past the page cache (`O_DIRECT`).
//!
//! An image is large and read or written whole, once at a time: through the page cache it
//! pushes out of memory what the appliance reads often, and on a VM every page of cache it
//! fills may be a page the host must back afresh (here 1.4 s of a CPU per GiB written, 2.8 s
//! per GiB read; BENCHMARKS.md, I1 and I2). A [`Writer`] writes the whole blocks of what it is
//! given with `O_DIRECT`; a [`Reader`] reads what the page cache holds from there and the rest
//! with `O_DIRECT`. That is on the file systems of local disks (ext4, XFS, Btrfs); elsewhere,
//! and where a transfer is refused, both go through the cache.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use crate::copy::Source;

/// Alignment of a direct transfer's buffer, offset and length: a page, so any block size up
/// to one.
const ALIGN: usize = 4096;
/// Most bytes one direct transfer moves.
const MOST: usize = 1 << 20;

/// File systems that take direct transfers as the disk does (ext2/3/4, XFS, Btrfs). Elsewhere
/// the cache is used: on NFS or SMB each direct transfer would be a round trip to the server,
/// FUSE file systems may not honour it, tmpfs is memory already, and ZFS before 2.3 ignores it.
const LOCAL_DISKS: [i64; 3] = [0xEF53, 0x5846_5342, 0x9123_683E];

/// Whether `file` is on one of the [`LOCAL_DISKS`].
fn on_local_disk(file: &File) -> bool {
    // SAFETY: fstatfs on an open descriptor into a zeroed struct that outlives the call.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let kind = fs.f_type as i64;
    rc == 0 && LOCAL_DISKS.contains(&kind)
}

/// `file` opened again with `O_DIRECT` (the same inode, through procfs: its path may have been
/// renamed since), if it is on a local disk's file system; `None` where that cannot be.
fn reopen(file: &File, write: bool) -> Option<File> {
    if !on_local_disk(file) {
        return None;
    }
    std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|e| tracing::debug!("no direct I/O: {e}"))
        .ok()
}

/// Whether `e` says the file system does not take this direct transfer.
fn refused(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// A buffer with an aligned window of [`MOST`] bytes for direct transfers.
struct Staging {
    raw: Vec<u8>,
    start: usize,
}

impl Staging {
    fn new() -> Staging {
        let raw = vec![0u8; MOST + ALIGN];
        let start = (ALIGN - raw.as_ptr() as usize % ALIGN) % ALIGN;
        Staging { raw, start }
    }

    fn window(&mut self, len: usize) -> &mut [u8] {
        &mut self.raw[self.start..self.start + len]
    }
}

/// Direct writes into a file being written: see the module documentation.
pub struct Writer {
    file: File,
    staging: Staging,
}

impl Writer {
    /// For writes into `file`; `None` where its file system takes no direct writes.
    pub fn open(file: &File) -> Option<Writer> {
        Some(Writer {
            file: reopen(file, true)?,
            staging: Staging::new(),
        })
    }

    /// Writes the whole blocks at the head of `bytes` at `offset`, if it is aligned: how many
    /// bytes it wrote (the caller writes the rest through the page cache). `EINVAL`: the file
    /// system refused the write.
    fn write_at(&mut self, bytes: &[u8], offset: u64) -> io::Result<usize> {
        if !offset.is_multiple_of(ALIGN as u64) {
            return Ok(0);
        }
        let whole = bytes.len() / ALIGN * ALIGN;
        let mut done = 0;
        while done < whole {
            let n = (whole - done).min(MOST);
            let window = self.staging.window(n);
            window.copy_from_slice(&bytes[done..done + n]);
            self.file.write_all_at(window, offset + done as u64)?;
            done += n;
        }
        Ok(done)
    }
}

/// Writes `bytes` at `offset` of `out`: their whole blocks through `direct`, the rest through
/// the page cache. A file system that refuses direct writes gets every write through the page
/// cache from then on.
pub fn write_at(
    out: &File,
    direct: &mut Option<Writer>,
    bytes: &[u8],
    offset: u64,
) -> io::Result<()> {
    let mut done = 0;
    if let Some(writer) = direct {
        match writer.write_at(bytes, offset) {
            Ok(n) => done = n,
            Err(e) if refused(&e) => {
                tracing::debug!("no direct writes: {e}");
                *direct = None;
            }
            Err(e) => return Err(e),
        }
    }
    out.write_all_at(&bytes[done..], offset + done as u64)
}

/// Whether every page of the `len` bytes of `file` at `offset` (a multiple of [`ALIGN`]) that
/// the file holds is in the page cache; `false` if that cannot be told.
pub fn resident(file: &File, offset: u64, len: usize) -> bool {
    let size = file.metadata().map_or(0, |m| m.len());
    resident_in(file, size, offset, len)
}

/// [`resident`] of a file of `size` bytes.
fn resident_in(file: &File, size: u64, offset: u64, len: usize) -> bool {
    let (Ok(at), true) = (libc::off_t::try_from(offset), len > 0) else {
        return false;
    };
    let mut pages = vec![0u8; len.div_ceil(ALIGN)];
    // SAFETY: a read-only shared mapping of an open file that is never touched: mincore
    // only writes its pages' residency into `pages` (one byte per page of the mapping), and
    // it is unmapped at once. Pages past the end of the file are not resident.
    let rc = unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            at,
        );
        if map == libc::MAP_FAILED {
            return false;
        }
        let rc = libc::mincore(map, len, pages.as_mut_ptr());
        libc::munmap(map, len);
        rc
    };
    let in_file = size.saturating_sub(offset).div_ceil(ALIGN as u64) as usize;
    rc == 0 && pages[..in_file.min(pages.len())].iter().all(|p| p & 1 == 1)
}

/// Reads an image file: what the page cache holds from there, the rest with `O_DIRECT` (a
/// megabyte at a time, kept for the reads that follow).
pub struct Reader {
    file: File,
    /// The file's size when it was opened (an image file does not change).
    size: u64,
    direct: Option<File>,
    staging: Staging,
    /// The file's bytes in the staging window: from `held_at`, `held` of them.
    held_at: u64,
    held: usize,
    pos: u64,
}

impl Reader {
    pub fn new(file: File) -> Reader {
        Reader {
            direct: reopen(&file, false),
            size: file.metadata().map_or(0, |m| m.len()),
            file,
            staging: Staging::new(),
            held_at: 0,
            held: 0,
            pos: 0,
        }
    }

    /// Copies what the staging window holds at the position into `buf`: how much.
    fn take_staged(&mut self, buf: &mut [u8]) -> usize {
        let end = self.held_at + self.held as u64;
        if self.pos < self.held_at || self.pos >= end {
            return 0;
        }
        let from = (self.pos - self.held_at) as usize;
        let n = (self.held - from).min(buf.len());
        let start = self.staging.start + from;
        buf[..n].copy_from_slice(&self.staging.raw[start..start + n]);
        self.pos += n as u64;
        n
    }
}

impl Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.take_staged(buf);
        if n > 0 {
            return Ok(n);
        }
        let at = self.pos / ALIGN as u64 * ALIGN as u64;
        if let Some(direct) = self
            .direct
            .as_ref()
            .filter(|_| !resident_in(&self.file, self.size, at, MOST))
        {
            match direct.read_at(self.staging.window(MOST), at) {
                Ok(got) => {
                    self.held_at = at;
                    self.held = got;
                    let n = self.take_staged(buf);
                    // Nothing at the position: the end, or a short read (then the cache's).
                    if n > 0 || got == 0 {
                        return Ok(n);
                    }
                }
                Err(e) if refused(&e) => {
                    tracing::debug!("no direct reads: {e}");
                    self.direct = None;
                }
                Err(e) => return Err(e),
            }
        }
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Source for Reader {
    fn as_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn is_hole(&mut self, offset: u64, len: u64) -> bool {
        crate::copy::is_hole(&self.file, offset, len)
    }

    fn skip_to(&mut self, offset: u64) -> io::Result<()> {
        self.pos = offset;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `len` bytes of a pattern, written, made durable and dropped from the page
    /// cache.
    fn uncached_file(dir: &std::path::Path, len: usize) -> (File, Vec<u8>) {
        let data: Vec<u8> = (0..len)
            .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
            .collect();
        let path = dir.join("image");
        std::fs::write(&path, &data).expect("write");
        let file = File::open(&path).expect("open");
        file.sync_all().expect("sync");
        // SAFETY: posix_fadvise on an open descriptor; it only drops clean cached pages.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        (file, data)
    }

    #[test]
    fn only_files_on_a_local_disk_are_moved_past_the_cache() {
        let dir = tempfile::tempdir().expect("temp dir");
        let here = File::create(dir.path().join("f")).expect("file");
        // The temporary directory is on ext4 here and in CI; say so if it is not.
        if !on_local_disk(&here) {
            eprintln!("{} is not on ext4, XFS or Btrfs", dir.path().display());
        }
        assert_eq!(Writer::open(&here).is_some(), on_local_disk(&here));
        // procfs and tmpfs: never.
        let proc = File::open("/proc/self/status").expect("procfs");
        assert!(!on_local_disk(&proc) && Reader::new(proc).direct.is_none());
        if let Ok(shm) = tempfile::tempfile_in("/dev/shm") {
            assert!(Writer::open(&shm).is_none(), "a direct writer on tmpfs");
        }
    }

    #[test]
    fn a_reader_gives_every_byte_from_any_offset_and_leaves_the_page_cache_alone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let len = 3 * MOST + 12_345;
        let (file, data) = uncached_file(dir.path(), len);
        let probe = Reader::new(file.try_clone().expect("clone"));
        let direct = probe.direct.is_some();
        if !direct {
            eprintln!(
                "{} takes no O_DIRECT: only the bytes are checked",
                dir.path().display()
            );
        }
        if direct && (resident(&file, 0, MOST) || resident(&file, 2 * MOST as u64, MOST)) {
            eprintln!("the page cache kept the file: only the bytes are checked");
            return;
        }
        for start in [0, 1, 4096, MOST as u64 - 7, 2 * MOST as u64 + 12_000] {
            let mut reader = Reader::new(file.try_clone().expect("clone"));
            reader.skip_to(start).expect("skip");
            let mut got = Vec::new();
            // Odd-sized reads, so that they straddle the staging window's ends.
            let mut buf = vec![0u8; 100_003];
            loop {
                let n = reader.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert!(got == data[start as usize..], "bytes from {start} differ");
        }
        if direct {
            for offset in [0, MOST as u64, 3 * MOST as u64] {
                assert!(
                    !resident(&file, offset, MOST),
                    "reading filled the page cache at {offset}"
                );
            }
        }
        // Once cached (a plain read), the cache serves the reads.
        let all = std::fs::read(dir.path().join("image")).expect("read");
        assert!(
            resident(&file, MOST as u64, MOST),
            "the probe cannot tell a cached window"
        );
        let mut reader = Reader::new(file);
        let mut got = Vec::new();
        reader.read_to_end(&mut got).expect("read");
        assert!(got == all && all == data);
        assert_eq!(reader.held, 0, "a cached file was read with O_DIRECT");
    }
}
