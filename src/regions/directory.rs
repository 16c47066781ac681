//! A directory region: one file per image, named by image id; the records are the appliance's.
//!
//! A copy writes a hidden temporary file (`.<id>.part`, mode 0600, never through a link),
//! fsyncs it, renames it into place and then checks that the name holds the very file it
//! wrote, so a file under an image's name is always complete and always the verified one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::{ImageStore, Recorded, Sink, StoreError};
use crate::copy::{write_sparse, Chunk, Digests, Hashes};
use crate::disk::Space;
use crate::error::ServiceError;
use crate::model::Image;

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

/// Whether `name` is a temporary file of this module's (`.<uuid>.part`).
fn is_temp_name(name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|rest| rest.strip_suffix(".part"))
        .is_some_and(|id| Uuid::try_parse(id).is_ok())
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

    fn open(&self, image: &Image) -> Result<Box<dyn Read + Send>, StoreError> {
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
        Ok(Box::new(file))
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
        let _ = fs::remove_file(&temp);
        let out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp)
            .map_err(|e| StoreError::io("cannot create the temporary file", e))?;
        let source_has_sha512 =
            source.os_hash_algo.as_deref() == Some("sha512") && source.os_hash_value.is_some();
        Ok(Box::new(DirectorySink {
            store: self,
            id: image.id,
            temp,
            out,
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

    fn sweep(&self) {
        if let Err(why) = self.trusted() {
            tracing::warn!("not cleaning up a region: {why}");
            return;
        }
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            if is_temp_name(&entry.file_name().to_string_lossy()) {
                tracing::info!(file = %entry.path().display(), "removing a leftover temporary file");
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

struct DirectorySink<'a> {
    store: &'a Directory,
    id: Uuid,
    temp: PathBuf,
    out: File,
    hashes: Hashes,
}

impl DirectorySink<'_> {
    fn publish(&self, streamed: &Digests) -> io::Result<()> {
        self.out.set_len(streamed.size)?;
        self.out.sync_all()?;
        Ok(())
    }

    /// Renames the temporary file into place and checks that the name now holds the file
    /// this sink wrote (not one swapped in under the temporary name meanwhile).
    fn rename_into_place(&self) -> Result<(), StoreError> {
        let path = self.store.image_path(self.id);
        fs::rename(&self.temp, &path)
            .map_err(|e| StoreError::io("cannot move the copy into place", e))?;
        let written = self
            .out
            .metadata()
            .map_err(|e| StoreError::io("cannot check the copy", e))?;
        let placed =
            fs::symlink_metadata(&path).map_err(|e| StoreError::io("cannot check the copy", e))?;
        if (placed.dev(), placed.ino()) != (written.dev(), written.ino()) {
            let _ = fs::remove_file(&path);
            return Err(StoreError::Fatal(format!(
                "the temporary file of image {} was replaced by another file during the copy",
                self.id
            )));
        }
        self.store
            .sync()
            .map_err(|e| StoreError::io("cannot move the copy into place", e))
    }
}

impl Sink for DirectorySink<'_> {
    fn hashes(&self) -> Hashes {
        self.hashes
    }

    fn write(&mut self, chunk: &Chunk, offset: u64) -> io::Result<()> {
        write_sparse(&self.out, chunk, offset)
    }

    fn finish(
        self: Box<Self>,
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
        let _ = fs::remove_file(&self.temp);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::{Control, Stop, CHUNK};
    use crate::model::ImageStatus;
    use crate::regions::{transfer, TransferError};
    use md5::Md5;
    use sha2::{Digest, Sha512};

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
        }
    }

    fn never() -> Option<Stop> {
        None
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
        let new = image(id);
        let sink = store.create(&new, &new, &|| false).expect("sink");
        let mut seen = Vec::new();
        let recorded = transfer(
            &mut data.as_slice(),
            sink,
            &mut Control {
                stop: &never,
                progress: &mut |n| seen.push(n),
                limiter: None,
            },
            &|_| Ok(()),
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
    fn a_stop_ends_the_copy_at_a_chunk_boundary_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Directory::new(dir.path());
        let data = vec![7u8; 4 * CHUNK];
        let chunks = std::cell::Cell::new(0);
        let stop = || (chunks.get() >= 2).then_some(Stop::Cancel);
        let new = image(Uuid::new_v4());
        let sink = store.create(&new, &new, &|| false).expect("sink");
        let result = transfer(
            &mut data.as_slice(),
            sink,
            &mut Control {
                stop: &stop,
                progress: &mut |_| chunks.set(chunks.get() + 1),
                limiter: None,
            },
            &|_| Ok(()),
        );
        assert!(matches!(result, Err(TransferError::Stopped(Stop::Cancel))));
        assert_eq!(chunks.get(), 2);
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 0);
    }

    #[test]
    fn a_copy_that_fails_verification_is_not_published() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Directory::new(dir.path());
        let new = image(Uuid::new_v4());
        let sink = store.create(&new, &new, &|| false).expect("sink");
        let result = transfer(
            &mut [1u8; 100].as_slice(),
            sink,
            &mut Control {
                stop: &never,
                progress: &mut |_| {},
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
    fn sweep_removes_only_its_own_temporary_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Directory::new(dir.path());
        let ours = format!(".{}.part", Uuid::new_v4());
        for name in [ours.as_str(), ".notes.part", ".x.part", "keep"] {
            fs::write(dir.path().join(name), b"x").expect("write");
        }
        store.sweep();
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".notes.part", ".x.part", "keep"]);
    }
}
