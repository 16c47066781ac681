//! The file systems the appliance writes (its data directory, directory regions): how much
//! room they have, and whether an error means they are full.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The room on a file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Bytes an unprivileged process may still write.
    pub free: u64,
    /// The file system's size.
    pub total: u64,
    /// The file system's device number: stores on one file system share its room.
    pub device: u64,
}

/// The room on the file system holding `path` (statvfs; the device from stat).
pub fn space_of(path: &Path) -> io::Result<Space> {
    let mut c_path = path.as_os_str().as_bytes().to_vec();
    c_path.push(0);
    if c_path[..c_path.len() - 1].contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path holds a NUL byte",
        ));
    }
    // SAFETY: statvfs only writes the struct passed; `c_path` is NUL-terminated and outlives
    // the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr().cast(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let block = st.f_frsize as u64;
    Ok(Space {
        free: (st.f_bavail as u64).saturating_mul(block),
        total: (st.f_blocks as u64).saturating_mul(block),
        device: std::fs::metadata(path)?.dev(),
    })
}

/// ENOSPC, or EDQUOT (a quota is a full disk for this process).
pub fn is_disk_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || e.kind() == io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}
