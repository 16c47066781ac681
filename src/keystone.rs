//! Keystone v3: project-scoped tokens by password, for the service users the appliance acts as
//! in Glance regions. A token is kept until shortly before it expires and renewed then; a
//! caller that gets a 401 with it calls [`TokenSource::invalidate`] and asks again.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use reqwest::blocking::Client;
use serde_json::json;

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

    /// Forgets the kept token (the service refused it).
    pub fn invalidate(&self) {
        if let Ok(mut cached) = self.cached.lock() {
            *cached = None;
        }
    }
}

/// Authenticates by password; returns the token and how long it is valid.
pub fn password_token(
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
        .map_err(|e| RemoteError::Refused(format!("{what} answered unreadable JSON: {e}")))?;
    let lifetime = body["token"]["expires_at"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .and_then(|t| t.duration_since(SystemTime::now()).ok())
        .unwrap_or(Duration::from_secs(300));
    Ok((token, lifetime))
}
