//! The web page (`GET /ui`) and its three assets, embedded in the binary.
//!
//! The page holds no tenant data: its script asks the API for it with the token the user
//! signed in with (kept in `sessionStorage`, sent as `X-Auth-Token`, never a cookie). Every
//! file leaves with a Content-Security-Policy that allows only this origin's script and
//! style (no inline code at all), `nosniff`, no referrer, and an ETag so that a browser
//! revalidates instead of downloading again.

use std::sync::LazyLock;

use warp::http::{HeaderMap, HeaderValue, StatusCode};
use warp::reply::Response;

use super::reply::Failure;
use super::{Reply, Request};

/// Where the page lives.
pub(super) const PAGE: &str = "/ui";
/// The prefix of its assets (`/ui/ui.js` …).
pub(super) const ASSETS: &str = "/ui/";

/// The policy of every file of the page: nothing but this origin, no inline script or style,
/// no framing, forms posting nowhere else.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

static INDEX: Asset = Asset {
    name: "index.html",
    content_type: "text/html; charset=utf-8",
    bytes: include_bytes!("ui/index.html"),
};

static FILES: &[Asset] = &[
    Asset {
        name: "ui.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("ui/ui.css"),
    },
    Asset {
        name: "ui.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("ui/ui.js"),
    },
    Asset {
        name: "icon.svg",
        content_type: "image/svg+xml",
        bytes: include_bytes!("ui/icon.svg"),
    },
];

/// The ETag of each file (index first, then [`FILES`] in order): a hash of its bytes, so it
/// changes exactly when a new binary serves different bytes.
static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    std::iter::once(&INDEX)
        .chain(FILES)
        .map(|asset| {
            let hash = blake3::hash(asset.bytes);
            format!("\"{}\"", &hash.to_hex()[..20])
        })
        .collect()
});

/// `GET /ui`: the page.
pub(super) fn page(req: Request) -> Reply {
    Box::pin(async move { Ok(serve(0, &req.headers)) })
}

/// `GET /ui/{file}`: the page's stylesheet, script and icon; any other name is a 404.
pub(super) fn asset(req: Request) -> Reply {
    Box::pin(async move {
        match FILES.iter().position(|asset| asset.name == req.param) {
            Some(i) => Ok(serve(i + 1, &req.headers)),
            None => Err(Failure::Status(
                StatusCode::NOT_FOUND,
                "There is no resource at this path.".into(),
            )),
        }
    })
}

/// File `i` (0: the page) as a 200, or a 304 when the browser's copy is current.
fn serve(i: usize, request: &HeaderMap) -> Response {
    let asset = if i == 0 { &INDEX } else { &FILES[i - 1] };
    let etag = &ETAGS[i];
    let current = request
        .get_all("if-none-match")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag
        });
    let mut response = if current {
        let mut response = Response::new(Vec::new().into());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        let mut response = Response::new(asset.bytes.into());
        response
            .headers_mut()
            .insert("content-type", HeaderValue::from_static(asset.content_type));
        response
    };
    let headers = response.headers_mut();
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    // Small files: always ask whether they changed (a new binary may serve new ones), and
    // get a 304 when they did not.
    headers.insert("cache-control", HeaderValue::from_static("no-cache"));
    if let Ok(value) = HeaderValue::from_str(etag) {
        headers.insert("etag", value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_refers_only_to_files_it_serves() {
        let page = std::str::from_utf8(INDEX.bytes).unwrap();
        for asset in FILES {
            assert!(
                page.contains(&format!("{ASSETS}{}", asset.name)),
                "{}",
                asset.name
            );
        }
        // No inline script or style the policy would block, no other origin.
        assert!(!page.contains("<script>"));
        assert!(!page.contains("style="));
        assert!(!page.contains("<style"));
        assert!(!page.contains("//"), "a URL with a host in the page");
    }

    #[test]
    fn the_script_never_parses_html() {
        let script = std::str::from_utf8(FILES[1].bytes).unwrap();
        for word in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!script.contains(word), "ui.js uses {word}");
        }
    }
}
