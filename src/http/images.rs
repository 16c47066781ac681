//! The images API's routes (README, "Images API"): Glance's version documents at `/` and
//! `/versions`, the v2 image calls, the image data, tags and the two schemas. The rules are
//! in `service::images`; this file parses requests and writes Glance's JSON shapes.
//!
//! An upload's body streams into the copy engine on a blocking thread through a bounded
//! channel (never whole in memory), with an idle timeout instead of the total one of small
//! bodies; a body that ends early (a dropped connection) fails the upload, which leaves the
//! image queued. A download streams the region's file in large pieces.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;
use warp::Reply as _;

use super::jobs::read_body;
use super::peer::{feed, file_response, BodyReader};
use super::reply::{json_response, with_type, Failure, JSON};
use super::{blocking, Reply, Request};
use crate::auth::Principal;
use crate::error::ServiceError;
use crate::model::{rfc3339, Image, ImageStatus, Visibility, CONTAINER_FORMATS, DISK_FORMATS};
use crate::service::{AnyOf, ImageQuery, NewImage, PatchOp, SortKey, LIMIT_MAX};

/// Largest body of a create or a patch (128 properties with long values fit).
pub(super) const BODY_LIMIT: usize = 1 << 20;
/// What a download hands the connection at a time (buffers reused, see `peer::file_response`;
/// 1 MiB measured no worse than 4 MiB in server CPU and holds a quarter of the memory).
const PIECE: usize = 1 << 20;
/// Pieces of an upload's body queued for the blocking writer.
const UPLOAD_PIECES: usize = 64;
const PATCH_21: &str = "application/openstack-images-v2.1-json-patch";
const PATCH_20: &str = "application/openstack-images-v2.0-json-patch";
/// The versions Glance 33 lists (its own document), the current one last.
const SUPPORTED: [&str; 15] = [
    "v2.15", "v2.13", "v2.12", "v2.11", "v2.10", "v2.9", "v2.8", "v2.7", "v2.6", "v2.5", "v2.4",
    "v2.3", "v2.2", "v2.1", "v2.0",
];
const CURRENT: &str = "v2.17";

fn bad(why: String) -> Failure {
    Failure::Service(ServiceError::BadRequest(why))
}

/// `scheme://host:port` of the request as the client addressed it: its `Host`, and HTTPS
/// when the appliance serves it or a proxy in front says so (`X-Forwarded-Proto`).
fn base_url(req: &Request) -> String {
    let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
    let forwarded = header("x-forwarded-proto").map(|p| p.trim().to_ascii_lowercase());
    let scheme = match forwarded.as_deref() {
        Some("https") => "https",
        Some("http") => "http",
        _ if req.svc.https => "https",
        _ => "http",
    };
    let host = header("host")
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
        })
        .unwrap_or("localhost");
    format!("{scheme}://{host}")
}

fn versions_document(req: &Request) -> Value {
    let href = format!("{}/v2/", base_url(req));
    let entry = |id: &str, status: &str| json!({"id": id, "status": status, "links": [{"rel": "self", "href": href}]});
    let mut versions: Vec<Value> = SUPPORTED[..7]
        .iter()
        .map(|id| entry(id, "SUPPORTED"))
        .collect();
    versions.push(entry(CURRENT, "CURRENT"));
    versions.extend(SUPPORTED[7..].iter().map(|id| entry(id, "SUPPORTED")));
    json!({ "versions": versions })
}

/// `GET /`: Glance's version document, 300 Multiple Choices (no token needed).
pub(super) fn versions_root(req: Request) -> Reply {
    Box::pin(async move { json_response(StatusCode::MULTIPLE_CHOICES, &versions_document(&req)) })
}

/// `GET /versions`: the same document, 200.
pub(super) fn versions(req: Request) -> Reply {
    Box::pin(async move { json_response(StatusCode::OK, &versions_document(&req)) })
}

fn text_or_null(text: &str) -> Value {
    if text.is_empty() {
        Value::Null
    } else {
        Value::from(text)
    }
}

/// An image in Glance's shape: its user properties beside the base fields.
pub(super) fn image_json(image: &Image) -> Value {
    let mut m: Map<String, Value> = image
        .meta
        .properties
        .iter()
        .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
        .collect();
    let has_data = matches!(image.status, ImageStatus::Active | ImageStatus::Deactivated);
    let id = image.id.to_string();
    let base = json!({
        "name": text_or_null(&image.name),
        "disk_format": text_or_null(&image.disk_format),
        "container_format": text_or_null(&image.container_format),
        "visibility": image.meta.visibility.as_str(),
        "size": if has_data { Value::from(image.size) } else { Value::Null },
        "virtual_size": image.meta.virtual_size.filter(|_| has_data),
        "status": image.status.to_string(),
        "checksum": image.checksum,
        "protected": image.meta.protected,
        "min_ram": image.meta.min_ram,
        "min_disk": image.meta.min_disk,
        "owner": text_or_null(&image.owner),
        "os_hidden": image.meta.os_hidden,
        "os_hash_algo": image.os_hash_algo,
        "os_hash_value": image.os_hash_value,
        "id": id,
        "created_at": rfc3339(image.created_at),
        "updated_at": rfc3339(image.updated_at),
        "tags": image.meta.tags,
        "self": format!("/v2/images/{id}"),
        "file": format!("/v2/images/{id}/file"),
        "schema": "/v2/schemas/image",
    });
    if let Value::Object(fields) = base {
        m.extend(fields);
    }
    Value::Object(m)
}

/// Parses `GET /v2/images`' query as Glance does: anything that is not a paging, sorting or
/// special parameter filters on the field or property of its name.
pub(super) fn parse_query(query: &str) -> Result<ImageQuery, ServiceError> {
    let invalid = |why: String| ServiceError::BadRequest(why);
    let mut q = ImageQuery::default();
    let (mut keys, mut dirs, mut sort) = (Vec::new(), Vec::new(), None);
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let shown = crate::text::excerpt(&value, 64);
        let count = |what: &str| {
            value.parse::<u64>().map_err(|_| {
                invalid(format!(
                    "{what} param must be a non-negative integer, not '{shown}'"
                ))
            })
        };
        match key.as_ref() {
            "limit" => q.limit = Some(count("limit")?.min(LIMIT_MAX as u64) as usize),
            "marker" => q.marker = Some(value.into_owned()),
            "sort_key" => keys.push(SortKey::parse(&value)?),
            "sort_dir" => dirs.push(direction(&value)?),
            "sort" => sort = Some(value.into_owned()),
            "visibility" => {
                q.visibility = Some(match value.as_ref() {
                    "all" => None,
                    v => Some(v.parse::<Visibility>().map_err(invalid)?),
                })
            }
            "member_status" => {
                if !["accepted", "pending", "rejected", "all"].contains(&value.as_ref()) {
                    return Err(invalid(format!("Invalid status: {shown}")));
                }
                q.member_status = Some(value.into_owned());
            }
            "os_hidden" => {
                q.os_hidden = Some(match value.to_ascii_lowercase().as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(invalid(format!("Invalid value '{shown}' for os_hidden: use true or false"))),
                })
            }
            "size_min" => q.size_min = Some(count("size_min")?),
            "size_max" => q.size_max = Some(count("size_max")?),
            "tag" => q.tags.push(value.into_owned()),
            "created_at" | "updated_at" | "changes-since" => {
                return Err(invalid(format!(
                    "filtering by {key} is not served by this appliance; list and filter by the other fields"
                )))
            }
            _ => {
                q.fields.retain(|(k, _)| k != key.as_ref());
                q.fields.push((key.into_owned(), AnyOf::parse(&value)));
            }
        }
    }
    if let Some(sort) = sort {
        if !keys.is_empty() || !dirs.is_empty() {
            return Err(invalid(
                "the 'sort' parameter cannot be combined with sort_key or sort_dir".into(),
            ));
        }
        for part in sort.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, dir) = part.split_once(':').unwrap_or((part, "desc"));
            q.sort
                .push((SortKey::parse(key.trim())?, direction(dir.trim())?));
        }
    } else {
        let dirs = match (keys.len(), dirs.len()) {
            (_, 0) => vec![true; keys.len()],
            (k, 1) => vec![dirs[0]; k.max(1)],
            (k, d) if k == d => dirs,
            _ => {
                return Err(invalid(
                    "give one sort_dir, or as many as there are sort_key parameters".into(),
                ))
            }
        };
        let keys = if keys.is_empty() && !dirs.is_empty() {
            vec![SortKey::CreatedAt]
        } else {
            keys
        };
        q.sort = keys.into_iter().zip(dirs).collect();
    }
    Ok(q)
}

/// `desc` is true.
fn direction(text: &str) -> Result<bool, ServiceError> {
    match text {
        "desc" => Ok(true),
        "asc" => Ok(false),
        other => Err(ServiceError::BadRequest(format!(
            "Invalid sort direction: {}; use asc or desc",
            crate::text::excerpt(other, 64)
        ))),
    }
}

/// The query of a listing's link: the request's parameters but the marker, then `marker`.
fn link(query: &str, marker: Option<&str>) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if key != "marker" {
            out.append_pair(&key, &value);
        }
    }
    if let Some(marker) = marker {
        out.append_pair("marker", marker);
    }
    let query = out.finish();
    if query.is_empty() {
        "/v2/images".into()
    } else {
        format!("/v2/images?{query}")
    }
}

/// `GET /v2/images`.
pub(super) fn list(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let q = parse_query(&req.query)?;
        let svc = req.svc;
        let page = blocking(move || svc.api_images(&who, &q)).await?;
        let images: Vec<Value> = page.images.iter().map(image_json).collect();
        let mut body = json!({
            "images": images,
            "first": link(&req.query, None),
            "schema": "/v2/schemas/images",
        });
        if let (Some(next), Value::Object(fields)) = (page.next, &mut body) {
            fields.insert(
                "next".into(),
                Value::from(link(&req.query, Some(&next.to_string()))),
            );
        }
        json_response(StatusCode::OK, &body)
    })
}

/// The media type of a request, lowercase, without parameters.
fn media_type(req: &Request) -> Option<String> {
    req.headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
}

fn json_body(bytes: &[u8]) -> Result<Value, Failure> {
    serde_json::from_slice(bytes).map_err(|e| {
        bad(format!(
            "the body is not valid JSON ({})",
            crate::text::excerpt(&e.to_string(), 200)
        ))
    })
}

/// `POST /v2/images`: 201 with the queued image and its `Location`.
pub(super) fn create(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let base = base_url(&req);
        let bytes = read_body(&req.headers, req.body, req.body_limit).await?;
        let Value::Object(fields) = json_body(&bytes)? else {
            return Err(bad("send the image's fields as a JSON object".into()));
        };
        let new = NewImage::parse(&fields)?;
        let svc = req.svc;
        let image = blocking(move || svc.api_create(&who, new)).await?;
        let mut response = json_response(StatusCode::CREATED, &image_json(&image))?;
        if let Ok(v) = HeaderValue::from_str(&format!("{base}/v2/images/{}", image.id)) {
            response.headers_mut().insert("location", v);
        }
        Ok(response)
    })
}

/// `GET /v2/images/{id}`.
pub(super) fn show(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let (svc, id) = (req.svc, req.param);
        let image = blocking(move || svc.api_image(&who, &id)).await?;
        json_response(StatusCode::OK, &image_json(&image))
    })
}

/// The operations of a patch body in either media type: 2.1's `{"op", "path", "value"}`, or
/// 2.0's `{"replace": path, "value"}`.
fn patch_ops(body: &Value, v21: bool) -> Result<Vec<PatchOp>, Failure> {
    let shape = if v21 {
        r#"send [{"op": "replace", "path": "/name", "value": "new"}, ...]"#
    } else {
        r#"send [{"replace": "/name", "value": "new"}, ...]"#
    };
    let list = body
        .as_array()
        .ok_or_else(|| bad(format!("the patch is not a list of operations; {shape}")))?;
    list.iter()
        .map(|op| {
            let fields = op
                .as_object()
                .ok_or_else(|| bad(format!("an operation is not an object; {shape}")))?;
            let (name, path) = if v21 {
                let name = fields.get("op").and_then(Value::as_str);
                (name, fields.get("path").and_then(Value::as_str))
            } else {
                ["add", "replace", "remove"]
                    .into_iter()
                    .find_map(|n| Some((Some(n), Some(fields.get(n)?.as_str()?))))
                    .unwrap_or((None, None))
            };
            let path = path
                .ok_or_else(|| bad(format!("an operation has no path; {shape}")))?
                .to_string();
            let value = || {
                fields
                    .get("value")
                    .cloned()
                    .ok_or_else(|| bad(format!("an operation on {path} has no value; {shape}")))
            };
            match name {
                Some("add") => Ok(PatchOp::Add(path.clone(), value()?)),
                Some("replace") => Ok(PatchOp::Replace(path.clone(), value()?)),
                Some("remove") => Ok(PatchOp::Remove(path)),
                other => Err(bad(format!(
                    "operation '{}' is not served: use add, replace or remove",
                    crate::text::excerpt(other.unwrap_or(""), 32)
                ))),
            }
        })
        .collect()
}

/// `PATCH /v2/images/{id}`: JSON-patch in Glance's media types.
pub(super) fn update(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let v21 = match media_type(&req).as_deref() {
            Some(PATCH_21) => true,
            Some(PATCH_20) => false,
            _ => {
                let mut response = super::reply::error_response(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    &format!("Send the patch with the header Content-Type: {PATCH_21}."),
                );
                response.headers_mut().insert(
                    "accept-patch",
                    HeaderValue::from_static("application/openstack-images-v2.1-json-patch, application/openstack-images-v2.0-json-patch"),
                );
                return Ok(response);
            }
        };
        let bytes = read_body(&req.headers, req.body, req.body_limit).await?;
        let ops = patch_ops(&json_body(&bytes)?, v21)?;
        let (svc, id) = (req.svc, req.param);
        let image = blocking(move || svc.api_patch(&who, &id, &ops)).await?;
        json_response(StatusCode::OK, &image_json(&image))
    })
}

fn no_content() -> Response {
    warp::reply::with_status(warp::reply(), StatusCode::NO_CONTENT).into_response()
}

/// `DELETE /v2/images/{id}`: 204.
pub(super) fn delete(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let (svc, id) = (req.svc, req.param);
        blocking(move || svc.api_delete(&who, &id)).await?;
        Ok(no_content())
    })
}

/// `PUT /v2/images/{id}/tags/{tag}`: 204.
pub(super) fn add_tag(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let (svc, id, tag) = (req.svc, req.param, req.param2);
        blocking(move || svc.api_add_tag(&who, &id, &tag)).await?;
        Ok(no_content())
    })
}

/// `DELETE /v2/images/{id}/tags/{tag}`: 204.
pub(super) fn remove_tag(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let (svc, id, tag) = (req.svc, req.param, req.param2);
        blocking(move || svc.api_remove_tag(&who, &id, &tag)).await?;
        Ok(no_content())
    })
}

/// The body of an upload: the channel's pieces, and an error (not the end) when the body
/// stopped before its end (a dropped connection drops the sender without `complete`).
struct UploadBody {
    pieces: BodyReader,
    complete: Arc<AtomicBool>,
}

impl Read for UploadBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.pieces.read(buf)?;
        if n == 0 && !buf.is_empty() && !self.complete.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the request body ended before its end (the connection was lost)",
            ));
        }
        Ok(n)
    }
}

/// `PUT /v2/images/{id}/file`: the image's data, streamed; 204 once it is active.
pub(super) fn upload(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        if let Some(media) = media_type(&req) {
            if media != "application/octet-stream" {
                return Err(Failure::Status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "Send the image's data with the header Content-Type: application/octet-stream."
                        .into(),
                ));
            }
        }
        // The length, if the client said it (openstacksdk also sends X-OpenStack-Image-Size):
        // an upload that cannot fit is refused before its first byte.
        let length = ["content-length", "x-openstack-image-size"]
            .iter()
            .find_map(|name| req.headers.get(*name))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(UPLOAD_PIECES);
        let complete = Arc::new(AtomicBool::new(false));
        let (svc, id) = (req.svc, req.param);
        let ended = Arc::clone(&complete);
        let work = tokio::task::spawn_blocking(move || {
            let mut input = UploadBody {
                pieces: BodyReader {
                    rx,
                    piece: Bytes::new(),
                },
                complete: ended,
            };
            svc.api_upload(&who, &id, &mut input, length)
        });
        let fed = feed(&req.headers, req.body, req.body_limit, &tx).await;
        if fed.is_ok() {
            // Before the sender goes: the reader takes the channel's end for the body's.
            complete.store(true, Ordering::SeqCst);
        }
        drop(tx);
        let done = work
            .await
            .map_err(|e| Failure::Service(ServiceError::internal("worker thread failed", e)))?;
        fed?;
        done?;
        Ok(no_content())
    })
}

/// `GET /v2/images/{id}/file`: the data (200, or 206 for a `Range`) with `Content-MD5`; 204
/// for an image without data.
pub(super) fn download(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let (svc, id, headers) = (req.svc, req.param, req.headers);
        let found = blocking(move || svc.api_download(&who, &id, 0)).await?;
        let Some((image, source)) = found else {
            return Ok(no_content());
        };
        let mut response = file_response(&headers, image.size, source, PIECE);
        if response.status().is_success() {
            if let Some(v) = image
                .checksum
                .as_deref()
                .and_then(|c| HeaderValue::from_str(c).ok())
            {
                response.headers_mut().insert("content-md5", v);
            }
        }
        Ok(response)
    })
}

/// A property of the image schema: its JSON types, a description and whether it is
/// read-only, with `extra` keys (an enum, a pattern, a length).
fn property(types: Value, description: &str, read_only: bool, extra: Value) -> Value {
    let mut p = json!({ "type": types, "description": description });
    if let (Value::Object(p), Value::Object(extra)) = (&mut p, extra) {
        if read_only {
            p.insert("readOnly".into(), Value::Bool(true));
        }
        p.extend(extra);
    }
    p
}

/// The image schema as Glance 33 publishes it, for the fields this appliance serves.
fn image_schema() -> Value {
    let text = || json!(["null", "string"]);
    let none = || json!({});
    let statuses = [
        "queued",
        "saving",
        "active",
        "killed",
        "deleted",
        "uploading",
        "importing",
        "pending_delete",
        "deactivated",
    ];
    let or_null = |values: &[&str]| {
        let mut list = vec![Value::Null];
        list.extend(values.iter().map(|v| Value::from(*v)));
        Value::Array(list)
    };
    let visibilities: Vec<&str> = Visibility::ALL.iter().map(|v| v.as_str()).collect();
    let max = |n: u64| json!({ "maxLength": n });
    let properties = json!({
        "id": property(json!("string"), "An identifier for the image", false, json!({
            "pattern": "^([0-9a-fA-F]){8}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){12}$"
        })),
        "name": property(text(), "Descriptive name for the image", false, max(255)),
        "status": property(json!("string"), "Status of the image", true, json!({ "enum": statuses })),
        "visibility": property(json!("string"), "Scope of image accessibility", false, json!({ "enum": visibilities })),
        "protected": property(json!("boolean"), "If true, image will not be deletable.", false, none()),
        "os_hidden": property(json!("boolean"), "If true, image will not appear in default image list response.", false, none()),
        "checksum": property(text(), "md5 hash of image contents.", true, max(32)),
        "os_hash_algo": property(text(), "Algorithm to calculate the os_hash_value", true, max(64)),
        "os_hash_value": property(text(), "Hexdigest of the image contents using the algorithm specified by the os_hash_algo", true, max(128)),
        "owner": property(text(), "Owner of the image", false, max(255)),
        "size": property(json!(["null", "integer"]), "Size of image file in bytes", true, none()),
        "virtual_size": property(json!(["null", "integer"]), "Virtual size of image in bytes", true, none()),
        "container_format": property(text(), "Format of the container", false, json!({ "enum": or_null(&CONTAINER_FORMATS) })),
        "disk_format": property(text(), "Format of the disk", false, json!({ "enum": or_null(&DISK_FORMATS) })),
        "created_at": property(json!("string"), "Date and time of image registration", true, none()),
        "updated_at": property(json!("string"), "Date and time of the last image modification", true, none()),
        "tags": property(json!("array"), "List of strings related to the image", false, json!({
            "items": { "type": "string", "maxLength": 255 }
        })),
        "min_ram": property(json!("integer"), "Amount of ram (in MB) required to boot image.", false, none()),
        "min_disk": property(json!("integer"), "Amount of disk space (in GB) required to boot image.", false, none()),
        "self": property(json!("string"), "An image self url", true, none()),
        "file": property(json!("string"), "An image file url", true, none()),
        "schema": property(json!("string"), "An image schema url", true, none()),
    });
    json!({
        "name": "image",
        "properties": properties,
        "additionalProperties": { "type": "string" },
        "links": [
            { "rel": "self", "href": "{self}" },
            { "rel": "enclosure", "href": "{file}" },
            { "rel": "describedby", "href": "{schema}" },
        ],
    })
}

/// `GET /v2/schemas/image`.
pub(super) fn schema_image(_req: Request) -> Reply {
    Box::pin(async move { json_response(StatusCode::OK, &image_schema()) })
}

/// `GET /v2/schemas/images`: a list of images, with the paging links.
pub(super) fn schema_images(_req: Request) -> Reply {
    Box::pin(async move {
        let body = json!({
            "name": "images",
            "properties": {
                "images": { "type": "array", "items": image_schema() },
                "schema": { "type": "string" },
                "first": { "type": "string" },
                "next": { "type": "string" },
            },
            "links": [
                { "rel": "first", "href": "{first}" },
                { "rel": "next", "href": "{next}" },
                { "rel": "describedby", "href": "{schema}" },
            ],
        });
        Ok(with_type(
            serde_json::to_vec(&body)
                .map_err(|e| ServiceError::internal("cannot encode the response", e))?
                .into_response(),
            StatusCode::OK,
            JSON,
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glances_sort_forms_and_filters_are_parsed() {
        let q = parse_query("sort=name:asc,size&limit=5000&tag=a&tag=b&hw_disk_bus=scsi")
            .expect("query");
        assert_eq!(q.sort, vec![(SortKey::Name, false), (SortKey::Size, true)]);
        assert_eq!(q.limit, Some(LIMIT_MAX));
        assert_eq!(q.tags, vec!["a", "b"]);
        assert_eq!(
            q.fields,
            vec![("hw_disk_bus".to_string(), AnyOf(vec!["scsi".into()]))]
        );
        let q = parse_query("sort_key=name&sort_key=id&sort_dir=asc").expect("query");
        assert_eq!(q.sort, vec![(SortKey::Name, false), (SortKey::Id, false)]);
        assert!(parse_query("sort=name&sort_key=id").is_err());
        assert!(
            parse_query("sort_key=name&sort_key=id&sort_dir=asc&sort_dir=desc&sort_dir=asc")
                .is_err()
        );
        assert!(parse_query("sort_key=bogus").is_err());
        assert!(parse_query("visibility=everyone").is_err());
        assert!(parse_query("limit=-1").is_err());
        let q = parse_query("visibility=all&name=in:a,b").expect("query");
        assert_eq!(q.visibility, Some(None));
        assert_eq!(q.fields[0].1, AnyOf(vec!["a".into(), "b".into()]));
    }

    #[test]
    fn links_keep_the_query_and_replace_the_marker() {
        assert_eq!(link("", None), "/v2/images");
        assert_eq!(
            link("limit=2&marker=x&tag=a", Some("y")),
            "/v2/images?limit=2&tag=a&marker=y"
        );
    }
}
