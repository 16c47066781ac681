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

/// A region: a place that holds images, of one [`RegionKind`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Region {
    pub id: String,
    /// Stored and shown as the kind's own key: `dir` for a directory, `glance` for a Glance
    /// (the same JSON as before kinds had a type of their own).
    #[serde(flatten)]
    pub kind: RegionKind,
    pub disk_formats: Vec<String>,
    #[serde(with = "ts")]
    pub created_at: u64,
    /// The one appliance (its node name) that may run jobs touching this region: a directory
    /// that only that machine mounts. `None`: any appliance of the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
}

/// What a region is. `regions::open` matches on it once to build the region's image store.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum RegionKind {
    /// An OpenStack Glance v2 image service, which keeps its own image records.
    Glance { glance: GlanceRegion },
    /// A region of another image-replicator appliance, reached by the peer protocol; the
    /// peer keeps the records.
    Peer { peer: PeerRegion },
    /// A local directory holding one file per image; the appliance keeps the image records.
    Directory { dir: PathBuf },
}

impl RegionKind {
    /// The kind's name in listings (`directory`, `glance`, `glance+keystone`) and where it is;
    /// never its credentials.
    pub fn describe(&self) -> (&'static str, String) {
        match self {
            RegionKind::Directory { dir } => ("directory", dir.display().to_string()),
            RegionKind::Glance { glance } if glance.keystone.is_some() => {
                ("glance+keystone", glance.url.clone())
            }
            RegionKind::Glance { glance } => ("glance", glance.url.clone()),
            RegionKind::Peer { peer } => ("peer", format!("{} region {}", peer.url, peer.region)),
        }
    }
}

/// Where a region keeps its images, in words (never its credentials).
impl fmt::Display for RegionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegionKind::Directory { dir } => write!(f, "directory {}", dir.display()),
            RegionKind::Glance { glance } if glance.keystone.is_some() => {
                write!(f, "Glance {} with Keystone", glance.url)
            }
            RegionKind::Glance { glance } => write!(f, "Glance {}", glance.url),
            RegionKind::Peer { peer } => {
                write!(f, "region {} of the appliance at {}", peer.region, peer.url)
            }
        }
    }
}

/// Where a Glance region is and how the appliance authenticates to it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct GlanceRegion {
    /// Base URL, such as `http://glance.example:9292` (without `/v2`).
    pub url: String,
    /// `None`: Glance runs without authentication.
    pub keystone: Option<KeystoneCredentials>,
}

/// Where a peer appliance is, which of its regions this one is, and its token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PeerRegion {
    /// The peer's base URL, such as `https://edge1.example:9292`.
    pub url: String,
    /// The peer's region this region is.
    pub region: String,
    /// Where a token of the peer is read at each request; the token itself is never stored.
    pub token: SecretSource,
    /// PEM certificates the peer's TLS certificate must chain to, besides the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
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
                .map_err(|e| format!("cannot read the secret file {}: {e}", path.display()))?,
            SecretSource::Env(name) => std::env::var(name)
                .map_err(|_| format!("the environment variable {name} is not set"))?,
        };
        let secret = text.lines().next().unwrap_or("").to_string();
        if secret.is_empty() {
            return Err(format!("the secret in {self} is empty"));
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
    /// Most bytes of images the tenant may hold, copies into it under way included; `None`:
    /// no limit. Records written before quotas existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<u64>,
    /// Most jobs of the tenant (as the source tenant) that may be queued or copying at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_jobs: Option<u64>,
}

/// A quota as `tenant add` and `tenant update` set it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// No limit (`none`).
    Unlimited,
    /// At most this much.
    Max(u64),
}

impl Limit {
    pub fn value(self) -> Option<u64> {
        match self {
            Limit::Unlimited => None,
            Limit::Max(n) => Some(n),
        }
    }
}

/// A count of bytes for people: `512 bytes`, `64 MiB`, `1.5 GiB`.
pub fn size_text(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let rounded = (value * 10.0).round() / 10.0;
    if rounded.fract() == 0.0 {
        format!("{} {}", rounded as u64, UNITS[unit])
    } else {
        format!("{rounded:.1} {}", UNITS[unit])
    }
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

/// Bytes of a token's SHA-256 kept as its lookup key: all of it, so that no other string finds
/// the token's record.
pub const LOOKUP_LEN: usize = 32;
/// The lookup of records written before the full one (a prefix of the SHA-256).
pub const LEGACY_LOOKUP_LEN: usize = 4;

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A token as kept at rest: what `token list` shows, and never the token itself, only its
/// argon2id PHC string and its SHA-256.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TokenRecord {
    #[serde(flatten)]
    pub info: TokenInfo,
    /// argon2id PHC string of the token.
    pub hash: String,
    /// The token's SHA-256, hex: finds its record without argon2 work. Records written by
    /// earlier versions have its first 4 bytes (8 digits) until the token is next used.
    pub lookup: String,
}

impl TokenRecord {
    /// Why this token cannot be used at `now`, if it cannot.
    pub fn unusable_at(&self, now: u64) -> Option<&'static str> {
        if self.info.revoked_at.is_some() {
            Some("revoked")
        } else if self.info.expires_at.is_some_and(|at| at <= now) {
            Some("expired")
        } else {
            None
        }
    }

    /// The bytes of its lookup key (full, or of an earlier version's length), from their hex.
    pub fn lookup_key(&self) -> Option<Vec<u8>> {
        let text = &self.lookup;
        if text.len() != LOOKUP_LEN * 2 && text.len() != LEGACY_LOOKUP_LEN * 2 {
            return None;
        }
        (0..text.len() / 2)
            .map(|i| u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok())
            .collect()
    }

    /// Whether the record still has the short lookup of earlier versions.
    pub fn has_legacy_lookup(&self) -> bool {
        self.lookup.len() == LEGACY_LOOKUP_LEN * 2
    }
}

/// A token's owner and times: what `token list` shows.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
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
    /// What its users set on it besides its bytes (Glance's fields); records written before
    /// the images API have the defaults.
    #[serde(flatten)]
    pub meta: ImageMeta,
}

impl Image {
    /// A new record without data (`queued`), without a name or formats, made at `at`.
    pub fn queued(id: Uuid, owner: &str, region: &str, at: u64) -> Image {
        Image {
            id,
            name: String::new(),
            owner: owner.to_string(),
            region: region.to_string(),
            status: ImageStatus::Queued,
            disk_format: String::new(),
            container_format: String::new(),
            size: 0,
            checksum: None,
            os_hash_algo: None,
            os_hash_value: None,
            created_at: at,
            updated_at: at,
            meta: ImageMeta::default(),
        }
    }
}

/// Who may see an image besides its owner (Glance's `visibility`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Every tenant, listed and by id.
    Public,
    /// Every tenant by id; listed only when asked for (`visibility=community`).
    Community,
    /// The owner and the image's members (Glance's default for a new image).
    #[default]
    Shared,
    /// The owner alone.
    Private,
}

impl Visibility {
    pub const ALL: [Visibility; 4] = [
        Visibility::Public,
        Visibility::Community,
        Visibility::Shared,
        Visibility::Private,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Public => "public",
            Visibility::Community => "community",
            Visibility::Shared => "shared",
            Visibility::Private => "private",
        }
    }
}

impl FromStr for Visibility {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Visibility::ALL
            .into_iter()
            .find(|v| v.as_str() == text)
            .ok_or_else(|| {
                format!("Invalid visibility value: {text}; expected public, community, shared or private")
            })
    }
}

/// An image's Glance fields that its users set (and a copy carries to its destination).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(default)]
pub struct ImageMeta {
    pub visibility: Visibility,
    /// Not deletable while true.
    pub protected: bool,
    /// Disk (GB) and memory (MB) needed to boot it.
    pub min_disk: u64,
    pub min_ram: u64,
    /// A set: sorted, each once.
    pub tags: Vec<String>,
    /// Left out of default listings.
    pub os_hidden: bool,
    /// Users' own properties (`hw_disk_bus`, `os_distro` …): strings by name.
    pub properties: std::collections::BTreeMap<String, String>,
    /// The size of the disk the bytes hold, where an upload could tell (Glance's
    /// `virtual_size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtual_size: Option<u64>,
    /// Not a Glance field: the failed job that keeps this partial (`saving`) image for a
    /// retry. The start-up cleanup leaves such an image while that job still names it, so it
    /// needs no scan of the jobs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_for: Option<Uuid>,
}

impl ImageMeta {
    /// What a copy's destination gets: everything but visibility and protection, which stay
    /// the defaults (the destination tenant decides who sees its copy, and a job must be able
    /// to remove the copy it made).
    pub fn for_copy(&self) -> ImageMeta {
        ImageMeta {
            visibility: Visibility::default(),
            protected: false,
            kept_for: None,
            ..self.clone()
        }
    }
}

/// Glance's own keys of an image (its base schema): never a user property.
pub const IMAGE_BASE_KEYS: [&str; 27] = [
    "checksum",
    "container_format",
    "created_at",
    "direct_url",
    "disk_format",
    "file",
    "id",
    "locations",
    "min_disk",
    "min_ram",
    "name",
    "os_hash_algo",
    "os_hash_value",
    "os_hidden",
    "owner",
    "protected",
    "schema",
    "self",
    "size",
    "status",
    "stores",
    "tags",
    "updated_at",
    "virtual_size",
    "visibility",
    "deleted",
    "deleted_at",
];

/// Whether `key` can be a user property: not one of Glance's own keys nor under the prefix
/// Glance reserves for itself (`os_glance_`).
pub fn is_user_property(key: &str) -> bool {
    !IMAGE_BASE_KEYS.contains(&key) && !key.starts_with("os_glance_")
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
    /// How far the destination holds the image verified, as of the last checkpoint.
    #[serde(default)]
    pub bytes_verified: u64,
    /// Bytes read from the source by every attempt together (after a kill, what the killed
    /// attempt read past its last checkpoint is counted from what it wrote, plus a chunk).
    #[serde(default)]
    pub source_bytes_read: u64,
    /// How many attempts started from a verified part of the image instead of from byte 0.
    #[serde(default)]
    pub resumes: u32,
    /// An attempt is reading from the source; still set when the next one starts, the last
    /// one was killed.
    #[serde(default)]
    pub reading: bool,
    /// Chunk bytes taken from images the receiving appliance held already (copies between
    /// appliances), by every attempt together.
    #[serde(default)]
    pub bytes_reused: u64,
    /// Chunk bytes that crossed the link between appliances.
    #[serde(default)]
    pub bytes_fetched: u64,
    /// Bytes those took on the wire (compressed frames and the manifest).
    #[serde(default)]
    pub bytes_on_wire: u64,
    /// The day-two record (times, rate, retries); jobs stored before it have its defaults.
    #[serde(flatten)]
    pub story: JobStory,
}

/// What `GET …/jobs/{job_id}/detail` tells beside the ten keys and the record's other
/// figures: when the copy first started and when the job ended, the current attempt's rate,
/// and the retry lineage. Every field has a default, so older stored jobs decode.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct JobStory {
    /// When the copy first started (`replicating`).
    #[serde(default, with = "ts::option")]
    pub started_at: Option<u64>,
    /// When the job became `replicated`, `canceled` or `error`.
    #[serde(default, with = "ts::option")]
    pub finished_at: Option<u64>,
    /// When the current (or last) copy attempt began, in milliseconds since the epoch, and
    /// how many bytes it found done already: the base of the rate.
    #[serde(default)]
    pub attempt_started_ms: Option<u64>,
    #[serde(default)]
    pub attempt_bytes_from: u64,
    /// Bytes per second of the current (or last) attempt, as of its last progress record.
    #[serde(default)]
    pub rate_bytes_per_s: Option<u64>,
    /// How many retries came before this job (its origin's plus one).
    #[serde(default)]
    pub retries: u32,
    /// The job this one retries.
    #[serde(default)]
    pub retry_of: Option<Uuid>,
    /// The job that retried this one.
    #[serde(default)]
    pub retried_by: Option<Uuid>,
    /// A job that ended in `error` after transient failures: its partial destination image
    /// (still `saving`, where the appliance keeps its record), kept for a retry to resume
    /// from, until a retry takes it over or a purge removes it.
    #[serde(default)]
    pub kept_destination: Option<Uuid>,
}

/// The body of `GET …/jobs/{job_id}/detail`: the job object's ten keys unchanged, then the
/// job's times (RFC 3339, `null` until they happen), bytes, rate, error and counts.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct JobDetail {
    #[serde(flatten)]
    pub wire: JobWire,
    #[serde(with = "ts")]
    pub created_at: u64,
    #[serde(with = "ts")]
    pub updated_at: u64,
    #[serde(with = "ts::option")]
    pub started_at: Option<u64>,
    #[serde(with = "ts::option")]
    pub finished_at: Option<u64>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// While `replicating`: the running attempt's average so far; once `replicated`: the last
    /// attempt's; `null` otherwise.
    pub rate_bytes_per_s: Option<u64>,
    /// Why the job failed; `null` unless its status is `error`.
    pub error: Option<String>,
    pub retries: u32,
    pub resumes: u32,
}

impl From<&Job> for JobDetail {
    fn from(job: &Job) -> JobDetail {
        let status = job.wire.status;
        JobDetail {
            wire: job.wire.clone(),
            created_at: job.created_at,
            updated_at: job.updated_at,
            started_at: job.story.started_at,
            finished_at: job.story.finished_at,
            bytes_done: job.bytes_copied,
            bytes_total: job.bytes_total,
            rate_bytes_per_s: matches!(status, JobStatus::Replicating | JobStatus::Replicated)
                .then_some(job.story.rate_bytes_per_s)
                .flatten(),
            error: (status == JobStatus::Error)
                .then(|| job.error.clone())
                .flatten(),
            retries: job.story.retries,
            resumes: job.resumes,
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the replication worker does with a queued job next (see [`Job::next_step`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Copy it (again, after an interruption).
    Copy,
    /// A cancel was asked for: remove what the copy wrote, then `canceled`.
    Cancel,
    /// It failed and its destination is being removed: finish that, then `error`.
    Fail(String),
    /// It ended already: only its queue entry is left.
    Forget,
}

impl Job {
    /// A new job of the API (or a retry): `wire` as given, enqueued for the worker, nothing
    /// copied yet.
    pub fn new_queued(wire: JobWire, seq: u64, at: u64, bytes_total: u64) -> Job {
        Job {
            wire,
            seq,
            created_at: at,
            updated_at: at,
            bytes_copied: 0,
            bytes_total,
            error: None,
            seeded: false,
            enqueued: true,
            created_destination: None,
            bytes_verified: 0,
            source_bytes_read: 0,
            resumes: 0,
            reading: false,
            bytes_reused: 0,
            bytes_fetched: 0,
            bytes_on_wire: 0,
            story: JobStory::default(),
        }
    }
}

/// The job's life cycle, each rule once. Every function is pure: it changes the record (and
/// says whether it may) and nothing else; the store writes the result in one transaction.
impl Job {
    /// What the worker must do with the job. A job that is `replicate_requested` or
    /// `replicating` with an `error` is failing (the API has no status for it): the worker was
    /// removing its destination.
    pub fn next_step(&self) -> Step {
        match (self.wire.status, &self.error) {
            (JobStatus::ReplicateRequested | JobStatus::Replicating, Some(reason)) => {
                Step::Fail(reason.clone())
            }
            (JobStatus::ReplicateRequested | JobStatus::Replicating, None) => Step::Copy,
            (JobStatus::CancelRequested | JobStatus::Canceling, _) => Step::Cancel,
            (JobStatus::Replicated | JobStatus::Canceled | JobStatus::Error, _) => Step::Forget,
        }
    }

    /// Whether a cancel was asked for (it wins over an error that happens meanwhile).
    pub fn cancel_asked(&self) -> bool {
        matches!(
            self.wire.status,
            JobStatus::CancelRequested | JobStatus::Canceling
        )
    }

    /// `DELETE`: only a job that has not finished copying can be canceled; false if not.
    pub fn request_cancel(&mut self, at: u64) -> bool {
        if !self.wire.status.is_cancelable() {
            return false;
        }
        self.wire.status = JobStatus::CancelRequested;
        // The worker finishes every cancel, seeded jobs' too.
        self.enqueued = true;
        self.updated_at = at;
        true
    }

    /// The copy starts (or starts over) into `destination`; false if the job is past that.
    pub fn start(&mut self, destination: Uuid, bytes_total: u64, at: u64) -> bool {
        if self.next_step() != Step::Copy {
            return false;
        }
        self.wire.status = JobStatus::Replicating;
        self.wire.destination_image_id = Some(destination);
        self.created_destination = Some(destination);
        self.bytes_total = bytes_total;
        self.story.started_at.get_or_insert(at);
        self.updated_at = at;
        true
    }

    /// A copy attempt's clock starts at `at_ms` with `done` bytes already at the destination.
    pub fn begin_rate(&mut self, done: u64, at_ms: u64) {
        self.story.attempt_started_ms = Some(at_ms);
        self.story.attempt_bytes_from = done;
        self.story.rate_bytes_per_s = None;
    }

    /// The current attempt has `copied` bytes at the destination at `at_ms`: its rate so far
    /// (what it copied itself, over the time since it began).
    pub fn measure_rate(&mut self, copied: u64, at_ms: u64) {
        let Some(began) = self.story.attempt_started_ms else {
            return;
        };
        let elapsed = at_ms.saturating_sub(began).max(1);
        let moved = copied.saturating_sub(self.story.attempt_bytes_from);
        self.story.rate_bytes_per_s = Some((u128::from(moved) * 1000 / u128::from(elapsed)) as u64);
    }

    /// A copy attempt begins after its destination was checked: `verified` bytes of what it
    /// `held` are kept. A killed attempt's reads past its last checkpoint are counted: what
    /// it wrote past it, plus the chunk it may have been reading.
    pub fn begin_attempt(&mut self, verified: u64, held: u64, chunk: u64, at: u64) {
        if self.reading {
            self.source_bytes_read += held.saturating_sub(self.bytes_verified) + chunk;
        }
        if verified > 0 {
            self.resumes += 1;
        }
        self.bytes_verified = verified;
        self.reading = true;
        self.updated_at = at;
    }

    /// What the destination made durable is verified up to `verified` (unchanged if `None`);
    /// `read` bytes were read from the source in all; `paused` if the attempt stops here.
    pub fn checkpoint(&mut self, verified: Option<u64>, read: u64, paused: bool, at: u64) {
        if let Some(verified) = verified {
            self.bytes_verified = verified;
        }
        self.source_bytes_read = read;
        self.reading = !paused;
        self.updated_at = at;
    }

    /// What copies between appliances moved for this job so far.
    pub fn moved(&self) -> crate::peer::DeltaFigures {
        crate::peer::DeltaFigures {
            reused: self.bytes_reused,
            fetched: self.bytes_fetched,
            wire: self.bytes_on_wire,
        }
    }

    pub fn set_moved(&mut self, moved: crate::peer::DeltaFigures) {
        self.bytes_reused = moved.reused;
        self.bytes_fetched = moved.fetched;
        self.bytes_on_wire = moved.wire;
    }

    /// `copied` bytes are at the destination; the percentage never goes back.
    pub fn progress(&mut self, copied: u64, at: u64) {
        let percent = (copied.min(self.bytes_total) * 100)
            .checked_div(self.bytes_total)
            .map_or(100, |p| p as u8);
        self.bytes_copied = copied;
        self.wire.copy_progress = self.wire.copy_progress.max(percent);
        self.updated_at = at;
    }

    /// The copy is complete and verified; false if a cancel came first (it is honoured).
    pub fn complete(&mut self, at: u64) -> bool {
        if self.next_step() != Step::Copy {
            return false;
        }
        self.wire.status = JobStatus::Replicated;
        self.wire.copy_progress = 100;
        self.bytes_copied = self.bytes_total;
        self.bytes_verified = self.bytes_total;
        self.reading = false;
        self.story.finished_at = Some(at);
        self.updated_at = at;
        true
    }

    /// The job is going to end, canceled (`error` is `None`) or failed: said before its
    /// destination is removed, so that a crash in between finishes the ending instead of
    /// copying again. A cancel asked for meanwhile wins over the error.
    pub fn begin_ending(&mut self, error: Option<String>, at: u64) {
        if self.wire.status.is_terminal() {
            return;
        }
        match error {
            Some(reason) if !self.cancel_asked() => self.error = Some(reason),
            _ => {
                self.wire.status = JobStatus::Canceling;
                self.error = None;
            }
        }
        self.updated_at = at;
    }

    /// The destination is gone: `canceled`, or `error` with the reason kept. A cancel asked
    /// for meanwhile wins over the error.
    pub fn end(&mut self, at: u64) {
        if self.wire.status.is_terminal() {
            return;
        }
        if self.cancel_asked() || self.error.is_none() {
            self.wire.status = JobStatus::Canceled;
            self.error = None;
        } else {
            self.wire.status = JobStatus::Error;
        }
        self.wire.destination_image_id = None;
        self.created_destination = None;
        self.bytes_verified = 0;
        self.reading = false;
        self.story.finished_at = Some(at);
        self.updated_at = at;
    }
}

#[cfg(test)]
mod tenants {
    use super::*;

    #[test]
    fn an_image_record_from_before_the_images_api_still_opens_with_glances_defaults() {
        let old = r#"{"id":"0b0a5e4e-52d6-4a5b-9b2e-0f4c9f3c2b11","name":"cirros","owner":"236ae314ef6944f4ab98fa7519e54325","region":"ot1","status":"active","disk_format":"qcow2","container_format":"bare","size":3,"checksum":null,"os_hash_algo":null,"os_hash_value":null,"created_at":"2024-01-01T00:00:00Z","updated_at":"2024-01-01T00:00:00Z"}"#;
        let image: Image = serde_json::from_str(old).expect("old record");
        assert_eq!(image.meta, ImageMeta::default());
        assert_eq!(image.meta.visibility, Visibility::Shared);
        let again: Image =
            serde_json::from_str(&serde_json::to_string(&image).expect("encode")).expect("new");
        assert_eq!(again, image);
    }

    #[test]
    fn a_tenant_record_without_quotas_still_opens_and_is_written_the_same() {
        let old = r#"{"id":"236ae314ef6944f4ab98fa7519e54325","region":"ot1","name":null,"created_at":"2024-01-01T00:00:00Z"}"#;
        let tenant: Tenant = serde_json::from_str(old).expect("old record");
        assert_eq!((tenant.quota_bytes, tenant.quota_jobs), (None, None));
        assert_eq!(serde_json::to_string(&tenant).expect("encode"), old);
    }

    #[test]
    fn sizes_are_written_for_people() {
        assert_eq!(size_text(0), "0 bytes");
        assert_eq!(size_text(1023), "1023 bytes");
        assert_eq!(size_text(1024), "1 KiB");
        assert_eq!(size_text(3 << 19), "1.5 MiB");
        assert_eq!(size_text(10 << 30), "10 GiB");
        assert_eq!(size_text(u64::MAX), "16 EiB");
    }
}

#[cfg(test)]
mod job_story {
    use super::*;

    /// A job as the version before the day-two fields stored it.
    const OLD: &str = r#"{"copy_progress":100,"destination_image_id":null,"destination_region_id":"ot2","destination_tenant_id":"91b5c7c09cbd45caa3c146fd67ae471e","job_id":"0fa2817d-4e54-455d-a676-c78e863297e9","source_image_id":"335eef3f-551d-46e1-8781-173f43209d48","source_image_name":"cirros","source_region_id":"ot1","source_tenant_id":"236ae314ef6944f4ab98fa7519e54325","status":"replicated","seq":7,"created_at":"2026-01-01T00:00:00Z","updated_at":"2026-01-01T00:01:00Z","bytes_copied":10,"bytes_total":10,"error":null,"seeded":false,"enqueued":true,"created_destination":null,"bytes_verified":10,"source_bytes_read":10,"resumes":1,"reading":false,"bytes_reused":0,"bytes_fetched":0,"bytes_on_wire":0}"#;

    #[test]
    fn a_job_stored_before_the_day_two_fields_decodes_with_their_defaults() {
        let job: Job = serde_json::from_str(OLD).expect("old job");
        assert_eq!(job.story, JobStory::default());
        assert_eq!(job.resumes, 1);
        let detail = serde_json::to_value(JobDetail::from(&job)).expect("detail");
        assert_eq!(detail["started_at"], serde_json::Value::Null);
        assert_eq!(detail["finished_at"], serde_json::Value::Null);
        assert_eq!(detail["created_at"], "2026-01-01T00:00:00Z");
        assert_eq!(detail["retries"], 0);
        assert_eq!(detail["rate_bytes_per_s"], serde_json::Value::Null);
    }

    #[test]
    fn the_detail_begins_with_the_ten_keys_in_wire_order() {
        let job: Job = serde_json::from_str(OLD).expect("old job");
        let text = serde_json::to_string(&JobDetail::from(&job)).expect("detail");
        let wire = serde_json::to_string(&job.wire).expect("wire");
        assert!(text.starts_with(wire.trim_end_matches('}')), "{text}");
    }

    #[test]
    fn the_rate_is_what_the_attempt_copied_over_its_time() {
        let job: Job = serde_json::from_str(OLD).expect("old job");
        let mut j = job.clone();
        j.wire.status = JobStatus::Replicating;
        j.begin_rate(1000, 10_000);
        j.measure_rate(3000, 12_000);
        assert_eq!(j.story.rate_bytes_per_s, Some(1000));
        assert_eq!(JobDetail::from(&j).rate_bytes_per_s, Some(1000));
        j.wire.status = JobStatus::Error;
        assert_eq!(JobDetail::from(&j).rate_bytes_per_s, None);
    }
}

#[cfg(test)]
mod job_transitions {
    use super::*;

    fn job(status: JobStatus) -> Job {
        let wire = JobWire {
            copy_progress: 0,
            destination_image_id: None,
            destination_region_id: "ot2".into(),
            destination_tenant_id: "91b5c7c09cbd45caa3c146fd67ae471e".into(),
            job_id: Uuid::new_v4(),
            source_image_id: Uuid::new_v4(),
            source_image_name: "cirros".into(),
            source_region_id: "ot1".into(),
            source_tenant_id: "236ae314ef6944f4ab98fa7519e54325".into(),
            status,
        };
        Job::new_queued(wire, 1, 0, 0)
    }

    #[test]
    fn a_copy_runs_from_requested_to_replicated() {
        let mut j = job(JobStatus::ReplicateRequested);
        let dst = Uuid::new_v4();
        assert!(j.start(dst, 200, 5));
        assert_eq!(j.wire.status, JobStatus::Replicating);
        assert_eq!(j.wire.destination_image_id, Some(dst));
        assert_eq!(j.created_destination, Some(dst));
        j.progress(100, 6);
        assert_eq!(j.wire.copy_progress, 50);
        j.progress(50, 7);
        assert_eq!(j.wire.copy_progress, 50, "progress never goes back");
        assert!(j.complete(8));
        assert_eq!(j.wire.status, JobStatus::Replicated);
        assert_eq!((j.wire.copy_progress, j.bytes_copied), (100, 200));
        assert_eq!(j.next_step(), Step::Forget);
    }

    #[test]
    fn progress_of_an_empty_image_is_complete() {
        let mut j = job(JobStatus::Replicating);
        j.progress(0, 1);
        assert_eq!(j.wire.copy_progress, 100);
    }

    #[test]
    fn only_requested_or_replicating_jobs_can_be_canceled() {
        for status in JobStatus::ALL {
            let mut j = job(status);
            j.enqueued = false;
            let allowed = j.request_cancel(1);
            assert_eq!(allowed, status.is_cancelable(), "{status}");
            if allowed {
                assert_eq!(j.wire.status, JobStatus::CancelRequested);
                assert!(j.enqueued, "the worker finishes every cancel");
            } else {
                assert_eq!(j.wire.status, status);
            }
        }
    }

    #[test]
    fn a_canceled_job_neither_starts_nor_completes() {
        let mut j = job(JobStatus::Replicating);
        assert!(j.request_cancel(1));
        assert!(!j.start(Uuid::new_v4(), 1, 2));
        assert!(!j.complete(2));
        assert_eq!(j.next_step(), Step::Cancel);
    }

    #[test]
    fn a_failure_is_a_visible_step_until_it_ends_in_error() {
        let mut j = job(JobStatus::Replicating);
        j.begin_ending(Some("disk on fire".into()), 3);
        assert_eq!(j.wire.status, JobStatus::Replicating);
        assert_eq!(j.next_step(), Step::Fail("disk on fire".into()));
        assert!(!j.complete(4), "a failing job does not complete");
        j.end(4);
        assert_eq!(j.wire.status, JobStatus::Error);
        assert_eq!(j.error.as_deref(), Some("disk on fire"));
        assert_eq!(j.wire.destination_image_id, None);
        assert_eq!(j.next_step(), Step::Forget);
    }

    #[test]
    fn a_cancel_wins_over_an_error_before_and_during_the_ending() {
        // Cancel first, then the copy fails.
        let mut j = job(JobStatus::Replicating);
        assert!(j.request_cancel(1));
        j.begin_ending(Some("broken pipe".into()), 2);
        assert_eq!(j.wire.status, JobStatus::Canceling);
        j.end(3);
        assert_eq!(
            (j.wire.status, j.error.clone()),
            (JobStatus::Canceled, None)
        );
        // The copy fails, then a cancel arrives while its destination is removed.
        let mut j = job(JobStatus::Replicating);
        j.begin_ending(Some("broken pipe".into()), 2);
        assert!(j.request_cancel(3), "still replicating on the wire");
        j.end(4);
        assert_eq!(
            (j.wire.status, j.error.clone()),
            (JobStatus::Canceled, None)
        );
    }

    #[test]
    fn an_ended_job_stays_ended() {
        for status in [JobStatus::Replicated, JobStatus::Canceled, JobStatus::Error] {
            let mut j = job(status);
            j.begin_ending(Some("late".into()), 9);
            j.end(9);
            assert_eq!(j.wire.status, status);
            assert_eq!(j.updated_at, 0);
        }
    }
}
