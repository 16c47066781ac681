//! A Glance region's image store: the images and their records are Glance's own; the client
//! that talks to it is [`crate::glance::Glance`].
//!
//! A copy into Glance creates the image with the appliance's id, streams the chunks to the
//! upload on a thread of its own, and reads Glance's record of what it stored back as what the
//! destination recorded (Glance hashes what it receives; the copy computes no hash itself).

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc::{error::TrySendError, Sender};
use tokio::sync::Notify;
use uuid::Uuid;

use super::{ImageRecords, ImageStore, Recorded, Sink, StoreError};
use crate::copy::{Chunk, Digests, Hashes, Output, Source, IN_FLIGHT};
use crate::glance::Glance;
use crate::model::{GlanceRegion, Image, ImageStatus};
use crate::remote::RemoteError;

pub struct GlanceStore {
    region: String,
    config: GlanceRegion,
    glance: Arc<Glance>,
}

impl GlanceStore {
    pub fn new(region: &str, config: &GlanceRegion) -> Result<GlanceStore, StoreError> {
        Ok(GlanceStore {
            region: region.to_string(),
            config: config.clone(),
            glance: Arc::new(Glance::new(region, config)?),
        })
    }
}

impl ImageStore for GlanceStore {
    fn probe(&self) -> Result<(), String> {
        self.glance.probe().map_err(|e| e.to_string())
    }

    fn prepare(&self) -> crate::error::Result<()> {
        let password = self.config.keystone.as_ref().map(|k| &k.password);
        super::check_remote("Glance", &self.config.url, password)
    }

    fn records(&self) -> Option<&dyn ImageRecords> {
        Some(self)
    }

    fn open(&self, image: &Image, offset: u64) -> Result<Box<dyn Source>, StoreError> {
        Ok(Box::new(
            self.glance.download(image.id, image.size, offset)?,
        ))
    }

    fn create<'a>(
        &'a self,
        image: &Image,
        source: &Image,
        stopping: &'a dyn Fn() -> bool,
    ) -> Result<Box<dyn Sink + 'a>, StoreError> {
        self.glance.create(image.id, source, &image.owner)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Option<Chunk>>(IN_FLIGHT);
        let abort = Arc::new(Notify::new());
        let (glance, id, stop) = (Arc::clone(&self.glance), image.id, Arc::clone(&abort));
        let upload = std::thread::Builder::new()
            .name("glance-upload".into())
            .spawn(move || glance.upload(id, rx, &stop))
            .map_err(|e| StoreError::Transient(format!("cannot start an upload thread: {e}")))?;
        Ok(Box::new(GlanceSink {
            glance: &self.glance,
            id,
            tx: Some(tx),
            abort,
            upload: Some(upload),
            failed: None,
            stopping,
        }))
    }

    fn remove(&self, id: Uuid) -> Result<(), StoreError> {
        Ok(self.glance.delete(id)?)
    }
}

impl ImageRecords for GlanceStore {
    fn image(&self, id: Uuid) -> Result<Option<Image>, StoreError> {
        Ok(self.glance.image(id)?.map(|g| g.to_image(&self.region)))
    }

    fn images(&self, owner: Option<&str>) -> Result<Vec<Image>, StoreError> {
        Ok(self
            .glance
            .images(owner)?
            .iter()
            .map(|g| g.to_image(&self.region))
            .collect())
    }
}

struct GlanceSink<'a> {
    glance: &'a Arc<Glance>,
    id: Uuid,
    tx: Option<Sender<Option<Chunk>>>,
    abort: Arc<Notify>,
    upload: Option<JoinHandle<Result<(), RemoteError>>>,
    /// The upload's own failure, once it ended before the stream did.
    failed: Option<StoreError>,
    stopping: &'a dyn Fn() -> bool,
}

impl GlanceSink<'_> {
    /// Waits for the upload thread; its result.
    fn join(&mut self) -> Result<(), StoreError> {
        match self.upload.take().map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e.into()),
            Some(Err(_)) => Err(StoreError::Fatal("the upload thread panicked".into())),
        }
    }

    /// Gives a chunk (or the end, `None`) to the upload, waiting while its queue is full but
    /// not past a cancel or shutdown: a Glance that stops reading must not hold a job.
    fn hand_over(&mut self, mut item: Option<Chunk>) -> io::Result<()> {
        let Some(tx) = &self.tx else {
            return Err(io::Error::other("the upload stopped"));
        };
        loop {
            match tx.try_send(item) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(_)) => {
                    self.tx = None;
                    self.failed = self.join().err();
                    return Err(io::Error::other("the upload stopped"));
                }
                Err(TrySendError::Full(back)) => {
                    if (self.stopping)() {
                        return Err(io::Error::other("stopped while the upload was stalled"));
                    }
                    item = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}

impl Output for GlanceSink<'_> {
    fn write(&mut self, chunk: &Chunk, _offset: u64) -> io::Result<()> {
        self.hand_over(Some(Arc::clone(chunk)))
    }

    fn every_byte(&self) -> bool {
        true
    }
}

impl Sink for GlanceSink<'_> {
    fn hashes(&self) -> Hashes {
        Hashes {
            sha512: false,
            md5: false,
        }
    }

    fn finish(
        mut self: Box<Self>,
        _streamed: &Digests,
        verify: &dyn Fn(&Recorded) -> Result<(), StoreError>,
    ) -> Result<Recorded, StoreError> {
        if let Err(e) = self.hand_over(None) {
            return Err(self
                .abort()
                .unwrap_or_else(|| StoreError::io("copy failed", e)));
        }
        self.tx = None;
        self.join()?;
        let id = self.id;
        let stored = self.glance.image(id)?.ok_or_else(|| {
            StoreError::Transient(format!("image {id} vanished from Glance after its upload"))
        })?;
        if stored.status != ImageStatus::Active {
            return Err(StoreError::Fatal(format!(
                "Glance holds image {id} as {} after its upload, not active",
                stored.status
            )));
        }
        let recorded = Recorded {
            size: stored.size.unwrap_or(0),
            checksum: stored.checksum,
            os_hash_algo: stored.os_hash_algo,
            os_hash_value: stored.os_hash_value,
        };
        verify(&recorded)?;
        Ok(recorded)
    }

    fn abort(mut self: Box<Self>) -> Option<StoreError> {
        if self.failed.is_some() {
            return self.failed.take();
        }
        // The upload ended on its own (its error explains the stream's), or is told to stop.
        let ended_first = self.upload.as_ref().is_some_and(JoinHandle::is_finished);
        if !ended_first {
            self.abort.notify_one();
        }
        self.tx = None;
        let joined = self.join();
        if ended_first {
            joined.err()
        } else {
            None
        }
    }
}

impl Drop for GlanceSink<'_> {
    fn drop(&mut self) {
        if self.upload.is_some() {
            self.abort.notify_one();
            self.tx = None;
            let _ = self.join();
        }
    }
}
