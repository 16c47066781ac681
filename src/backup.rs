//! `image-replicator backup FILE` and `restore FILE`: every record of the store (regions,
//! tenants, users, token hashes, image records, chunk manifests, jobs, orphans) as one JSON
//! document with a format version. Image bytes are not in it: they are files in the region
//! directories (or another service's), backed up with the file system.
//!
//! A backup is taken by the running server through its admin socket (or on the store when
//! none runs): the records are read until a whole read saw no job change, so the jobs and
//! the image records they name are from one moment, copies under way included. A restore
//! writes them into an empty data directory only; a copy that was under way resumes from
//! what its destination holds when the restored store is served.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Result, ServiceError};
use crate::model::{
    now, rfc3339, Image, Job, Region, RegionKind, Tenant, TenantKey, TokenRecord, User,
};
use crate::service::Service;

/// What the first key of a backup says it is.
pub const FORMAT: &str = "image-replicator-backup";
/// The backup format this version writes and reads.
pub const VERSION: u32 = 1;
/// Reads of the records before a backup gives up on finding a moment with no job change.
const ATTEMPTS: usize = 50;

/// A backup: the records, and where they came from.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Backup {
    pub format: String,
    pub version: u32,
    /// When it was taken (RFC 3339).
    pub created_at: String,
    /// The data directory it was taken of: directory regions under it are restored under the
    /// new data directory.
    pub data_dir: PathBuf,
    pub regions: Vec<Region>,
    pub tenants: Vec<Tenant>,
    pub users: Vec<User>,
    /// Token records: argon2id hashes and SHA-256 lookups, never the tokens. Secrets all
    /// the same: keep the file as safe as the store.
    pub tokens: Vec<TokenRecord>,
    pub images: Vec<Image>,
    pub manifests: Vec<ManifestRecord>,
    pub jobs: Vec<Job>,
    pub orphans: Vec<(Uuid, String)>,
}

/// An image's encoded chunk manifest, base64.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ManifestRecord {
    pub image: Uuid,
    pub manifest: String,
}

impl Backup {
    /// Every record's kind and id.
    fn ids(&self) -> std::collections::BTreeSet<String> {
        let regions = self.regions.iter().map(|r| format!("region {}", r.id));
        let tenants = self.tenants.iter().map(|t| format!("tenant {}", t.id));
        let users = self.users.iter().map(|u| format!("user {}", u.name));
        let tokens = self.tokens.iter().map(|t| format!("token {}", t.info.id));
        let images = self.images.iter().map(|i| format!("image {}", i.id));
        let manifests = self
            .manifests
            .iter()
            .map(|m| format!("manifest {}", m.image));
        let jobs = self.jobs.iter().map(|j| format!("job {}", j.wire.job_id));
        let orphans = self.orphans.iter().map(|(id, _)| format!("orphan {id}"));
        regions
            .chain(tenants)
            .chain(users)
            .chain(tokens)
            .chain(images)
            .chain(manifests)
            .chain(jobs)
            .chain(orphans)
            .collect()
    }

    /// How many records it holds, for people.
    pub fn summary(&self) -> String {
        format!(
            "{} region(s), {} tenant(s), {} user(s), {} token(s), {} image(s), {} manifest(s), {} job(s)",
            self.regions.len(),
            self.tenants.len(),
            self.users.len(),
            self.tokens.len(),
            self.images.len(),
            self.manifests.len(),
            self.jobs.len()
        )
    }
}

impl Service {
    /// Every record, read until one whole read saw no job change (a copy under way records
    /// its progress once a second; a read takes milliseconds).
    pub fn backup(&self) -> Result<Backup> {
        let store = &self.store;
        for _ in 0..ATTEMPTS {
            let version = store.jobs_version();
            let jobs = store.jobs(&crate::store::JobQuery::all(None), &|_| true)?;
            let images = store.images(None)?;
            let mut manifests = Vec::new();
            for image in &images {
                if let Some(bytes) = store.manifest(image.id)? {
                    manifests.push(ManifestRecord {
                        image: image.id,
                        manifest: base64::engine::general_purpose::STANDARD.encode(bytes),
                    });
                }
            }
            let backup = Backup {
                format: FORMAT.into(),
                version: VERSION,
                created_at: rfc3339(now()),
                data_dir: self.data_dir.clone(),
                regions: store.regions()?,
                tenants: store.tenants()?,
                users: store.users()?,
                tokens: store.tokens()?,
                images,
                manifests,
                jobs,
                orphans: store.orphans()?,
            };
            if store.jobs_version() == version {
                tracing::info!(
                    jobs = backup.jobs.len(),
                    images = backup.images.len(),
                    "backup taken"
                );
                return Ok(backup);
            }
        }
        Err(ServiceError::Unavailable(format!(
            "jobs changed during each of {ATTEMPTS} reads of the store, so no consistent backup could be taken; try again"
        )))
    }

    /// Writes the records of `backup` that this service's store does not hold yet (by id),
    /// keeping their sequence order; how many it wrote. Directory regions keep their paths.
    pub fn add_missing(&self, backup: &Backup) -> Result<usize> {
        let store = &self.store;
        let mut added = 0;
        for region in &backup.regions {
            added += usize::from(store.insert_region(region)?);
        }
        for tenant in &backup.tenants {
            added += usize::from(store.insert_tenant(key(&tenant.id)?, tenant)?);
        }
        for user in &backup.users {
            added += usize::from(store.insert_user(user)?);
        }
        for token in &backup.tokens {
            if store.token(token.info.id)?.is_none() {
                let lookup = token.lookup_key().ok_or_else(|| {
                    ServiceError::BadRequest(format!(
                        "token {} has a malformed lookup",
                        token.info.id
                    ))
                })?;
                store.insert_token(token, &lookup)?;
                added += 1;
            }
        }
        for image in &backup.images {
            if store.image(image.id)?.is_none() {
                store.insert_image(key(&image.owner)?, image)?;
                added += 1;
            }
        }
        for m in &backup.manifests {
            if store.manifest(m.image)?.is_none() {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(&m.manifest)
                    .map_err(|e| {
                        ServiceError::BadRequest(format!(
                            "the manifest of image {} is not base64: {e}",
                            m.image
                        ))
                    })?;
                store.put_manifest(m.image, &bytes)?;
                added += 1;
            }
        }
        let mut jobs = backup.jobs.clone();
        jobs.sort_by_key(|j| j.seq);
        let mut records = Vec::new();
        for mut job in jobs {
            if store.job(job.wire.job_id)?.is_none() {
                job.seq = store.next_seq()?;
                records.push((key(&job.wire.source_tenant_id)?, job));
            }
        }
        added += store.insert_jobs(&records)?;
        let known: std::collections::HashSet<Uuid> =
            store.orphans()?.into_iter().map(|(id, _)| id).collect();
        for (id, region) in &backup.orphans {
            if !known.contains(id) {
                store.add_orphan(*id, region)?;
                added += 1;
            }
        }
        store.flush()?;
        Ok(added)
    }

    /// Writes every record of `backup` into this service's store, which must be empty.
    /// Directory regions under the backup's data directory move under this one; jobs get
    /// new sequence numbers in their old order.
    pub fn restore(&self, backup: &Backup) -> Result<()> {
        let mut moved = backup.clone();
        for region in &mut moved.regions {
            if let RegionKind::Directory { dir } = &region.kind {
                if let Ok(rest) = dir.strip_prefix(&backup.data_dir) {
                    region.kind = RegionKind::Directory {
                        dir: self.data_dir.join(rest),
                    };
                }
                // Its directory exists for the files to be copied into; Glance and peer
                // regions are not contacted.
                if let Ok(images) = self.stores.get(region) {
                    if let Err(e) = images.prepare() {
                        tracing::warn!(region = %region.id, "cannot create the region's directory: {e}");
                    }
                }
            }
        }
        self.add_missing(&moved).map(drop)
    }
}

/// `migrate --to URL`: every record of the data directory's sled store into the database of
/// `target`, with no server running. Records already there (a migrate run before) are left
/// as they are, so it can be run again after a failure; a database holding records that sled
/// does not is refused before anything is written, and at the end the database must hold
/// exactly sled's records (by kind and id). What it did, for people.
pub fn migrate(
    data_dir: &Path,
    target: &crate::store::StoreConfig,
) -> std::result::Result<String, String> {
    let shown = data_dir.display();
    if crate::admin::connect(data_dir)?.is_some() {
        return Err(format!(
            "a server is running on {shown}: stop it first (migrate copies the store offline)"
        ));
    }
    if !data_dir.join("db").is_dir() {
        return Err(format!("there is no sled store in {shown} to migrate"));
    }
    let absolute = std::path::absolute(data_dir).map_err(|e| format!("{shown}: {e}"))?;
    let embedded = crate::store::StoreConfig {
        database_url: None,
        ..target.clone()
    };
    let wait = std::time::Duration::from_secs(2);
    let from = crate::server::open_store(&absolute, &embedded, wait).map_err(|e| e.to_string())?;
    let backup = Service::new(from, absolute.clone())
        .backup()
        .map_err(|e| e.to_string())?;
    let to = crate::server::open_store(&absolute, target, wait).map_err(|e| e.to_string())?;
    let svc = Service::new(to, absolute);
    let ours = backup.ids();
    let before = svc.backup().map_err(|e| e.to_string())?;
    if let Some(record) = before.ids().difference(&ours).next() {
        return Err(format!(
            "the database holds records that are not in {shown} ({record}, of {}): migrate \
             into an empty database",
            before.summary()
        ));
    }
    let added = svc
        .add_missing(&backup)
        .map_err(|e| format!("cannot migrate: {e}"))?;
    let there = svc.backup().map_err(|e| e.to_string())?;
    if there.ids() != ours {
        return Err(format!(
            "the database does not hold what the store holds after the copy: {} in sled, {} \
             there",
            backup.summary(),
            there.summary()
        ));
    }
    Ok(format!(
        "migrated {} into {} ({added} record(s) added now); serve with --database-url",
        backup.summary(),
        crate::store::redacted(target.database_url.as_deref().unwrap_or_default())
    ))
}

fn key(id: &str) -> Result<TenantKey> {
    TenantKey::parse(id).ok_or_else(|| {
        ServiceError::BadRequest(format!("the tenant id '{id}' in the backup is malformed"))
    })
}

/// Writes `backup` to `file` atomically: a temporary file beside it (mode 0600: it holds
/// token hashes), synced, renamed over `file`, and the directory synced.
pub fn write(backup: &Backup, file: &Path) -> std::result::Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let shown = file.display();
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = file
        .file_name()
        .ok_or_else(|| format!("{shown} is not a file name"))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".{}.tmp", std::process::id()));
    let temp = dir.join(temp_name);
    let body = serde_json::to_vec(backup).map_err(|e| format!("cannot encode the backup: {e}"))?;
    let written = (|| -> std::io::Result<()> {
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        out.write_all(&body)?;
        out.write_all(b"\n")?;
        out.sync_all()?;
        std::fs::rename(&temp, file)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        format!("cannot write the backup to {shown}: {e}")
    })
}

/// Reads a backup file, checking what it is and its format version.
pub fn read(file: &Path) -> std::result::Result<Backup, String> {
    let shown = file.display();
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{shown} is not an image-replicator backup (not JSON: {e})"))?;
    if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
        return Err(format!("{shown} is not an image-replicator backup"));
    }
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => {
            return Err(format!(
                "{shown} is a backup of format version {v}; this image-replicator reads version {VERSION}"
            ))
        }
        None => return Err(format!("{shown} has no format version")),
    }
    serde_json::from_value(value).map_err(|e| format!("{shown} is a damaged backup: {e}"))
}

/// `restore FILE --data-dir DIR`: only into a data directory that does not exist yet or is
/// empty; the summary of what was restored.
pub fn restore(
    file: &Path,
    data_dir: &Path,
    config: &crate::store::StoreConfig,
) -> std::result::Result<String, String> {
    let backup = read(file)?;
    let shown = data_dir.display();
    match std::fs::read_dir(data_dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(format!(
                    "refusing to restore into {shown}: it is not empty; restore into a new or empty data directory"
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {shown}: {e}")),
    }
    crate::server::create_data_dir(data_dir).map_err(|e| format!("cannot create {shown}: {e}"))?;
    let absolute = std::path::absolute(data_dir).map_err(|e| format!("{shown}: {e}"))?;
    let store = crate::server::open_store(&absolute, config, std::time::Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    let svc = Service::new(store, absolute);
    svc.restore(&backup)
        .map_err(|e| format!("cannot restore {}: {e}", file.display()))?;
    Ok(backup.summary())
}
