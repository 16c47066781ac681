//! A region's image store: a local directory holding one file per image, named by image id.
//!
//! Files are written to a hidden temporary name first (`.<id>.part`), fsynced, then renamed
//! into place, so a file under an image's name is always complete.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use uuid::Uuid;

use crate::copy::{copy_into, Control, CopyError, Digests, Hashes};

use crate::model::Region;

pub fn image_path(region: &Region, id: Uuid) -> PathBuf {
    region.dir.join(id.to_string())
}

pub fn temp_path(region: &Region, id: Uuid) -> PathBuf {
    region.dir.join(format!(".{id}.part"))
}

/// Whether the region's store can take new images; the reason if not.
pub fn check_writable(region: &Region) -> Result<(), String> {
    let dir = &region.dir;
    match fs::metadata(dir) {
        // No write bit for anyone: the operator froze the region; even root leaves it alone.
        Ok(meta) if meta.is_dir() && meta.permissions().mode() & 0o222 == 0 => {
            return Err(format!(
                "{} is not writable (mode {:o})",
                dir.display(),
                meta.permissions().mode() & 0o7777
            ))
        }
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(format!("{} is not a directory", dir.display())),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
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

/// Streams `source` into the image file for `id` in `region`, computing size, MD5 and SHA-512.
/// On any failure nothing is left under either name.
pub fn write_image(region: &Region, id: Uuid, source: &mut dyn Read) -> io::Result<Digests> {
    let temp = temp_path(region, id);
    let mut control = Control {
        stop: &|| None,
        progress: &mut |_| {},
        limiter: None,
    };
    let both = Hashes {
        sha512: true,
        md5: true,
    };
    let result = copy_into(source, &temp, &mut control, both)
        .map_err(|e| match e {
            CopyError::Io(e) => e,
            CopyError::Stopped(_) => io::Error::other("the copy was stopped"),
        })
        .and_then(|written| {
            fs::rename(&temp, image_path(region, id))?;
            sync_dir(region)?;
            Ok(written)
        });
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Makes renames and removals in the region's directory durable.
pub fn sync_dir(region: &Region) -> io::Result<()> {
    File::open(&region.dir)?.sync_all()
}

/// Removes an image's file; a file already gone is fine.
pub fn remove_image(region: &Region, id: Uuid) -> io::Result<()> {
    match fs::remove_file(image_path(region, id)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
