//! The one error type of the service layer; each variant knows its HTTP status.

use serde::{Deserialize, Serialize};

#[derive(thiserror::Error, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServiceError {
    /// The request is malformed (400).
    #[error("{0}")]
    BadRequest(String),
    /// The caller may not do this (401). The HTTP sentence never says why.
    #[error("{0}")]
    Unauthorized(String),
    /// The thing does not exist or is not visible to the caller (404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// Something broke inside the appliance (500).
    #[error("{0}")]
    Internal(String),
    /// A service the appliance depends on cannot be reached (503).
    #[error("{0}")]
    Unavailable(String),
}

impl ServiceError {
    pub fn status(&self) -> u16 {
        match self {
            ServiceError::BadRequest(_) => 400,
            ServiceError::Unauthorized(_) => 401,
            ServiceError::NotFound(_) => 404,
            ServiceError::Conflict(_) => 409,
            ServiceError::Internal(_) => 500,
            ServiceError::Unavailable(_) => 503,
        }
    }

    pub fn internal(context: &str, err: impl std::fmt::Display) -> ServiceError {
        ServiceError::Internal(format!("{context}: {err}"))
    }
}

impl From<sled::Error> for ServiceError {
    fn from(err: sled::Error) -> Self {
        ServiceError::internal("store error", err)
    }
}

pub type Result<T, E = ServiceError> = std::result::Result<T, E>;
