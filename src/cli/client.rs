//! How an admin command runs: through the running server's admin socket, or on the store
//! itself when no server runs (the same service functions either way).

use std::path::Path;
use std::time::Duration;

use crate::admin::{self, Reply, Request};
use crate::server;
use crate::service::Service;
use crate::store::OpenError;

/// Sends the request to the running server, or runs it on the store when none runs.
pub fn call(data_dir: &Path, request: Request) -> Result<Reply, String> {
    if let Some(stream) = admin::connect(data_dir)? {
        return admin::send(stream, &request)?.map_err(|e| e.to_string());
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
    let store = server::open_store(data_dir, Duration::from_secs(2)).map_err(|e| match e {
        OpenError::Locked(path) => format!(
            "the store {path} is locked by another process, but no server answers on {}; \
             if a server is starting or stopping, try again",
            admin::socket_path(data_dir).display()
        ),
        other => other.to_string(),
    })?;
    let svc = Service::new(store, super::args::absolute(data_dir)?);
    admin::execute(&svc, request, None).map_err(|e| e.to_string())
}
