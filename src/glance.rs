//! A Glance region: an OpenStack Glance v2 image service, reached over HTTP.
//!
//! The calls the appliance needs: show, list, create, upload, download (resumed with `Range`
//! after a dropped connection), delete. With Keystone, every call carries a service token and
//! is repeated once with a new token after a 401; an upload, whose body cannot be sent twice,
//! fails as transient instead and the worker's next attempt starts it over.

use std::io::{self, Read};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::copy::Chunk;
use crate::keystone::TokenSource;
use crate::model::{parse_rfc3339, GlanceRegion, Image, ImageMeta, ImageStatus};
use crate::remote::RemoteError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// For each read or write of a transfer, and for a whole metadata call.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// For the quick "does it answer" check, and how long its answer is kept.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const PROBE_KEPT: Duration = Duration::from_secs(5);
/// A cancel or error waits for the delete of the destination: a Glance that does not answer
/// in this time gets its image deleted later (an orphan).
const DELETE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pages of a listing at most (a Glance that keeps sending `next` cannot loop us forever).
const MAX_PAGES: usize = 1000;
/// An upload's response comes after its last byte: allow for a whole image.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Times a download is resumed after its connection drops, and the first pause before.
const RESUMES: u32 = 5;
const FIRST_RESUME_PAUSE: Duration = Duration::from_millis(200);
/// HTTP chunk size of uploads. gunicorn (which serves Glance) copies what is left of a
/// chunk at each of Glance's 64 KiB reads: 1 MiB chunks made a 256 MiB upload 0.75 s slower.
const UPLOAD_PIECE: usize = 64 * 1024;
/// Images asked for per page when listing.
const PAGE: usize = 500;

pub struct Glance {
    region: String,
    base: String,
    http: Client,
    auth: Option<TokenSource>,
    last_probe: Mutex<Option<(Instant, Result<(), RemoteError>)>>,
}

/// Glance's image record, as much of it as the appliance reads.
#[derive(Deserialize, Debug, Clone)]
pub struct GlanceImage {
    pub id: Uuid,
    pub name: Option<String>,
    pub status: ImageStatus,
    pub owner: Option<String>,
    pub size: Option<u64>,
    pub checksum: Option<String>,
    pub os_hash_algo: Option<String>,
    pub os_hash_value: Option<String>,
    pub disk_format: Option<String>,
    pub container_format: Option<String>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    pub min_disk: Option<u64>,
    pub min_ram: Option<u64>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub os_hidden: Option<bool>,
    /// Every other key: the users' properties among them.
    #[serde(flatten)]
    pub extra: std::collections::BTreeMap<String, serde_json::Value>,
}

fn seconds(text: &Option<String>) -> u64 {
    text.as_deref().and_then(parse_rfc3339).unwrap_or(0)
}

impl GlanceImage {
    /// What a copy carries of the image's Glance fields: sizes to boot, tags, `os_hidden` and
    /// every user property with a string value (Glance's own keys and its reserved `os_glance_`
    /// prefix left out). Visibility and protection stay Glance's defaults (see
    /// [`ImageMeta::for_copy`]).
    fn meta(&self) -> ImageMeta {
        let properties = self
            .extra
            .iter()
            .filter(|(key, _)| crate::model::is_user_property(key))
            .filter_map(|(key, value)| Some((key.clone(), value.as_str()?.to_string())))
            .collect();
        let mut tags = self.tags.clone();
        tags.sort();
        tags.dedup();
        ImageMeta {
            min_disk: self.min_disk.unwrap_or(0),
            min_ram: self.min_ram.unwrap_or(0),
            tags,
            os_hidden: self.os_hidden.unwrap_or(false),
            properties,
            ..ImageMeta::default()
        }
    }

    /// The record in the appliance's own shape.
    pub fn to_image(&self, region: &str) -> Image {
        Image {
            id: self.id,
            name: self.name.clone().unwrap_or_default(),
            owner: self.owner.clone().unwrap_or_default(),
            region: region.to_string(),
            status: self.status,
            disk_format: self.disk_format.clone().unwrap_or_default(),
            container_format: self.container_format.clone().unwrap_or_default(),
            size: self.size.unwrap_or(0),
            checksum: self.checksum.clone(),
            os_hash_algo: self.os_hash_algo.clone(),
            os_hash_value: self.os_hash_value.clone(),
            created_at: seconds(&self.created_at),
            updated_at: seconds(&self.updated_at),
            meta: self.meta(),
        }
    }
}

#[derive(Deserialize)]
struct ImagePage {
    images: Vec<GlanceImage>,
    next: Option<String>,
}

impl Glance {
    pub fn new(region: &str, config: &GlanceRegion) -> Result<Glance, RemoteError> {
        let http = Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(IO_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("image-replicator/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| RemoteError::Refused(format!("cannot set up an HTTP client: {e}")))?;
        Ok(Glance {
            region: region.to_string(),
            base: config.url.trim_end_matches('/').to_string(),
            http,
            auth: config.keystone.clone().map(TokenSource::new),
            last_probe: Mutex::new(None),
        })
    }

    fn what(&self) -> String {
        format!("Glance of region {}", self.region)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request built by `build`, with a token if the region needs one; after a 401
    /// once more with a new token.
    fn send(&self, build: impl Fn(&Client) -> RequestBuilder) -> Result<Response, RemoteError> {
        let what = self.what();
        let resp = match &self.auth {
            Some(auth) => auth.send(&self.http, &what, |token| {
                build(&self.http).header("x-auth-token", token)
            })?,
            None => build(&self.http)
                .send()
                .map_err(|e| RemoteError::from_reqwest(&what, e))?,
        };
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(RemoteError::Refused(format!(
                "{what} refused the appliance's credentials (401)"
            )));
        }
        Ok(resp)
    }

    /// Fails with the answer's status unless it is one of `ok`.
    fn expect(&self, resp: Response, ok: &[StatusCode]) -> Result<Response, RemoteError> {
        if ok.contains(&resp.status()) {
            Ok(resp)
        } else {
            let status = resp.status();
            Err(RemoteError::from_status(&self.what(), status, resp))
        }
    }

    fn json<T: serde::de::DeserializeOwned>(&self, resp: Response) -> Result<T, RemoteError> {
        resp.json()
            .map_err(|e| RemoteError::Refused(crate::remote::unreadable(&self.what(), &e)))
    }

    /// The image's record; `None` if Glance does not know it.
    pub fn image(&self, id: Uuid) -> Result<Option<GlanceImage>, RemoteError> {
        let resp = self.send(|c| c.get(self.url(&format!("/v2/images/{id}"))))?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = self.expect(resp, &[StatusCode::OK])?;
        self.json(resp).map(Some)
    }

    /// Every image, or those of one owner.
    pub fn images(&self, owner: Option<&str>) -> Result<Vec<GlanceImage>, RemoteError> {
        let mut next = format!("/v2/images?limit={PAGE}");
        if let Some(owner) = owner {
            let query: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("owner", owner)
                .finish();
            next.push('&');
            next.push_str(&query);
        }
        let mut out = Vec::new();
        for _ in 0..MAX_PAGES {
            let resp = self.send(|c| c.get(self.url(&next)))?;
            let page: ImagePage = self.json(self.expect(resp, &[StatusCode::OK])?)?;
            let done = page.images.is_empty();
            out.extend(page.images);
            match page.next {
                Some(n) if !done && n != next => next = n,
                _ => return Ok(out),
            }
        }
        Err(RemoteError::Refused(format!(
            "{} listed more than {MAX_PAGES} pages of images",
            self.what()
        )))
    }

    /// Creates an empty (`queued`) image with the id the appliance chose.
    pub fn create(&self, id: Uuid, like: &Image, owner: &str) -> Result<(), RemoteError> {
        let meta = like.meta.for_copy();
        let mut body = json!({
            "id": id,
            "name": like.name,
            "disk_format": like.disk_format,
            "container_format": like.container_format,
            "owner": owner,
            "min_disk": meta.min_disk,
            "min_ram": meta.min_ram,
            "tags": meta.tags,
            "os_hidden": meta.os_hidden,
        });
        if let Some(fields) = body.as_object_mut() {
            for (key, value) in meta.properties {
                fields.entry(key).or_insert(value.into());
            }
        }
        let resp = self.send(|c| c.post(self.url("/v2/images")).json(&body))?;
        self.expect(resp, &[StatusCode::CREATED]).map(drop)
    }

    /// Uploads the image's data: `size` bytes that arrive as chunks on `chunks`, `None`
    /// marking the end (a sender dropped before that aborts the upload).
    ///
    /// Streams the chunks without copying them, with the async client on a runtime of this
    /// thread's own: the blocking client pumps a body through 8 KiB reads, which cost the
    /// appliance twice the CPU. The body goes chunked, without a length: gunicorn-served
    /// Glance takes a 256 MiB body that way in 2.6 s, with `Content-Length` in 3.5 s (curl,
    /// same run).
    ///
    /// `abort` ends the upload at once, even one stalled on a Glance that stopped reading.
    pub fn upload(
        &self,
        id: Uuid,
        chunks: tokio::sync::mpsc::Receiver<Option<Chunk>>,
        abort: &tokio::sync::Notify,
    ) -> Result<(), RemoteError> {
        let token = match &self.auth {
            Some(auth) => Some(auth.token(&self.http)?),
            None => None,
        };
        let setup = |e: &dyn std::fmt::Display| {
            RemoteError::Refused(format!("cannot set up an upload to {}: {e}", self.what()))
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| setup(&e))?;
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("image-replicator/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| setup(&e))?;
        // Sent as HTTP chunks of UPLOAD_PIECE (slices, not copies).
        let body = futures_util::stream::unfold(
            (Some(chunks), bytes::Bytes::new()),
            |(mut rx, mut rest)| async move {
                if rest.is_empty() {
                    match rx.as_mut()?.recv().await {
                        Some(Some(chunk)) => rest = bytes::Bytes::from_owner(Shared(chunk)),
                        Some(None) => return None,
                        None => {
                            let stopped = io::Error::other("the copy stopped before its end");
                            return Some((Err(stopped), (None, rest)));
                        }
                    }
                }
                let piece = rest.split_to(rest.len().min(UPLOAD_PIECE));
                Some((Ok(piece), (rx, rest)))
            },
        );
        let mut request = client
            .put(self.url(&format!("/v2/images/{id}/file")))
            .header("content-type", "application/octet-stream")
            .timeout(UPLOAD_TIMEOUT)
            .body(reqwest::Body::wrap_stream(body));
        if let Some(token) = token {
            request = request.header("x-auth-token", token);
        }
        let what = self.what();
        let exchange = async {
            let resp = request
                .send()
                .await
                .map_err(|e| RemoteError::from_reqwest(&what, e))?;
            let status = resp.status();
            let text = if status.is_success() {
                String::new()
            } else {
                resp.text().await.unwrap_or_default()
            };
            Ok::<_, RemoteError>((status, text))
        };
        let (status, text) = runtime.block_on(async {
            tokio::select! {
                answer = exchange => answer,
                () = abort.notified() => Err(RemoteError::Unavailable(format!(
                    "the upload to {what} was abandoned"
                ))),
            }
        })?;
        if status == StatusCode::UNAUTHORIZED {
            if let Some(auth) = &self.auth {
                auth.invalidate();
            }
            // The body is spent: the caller's retry sends it again, with a new token.
            return Err(RemoteError::Unavailable(format!(
                "{} refused the appliance's token during the upload (401)",
                self.what()
            )));
        }
        if status.is_success() {
            Ok(())
        } else {
            Err(RemoteError::from_status_text(&self.what(), status, &text))
        }
    }

    /// Deletes the image; one already gone is fine.
    pub fn delete(&self, id: Uuid) -> Result<(), RemoteError> {
        let resp = self.send(|c| {
            c.delete(self.url(&format!("/v2/images/{id}")))
                .timeout(DELETE_TIMEOUT)
        })?;
        self.expect(
            resp,
            &[
                StatusCode::NO_CONTENT,
                StatusCode::OK,
                StatusCode::NOT_FOUND,
            ],
        )
        .map(drop)
    }

    /// Whether Glance answers (and accepts the appliance's credentials), within
    /// [`PROBE_TIMEOUT`]. The answer is kept for [`PROBE_KEPT`]: anyone may call `/healthz`,
    /// and it must not become load on Glance.
    pub fn probe(&self) -> Result<(), RemoteError> {
        if let Ok(last) = self.last_probe.lock() {
            if let Some((at, result)) = &*last {
                if at.elapsed() < PROBE_KEPT {
                    return result.clone();
                }
            }
        }
        let result = self
            .send(|c| c.get(self.url("/v2/images?limit=1")).timeout(PROBE_TIMEOUT))
            .and_then(|resp| self.expect(resp, &[StatusCode::OK]).map(drop));
        if let Ok(mut last) = self.last_probe.lock() {
            *last = Some((Instant::now(), result.clone()));
        }
        result
    }

    /// The image's data from byte `offset` on.
    fn open(&self, id: Uuid, offset: u64) -> Result<Response, RemoteError> {
        let path = format!("/v2/images/{id}/file");
        let resp = self.send(|c| {
            let r = c.get(self.url(&path));
            if offset > 0 {
                r.header("range", format!("bytes={offset}-"))
            } else {
                r
            }
        })?;
        if offset == 0 {
            return self.expect(resp, &[StatusCode::OK, StatusCode::NO_CONTENT]);
        }
        let resp = self.expect(resp, &[StatusCode::PARTIAL_CONTENT, StatusCode::OK])?;
        let from = resp
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes "))
            .and_then(|v| v.split('-').next())
            .and_then(|v| v.parse::<u64>().ok());
        if resp.status() != StatusCode::PARTIAL_CONTENT || from != Some(offset) {
            return Err(RemoteError::Unavailable(format!(
                "{} does not resume downloads at byte {offset} (no matching 206)",
                self.what()
            )));
        }
        Ok(resp)
    }

    /// A reader of the image's `size` bytes from byte `offset` on that resumes with `Range`
    /// when the connection drops.
    pub fn download(
        self: &Arc<Self>,
        id: Uuid,
        size: u64,
        offset: u64,
    ) -> Result<Download, RemoteError> {
        let first = (offset < size).then(|| self.open(id, offset)).transpose()?;
        Ok(Download {
            glance: Arc::clone(self),
            id,
            size,
            pos: offset,
            resp: first,
            resumes_left: RESUMES,
        })
    }
}

/// A chunk handed to the HTTP body without copying it.
struct Shared(Chunk);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// See [`Glance::download`].
pub struct Download {
    glance: Arc<Glance>,
    id: Uuid,
    size: u64,
    pos: u64,
    resp: Option<Response>,
    resumes_left: u32,
}

impl Download {
    /// Waits, then reconnects from the current position; the error once resumes run out.
    fn resume(&mut self, mut why: String) -> io::Result<()> {
        self.resp = None;
        while self.resumes_left > 0 {
            let pause = FIRST_RESUME_PAUSE * 2u32.pow(RESUMES - self.resumes_left);
            self.resumes_left -= 1;
            tracing::warn!(image = %self.id, at = self.pos, "download dropped ({why}); resuming in {pause:?}");
            std::thread::sleep(pause);
            match self.glance.open(self.id, self.pos) {
                Ok(resp) => {
                    self.resp = Some(resp);
                    return Ok(());
                }
                Err(RemoteError::Refused(e)) => return Err(io::Error::other(e)),
                Err(RemoteError::Unavailable(e)) => why = e,
            }
        }
        Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("the download from {} failed: {why}", self.glance.what()),
        ))
    }
}

impl crate::copy::Source for Download {
    fn skip_to(&mut self, offset: u64) -> io::Result<()> {
        if offset != self.pos {
            self.resp = None;
            self.pos = offset;
            if offset < self.size {
                let resp = self.glance.open(self.id, offset).map_err(|e| match e {
                    RemoteError::Refused(e) => io::Error::other(e),
                    RemoteError::Unavailable(e) => {
                        io::Error::new(io::ErrorKind::ConnectionAborted, e)
                    }
                })?;
                self.resp = Some(resp);
            }
        }
        Ok(())
    }
}

impl Read for Download {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos >= self.size || buf.is_empty() {
                return Ok(0);
            }
            let Some(resp) = self.resp.as_mut() else {
                self.resume("no connection".into())?;
                continue;
            };
            let want = buf.len().min((self.size - self.pos) as usize);
            match resp.read(&mut buf[..want]) {
                Ok(0) => self.resume(format!(
                    "the connection ended at byte {} of {}",
                    self.pos, self.size
                ))?,
                Ok(n) => {
                    self.pos += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.resume(e.to_string())?,
            }
        }
    }
}
