//! The client end of the peer protocol: the calls a peer region makes to the appliance it
//! names. Every call carries the region's token, read from where the region says at each
//! call; the first call checks that the peer speaks [`VERSION`].

use std::io::Read;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::{
    ChunkRequest, Missing, Ranges, Received, Upload, UploadImage, Versions, FRAMES, PREFIX, VERSION,
};
use crate::manifest::Manifest;
use crate::model::{Image, PeerRegion};
use crate::remote::{unreadable, RemoteError};
use crate::text::excerpt;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// For a metadata call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// For a request that moves chunks (at most [`super::MAX_CHUNKS`]), or a commit, which checks
/// the whole image: generous for a thin link.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(15 * 60);

pub struct PeerClient {
    region: String,
    base: String,
    config: PeerRegion,
    http: Client,
    /// Set once the peer was found to speak our version.
    spoken: OnceLock<()>,
}

/// How a commit ended.
pub enum Commit {
    Done(Box<Image>),
    /// The peer still lacks these chunks.
    Missing(Ranges),
}

impl PeerClient {
    pub fn new(region: &str, config: &PeerRegion) -> Result<PeerClient, RemoteError> {
        let mut builder = Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("image-replicator/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                RemoteError::Refused(format!(
                    "cannot read the CA file {} of region {region}: {e}",
                    path.display()
                ))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                RemoteError::Refused(format!(
                    "the CA file {} of region {region} holds no PEM certificate: {e}",
                    path.display()
                ))
            })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| RemoteError::Refused(format!("cannot set up an HTTP client: {e}")))?;
        Ok(PeerClient {
            region: region.to_string(),
            base: config.url.trim_end_matches('/').to_string(),
            config: config.clone(),
            http,
            spoken: OnceLock::new(),
        })
    }

    fn what(&self) -> String {
        format!("the peer appliance of region {}", self.region)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{PREFIX}/v{VERSION}{path}", self.base)
    }

    /// Checks once that the peer speaks our version.
    fn speaks(&self) -> Result<(), RemoteError> {
        if self.spoken.get().is_some() {
            return Ok(());
        }
        let versions = self.versions()?;
        if versions.protocol != super::PROTOCOL || !versions.versions.contains(&VERSION) {
            let theirs: Vec<String> = versions.versions.iter().map(|v| v.to_string()).collect();
            return Err(RemoteError::Refused(format!(
                "{} at {} speaks peer protocol version {} and this appliance speaks version {VERSION}: upgrade the older appliance",
                self.what(),
                excerpt(&self.base, 200),
                excerpt(&theirs.join(", "), 100),
            )));
        }
        let _ = self.spoken.set(());
        Ok(())
    }

    /// `GET /peer`: the versions the peer speaks.
    pub fn versions(&self) -> Result<Versions, RemoteError> {
        let what = self.what();
        let resp = self
            .http
            .get(format!("{}{PREFIX}", self.base))
            .send()
            .map_err(|e| RemoteError::from_reqwest(&what, e))?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(RemoteError::Refused(format!(
                "{what} at {} does not serve the peer protocol (GET {PREFIX} answered 404): is it an image-replicator appliance?",
                excerpt(&self.base, 200)
            )));
        }
        let resp = expect(&what, resp, &[StatusCode::OK])?;
        json(&what, resp)
    }

    /// Sends a request with the region's token, after the version check.
    fn send(&self, build: impl FnOnce(&Client) -> RequestBuilder) -> Result<Response, RemoteError> {
        self.speaks()?;
        let what = self.what();
        let token = self.config.token.read().map_err(|why| {
            RemoteError::Refused(format!(
                "cannot read the token of region {}: {why}",
                self.region
            ))
        })?;
        let resp = build(&self.http)
            .header("x-auth-token", token)
            .send()
            .map_err(|e| RemoteError::from_reqwest(&what, e))?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(RemoteError::Refused(format!(
                "{what} refused the region's token (401): it is unknown there, expired or revoked"
            )));
        }
        Ok(resp)
    }

    /// The peer's record of image `id`; `None` if it has none this token may see.
    pub fn image(&self, id: Uuid) -> Result<Option<Image>, RemoteError> {
        let resp = self.send(|c| c.get(self.url(&format!("/images/{id}"))))?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = expect(&self.what(), resp, &[StatusCode::OK])?;
        json(&self.what(), resp).map(Some)
    }

    /// The images of the region this token may see.
    pub fn images(&self) -> Result<Vec<Image>, RemoteError> {
        #[derive(serde::Deserialize)]
        struct List {
            images: Vec<Image>,
        }
        let region = self.config.region.clone();
        let resp = self.send(|c| c.get(self.url("/images")).query(&[("region", region)]))?;
        let resp = expect(&self.what(), resp, &[StatusCode::OK])?;
        json::<List>(&self.what(), resp).map(|l| l.images)
    }

    /// The manifest of image `id`, and the bytes it took.
    pub fn manifest(&self, id: Uuid) -> Result<(Manifest, usize), RemoteError> {
        let what = self.what();
        let resp = self.send(|c| {
            c.get(self.url(&format!("/images/{id}/manifest")))
                .timeout(TRANSFER_TIMEOUT)
        })?;
        let mut resp = expect(&what, resp, &[StatusCode::OK])?;
        let mut bytes = Vec::new();
        resp.read_to_end(&mut bytes)
            .map_err(|e| RemoteError::Unavailable(format!("{what} broke off the manifest: {e}")))?;
        let manifest = Manifest::decode(&bytes).map_err(|why| {
            RemoteError::Refused(format!(
                "{what} sent a manifest that does not decode: {why}"
            ))
        })?;
        Ok((manifest, bytes.len()))
    }

    /// Asks for chunks of image `id`: the answer is their frames, to be read as they come.
    pub fn chunks(&self, id: Uuid, asked: &ChunkRequest) -> Result<Response, RemoteError> {
        let resp = self.send(|c| {
            c.post(self.url(&format!("/images/{id}/chunks")))
                .timeout(TRANSFER_TIMEOUT)
                .json(asked)
        })?;
        expect(&self.what(), resp, &[StatusCode::OK])
    }

    /// Creates or continues the upload of image `id` into the region with its manifest
    /// (encoded); what the peer lacks.
    pub fn put_upload(
        &self,
        id: Uuid,
        image: UploadImage,
        manifest: &[u8],
    ) -> Result<Missing, RemoteError> {
        let body = Upload {
            region: self.config.region.clone(),
            image,
            manifest: base64::engine::general_purpose::STANDARD.encode(manifest),
        };
        let resp = self.send(|c| {
            c.put(self.url(&format!("/uploads/{id}")))
                .timeout(TRANSFER_TIMEOUT)
                .json(&body)
        })?;
        let resp = expect(&self.what(), resp, &[StatusCode::OK, StatusCode::CREATED])?;
        json(&self.what(), resp)
    }

    /// Sends frames of the upload's chunks.
    pub fn send_chunks(&self, id: Uuid, frames: Vec<u8>) -> Result<Received, RemoteError> {
        let resp = self.send(|c| {
            c.post(self.url(&format!("/uploads/{id}/chunks")))
                .timeout(TRANSFER_TIMEOUT)
                .header("content-type", FRAMES)
                .body(frames)
        })?;
        let resp = expect(&self.what(), resp, &[StatusCode::OK])?;
        json(&self.what(), resp)
    }

    /// Ends the upload: the peer checks the whole image and publishes it.
    pub fn commit(&self, id: Uuid) -> Result<Commit, RemoteError> {
        let resp = self.send(|c| {
            c.post(self.url(&format!("/uploads/{id}/commit")))
                .timeout(TRANSFER_TIMEOUT)
        })?;
        if resp.status() == StatusCode::CONFLICT {
            let missing: Missing = json(&self.what(), resp)?;
            return Ok(Commit::Missing(missing.missing));
        }
        let resp = expect(&self.what(), resp, &[StatusCode::OK])?;
        json(&self.what(), resp).map(|i| Commit::Done(Box::new(i)))
    }

    /// Removes what the appliance made there under `id`: an upload, or the image it became.
    /// Either gone already is fine.
    pub fn remove(&self, id: Uuid) -> Result<(), RemoteError> {
        // An upload is removed as one; an image it became (409 to the first) as an image.
        let gone = [
            StatusCode::NO_CONTENT,
            StatusCode::OK,
            StatusCode::NOT_FOUND,
        ];
        let resp = self.send(|c| c.delete(self.url(&format!("/uploads/{id}"))))?;
        if resp.status() != StatusCode::CONFLICT {
            expect(&self.what(), resp, &gone)?;
            return Ok(());
        }
        let resp = self.send(|c| c.delete(self.url(&format!("/images/{id}"))))?;
        expect(&self.what(), resp, &gone).map(drop)
    }

    /// The peer answers and speaks our version.
    pub fn probe(&self) -> Result<(), RemoteError> {
        self.speaks()
    }
}

fn expect(what: &str, resp: Response, ok: &[StatusCode]) -> Result<Response, RemoteError> {
    if ok.contains(&resp.status()) {
        Ok(resp)
    } else {
        let status = resp.status();
        Err(RemoteError::from_status(what, status, resp))
    }
}

fn json<T: DeserializeOwned>(what: &str, resp: Response) -> Result<T, RemoteError> {
    resp.json()
        .map_err(|e| RemoteError::Refused(unreadable(what, &e)))
}
