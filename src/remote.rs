//! What can go wrong when the appliance talks to another service (Glance, Keystone).
//!
//! The texts are made here from what the service answered, which it controls: each is
//! escaped ([`crate::text::escape`]) and capped as it is made, so that a job's error, a log
//! line or the CLI can show it as it is.

use reqwest::blocking::Response;
use reqwest::StatusCode;

use crate::text;

/// Characters of a service's own words kept in an error (after escaping).
const MAX_DETAIL: usize = 200;

/// The text for an answer `what` sent that does not parse: `e` says why, and may quote the
/// answer (serde does).
pub fn unreadable(what: &str, e: &dyn std::fmt::Display) -> String {
    let detail = text::excerpt(&e.to_string(), MAX_DETAIL);
    format!("{what} answered unreadable JSON: {detail}")
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RemoteError {
    /// It does not answer, timed out or failed inside (5xx): retrying may help.
    #[error("{0}")]
    Unavailable(String),
    /// It refused (4xx), answered nonsense, or the appliance is set up wrongly for it:
    /// retrying will not help.
    #[error("{0}")]
    Refused(String),
}

impl RemoteError {
    pub fn is_transient(&self) -> bool {
        matches!(self, RemoteError::Unavailable(_))
    }

    /// A failed exchange with `what` (such as "Glance of region ot3").
    pub fn from_reqwest(what: &str, e: reqwest::Error) -> RemoteError {
        // The error's own text names the URL; the cause chain says what happened.
        let mut cause = String::new();
        let mut source: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(s) = source {
            cause = s.to_string();
            source = s.source();
        }
        let detail = if cause.is_empty() {
            e.to_string()
        } else {
            cause
        };
        let detail = text::excerpt(&detail, MAX_DETAIL);
        if e.is_builder() {
            RemoteError::Refused(format!("{what}: bad request: {detail}"))
        } else if e.is_timeout() {
            RemoteError::Unavailable(format!("{what} did not answer in time: {detail}"))
        } else {
            RemoteError::Unavailable(format!("{what} does not answer: {detail}"))
        }
    }

    /// An answer with an error status; the first line of its body says why.
    pub fn from_status(what: &str, status: StatusCode, resp: Response) -> RemoteError {
        let body = resp.text().unwrap_or_default();
        Self::from_status_text(what, status, &body)
    }

    /// [`RemoteError::from_status`] with the body already read.
    pub fn from_status_text(what: &str, status: StatusCode, body: &str) -> RemoteError {
        let why = body
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('<'))
            .unwrap_or("");
        let why = text::excerpt(why, MAX_DETAIL);
        let text = if why.is_empty() {
            format!("{what} answered {status}")
        } else {
            format!("{what} answered {status}: {why}")
        };
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            RemoteError::Unavailable(text)
        } else {
            RemoteError::Refused(text)
        }
    }
}
