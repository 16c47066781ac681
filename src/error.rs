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
    /// The caller is known but may not do this (403): a protected image's delete, a
    /// read-only field, a visibility its role cannot set (the images API).
    #[error("{0}")]
    Forbidden(String),
    /// The request's body is not of the kind the resource takes (415): an upload whose bytes
    /// contradict the image's disk format, a patch in another media type.
    #[error("{0}")]
    Unsupported(String),
    /// The thing does not exist or is not visible to the caller (404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// The request would take the tenant over one of its quotas (413, as Glance answers an
    /// upload over `user_storage_quota`).
    #[error("{0}")]
    OverQuota(String),
    /// Something broke inside the appliance (500).
    #[error("{0}")]
    Internal(String),
    /// A service the appliance depends on cannot be reached (503).
    #[error("{0}")]
    Unavailable(String),
    /// The store's disk is full, so nothing could be written (507, as WebDAV's Insufficient
    /// Storage); the store takes writes again by itself once space is freed.
    #[error("{0}")]
    DiskFull(String),
}

/// How every storage failure of the store that is not a full disk begins (500).
pub const STORE_ERROR: &str = "store error";

impl ServiceError {
    pub fn status(&self) -> u16 {
        match self {
            ServiceError::BadRequest(_) => 400,
            ServiceError::Unauthorized(_) => 401,
            ServiceError::Forbidden(_) => 403,
            ServiceError::NotFound(_) => 404,
            ServiceError::Unsupported(_) => 415,
            ServiceError::Conflict(_) => 409,
            ServiceError::OverQuota(_) => 413,
            ServiceError::Internal(_) => 500,
            ServiceError::Unavailable(_) => 503,
            ServiceError::DiskFull(_) => 507,
        }
    }

    /// The store could not write because its disk is full.
    pub fn disk_full() -> ServiceError {
        ServiceError::DiskFull(
            "The store cannot write because its disk is full; nothing was changed, and the \
             store takes writes again by itself once space is freed."
                .into(),
        )
    }

    pub fn internal(context: &str, err: impl std::fmt::Display) -> ServiceError {
        ServiceError::Internal(format!("{context}: {err}"))
    }
}

pub type Result<T, E = ServiceError> = std::result::Result<T, E>;
