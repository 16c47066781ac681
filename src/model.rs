//! The records the appliance keeps: regions, tenants, users, tokens, images and jobs.
//!
//! Every record is serde-encoded; the store prefixes each value with a format version byte.
//! Times are kept as seconds since the Unix epoch and written as RFC 3339 in JSON.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Every disk format Glance knows; a region accepts all of them unless told otherwise.
pub const DISK_FORMATS: [&str; 11] = [
    "ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi", "iso", "ploop",
];

/// Every container format Glance knows.
pub const CONTAINER_FORMATS: [&str; 8] = [
    "ami",
    "ari",
    "aki",
    "bare",
    "ovf",
    "ova",
    "docker",
    "compressed",
];

/// Seconds since the Unix epoch, now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Seconds since the Unix epoch, now, rounded up.
pub fn now_ceil() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
        .unwrap_or(0)
}

/// The last second RFC 3339 can write (9999-12-31T23:59:59Z).
pub const MAX_TIME: u64 = 253_402_300_799;

/// RFC 3339 in UTC, seconds precision, as Glance prints `created_at`.
pub fn rfc3339(secs: u64) -> String {
    let secs = secs.min(MAX_TIME);
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// Epoch seconds of an RFC 3339 time (fractions and offsets allowed), if it is one.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let time = humantime::parse_rfc3339_weak(text).ok()?;
    time.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}

/// Whether `url` is an http:// or https:// URL (what the appliance can talk to).
pub fn is_http_url(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// Serde for a `u64` of epoch seconds written as RFC 3339.
mod ts {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(secs: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::rfc3339(*secs))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_rfc3339(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("'{text}' is not an RFC 3339 time")))
    }

    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(secs: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
            match secs {
                Some(secs) => super::serialize(secs, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
            #[derive(Deserialize)]
            struct Wrap(#[serde(with = "super")] u64);
            Ok(Option::<Wrap>::deserialize(d)?.map(|Wrap(secs)| secs))
        }
    }
}

/// A tenant id as Keystone writes it: 32 hex digits, or a hyphenated UUID.
/// Two spellings of the same 128-bit value are the same tenant; the key is that value.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct TenantKey(pub [u8; 16]);

impl TenantKey {
    pub fn parse(text: &str) -> Option<TenantKey> {
        let shape_ok = match text.len() {
            32 => text.bytes().all(|b| b.is_ascii_hexdigit()),
            36 => text.bytes().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => b == b'-',
                _ => b.is_ascii_hexdigit(),
            }),
            _ => false,
        };
        if !shape_ok {
            return None;
        }
        Uuid::try_parse(text).ok().map(|u| TenantKey(*u.as_bytes()))
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Region {
    pub id: String,
    /// The directory that holds this region's image files (empty for a Glance region).
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub dir: PathBuf,
    pub disk_formats: Vec<String>,
    #[serde(with = "ts")]
    pub created_at: u64,
    /// Set when the region is an OpenStack Glance v2 image service instead of a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub glance: Option<GlanceRegion>,
}

fn path_is_empty(path: &std::path::Path) -> bool {
    path.as_os_str().is_empty()
}

/// Where a Glance region is and how the appliance authenticates to it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct GlanceRegion {
    /// Base URL, such as `http://glance.example:9292` (without `/v2`).
    pub url: String,
    /// `None`: Glance runs without authentication.
    pub keystone: Option<KeystoneCredentials>,
}

/// A Keystone v3 user that gets project-scoped tokens by password.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct KeystoneCredentials {
    /// Keystone's base URL, such as `http://keystone.example:5000/v3`.
    pub auth_url: String,
    pub username: String,
    pub user_domain: String,
    pub project: String,
    pub project_domain: String,
    /// Where the password is read at each authentication; the password itself is never stored.
    pub password: SecretSource,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum SecretSource {
    /// A file whose first line is the secret.
    File(PathBuf),
    /// An environment variable of the `serve` process.
    Env(String),
}

impl std::fmt::Display for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::File(path) => write!(f, "file {}", path.display()),
            SecretSource::Env(name) => write!(f, "environment variable {name}"),
        }
    }
}

impl SecretSource {
    /// Reads the secret; the error names where it looked, never the secret.
    pub fn read(&self) -> Result<String, String> {
        let text = match self {
            SecretSource::File(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the password file {}: {e}", path.display()))?,
            SecretSource::Env(name) => std::env::var(name)
                .map_err(|_| format!("the environment variable {name} is not set"))?,
        };
        let secret = text.lines().next().unwrap_or("").to_string();
        if secret.is_empty() {
            return Err(format!("the password in {self} is empty"));
        }
        Ok(secret)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Tenant {
    /// As given when the tenant was added; compared through [`TenantKey`].
    pub id: String,
    pub region: String,
    pub name: Option<String>,
    #[serde(with = "ts")]
    pub created_at: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct User {
    pub name: String,
    /// Tenant ids as stored in their tenant records.
    pub tenants: Vec<String>,
    pub admin: bool,
    #[serde(with = "ts")]
    pub created_at: u64,
}

/// A token as kept at rest: never the token itself, only its argon2id PHC string.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TokenRecord {
    pub id: Uuid,
    pub user: String,
    pub tenant: String,
    /// argon2id PHC string of the token.
    pub hash: String,
    /// The token's SHA-256, hex: finds its record without argon2 work. Records written by
    /// earlier versions have its first 4 bytes (8 digits) until the token is next used.
    pub lookup: String,
    #[serde(with = "ts")]
    pub created_at: u64,
    #[serde(with = "ts::option")]
    pub expires_at: Option<u64>,
    #[serde(with = "ts::option")]
    pub revoked_at: Option<u64>,
}

impl TokenRecord {
    /// Why this token cannot be used at `now`, if it cannot.
    pub fn unusable_at(&self, now: u64) -> Option<&'static str> {
        if self.revoked_at.is_some() {
            Some("revoked")
        } else if self.expires_at.is_some_and(|at| at <= now) {
            Some("expired")
        } else {
            None
        }
    }
}

/// What `token list` shows: the record without its hash.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct TokenInfo {
    pub id: Uuid,
    pub user: String,
    pub tenant: String,
    #[serde(with = "ts")]
    pub created_at: u64,
    #[serde(with = "ts::option")]
    pub expires_at: Option<u64>,
    #[serde(with = "ts::option")]
    pub revoked_at: Option<u64>,
}

impl From<&TokenRecord> for TokenInfo {
    fn from(t: &TokenRecord) -> Self {
        TokenInfo {
            id: t.id,
            user: t.user.clone(),
            tenant: t.tenant.clone(),
            created_at: t.created_at,
            expires_at: t.expires_at,
            revoked_at: t.revoked_at,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ImageStatus {
    Queued,
    Saving,
    Active,
    Killed,
    Deleted,
    /// The remaining states occur only in Glance regions.
    PendingDelete,
    Deactivated,
    Uploading,
    Importing,
}

impl fmt::Display for ImageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            ImageStatus::Queued => "queued",
            ImageStatus::Saving => "saving",
            ImageStatus::Active => "active",
            ImageStatus::Killed => "killed",
            ImageStatus::Deleted => "deleted",
            ImageStatus::PendingDelete => "pending_delete",
            ImageStatus::Deactivated => "deactivated",
            ImageStatus::Uploading => "uploading",
            ImageStatus::Importing => "importing",
        };
        f.write_str(text)
    }
}

/// A Glance-like image record; in a directory region its bytes are the file `<region dir>/<id>`,
/// in a Glance region this is Glance's own record.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Image {
    pub id: Uuid,
    pub name: String,
    /// The owner tenant's id as stored.
    pub owner: String,
    pub region: String,
    pub status: ImageStatus,
    pub disk_format: String,
    pub container_format: String,
    pub size: u64,
    /// MD5 of the data, hex.
    pub checksum: Option<String>,
    pub os_hash_algo: Option<String>,
    pub os_hash_value: Option<String>,
    #[serde(with = "ts")]
    pub created_at: u64,
    #[serde(with = "ts")]
    pub updated_at: u64,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    ReplicateRequested,
    Replicating,
    Replicated,
    CancelRequested,
    Canceling,
    Canceled,
    Error,
}

impl JobStatus {
    pub const ALL: [JobStatus; 7] = [
        JobStatus::ReplicateRequested,
        JobStatus::Replicating,
        JobStatus::Replicated,
        JobStatus::CancelRequested,
        JobStatus::Canceling,
        JobStatus::Canceled,
        JobStatus::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::ReplicateRequested => "replicate_requested",
            JobStatus::Replicating => "replicating",
            JobStatus::Replicated => "replicated",
            JobStatus::CancelRequested => "cancel_requested",
            JobStatus::Canceling => "canceling",
            JobStatus::Canceled => "canceled",
            JobStatus::Error => "error",
        }
    }

    /// `replicated`, `canceled` and `error` are final.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Replicated | JobStatus::Canceled | JobStatus::Error
        )
    }

    /// A cancel is accepted only before or during the copy.
    pub fn is_cancelable(self) -> bool {
        matches!(self, JobStatus::ReplicateRequested | JobStatus::Replicating)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
                format!(
                    "unknown job status '{text}'; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// The ten keys of the API's job object, in wire order. Decoding a stored [`Job`] as a
/// `JobWire` skips its other keys.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct JobWire {
    pub copy_progress: u8,
    pub destination_image_id: Option<Uuid>,
    pub destination_region_id: String,
    pub destination_tenant_id: String,
    pub job_id: Uuid,
    pub source_image_id: Uuid,
    pub source_image_name: String,
    pub source_region_id: String,
    pub source_tenant_id: String,
    pub status: JobStatus,
}

/// The key names of [`JobWire`], for validating seed files.
pub const JOB_KEYS: [&str; 10] = [
    "copy_progress",
    "destination_image_id",
    "destination_region_id",
    "destination_tenant_id",
    "job_id",
    "source_image_id",
    "source_image_name",
    "source_region_id",
    "source_tenant_id",
    "status",
];

/// A job as stored: the wire object plus what the appliance needs to run it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Job {
    #[serde(flatten)]
    pub wire: JobWire,
    /// Creation order; the key suffix of the job indexes.
    pub seq: u64,
    #[serde(with = "ts")]
    pub created_at: u64,
    #[serde(with = "ts")]
    pub updated_at: u64,
    pub bytes_copied: u64,
    pub bytes_total: u64,
    /// Why the job ended in `error`, for people.
    pub error: Option<String>,
    /// Imported by `job seed` rather than created through the API.
    pub seeded: bool,
    /// The replication worker may take it (always for API jobs; seeded ones with `--enqueue`).
    pub enqueued: bool,
    /// The destination image this appliance's worker created for the job. Only that image is
    /// ever reused or removed by the worker (a seeded `destination_image_id` is someone else's).
    #[serde(default)]
    pub created_destination: Option<Uuid>,
}
