//! How the HTTP door answers: the reference's plain-text error shape (`<code> <reason>`, a
//! blank line, one sentence), JSON replies, and the request id every response carries.

use warp::http::{HeaderMap, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::Reply;

use crate::error::ServiceError;

pub const JSON: &str = "application/json; charset=UTF-8";
pub const TEXT: &str = "text/plain; charset=UTF-8";

/// Why a request failed, as it will be told.
pub enum Failure {
    Status(StatusCode, String),
    MethodNotAllowed(&'static str),
    Service(ServiceError),
}

impl From<ServiceError> for Failure {
    fn from(e: ServiceError) -> Self {
        Failure::Service(e)
    }
}

pub fn unauthorized() -> Failure {
    Failure::Service(ServiceError::Unauthorized(String::new()))
}

impl Failure {
    pub fn into_response(self, request_id: &str) -> Response {
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
/// were plain). Always a 400: RFC 9112 §6.1 allows a 501 for a coding the server does not
/// implement, but hostile input must never look like a server failure (a 5xx), and to the
/// client both are the same news: send the body plain or chunked once. The body is never
/// read, so the connection closes. `None` when the request has no such problem.
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
            StatusCode::BAD_REQUEST,
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
pub fn sentence(message: &str) -> String {
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
pub fn error_response(status: StatusCode, sentence: &str) -> Response {
    with_type(error_text(status, sentence).into_response(), status, TEXT)
}

pub fn with_type(
    mut response: Response,
    status: StatusCode,
    content_type: &'static str,
) -> Response {
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static(content_type));
    response
}

pub fn json_response(
    status: StatusCode,
    value: &impl serde::Serialize,
) -> Result<Response, Failure> {
    let body = reference_json(value)
        .map_err(|e| ServiceError::internal("cannot encode the response", e))?;
    Ok(with_type(body.into_response(), status, JSON))
}

/// `value` as JSON written the way the reference's server writes it (Python's `json.dumps`,
/// as Glance does): `", "` between items, `": "` after each key, and every character beyond
/// printable ASCII as a `\uXXXX` escape. The reference's list example is then reproduced byte
/// for byte.
pub fn reference_json(value: &impl serde::Serialize) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, ReferenceFormatter);
    value.serialize(&mut serializer)?;
    Ok(out)
}

struct ReferenceFormatter;

/// `", "` before every item of an array or object but the first.
fn item_separator<W: ?Sized + std::io::Write>(writer: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

impl serde_json::ser::Formatter for ReferenceFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(writer, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }

    /// serde_json escapes quotes, backslashes and controls itself; this escapes the rest of
    /// what Python's `ensure_ascii` does (DEL and everything beyond ASCII, in UTF-16 units).
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut start = 0;
        for (at, c) in fragment.char_indices() {
            if c.is_ascii() && c != '\u{7f}' {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[start..at])?;
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                write!(writer, "\\u{unit:04x}")?;
            }
            start = at + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

#[cfg(test)]
mod json_tests {
    use super::reference_json;

    #[test]
    fn json_is_written_as_pythons_json_dumps_writes_it() {
        let value = serde_json::json!({"a": [1, null, "x"], "b": {"c": true}});
        assert_eq!(
            String::from_utf8(reference_json(&value).unwrap()).unwrap(),
            r#"{"a": [1, null, "x"], "b": {"c": true}}"#
        );
        // json.dumps("é\u{1F600}\u{7f}\u{1b}\"\\") in Python 3.
        let text = "\u{e9}\u{1F600}\u{7f}\u{1b}\"\\";
        assert_eq!(
            String::from_utf8(reference_json(&text).unwrap()).unwrap(),
            r#""\u00e9\ud83d\ude00\u007f\u001b\"\\""#
        );
        assert_eq!(reference_json(&Vec::<u8>::new()).unwrap(), b"[]");
    }
}
