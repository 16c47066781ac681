//! Keystone v3: project-scoped tokens by password, for the service users the appliance acts as
//! in Glance regions. A token is kept until shortly before it expires and renewed then; a
//! caller that gets a 401 with it calls [`TokenSource::invalidate`] and asks again.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::blocking::Client;
use serde_json::json;

use crate::cache::Bounded;
use crate::model::KeystoneCredentials;
use crate::remote::RemoteError;

/// A token is renewed when less than this share of its lifetime is left …
const RENEW_SHARE: f64 = 0.1;
/// … or less than this, whichever is more.
const RENEW_MARGIN: Duration = Duration::from_secs(60);

pub struct TokenSource {
    credentials: KeystoneCredentials,
    cached: Mutex<Option<(String, Instant)>>,
}

impl TokenSource {
    pub fn new(credentials: KeystoneCredentials) -> TokenSource {
        TokenSource {
            credentials,
            cached: Mutex::new(None),
        }
    }

    /// A valid token: the kept one, or a new one from Keystone.
    pub fn token(&self, http: &Client) -> Result<String, RemoteError> {
        if let Ok(cached) = self.cached.lock() {
            if let Some((token, renew_at)) = &*cached {
                if Instant::now() < *renew_at {
                    return Ok(token.clone());
                }
            }
        }
        let (token, lifetime) = password_token(http, &self.credentials)?;
        let keep = lifetime
            .mul_f64(1.0 - RENEW_SHARE)
            .min(lifetime.saturating_sub(RENEW_MARGIN));
        if let Ok(mut cached) = self.cached.lock() {
            *cached = Some((token.clone(), Instant::now() + keep));
        }
        Ok(token)
    }

    /// Sends the request `build` makes with a token; after a 401 once more with a new token.
    /// Returns the last answer, a second 401 included (the caller says what it means).
    pub fn send(
        &self,
        http: &Client,
        what: &str,
        build: impl Fn(&str) -> reqwest::blocking::RequestBuilder,
    ) -> Result<reqwest::blocking::Response, RemoteError> {
        let mut retried = false;
        loop {
            let resp = build(&self.token(http)?)
                .send()
                .map_err(|e| RemoteError::from_reqwest(what, e))?;
            if resp.status().as_u16() != 401 || retried {
                return Ok(resp);
            }
            self.invalidate();
            retried = true;
        }
    }

    /// Forgets the kept token (the service refused it).
    pub fn invalidate(&self) {
        if let Ok(mut cached) = self.cached.lock() {
            *cached = None;
        }
    }
}

/// How long a Keystone token (the `token` object of an answer) has left, if it says.
fn time_left(token: &serde_json::Value) -> Option<Duration> {
    let expires = crate::model::parse_rfc3339(token["expires_at"].as_str()?)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    expires.checked_sub(now).map(Duration::from_secs)
}

/// Authenticates by password; returns the token and how long it is valid.
fn password_token(
    http: &Client,
    c: &KeystoneCredentials,
) -> Result<(String, Duration), RemoteError> {
    let password = c.password.read().map_err(RemoteError::Refused)?;
    let body = json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": c.username, "domain": {"name": c.user_domain}, "password": password,
        }}},
        "scope": {"project": {"name": c.project, "domain": {"name": c.project_domain}}},
    }});
    let url = format!("{}/auth/tokens", c.auth_url.trim_end_matches('/'));
    let what = format!("Keystone at {}", c.auth_url);
    let resp = http
        .post(&url)
        .json(&body)
        .send()
        .map_err(|e| RemoteError::from_reqwest(&what, e))?;
    let status = resp.status();
    if status.as_u16() == 401 {
        return Err(RemoteError::Refused(format!(
            "{what} refused the password of user {} (401): the service credentials are wrong or revoked",
            c.username
        )));
    }
    if !status.is_success() {
        return Err(RemoteError::from_status(&what, status, resp));
    }
    let token = resp
        .headers()
        .get("x-subject-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| RemoteError::Refused(format!("{what} answered without X-Subject-Token")))?;
    let body: serde_json::Value = resp
        .json()
        .map_err(|e| RemoteError::Refused(crate::remote::unreadable(&what, &e)))?;
    let lifetime = time_left(&body["token"]).unwrap_or(Duration::from_secs(300));
    Ok((token, lifetime))
}

/// What Keystone says about a user's token.
#[derive(Clone, Debug, PartialEq)]
pub struct Identity {
    pub user_id: String,
    pub user_name: String,
    /// The project the token is scoped to.
    pub project_id: String,
    /// Role names on that project.
    pub roles: Vec<String>,
    /// Every project the user has a role on (effective assignments).
    pub projects: Vec<String>,
}

/// The outcome of checking a token with Keystone.
#[derive(Clone, Debug, PartialEq)]
pub enum Validation {
    Valid(Identity),
    /// Keystone does not know the token, or it expired or was revoked.
    Invalid,
    /// Keystone could not be asked (why, for the log).
    Unavailable(String),
}

/// How long validations are kept.
#[derive(Clone, Copy, Debug)]
pub struct CacheTimes {
    /// A valid token is believed this long, or until it expires if sooner; 0: not kept.
    pub positive: Duration,
    /// An invalid token is refused this long without asking again.
    pub negative: Duration,
}

/// What `serve --keystone-url …` sets up.
#[derive(Clone, Debug)]
pub struct ValidatorConfig {
    pub credentials: KeystoneCredentials,
    pub times: CacheTimes,
}

#[derive(Clone)]
enum Kept {
    Valid(Identity, Instant),
    Invalid(Instant),
}

/// Beyond this many kept validations the cache starts afresh.
const KEPT_CAPACITY: usize = 65_536;
/// Validations in flight at once: a flood of unknown tokens waits for a permit (without a
/// thread) before [`Validator::validate`] runs, so it queues here, not at Keystone or in the
/// blocking thread pool.
const CONCURRENT_VALIDATIONS: usize = 8;

/// Validates users' tokens with Keystone v3 (`GET /v3/auth/tokens`), authenticated by the
/// appliance's own service token, and keeps the results like keystonemiddleware does: by the
/// token's SHA-256 (never the token), valid ones until expiry or the positive TTL, invalid
/// ones for the negative TTL.
pub struct Validator {
    url: String,
    service: TokenSource,
    http: Client,
    times: CacheTimes,
    kept: Bounded<[u8; 32], Kept>,
    /// Permits to run [`Validator::validate`]; see [`CONCURRENT_VALIDATIONS`].
    pub permits: Arc<tokio::sync::Semaphore>,
    /// Validation calls made to Keystone.
    pub calls: std::sync::atomic::AtomicU64,
}

impl Validator {
    /// Makes the validator and checks the service password is readable (blocking: it makes
    /// a blocking HTTP client, which must not happen on an async thread).
    pub fn new(config: ValidatorConfig) -> Result<Validator, String> {
        let ValidatorConfig {
            credentials: service,
            times,
        } = config;
        service.password.read()?;
        let http = Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot set up an HTTP client: {e}"))?;
        Ok(Validator {
            url: service.auth_url.trim_end_matches('/').to_string(),
            service: TokenSource::new(service),
            http,
            times,
            kept: Bounded::new(KEPT_CAPACITY),
            permits: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_VALIDATIONS)),
            calls: Default::default(),
        })
    }

    /// The kept result for a token, if one is still good (no I/O).
    pub fn kept(&self, digest: &[u8; 32]) -> Option<Validation> {
        let now = Instant::now();
        match self.kept.get(digest)? {
            Kept::Valid(identity, until) if now < until => Some(Validation::Valid(identity)),
            Kept::Invalid(until) if now < until => Some(Validation::Invalid),
            _ => {
                self.kept.remove(digest);
                None
            }
        }
    }

    fn keep(&self, digest: [u8; 32], entry: Kept) {
        self.kept.insert(digest, entry);
    }

    /// Asks Keystone about `token` (blocking; the caller holds one of `permits`) and keeps
    /// the answer.
    pub fn validate(&self, token: &str, digest: [u8; 32]) -> Validation {
        // Another request may have asked about the same token while this one waited.
        if let Some(done) = self.kept(&digest) {
            return done;
        }
        let (result, expires) = match self.ask(token) {
            Ok(Some((identity, expires))) => (Validation::Valid(identity), expires),
            Ok(None) => (Validation::Invalid, Instant::now()),
            Err(e) => (Validation::Unavailable(e.to_string()), Instant::now()),
        };
        match &result {
            Validation::Valid(_) if self.times.positive.is_zero() => {}
            Validation::Valid(identity) => {
                let until = Instant::now()
                    .checked_add(self.times.positive)
                    .map_or(expires, |until| until.min(expires));
                self.keep(digest, Kept::Valid(identity.clone(), until));
            }
            Validation::Invalid => {
                if let Some(until) = Instant::now().checked_add(self.times.negative) {
                    self.keep(digest, Kept::Invalid(until));
                }
            }
            Validation::Unavailable(_) => {}
        }
        result
    }

    /// A JSON answer to a request sent with the service token, or `Err(status)` for one of
    /// the `expected` error statuses. Any other failure (a 401 twice included: the
    /// appliance's own credentials are refused) means identity cannot be asked, not that the
    /// user's token is bad.
    fn get_json(
        &self,
        request: impl Fn(&str) -> reqwest::blocking::RequestBuilder,
        expected: &[u16],
    ) -> Result<Result<serde_json::Value, u16>, RemoteError> {
        let what = format!("Keystone at {}", self.url);
        let resp = self.service.send(&self.http, &what, request)?;
        let status = resp.status();
        if expected.contains(&status.as_u16()) {
            return Ok(Err(status.as_u16()));
        }
        if !status.is_success() {
            return Err(match RemoteError::from_status(&what, status, resp) {
                RemoteError::Refused(e) => RemoteError::Unavailable(e),
                e => e,
            });
        }
        resp.json()
            .map(Ok)
            .map_err(|e| RemoteError::Unavailable(crate::remote::unreadable(&what, &e)))
    }

    /// The token's identity and when it expires; `None` if Keystone says it is not valid.
    fn ask(&self, token: &str) -> Result<Option<(Identity, Instant)>, RemoteError> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let request = |service: &str| {
            self.http
                .get(format!("{}/auth/tokens", self.url))
                .header("x-auth-token", service)
                .header("x-subject-token", token)
        };
        // 404: not a valid token (unknown, expired or revoked).
        let Ok(body) = self.get_json(request, &[404])? else {
            return Ok(None);
        };
        let t = &body["token"];
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        let Some(project_id) = t["project"]["id"].as_str().map(str::to_owned) else {
            // Unscoped or domain-scoped: no tenant to act as.
            return Ok(None);
        };
        let expires = time_left(t)
            .and_then(|left| Instant::now().checked_add(left))
            .unwrap_or_else(Instant::now);
        let user_id = text(&t["user"]["id"]);
        let roles = t["roles"]
            .as_array()
            .map(|r| r.iter().map(|r| text(&r["name"])).collect())
            .unwrap_or_default();
        let projects = self.projects_of(&user_id)?;
        Ok(Some((
            Identity {
                user_name: text(&t["user"]["name"]),
                user_id,
                project_id,
                roles,
                projects,
            },
            expires,
        )))
    }

    /// Ids of the projects the user has any role on, directly or through groups.
    fn projects_of(&self, user_id: &str) -> Result<Vec<String>, RemoteError> {
        let request = |service: &str| {
            self.http
                .get(format!("{}/role_assignments", self.url))
                .query(&[("user.id", user_id), ("effective", "")])
                .header("x-auth-token", service)
        };
        let body = match self.get_json(request, &[403, 404])? {
            Ok(body) => body,
            // Keystone's policy may not let the service user list role assignments: tokens
            // still work, for their own project only.
            Err(status) => {
                tracing::warn!(status, "Keystone does not list role assignments to the appliance's service user: Keystone tokens may use their own project only");
                serde_json::Value::Null
            }
        };
        let mut projects: Vec<String> = body["role_assignments"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["scope"]["project"]["id"].as_str().map(str::to_owned))
            .collect();
        projects.sort();
        projects.dedup();
        Ok(projects)
    }
}
