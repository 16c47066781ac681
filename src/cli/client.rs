//! How an admin command runs: through the running server's admin socket, or on the store
//! itself when no server runs (the same service functions either way).

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use crate::admin::{self, Reply, Request};
use crate::server;
use crate::service::Service;
use crate::store::{OpenError, StoreConfig};

/// Sends the request to the running server, or runs it on the store when none runs. `input`
/// follows the request (a seed's file, streamed: never read whole).
pub fn call(
    data_dir: &Path,
    config: &StoreConfig,
    request: Request,
    input: &mut dyn Read,
) -> Result<Reply, String> {
    if let Some(stream) = admin::connect(data_dir)? {
        return admin::send_with(stream, &request, input)?.map_err(|e| e.to_string());
    }
    if matches!(request, Request::Status) {
        return Err(format!("no server is running on {}", data_dir.display()));
    }
    if !data_dir.is_dir() {
        if !matches!(request, Request::RegionAdd { .. }) {
            return Err(format!(
                "there is no data directory {}; start with `image-replicator region add`, or pass --data-dir",
                data_dir.display()
            ));
        }
        server::create_data_dir(data_dir)
            .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    }
    let acting_as = act_as_owner(data_dir)?;
    let store =
        server::open_store(data_dir, config, Duration::from_secs(2)).map_err(|e| match e {
            OpenError::Locked(path) => format!(
                "the store {path} is locked by another process, but no server answers on {}; \
             if a server is starting or stopping, try again",
                admin::socket_path(data_dir).display()
            ),
            other => match acting_as {
                Some(uid) => format!(
                    "{other} (root acts as uid {uid}, the owner of {}: what that uid cannot read \
                 or write there, such as files of root's, must be chowned to it)",
                    data_dir.display()
                ),
                None => other.to_string(),
            },
        })?;
    let svc = Service::new(store, super::args::absolute(data_dir)?);
    admin::execute(&svc, request, None, input).map_err(|e| e.to_string())
}

/// Root administering the data directory of a stopped service that runs as another user acts
/// as that user (its uid, its gid, no other groups) from here on: whatever the command creates
/// (the store's files, region directories) is then the service's, which root-owned files would
/// not be (the service could not open its store or write its regions). The files the command
/// reads afterwards (`image import`'s) must be readable by that user, as they must be when the
/// service runs and does the import itself.
/// Returns the uid it acts as, if it switched.
fn act_as_owner(data_dir: &Path) -> Result<Option<u32>, String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let Ok(meta) = std::fs::symlink_metadata(data_dir) else {
        return Ok(None);
    };
    if !meta.is_dir() || meta.uid() == 0 {
        return Ok(None);
    }
    let (uid, gid) = (meta.uid(), meta.gid());
    // SAFETY: setgroups reads one gid from the pointer given; setgid and setuid take values.
    // Groups and gid go first: after setuid root's right to change them is gone.
    let failed = unsafe {
        libc::setgroups(1, &gid) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0
    };
    if failed {
        return Err(format!(
            "cannot act as uid {uid}, the owner of {}: {}",
            data_dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    tracing::info!(uid, gid, "acting as the owner of the data directory");
    Ok(Some(uid))
}
