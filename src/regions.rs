//! A region's image store: a local directory holding one file per image, named by image id.
//!
//! Files are written to a hidden temporary name first (`.<id>.part`), fsynced, then renamed
//! into place, so a file under an image's name is always complete.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use md5::Md5;
use sha2::{Digest, Sha512};
use uuid::Uuid;

use crate::model::Region;

/// Read and write unit of image copies.
pub const CHUNK: usize = 1 << 20;

/// What streaming an image's bytes yields.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub size: u64,
    /// MD5, hex (Glance's `checksum`).
    pub md5: String,
    /// SHA-512, hex (Glance's `os_hash_value`).
    pub sha512: String,
}

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
pub fn write_image(region: &Region, id: Uuid, source: &mut impl Read) -> io::Result<Written> {
    let temp = temp_path(region, id);
    let result = copy_hashed(source, &temp).and_then(|written| {
        fs::rename(&temp, image_path(region, id))?;
        File::open(&region.dir)?.sync_all()?;
        Ok(written)
    });
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

fn copy_hashed(source: &mut impl Read, dest: &Path) -> io::Result<Written> {
    let mut out = File::create_new(dest)?;
    let (mut md5, mut sha512) = (Md5::new(), Sha512::new());
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let chunk = &buf[..n];
        md5.update(chunk);
        sha512.update(chunk);
        out.write_all(chunk)?;
        size += n as u64;
    }
    out.sync_all()?;
    Ok(Written {
        size,
        md5: crate::auth::to_hex(&md5.finalize()),
        sha512: crate::auth::to_hex(&sha512.finalize()),
    })
}

/// Removes an image's file; a file already gone is fine.
pub fn remove_image(region: &Region, id: Uuid) -> io::Result<()> {
    match fs::remove_file(image_path(region, id)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
