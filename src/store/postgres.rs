//! The PostgreSQL store (`--database-url`): the same records as [`sled`](super::sled), in one
//! database that several appliances share, with claims on queued jobs that hold across them.
//!
//! Tables (schema version [`SCHEMA_VERSION`], in `schema_version`, created or migrated by
//! [`PgStore::connect`] under a transaction-scoped advisory lock so that appliances starting
//! together do not race):
//! - `regions` (id, pin), `tenants` (key: the tenant's 16 bytes), `users` (name),
//!   `tokens` (id, lookup: the bytes `auth` finds a token by, user), `images` (id, owner key),
//!   `orphans` (image id, region): each row with its record as `json`, the same serde JSON the
//!   sled store keeps, readable with psql (`record->>'name'`). `json` rather than `jsonb`:
//!   `jsonb` refuses `\u0000`, which serde writes for a NUL in any string (an image name, an
//!   error text), and would make such a record unwritable.
//! - `manifests` (image id → encoded manifest), `chunks` (owner, hash, image → first index:
//!   the chunk index, one row per distinct data chunk of a complete manifest; its primary key
//!   answers `chunk_holders`, `chunks_by_image` the removals). The index of an image changes
//!   in the transaction that writes its manifest: PostgreSQL needs none of the sled store's
//!   generations.
//! - `jobs`: id, seq, the columns queries need (source tenant key, destination tenant as
//!   stored and as a key, status, source and destination region), the queue (`queued`: enqueued
//!   and not terminal) and the claim (`holder`, `lease_until`, the database's clock), and the
//!   record.
//! - `job_seq`: the sequence of [`Jobs::next_seq`]; `jobs_changes_shards`: 64 counters, one
//!   of which every job write moves in its transaction (see [`Jobs::jobs_version`] below);
//!   `jobs_changes`, the sequence that version 1 moved after each commit, is still read.
//!
//! Every call blocks, and runs on the calling thread: the store keeps lanes (three quarters of
//! `--database-pool`), each a connection and a single-thread tokio runtime that drives it, and a
//! call takes a free lane and runs its statements there, waiting on the socket itself. No other thread is woken
//! for a statement (handing each to a runtime of the store's own cost 3 wake-ups per round
//! trip, a third of the appliance's CPU at 32 clients). A call from a task of a multi-thread
//! runtime is moved off its worker with `block_in_place`; one from a current-thread runtime's
//! task runs on a thread of its own. Authentication, which runs on the HTTP runtime's tasks
//! for every request, has connections of its own there instead (a quarter of the pool) and
//! does not block its worker at all ([`Registry::token_holder_async`]).

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod};
use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::{Json, ToSql};
use tokio_postgres::{NoTls, Row};
use tokio_postgres_rustls::MakeRustlsConnect;
use uuid::Uuid;

use super::{
    CopyInputs, Exclusive, ImageChange, JobQuery, Jobs, OpenError, Registry, Repo, StoreLock,
    TokenHolder, LEASE,
};
use crate::error::{Result, ServiceError, STORE_ERROR};
use crate::manifest::{Hash, Manifest};
use crate::model::{Image, Job, JobStatus, JobWire, Region, Tenant, TenantKey, TokenRecord, User};

/// The schema this binary writes; a database with a newer one is refused.
pub const SCHEMA_VERSION: i32 = 2;
/// Rows of `jobs_changes_shards` (see [`Jobs::jobs_version`]).
const CHANGE_SHARDS: i16 = 64;
/// The advisory lock that start-ups take while they create or migrate the schema.
const MIGRATION_LOCK: i64 = 0x696d_6167_652d_7265; // "image-re"
/// The advisory locks (of a session) of [`Repo::lock`].
const QUOTA_LOCK: i64 = 0x7175_6f74_612d_6c6b; // "quota-lk"
const SEED_LOCK: i64 = 0x7365_6564_2d6c_6f63; // "seed-loc"
/// How long a call waits for a connection of the pool (or for a new one to connect).
const POOL_WAIT: Duration = Duration::from_secs(5);
/// Chunk index rows per insert statement.
const INDEX_BATCH: usize = 8192;
/// Job records a listing reads per query while it looks for `limit` kept ones.
const LIST_BATCH: usize = 500;

const SCHEMA_V1: &str = r#"
CREATE TABLE regions (
    id text PRIMARY KEY,
    pin text,
    record json NOT NULL
);
CREATE TABLE tenants (
    key bytea PRIMARY KEY,
    record json NOT NULL
);
CREATE TABLE users (
    name text PRIMARY KEY,
    record json NOT NULL
);
CREATE TABLE tokens (
    id uuid PRIMARY KEY,
    lookup bytea NOT NULL,
    user_name text NOT NULL,
    record json NOT NULL
);
CREATE INDEX tokens_by_lookup ON tokens (lookup);
CREATE INDEX tokens_by_user ON tokens (user_name);
CREATE TABLE images (
    id uuid PRIMARY KEY,
    owner bytea NOT NULL,
    record json NOT NULL
);
CREATE INDEX images_by_owner ON images (owner, id);
CREATE TABLE manifests (
    image uuid PRIMARY KEY,
    body bytea NOT NULL
);
CREATE TABLE chunks (
    owner bytea NOT NULL,
    hash bytea NOT NULL,
    image uuid NOT NULL,
    first_index bigint NOT NULL,
    PRIMARY KEY (owner, hash, image)
);
CREATE INDEX chunks_by_image ON chunks (image);
CREATE TABLE jobs (
    id uuid PRIMARY KEY,
    seq bigint NOT NULL UNIQUE,
    source_tenant bytea NOT NULL,
    destination_tenant text NOT NULL,
    destination_key bytea,
    status text NOT NULL,
    queued boolean NOT NULL,
    holder text,
    lease_until timestamptz,
    source_region text NOT NULL,
    destination_region text NOT NULL,
    record json NOT NULL
);
CREATE INDEX jobs_by_tenant ON jobs (source_tenant, seq);
CREATE INDEX jobs_queued ON jobs (seq) WHERE queued;
CREATE INDEX jobs_by_holder ON jobs (holder) WHERE holder IS NOT NULL;
CREATE INDEX jobs_by_destination_key ON jobs (destination_key);
CREATE INDEX jobs_by_destination_tenant ON jobs (destination_tenant);
CREATE TABLE orphans (
    id uuid PRIMARY KEY,
    region text NOT NULL
);
CREATE SEQUENCE job_seq;
CREATE SEQUENCE jobs_changes;
SELECT setval('jobs_changes', 1);
"#;

/// Version 2: job writes are counted inside their transactions, in one of 64 rows.
const SCHEMA_V2: &str = r#"
CREATE TABLE jobs_changes_shards (
    shard smallint PRIMARY KEY,
    n bigint NOT NULL
);
INSERT INTO jobs_changes_shards SELECT s, 0 FROM generate_series(0, 63) AS s;
"#;

/// `url` with its password replaced by `***`, the only way a database URL is ever shown
/// (errors, logs): `postgres://user:***@host:port/db`, and `password=***` in a query string or
/// a key-value connection string.
pub fn redacted(url: &str) -> String {
    let masked_pairs = |text: &str| -> String {
        // key=value pairs, separated by spaces (a connection string) or by & (a query).
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = find_password_key(rest) {
            let (head, tail) = rest.split_at(at);
            out.push_str(head);
            out.push_str("password=***");
            let value = &tail["password=".len()..];
            let end = if let Some(quoted) = value.strip_prefix('\'') {
                let mut chars = quoted.char_indices();
                let mut end = quoted.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '\'' => {
                            end = i + 1;
                            break;
                        }
                        _ => {}
                    }
                }
                (end + 1).min(value.len())
            } else {
                value
                    .find(|c: char| c.is_whitespace() || c == '&' || c == '#')
                    .unwrap_or(value.len())
            };
            rest = &value[end..];
        }
        out.push_str(rest);
        out
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return masked_pairs(url);
    };
    let (authority, tail) = match rest.rfind('@') {
        Some(at) => {
            let (userinfo, tail) = rest.split_at(at);
            let user = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => userinfo.to_string(),
            };
            (user, tail)
        }
        None => (String::new(), rest),
    };
    format!("{scheme}://{authority}{}", masked_pairs(tail))
}

/// Where a `password=` key starts in `text` (at its start or after a separator).
fn find_password_key(text: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = text[from..].find("password=") {
        let at = from + i;
        let starts = at == 0
            || text[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_whitespace() || c == '?' || c == '&');
        if starts {
            return Some(at);
        }
        from = at + "password=".len();
    }
    None
}

/// What a call's statements run with: its connections (a lane's pool of one, which connects
/// again when the connection is lost, or the pool of async tasks) and who this appliance is.
struct Db {
    pool: Pool,
    node: String,
    /// How long a claim lasts, in milliseconds ([`LEASE`]; shorter in tests).
    lease_ms: Arc<AtomicU64>,
    /// The database URL as shown ([`redacted`]).
    shown: String,
    /// The row of `jobs_changes_shards` this lane's job writes move: lanes of one appliance
    /// never wait for each other there.
    shard: i16,
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// The database at `shown` is out of reach (a 503).
fn unavailable(shown: &str, why: impl std::fmt::Display) -> ServiceError {
    ServiceError::Unavailable(format!(
        "the database at {shown} does not answer ({why}); requests succeed again once it is back"
    ))
}

/// No connection came free (or connected) within [`POOL_WAIT`].
fn no_connection(shown: &str) -> ServiceError {
    unavailable(
        shown,
        format_args!("no connection within {} s", POOL_WAIT.as_secs()),
    )
}

impl Db {
    fn unavailable(&self, why: impl std::fmt::Display) -> ServiceError {
        unavailable(&self.shown, why)
    }

    /// A database error as callers see it: the database unreachable is a 503, a unique key
    /// taken a conflict, anything else a store error (500).
    fn error(&self, e: tokio_postgres::Error) -> ServiceError {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            if code.starts_with("08")
                || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "3D000")
            {
                return self.unavailable(db.message());
            }
            if code == "23505" {
                return ServiceError::Conflict(format!(
                    "the record exists already ({})",
                    db.message()
                ));
            }
            return ServiceError::internal(STORE_ERROR, db);
        }
        let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
        if e.is_closed() || io || e.to_string().starts_with("error connecting") {
            return self.unavailable(&e);
        }
        ServiceError::internal(STORE_ERROR, e)
    }

    fn pool_error(&self, e: PoolError) -> ServiceError {
        match e {
            PoolError::Backend(e) => self.error(e),
            PoolError::Timeout(_) => no_connection(&self.shown),
            PoolError::Closed => self.unavailable("the pool is closed"),
            other => ServiceError::internal(STORE_ERROR, other),
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| self.pool_error(e))
    }

    async fn query(
        &self,
        c: &impl GenericClient,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<Row>> {
        let statement = c.prepare_cached(sql).await.map_err(|e| self.error(e))?;
        c.query(&statement, params).await.map_err(|e| self.error(e))
    }

    async fn opt(
        &self,
        c: &impl GenericClient,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<Row>> {
        let statement = c.prepare_cached(sql).await.map_err(|e| self.error(e))?;
        c.query_opt(&statement, params)
            .await
            .map_err(|e| self.error(e))
    }

    async fn exec(&self, c: &impl GenericClient, sql: &str, params: Params<'_>) -> Result<u64> {
        let statement = c.prepare_cached(sql).await.map_err(|e| self.error(e))?;
        c.execute(&statement, params)
            .await
            .map_err(|e| self.error(e))
    }

    async fn commit(&self, tx: deadpool_postgres::Transaction<'_>) -> Result<()> {
        tx.commit().await.map_err(|e| self.error(e))
    }

    /// Counts a job write in its transaction ([`Jobs::jobs_version`]).
    async fn bump(&self, tx: &impl GenericClient) -> Result<()> {
        self.exec(tx, BUMP, &[&self.shard]).await.map(drop)
    }

    /// The records of `sql`'s first column.
    async fn records<T: DeserializeOwned>(
        &self,
        c: &impl GenericClient,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<T>> {
        self.query(c, sql, params)
            .await?
            .iter()
            .map(|row| record(row, 0))
            .collect()
    }

    async fn one_record<T: DeserializeOwned>(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<T>> {
        let c = self.client().await?;
        self.opt(&c, sql, params)
            .await?
            .map(|row| record(&row, 0))
            .transpose()
    }

    /// Removes an image's manifest and chunk index entries.
    async fn drop_manifest(&self, c: &impl GenericClient, id: Uuid) -> Result<()> {
        self.exec(c, "DELETE FROM manifests WHERE image = $1", &[&id])
            .await?;
        self.exec(c, "DELETE FROM chunks WHERE image = $1", &[&id])
            .await?;
        Ok(())
    }

    /// Indexes a complete manifest stored before its image's record, in the record's
    /// transaction.
    async fn index_stored(&self, c: &impl GenericClient, owner: TenantKey, id: Uuid) -> Result<()> {
        let row = self
            .opt(
                c,
                "SELECT body FROM manifests WHERE image = $1 FOR UPDATE",
                &[&id],
            )
            .await?;
        let Some(row) = row else {
            return Ok(());
        };
        let body: Vec<u8> = get(&row, 0)?;
        match Manifest::decode(&body) {
            Ok(m) if m.is_complete() => {
                self.exec(c, "DELETE FROM chunks WHERE image = $1", &[&id])
                    .await?;
                self.index(c, owner, id, &m.first_indexes()).await
            }
            _ => Ok(()),
        }
    }

    /// Writes the chunk index entries of image `id`.
    async fn index(
        &self,
        c: &impl GenericClient,
        owner: TenantKey,
        id: Uuid,
        entries: &[(Hash, u32)],
    ) -> Result<()> {
        let owner = owner.0.to_vec();
        for part in entries.chunks(INDEX_BATCH) {
            let hashes: Vec<&[u8]> = part.iter().map(|(h, _)| &h[..]).collect();
            let firsts: Vec<i64> = part.iter().map(|(_, i)| i64::from(*i)).collect();
            self.exec(
                c,
                "INSERT INTO chunks (owner, hash, image, first_index) \
                 SELECT $1, h, $2, i FROM unnest($3::bytea[], $4::bigint[]) AS t(h, i)",
                &[&owner, &id, &hashes, &firsts],
            )
            .await?;
        }
        Ok(())
    }

    /// Writes an image record (a job's destination: inserted or rewritten).
    async fn put_image(
        &self,
        c: &impl GenericClient,
        owner: TenantKey,
        image: &Image,
    ) -> Result<()> {
        let owner_bytes = owner.0.to_vec();
        self.exec(
            c,
            "INSERT INTO images (id, owner, record) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, record = excluded.record",
            &[&image.id, &owner_bytes, &Json(image)],
        )
        .await?;
        Ok(())
    }

    /// Inserts `job`, and if `counted` counts the write in the same statement (else the
    /// caller's transaction does): whether it was new. An existing job of the same id is left
    /// alone if identical in its wire fields, and a conflict otherwise.
    async fn insert_job(
        &self,
        c: &impl GenericClient,
        counted: bool,
        tenant: &TenantKey,
        job: &Job,
    ) -> Result<bool> {
        let id = job.wire.job_id;
        let cols = JobColumns::of(job)?;
        let sql = if counted {
            INSERT_JOB_COUNTED
        } else {
            INSERT_JOB
        };
        let params: [&(dyn ToSql + Sync); 11] = [
            &id,
            &cols.seq,
            &&tenant.0[..],
            &job.wire.destination_tenant_id,
            &cols.destination_key,
            &cols.status,
            &cols.queued,
            &job.wire.source_region_id,
            &job.wire.destination_region_id,
            &Json(job),
            // Only the counted statement has an eleventh parameter.
            &self.shard,
        ];
        let new = self
            .opt(c, sql, &params[..10 + usize::from(counted)])
            .await?;
        if new.is_some() {
            return Ok(true);
        }
        let old: Option<JobWire> = match self
            .opt(c, "SELECT record FROM jobs WHERE id = $1", &[&id])
            .await?
        {
            Some(row) => Some(record(&row, 0)?),
            None => None,
        };
        if old.as_ref() != Some(&job.wire) {
            return Err(ServiceError::Conflict(format!(
                "job {id} already exists with different content"
            )));
        }
        Ok(false)
    }

    /// [`Registry::token_holder`]'s one query.
    async fn token_holder(&self, id: Uuid) -> Result<Option<TokenHolder>> {
        let c = self.client().await?;
        // The tenant's key from the token's tenant id, as `TenantKey::parse` reads it (32 hex
        // digits, or a hyphenated UUID), and no key otherwise.
        let row = self
            .opt(
                &c,
                "SELECT t.record, u.record, te.key IS NOT NULL FROM tokens t \
                 LEFT JOIN users u ON u.name = t.record->>'user' \
                 LEFT JOIN tenants te ON te.key = CASE WHEN t.record->>'tenant' ~ \
                 '^([0-9a-fA-F]{32}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$' \
                 THEN decode(replace(t.record->>'tenant', '-', ''), 'hex') END \
                 WHERE t.id = $1",
                &[&id],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let user: Option<Json<User>> = get(&row, 1)?;
        Ok(Some(TokenHolder {
            token: record(&row, 0)?,
            user: user.map(|json| json.0),
            tenant_exists: get(&row, 2)?,
        }))
    }

    fn lease_secs(&self) -> f64 {
        self.lease_ms.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

/// Column `i` of `row`, or a store error (never a panic).
fn get<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, i: usize) -> Result<T> {
    row.try_get(i)
        .map_err(|e| ServiceError::internal("corrupt record in PostgreSQL", e))
}

/// The JSON record in column `i` of `row`.
fn record<T: DeserializeOwned>(row: &Row, i: usize) -> Result<T> {
    row.try_get::<_, Json<T>>(i)
        .map(|json| json.0)
        .map_err(|e| ServiceError::internal("corrupt record in PostgreSQL", e))
}

fn to_i64(n: u64, what: &str) -> Result<i64> {
    i64::try_from(n).map_err(|_| ServiceError::Internal(format!("{what} {n} is too large")))
}

/// The columns of a job besides its id and record.
struct JobColumns {
    seq: i64,
    status: &'static str,
    queued: bool,
    destination_key: Option<Vec<u8>>,
}

impl JobColumns {
    fn of(job: &Job) -> Result<JobColumns> {
        Ok(JobColumns {
            seq: to_i64(job.seq, "sequence number")?,
            status: job.wire.status.as_str(),
            // A job is queued for the worker exactly while it is enqueued and not terminal.
            queued: job.enqueued && !job.wire.status.is_terminal(),
            destination_key: TenantKey::parse(&job.wire.destination_tenant_id)
                .map(|k| k.0.to_vec()),
        })
    }
}

/// Counts a job write in shard `$1` ([`Jobs::jobs_version`]).
const BUMP: &str = "UPDATE jobs_changes_shards SET n = n + 1 WHERE shard = $1";

/// A job's row, new; no row back if its id exists.
const INSERT_JOB: &str = "INSERT INTO jobs (id, seq, source_tenant, destination_tenant, \
     destination_key, status, queued, source_region, destination_region, record) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING RETURNING 1";

/// [`INSERT_JOB`] that counts the write in shard `$11` if the job is new: one statement.
const INSERT_JOB_COUNTED: &str = "WITH new AS (INSERT INTO jobs (id, seq, source_tenant, \
     destination_tenant, destination_key, status, queued, source_region, destination_region, \
     record) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING \
     RETURNING 1), counted AS (UPDATE jobs_changes_shards SET n = n + 1 \
     WHERE shard = $11 AND EXISTS (SELECT 1 FROM new)) SELECT 1 FROM new";

/// A connection and the single-thread runtime that drives it, used by one call at a time.
/// Between calls nothing polls the connection: a call first lets the runtime take in what the
/// socket got meanwhile (see [`PgStore::run_raw`]).
struct Lane {
    /// `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
    db: Arc<Db>,
}

impl Drop for Lane {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime's task.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

pub struct PgStore {
    /// The lanes not in use.
    lanes: Mutex<Vec<Lane>>,
    /// Connections for the reads that tasks of an async runtime make without blocking its
    /// worker (authentication): they live on the runtime that first asked.
    on_tasks: Option<Arc<Db>>,
    /// Signalled when a lane is put back.
    lane_back: Condvar,
    node: String,
    shown: String,
    lease_ms: Arc<AtomicU64>,
    /// [`Jobs::jobs_version`] while the database does not answer.
    fallback: AtomicU64,
    /// [`Jobs::jobs_version`] found the database not answering.
    outage: AtomicBool,
}

/// A lane taken by a call; put back when dropped.
struct Taken<'a> {
    store: &'a PgStore,
    lane: Option<Lane>,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Some(lane) = self.lane.take() {
            let mut lanes = self
                .store
                .lanes
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            lanes.push(lane);
            drop(lanes);
            self.store.lane_back.notify_one();
        }
    }
}

/// Why connecting failed, for [`OpenError::Other`].
fn connect_reason(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.code().code() {
            "28P01" | "28000" => format!("authentication failed: {}", db.message()),
            "3D000" => format!("the database does not exist: {}", db.message()),
            "42501" => format!("permission denied: {}", db.message()),
            _ => format!("{}: {}", db.code().code(), db.message()),
        },
        None => {
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                let more = c.to_string();
                if !text.contains(&more) {
                    text = format!("{text}: {more}");
                }
                cause = c.source();
            }
            if text.ends_with("password missing") {
                text.push_str(" (give it in PGPASSWORD or a line of ~/.pgpass)");
            }
            if text.starts_with("error performing TLS handshake") {
                text.push_str(" (the server's certificate must chain to the system's roots or to --database-ca-file, and name the URL's host)");
            }
            format!("cannot connect: {text}")
        }
    }
}

/// The password of a URL that has none, as libpq finds it: `PGPASSWORD`, else the line of the
/// password file (`PGPASSFILE`, else `~/.pgpass`) for the URL's first host, port, database and
/// user. A password file that others may read is ignored with a warning, as libpq does.
fn password_from_env(config: &mut tokio_postgres::Config) {
    if config.get_password().is_some() {
        return;
    }
    if let Some(pw) = std::env::var_os("PGPASSWORD").filter(|v| !v.is_empty()) {
        config.password(pw.as_encoded_bytes());
        return;
    }
    let Some(user) = config.get_user().map(str::to_string) else {
        return;
    };
    let path = match (std::env::var_os("PGPASSFILE"), std::env::var_os("HOME")) {
        (Some(file), _) => std::path::PathBuf::from(file),
        (None, Some(home)) => Path::new(&home).join(".pgpass"),
        (None, None) => return,
    };
    let Ok(meta) = std::fs::metadata(&path) else {
        return;
    };
    if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077 != 0 {
        tracing::warn!(
            file = %path.display(),
            "the password file may be read by others and is ignored: make it u=rw (0600) or less"
        );
        return;
    }
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(name)) => name.clone(),
        Some(tokio_postgres::config::Host::Unix(dir)) => dir.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let db = config.get_dbname().unwrap_or(&user).to_string();
    if let Some(pw) = pgpass_lookup(&text, &host, &port, &db, &user) {
        config.password(pw);
    }
}

/// The password of the first line of a password file (`host:port:db:user:password`, `*`
/// matching anything, `\:` and `\\` escaped) that matches. A Unix socket's directory also
/// matches `localhost`.
fn pgpass_lookup(text: &str, host: &str, port: &str, db: &str, user: &str) -> Option<String> {
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = vec![String::new()];
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(next) = chars.next() {
                        fields.last_mut()?.push(next);
                    }
                }
                ':' if fields.len() < 5 => fields.push(String::new()),
                _ => fields.last_mut()?.push(c),
            }
        }
        let Ok([h, p, d, u, password]) = <[String; 5]>::try_from(fields) else {
            continue;
        };
        let fits = |field: &str, value: &str| field == "*" || field == value;
        let host_fits = fits(&h, host) || (host.starts_with('/') && h == "localhost");
        if host_fits && fits(&p, port) && fits(&d, db) && fits(&u, user) {
            return Some(password);
        }
    }
    None
}

/// How the pool's connections are encrypted. `sslmode=require` or `--database-ca-file`: TLS,
/// the server's certificate verified against the system's roots (Mozilla's, as `webpki-roots`
/// carries them) and the certificates of `ca_file`, its name against the URL's host; a
/// certificate that does not verify ends the connection. Else (`disable`, and `prefer`, the
/// URL's default): plain, as before TLS was supported.
fn tls(
    config: &mut tokio_postgres::Config,
    ca_file: Option<&Path>,
) -> std::result::Result<Option<MakeRustlsConnect>, String> {
    match (config.get_ssl_mode(), ca_file) {
        (SslMode::Disable, Some(_)) => {
            return Err("--database-ca-file is for TLS, and the URL says sslmode=disable".into())
        }
        (_, Some(_)) => {
            config.ssl_mode(SslMode::Require);
        }
        (SslMode::Require, None) => {}
        (_, None) => {
            config.ssl_mode(SslMode::Disable);
            return Ok(None);
        }
    }
    if config
        .get_hosts()
        .iter()
        .any(|h| matches!(h, tokio_postgres::config::Host::Unix(_)))
    {
        return Err(
            "TLS (sslmode=require, --database-ca-file) needs the server's host name in the URL: a Unix socket is not encrypted".into(),
        );
    }
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        for cert in crate::net::pem_certificates(path, "the CA file")? {
            roots.add(cert).map_err(|e| {
                format!(
                    "the CA file {} holds a certificate rustls refuses: {e}",
                    path.display()
                )
            })?;
        }
    }
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("cannot set up TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Some(MakeRustlsConnect::new(config)))
}

fn connect_pool_reason(e: PoolError) -> String {
    match e {
        PoolError::Backend(e) => connect_reason(&e),
        PoolError::Timeout(_) => {
            format!("cannot connect: no answer within {} s", POOL_WAIT.as_secs())
        }
        other => format!("cannot connect: {other}"),
    }
}

impl PgStore {
    /// Connects to the database at `url` with at most `pool` connections, as appliance `node`,
    /// creating or migrating the schema.
    pub fn connect(
        url: &str,
        pool: usize,
        node: &str,
        ca_file: Option<&Path>,
    ) -> std::result::Result<PgStore, OpenError> {
        let shown = redacted(url);
        let fail = |reason: String| OpenError::Other {
            path: shown.clone(),
            reason,
        };
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| fail(format!("not a PostgreSQL connection URL: {e}")))?;
        let tls = tls(&mut config, ca_file).map_err(fail)?;
        password_from_env(&mut config);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(POOL_WAIT);
        }
        if config.get_application_name().is_none() {
            config.application_name("image-replicator");
        }
        let lease_ms = Arc::new(AtomicU64::new(LEASE.as_millis() as u64));
        // Where this appliance's lanes start in `jobs_changes_shards`, so that two appliances
        // rarely share rows.
        let first_shard = node
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let db = |size: usize, shard: usize| -> std::result::Result<Arc<Db>, OpenError> {
            let recycling = || ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            };
            let manager = match &tls {
                Some(tls) => Manager::from_config(config.clone(), tls.clone(), recycling()),
                None => Manager::from_config(config.clone(), NoTls, recycling()),
            };
            let pool = Pool::builder(manager)
                .max_size(size)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(POOL_WAIT))
                .create_timeout(Some(POOL_WAIT))
                .recycle_timeout(Some(POOL_WAIT))
                .build()
                .map_err(|e| fail(format!("cannot make its connection pool: {e}")))?;
            Ok(Arc::new(Db {
                pool,
                node: node.to_string(),
                lease_ms: Arc::clone(&lease_ms),
                shown: shown.clone(),
                shard: ((first_shard as usize + shard) % CHANGE_SHARDS as usize) as i16,
            }))
        };
        // Of `pool` connections, a quarter for async tasks (none below 4), the rest lanes: at
        // least two, as a quota check holds one while others count.
        let pool = pool.max(2);
        let on_tasks = pool / 4;
        let lanes = (0..pool - on_tasks)
            .map(|lane| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| fail(format!("cannot start a runtime: {e}")))?;
                Ok(Lane {
                    runtime: Some(runtime),
                    db: db(1, lane)?,
                })
            })
            .collect::<std::result::Result<Vec<_>, OpenError>>()?;
        let on_tasks = match on_tasks {
            0 => None,
            n => Some(db(n, pool - n)?),
        };
        let store = PgStore {
            lanes: Mutex::new(lanes),
            on_tasks,
            lane_back: Condvar::new(),
            node: node.to_string(),
            shown: shown.clone(),
            lease_ms,
            fallback: AtomicU64::new(0),
            outage: AtomicBool::new(false),
        };
        let migrated = store.run_raw(|db| async move { migrate(&db).await });
        match migrated {
            Ok(Ok(())) => Ok(store),
            Ok(Err(reason)) => Err(fail(reason)),
            Err(e) => Err(fail(e.to_string())),
        }
    }

    /// The same store with claims that last `lease` instead of [`LEASE`] (tests of takeovers).
    #[doc(hidden)]
    pub fn with_lease(self, lease: Duration) -> PgStore {
        self.lease_ms
            .store(lease.as_millis() as u64, Ordering::Relaxed);
        self
    }

    /// A free lane, waiting up to [`POOL_WAIT`] for one to be put back.
    fn take_lane(&self) -> Result<Taken<'_>> {
        let deadline = Instant::now() + POOL_WAIT;
        let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(lane) = lanes.pop() {
                return Ok(Taken {
                    store: self,
                    lane: Some(lane),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(no_connection(&self.shown));
            }
            lanes = self
                .lane_back
                .wait_timeout(lanes, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Runs `work` on a free lane, on this thread (or, called from a current-thread runtime's
    /// task, on a thread of its own), and waits for its result.
    fn run_raw<T, F, Fut>(&self, work: F) -> Result<T>
    where
        F: FnOnce(Arc<Db>) -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        blocking(move || {
            let taken = self.take_lane()?;
            drive(&taken, work)
        })
    }

    fn run<T, F, Fut>(&self, work: F) -> Result<T>
    where
        F: FnOnce(Arc<Db>) -> Fut + Send,
        Fut: Future<Output = Result<T>>,
        T: Send,
    {
        self.run_raw(work)?
    }
}

/// Creates the schema, or checks the one there, under the migration lock.
async fn migrate(db: &Db) -> std::result::Result<(), String> {
    let mut c = db.pool.get().await.map_err(connect_pool_reason)?;
    let tx = c.transaction().await.map_err(|e| connect_reason(&e))?;
    let step =
        |e: tokio_postgres::Error| format!("cannot create the schema: {}", connect_reason(&e));
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(step)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        .await
        .map_err(step)?;
    let row = tx
        .query_one("SELECT max(version) FROM schema_version", &[])
        .await
        .map_err(step)?;
    let version: Option<i32> = row.try_get(0).map_err(step)?;
    match version {
        None => {
            tx.batch_execute(SCHEMA_V1).await.map_err(step)?;
            tx.batch_execute(SCHEMA_V2).await.map_err(step)?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES ($1)",
                &[&SCHEMA_VERSION],
            )
            .await
            .map_err(step)?;
        }
        Some(1) => {
            tx.batch_execute(SCHEMA_V2).await.map_err(step)?;
            tx.execute("UPDATE schema_version SET version = $1", &[&SCHEMA_VERSION])
                .await
                .map_err(step)?;
        }
        Some(v) if v > SCHEMA_VERSION => {
            return Err(format!(
                "its schema is version {v}, newer than this binary's {SCHEMA_VERSION}: \
                 run a newer image-replicator"
            ))
        }
        Some(_) => {}
    }
    tx.commit().await.map_err(step)?;
    let row = c
        .query_one("SHOW synchronous_commit", &[])
        .await
        .map_err(|e| connect_reason(&e))?;
    let sync: String = row.try_get(0).map_err(|e| connect_reason(&e))?;
    if sync == "off" || sync == "local" {
        tracing::warn!(
            database = %db.shown,
            "synchronous_commit is {sync}: a write the store acknowledged may be lost with the \
             database server (or its replica)"
        );
    }
    Ok(())
}

/// Runs `work`, which blocks, on this thread, or, called from a current-thread runtime's task,
/// on a thread of its own.
fn blocking<T: Send>(work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Err(_) => work(),
        Ok(tokio::runtime::RuntimeFlavor::CurrentThread) => std::thread::scope(|scope| {
            scope
                .spawn(work)
                .join()
                .unwrap_or_else(|_| Err(task_stopped()))
        }),
        // A worker's other tasks move to another thread meanwhile; on a thread of
        // `spawn_blocking` this only calls `work`.
        Ok(_) => tokio::task::block_in_place(work),
    }
}

/// Runs `work` on the lane `taken`, driving its runtime on this thread (see [`blocking`]).
fn drive<T, F, Fut>(taken: &Taken<'_>, work: F) -> Result<T>
where
    F: FnOnce(Arc<Db>) -> Fut,
    Fut: Future<Output = T>,
{
    let lane = taken.lane.as_ref().ok_or_else(task_stopped)?;
    let runtime = lane.runtime.as_ref().ok_or_else(task_stopped)?;
    let db = Arc::clone(&lane.db);
    Ok(runtime.block_on(async move {
        // Nothing polled the connection since the last call: the first yield lets the
        // runtime read what its socket got meanwhile (a server that closed it), the second
        // lets the connection's task act on it, so that the pool replaces a dead connection
        // instead of handing it out.
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        work(db).await
    }))
}

fn task_stopped() -> ServiceError {
    ServiceError::Internal(format!("{STORE_ERROR}: a PostgreSQL call stopped"))
}

impl PgStore {
    /// [`Jobs::jobs`] and [`Jobs::job_wires`]: records in creation order, read in batches
    /// until `limit` of them pass `keep` (which runs here, on the caller's thread).
    fn select<T: DeserializeOwned + Send + 'static>(
        &self,
        query: &JobQuery,
        keep: &dyn Fn(&T) -> bool,
    ) -> Result<Vec<T>> {
        let JobQuery {
            tenant,
            after,
            limit,
        } = *query;
        let mut out = Vec::new();
        let mut from: i64 = match after {
            None => 0,
            Some(after) => match i64::try_from(after) {
                Ok(after) if after < i64::MAX => after + 1,
                _ => return Ok(out),
            },
        };
        if limit == 0 {
            return Ok(out);
        }
        let batch = limit.clamp(16, LIST_BATCH);
        let tenant = tenant.map(|t| t.0.to_vec());
        loop {
            let tenant = tenant.clone();
            let rows: Vec<(i64, T)> = self.run(move |db| async move {
                let c = db.client().await?;
                let n = batch as i64;
                let rows = match &tenant {
                    Some(t) => {
                        db.query(
                            &c,
                            "SELECT seq, record FROM jobs WHERE source_tenant = $1 AND seq >= $2 \
                             ORDER BY seq LIMIT $3",
                            &[t, &from, &n],
                        )
                        .await?
                    }
                    None => {
                        db.query(
                            &c,
                            "SELECT seq, record FROM jobs WHERE seq >= $1 ORDER BY seq LIMIT $2",
                            &[&from, &n],
                        )
                        .await?
                    }
                };
                rows.iter()
                    .map(|row| Ok((get::<i64>(row, 0)?, record::<T>(row, 1)?)))
                    .collect()
            })?;
            let full = rows.len() == batch;
            for (seq, item) in rows {
                from = seq.saturating_add(1);
                if keep(&item) {
                    out.push(item);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
            if !full {
                return Ok(out);
            }
        }
    }
}

impl Repo for PgStore {
    /// Nothing to do: every write has committed before its call returned, and a commit is
    /// durable once PostgreSQL acknowledges it (`synchronous_commit`, on unless an operator
    /// turned it off: [`PgStore::connect`] warns then).
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn writable(&self) -> std::result::Result<(), ServiceError> {
        self.run(|db| async move {
            let c = db.client().await.map_err(|_| {
                ServiceError::Unavailable(format!(
                    "the database at {} does not answer; nothing was changed; requests succeed \
                     again once it is back",
                    db.shown
                ))
            })?;
            db.query(&c, "SELECT 1", &[]).await.map(drop)
        })
    }

    fn node(&self) -> &str {
        &self.node
    }

    fn shared(&self) -> bool {
        true
    }

    /// A session advisory lock, on a lane kept out of use until the guard goes (the work it
    /// orders runs on other lanes: the lock orders it whatever the connection). It waits up to
    /// [`POOL_WAIT`] for another appliance's hold, asking every millisecond or so (a blocked
    /// `pg_advisory_lock` could not be given up without losing the connection). An appliance
    /// that dies holding it loses it with its connection.
    fn lock(&self, what: Exclusive) -> Result<StoreLock<'_>> {
        let (key, busy) = match what {
            Exclusive::Quotas => (QUOTA_LOCK, "checking a job against the quotas"),
            Exclusive::Seed => (SEED_LOCK, "seeding jobs (one job seed at a time)"),
        };
        let taken = blocking(|| {
            let taken = self.take_lane()?;
            drive(&taken, |db| async move {
                let deadline = tokio::time::Instant::now() + POOL_WAIT;
                let c = db.client().await?;
                loop {
                    let row = db
                        .opt(&c, "SELECT pg_try_advisory_lock($1)", &[&key])
                        .await?;
                    if row.map(|r| get::<bool>(&r, 0)).transpose()? == Some(true) {
                        return Ok(());
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ServiceError::Unavailable(format!(
                            "another appliance of this database has been {busy} for {} s; try again once it is done",
                            POOL_WAIT.as_secs()
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })??;
            Ok(taken)
        })?;
        // The lane goes back to the others when the release (which owns it) ends.
        Ok(StoreLock::releasing(move || {
            let released = blocking(|| {
                drive(&taken, |db| async move {
                    let c = db.client().await?;
                    let unlocked = db.exec(&c, "SELECT pg_advisory_unlock($1)", &[&key]).await;
                    if unlocked.is_err() {
                        // Not knowing whether it holds the lock, the connection goes, and the
                        // lock with it.
                        drop(deadpool_postgres::Object::take(c));
                    }
                    unlocked
                })?
            });
            if let Err(e) = released {
                tracing::warn!(lock = ?what, "the lock went with its connection: {e}");
            }
        }))
    }

    fn copy_inputs(&self, image: Uuid, tenant: TenantKey) -> Result<CopyInputs> {
        self.run(move |db| async move {
            let c = db.client().await?;
            let row = db
                .opt(
                    &c,
                    "SELECT i.record, t.record, (SELECT json_agg(r.record) FROM regions r \
                     WHERE r.id = i.record->>'region' OR r.id = t.record->>'region'), \
                     nextval('job_seq') \
                     FROM (SELECT 1) one \
                     LEFT JOIN images i ON i.id = $1 \
                     LEFT JOIN tenants t ON t.key = $2",
                    &[&image, &&tenant.0[..]],
                )
                .await?
                .ok_or_else(|| ServiceError::Internal("no row of copy inputs".into()))?;
            let image: Option<Json<Image>> = get(&row, 0)?;
            let tenant: Option<Json<Tenant>> = get(&row, 1)?;
            let regions: Option<Json<Vec<Region>>> = get(&row, 2)?;
            let seq: i64 = get(&row, 3)?;
            Ok(CopyInputs {
                image: image.map(|json| json.0),
                tenant: tenant.map(|json| json.0),
                regions: regions.map(|json| json.0).unwrap_or_default(),
                seq: u64::try_from(seq)
                    .map_err(|_| ServiceError::Internal("negative sequence number".into()))?,
            })
        })
    }
}

impl Registry for PgStore {
    fn region(&self, id: &str) -> Result<Option<Region>> {
        if id.contains('\0') {
            return Ok(None);
        }
        let id = id.to_string();
        self.run(|db| async move {
            db.one_record("SELECT record FROM regions WHERE id = $1", &[&id])
                .await
        })
    }

    fn regions(&self) -> Result<Vec<Region>> {
        self.run(|db| async move {
            let c = db.client().await?;
            db.records(
                &c,
                "SELECT record FROM regions ORDER BY id COLLATE \"C\"",
                &[],
            )
            .await
        })
    }

    fn insert_region(&self, region: &Region) -> Result<bool> {
        let region = region.clone();
        self.run(|db| async move {
            let c = db.client().await?;
            let n = db
                .exec(
                    &c,
                    "INSERT INTO regions (id, pin, record) VALUES ($1, $2, $3) \
                     ON CONFLICT (id) DO NOTHING",
                    &[&region.id, &region.pin, &Json(&region)],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn remove_region(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.run(|db| async move {
            let c = db.client().await?;
            db.exec(&c, "DELETE FROM regions WHERE id = $1", &[&id])
                .await
                .map(drop)
        })
    }

    fn tenant(&self, key: TenantKey) -> Result<Option<Tenant>> {
        self.run(move |db| async move {
            db.one_record("SELECT record FROM tenants WHERE key = $1", &[&&key.0[..]])
                .await
        })
    }

    fn tenants(&self) -> Result<Vec<Tenant>> {
        self.run(|db| async move {
            let c = db.client().await?;
            db.records(&c, "SELECT record FROM tenants ORDER BY key", &[])
                .await
        })
    }

    fn insert_tenant(&self, key: TenantKey, tenant: &Tenant) -> Result<bool> {
        let tenant = tenant.clone();
        self.run(move |db| async move {
            let c = db.client().await?;
            let n = db
                .exec(
                    &c,
                    "INSERT INTO tenants (key, record) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                    &[&&key.0[..], &Json(&tenant)],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn update_tenant(&self, key: TenantKey, tenant: &Tenant) -> Result<bool> {
        let tenant = tenant.clone();
        self.run(move |db| async move {
            let c = db.client().await?;
            let n = db
                .exec(
                    &c,
                    "UPDATE tenants SET record = $2 WHERE key = $1",
                    &[&&key.0[..], &Json(&tenant)],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn remove_tenant(&self, key: TenantKey) -> Result<()> {
        self.run(move |db| async move {
            let c = db.client().await?;
            db.exec(&c, "DELETE FROM tenants WHERE key = $1", &[&&key.0[..]])
                .await
                .map(drop)
        })
    }

    fn user(&self, name: &str) -> Result<Option<User>> {
        if name.contains('\0') {
            return Ok(None);
        }
        let name = name.to_string();
        self.run(|db| async move {
            db.one_record("SELECT record FROM users WHERE name = $1", &[&name])
                .await
        })
    }

    fn users(&self) -> Result<Vec<User>> {
        self.run(|db| async move {
            let c = db.client().await?;
            db.records(
                &c,
                "SELECT record FROM users ORDER BY name COLLATE \"C\"",
                &[],
            )
            .await
        })
    }

    fn insert_user(&self, user: &User) -> Result<bool> {
        let user = user.clone();
        self.run(|db| async move {
            let c = db.client().await?;
            let n = db
                .exec(
                    &c,
                    "INSERT INTO users (name, record) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                    &[&user.name, &Json(&user)],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn update_user(&self, user: &User) -> Result<bool> {
        let user = user.clone();
        self.run(|db| async move {
            let c = db.client().await?;
            let n = db
                .exec(
                    &c,
                    "UPDATE users SET record = $2 WHERE name = $1",
                    &[&user.name, &Json(&user)],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn remove_user(&self, name: &str) -> Result<usize> {
        let name = name.to_string();
        self.run(|db| async move {
            let mut c = db.client().await?;
            let tx = c.transaction().await.map_err(|e| db.error(e))?;
            db.exec(&tx, "DELETE FROM users WHERE name = $1", &[&name])
                .await?;
            let tokens = db
                .exec(&tx, "DELETE FROM tokens WHERE user_name = $1", &[&name])
                .await?;
            db.commit(tx).await?;
            Ok(tokens as usize)
        })
    }

    fn token(&self, id: Uuid) -> Result<Option<TokenRecord>> {
        self.run(move |db| async move {
            db.one_record("SELECT record FROM tokens WHERE id = $1", &[&id])
                .await
        })
    }

    fn token_holder(&self, id: Uuid) -> Result<Option<TokenHolder>> {
        self.run(move |db| async move { db.token_holder(id).await })
    }

    /// On the caller's runtime, with the connections kept for its tasks (if the pool has
    /// room for them: see [`PgStore::connect`]).
    fn token_holder_async(&self, id: Uuid) -> BoxFuture<'_, Result<Option<TokenHolder>>> {
        match &self.on_tasks {
            Some(db) => Box::pin(db.token_holder(id)),
            None => Box::pin(std::future::ready(self.token_holder(id))),
        }
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.run(|db| async move {
            let c = db.client().await?;
            db.records(&c, "SELECT record FROM tokens ORDER BY id", &[])
                .await
        })
    }

    fn token_candidates(&self, lookup: &[u8]) -> Result<Vec<TokenRecord>> {
        // The record with that lookup, and records with the 4-byte lookup of earlier versions
        // that is its prefix (usually none).
        let full = lookup.to_vec();
        let legacy = lookup
            .get(..crate::model::LEGACY_LOOKUP_LEN)
            .unwrap_or(lookup)
            .to_vec();
        self.run(|db| async move {
            let c = db.client().await?;
            db.records(
                &c,
                "SELECT record FROM tokens WHERE lookup = $1 OR lookup = $2 ORDER BY lookup, id",
                &[&full, &legacy],
            )
            .await
        })
    }

    fn insert_token(&self, token: &TokenRecord, lookup: &[u8]) -> Result<()> {
        let token = token.clone();
        let lookup = lookup.to_vec();
        self.run(|db| async move {
            let c = db.client().await?;
            db.exec(
                &c,
                "INSERT INTO tokens (id, lookup, user_name, record) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (id) DO UPDATE SET lookup = excluded.lookup, \
                 user_name = excluded.user_name, record = excluded.record",
                &[&token.info.id, &lookup, &token.info.user, &Json(&token)],
            )
            .await
            .map(drop)
        })
    }

    fn update_token(&self, token: &TokenRecord) -> Result<()> {
        let token = token.clone();
        self.run(|db| async move {
            let c = db.client().await?;
            db.exec(
                &c,
                "UPDATE tokens SET user_name = $2, record = $3 WHERE id = $1",
                &[&token.info.id, &token.info.user, &Json(&token)],
            )
            .await
            .map(drop)
        })
    }

    fn set_token_lookup(&self, id: Uuid, lookup: &[u8]) -> Result<()> {
        let lookup = lookup.to_vec();
        self.run(move |db| async move {
            let mut c = db.client().await?;
            let tx = c.transaction().await.map_err(|e| db.error(e))?;
            let row = db
                .opt(
                    &tx,
                    "SELECT record FROM tokens WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .await?;
            let Some(row) = row else {
                return Ok(());
            };
            let mut token: TokenRecord = record(&row, 0)?;
            token.lookup = crate::model::to_hex(&lookup);
            db.exec(
                &tx,
                "UPDATE tokens SET lookup = $2, record = $3 WHERE id = $1",
                &[&id, &lookup, &Json(&token)],
            )
            .await?;
            db.commit(tx).await
        })
    }

    fn image(&self, id: Uuid) -> Result<Option<Image>> {
        self.run(move |db| async move {
            db.one_record("SELECT record FROM images WHERE id = $1", &[&id])
                .await
        })
    }

    fn images(&self, owner: Option<TenantKey>) -> Result<Vec<Image>> {
        self.run(move |db| async move {
            let c = db.client().await?;
            match owner {
                Some(owner) => {
                    db.records(
                        &c,
                        "SELECT record FROM images WHERE owner = $1 ORDER BY id",
                        &[&&owner.0[..]],
                    )
                    .await
                }
                None => {
                    db.records(&c, "SELECT record FROM images ORDER BY id", &[])
                        .await
                }
            }
        })
    }

    fn insert_image(&self, owner: TenantKey, image: &Image) -> Result<()> {
        let image = image.clone();
        self.run(move |db| async move {
            let mut c = db.client().await?;
            let tx = c.transaction().await.map_err(|e| db.error(e))?;
            let n = db
                .exec(
                    &tx,
                    "INSERT INTO images (id, owner, record) VALUES ($1, $2, $3) \
                     ON CONFLICT (id) DO NOTHING",
                    &[&image.id, &&owner.0[..], &Json(&image)],
                )
                .await?;
            if n == 0 {
                return Err(ServiceError::Conflict(format!(
                    "an image with id {} already exists",
                    image.id
                )));
            }
            db.index_stored(&tx, owner, image.id).await?;
            db.commit(tx).await
        })
    }

    fn update_image(&self, image: &Image) -> Result<()> {
        let image = image.clone();
        self.run(|db| async move {
            let c = db.client().await?;
            db.exec(
                &c,
                "UPDATE images SET record = $2 WHERE id = $1",
                &[&image.id, &Json(&image)],
            )
            .await
            .map(drop)
        })
    }

    fn remove_image(&self, _owner: TenantKey, id: Uuid) -> Result<()> {
        self.run(move |db| async move {
            let mut c = db.client().await?;
            let tx = c.transaction().await.map_err(|e| db.error(e))?;
            db.exec(&tx, "DELETE FROM images WHERE id = $1", &[&id])
                .await?;
            db.drop_manifest(&tx, id).await?;
            db.commit(tx).await
        })
    }

    fn manifest(&self, id: Uuid) -> Result<Option<Vec<u8>>> {
        self.run(move |db| async move {
            let c = db.client().await?;
            db.opt(&c, "SELECT body FROM manifests WHERE image = $1", &[&id])
                .await?
                .map(|row| get::<Vec<u8>>(&row, 0))
                .transpose()
        })
    }

    fn put_manifest(&self, id: Uuid, manifest: &[u8]) -> Result<()> {
        let entries = Manifest::decode(manifest)
            .ok()
            .filter(Manifest::is_complete)
            .map(|m| m.first_indexes());
        let manifest = manifest.to_vec();
        self.run(move |db| async move {
            let mut c = db.client().await?;
            if entries.is_some() {
                // The same complete manifest again, indexed: its entries are there.
                let same = db
                    .opt(
                        &c,
                        "SELECT 1 FROM manifests m WHERE m.image = $1 AND m.body = $2 \
                         AND EXISTS (SELECT 1 FROM chunks WHERE image = $1)",
                        &[&id, &manifest],
                    )
                    .await?;
                if same.is_some() {
                    return Ok(());
                }
            }
            let tx = c.transaction().await.map_err(|e| db.error(e))?;
            db.exec(
                &tx,
                "INSERT INTO manifests (image, body) VALUES ($1, $2) \
                 ON CONFLICT (image) DO UPDATE SET body = excluded.body",
                &[&id, &manifest],
            )
            .await?;
            db.exec(&tx, "DELETE FROM chunks WHERE image = $1", &[&id])
                .await?;
            if let Some(entries) = entries {
                // Indexed under the record's owner; without a record, by its insert.
                let image: Option<Image> = match db
                    .opt(&tx, "SELECT record FROM images WHERE id = $1", &[&id])
                    .await?
                {
                    Some(row) => Some(record(&row, 0)?),
                    None => None,
                };
                if let Some(owner) = image.and_then(|i| TenantKey::parse(&i.owner)) {
                    db.index(&tx, owner, id, &entries).await?;
                }
            }
            db.commit(tx).await
        })
    }

    fn remove_manifest(&self, id: Uuid) -> Result<()> {
        self.run(move |db| async move {
            let mut c = db.client().await?;
            let tx = c.transaction().await.map_err(|e| db.error(e))?;
            db.drop_manifest(&tx, id).await?;
            db.commit(tx).await
        })
    }

    fn chunk_holders(
        &self,
        owner: TenantKey,
        hash: &Hash,
        limit: usize,
    ) -> Result<Vec<(Uuid, u32)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let hash = hash.to_vec();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |db| async move {
            let c = db.client().await?;
            let rows = db
                .query(
                    &c,
                    "SELECT image, first_index FROM chunks WHERE owner = $1 AND hash = $2 \
                     ORDER BY image LIMIT $3",
                    &[&&owner.0[..], &hash, &limit],
                )
                .await?;
            rows.iter()
                .map(|row| {
                    let index = u32::try_from(get::<i64>(row, 1)?)
                        .map_err(|_| ServiceError::Internal("corrupt chunk index entry".into()))?;
                    Ok((get::<Uuid>(row, 0)?, index))
                })
                .collect()
        })
    }
}

/// Writes what a job update does to an image, in its transaction.
async fn apply_image_change(db: &Db, c: &impl GenericClient, change: ImageChange) -> Result<()> {
    match change {
        ImageChange::None => Ok(()),
        ImageChange::Insert(owner, image) => {
            db.put_image(c, owner, &image).await?;
            db.index_stored(c, owner, image.id).await
        }
        ImageChange::Put(image) => db
            .exec(
                c,
                "UPDATE images SET record = $2 WHERE id = $1",
                &[&image.id, &Json(&image)],
            )
            .await
            .map(drop),
        ImageChange::Remove(_, id) => {
            db.exec(c, "DELETE FROM images WHERE id = $1", &[&id])
                .await?;
            db.drop_manifest(c, id).await
        }
    }
}

/// The statuses whose jobs have a cancel asked for ([`Job::cancel_asked`]).
const CANCEL_ASKED: &str = "status IN ('cancel_requested', 'canceling')";

impl Jobs for PgStore {
    fn next_seq(&self) -> Result<u64> {
        self.run(|db| async move {
            let c = db.client().await?;
            let row = db.opt(&c, "SELECT nextval('job_seq')", &[]).await?;
            let seq: i64 = match row {
                Some(row) => get(&row, 0)?,
                None => return Err(ServiceError::Internal("no sequence number".into())),
            };
            u64::try_from(seq)
                .map_err(|_| ServiceError::Internal("negative sequence number".into()))
        })
    }

    fn job(&self, id: Uuid) -> Result<Option<Job>> {
        self.run(move |db| async move {
            db.one_record("SELECT record FROM jobs WHERE id = $1", &[&id])
                .await
        })
    }

    fn insert_jobs(&self, jobs: &[(TenantKey, Job)]) -> Result<usize> {
        let jobs = jobs.to_vec();
        self.run(|db| async move {
            let mut c = db.client().await?;
            if let [(tenant, job)] = jobs.as_slice() {
                // One new job (a copy request): one statement, counted in it.
                let new = db.insert_job(&c, true, tenant, job).await?;
                return Ok(usize::from(new));
            }
            let tx = c.transaction().await.map_err(|e| db.error(e))?;
            let mut inserted = 0;
            for (tenant, job) in &jobs {
                inserted += usize::from(db.insert_job(&tx, false, tenant, job).await?);
            }
            if inserted > 0 {
                db.bump(&tx).await?;
            }
            db.commit(tx).await?;
            Ok(inserted)
        })
    }

    fn update_job(
        &self,
        id: Uuid,
        change: &(dyn Fn(&mut Job) -> Result<ImageChange> + Sync),
    ) -> Result<Option<Job>> {
        self.run(|db| async move {
            let mut c = db.client().await?;
            let tx = c.transaction().await.map_err(|e| db.error(e))?;
            let row = db
                .opt(
                    &tx,
                    "SELECT record FROM jobs WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .await?;
            let Some(mut job) = row.map(|row| record::<Job>(&row, 0)).transpose()? else {
                return Ok(None);
            };
            // A refusal (or a panic) drops the transaction: nothing is written.
            let image = change(&mut job)?;
            let cols = JobColumns::of(&job)?;
            db.exec(
                &tx,
                "UPDATE jobs SET record = $2, status = $3, queued = $4, \
                 destination_tenant = $5, destination_key = $6, source_region = $7, \
                 destination_region = $8, \
                 holder = CASE WHEN $4 THEN holder END, \
                 lease_until = CASE WHEN $4 THEN lease_until END \
                 WHERE id = $1",
                &[
                    &id,
                    &Json(&job),
                    &cols.status,
                    &cols.queued,
                    &job.wire.destination_tenant_id,
                    &cols.destination_key,
                    &job.wire.source_region_id,
                    &job.wire.destination_region_id,
                ],
            )
            .await?;
            apply_image_change(&db, &tx, image).await?;
            db.bump(&tx).await?;
            db.commit(tx).await?;
            Ok(Some(job))
        })
    }

    fn jobs(&self, query: &JobQuery, keep: &dyn Fn(&Job) -> bool) -> Result<Vec<Job>> {
        self.select(query, keep)
    }

    fn job_wires(&self, query: &JobQuery, keep: &dyn Fn(&JobWire) -> bool) -> Result<Vec<JobWire>> {
        self.select(query, keep)
    }

    fn remove_jobs(&self, ids: &[Uuid], only: &(dyn Fn(&Job) -> bool + Sync)) -> Result<Vec<Uuid>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.run(|db| async move {
            let mut c = db.client().await?;
            let tx = c.transaction().await.map_err(|e| db.error(e))?;
            let rows = db
                .query(
                    &tx,
                    "SELECT id, record FROM jobs WHERE id = ANY($1) ORDER BY seq FOR UPDATE",
                    &[&ids],
                )
                .await?;
            let found = rows
                .iter()
                .map(|row| Ok((get::<Uuid>(row, 0)?, record::<Job>(row, 1)?)))
                .collect::<Result<BTreeMap<Uuid, Job>>>()?;
            let mut removed = Vec::new();
            for id in ids {
                if !removed.contains(id) && found.get(id).is_some_and(only) {
                    removed.push(*id);
                }
            }
            if removed.is_empty() {
                // Dropping the transaction rolls it back.
                return Ok(removed);
            }
            db.exec(&tx, "DELETE FROM jobs WHERE id = ANY($1)", &[&removed])
                .await?;
            db.bump(&tx).await?;
            db.commit(tx).await?;
            Ok(removed)
        })
    }

    fn job_status_counts(&self) -> Result<BTreeMap<JobStatus, u64>> {
        self.run(|db| async move {
            let c = db.client().await?;
            let rows = db
                .query(&c, "SELECT status, count(*) FROM jobs GROUP BY status", &[])
                .await?;
            let mut counts = BTreeMap::new();
            for row in &rows {
                let status: String = get(row, 0)?;
                let status: JobStatus = status
                    .parse()
                    .map_err(|e| ServiceError::internal("corrupt job status", e))?;
                let n: i64 = get(row, 1)?;
                counts.insert(status, n.max(0) as u64);
            }
            Ok(counts)
        })
    }

    fn tenant_has_jobs(&self, key: TenantKey, id_as_stored: &str) -> Result<Option<Uuid>> {
        // A text column holds no NUL: such an id names no job's destination.
        let as_stored = (!id_as_stored.contains('\0')).then(|| id_as_stored.to_string());
        self.run(move |db| async move {
            let c = db.client().await?;
            let key = &key.0[..];
            let row = db
                .opt(
                    &c,
                    "SELECT id FROM jobs WHERE source_tenant = $1 ORDER BY seq LIMIT 1",
                    &[&key],
                )
                .await?;
            let row = match row {
                Some(row) => Some(row),
                None => {
                    db.opt(
                        &c,
                        "SELECT id FROM jobs WHERE destination_key = $1 \
                         UNION ALL SELECT id FROM jobs WHERE destination_tenant = $2 LIMIT 1",
                        &[&key, &as_stored],
                    )
                    .await?
                }
            };
            row.map(|row| get::<Uuid>(&row, 0)).transpose()
        })
    }

    /// The sum of `jobs_changes_shards`, one of which every job write moves inside its
    /// transaction, by any appliance: the sum changes exactly when a write commits, and never
    /// goes back. A reader that reads it and then the records may see a write that committed
    /// in between, and caches it under the older sum, which no later read returns. Each lane
    /// moves a row of its own, so that writers do not wait for each other's commits (one row
    /// for all made every commit wait for the one before: 1,500 writes a second where
    /// PostgreSQL commits 13,600 unhindered). Added to it: the last value of `jobs_changes`,
    /// which appliances of schema version 1 move after their commits, so that one of them
    /// still running during an upgrade is not missed. While the database does not answer, a
    /// number that matches no earlier answer (top bit set, counting up), so that nothing
    /// cached is trusted; once it answers again, a row is moved first, so that nothing cached
    /// before is trusted either (the database may have come back from a backup).
    fn jobs_version(&self) -> u64 {
        let outage = &self.outage;
        let read = self.run(|db| async move {
            let c = db.client().await?;
            if outage.load(Ordering::SeqCst) {
                db.bump(&c).await?;
                outage.store(false, Ordering::SeqCst);
            }
            let row = db
                .opt(
                    &c,
                    "SELECT (SELECT sum(n) FROM jobs_changes_shards)::bigint \
                     + (SELECT last_value FROM jobs_changes)",
                    &[],
                )
                .await?;
            match row {
                Some(row) => get::<i64>(&row, 0),
                None => Err(ServiceError::Internal("no job version".into())),
            }
        });
        match read {
            Ok(version) => version as u64 & !(1 << 63),
            Err(_) => {
                self.outage.store(true, Ordering::SeqCst);
                (1 << 63) | self.fallback.fetch_add(1, Ordering::SeqCst)
            }
        }
    }

    fn queued(&self) -> Result<Vec<Uuid>> {
        self.run(|db| async move {
            let c = db.client().await?;
            let rows = db
                .query(&c, "SELECT id FROM jobs WHERE queued ORDER BY seq", &[])
                .await?;
            rows.iter().map(|row| get::<Uuid>(row, 0)).collect()
        })
    }

    fn claim_next(&self, skip: &HashSet<Uuid>) -> Result<Option<Uuid>> {
        let skip: Vec<Uuid> = skip.iter().copied().collect();
        self.run(|db| async move {
            let c = db.client().await?;
            let lease = db.lease_secs();
            let row = db
                .opt(
                    &c,
                    "WITH next AS ( \
                       SELECT j.id FROM jobs j \
                       WHERE j.queued \
                         AND (j.holder IS NULL OR j.lease_until IS NULL OR j.lease_until < now()) \
                         AND j.id <> ALL($1) \
                         AND NOT EXISTS (SELECT 1 FROM regions r \
                           WHERE r.id IN (j.source_region, j.destination_region) \
                             AND r.pin IS NOT NULL AND r.pin <> $2) \
                       ORDER BY j.seq LIMIT 1 \
                       FOR UPDATE OF j SKIP LOCKED) \
                     UPDATE jobs SET holder = $2, lease_until = now() + make_interval(secs => $3) \
                     FROM next WHERE jobs.id = next.id RETURNING jobs.id",
                    &[&skip, &db.node, &lease],
                )
                .await?;
            row.map(|row| get::<Uuid>(&row, 0)).transpose()
        })
    }

    fn release(&self, id: Uuid) {
        let released = self.run(move |db| async move {
            let c = db.client().await?;
            db.exec(
                &c,
                "UPDATE jobs SET holder = NULL, lease_until = NULL WHERE id = $1 AND holder = $2",
                &[&id, &db.node],
            )
            .await
            .map(drop)
        });
        if let Err(e) = released {
            tracing::warn!(job = %id, "the claim stays until its lease runs out: {e}");
        }
    }

    fn renew_claims(&self, ids: &[Uuid]) -> Result<Vec<(Uuid, bool)>> {
        let ids = ids.to_vec();
        self.run(|db| async move {
            let c = db.client().await?;
            let lease = db.lease_secs();
            let sql = format!(
                "WITH renewed AS ( \
                   UPDATE jobs SET lease_until = now() + make_interval(secs => $2) \
                   WHERE holder = $1 AND queued AND id = ANY($3) \
                   RETURNING id, seq, {CANCEL_ASKED} AS cancel) \
                 SELECT id, cancel FROM renewed ORDER BY seq"
            );
            let rows = db.query(&c, &sql, &[&db.node, &lease, &ids]).await?;
            rows.iter()
                .map(|row| Ok((get::<Uuid>(row, 0)?, get::<bool>(row, 1)?)))
                .collect()
        })
    }

    fn holder(&self, id: Uuid) -> Result<Option<String>> {
        self.run(move |db| async move {
            let c = db.client().await?;
            let row = db
                .opt(
                    &c,
                    "SELECT holder FROM jobs WHERE id = $1 AND holder IS NOT NULL \
                     AND lease_until > now()",
                    &[&id],
                )
                .await?;
            row.map(|row| get::<String>(&row, 0)).transpose()
        })
    }

    /// The queue is a column of the job's row: a job whose record is gone has no entry, and
    /// one that exists is taken off the queue.
    fn drop_queue_entry(&self, id: Uuid) -> Result<()> {
        self.run(move |db| async move {
            let c = db.client().await?;
            db.exec(
                &c,
                "UPDATE jobs SET queued = false, holder = NULL, lease_until = NULL WHERE id = $1",
                &[&id],
            )
            .await
            .map(drop)
        })
    }

    fn add_orphan(&self, id: Uuid, region: &str) -> Result<()> {
        let region = region.to_string();
        self.run(move |db| async move {
            let c = db.client().await?;
            db.exec(
                &c,
                "INSERT INTO orphans (id, region) VALUES ($1, $2) \
                 ON CONFLICT (id) DO UPDATE SET region = excluded.region",
                &[&id, &region],
            )
            .await
            .map(drop)
        })
    }

    fn orphans(&self) -> Result<Vec<(Uuid, String)>> {
        self.run(|db| async move {
            let c = db.client().await?;
            let rows = db
                .query(&c, "SELECT id, region FROM orphans ORDER BY id", &[])
                .await?;
            rows.iter()
                .map(|row| Ok((get::<Uuid>(row, 0)?, get::<String>(row, 1)?)))
                .collect()
        })
    }

    fn remove_orphan(&self, id: Uuid) -> Result<()> {
        self.run(move |db| async move {
            let c = db.client().await?;
            db.exec(&c, "DELETE FROM orphans WHERE id = $1", &[&id])
                .await
                .map(drop)
        })
    }
}

/// A throwaway PostgreSQL cluster for tests, the lib's and `tests/*.rs` alike: [`cluster`]
/// starts one per test process (lazily), and [`Cluster::new_database`] gives each test its
/// own empty database in it. The cluster listens only on a Unix socket in its temporary
/// directory; as root its programs run as the `postgres` user (initdb refuses root).
///
/// A watchdog shell started with the cluster waits for its standard input, a pipe that only
/// this process holds, to close: when the process ends (however: a static is never dropped)
/// it stops the server and removes the directory. [`Cluster`]s made with [`Cluster::start`]
/// do the same when dropped.
#[doc(hidden)]
pub mod testing {
    use std::path::{Path, PathBuf};
    use std::process::{Child, ChildStdin, Command, Stdio};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Mutex, OnceLock};

    pub struct Cluster {
        dir: PathBuf,
        bin: PathBuf,
        /// Run the programs as `postgres` (we are root).
        as_postgres: bool,
        /// The loopback port of a TLS cluster (its socket's name too).
        port: Option<u16>,
        watchdog: Mutex<Option<(Child, ChildStdin)>>,
    }

    /// What the watchdog runs: wait for end of input, stop the server, remove the directory.
    const WATCHDOG: &str =
        r#"cat >/dev/null; "$1" -D "$2" -m immediate -w stop >/dev/null 2>&1; rm -rf "$3""#;

    /// The cluster of this test process, started on first use.
    pub fn cluster() -> &'static Cluster {
        static SHARED: OnceLock<Cluster> = OnceLock::new();
        SHARED.get_or_init(|| {
            Cluster::start()
                .unwrap_or_else(|e| panic!("cannot start PostgreSQL for the tests: {e}"))
        })
    }

    /// The directory of initdb, pg_ctl and psql: where `initdb` on PATH really is, else the
    /// newest `/usr/lib/postgresql/*/bin` (Debian's).
    fn find_bin() -> Result<PathBuf, String> {
        let on_path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(|d| d.join("initdb"))
            .find(|p| p.is_file());
        if let Some(initdb) = on_path {
            let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
            if let Some(dir) = real.parent() {
                return Ok(dir.to_path_buf());
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|e| {
                format!("no initdb on PATH and no /usr/lib/postgresql ({e}): install postgresql")
            })?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let version = e.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").is_file().then_some((version, bin))
            })
            .collect();
        versions.sort();
        versions
            .pop()
            .map(|(_, bin)| bin)
            .ok_or_else(|| "no initdb found: install postgresql".to_string())
    }

    /// The key of the advisory lock that a `job seed` holds (a test holds it from psql).
    pub const SEED_LOCK_KEY: i64 = super::SEED_LOCK;

    /// The role that a [`Cluster::start_tls`] cluster asks for a password on its port.
    pub const PASSWORD_ROLE: &str = "password_user";

    /// A loopback port nothing listens on now (bound and let go: the server binds it next).
    fn free_port() -> Result<u16, String> {
        let socket = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| format!("cannot find a free port: {e}"))?;
        socket
            .local_addr()
            .map(|a| a.port())
            .map_err(|e| format!("cannot find a free port: {e}"))
    }

    /// The uid and gid of user `postgres`.
    fn postgres_user() -> Result<(libc::uid_t, libc::gid_t), String> {
        let name = c"postgres";
        // SAFETY: getpwnam takes a NUL-terminated name; its result is read at once, before
        // any other call could reuse its buffer (tests start clusters under a OnceLock or one
        // at a time).
        let entry = unsafe { libc::getpwnam(name.as_ptr()) };
        if entry.is_null() {
            return Err("running as root needs a postgres user (initdb refuses root)".into());
        }
        // SAFETY: non-null, points to a passwd record.
        let entry = unsafe { &*entry };
        Ok((entry.pw_uid, entry.pw_gid))
    }

    impl Cluster {
        /// Starts a cluster of its own in a new temporary directory.
        pub fn start() -> Result<Cluster, String> {
            Cluster::start_with(None)
        }

        /// Starts a cluster that also listens on a free loopback port, with TLS (`ssl = on`)
        /// and this certificate and key (PEM); [`Cluster::tcp_url`] reaches it there. There
        /// role [`PASSWORD_ROLE`] (once created) must give its password; others are trusted.
        pub fn start_tls(cert_pem: &str, key_pem: &str) -> Result<Cluster, String> {
            Cluster::start_with(Some((cert_pem, key_pem)))
        }

        fn start_with(tls: Option<(&str, &str)>) -> Result<Cluster, String> {
            static N: AtomicU64 = AtomicU64::new(0);
            let bin = find_bin()?;
            // SAFETY: geteuid has no preconditions.
            let as_postgres = unsafe { libc::geteuid() } == 0;
            let dir = std::env::temp_dir().join(format!(
                "image-replicator-pg-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            if as_postgres {
                let (uid, gid) = postgres_user()?;
                std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                    .map_err(|e| format!("cannot give {} to postgres: {e}", dir.display()))?;
            }
            let port = match tls {
                None => None,
                Some(_) => Some(free_port()?),
            };
            let mut cluster = Cluster {
                dir,
                bin,
                as_postgres,
                port,
                watchdog: Mutex::new(None),
            };
            // First the watchdog: from here on the directory goes with this process.
            let mut watchdog = cluster
                .command(Path::new("/bin/sh"))
                .args(["-c", WATCHDOG, "sh"])
                .arg(cluster.bin.join("pg_ctl"))
                .arg(cluster.data())
                .arg(&cluster.dir)
                .stdin(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start the watchdog: {e}"))?;
            let stdin = watchdog.stdin.take().ok_or("the watchdog has no stdin")?;
            cluster.watchdog = Mutex::new(Some((watchdog, stdin)));
            let initdb = cluster
                .command(&cluster.bin.join("initdb"))
                .arg("-D")
                .arg(cluster.data())
                .args([
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ])
                .output()
                .map_err(|e| format!("cannot run initdb: {e}"))?;
            if !initdb.status.success() {
                return Err(format!(
                    "initdb failed: {}",
                    String::from_utf8_lossy(&initdb.stderr)
                ));
            }
            let mut settings = format!(
                "\nunix_socket_directories = '{}'\nmax_connections = 300\nshared_buffers = 16MB\n",
                cluster.dir.display()
            );
            match (tls, port) {
                (Some((cert, key)), Some(port)) => {
                    cluster.own_file("server.crt", cert)?;
                    cluster.own_file("server.key", key)?;
                    settings.push_str(&format!(
                        "listen_addresses = '127.0.0.1'\nport = {port}\nssl = on\n"
                    ));
                    // Before initdb's `trust` lines, which would match first.
                    let hba = cluster.data().join("pg_hba.conf");
                    let rules =
                        std::fs::read_to_string(&hba).map_err(|e| format!("pg_hba.conf: {e}"))?;
                    let first = format!("host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n");
                    std::fs::write(&hba, first + &rules)
                        .map_err(|e| format!("pg_hba.conf: {e}"))?;
                }
                _ => settings.push_str("listen_addresses = ''\n"),
            }
            let conf = cluster.data().join("postgresql.conf");
            let mut text =
                std::fs::read_to_string(&conf).map_err(|e| format!("postgresql.conf: {e}"))?;
            text.push_str(&settings);
            std::fs::write(&conf, &text).map_err(|e| format!("postgresql.conf: {e}"))?;
            let mut started = cluster.start_again();
            // The free port taken by another process meanwhile: another one (the last
            // setting of a name counts).
            for _ in 0..4 {
                if started.is_ok() || cluster.port.is_none() {
                    break;
                }
                let port = free_port()?;
                text.push_str(&format!("port = {port}\n"));
                std::fs::write(&conf, &text).map_err(|e| format!("postgresql.conf: {e}"))?;
                cluster.port = Some(port);
                started = cluster.start_again();
            }
            started?;
            Ok(cluster)
        }

        fn data(&self) -> PathBuf {
            self.dir.join("data")
        }

        /// Writes `name` into the data directory, readable by the server only (as PostgreSQL
        /// wants its key).
        fn own_file(&self, name: &str, text: &str) -> Result<(), String> {
            use std::os::unix::fs::PermissionsExt;
            let path = self.data().join(name);
            let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
            std::fs::write(&path, text).map_err(fail)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(fail)?;
            if self.as_postgres {
                let (uid, gid) = postgres_user()?;
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(fail)?;
            }
            Ok(())
        }

        /// `program`, as the postgres user when we are root, in the cluster's directory.
        fn command(&self, program: &Path) -> Command {
            let mut command = if self.as_postgres {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(program);
                c
            } else {
                Command::new(program)
            };
            command
                .current_dir(&self.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            command
        }

        fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
            let status = self
                .command(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.join("log"))
                .args(args)
                .status()
                .map_err(|e| format!("cannot run pg_ctl: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
                Err(format!("pg_ctl {args:?} failed: {log}"))
            }
        }

        /// Starts the server (again, after [`Cluster::stop`]).
        pub fn start_again(&self) -> Result<(), String> {
            self.pg_ctl(&["-w", "-t", "60", "start"])
        }

        /// Stops the server (fast: open connections are ended).
        pub fn stop(&self) -> Result<(), String> {
            self.pg_ctl(&["-w", "-m", "fast", "stop"])
        }

        /// A new empty database; its URL.
        pub fn new_database(&self) -> String {
            let name = format!("t_{}", uuid::Uuid::new_v4().simple());
            let out = Command::new(self.bin.join("psql"))
                .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
                .arg(self.url("postgres"))
                .arg("-c")
                .arg(format!("CREATE DATABASE {name}"))
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot run psql: {e}"));
            assert!(
                out.status.success(),
                "CREATE DATABASE failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            self.url(&name)
        }

        /// psql on the database at `url` (of this cluster), quiet and unaligned; without `-c`
        /// it reads its statements from standard input.
        pub fn psql_command(&self, url: &str) -> Command {
            let mut command = Command::new(self.bin.join("psql"));
            command.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url]);
            command
        }

        /// Runs `sql` with psql in the database at `url` (of this cluster); what it printed.
        pub fn psql(&self, url: &str, sql: &str) -> String {
            let out = self
                .psql_command(url)
                .args(["-c", sql])
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot run psql: {e}"));
            assert!(
                out.status.success(),
                "psql failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }

        /// The URL of database `name` of this cluster (on its Unix socket).
        pub fn url(&self, name: &str) -> String {
            let port = self.port.map(|p| format!("&port={p}")).unwrap_or_default();
            format!(
                "postgresql:///{name}?host={}&user=postgres{port}",
                self.dir.display()
            )
        }

        /// The database of `url` (from [`Cluster::new_database`]) on the loopback port of a
        /// [`Cluster::start_tls`] cluster, by the host name `host`, as `postgres`.
        pub fn tcp_url(&self, url: &str, host: &str) -> Option<String> {
            self.tcp_url_as(url, host, "postgres")
        }

        /// [`Cluster::tcp_url`] as role `user`.
        pub fn tcp_url_as(&self, url: &str, host: &str, user: &str) -> Option<String> {
            let name = Cluster::database_name(url)?;
            let port = self.port?;
            Some(format!("postgresql://{user}@{host}:{port}/{name}"))
        }

        /// The loopback port of a [`Cluster::start_tls`] cluster.
        pub fn port(&self) -> Option<u16> {
            self.port
        }

        /// The database of a URL from [`Cluster::new_database`].
        pub fn database_name(url: &str) -> Option<&str> {
            url.strip_prefix("postgresql:///")?.split('?').next()
        }
    }

    impl Drop for Cluster {
        fn drop(&mut self) {
            let watchdog = self.watchdog.get_mut().ok().and_then(|w| w.take());
            if let Some((mut child, stdin)) = watchdog {
                drop(stdin);
                let _ = child.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::contract::{region, A};
    use super::testing::{cluster, Cluster};
    use super::*;
    use crate::model::TenantKey;

    fn store(url: &str, node: &str) -> PgStore {
        PgStore::connect(url, 4, node, None).expect("connect")
    }

    /// A queued job of tenant A, as the contract suite makes them.
    fn job(store: &PgStore) -> (TenantKey, Job) {
        super::super::contract::job(store, A, JobStatus::ReplicateRequested)
    }

    #[test]
    fn a_password_file_line_matches_like_libpqs() {
        let file = "# comment\n\
                    db.example:5432:other:alice:wrong\n\
                    short:line\n\
                    db.example:*:ir:alice:s\\:e\\\\cret\n\
                    db.example:5432:ir:alice:second\n\
                    localhost:5432:*:bob:socket\n\
                    *:*:*:*:any:colons:kept\n";
        for (host, port, db, user, want) in [
            ("db.example", "5433", "ir", "alice", Some("s:e\\cret")),
            ("/run/postgresql", "5432", "x", "bob", Some("socket")),
            ("db.example", "5432", "other", "alice", Some("wrong")),
            ("elsewhere", "1", "d", "carol", Some("any:colons:kept")),
        ] {
            let found = pgpass_lookup(file, host, port, db, user);
            assert_eq!(found.as_deref(), want, "{host}:{port}:{db}:{user}");
        }
        let other_user = pgpass_lookup("db:5432:ir:alice:pw\n", "db", "5432", "ir", "bob");
        assert_eq!(other_user, None);
    }

    #[test]
    fn tls_to_the_database_is_verified_and_plain_stays_the_default() {
        let server =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
        let other =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
        let cluster = Cluster::start_tls(&server.cert.pem(), &server.signing_key.serialize_pem())
            .expect("a TLS cluster");
        let temp = tempfile::tempdir().expect("temp dir");
        let files = temp.path();
        let ca = files.join("ca.pem");
        std::fs::write(&ca, server.cert.pem()).expect("ca");
        let wrong_ca = files.join("other.pem");
        std::fs::write(&wrong_ca, other.cert.pem()).expect("ca");
        let garbage = files.join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").expect("garbage");
        let db = cluster.new_database();
        let tcp = cluster.tcp_url(&db, "localhost").expect("a port");
        // Whether this appliance's connections (all of them) are encrypted.
        let encrypted = |want: bool| {
            let sql = format!(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.application_name = 'image-replicator' AND s.ssl = {want}"
            );
            cluster
                .psql(&db, &sql)
                .trim()
                .parse::<u32>()
                .expect("a count")
        };
        let connect = |url: &str, ca: Option<&Path>| PgStore::connect(url, 4, "a", ca);
        let refused = |url: &str, ca: Option<&Path>| match connect(url, ca) {
            Ok(_) => panic!("{url} with {ca:?} connected"),
            Err(e) => e.to_string(),
        };

        for (url, ca) in [
            (format!("{tcp}?sslmode=require"), Some(ca.as_path())),
            (tcp.clone(), Some(ca.as_path())),
        ] {
            let store = connect(&url, ca).expect("TLS with the server's certificate");
            let (owner, j) = job(&store);
            assert_eq!(store.insert_jobs(&[(owner, j)]).expect("a write"), 1);
            assert!(encrypted(true) >= 1, "{url}: encrypted connections");
            assert_eq!(encrypted(false), 0, "{url}: no plain connection");
        }
        // The URL's default (prefer) stays plain, though the server offers TLS with a
        // certificate the system's roots do not know.
        let plain = connect(&tcp, None).expect("plain");
        assert!(encrypted(false) >= 1, "plain connections");
        drop(plain);

        let unknown = refused(&format!("{tcp}?sslmode=require"), None);
        assert!(
            unknown.contains("TLS handshake") && unknown.contains("--database-ca-file"),
            "{unknown}"
        );
        let wrong = refused(&tcp, Some(&wrong_ca));
        assert!(wrong.contains("TLS handshake"), "{wrong}");
        let by_address = cluster.tcp_url(&db, "127.0.0.1").expect("a port");
        let misnamed = refused(&by_address, Some(&ca));
        assert!(misnamed.contains("not valid for name"), "{misnamed}");
        let disabled = refused(&format!("{tcp}?sslmode=disable"), Some(&ca));
        assert!(disabled.contains("sslmode=disable"), "{disabled}");
        let socket = refused(&format!("{db}&sslmode=require"), None);
        assert!(
            socket.contains("a Unix socket is not encrypted"),
            "{socket}"
        );
        let missing = refused(&tcp, Some(&files.join("absent.pem")));
        assert!(missing.contains("cannot read the CA file"), "{missing}");
        let not_pem = refused(&tcp, Some(&garbage));
        assert!(not_pem.contains("holds no certificate"), "{not_pem}");
    }

    #[test]
    fn a_store_lock_is_held_by_one_appliance_at_a_time() {
        let url = cluster().new_database();
        let (a, b) = (store(&url, "a"), store(&url, "b"));
        for (what, other) in [
            (Exclusive::Quotas, Exclusive::Seed),
            (Exclusive::Seed, Exclusive::Quotas),
        ] {
            let released = AtomicBool::new(false);
            std::thread::scope(|scope| {
                let held = a.lock(what).expect("a's hold");
                let waiter = scope.spawn(|| {
                    let hold = b.lock(what).expect("b's hold, once a's went");
                    let after = released.load(Ordering::SeqCst);
                    drop(hold);
                    after
                });
                std::thread::sleep(Duration::from_millis(300));
                // a still works meanwhile, on its other lanes; the other lock is free.
                assert!(a.next_seq().expect("a call") > 0);
                drop(b.lock(other).expect("the other lock"));
                released.store(true, Ordering::SeqCst);
                drop(held);
                assert!(waiter.join().expect("b"), "b held {what:?} while a did");
            });
            // Released for good: either takes it again at once.
            drop(a.lock(what).expect("again"));
            drop(b.lock(what).expect("again"));
        }
    }

    #[test]
    fn two_appliances_claim_every_queued_job_exactly_once() {
        let url = cluster().new_database();
        let stores = [Arc::new(store(&url, "a")), Arc::new(store(&url, "b"))];
        let jobs: Vec<_> = (0..50).map(|_| job(&stores[0])).collect();
        assert_eq!(stores[0].insert_jobs(&jobs).expect("insert"), 50);
        let workers: Vec<_> = (0..6)
            .map(|i| {
                let store = Arc::clone(&stores[i % 2]);
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    while let Some(id) = store.claim_next(&HashSet::new()).expect("claim") {
                        mine.push(id);
                    }
                    mine
                })
            })
            .collect();
        let mut claimed: Vec<Uuid> = workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker"))
            .collect();
        claimed.sort();
        let mut want: Vec<Uuid> = jobs.iter().map(|(_, j)| j.wire.job_id).collect();
        want.sort();
        assert_eq!(claimed, want, "every job once, none twice");
        let held: usize = stores
            .iter()
            .map(|s| s.renew_claims(&want).expect("renew").len())
            .sum();
        assert_eq!(held, 50);
    }

    #[test]
    fn a_claim_left_by_a_dead_process_of_the_same_node_is_not_renewed_and_runs_out() {
        let url = cluster().new_database();
        let lease = Duration::from_millis(1000);
        let died = store(&url, "a").with_lease(lease);
        let (owner, j) = job(&died);
        let id = j.wire.job_id;
        died.insert_jobs(&[(owner, j)]).expect("insert");
        let none = HashSet::new();
        assert_eq!(died.claim_next(&none).expect("claim"), Some(id));
        drop(died);
        // The next process of node a renews only what its workers run, not the dead one's.
        let again = store(&url, "a").with_lease(lease);
        assert_eq!(again.claim_next(&none).expect("still held"), None);
        std::thread::sleep(lease / 2);
        let running = [Uuid::new_v4()];
        assert_eq!(again.renew_claims(&running).expect("renew"), vec![]);
        std::thread::sleep(lease / 2 + Duration::from_millis(300));
        assert_eq!(again.claim_next(&none).expect("taken over"), Some(id));
    }

    #[test]
    fn a_claim_whose_lease_ran_out_is_taken_over_by_another_appliance() {
        let url = cluster().new_database();
        let a = store(&url, "a").with_lease(Duration::from_millis(1500));
        let b = store(&url, "b");
        let (owner, j) = job(&a);
        let id = j.wire.job_id;
        a.insert_jobs(&[(owner, j)]).expect("insert");
        let none = HashSet::new();
        assert_eq!(a.claim_next(&none).expect("claim"), Some(id));
        assert_eq!(b.claim_next(&none).expect("held"), None);
        assert_eq!(b.holder(id).expect("holder"), Some("a".into()));
        // Renewed, it stays a's past its first lease.
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(a.renew_claims(&[id]).expect("renew"), vec![(id, false)]);
        std::thread::sleep(Duration::from_millis(900));
        assert_eq!(b.claim_next(&none).expect("still held"), None);
        // Not renewed, it runs out.
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(b.holder(id).expect("holder"), None);
        assert_eq!(b.claim_next(&none).expect("takeover"), Some(id));
        assert_eq!(a.holder(id).expect("holder"), Some("b".into()));
        assert_eq!(a.renew_claims(&[id]).expect("renew"), vec![], "a lost it");
        assert_eq!(b.renew_claims(&[id]).expect("renew"), vec![(id, false)]);
        // a's release does not give back b's claim.
        a.release(id);
        assert_eq!(a.holder(id).expect("holder"), Some("b".into()));
    }

    #[test]
    fn a_cancel_written_by_one_appliance_reaches_the_holder_and_versions_follow() {
        let url = cluster().new_database();
        let (a, b) = (store(&url, "a"), store(&url, "b"));
        let (owner, j) = job(&a);
        let id = j.wire.job_id;
        let before = b.jobs_version();
        a.insert_jobs(&[(owner, j)]).expect("insert");
        let inserted = b.jobs_version();
        assert_ne!(inserted, before, "b sees a's insert");
        assert_eq!(a.claim_next(&HashSet::new()).expect("claim"), Some(id));
        assert_eq!(inserted, b.jobs_version(), "a claim is no job write");
        b.update_job(id, &|job| {
            assert!(job.request_cancel(2));
            Ok(ImageChange::None)
        })
        .expect("cancel")
        .expect("job");
        assert_ne!(a.jobs_version(), inserted, "a sees b's update");
        assert_eq!(a.renew_claims(&[id]).expect("renew"), vec![(id, true)]);
        // The job's end takes it off the queue, and the claim with it.
        let version = a.jobs_version();
        b.update_job(id, &|job| {
            job.begin_ending(None, 3);
            job.end(3);
            Ok(ImageChange::None)
        })
        .expect("end");
        assert_ne!(a.jobs_version(), version);
        assert_eq!(a.renew_claims(&[id]).expect("renew"), vec![]);
        assert_eq!(a.holder(id).expect("holder"), None);
        assert!(a.queued().expect("queue").is_empty());
    }

    #[test]
    fn a_database_that_goes_away_is_unavailable_until_it_is_back() {
        let own = Cluster::start().expect("cluster");
        let url = own.new_database();
        let s = store(&url, "a");
        assert!(s.insert_region(&region("ot1")).expect("region"));
        let version = s.jobs_version();
        own.stop().expect("stop");
        assert!(matches!(s.writable(), Err(ServiceError::Unavailable(_))));
        match s.region("ot1") {
            Err(ServiceError::Unavailable(why)) => {
                assert!(why.contains("does not answer"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.insert_region(&region("ot2")),
            Err(ServiceError::Unavailable(_))
        ));
        let (down1, down2) = (s.jobs_version(), s.jobs_version());
        assert_ne!(down1, down2, "nothing cached while it is down is trusted");
        assert_ne!(down1, version);
        own.start_again().expect("start");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while s.writable().is_err() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(s.writable(), Ok(()));
        assert_eq!(s.region("ot1").expect("region"), Some(region("ot1")));
        let back = s.jobs_version();
        assert_ne!(
            back, version,
            "moved once it is back: nothing cached before is trusted"
        );
        assert_eq!(s.jobs_version(), back, "and steady again");
    }

    #[test]
    fn appliances_starting_together_create_the_schema_once() {
        let url = cluster().new_database();
        let starts: Vec<_> = (0..4)
            .map(|i| {
                let url = url.clone();
                std::thread::spawn(move || {
                    PgStore::connect(&url, 2, &format!("n{i}"), None).map(drop)
                })
            })
            .collect();
        for start in starts {
            start.join().expect("thread").expect("connect");
        }
        assert_eq!(
            cluster()
                .psql(&url, "SELECT count(*) FROM schema_version")
                .trim(),
            "1"
        );
    }

    #[test]
    fn a_schema_newer_than_the_binary_is_refused() {
        let url = cluster().new_database();
        drop(store(&url, "a"));
        cluster().psql(&url, "UPDATE schema_version SET version = 99");
        match PgStore::connect(&url, 2, "a", None) {
            Err(OpenError::Other { reason, .. }) => assert!(reason.contains("newer"), "{reason}"),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("opened a newer schema"),
        }
    }

    #[test]
    fn a_version_1_schema_is_migrated_and_its_appliances_writes_still_move_the_version() {
        let url = cluster().new_database();
        cluster().psql(
            &url,
            &format!(
                "CREATE TABLE schema_version (version integer NOT NULL); \
                 INSERT INTO schema_version VALUES (1); {SCHEMA_V1}"
            ),
        );
        let s = store(&url, "a");
        assert_eq!(
            cluster()
                .psql(&url, "SELECT version FROM schema_version")
                .trim(),
            "2"
        );
        let before = s.jobs_version();
        let (owner, j) = job(&s);
        s.insert_jobs(&[(owner, j)]).expect("insert");
        let inserted = s.jobs_version();
        assert_ne!(inserted, before);
        // What an appliance of version 1 does after each commit.
        cluster().psql(&url, "SELECT nextval('jobs_changes')");
        assert_ne!(s.jobs_version(), inserted);
        drop(s);
        // Opened again: nothing more to migrate.
        let again = store(&url, "a");
        assert!(again.jobs_version() > inserted);
    }

    #[test]
    fn the_store_is_called_and_dropped_inside_another_runtime() {
        let url = cluster().new_database();
        let s = Arc::new(store(&url, "a"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let before = s.jobs_version();
            let (owner, j) = job(&s);
            s.insert_jobs(&[(owner, j)]).expect("insert");
            assert_ne!(s.jobs_version(), before);
            drop(s);
        });
    }

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redacted("postgres://alice:s3cret@db.example:5432/ir"),
            "postgres://alice:***@db.example:5432/ir"
        );
        assert_eq!(
            redacted("postgres://alice@db.example/ir?sslmode=disable&password=s3cret"),
            "postgres://alice@db.example/ir?sslmode=disable&password=***"
        );
        assert_eq!(
            redacted("host=db user=alice password='s3 cret' dbname=ir"),
            "host=db user=alice password=*** dbname=ir"
        );
        assert_eq!(redacted("host=db password=s3cret"), "host=db password=***");
        assert_eq!(
            redacted("postgresql:///ir?host=/run/pg"),
            "postgresql:///ir?host=/run/pg"
        );
        let failed = PgStore::connect("postgres://alice:s3cret@127.0.0.1:1/ir", 1, "a", None);
        let Err(e) = failed else {
            panic!("connected to port 1")
        };
        let text = e.to_string();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("alice:***@127.0.0.1:1/ir"), "{text}");
        assert!(text.contains("cannot connect"), "{text}");
    }
}
