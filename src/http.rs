//! The HTTP door: the four image_replicator routes of `API.md`.
//!
//! One warp filter hands every request to [`handle`], which matches path first, then method,
//! then the token, then the body: so a wrong path is always a 404, a wrong method a 405, and a
//! bad token a 401 before any body is read. Every error leaves in the reference's plain-text
//! shape, and every response carries an `X-Openstack-Request-Id`.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BufMut, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::auth::Principal;
use crate::error::ServiceError;
use crate::model::JobStatus;
use crate::service::Service;

pub const JOBS_PATH: &str = "/v2/extension/image_replicator/jobs";
/// Largest request body accepted (413 beyond).
pub const BODY_LIMIT: usize = 16 * 1024;
/// Longest a request body may take to arrive (408 beyond).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

const JSON: &str = "application/json; charset=UTF-8";
const TEXT: &str = "text/plain; charset=UTF-8";

/// The whole API as one filter; it answers every request itself.
pub fn routes(
    svc: Arc<Service>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let query = warp::query::raw().or(warp::any().map(String::new)).unify();
    warp::method()
        .and(warp::path::full())
        .and(query)
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(
            move |method: Method, path: warp::path::FullPath, query: String, headers, body| {
                let svc = Arc::clone(&svc);
                async move {
                    let req = Incoming {
                        method,
                        path: path.as_str().to_string(),
                        query,
                        headers,
                    };
                    handle(svc, req, body).await
                }
            },
        )
}

struct Incoming {
    method: Method,
    path: String,
    query: String,
    headers: HeaderMap,
}

enum Route<'a> {
    Jobs,
    Job(&'a str),
    Health,
    Metrics,
    Unknown,
}

impl Route<'_> {
    fn parse(path: &str) -> Route<'_> {
        match path {
            JOBS_PATH => return Route::Jobs,
            "/healthz" => return Route::Health,
            "/metrics" => return Route::Metrics,
            _ => {}
        }
        match path
            .strip_prefix(JOBS_PATH)
            .and_then(|r| r.strip_prefix('/'))
        {
            Some(id) if !id.is_empty() && !id.contains('/') => Route::Job(id),
            _ => Route::Unknown,
        }
    }

    fn template(&self) -> &'static str {
        match self {
            Route::Jobs => JOBS_PATH,
            Route::Job(_) => "/v2/extension/image_replicator/jobs/{job_id}",
            Route::Health => "/healthz",
            Route::Metrics => "/metrics",
            Route::Unknown => "(unknown)",
        }
    }
}

async fn handle(
    svc: Arc<Service>,
    req: Incoming,
    body: impl Stream<Item = Result<impl Buf, warp::Error>> + Send + Unpin,
) -> Response {
    let started = Instant::now();
    let request_id = new_request_id();
    let route = Route::parse(&req.path);
    let mut response = match dispatch(&svc, &req, &route, body).await {
        Ok(response) => response,
        Err(failure) => failure.into_response(&request_id),
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response
            .headers_mut()
            .insert("x-openstack-request-id", value);
    }
    let took = started.elapsed();
    let status = response.status().as_u16();
    svc.metrics
        .record_request(route.template(), req.method.as_str(), status, took);
    tracing::info!(
        method = %req.method,
        route = route.template(),
        status,
        latency_us = took.as_micros() as u64,
        request_id = %request_id,
        "request"
    );
    response
}

/// Why a request failed, as it will be told.
enum Failure {
    Status(StatusCode, String),
    MethodNotAllowed(&'static str),
    Service(ServiceError),
}

impl From<ServiceError> for Failure {
    fn from(e: ServiceError) -> Self {
        Failure::Service(e)
    }
}

fn unauthorized() -> Failure {
    Failure::Service(ServiceError::Unauthorized(String::new()))
}

impl Failure {
    fn into_response(self, request_id: &str) -> Response {
        let (status, sentence) = match self {
            Failure::Status(status, sentence) => (status, sentence),
            Failure::MethodNotAllowed(allow) => {
                let mut response = error_response(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &format!("This resource allows only {allow}."),
                );
                response
                    .headers_mut()
                    .insert("allow", HeaderValue::from_static(allow));
                return response;
            }
            Failure::Service(ServiceError::Unauthorized(_)) => {
                let mut response =
                    error_response(StatusCode::UNAUTHORIZED, "Authentication required.");
                response
                    .headers_mut()
                    .insert("vary", HeaderValue::from_static("X-Auth-Token"));
                return response;
            }
            Failure::Service(ServiceError::Internal(detail)) => {
                tracing::error!(request_id, "internal error: {detail}");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("The server failed to handle request {request_id}; its log says why."),
                )
            }
            Failure::Service(e) => (
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                sentence(&e.to_string()),
            ),
        };
        let mut response = error_response(status, &sentence);
        if matches!(
            status,
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
        ) {
            // The rest of the body was never read: the connection cannot carry another request.
            response
                .headers_mut()
                .insert("connection", HeaderValue::from_static("close"));
        }
        response
    }
}

/// A request whose target is not a path (`CONNECT host:port`, absolute or authority form):
/// answered before warp sees it, in the same plain-text shape.
pub fn bad_target() -> Response {
    let mut response = error_response(
        StatusCode::BAD_REQUEST,
        "The request target must be a path such as /v2/extension/image_replicator/jobs.",
    );
    if let Ok(id) = HeaderValue::from_str(&new_request_id()) {
        response.headers_mut().insert("x-openstack-request-id", id);
    }
    response
}

/// A request whose `Transfer-Encoding` is anything but exactly `chunked`, answered before warp
/// (hyper only checks that `chunked` comes last, and would hand a gzip-coded body on as if it
/// were plain). RFC 9112 §6.1: a coding the server does not implement is a 501; `chunked`
/// applied twice is a malformed message, a 400. The body is never read, so the connection
/// closes. `None` when the request has no such problem.
pub fn refuse_transfer_coding(headers: &HeaderMap) -> Option<Response> {
    let mut values = headers.get_all("transfer-encoding").iter().peekable();
    values.peek()?;
    let mut codings = Vec::new();
    for value in values {
        let Ok(text) = value.to_str() else {
            codings.push(String::from("(not ASCII)"));
            continue;
        };
        codings.extend(
            text.split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned),
        );
    }
    let is_chunked = |c: &String| c.eq_ignore_ascii_case("chunked");
    if codings.len() == 1 && is_chunked(&codings[0]) {
        return None;
    }
    let (status, message) = match codings.iter().find(|c| !is_chunked(c)) {
        Some(other) => (
            StatusCode::NOT_IMPLEMENTED,
            format!("this server implements only the chunked transfer coding, not '{other}'"),
        ),
        None => (
            StatusCode::BAD_REQUEST,
            "the chunked transfer coding may be applied only once".to_string(),
        ),
    };
    let mut response = error_response(status, &sentence(&message));
    let headers = response.headers_mut();
    headers.insert("connection", HeaderValue::from_static("close"));
    if let Ok(id) = HeaderValue::from_str(&new_request_id()) {
        headers.insert("x-openstack-request-id", id);
    }
    Some(response)
}

/// The id a response carries in `X-Openstack-Request-Id` and the log line names.
pub(crate) fn new_request_id() -> String {
    format!("req-{}", uuid::Uuid::new_v4())
}

/// A message as one sentence: capital first letter, final full stop, control characters
/// escaped (they may come from the request and must not shape the response).
fn sentence(message: &str) -> String {
    let message: String = message
        .chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect();
    let mut chars = message.chars();
    let mut out: String = match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    };
    if !out.ends_with('.') {
        out.push('.');
    }
    out
}

/// `<code> <reason>\n\n<sentence>\n\n`, the body of the reference's error shape.
pub(crate) fn error_text(status: StatusCode, sentence: &str) -> String {
    let reason = status.canonical_reason().unwrap_or("Error");
    format!("{} {reason}\n\n{sentence}\n\n", status.as_u16())
}

/// [`error_text`] as a text/plain response.
fn error_response(status: StatusCode, sentence: &str) -> Response {
    with_type(error_text(status, sentence).into_response(), status, TEXT)
}

fn with_type(mut response: Response, status: StatusCode, content_type: &'static str) -> Response {
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static(content_type));
    response
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Result<Response, Failure> {
    let body = serde_json::to_vec(value)
        .map_err(|e| ServiceError::internal("cannot encode the response", e))?;
    Ok(with_type(body.into_response(), status, JSON))
}

/// The one `X-Auth-Token` value, if the request has exactly one readable one.
fn token(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all("x-auth-token").iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok()
}

async fn dispatch(
    svc: &Arc<Service>,
    req: &Incoming,
    route: &Route<'_>,
    body: impl Stream<Item = Result<impl Buf, warp::Error>> + Send + Unpin,
) -> Result<Response, Failure> {
    let allow = match route {
        Route::Unknown => {
            return Err(Failure::Status(
                StatusCode::NOT_FOUND,
                "There is no resource at this path.".into(),
            ))
        }
        Route::Jobs => "GET, POST",
        Route::Job(_) => "GET, DELETE",
        Route::Health | Route::Metrics => "GET",
    };
    let known = matches!(
        (route, &req.method),
        (Route::Jobs, &Method::GET | &Method::POST)
            | (Route::Job(_), &Method::GET | &Method::DELETE)
            | (Route::Health | Route::Metrics, &Method::GET)
    );
    if !known {
        return Err(Failure::MethodNotAllowed(allow));
    }
    // The operators' routes take no token and show no tenant data.
    match route {
        Route::Health => return health(svc).await,
        Route::Metrics => {
            let svc = Arc::clone(svc);
            let text = blocking(move || Ok(svc.metrics_text())).await?;
            return Ok(with_type(
                text.into_response(),
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
            ));
        }
        _ => {}
    }
    let who = svc
        .auth
        .authenticate(&svc.store, token(&req.headers))
        .await?
        .ok_or_else(unauthorized)?;
    match (route, &req.method) {
        (Route::Jobs, &Method::GET) => {
            // A page is up to 1,000 jobs read from sled and encoded: never on the executor,
            // where four clients polling a tenant's list once held `/healthz` for 400 ms.
            let (svc, query) = (Arc::clone(svc), req.query.clone());
            let body = blocking(move || list(&svc, &who, &query)).await?;
            Ok(with_type(Response::new(body.into()), StatusCode::OK, JSON))
        }
        (Route::Jobs, &Method::POST) => create(svc, who, &req.headers, body).await,
        (Route::Job(id), &Method::GET) => {
            let (svc, id) = (Arc::clone(svc), id.to_string());
            let job = blocking(move || svc.show_job(&who, &id)).await?;
            json_response(StatusCode::OK, &job.wire)
        }
        (Route::Job(id), &Method::DELETE) => {
            let (svc, id) = (Arc::clone(svc), id.to_string());
            blocking(move || svc.cancel_job(&who, &id)).await?;
            Ok(warp::reply::with_status(warp::reply(), StatusCode::NO_CONTENT).into_response())
        }
        _ => Err(Failure::MethodNotAllowed(allow)),
    }
}

/// `GET /healthz`: 200 `ok`, or 503 naming what is down.
async fn health(svc: &Arc<Service>) -> Result<Response, Failure> {
    let svc = Arc::clone(svc);
    match blocking(move || Ok(svc.health())).await? {
        Ok(()) => Ok(with_type("ok\n".into_response(), StatusCode::OK, TEXT)),
        Err(problems) => Err(Failure::Status(
            StatusCode::SERVICE_UNAVAILABLE,
            sentence(&problems.join("; ")),
        )),
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(ServiceError::internal("worker thread failed", e)))
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

fn list(svc: &Service, who: &Principal, query: &str) -> Result<bytes::Bytes, ServiceError> {
    let q = parse_list_query(query)?;
    svc.list_jobs_body(who, q.status, q.marker.as_deref(), q.limit)
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

async fn create(
    svc: &Arc<Service>,
    who: Principal,
    headers: &HeaderMap,
    body: impl Stream<Item = Result<impl Buf, warp::Error>> + Send + Unpin,
) -> Result<Response, Failure> {
    let is_json = headers
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
    let bytes = read_body(headers, body).await?;
    let request = parse_copy_request(&bytes)?;
    let svc = Arc::clone(svc);
    let job =
        blocking(move || svc.create_job(&who, &request.image_id, &request.tenant_id_dst)).await?;
    json_response(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "job_id": job.wire.job_id }),
    )
}

/// Reads the body, refusing (413) as soon as it is known to exceed [`BODY_LIMIT`].
async fn read_body(
    headers: &HeaderMap,
    mut body: impl Stream<Item = Result<impl Buf, warp::Error>> + Send + Unpin,
) -> Result<BytesMut, Failure> {
    let too_large = || {
        Failure::Status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("The request body is larger than {BODY_LIMIT} bytes."),
        )
    };
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        return Err(too_large());
    }
    let read = async {
        let mut buf = BytesMut::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk
                .map_err(|e| bad_request(format!("the request body could not be read: {e}")))?;
            if buf.len() + chunk.remaining() > BODY_LIMIT {
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
