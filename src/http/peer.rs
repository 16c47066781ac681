//! The peer protocol's routes (README, "Peer protocol"): `GET /peer` and the ten routes of
//! version 1 under `/peer/v1/`. The rules (scope, uploads) are in `service::peer`; this file
//! reads bodies, streams answers and shapes the errors.
//!
//! Big bodies move in pieces: the chunks an image serves are framed on a blocking thread into
//! a bounded channel that feeds the response, and the frames of an upload are read by a
//! blocking thread from a bounded channel that the request body fills, so neither end holds a
//! request's 64 MiB at once. Such a body must keep arriving: [`BODY_TIMEOUT`] without a byte
//! is a 408.

use std::io::{self, Read};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use warp::http::{HeaderMap, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::Reply as _;

use super::jobs::read_body;
use super::reply::{error_response, json_response, sentence, with_type, Failure};
use super::{blocking, Body, Reply, Request, BODY_TIMEOUT};
use crate::auth::Principal;
use crate::copy::Source;
use crate::error::ServiceError;
use crate::manifest::{Entry, Manifest, CHUNK_SIZE};
use crate::peer::{
    encode_frame_as, ChunkRequest, Missing, Ranges, Received, Upload, Versions, FRAMES,
    FRAME_HEADER, MAX_CHUNKS, PREFIX, VERSION,
};
use crate::service::Refusal;

/// Largest body of a chunk request: 1,024 ranges written out at length.
pub(super) const RANGES_LIMIT: usize = 64 * 1024;
/// Largest body of an upload's `PUT` (its manifest, in base64).
pub(super) const UPLOAD_LIMIT: usize = 64 << 20;
/// Largest body of chunks: [`MAX_CHUNKS`] raw frames.
pub(super) const FRAMES_LIMIT: usize = MAX_CHUNKS * (CHUNK_SIZE + FRAME_HEADER);
/// What the chunk and file answers hand the connection at a time.
const PIECE: usize = 1 << 20;
/// Pieces between a producing thread and the connection.
pub(super) const PIECES_IN_FLIGHT: usize = 4;

pub(super) const OCTETS: &str = "application/octet-stream";

/// The refusal of a request for a protocol version this appliance does not speak (a path
/// `/peer/vN` or under it), if it is one.
pub(super) fn other_version(path: &str) -> Option<Failure> {
    let rest = path.strip_prefix(PREFIX)?.strip_prefix("/v")?;
    let digits = rest.split('/').next().unwrap_or_default();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let asked: u64 = digits.parse().unwrap_or(u64::MAX);
    (asked != u64::from(VERSION)).then(|| {
        let asked = if digits.len() > 20 {
            format!("{}…", &digits[..20])
        } else {
            asked.to_string()
        };
        Failure::Status(
            StatusCode::BAD_REQUEST,
            format!(
                "This appliance speaks peer protocol version {VERSION}; the request is for version {asked}."
            ),
        )
    })
}

fn refused(r: Refusal) -> Result<Response, Failure> {
    match r {
        Refusal::Service(e) => Err(Failure::Service(e)),
        Refusal::Forbidden(why) => Err(Failure::Status(StatusCode::FORBIDDEN, sentence(&why))),
        Refusal::Unprocessable(why) => Err(Failure::Status(
            StatusCode::UNPROCESSABLE_ENTITY,
            sentence(&why),
        )),
        Refusal::Missing(missing) => json_response(StatusCode::CONFLICT, &Missing { missing }),
    }
}

/// Runs blocking peer work whose refusals may be more than a [`ServiceError`].
async fn refusing<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Refusal> + Send + 'static,
) -> Result<Result<T, Refusal>, Failure> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Failure::Service(ServiceError::internal("worker thread failed", e)))
}

fn bad_request(why: String) -> Failure {
    Failure::Service(ServiceError::BadRequest(why))
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8], what: &str, shape: &str) -> Result<T, Failure> {
    serde_json::from_slice(bytes).map_err(|e| {
        let problem = if e.is_data() {
            format!("the body is not {what}")
        } else {
            "the body is not valid JSON".to_string()
        };
        let e = crate::text::excerpt(&e.to_string(), 200);
        bad_request(format!("{problem} ({e}); send {shape}"))
    })
}

/// `GET /peer`: the protocol and the versions this appliance speaks.
pub(super) fn versions(_req: Request) -> Reply {
    Box::pin(async move { json_response(StatusCode::OK, &Versions::ours()) })
}

/// `GET /peer/v1/images?region=R`.
pub(super) fn list(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let mut region = None;
        for (key, value) in form_urlencoded::parse(req.query.as_bytes()) {
            match key.as_ref() {
                "region" if region.is_none() => region = Some(value.into_owned()),
                "region" => {
                    return Err(bad_request("query parameter region is given twice".into()))
                }
                _ => {
                    return Err(bad_request(format!(
                        "unknown query parameter '{}'; this list takes region",
                        crate::text::excerpt(&key, 64)
                    )))
                }
            }
        }
        let region = region
            .ok_or_else(|| bad_request("name the region: /peer/v1/images?region=REGION".into()))?;
        let svc = req.svc;
        let images = blocking(move || svc.peer_images(&who, &region)).await?;
        json_response(StatusCode::OK, &serde_json::json!({ "images": images }))
    })
}

/// `GET /peer/v1/images/{id}`.
pub(super) fn record(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let (svc, id) = (req.svc, req.param);
        let image = blocking(move || svc.peer_image(&who, &id)).await?;
        json_response(StatusCode::OK, &image)
    })
}

/// `DELETE /peer/v1/images/{id}`.
pub(super) fn delete(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let (svc, id) = (req.svc, req.param);
        blocking(move || svc.peer_delete(&who, &id)).await?;
        Ok(no_content())
    })
}

fn no_content() -> Response {
    warp::reply::with_status(warp::reply(), StatusCode::NO_CONTENT).into_response()
}

/// `GET /peer/v1/images/{id}/manifest`.
pub(super) fn manifest(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let (svc, id) = (req.svc, req.param);
        let encoded =
            blocking(move || svc.peer_manifest(&who, &id).map(|(_, m)| m.encode())).await?;
        Ok(with_type(
            Response::new(encoded.into()),
            StatusCode::OK,
            OCTETS,
        ))
    })
}

/// A response body made on a blocking thread: `produce` hands it pieces (false once the
/// connection is gone); an error it returns cuts the body short, so the client sees a
/// failed transfer, never a complete-looking one.
fn streamed(
    produce: impl FnOnce(&mut dyn FnMut(Bytes) -> bool) -> io::Result<()> + Send + 'static,
) -> Response {
    let (tx, mut rx) = mpsc::channel::<io::Result<Bytes>>(PIECES_IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        let mut send = |piece: Bytes| tx.blocking_send(Ok(piece)).is_ok();
        if let Err(e) = produce(&mut send) {
            tracing::warn!("a peer answer was cut short: {e}");
            let _ = tx.blocking_send(Err(e));
        }
    });
    let pieces = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    warp::reply::stream(pieces).into_response()
}

fn io_error(e: ServiceError) -> io::Error {
    io::Error::other(e.to_string())
}

/// `POST /peer/v1/images/{id}/chunks`: one frame per asked chunk, in the order asked.
pub(super) fn chunks(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let bytes = read_body(&req.headers, req.body, req.body_limit).await?;
        let asked: ChunkRequest = parse_json(
            &bytes,
            "a chunk request",
            r#"{"ranges": [[first, count], ...], "compress": true}"#,
        )?;
        let (ranges, compress) = (asked.ranges, asked.compress);
        let (svc, id) = (req.svc, req.param);
        let (svc, image, region, m) = blocking(move || {
            let (image, m) = svc.peer_manifest(&who, &id)?;
            let region = svc.peer_region(&who, &id)?;
            ranges
                .check(m.chunk_count())
                .map_err(ServiceError::BadRequest)?;
            Ok((svc, image, region, (m, ranges)))
        })
        .await?;
        let response = streamed(move |send| {
            let (m, ranges) = m;
            let open = |offset| svc.peer_source(&image, &region, offset).map_err(io_error);
            frames(&m, &ranges, compress, &open, send)
        });
        Ok(with_type(response, StatusCode::OK, FRAMES))
    })
}

/// Chunks read in a row and framed by one encoding thread at a time (1 MiB).
const BATCH: usize = 16;

/// The frames of the chunks `ranges` names of an image with manifest `m` whose bytes
/// `open(offset)` reads, in order, handed to `send` (false: the connection is gone); chunks
/// are compressed if the receiver asks so (`compress`, see [`crate::peer::Compression`]).
/// zstd is slower than the reads: frames are made by one thread per core
/// (at most 4) while this one reads and another hands them on in order; memory stays at a
/// few batches.
fn frames(
    m: &Manifest,
    ranges: &Ranges,
    compress: bool,
    open: &(dyn Fn(u64) -> io::Result<Box<dyn Source>> + Sync),
    send: &mut dyn FnMut(Bytes) -> bool,
) -> io::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::sync_channel;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    // A batch: its place in the answer, and its chunks (`None`: a hole).
    type Batch = (usize, Vec<(usize, Option<Vec<u8>>)>);
    let (work_tx, work_rx) = sync_channel::<Batch>(2 * workers);
    let work_rx = std::sync::Mutex::new(work_rx);
    let (done_tx, done_rx) = sync_channel::<(usize, Vec<u8>)>(2 * workers);
    let gone = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let (done_tx, work_rx, gone) = (done_tx.clone(), &work_rx, &gone);
            scope.spawn(move || {
                let zeros = vec![0u8; CHUNK_SIZE];
                loop {
                    let batch = work_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((seq, chunks)) = batch else { return };
                    // Once the connection is gone, batches are taken and dropped, so that
                    // the reader never waits on a full channel.
                    if gone.load(Ordering::Relaxed) {
                        continue;
                    }
                    let mut out = Vec::with_capacity(BATCH * (CHUNK_SIZE + FRAME_HEADER));
                    for (i, bytes) in chunks {
                        let len = m.chunk_len(i);
                        let chunk = bytes.as_deref().unwrap_or(&zeros[..len]);
                        encode_frame_as(&mut out, i, chunk, compress);
                    }
                    if done_tx.send((seq, out)).is_err() {
                        gone.store(true, Ordering::Relaxed);
                    }
                }
            });
        }
        drop(done_tx);
        let gone = &gone;
        let reader = scope.spawn(move || -> io::Result<()> {
            let mut batch = Vec::with_capacity(BATCH);
            let mut seq = 0;
            for &(first, count) in &ranges.ranges {
                let first = first as usize;
                let mut source = open(m.offset(first))?;
                for i in first..first + count as usize {
                    if m.chunks[i] == Entry::Hole {
                        batch.push((i, None));
                    } else {
                        let mut bytes = vec![0u8; m.chunk_len(i)];
                        source.skip_to(m.offset(i))?;
                        source.read_exact(&mut bytes)?;
                        batch.push((i, Some(bytes)));
                    }
                    if batch.len() == BATCH {
                        if gone.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                        if work_tx.send((seq, full)).is_err() {
                            return Ok(());
                        }
                        seq += 1;
                    }
                }
            }
            if !batch.is_empty() {
                let _ = work_tx.send((seq, batch));
            }
            Ok(())
        });
        // Frames leave in the order asked, whichever thread made them.
        let mut waiting = std::collections::BTreeMap::new();
        let mut next = 0;
        'answer: for (seq, bytes) in done_rx.iter() {
            waiting.insert(seq, bytes);
            while let Some(bytes) = waiting.remove(&next) {
                if !send(Bytes::from(bytes)) {
                    gone.store(true, Ordering::Relaxed);
                    break 'answer;
                }
                next += 1;
            }
        }
        drop(done_rx);
        reader
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the chunk reader failed")))
    })
}

/// The byte range a `Range` header asks of an image of `size` bytes: `None` for the whole
/// image; why not (a 416) for a range outside it or a form this appliance does not serve.
fn byte_range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, String> {
    let Some(value) = headers.get("range") else {
        return Ok(None);
    };
    let refuse = |why: &str| why.to_string();
    let form = "send one range, bytes=first-last, bytes=first- or bytes=-length";
    let text = value.to_str().map_err(|_| refuse(form))?;
    let spec = text
        .trim()
        .strip_prefix("bytes=")
        .filter(|s| !s.contains(','))
        .ok_or_else(|| refuse(form))?;
    let (first, last) = spec.split_once('-').ok_or_else(|| refuse(form))?;
    let number = |s: &str| s.trim().parse::<u64>().map_err(|_| refuse(form));
    let outside = || {
        refuse(&format!(
            "the range {} is not inside the image's {size} bytes",
            crate::text::excerpt(spec, 64)
        ))
    };
    let (start, end) = match (first.trim().is_empty(), last.trim().is_empty()) {
        (true, false) => {
            let n = number(last)?;
            if n == 0 || size == 0 {
                return Err(outside());
            }
            (size - n.min(size), size - 1)
        }
        (false, true) => (number(first)?, size.saturating_sub(1)),
        (false, false) => {
            let (a, b) = (number(first)?, number(last)?);
            if b < a {
                return Err(refuse(form));
            }
            (a, b.min(size.saturating_sub(1)))
        }
        (true, true) => return Err(refuse(form)),
    };
    if start >= size {
        return Err(outside());
    }
    Ok(Some((start, end)))
}

/// `GET /peer/v1/images/{id}/file`: the image's bytes, or the range asked.
pub(super) fn file(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let (svc, id, headers) = (req.svc, req.param, req.headers);
        let (image, source) = blocking(move || svc.peer_read(&who, &id, 0)).await?;
        Ok(file_response(&headers, image.size, source, PIECE))
    })
}

/// The `size` bytes of `source` (from its start), or the range `headers` ask (206; 416 for
/// one outside them), read on a blocking thread `piece` bytes at a time.
pub(super) fn file_response(
    headers: &HeaderMap,
    size: u64,
    mut source: Box<dyn Source>,
    piece: usize,
) -> Response {
    let range = match byte_range(headers, size) {
        Ok(range) => range,
        Err(why) => {
            let mut response = error_response(StatusCode::RANGE_NOT_SATISFIABLE, &sentence(&why));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                response.headers_mut().insert("content-range", v);
            }
            return response;
        }
    };
    let (start, end) = range.unwrap_or((0, size.saturating_sub(1)));
    let len = if size == 0 { 0 } else { end - start + 1 };
    let response = streamed(move |send| {
        source.skip_to(start)?;
        let pool = Pool::default();
        let mut left = len;
        while left > 0 {
            let mut bytes = pool.take(left.min(piece as u64) as usize);
            source.read_exact(&mut bytes)?;
            left -= bytes.len() as u64;
            if !send(pool.give(bytes)) {
                return Ok(());
            }
        }
        Ok(())
    });
    let status = if range.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let mut response = with_type(response, status, OCTETS);
    let headers = response.headers_mut();
    headers.insert("accept-ranges", HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&len.to_string()) {
        headers.insert("content-length", v);
    }
    if range.is_some() {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")) {
            headers.insert("content-range", v);
        }
    }
    response
}

/// The buffers of one file answer, used again once the connection has sent them: a fresh
/// buffer for every piece cost a page fault per 4 KiB, a tenth of a download's CPU.
#[derive(Clone, Default)]
struct Pool(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

/// A piece whose buffer goes back to its pool when the connection drops it.
struct Pooled {
    buf: Vec<u8>,
    pool: Pool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if let Ok(mut kept) = self.pool.0.lock() {
            if kept.len() <= PIECES_IN_FLIGHT {
                kept.push(buf);
            }
        }
    }
}

impl Pool {
    /// A buffer of `len` bytes (what it held before is left: the read overwrites it).
    fn take(&self, len: usize) -> Vec<u8> {
        let mut buf = self
            .0
            .lock()
            .ok()
            .and_then(|mut kept| kept.pop())
            .unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    fn give(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }
}

fn too_large(limit: usize) -> Failure {
    Failure::Status(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("The request body is larger than {limit} bytes."),
    )
}

fn stalled() -> Failure {
    Failure::Status(
        StatusCode::REQUEST_TIMEOUT,
        format!(
            "The request body stopped arriving for {} seconds.",
            BODY_TIMEOUT.as_secs()
        ),
    )
}

/// Hands the body's pieces to `each` until it ends, refusing one over `limit` (413) or one
/// that stops arriving for [`BODY_TIMEOUT`] (408). `each` returns false to stop reading.
pub(super) async fn pieces<F, Fut>(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
    mut each: F,
) -> Result<(), Failure>
where
    F: FnMut(Bytes) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let mut total = 0usize;
    loop {
        let next = tokio::time::timeout(BODY_TIMEOUT, body.next())
            .await
            .map_err(|_| stalled())?;
        match next {
            None => return Ok(()),
            Some(Err(e)) => {
                return Err(bad_request(format!(
                    "the request body could not be read: {e}"
                )))
            }
            Some(Ok(piece)) => {
                total = total.saturating_add(piece.len());
                if total > limit {
                    return Err(too_large(limit));
                }
                if !each(piece).await {
                    return Ok(());
                }
            }
        }
    }
}

/// Sends the body's pieces to the blocking reader on `tx` ([`BodyReader`]) as [`pieces`]
/// reads them, and an error after them if the body failed (the reader must not take a body
/// cut short for a whole one). Once the reader stops (a refusal), the rest of the body is
/// read and dropped, so that a client still sending gets the answer instead of a reset
/// connection.
pub(super) async fn feed(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    tx: &mpsc::Sender<io::Result<Bytes>>,
) -> Result<(), Failure> {
    let fed = pieces(headers, body, limit, |piece| {
        let tx = tx.clone();
        async move {
            if !tx.is_closed() {
                let _ = tx.send(Ok(piece)).await;
            }
            true
        }
    })
    .await;
    if fed.is_err() {
        let _ = tx
            .send(Err(io::Error::other("the request body stopped")))
            .await;
    }
    fed
}

/// `PUT /peer/v1/uploads/{id}`: a new upload (201) or one that goes on (200); the chunks it
/// still needs.
pub(super) fn upload(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let mut bytes = BytesMut::new();
        pieces(&req.headers, req.body, req.body_limit, |piece| {
            bytes.extend_from_slice(&piece);
            std::future::ready(true)
        })
        .await?;
        let upload: Upload = parse_json(
            &bytes,
            "an upload",
            r#"{"region": "<region>", "image": {"name", "owner", "disk_format", "container_format", "size", "checksum", "os_hash_algo", "os_hash_value"}, "manifest": "<base64>"}"#,
        )?;
        drop(bytes);
        let (svc, id) = (req.svc, req.param);
        match refusing(move || svc.upload_begin(&who, &id, &upload)).await? {
            Ok(begun) => {
                let status = if begun.created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                json_response(
                    status,
                    &Missing {
                        missing: begun.missing,
                    },
                )
            }
            Err(r) => refused(r),
        }
    })
}

/// The request body as a blocking `Read`, fed by [`pieces`] through a bounded channel.
pub(super) struct BodyReader {
    pub(super) rx: mpsc::Receiver<io::Result<Bytes>>,
    pub(super) piece: Bytes,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.piece.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(piece)) => self.piece = piece,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.piece.len());
        buf[..n].copy_from_slice(&self.piece.split_to(n));
        Ok(n)
    }
}

/// `POST /peer/v1/uploads/{id}/chunks`: frames, each checked and written; how many were.
pub(super) fn receive(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let media = req
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(str::trim);
        if !media.is_some_and(|m| m.eq_ignore_ascii_case(FRAMES)) {
            return Err(Failure::Status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("Send the chunks as frames with the header Content-Type: {FRAMES}."),
            ));
        }
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(PIECES_IN_FLIGHT);
        let (svc, id) = (req.svc, req.param);
        let work = tokio::task::spawn_blocking(move || {
            let mut input = BodyReader {
                rx,
                piece: Bytes::new(),
            };
            svc.upload_receive(&who, &id, &mut input)
        });
        let fed = feed(&req.headers, req.body, req.body_limit, &tx).await;
        drop(tx);
        let done = work
            .await
            .map_err(|e| Failure::Service(ServiceError::internal("worker thread failed", e)))?;
        fed?;
        match done {
            Ok(received) => json_response(StatusCode::OK, &Received { received }),
            Err(r) => refused(r),
        }
    })
}

/// `POST /peer/v1/uploads/{id}/commit`: the active image's record, or what is missing (409).
pub(super) fn commit(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let (svc, id) = (req.svc, req.param);
        match refusing(move || svc.upload_commit(&who, &id)).await? {
            Ok(image) => json_response(StatusCode::OK, &image),
            Err(r) => refused(r),
        }
    })
}

/// `DELETE /peer/v1/uploads/{id}`.
pub(super) fn abandon(req: Request, who: Principal) -> Reply {
    Box::pin(async move {
        let (svc, id) = (req.svc, req.param);
        blocking(move || svc.upload_abandon(&who, &id)).await?;
        Ok(no_content())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(value: &str, size: u64) -> Result<Option<(u64, u64)>, u16> {
        let mut headers = HeaderMap::new();
        headers.insert("range", HeaderValue::from_str(value).unwrap());
        byte_range(&headers, size).map_err(|_| 416)
    }

    #[test]
    fn ranges_of_the_file_route_are_single_and_inside_the_image() {
        assert_eq!(byte_range(&HeaderMap::new(), 10).ok(), Some(None));
        assert_eq!(range("bytes=0-3", 10), Ok(Some((0, 3))));
        assert_eq!(range("bytes=5-", 10), Ok(Some((5, 9))));
        assert_eq!(range("bytes=-4", 10), Ok(Some((6, 9))));
        assert_eq!(range("bytes=-40", 10), Ok(Some((0, 9))));
        assert_eq!(range("bytes=8-100", 10), Ok(Some((8, 9))));
        for bad in [
            "bytes=10-",
            "bytes=10-12",
            "bytes=-0",
            "bytes=3-1",
            "bytes=0-1,3-4",
            "items=0-1",
            "bytes=-",
            "bytes=a-b",
        ] {
            assert_eq!(range(bad, 10), Err(416), "{bad}");
        }
        assert_eq!(range("bytes=0-", 0), Err(416));
    }

    #[test]
    fn only_other_versions_of_the_protocol_are_refused() {
        let refused = |path: &str| match other_version(path) {
            Some(Failure::Status(status, sentence)) => Some((status.as_u16(), sentence)),
            _ => None,
        };
        assert_eq!(
            refused("/peer/v2/images/x"),
            Some((
                400,
                "This appliance speaks peer protocol version 1; the request is for version 2."
                    .into()
            ))
        );
        assert!(refused("/peer/v7").is_some());
        assert!(refused("/peer/v1/nothing").is_none());
        assert!(refused("/peer/vx/images").is_none());
        assert!(refused("/peer/").is_none());
        assert!(refused("/peers/v2/").is_none());
        let long = refused("/peer/v99999999999999999999999999/").expect("refused");
        assert!(
            long.1.contains("version 99999999999999999999…"),
            "{}",
            long.1
        );
    }
}
