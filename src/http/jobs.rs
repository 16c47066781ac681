//! The four image_replicator routes (list, copy, show, cancel) and the appliance's own beside
//! them (a job's detail, a retry, the changes of a job list).

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::time::Instant;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::Reply as _;

use super::reply::{json_response, with_type, Failure, JSON};
use super::{blocking, Body, Reply, Request, BODY_TIMEOUT};
use crate::auth::Principal;
use crate::error::ServiceError;
use crate::model::JobStatus;
use crate::service::Service;

/// `POST /jobs`: a copy request, 202 with the new job's id.
pub(super) fn create(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let is_json = req
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Err(Failure::Status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Send the body as JSON with the header Content-Type: application/json.".into(),
            ));
        }
        let bytes = read_body(&req.headers, req.body, req.body_limit).await?;
        let request = parse_copy_request(&bytes)?;
        let svc = req.svc;
        let job = blocking(move || svc.create_job(&who, &request.image_id, &request.tenant_id_dst))
            .await?;
        json_response(
            StatusCode::ACCEPTED,
            &serde_json::json!({ "job_id": job.wire.job_id }),
        )
    })
}

/// `GET /jobs`: a page of the caller's jobs. A kept page (no job changed since) is answered
/// at once; building one (up to 1,000 jobs read from the store and encoded) never happens on
/// the executor, where four clients polling a tenant's list once held `/healthz` for 400 ms.
pub(super) fn list(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let q = parse_list_query(&req.query)?;
        let svc = req.svc;
        let body = match svc.kept_list_body(&who, q.status, q.marker.as_deref(), q.limit) {
            Some(body) => body,
            None => {
                blocking(move || svc.list_jobs_body(&who, q.status, q.marker.as_deref(), q.limit))
                    .await?
            }
        };
        Ok(with_type(Response::new(body.into()), StatusCode::OK, JSON))
    })
}

/// `GET /jobs/{job_id}`: the job's ten keys.
pub(super) fn show(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let (svc, id) = (req.svc, req.param);
        let job = blocking(move || svc.show_job(&who, &id)).await?;
        json_response(StatusCode::OK, &job.wire)
    })
}

/// `GET /jobs/{job_id}/detail`: the ten keys, then the job's times, bytes, rate and error
/// (an appliance addition; same scoping and errors as the show route). A tenant's error has
/// the appliance's file paths withheld; an admin's is whole.
pub(super) fn detail(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let (svc, id) = (req.svc, req.param);
        let admin = who.admin;
        let job = blocking(move || svc.show_job(&who, &id)).await?;
        let mut detail = crate::model::JobDetail::from(&job);
        if !admin {
            // The reason names what failed; where the operator keeps files is not the tenant's.
            detail.error = detail.error.map(|e| crate::text::without_paths(&e));
        }
        json_response(StatusCode::OK, &detail)
    })
}

/// `POST /jobs/{job_id}/retry`: a new job from an `error` or `canceled` one, 202 with the new
/// job's ten keys (an appliance addition; the job's tenant or an admin).
pub(super) fn retry(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let (svc, id) = (req.svc, req.param);
        let job = blocking(move || svc.retry_job(Some(&who), &id)).await?;
        json_response(StatusCode::ACCEPTED, &job.wire)
    })
}

/// `DELETE /jobs/{job_id}`: a cancel, 204.
pub(super) fn cancel(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let (svc, id) = (req.svc, req.param);
        blocking(move || svc.cancel_job(&who, &id)).await?;
        Ok(warp::reply::with_status(warp::reply(), StatusCode::NO_CONTENT).into_response())
    })
}

/// How often a waiting `GET /changes` looks at the store's job version (an atomic read).
const CHANGES_TICK: Duration = Duration::from_millis(250);

/// `GET /changes?after=TAG[&timeout=S]`: answers `{"tag": …}`, the tag of the caller's job
/// list (what `GET /jobs` would answer now), as soon as it differs from `after` (at once
/// without `after`), or after `timeout` seconds (default 25, at most 60) with the same tag.
/// An appliance addition for pages that follow jobs: they ask for the list only when it
/// changed, so an open page on jobs that do not move costs one request per `timeout`.
pub(super) fn changes(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let q = parse_changes_query(&req.query)?;
        let svc = req.svc;
        let deadline = Instant::now() + q.timeout;
        let mut seen = None;
        let tag = loop {
            let version = svc.store.jobs_version();
            if seen != Some(version) {
                seen = Some(version);
                let tag = list_tag(&svc, &who).await?;
                if q.after.as_deref() != Some(tag.as_str()) {
                    break tag;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                break q.after.unwrap_or_default();
            }
            tokio::time::sleep(CHANGES_TICK.min(deadline - now)).await;
        };
        json_response(StatusCode::OK, &serde_json::json!({ "tag": tag }))
    })
}

/// The first 16 hex digits of the BLAKE3 of the caller's default job list body (the kept one
/// when no job changed since it was built).
async fn list_tag(svc: &Arc<Service>, who: &Principal) -> Result<String, ServiceError> {
    let body = match svc.kept_list_body(who, None, None, None) {
        Some(body) => body,
        None => {
            let (svc, who) = (Arc::clone(svc), who.clone());
            blocking(move || svc.list_jobs_body(&who, None, None, None)).await?
        }
    };
    Ok(blake3::hash(&body).to_hex()[..16].to_string())
}

/// The parameters of the changes route.
#[derive(Debug, PartialEq)]
pub struct ChangesQuery {
    pub after: Option<String>,
    pub timeout: Duration,
}

/// The longest a changes request waits.
const CHANGES_MAX_WAIT: u64 = 60;

/// Parses `after` (a tag: 16 lowercase hex digits) and `timeout` (whole seconds, 0 to 60);
/// anything else, repeated or malformed is a 400.
pub fn parse_changes_query(query: &str) -> Result<ChangesQuery, ServiceError> {
    let mut parsed = ChangesQuery {
        after: None,
        timeout: Duration::from_secs(25),
    };
    let mut seen = std::collections::HashSet::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if !seen.insert(key.clone()) {
            return Err(invalid(format!("query parameter {key} is given twice")));
        }
        match key.as_ref() {
            "after" => {
                let is_tag = value.len() == 16
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                if !is_tag {
                    return Err(invalid(
                        "after must be a tag from an earlier answer (16 hex digits)".into(),
                    ));
                }
                parsed.after = Some(value.into_owned());
            }
            "timeout" => {
                let secs = value
                    .parse::<u64>()
                    .ok()
                    .filter(|s| *s <= CHANGES_MAX_WAIT)
                    .ok_or_else(|| {
                        invalid(format!(
                            "timeout must be whole seconds from 0 to {CHANGES_MAX_WAIT}"
                        ))
                    })?;
                parsed.timeout = Duration::from_secs(secs);
            }
            _ => {
                return Err(invalid(format!(
                    "unknown query parameter '{key}'; this route takes after and timeout"
                )))
            }
        }
    }
    Ok(parsed)
}

fn bad_request(message: String) -> Failure {
    Failure::Service(ServiceError::BadRequest(message))
}

fn invalid(message: String) -> ServiceError {
    ServiceError::BadRequest(message)
}

/// The optional parameters of the list route.
#[derive(Debug, Default, PartialEq)]
pub struct ListQuery {
    pub status: Option<JobStatus>,
    pub limit: Option<usize>,
    pub marker: Option<String>,
}

/// Parses `status`, `limit` and `marker`; anything else, repeated or malformed is a 400.
pub fn parse_list_query(query: &str) -> Result<ListQuery, ServiceError> {
    let mut parsed = ListQuery::default();
    let mut seen = std::collections::HashSet::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if !seen.insert(key.clone()) {
            return Err(invalid(format!("query parameter {key} is given twice")));
        }
        match key.as_ref() {
            "status" => parsed.status = Some(value.parse::<JobStatus>().map_err(invalid)?),
            "limit" => {
                parsed.limit = Some(value.parse::<usize>().map_err(|_| {
                    invalid(format!("limit '{value}' is not a non-negative integer"))
                })?)
            }
            "marker" => parsed.marker = Some(value.into_owned()),
            _ => {
                return Err(invalid(format!(
                    "unknown query parameter '{key}'; this list takes status, limit and marker"
                )))
            }
        }
    }
    Ok(parsed)
}

/// The body of a copy request: exactly these two string keys.
#[derive(Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CopyRequest {
    pub image_id: String,
    pub tenant_id_dst: String,
}

/// Parses a copy request body; anything but a JSON object with exactly the two string keys
/// (once each) is a 400 whose sentence says what to send.
pub fn parse_copy_request(bytes: &[u8]) -> Result<CopyRequest, ServiceError> {
    const SHAPE: &str = r#"send {"image_id": "<uuid>", "tenant_id_dst": "<tenant id>"}"#;
    // serde would also take an array of the two values; the contract wants an object.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        let what = match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
            Ok(_) => "the body is JSON but not an object",
            Err(_) => "the body is not valid JSON",
        };
        return Err(invalid(format!("{what}; {SHAPE}")));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        let what = if e.is_data() {
            "the body is not a copy request"
        } else {
            "the body is not valid JSON"
        };
        invalid(format!("{what} ({e}); {SHAPE}"))
    })
}

/// Reads the body, refusing (413) as soon as it is known to exceed `limit`.
pub(super) async fn read_body(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
) -> Result<BytesMut, Failure> {
    let too_large = || {
        Failure::Status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("The request body is larger than {limit} bytes."),
        )
    };
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let read = async {
        let mut buf = BytesMut::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk
                .map_err(|e| bad_request(format!("the request body could not be read: {e}")))?;
            if buf.len() + chunk.len() > limit {
                return Err(too_large());
            }
            buf.put(chunk);
        }
        Ok(buf)
    };
    tokio::time::timeout(BODY_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| {
            Err(Failure::Status(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "The request body did not arrive within {} seconds.",
                    BODY_TIMEOUT.as_secs()
                ),
            ))
        })
}
