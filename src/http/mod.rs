//! The HTTP door: the four image_replicator routes of `API.md`, the operators' two, the
//! peer protocol's, the images API (Glance v2 for the directory regions, README) and the web
//! page's.
//!
//! One warp filter hands every request to [`handle`], which finds the route by path (404),
//! then the method (405), then checks the token where the route needs one (401), and only then
//! lets the handler read the body. A new route is one row of [`ROUTES`] and its handler.
//! Every error leaves in the reference's plain-text shape ([`reply`]), and every response
//! carries an `X-Openstack-Request-Id`.

mod images;
mod jobs;
mod ops;
mod peer;
pub mod reply;
mod ui;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes};
use futures_util::future::BoxFuture;
use futures_util::{Stream, StreamExt};
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::Filter;

use crate::auth::Principal;
use crate::error::ServiceError;
use crate::service::Service;
pub use jobs::{parse_copy_request, parse_list_query, CopyRequest, ListQuery};
pub use reply::{bad_target, refuse_transfer_coding};
pub(crate) use reply::{error_text, new_request_id};
use reply::{unauthorized, Failure};

pub const JOBS_PATH: &str = "/v2/extension/image_replicator/jobs";
/// Largest request body accepted (413 beyond).
pub const BODY_LIMIT: usize = 16 * 1024;
/// Longest a request body may take to arrive (408 beyond).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A request as a handler gets it.
pub struct Request {
    pub svc: Arc<Service>,
    /// The path's parameter (`{job_id}`), or empty.
    pub param: String,
    /// The path's second parameter (`{tag}`, percent-decoded), or empty.
    pub param2: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Body,
    /// The largest body the route takes (413 beyond).
    pub body_limit: usize,
}

/// A request body, read by the handlers that take one.
pub type Body = Pin<Box<dyn Stream<Item = Result<Bytes, warp::Error>> + Send>>;

type Reply = BoxFuture<'static, Result<Response, Failure>>;

/// What answers a method of a route.
enum Handler {
    /// No token: the operators' routes, which show no tenant data.
    Open(fn(Request) -> Reply),
    /// A valid token first: the principal it acts as.
    Token(fn(Request, Principal) -> Reply),
}

/// How a route's path is matched.
enum PathShape {
    Exact(&'static str),
    /// The prefix, then one non-empty segment (the parameter).
    Param(&'static str),
    /// The prefix, one non-empty segment (the parameter), then the suffix.
    ParamThen(&'static str, &'static str),
    /// The prefix, a segment, the middle, then a second segment (both non-empty).
    TwoParams(&'static str, &'static str),
}

struct Route {
    /// For metrics and logs.
    template: &'static str,
    path: PathShape,
    methods: &'static [(Method, Handler)],
    /// The `Allow` header of a 405.
    allow: &'static str,
    /// The largest request body its methods take.
    body_limit: usize,
}

static ROUTES: &[Route] = &[
    Route {
        template: "/",
        path: PathShape::Exact("/"),
        methods: &[(Method::GET, Handler::Open(images::versions_root))],
        allow: "GET",
        body_limit: BODY_LIMIT,
    },
    Route {
        template: "/versions",
        path: PathShape::Exact("/versions"),
        methods: &[(Method::GET, Handler::Open(images::versions))],
        allow: "GET",
        body_limit: BODY_LIMIT,
    },
    Route {
        template: "/v2/images",
        path: PathShape::Exact("/v2/images"),
        methods: &[
            (Method::GET, Handler::Token(images::list)),
            (Method::POST, Handler::Token(images::create)),
        ],
        allow: "GET, POST",
        body_limit: images::BODY_LIMIT,
    },
    Route {
        template: "/v2/images/{id}",
        path: PathShape::Param("/v2/images/"),
        methods: &[
            (Method::GET, Handler::Token(images::show)),
            (Method::PATCH, Handler::Token(images::update)),
            (Method::DELETE, Handler::Token(images::delete)),
        ],
        allow: "GET, PATCH, DELETE",
        body_limit: images::BODY_LIMIT,
    },
    Route {
        template: "/v2/images/{id}/file",
        path: PathShape::ParamThen("/v2/images/", "/file"),
        methods: &[
            (Method::GET, Handler::Token(images::download)),
            (Method::PUT, Handler::Token(images::upload)),
        ],
        allow: "GET, PUT",
        body_limit: usize::MAX,
    },
    Route {
        template: "/v2/images/{id}/tags/{tag}",
        path: PathShape::TwoParams("/v2/images/", "/tags/"),
        methods: &[
            (Method::PUT, Handler::Token(images::add_tag)),
            (Method::DELETE, Handler::Token(images::remove_tag)),
        ],
        allow: "PUT, DELETE",
        body_limit: BODY_LIMIT,
    },
    Route {
        template: "/v2/schemas/image",
        path: PathShape::Exact("/v2/schemas/image"),
        methods: &[(Method::GET, Handler::Open(images::schema_image))],
        allow: "GET",
        body_limit: BODY_LIMIT,
    },
    Route {
        template: "/v2/schemas/images",
        path: PathShape::Exact("/v2/schemas/images"),
        methods: &[(Method::GET, Handler::Open(images::schema_images))],
        allow: "GET",
        body_limit: BODY_LIMIT,
    },
    Route {
        template: JOBS_PATH,
        path: PathShape::Exact(JOBS_PATH),
        methods: &[
            (Method::GET, Handler::Token(jobs::list)),
            (Method::POST, Handler::Token(jobs::create)),
        ],
        allow: "GET, POST",
        body_limit: BODY_LIMIT,
    },
    Route {
        template: "/v2/extension/image_replicator/jobs/{job_id}",
        path: PathShape::Param("/v2/extension/image_replicator/jobs/"),
        methods: &[
            (Method::GET, Handler::Token(jobs::show)),
            (Method::DELETE, Handler::Token(jobs::cancel)),
        ],
        allow: "GET, DELETE",
        body_limit: BODY_LIMIT,
    },
    Route {
        template: "/v2/extension/image_replicator/jobs/{job_id}/detail",
        path: PathShape::ParamThen("/v2/extension/image_replicator/jobs/", "/detail"),
        methods: &[(Method::GET, Handler::Token(jobs::detail))],
        allow: "GET",
        body_limit: BODY_LIMIT,
    },
    Route {
        template: "/v2/extension/image_replicator/jobs/{job_id}/retry",
        path: PathShape::ParamThen("/v2/extension/image_replicator/jobs/", "/retry"),
        methods: &[(Method::POST, Handler::Token(jobs::retry))],
        allow: "POST",
        body_limit: BODY_LIMIT,
    },
    Route {
        template: "/v2/extension/image_replicator/changes",
        path: PathShape::Exact("/v2/extension/image_replicator/changes"),
        methods: &[(Method::GET, Handler::Token(jobs::changes))],
        allow: "GET",
        body_limit: BODY_LIMIT,
    },
    Route {
        template: "/healthz",
        path: PathShape::Exact("/healthz"),
        methods: &[(Method::GET, Handler::Open(ops::health))],
        allow: "GET",
        body_limit: BODY_LIMIT,
    },
    Route {
        template: ui::PAGE,
        path: PathShape::Exact(ui::PAGE),
        methods: &[(Method::GET, Handler::Open(ui::page))],
        allow: "GET",
        body_limit: BODY_LIMIT,
    },
    Route {
        template: "/ui/{file}",
        path: PathShape::Param(ui::ASSETS),
        methods: &[(Method::GET, Handler::Open(ui::asset))],
        allow: "GET",
        body_limit: BODY_LIMIT,
    },
    Route {
        template: "/metrics",
        path: PathShape::Exact("/metrics"),
        methods: &[(Method::GET, Handler::Open(ops::metrics))],
        allow: "GET",
        body_limit: BODY_LIMIT,
    },
    Route {
        template: "/peer",
        path: PathShape::Exact(crate::peer::PREFIX),
        methods: &[(Method::GET, Handler::Open(peer::versions))],
        allow: "GET",
        body_limit: BODY_LIMIT,
    },
    Route {
        template: "/peer/v1/images",
        path: PathShape::Exact("/peer/v1/images"),
        methods: &[(Method::GET, Handler::Token(peer::list))],
        allow: "GET",
        body_limit: BODY_LIMIT,
    },
    Route {
        template: "/peer/v1/images/{id}",
        path: PathShape::Param("/peer/v1/images/"),
        methods: &[
            (Method::GET, Handler::Token(peer::record)),
            (Method::DELETE, Handler::Token(peer::delete)),
        ],
        allow: "GET, DELETE",
        body_limit: BODY_LIMIT,
    },
    Route {
        template: "/peer/v1/images/{id}/manifest",
        path: PathShape::ParamThen("/peer/v1/images/", "/manifest"),
        methods: &[(Method::GET, Handler::Token(peer::manifest))],
        allow: "GET",
        body_limit: BODY_LIMIT,
    },
    Route {
        template: "/peer/v1/images/{id}/chunks",
        path: PathShape::ParamThen("/peer/v1/images/", "/chunks"),
        methods: &[(Method::POST, Handler::Token(peer::chunks))],
        allow: "POST",
        body_limit: peer::RANGES_LIMIT,
    },
    Route {
        template: "/peer/v1/images/{id}/file",
        path: PathShape::ParamThen("/peer/v1/images/", "/file"),
        methods: &[(Method::GET, Handler::Token(peer::file))],
        allow: "GET",
        body_limit: BODY_LIMIT,
    },
    Route {
        template: "/peer/v1/uploads/{id}",
        path: PathShape::Param("/peer/v1/uploads/"),
        methods: &[
            (Method::PUT, Handler::Token(peer::upload)),
            (Method::DELETE, Handler::Token(peer::abandon)),
        ],
        allow: "PUT, DELETE",
        body_limit: peer::UPLOAD_LIMIT,
    },
    Route {
        template: "/peer/v1/uploads/{id}/chunks",
        path: PathShape::ParamThen("/peer/v1/uploads/", "/chunks"),
        methods: &[(Method::POST, Handler::Token(peer::receive))],
        allow: "POST",
        body_limit: peer::FRAMES_LIMIT,
    },
    Route {
        template: "/peer/v1/uploads/{id}/commit",
        path: PathShape::ParamThen("/peer/v1/uploads/", "/commit"),
        methods: &[(Method::POST, Handler::Token(peer::commit))],
        allow: "POST",
        body_limit: BODY_LIMIT,
    },
];

/// The route of `path` and its parameters (empty where the route has fewer).
fn find(path: &str) -> Option<(&'static Route, &str, &str)> {
    let one = |p: &&str| !p.is_empty() && !p.contains('/');
    ROUTES.iter().find_map(|route| match route.path {
        PathShape::Exact(p) => (path == p).then_some((route, "", "")),
        PathShape::Param(prefix) => path
            .strip_prefix(prefix)
            .filter(one)
            .map(|p| (route, p, "")),
        PathShape::ParamThen(prefix, suffix) => path
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(suffix))
            .filter(one)
            .map(|p| (route, p, "")),
        PathShape::TwoParams(prefix, middle) => path
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once(middle))
            .filter(|(a, b)| one(a) && one(b))
            .map(|(a, b)| (route, a, b)),
    })
}

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
                handle(svc, method, path, query, headers, body)
            },
        )
}

async fn handle(
    svc: Arc<Service>,
    method: Method,
    path: warp::path::FullPath,
    query: String,
    headers: HeaderMap,
    body: impl Stream<Item = Result<impl Buf, warp::Error>> + Send + 'static,
) -> Response {
    let started = Instant::now();
    let request_id = new_request_id();
    let global_request_id = inbound_request_id(&headers);
    let found = find(path.as_str());
    let template = found.map_or("(unknown)", |(route, _, _)| route.template);
    let body: Body = Box::pin(body.map(|chunk| chunk.map(|mut b| b.copy_to_bytes(b.remaining()))));
    let metrics = Arc::clone(&svc.metrics);
    let dispatched = match (found, peer::other_version(path.as_str())) {
        (None, Some(refusal)) => Err(refusal),
        _ => dispatch(svc, &method, found, query, headers, body).await,
    };
    let mut response = match dispatched {
        Ok(response) => response,
        Err(failure) => {
            log_refusal(&failure, template, &request_id);
            failure.into_response(&request_id)
        }
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response
            .headers_mut()
            .insert("x-openstack-request-id", value);
    }
    let took = started.elapsed();
    let status = response.status().as_u16();
    metrics.record_request(template, method.as_str(), status, took);
    tracing::info!(
        method = %method,
        route = template,
        status,
        latency_us = took.as_micros() as u64,
        request_id = %request_id,
        global_request_id = %global_request_id.as_deref().unwrap_or("-"),
        "request"
    );
    response
}

/// A 401's cause, in the log line of its request id (the response never says it).
fn log_refusal(failure: &Failure, route: &str, request_id: &str) {
    if let Failure::Service(ServiceError::Unauthorized(cause)) = failure {
        if !cause.is_empty() {
            tracing::info!(route, request_id = %request_id, cause = %cause, "401 Unauthorized");
        }
    }
}

/// The caller's `X-OpenStack-Request-ID` (keystoneauth's `global_request_id`), logged beside
/// ours as Glance does: only one value of oslo.context's shape, `req-` and a lowercase
/// hyphenated UUID; anything else is remote text and is not logged.
fn inbound_request_id(headers: &HeaderMap) -> Option<String> {
    let mut values = headers.get_all("x-openstack-request-id").iter();
    let value = values.next()?.to_str().ok()?;
    if values.next().is_some() {
        return None;
    }
    let id = uuid::Uuid::try_parse(value.strip_prefix("req-")?).ok()?;
    (id.hyphenated().to_string() == value["req-".len()..]).then(|| value.to_string())
}

/// A path segment with its `%XX` escapes decoded, as Glance (WebOb) decodes paths: a job id
/// sent as `0fa2817d%2D4e54…` is the job `0fa2817d-4e54…`. A `%` not followed by two hex
/// digits stays as it is; bytes that do not form UTF-8 leave the segment as it came.
pub(super) fn percent_decoded(segment: &str) -> String {
    if !segment.contains('%') {
        return segment.to_string();
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| segment.to_string())
}

async fn dispatch(
    svc: Arc<Service>,
    method: &Method,
    found: Option<(&'static Route, &str, &str)>,
    query: String,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Failure> {
    let Some((route, param, param2)) = found else {
        return Err(Failure::Status(
            StatusCode::NOT_FOUND,
            "There is no resource at this path.".into(),
        ));
    };
    let handler = route
        .methods
        .iter()
        .find(|(m, _)| m == method)
        .map(|(_, handler)| handler)
        .ok_or(Failure::MethodNotAllowed(route.allow))?;
    let who = match handler {
        Handler::Open(_) => None,
        Handler::Token(_) => Some(
            svc.auth
                .authenticate(&svc.store, token(&headers))
                .await?
                .map_err(|why| Failure::Service(ServiceError::Unauthorized(why.into())))?,
        ),
    };
    let request = Request {
        svc,
        param: percent_decoded(param),
        param2: percent_decoded(param2),
        query,
        headers,
        body,
        body_limit: route.body_limit,
    };
    match (handler, who) {
        (Handler::Open(handle), _) => handle(request).await,
        (Handler::Token(handle), Some(who)) => handle(request, who).await,
        (Handler::Token(_), None) => Err(unauthorized()),
    }
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

/// Runs blocking service work (sled, files, argon2) off the async executor.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(ServiceError::internal("worker thread failed", e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_find_their_route_and_parameter() {
        let template = |path| find(path).map(|(r, p, _)| (r.template, p));
        assert_eq!(template(JOBS_PATH), Some((JOBS_PATH, "")));
        assert_eq!(
            template("/v2/extension/image_replicator/jobs/abc"),
            Some(("/v2/extension/image_replicator/jobs/{job_id}", "abc"))
        );
        assert_eq!(template("/v2/extension/image_replicator/jobs/"), None);
        assert_eq!(template("/v2/extension/image_replicator/jobs/a/b"), None);
        assert_eq!(template("/healthz"), Some(("/healthz", "")));
        assert_eq!(template("/healthz/"), None);
        assert_eq!(template("/ui"), Some(("/ui", "")));
        assert_eq!(template("/ui/ui.js"), Some(("/ui/{file}", "ui.js")));
        assert_eq!(template("/ui/"), None);
        assert_eq!(template("/"), Some(("/", "")));
        assert_eq!(
            template("/v2/images/abc/file"),
            Some(("/v2/images/{id}/file", "abc"))
        );
        assert_eq!(
            find("/v2/images/abc/tags/a%20b").map(|(r, p, t)| (r.template, p, t)),
            Some(("/v2/images/{id}/tags/{tag}", "abc", "a%20b"))
        );
        assert_eq!(template("/v2/images/abc/tags/"), None);
        assert_eq!(
            template("/peer/v1/images/abc/chunks"),
            Some(("/peer/v1/images/{id}/chunks", "abc"))
        );
        assert_eq!(
            template("/peer/v1/images/abc"),
            Some(("/peer/v1/images/{id}", "abc"))
        );
        assert_eq!(template("/peer/v1/images//chunks"), None);
        assert_eq!(template("/peer/v1/images/a/b/chunks"), None);
        assert_eq!(template("/peer/v1/images/abc/chunks/"), None);
        assert_eq!(template("/peer"), Some(("/peer", "")));
    }

    #[test]
    fn path_parameters_are_percent_decoded() {
        assert_eq!(percent_decoded("0fa2817d%2D4e54"), "0fa2817d-4e54");
        assert_eq!(percent_decoded("a%2db%41"), "a-bA");
        assert_eq!(percent_decoded("100%"), "100%");
        assert_eq!(percent_decoded("%zz%4"), "%zz%4");
        assert_eq!(percent_decoded("%ff"), "%ff", "not UTF-8: kept as sent");
        assert_eq!(percent_decoded("plain"), "plain");
        assert_eq!(percent_decoded("a%20b%2Fc"), "a b/c", "an image tag");
    }

    #[test]
    fn every_allow_header_lists_exactly_its_methods() {
        for route in ROUTES {
            let methods: Vec<&str> = route.methods.iter().map(|(m, _)| m.as_str()).collect();
            assert_eq!(route.allow, methods.join(", "), "{}", route.template);
        }
    }
}
