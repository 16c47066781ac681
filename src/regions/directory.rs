//! A directory region: one file per image, named by image id; the records are the appliance's.
//!
//! A copy writes a hidden temporary file (`.<id>.part`, mode 0600, never through a link),
//! fsyncs it, renames it into place and then checks that the name holds the very file it
//! wrote, so a file under an image's name is always complete and always the verified one.
//! An interrupted copy's temporary file stays for its job to resume: the next attempt checks
//! its chunks against the manifest it is given and keeps only the verified ones. An upload
//! of the peer protocol writes the same file at its chunks' offsets ([`Part`]) and publishes
//! it the same way.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use super::{ImageStore, Part, Recorded, Sink, StoreError};
use crate::copy::{is_hole, write_sparse, Chunk, Digests, Hashes, Output, Source};
use crate::direct;
use crate::disk::Space;
use crate::error::ServiceError;
use crate::manifest::{Entry, Manifest, CHUNK_SIZE};
use crate::model::Image;
use crate::reuse::Reflinks;

pub struct Directory {
    dir: PathBuf,
}

impl Directory {
    pub fn new(dir: &Path) -> Directory {
        Directory {
            dir: dir.to_path_buf(),
        }
    }

    fn image_path(&self, id: Uuid) -> PathBuf {
        self.dir.join(id.to_string())
    }

    fn temp_path(&self, id: Uuid) -> PathBuf {
        self.dir.join(format!(".{id}.part"))
    }

    /// Makes renames and removals in the directory durable.
    fn sync(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    /// The directory is followed only if this appliance's user (or root) made it and the
    /// link to it, if it is one: a link or a directory another user planted at the region's
    /// path would let that user read what copies write, or have the appliance read and delete
    /// files of theirs. The directory's metadata (through the link).
    fn trusted(&self) -> Result<fs::Metadata, String> {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let ours = |uid: u32| uid == me || uid == 0;
        let shown = self.dir.display();
        let link = fs::symlink_metadata(&self.dir).map_err(|e| format!("{shown}: {e}"))?;
        if link.file_type().is_symlink() && !ours(link.uid()) {
            return Err(format!(
                "{shown} is a symbolic link of uid {}, not of this appliance's user, and is not followed",
                link.uid()
            ));
        }
        let target = if link.file_type().is_symlink() {
            fs::metadata(&self.dir).map_err(|e| format!("{shown}: {e}"))?
        } else {
            link
        };
        if !ours(target.uid()) {
            return Err(format!(
                "{shown} belongs to uid {}, not to this appliance's user, and is not used",
                target.uid()
            ));
        }
        Ok(target)
    }
}

/// The image whose temporary file `name` is, if it is one of this module's (`.<uuid>.part`).
fn temp_id(name: &str) -> Option<Uuid> {
    name.strip_prefix('.')
        .and_then(|rest| rest.strip_suffix(".part"))
        .and_then(|id| Uuid::try_parse(id).ok())
}

/// The partial file at `temp`: the one an interrupted copy or upload left if this module made
/// it ([`reopen`]; then `true`), else a new empty one (mode 0600, never through a link).
fn reopen_or_create(temp: &Path) -> Result<(File, bool), StoreError> {
    if let Some(file) = reopen(temp) {
        return Ok((file, true));
    }
    let _ = fs::remove_file(temp);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(temp)
        .map_err(|e| StoreError::io("cannot create the partial file", e))?;
    Ok((file, false))
}

/// An interrupted copy's temporary file, to resume into: only a regular file of this
/// appliance's user with one link and mode 0600 (never through a link), as this module makes
/// them; anything else is not trusted and is replaced.
fn reopen(temp: &Path) -> Option<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(temp)
        .ok()?;
    let meta = file.metadata().ok()?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    (meta.is_file() && meta.uid() == me && meta.nlink() == 1 && meta.mode() & 0o7777 == 0o600)
        .then_some(file)
}

impl ImageStore for Directory {
    fn probe(&self) -> Result<(), String> {
        let meta = self.trusted()?;
        let dir = &self.dir;
        if !meta.is_dir() {
            return Err(format!("{} is not a directory", dir.display()));
        }
        // No write bit for anyone: the operator froze the region; even root leaves it alone.
        if meta.permissions().mode() & 0o222 == 0 {
            return Err(format!(
                "{} is not writable (mode {:o})",
                dir.display(),
                meta.permissions().mode() & 0o7777
            ));
        }
        let mut c_path = dir.as_os_str().as_bytes().to_vec();
        c_path.push(0);
        // SAFETY: c_path is a NUL-terminated byte string that outlives the call.
        let rc = unsafe { libc::access(c_path.as_ptr().cast(), libc::W_OK | libc::X_OK) };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!(
                "{} is not writable: {}",
                dir.display(),
                io::Error::last_os_error()
            ))
        }
    }

    fn prepare(&self) -> crate::error::Result<()> {
        if !self.dir.is_absolute() {
            return Err(ServiceError::BadRequest(format!(
                "region directory {} must be an absolute path",
                self.dir.display()
            )));
        }
        fs::create_dir_all(&self.dir).map_err(|e| {
            ServiceError::Conflict(format!(
                "cannot create region directory {}: {e}",
                self.dir.display()
            ))
        })
    }

    fn open(&self, image: &Image, offset: u64) -> Result<Box<dyn Source>, StoreError> {
        self.trusted().map_err(|why| {
            StoreError::Fatal(format!(
                "the image store of source region {} is unusable: {why}",
                image.region
            ))
        })?;
        let path = self.image_path(image.id);
        let file = File::open(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                StoreError::Fatal(format!(
                    "the data of source image {} is missing ({})",
                    image.id,
                    path.display()
                ))
            } else {
                StoreError::io("cannot open the source image", e)
            }
        })?;
        let mut source = direct::Reader::new(file);
        source
            .skip_to(offset)
            .map_err(|e| StoreError::io("cannot read the source image", e))?;
        Ok(Box::new(source))
    }

    fn create<'a>(
        &'a self,
        image: &Image,
        source: &Image,
        _stopping: &'a dyn Fn() -> bool,
    ) -> Result<Box<dyn Sink + 'a>, StoreError> {
        self.probe().map_err(|why| {
            StoreError::Fatal(format!(
                "the image store of destination region {} is unusable: {why}",
                image.region
            ))
        })?;
        let temp = self.temp_path(image.id);
        let (out, unchecked) = reopen_or_create(&temp)?;
        let source_has_sha512 =
            source.os_hash_algo.as_deref() == Some("sha512") && source.os_hash_value.is_some();
        Ok(Box::new(DirectorySink {
            store: self,
            id: image.id,
            temp,
            direct: direct::Writer::open(&out),
            out,
            unchecked,
            reflinks: Arc::new(Reflinks::default()),
            can_reflink: true,
            // SHA-512 for the record; MD5 too when that is all the source has to compare.
            hashes: Hashes {
                sha512: true,
                md5: !source_has_sha512,
            },
        }))
    }

    fn remove(&self, id: Uuid) -> Result<(), StoreError> {
        self.trusted().map_err(StoreError::Fatal)?;
        let _ = fs::remove_file(self.temp_path(id));
        match fs::remove_file(self.image_path(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(StoreError::io(
                    &format!("cannot remove the file of image {id}"),
                    e,
                ))
            }
            _ => {}
        }
        let _ = self.sync();
        Ok(())
    }

    fn space(&self) -> Option<Space> {
        crate::disk::space_of(&self.dir).ok()
    }

    fn sweep(&self, keep: &HashSet<Uuid>) {
        if let Err(why) = self.trusted() {
            tracing::warn!("not cleaning up a region: {why}");
            return;
        }
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if temp_id(&name).is_some_and(|id| !keep.contains(&id)) {
                tracing::info!(file = %entry.path().display(), "removing a leftover temporary file");
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    fn part(&self, image: &Image) -> Option<Result<Box<dyn Part>, StoreError>> {
        Some(
            self.open_part(image.id)
                .map(|p| Box::new(p) as Box<dyn Part>),
        )
    }
}

impl Directory {
    /// Renames the temporary file of image `id`, open as `out`, into place, and checks that
    /// the name now holds that file (not one swapped in under the temporary name meanwhile).
    fn place(&self, id: Uuid, out: &File) -> Result<(), StoreError> {
        let path = self.image_path(id);
        fs::rename(self.temp_path(id), &path)
            .map_err(|e| StoreError::io("cannot move the copy into place", e))?;
        let written = out
            .metadata()
            .map_err(|e| StoreError::io("cannot check the copy", e))?;
        let placed =
            fs::symlink_metadata(&path).map_err(|e| StoreError::io("cannot check the copy", e))?;
        if (placed.dev(), placed.ino()) != (written.dev(), written.ino()) {
            let _ = fs::remove_file(&path);
            return Err(StoreError::Fatal(format!(
                "the temporary file of image {id} was replaced by another file during the copy"
            )));
        }
        self.sync()
            .map_err(|e| StoreError::io("cannot move the copy into place", e))
    }

    /// An upload's partial file: the one an earlier upload left if this module made it
    /// ([`reopen`]), else a new empty one.
    fn open_part(&self, id: Uuid) -> Result<DirectoryPart, StoreError> {
        self.probe()
            .map_err(|why| StoreError::Fatal(format!("the image store is unusable: {why}")))?;
        let temp = self.temp_path(id);
        let (file, _) = reopen_or_create(&temp)?;
        Ok(DirectoryPart {
            store: Directory::new(&self.dir),
            id,
            file,
        })
    }
}

/// An upload's `.<id>.part` file.
struct DirectoryPart {
    store: Directory,
    id: Uuid,
    file: File,
}

impl Part for DirectoryPart {
    fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        if is_hole(&self.file, offset, bytes.len() as u64) {
            write_sparse(&self.file, &mut None, bytes, offset)
        } else {
            // Skipping zero blocks would leave what the file held there.
            self.file.write_all_at(bytes, offset)
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = self.file.metadata()?.len();
        buf.fill(0);
        let n = len.saturating_sub(offset).min(buf.len() as u64) as usize;
        self.file.read_exact_at(&mut buf[..n], offset)
    }

    fn is_hole(&self, offset: u64, len: u64) -> bool {
        let past_end = self.file.metadata().is_ok_and(|m| m.len() <= offset);
        past_end || is_hole(&self.file, offset, len)
    }

    fn publish(self: Box<Self>, size: u64) -> Result<(), StoreError> {
        let failed = |e| StoreError::io("cannot make the upload durable", e);
        self.file.set_len(size).map_err(failed)?;
        self.file.sync_all().map_err(failed)?;
        self.store.place(self.id, &self.file)
    }
}

struct DirectorySink<'a> {
    store: &'a Directory,
    id: Uuid,
    temp: PathBuf,
    out: File,
    /// `out` again, for direct writes, where the file system takes them.
    direct: Option<direct::Writer>,
    /// The file is as an interrupted copy left it: nothing in it is trusted until
    /// [`Sink::resume`] checks it, and a copy that does not resume empties it first (zero
    /// blocks are not written, so old bytes would stay where the image has zeros).
    unchecked: bool,
    /// Local chunks the copy took, to be shared with a reflink rather than written, while
    /// the file system takes reflinks.
    reflinks: Arc<Reflinks>,
    can_reflink: bool,
    hashes: Hashes,
}

impl DirectorySink<'_> {
    fn trust_nothing(&mut self) -> io::Result<()> {
        if self.unchecked {
            self.out.set_len(0)?;
            self.unchecked = false;
        }
        Ok(())
    }

    fn publish(&mut self, streamed: &Digests) -> io::Result<()> {
        self.trust_nothing()?;
        self.out.set_len(streamed.size)?;
        self.out.sync_all()?;
        Ok(())
    }

    /// Renames the temporary file into place and checks that the name now holds the file
    /// this sink wrote (not one swapped in under the temporary name meanwhile).
    fn rename_into_place(&self) -> Result<(), StoreError> {
        self.store.place(self.id, &self.out)
    }
}

impl DirectorySink<'_> {
    /// Shares the `len` bytes at `from` of `file` as the bytes at `at` (FICLONERANGE, on file
    /// systems with reflinks such as XFS and Btrfs); false if it cannot, and from then on
    /// nothing is tried again.
    fn share(&mut self, file: &File, from: u64, at: u64, len: usize) -> bool {
        use std::os::fd::AsRawFd;
        if !self.can_reflink || len != CHUNK_SIZE {
            return false;
        }
        let range = libc::file_clone_range {
            src_fd: i64::from(file.as_raw_fd()),
            src_offset: from,
            src_length: len as u64,
            dest_offset: at,
        };
        // SAFETY: an ioctl on two open descriptors with a struct of the kernel's layout that
        // outlives the call; it only shares blocks of one file into the other.
        let done = unsafe { libc::ioctl(self.out.as_raw_fd(), libc::FICLONERANGE, &range) } == 0;
        if !done {
            tracing::debug!(
                "no reflinks into {}: {}",
                self.temp.display(),
                io::Error::last_os_error()
            );
            self.can_reflink = false;
        }
        done
    }
}

impl Output for DirectorySink<'_> {
    fn write(&mut self, chunk: &Chunk, offset: u64) -> io::Result<()> {
        self.trust_nothing()?;
        // Chunks taken from local files are shared where the file system can; the rest is
        // written, runs at a time.
        let first = (offset / CHUNK_SIZE as u64) as usize;
        let mut run: Option<usize> = None;
        for (i, part) in chunk.chunks(CHUNK_SIZE).enumerate() {
            let at = offset + (i * CHUNK_SIZE) as u64;
            let shared = match self.reflinks.take(first + i) {
                Some((file, from)) => self.share(&file, from, at, part.len()),
                None => false,
            };
            match (shared, run) {
                (false, None) => run = Some(i),
                (true, Some(start)) => {
                    let end = i * CHUNK_SIZE;
                    write_sparse(
                        &self.out,
                        &mut self.direct,
                        &chunk[start * CHUNK_SIZE..end],
                        offset + (start * CHUNK_SIZE) as u64,
                    )?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run {
            write_sparse(
                &self.out,
                &mut self.direct,
                &chunk[start * CHUNK_SIZE..],
                offset + (start * CHUNK_SIZE) as u64,
            )?;
        }
        if self.direct.is_none() {
            start_writeback(&self.out, offset, chunk.len());
        }
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.out.sync_data()
    }
}

/// Starts writing `len` bytes at `offset` to the disk now, without waiting, so that the fsync
/// before the image is published finds little left to write (the copy and the disk overlap).
fn start_writeback(file: &File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return;
    };
    // SAFETY: sync_file_range on an open descriptor; it only schedules writeback. A failure
    // is harmless: the fsync before publishing writes whatever is left.
    unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
}

impl Sink for DirectorySink<'_> {
    fn hashes(&self) -> Hashes {
        self.hashes
    }

    fn reflinks(&self) -> Option<Arc<Reflinks>> {
        Some(Arc::clone(&self.reflinks))
    }

    fn reads_a_local_file(&mut self) {
        self.direct = None;
    }

    fn resume(&mut self, reference: &Manifest) -> Result<(usize, u64), StoreError> {
        let failed = |e| StoreError::io("cannot check the partial copy", e);
        let held = self.out.metadata().map_err(failed)?.len();
        let mut verified = 0;
        let mut buf = Vec::new();
        for (i, want) in reference.chunks.iter().enumerate() {
            let (offset, len) = (reference.offset(i), reference.chunk_len(i));
            // Zeros past the end are held: the file is extended over them (a hole).
            if offset + len as u64 > held && *want != Entry::Hole {
                break;
            }
            let got = if *want == Entry::Hole && is_hole(&self.out, offset, len as u64) {
                Entry::Hole
            } else {
                buf.resize(len, 0);
                self.out.read_exact_at(&mut buf, offset).map_err(failed)?;
                Entry::of(&buf)
            };
            if got != *want {
                break;
            }
            verified = i + 1;
        }
        // What follows the verified chunks is not trusted: gone, so holes stay holes.
        let keep = reference.offset(verified).min(reference.size);
        self.out.set_len(keep).map_err(failed)?;
        self.unchecked = false;
        Ok((verified, held))
    }

    fn prefix(&self, len: u64) -> Option<Box<dyn Read>> {
        let mut file = self.out.try_clone().ok()?;
        file.skip_to(0).ok()?;
        Some(Box::new(file.take(len)))
    }

    fn finish(
        mut self: Box<Self>,
        streamed: &Digests,
        verify: &dyn Fn(&Recorded) -> Result<(), StoreError>,
    ) -> Result<Recorded, StoreError> {
        let recorded = Recorded {
            size: streamed.size,
            checksum: streamed.md5.clone(),
            os_hash_algo: Some("sha512".into()),
            os_hash_value: streamed.sha512.clone(),
        };
        let done = self
            .publish(streamed)
            .map_err(|e| StoreError::io("copy failed", e))
            .and_then(|()| verify(&recorded))
            .and_then(|()| self.rename_into_place());
        if done.is_err() {
            let _ = fs::remove_file(&self.temp);
        }
        done.map(|()| recorded)
    }

    fn abort(self: Box<Self>) -> Option<StoreError> {
        // The temporary file stays for a resume; the job's ending removes it.
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::{Control, Plan, Progress, Stop};
    use crate::manifest::CHUNK_SIZE as CHUNK;
    use crate::manifest::{self, Entry};
    use crate::model::ImageStatus;
    use crate::regions::{transfer, TransferError};
    use md5::Md5;
    use sha2::{Digest, Sha512};
    use std::cell::Cell;
    use std::io::Cursor;

    fn image(id: Uuid) -> Image {
        Image {
            id,
            name: "i".into(),
            owner: "o".into(),
            region: "r".into(),
            status: ImageStatus::Saving,
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

    fn never() -> Option<Stop> {
        None
    }

    /// Copies `data` into a new sink of `store` as `plan` says, stopping when `stop` says.
    fn copy_into(
        store: &Directory,
        id: Uuid,
        data: &[u8],
        plan: impl FnOnce(&mut dyn Sink) -> Plan<'static>,
        stop: &dyn Fn() -> Option<Stop>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(Recorded, crate::copy::Copied), TransferError> {
        let source = &mut Cursor::new(data.to_vec());
        copy_from(store, id, source, plan, stop, progress)
    }

    fn copy_from(
        store: &Directory,
        id: Uuid,
        source: &mut dyn Source,
        plan: impl FnOnce(&mut dyn Sink) -> Plan<'static>,
        stop: &dyn Fn() -> Option<Stop>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(Recorded, crate::copy::Copied), TransferError> {
        let new = image(id);
        let mut sink = store.create(&new, &new, &|| false).expect("sink");
        let plan = plan(&mut *sink);
        transfer(
            source,
            sink,
            plan,
            &mut Control {
                stop,
                progress,
                checkpoint: None,
                limiter: None,
            },
            &|_| Ok(()),
        )
    }

    /// Bytes of `chunks` whole chunks and a short one, each chunk different, one all zeros.
    fn sample(chunks: usize) -> Vec<u8> {
        let mut data = vec![0u8; chunks * CHUNK + 12_345];
        for (i, b) in data.iter_mut().enumerate() {
            if i / CHUNK != 1 {
                *b = (i % 251) as u8 ^ (i / CHUNK) as u8;
            }
        }
        data
    }

    /// A partial file as an interrupted copy of image `id` leaves it (mode 0600).
    fn plant_partial(store: &Directory, id: Uuid, bytes: &[u8]) {
        fs::write(store.temp_path(id), bytes).expect("partial file");
        fs::set_permissions(store.temp_path(id), fs::Permissions::from_mode(0o600)).expect("mode");
    }

    fn manifest_of(data: &[u8]) -> Manifest {
        let chunks = data.chunks(CHUNK).map(Entry::of).collect();
        manifest::complete(data.len() as u64, Some("s".into()), chunks)
    }

    #[test]
    fn a_copy_keeps_bytes_and_hashes_and_leaves_holes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Directory::new(dir.path());
        let mut data = vec![0u8; 3 * CHUNK + 12_345];
        data[10] = 1;
        data[2 * CHUNK + 7] = 9;
        let last = data.len() - 1;
        data[last] = 5;
        let id = Uuid::new_v4();
        let mut seen = Vec::new();
        let (recorded, copied) = copy_into(
            &store,
            id,
            &data,
            |sink| Plan::whole(sink.hashes()),
            &never,
            &mut |p| seen.push(p.done),
        )
        .expect("copy");
        let path = dir.path().join(id.to_string());
        assert_eq!(fs::read(&path).expect("read dest"), data);
        assert_eq!(recorded.size, data.len() as u64);
        assert_eq!(
            recorded.checksum,
            Some(crate::model::to_hex(&Md5::digest(&data)))
        );
        assert_eq!(
            recorded.os_hash_value,
            Some(crate::model::to_hex(&Sha512::digest(&data)))
        );
        assert_eq!(copied.chunks, manifest_of(&data).chunks);
        assert_eq!(copied.chunks[1], Entry::Hole);
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
        let meta = fs::metadata(&path).expect("metadata");
        assert!(
            meta.blocks() * 512 < (CHUNK as u64),
            "holes were written: {} blocks",
            meta.blocks()
        );
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(!store.temp_path(id).exists());
    }

    #[test]
    fn a_copy_writes_past_the_page_cache_where_the_file_system_takes_direct_writes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let probe = File::create(dir.path().join("probe")).expect("probe file");
        let direct = direct::Writer::open(&probe).is_some();
        if !direct {
            eprintln!(
                "{} takes no O_DIRECT: only the bytes are checked",
                dir.path().display()
            );
        }
        let store = Directory::new(dir.path());
        // Whole blocks, and a tail of 12,345 bytes that is not one (written through the cache).
        let data = sample(40);
        let id = Uuid::new_v4();
        copy_into(
            &store,
            id,
            &data,
            |s| Plan::whole(s.hashes()),
            &never,
            &mut |_| {},
        )
        .expect("copy");
        let file = File::open(dir.path().join(id.to_string())).expect("copy's file");
        if direct {
            for offset in [0, 5 * CHUNK as u64 + 4096, 39 * CHUNK as u64] {
                assert!(
                    !direct::resident(&file, offset, 4096),
                    "byte {offset} went through the page cache"
                );
            }
        }
        assert_eq!(
            fs::read(dir.path().join(id.to_string())).expect("read"),
            data
        );
        assert!(
            direct::resident(&file, 0, 4096),
            "the probe cannot tell a cached page"
        );
    }

    #[test]
    fn a_copy_from_a_local_file_writes_through_the_page_cache() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Directory::new(dir.path());
        let data = sample(40);
        fs::write(dir.path().join("source"), &data).expect("source");
        let mut source = direct::Reader::new(File::open(dir.path().join("source")).expect("open"));
        let id = Uuid::new_v4();
        copy_from(
            &store,
            id,
            &mut source,
            |s| Plan::whole(s.hashes()),
            &never,
            &mut |_| {},
        )
        .expect("copy");
        let file = File::open(dir.path().join(id.to_string())).expect("copy's file");
        for offset in [0, 5 * CHUNK as u64 + 4096, 39 * CHUNK as u64] {
            assert!(
                direct::resident(&file, offset, 4096),
                "byte {offset} of a local copy went past the page cache"
            );
        }
        assert!(fs::read(dir.path().join(id.to_string())).expect("read") == data);
    }

    #[test]
    fn a_stopped_copy_resumes_after_its_verified_chunks_and_reads_only_the_rest() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Directory::new(dir.path());
        // 64 chunks and a short one: five reads of up to 16 chunks.
        let data = sample(64);
        let m = manifest_of(&data);
        let id = Uuid::new_v4();
        let chunks = Cell::new(0);
        // Reads: chunk 0, chunk 1 (zeros), chunks 2 to 17; then the stop.
        let stop = || (chunks.get() >= 3).then_some(Stop::Shutdown);
        let first = copy_into(
            &store,
            id,
            &data,
            |_| Plan {
                manifest: Some(Box::leak(Box::new(m.clone()))),
                done: Vec::new(),
                hashes: Hashes {
                    sha512: false,
                    md5: false,
                },
                prefix: None,
            },
            &stop,
            &mut |_| chunks.set(chunks.get() + 1),
        );
        assert!(matches!(first, Err(TransferError::Stopped(Stop::Shutdown))));
        assert!(store.temp_path(id).exists(), "the partial file stays");
        let mut done = 0;
        let (_, copied) = copy_into(
            &store,
            id,
            &data,
            |sink| {
                done = sink.resume(&m).expect("resume").0;
                Plan {
                    manifest: Some(Box::leak(Box::new(m.clone()))),
                    done: m.chunks[..done].to_vec(),
                    hashes: sink.hashes(),
                    prefix: None,
                }
            },
            &never,
            &mut |_| {},
        )
        .expect("resumed copy");
        assert_eq!(done, 18);
        assert_eq!(copied.read, data.len() as u64 - 18 * CHUNK as u64);
        assert_eq!(
            fs::read(dir.path().join(id.to_string())).expect("read"),
            data
        );
        assert_eq!(copied.chunks, m.chunks);
    }

    #[test]
    fn a_damaged_chunk_of_a_partial_copy_is_not_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Directory::new(dir.path());
        let data = sample(4);
        let m = manifest_of(&data);
        let id = Uuid::new_v4();
        plant_partial(&store, id, &data[..3 * CHUNK]);
        let new = image(id);
        let mut sink = store.create(&new, &new, &|| false).expect("sink");
        assert_eq!(sink.resume(&m).expect("resume"), (3, 3 * CHUNK as u64));
        drop(sink);
        let file = OpenOptions::new()
            .write(true)
            .open(store.temp_path(id))
            .expect("open");
        file.write_all_at(b"x", 2 * CHUNK as u64 + 100)
            .expect("damage");
        let mut sink = store.create(&new, &new, &|| false).expect("sink");
        assert_eq!(sink.resume(&m).expect("resume").0, 2);
        let len = fs::metadata(store.temp_path(id)).expect("meta").len();
        assert_eq!(
            len,
            2 * CHUNK as u64,
            "what follows the verified part is cut"
        );
        // A partial file another user could have planted (not mode 0600) is not resumed.
        drop(sink);
        fs::set_permissions(store.temp_path(id), fs::Permissions::from_mode(0o644)).expect("mode");
        let mut sink = store.create(&new, &new, &|| false).expect("sink");
        assert_eq!(sink.resume(&m).expect("resume"), (0, 0));
    }

    #[test]
    fn a_copy_that_does_not_resume_keeps_nothing_of_a_leftover_partial_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Directory::new(dir.path());
        let id = Uuid::new_v4();
        plant_partial(&store, id, &vec![0xeeu8; 3 * CHUNK]);
        // Mostly zeros, which are not written: the leftover's bytes must not show through.
        let mut data = vec![0u8; 2 * CHUNK + 10];
        data[CHUNK] = 1;
        copy_into(
            &store,
            id,
            &data,
            |sink| Plan::whole(sink.hashes()),
            &never,
            &mut |_| {},
        )
        .expect("copy");
        assert!(fs::read(dir.path().join(id.to_string())).expect("read") == data);
        let zeros = vec![0u8; 5];
        plant_partial(&store, id, &[0xeeu8; 5]);
        copy_into(
            &store,
            id,
            &zeros,
            |sink| Plan::whole(sink.hashes()),
            &never,
            &mut |_| {},
        )
        .expect("copy of zeros");
        assert_eq!(
            fs::read(dir.path().join(id.to_string())).expect("read"),
            zeros
        );
    }

    #[test]
    fn a_source_that_differs_from_its_manifest_fails_the_copy() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Directory::new(dir.path());
        let data = sample(3);
        let m = manifest_of(&data);
        let mut changed = data.clone();
        changed[2 * CHUNK + 5] ^= 1;
        let result = copy_into(
            &store,
            Uuid::new_v4(),
            &changed,
            |sink| Plan {
                manifest: Some(Box::leak(Box::new(m.clone()))),
                done: Vec::new(),
                hashes: sink.hashes(),
                prefix: None,
            },
            &never,
            &mut |_| {},
        );
        assert!(
            matches!(&result, Err(TransferError::Failed(StoreError::Fatal(why))) if why.contains("chunk 2")),
            "{result:?}"
        );
    }

    #[test]
    fn a_resumed_stream_hashes_the_whole_image() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Directory::new(dir.path());
        let data = sample(3);
        let partial = {
            let mut p = Manifest::new(data.len() as u64);
            p.chunks = manifest_of(&data).chunks[..2].to_vec();
            p
        };
        let id = Uuid::new_v4();
        plant_partial(&store, id, &data[..2 * CHUNK + 10]);
        let (recorded, copied) = copy_into(
            &store,
            id,
            &data,
            |sink| {
                let (n, _) = sink.resume(&partial).expect("resume");
                Plan {
                    manifest: None,
                    done: partial.chunks[..n].to_vec(),
                    hashes: sink.hashes(),
                    prefix: sink.prefix((n * CHUNK) as u64),
                }
            },
            &never,
            &mut |_| {},
        )
        .expect("copy");
        assert_eq!(copied.read, data.len() as u64 - 2 * CHUNK as u64);
        assert_eq!(
            recorded.os_hash_value,
            Some(crate::model::to_hex(&Sha512::digest(&data)))
        );
        assert_eq!(
            fs::read(dir.path().join(id.to_string())).expect("read"),
            data
        );
    }

    #[test]
    fn a_copy_that_fails_verification_is_not_published() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Directory::new(dir.path());
        let new = image(Uuid::new_v4());
        let sink = store.create(&new, &new, &|| false).expect("sink");
        let plan = Plan::whole(sink.hashes());
        let result = transfer(
            &mut Cursor::new(vec![1u8; 100]),
            sink,
            plan,
            &mut Control {
                stop: &never,
                progress: &mut |_| {},
                checkpoint: None,
                limiter: None,
            },
            &|_| Err(StoreError::Fatal("no".into())),
        );
        assert!(matches!(
            result,
            Err(TransferError::Failed(StoreError::Fatal(_)))
        ));
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 0);
    }

    #[test]
    fn a_file_swapped_in_for_the_temporary_file_is_not_published() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Directory::new(dir.path());
        let new = image(Uuid::new_v4());
        let mut sink = store.create(&new, &new, &|| false).expect("sink");
        let chunk: Chunk = std::sync::Arc::new(vec![1u8; 100]);
        sink.write(&chunk, 0).expect("write");
        // Another process replaces the temporary file by name while the copy runs.
        let temp = store.temp_path(new.id);
        fs::remove_file(&temp).expect("remove temp");
        fs::write(&temp, b"forged").expect("plant");
        let streamed = Digests {
            size: 100,
            md5: None,
            sha512: Some("x".into()),
        };
        let result = sink.finish(&streamed, &|_| Ok(()));
        assert!(
            matches!(&result, Err(StoreError::Fatal(why)) if why.contains("replaced")),
            "{result:?}"
        );
        assert!(!dir.path().join(new.id.to_string()).exists());
    }

    #[test]
    fn an_upload_part_takes_chunks_in_any_order_keeps_holes_and_is_published_whole() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Directory::new(dir.path());
        let new = image(Uuid::new_v4());
        let part = store
            .part(&new)
            .expect("a directory has parts")
            .expect("part");
        let size = 4 * CHUNK as u64 + 10;
        part.write_at(&[7u8; 10], 4 * CHUNK as u64).expect("tail");
        part.write_at(&vec![1u8; CHUNK], 0).expect("first");
        assert!(part.is_hole(CHUNK as u64, 3 * CHUNK as u64));
        assert!(!part.is_hole(0, CHUNK as u64));
        let mut buf = vec![9u8; 20];
        part.read_at(&mut buf, 4 * CHUNK as u64)
            .expect("read past the end");
        assert_eq!(buf, [&[7u8; 10][..], &[0u8; 10][..]].concat());
        drop(part);
        // Reopened as it was left; a write over data replaces every byte, zeros included.
        let part = store.part(&new).expect("part").expect("reopened");
        part.write_at(&vec![0u8; CHUNK], 0)
            .expect("zeros over data");
        part.publish(size).expect("publish");
        let data = fs::read(dir.path().join(new.id.to_string())).expect("published");
        let mut want = vec![0u8; size as usize];
        want[4 * CHUNK..].fill(7);
        assert!(data == want);
        assert!(!store.temp_path(new.id).exists());
        // A part another user could have planted is not reopened: a new empty one replaces it.
        let other = image(Uuid::new_v4());
        plant_partial(&store, other.id, b"planted");
        fs::set_permissions(store.temp_path(other.id), fs::Permissions::from_mode(0o644))
            .expect("mode");
        let part = store.part(&other).expect("part").expect("new part");
        assert!(part.is_hole(0, 7));
        assert_eq!(fs::read(store.temp_path(other.id)).expect("new part"), b"");
    }

    #[test]
    fn sweep_removes_only_its_own_temporary_files_but_those_it_is_told_to_keep() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Directory::new(dir.path());
        let (ours, kept) = (Uuid::new_v4(), Uuid::new_v4());
        let (ours, kept_name) = (format!(".{ours}.part"), format!(".{kept}.part"));
        for name in [&ours, &kept_name, ".notes.part", ".x.part", "keep"] {
            fs::write(dir.path().join(name), b"x").expect("write");
        }
        store.sweep(&HashSet::from([kept]));
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want = vec![
            kept_name,
            ".notes.part".into(),
            ".x.part".into(),
            "keep".into(),
        ];
        want.sort();
        assert_eq!(left, want);
    }
}
