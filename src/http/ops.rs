//! The operators' routes: `/healthz` and `/metrics`. No token, no tenant data.

use warp::http::StatusCode;
use warp::Reply as _;

use super::reply::{sentence, with_type, Failure, TEXT};
use super::{blocking, Reply, Request};

/// `GET /healthz`: 200 `ok`, or 503 naming what is down.
pub(super) fn health(req: Request) -> Reply {
    Box::pin(async move {
        let svc = req.svc;
        match blocking(move || Ok(svc.health())).await? {
            Ok(()) => Ok(with_type("ok\n".into_response(), StatusCode::OK, TEXT)),
            Err(problems) => Err(Failure::Status(
                StatusCode::SERVICE_UNAVAILABLE,
                sentence(&problems.join("; ")),
            )),
        }
    })
}

/// `GET /metrics`: the Prometheus text format.
pub(super) fn metrics(req: Request) -> Reply {
    Box::pin(async move {
        let svc = req.svc;
        let text = blocking(move || Ok(svc.metrics_text())).await?;
        Ok(with_type(
            text.into_response(),
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
        ))
    })
}
