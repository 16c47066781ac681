//! The token registry: making tokens, hashing them for rest, and checking them per request.
//!
//! At rest a token is only an argon2id PHC string plus its SHA-256 (the "lookup"), which finds
//! its record without any argon2 work: a token that is not registered has no candidate and is
//! rejected at the cost of one SHA-256 and one index probe, however it was crafted (with the
//! 4-byte lookup of earlier versions a string sharing a real token's prefix cost an argon2 run,
//! and answered a hundred times slower than an unknown one). Records from those versions have
//! the short lookup; each gets the full one on its first successful verification.
//! A token that verified once is remembered in memory under its SHA-256 (never the plaintext),
//! so later requests pay no argon2 either; concurrent first requests with one token share one
//! verification. Every request still reads the token record, so a revoke or an expiry takes
//! effect on the very next request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::cache::Bounded;
use crate::error::{Result, ServiceError};
use crate::keystone::{Validation, Validator};
use crate::model::{to_hex, TenantKey, LOOKUP_LEN};
use crate::store::{Repo, TokenHolder};

/// Beyond this many remembered tokens the cache starts afresh (it is only a shortcut).
const CACHE_CAPACITY: usize = 65_536;

pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

pub fn lookup(digest: &[u8; 32]) -> [u8; LOOKUP_LEN] {
    let mut out = [0u8; LOOKUP_LEN];
    out.copy_from_slice(&digest[..LOOKUP_LEN]);
    out
}

/// A new token: 32 lowercase hex digits from the operating system's CSPRNG.
pub fn generate() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| ServiceError::internal("cannot read random bytes", e))?;
    Ok(to_hex(&bytes))
}

/// An imported token must be 8-256 printable ASCII characters without whitespace.
pub fn check_imported(value: &str) -> Result<()> {
    let len_ok = (8..=256).contains(&value.len());
    let chars_ok = value.bytes().all(|b| b.is_ascii_graphic());
    if len_ok && chars_ok {
        Ok(())
    } else {
        Err(ServiceError::BadRequest(
            "a token must be 8 to 256 printable ASCII characters without whitespace".into(),
        ))
    }
}

/// Whether a header value could be a token at all (cheap, before any lookup): printable
/// ASCII, 8 bytes to 8 KiB (Keystone's tokens are longer than the registry's).
fn plausible(value: &str) -> bool {
    (8..=8192).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic())
}

/// The argon2id PHC string of a token.
pub fn hash(token: &str) -> Result<String> {
    Argon2::default()
        .hash_password(token.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| ServiceError::internal("cannot hash token", e))
}

/// Who a request acts as.
#[derive(Clone, Debug)]
pub struct Principal {
    pub user: String,
    pub tenant_key: TenantKey,
    pub admin: bool,
    /// The destination tenants it may use: a Keystone token's projects (those its user has
    /// roles on), a local user's tenants as the store had them when the token was checked.
    pub projects: Vec<TenantKey>,
}

/// Counters, shown by `image-replicator status`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct AuthStats {
    pub argon2_verifications: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cached_tokens: usize,
}

/// Token digests known not to be (or no longer to be) the registry's; bounded.
type DigestSet = Bounded<[u8; 32], ()>;

/// Why a request's token was refused: for the server's log line of the request (the 401
/// itself never says), never the token.
pub type Refusal = &'static str;
pub const NO_TOKEN: Refusal = "no token: X-Auth-Token is missing, given twice or unreadable";
pub const MALFORMED: Refusal = "a value that cannot be a token (its length or characters)";
pub const UNKNOWN: Refusal = "unknown token";
pub const EXPIRED: Refusal = "expired token";
pub const REVOKED: Refusal = "revoked token";
pub const USER_GONE: Refusal = "the token's user no longer exists";
pub const NOT_MEMBER_OF_TOKEN_TENANT: Refusal =
    "the token's user is no longer a member of the token's tenant";
pub const TENANT_GONE: Refusal = "the token's tenant no longer exists";
pub const KEYSTONE_REFUSED: Refusal = "unknown token (Keystone does not accept it either)";
pub const KEYSTONE_PROJECT: Refusal =
    "the Keystone token's project is not a tenant of this appliance";

/// The refusal of a record that [`unusable_at`](crate::model::TokenRecord::unusable_at) says
/// is unusable for `why`.
fn refusal(why: &str) -> Refusal {
    if why == "revoked" {
        REVOKED
    } else {
        EXPIRED
    }
}

/// What the registry says about a presented token.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Found {
    /// It verified against this record.
    Token(Uuid),
    /// It is a record's token, and that record is expired or revoked.
    Dead(Refusal),
    /// No record of the registry is this token.
    NotRegistry,
}

/// One registry check in flight, shared by every request that presents the same token.
type Flight = Shared<BoxFuture<'static, Result<Found>>>;

pub struct Authenticator {
    /// SHA-256 of a token that verified → its record id.
    cache: Bounded<[u8; 32], Uuid>,
    /// SHA-256 of tokens that failed argon2 verification: a string crafted to share a real
    /// token's lookup prefix costs one verification, not one per request.
    rejected: DigestSet,
    /// SHA-256 of registry tokens that verified but are expired or revoked (checked only
    /// when Keystone is in use): refused without asking Keystone.
    dead: Bounded<[u8; 32], Refusal>,
    /// Registry checks running now, by SHA-256 of the token: concurrent requests with one token
    /// wait for the same check instead of each paying argon2.
    flights: Mutex<HashMap<[u8; 32], Flight>>,
    /// Bounds concurrent argon2 work (each verification holds about 19 MiB).
    permits: Arc<Semaphore>,
    verifications: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Validates tokens the registry does not know, when `serve --keystone-url` is given.
    keystone: OnceLock<Arc<Validator>>,
}

impl Default for Authenticator {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Authenticator {
            cache: Bounded::new(CACHE_CAPACITY),
            rejected: Bounded::new(CACHE_CAPACITY),
            dead: Bounded::new(CACHE_CAPACITY),
            flights: Mutex::new(HashMap::new()),
            permits: Arc::new(Semaphore::new(cores)),
            verifications: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            keystone: OnceLock::new(),
        }
    }
}

impl Authenticator {
    /// Accepts Keystone's tokens too, from now on.
    pub fn use_keystone(&self, validator: Validator) {
        let _ = self.keystone.set(Arc::new(validator));
    }

    /// Validation calls made to Keystone so far.
    pub fn keystone_calls(&self) -> Option<u64> {
        self.keystone.get().map(|k| k.calls.load(Ordering::Relaxed))
    }

    pub fn stats(&self) -> AuthStats {
        AuthStats {
            argon2_verifications: self.verifications.load(Ordering::Relaxed),
            cache_hits: self.hits.load(Ordering::Relaxed),
            cache_misses: self.misses.load(Ordering::Relaxed),
            cached_tokens: self.cache.len(),
        }
    }

    fn cached(&self, digest: &[u8; 32]) -> Option<Uuid> {
        self.cache.get(digest)
    }

    fn remember(&self, digest: [u8; 32], id: Uuid) {
        self.cache.insert(digest, id);
    }

    fn forget(&self, digest: &[u8; 32]) {
        self.cache.remove(digest);
    }

    /// Drops every cache entry that points at token `id` (on revoke or user removal).
    pub fn forget_token(&self, id: Uuid) {
        self.cache.retain(|_, cached| *cached != id);
    }

    /// One argon2 verification, counted, on the calling thread.
    fn verify_blocking(&self, token: &str, phc: &str) -> bool {
        self.verifications.fetch_add(1, Ordering::Relaxed);
        Argon2::default()
            .verify_password(token.as_bytes(), phc)
            .is_ok()
    }

    /// One argon2 verification off the async executor, under the concurrency bound. The permit
    /// travels with the work, so a client that hangs up does not free it early.
    async fn verify(self: &Arc<Self>, token: &str, phc: &str) -> bool {
        let Ok(permit) = Arc::clone(&self.permits).acquire_owned().await else {
            return false;
        };
        let (this, token, phc) = (Arc::clone(self), token.to_owned(), phc.to_owned());
        tokio::task::spawn_blocking(move || {
            let verified = this.verify_blocking(&token, &phc);
            drop(permit);
            verified
        })
        .await
        .unwrap_or(false)
    }

    /// A new token may have a value that failed before: forget past failures.
    pub fn token_added(&self) {
        self.rejected.clear();
        self.dead.clear();
    }

    /// The principal a token acts as, or why not (the caller answers 401 without saying
    /// why, and logs the [`Refusal`]).
    pub async fn authenticate(
        self: &Arc<Self>,
        store: &Arc<dyn Repo>,
        token: Option<&str>,
    ) -> Result<std::result::Result<Principal, Refusal>> {
        let Some(token) = token else {
            return Ok(Err(NO_TOKEN));
        };
        if !plausible(token) {
            return Ok(Err(MALFORMED));
        }
        let digest = digest(token);
        let now = crate::model::now();
        if let Some(id) = self.cached(&digest) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            let found = principal(&**store, id, now).await?;
            if matches!(found, Err(why) if [UNKNOWN, EXPIRED, REVOKED].contains(&why)) {
                self.forget(&digest);
            }
            return Ok(found);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        if let Some(why) = self.dead.get(&digest) {
            return Ok(Err(why));
        }
        if !self.rejected.contains(&digest) {
            match self.registry(store, token, digest, now).await? {
                Found::Token(id) => return principal(&**store, id, now).await,
                Found::Dead(why) => return Ok(Err(why)),
                Found::NotRegistry => {}
            }
        }
        match self.keystone.get() {
            Some(keystone) => keystone_principal(&**store, keystone, token, digest).await,
            None => Ok(Err(UNKNOWN)),
        }
    }

    /// The registry's answer for a token, from the one check in flight for it (started here if
    /// none is). The check runs as a task of its own: a client that hangs up does not cancel a
    /// verification others wait for, and its result lands in the cache whoever is still there.
    async fn registry(
        self: &Arc<Self>,
        store: &Arc<dyn Repo>,
        token: &str,
        digest: [u8; 32],
        now: u64,
    ) -> Result<Found> {
        let flight = {
            let Ok(mut flights) = self.flights.lock() else {
                return self.check_registry(&**store, token, digest, now).await;
            };
            match flights.get(&digest) {
                Some(flight) => flight.clone(),
                None => {
                    let (this, store, token) =
                        (Arc::clone(self), Arc::clone(store), token.to_owned());
                    let task = tokio::spawn(async move {
                        let found = this.check_registry(&*store, &token, digest, now).await;
                        // Removed only once the result is in the cache or the sets (the map is
                        // locked until the flight is in it, so this comes after the insert).
                        if let Ok(mut flights) = this.flights.lock() {
                            flights.remove(&digest);
                        }
                        found
                    });
                    let flight: Flight = task
                        .map(|joined| {
                            joined.unwrap_or_else(|e| {
                                Err(ServiceError::internal("the token check failed", e))
                            })
                        })
                        .boxed()
                        .shared();
                    flights.insert(digest, flight.clone());
                    flight
                }
            }
        };
        flight.await
    }

    /// Looks the token up and verifies it against its candidates (at most one argon2 run for a
    /// new-format store: only the token itself has its full SHA-256).
    async fn check_registry(
        self: &Arc<Self>,
        store: &dyn Repo,
        token: &str,
        digest: [u8; 32],
        now: u64,
    ) -> Result<Found> {
        // A check that ended just before this one began has left its answer.
        if let Some(id) = self.cached(&digest) {
            return Ok(Found::Token(id));
        }
        if let Some(why) = self.dead.get(&digest) {
            return Ok(Found::Dead(why));
        }
        if self.rejected.contains(&digest) {
            return Ok(Found::NotRegistry);
        }
        let keystone = self.keystone.get().is_some();
        let full = lookup(&digest);
        let candidates = store.token_candidates(&full)?;
        let mut verified_any = false;
        for record in &candidates {
            let unusable = record.unusable_at(now);
            let usable = unusable.is_none();
            // Without Keystone an unusable record needs no argon2: the answer is 401
            // either way (a record found by the token's whole SHA-256 is this token's, so
            // the log can say why). With it, a registry token that expired or was revoked
            // must be told from a Keystone token, or Keystone being down would make it a 503.
            if let (Some(why), false) = (unusable, keystone) {
                if !record.has_legacy_lookup() {
                    return Ok(Found::Dead(refusal(why)));
                }
                continue;
            }
            verified_any = true;
            if self.verify(token, &record.hash).await {
                if record.has_legacy_lookup() {
                    // From now on only this token finds the record.
                    if let Err(e) = store.set_token_lookup(record.info.id, &full) {
                        tracing::warn!(token_id = %record.info.id, "cannot give a token its full lookup: {e}");
                    }
                }
                if usable {
                    self.remember(digest, record.info.id);
                    return Ok(Found::Token(record.info.id));
                }
                let why = refusal(unusable.unwrap_or("expired"));
                self.dead.insert(digest, why);
                return Ok(Found::Dead(why));
            }
        }
        // Not the registry's: with Keystone, later requests go straight to its cache.
        if verified_any || keystone {
            self.rejected.insert(digest, ());
        }
        Ok(Found::NotRegistry)
    }

    /// Whether `token` is already registered (when importing a given value; blocking).
    pub fn exists(&self, store: &dyn Repo, token: &str) -> Result<bool> {
        let candidates = store.token_candidates(&lookup(&digest(token)))?;
        Ok(candidates
            .iter()
            .any(|r| self.verify_blocking(token, &r.hash)))
    }
}

/// A token the registry does not know, as Keystone sees it: its project must be a registered
/// tenant (else it gets what an unknown tenant gets, a 401); Keystone down is a 503.
async fn keystone_principal(
    store: &dyn Repo,
    keystone: &Arc<Validator>,
    token: &str,
    digest: [u8; 32],
) -> Result<std::result::Result<Principal, Refusal>> {
    let validation = match keystone.kept(&digest) {
        Some(kept) => kept,
        None => {
            // The permit is taken before a thread is: a flood of unknown tokens waits here.
            let Ok(permit) = Arc::clone(&keystone.permits).acquire_owned().await else {
                return Err(ServiceError::Unavailable("Identity is unavailable".into()));
            };
            let (keystone, token) = (Arc::clone(keystone), token.to_owned());
            tokio::task::spawn_blocking(move || {
                let validation = keystone.validate(&token, digest);
                drop(permit);
                validation
            })
            .await
            .unwrap_or_else(|e| Validation::Unavailable(e.to_string()))
        }
    };
    let identity = match validation {
        Validation::Valid(identity) => identity,
        Validation::Invalid => return Ok(Err(KEYSTONE_REFUSED)),
        Validation::Unavailable(why) => {
            tracing::warn!("cannot validate a token with Keystone: {why}");
            return Err(ServiceError::Unavailable(
                "Identity is unavailable: the Keystone service that validates tokens cannot be reached".into(),
            ));
        }
    };
    let Some(tenant_key) = TenantKey::parse(&identity.project_id) else {
        return Ok(Err(KEYSTONE_PROJECT));
    };
    if store.tenant(tenant_key)?.is_none() {
        return Ok(Err(KEYSTONE_PROJECT));
    }
    let mut projects: Vec<TenantKey> = identity
        .projects
        .iter()
        .filter_map(|p| TenantKey::parse(p))
        .collect();
    projects.push(tenant_key);
    Ok(Ok(Principal {
        user: format!("keystone:{}", identity.user_name),
        tenant_key,
        admin: identity.roles.iter().any(|r| r == "admin"),
        projects,
    }))
}

/// Who token `id` acts as, or why not (read with one store call: PostgreSQL answers it in
/// one query, without blocking the runtime).
async fn principal(
    store: &dyn Repo,
    id: Uuid,
    now: u64,
) -> Result<std::result::Result<Principal, Refusal>> {
    let Some(TokenHolder {
        token,
        user,
        tenant_exists,
    }) = store.token_holder_async(id).await?
    else {
        return Ok(Err(UNKNOWN));
    };
    if let Some(why) = token.unusable_at(now) {
        return Ok(Err(refusal(why)));
    }
    let Some(user) = user else {
        return Ok(Err(USER_GONE));
    };
    let Some(tenant_key) = TenantKey::parse(&token.info.tenant) else {
        return Ok(Err(TENANT_GONE));
    };
    let member = user
        .tenants
        .iter()
        .any(|t| TenantKey::parse(t) == Some(tenant_key));
    if !member {
        return Ok(Err(NOT_MEMBER_OF_TOKEN_TENANT));
    }
    if !tenant_exists {
        return Ok(Err(TENANT_GONE));
    }
    Ok(Ok(Principal {
        user: user.name,
        tenant_key,
        admin: user.admin,
        projects: user
            .tenants
            .iter()
            .filter_map(|t| TenantKey::parse(t))
            .collect(),
    }))
}
