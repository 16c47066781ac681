//! A peer region: a region of another image-replicator appliance, reached by the peer
//! protocol ([`crate::peer`]). The images and their records are the peer's.
//!
//! A copy from a peer ([`PeerSource`]) reads the peer's manifest, takes every chunk this
//! appliance holds already from its own images ([`LocalChunks`]), keeps holes as holes and
//! fetches the rest in batches on a thread of its own, each chunk checked against the
//! manifest as it arrives (one that differs is asked for again, a few times). A copy into a
//! peer ([`PeerSink`]) opens an upload with the source's manifest, sends only the chunks the
//! peer says it lacks, and commits: the peer checks the whole image before it publishes it.
//! Either resumes after an interruption without moving verified chunks again: the receiving
//! side checks what it holds against the manifest.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{ImageRecords, ImageStore, Reading, Recorded, Sink, StoreError};
use crate::copy::{Chunk, Digests, Hashes, Output, Source};
use crate::manifest::{Entry, Hash, Manifest, CHUNK_SIZE};
use crate::model::{Image, PeerRegion};
use crate::peer::client::{Commit, PeerClient};
use crate::peer::{
    encode_frame_as, ChunkRequest, Compression, Delta, FrameReader, Ranges, UploadImage, MAX_CHUNKS,
};
use crate::remote::RemoteError;
use crate::reuse::{LocalChunks, Reflinks};

/// Chunks asked for per request: 16 MiB of data, a few seconds on a thin link; the answer
/// streams, so the copy goes on as its frames arrive.
const BATCH: usize = 256;
/// Frames sent per upload request at most: 4 MiB of wire, so that progress and the bandwidth
/// cap follow the link closely and a round trip per request costs little.
const UPLOAD_BYTES: usize = 4 << 20;
/// Fetched chunks waiting for the copy (4 MiB).
const AHEAD: usize = 64;
/// How long a copy keeps asking a peer that does not answer before the attempt fails (the
/// worker's next attempt goes on after what was verified).
const PATIENCE: Duration = Duration::from_secs(60);
const FIRST_PAUSE: Duration = Duration::from_millis(200);
const MAX_PAUSE: Duration = Duration::from_secs(5);
/// Times one chunk is asked for again after it arrived different from the manifest.
const REFETCHES: u32 = 3;

pub struct PeerStore {
    region: String,
    config: PeerRegion,
    client: Arc<PeerClient>,
}

impl PeerStore {
    pub fn new(region: &str, config: &PeerRegion) -> Result<PeerStore, StoreError> {
        Ok(PeerStore {
            region: region.to_string(),
            config: config.clone(),
            client: Arc::new(PeerClient::new(region, config)?),
        })
    }

    /// The peer's record as this region's.
    fn local(&self, mut image: Image) -> Image {
        image.region = self.region.clone();
        image
    }
}

impl ImageStore for PeerStore {
    fn probe(&self) -> Result<(), String> {
        self.client.probe().map_err(|e| e.to_string())
    }

    fn prepare(&self) -> crate::error::Result<()> {
        super::check_remote("peer", &self.config.url, Some(&self.config.token))
    }

    fn records(&self) -> Option<&dyn ImageRecords> {
        Some(self)
    }

    fn manifest(&self, image: &Image, delta: &Delta) -> Result<Option<Manifest>, StoreError> {
        let (manifest, len) = self.client.manifest(image.id)?;
        Delta::add(&delta.wire, len as u64);
        if !manifest.describes(image) {
            return Err(StoreError::Fatal(format!(
                "the peer's manifest of image {} does not describe the image it records (size or SHA-512 differ)",
                image.id
            )));
        }
        Ok(Some(manifest))
    }

    fn open(&self, image: &Image, _offset: u64) -> Result<Box<dyn Source>, StoreError> {
        Err(StoreError::Fatal(format!(
            "image {} of peer region {} is copied with its manifest only",
            image.id, self.region
        )))
    }

    fn open_for_copy<'a>(
        &'a self,
        image: &Image,
        reading: Reading<'a>,
    ) -> Result<Box<dyn Source + 'a>, StoreError> {
        let manifest = reading.manifest.ok_or_else(|| {
            StoreError::Fatal(format!(
                "a copy from peer region {} needs the image's manifest",
                self.region
            ))
        })?;
        Ok(Box::new(PeerSource::start(
            Arc::clone(&self.client),
            image.id,
            manifest,
            reading,
        )?))
    }

    fn create<'a>(
        &'a self,
        image: &Image,
        source: &Image,
        stopping: &'a dyn Fn() -> bool,
    ) -> Result<Box<dyn Sink + 'a>, StoreError> {
        Ok(Box::new(PeerSink {
            client: Arc::clone(&self.client),
            region: self.region.clone(),
            id: image.id,
            image: UploadImage {
                name: source.name.clone(),
                owner: image.owner.clone(),
                disk_format: source.disk_format.clone(),
                container_format: source.container_format.clone(),
                size: source.size,
                checksum: source.checksum.clone(),
                os_hash_algo: source.os_hash_algo.clone(),
                os_hash_value: source.os_hash_value.clone(),
            },
            missing: None,
            batch: Vec::new(),
            frames: 0,
            sent: None,
            delta: Arc::new(Delta::default()),
            cost: 0,
            compression: Compression::default(),
            compress: true,
            batch_begun: Instant::now(),
            batch_bytes: 0,
            stopping,
        }))
    }

    fn continues_partial(&self) -> bool {
        true
    }

    fn remove(&self, id: Uuid) -> Result<(), StoreError> {
        Ok(self.client.remove(id)?)
    }
}

impl ImageRecords for PeerStore {
    fn image(&self, id: Uuid) -> Result<Option<Image>, StoreError> {
        Ok(self.client.image(id)?.map(|i| self.local(i)))
    }

    fn images(&self, owner: Option<&str>) -> Result<Vec<Image>, StoreError> {
        let key = owner.and_then(crate::model::TenantKey::parse);
        Ok(self
            .client
            .images()?
            .into_iter()
            .filter(|i| owner.is_none() || crate::model::TenantKey::parse(&i.owner) == key)
            .map(|i| self.local(i))
            .collect())
    }
}

/// Waits before asking a peer again; `false` once the patience is spent or `quit` is set.
fn pause(since: Instant, pause: &mut Duration, quit: &AtomicBool) -> bool {
    let until = Instant::now() + *pause;
    *pause = (*pause * 2).min(MAX_PAUSE);
    while Instant::now() < until {
        if quit.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    since.elapsed() < PATIENCE && !quit.load(Ordering::Relaxed)
}

/// What the fetch thread hands the copy for each data chunk, in order: a chunk the
/// destination holds already (to be read locally), or one fetched and checked.
enum Item {
    Local(usize),
    Fetched(usize, Vec<u8>, usize),
}

type Fetched = Result<Item, RemoteError>;

/// The bytes of a peer's image: holes, local chunks, and chunks fetched on a thread.
pub struct PeerSource<'a> {
    client: Arc<PeerClient>,
    image: Uuid,
    manifest: &'a Manifest,
    local: Option<Arc<dyn LocalChunks>>,
    reflinks: Option<Arc<Reflinks>>,
    items: Receiver<Fetched>,
    quit: Arc<AtomicBool>,
    fetcher: Option<JoinHandle<()>>,
    pos: u64,
    /// The chunk being read and its index.
    current: Option<(usize, Vec<u8>)>,
    delta: Arc<Delta>,
    /// Wire bytes of the chunks read since the last [`Source::cost`].
    cost: u64,
    stopping: &'a (dyn Fn() -> bool + Sync),
}

impl<'a> PeerSource<'a> {
    fn start(
        client: Arc<PeerClient>,
        image: Uuid,
        manifest: &'a Manifest,
        reading: Reading<'a>,
    ) -> Result<PeerSource<'a>, StoreError> {
        let first = (reading.offset / CHUNK_SIZE as u64) as usize;
        let data: VecDeque<(usize, Hash)> = manifest
            .chunks
            .iter()
            .enumerate()
            .skip(first)
            .filter_map(|(i, entry)| match entry {
                Entry::Data(h) => Some((i, *h)),
                Entry::Hole => None,
            })
            .collect();
        let (tx, items) = sync_channel(AHEAD);
        let quit = Arc::new(AtomicBool::new(false));
        let fetcher = {
            let fetch = Fetch {
                client: Arc::clone(&client),
                image,
                size: manifest.size,
                local: reading.local.clone(),
                delta: Arc::clone(&reading.delta),
                quit: Arc::clone(&quit),
            };
            std::thread::Builder::new()
                .name("peer-fetch".into())
                .spawn(move || fetch.run(data, &tx))
                .map_err(|e| StoreError::Transient(format!("cannot start a fetch thread: {e}")))?
        };
        Ok(PeerSource {
            client,
            image,
            manifest,
            local: reading.local,
            reflinks: reading.reflinks,
            items,
            quit,
            fetcher: Some(fetcher),
            pos: reading.offset,
            current: None,
            delta: reading.delta,
            cost: 0,
            stopping: reading.stopping,
        })
    }

    /// The fetch thread's next item, which must be for chunk `index`.
    fn next_item(&mut self, index: usize) -> io::Result<Item> {
        loop {
            match self.items.recv_timeout(Duration::from_millis(50)) {
                Ok(Ok(item)) => {
                    let i = match &item {
                        Item::Local(i) | Item::Fetched(i, _, _) => *i,
                    };
                    if i == index {
                        return Ok(item);
                    }
                    return Err(io::Error::other(format!(
                        "the fetch thread delivered chunk {i} where chunk {index} was due"
                    )));
                }
                Ok(Err(e)) => return Err(remote_io(e)),
                Err(RecvTimeoutError::Timeout) if (self.stopping)() => {
                    return Err(io::Error::other("the copy is stopping"))
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(io::Error::other("the fetch thread ended early"))
                }
            }
        }
    }

    /// Chunk `index`'s bytes: zeros for a hole, else the fetch thread's item (a local chunk
    /// that cannot be read after all is fetched alone).
    fn load(&mut self, index: usize) -> io::Result<Vec<u8>> {
        let len = self.manifest.chunk_len(index);
        let Entry::Data(hash) = self.manifest.chunks[index] else {
            return Ok(vec![0; len]);
        };
        match self.next_item(index)? {
            Item::Fetched(_, bytes, wire) => {
                self.cost += wire as u64;
                Ok(bytes)
            }
            Item::Local(_) => {
                let mut bytes = vec![0; len];
                if let Some(held) = self
                    .local
                    .as_ref()
                    .and_then(|l| l.read_held(&hash, &mut bytes))
                {
                    Delta::add(&self.delta.reused, len as u64);
                    if let (Some(reflinks), Some(file)) = (&self.reflinks, held.file) {
                        reflinks.offer(index, file, held.offset);
                    }
                    return Ok(bytes);
                }
                let (tx, rx) = sync_channel(1);
                let fetch = Fetch {
                    client: Arc::clone(&self.client),
                    image: self.image,
                    size: self.manifest.size,
                    local: None,
                    delta: Arc::clone(&self.delta),
                    quit: Arc::clone(&self.quit),
                };
                fetch.run(VecDeque::from([(index, hash)]), &tx);
                match rx.try_recv() {
                    Ok(Ok(Item::Fetched(_, bytes, wire))) => {
                        self.cost += wire as u64;
                        Ok(bytes)
                    }
                    Ok(Err(e)) => Err(remote_io(e)),
                    _ => Err(io::Error::other("the copy is stopping")),
                }
            }
        }
    }
}

/// A peer's failure as the copy engine's I/O error, transient or not as it was.
fn remote_io(e: RemoteError) -> io::Error {
    let kind = if e.is_transient() {
        io::ErrorKind::ConnectionAborted
    } else {
        io::ErrorKind::InvalidData
    };
    io::Error::new(kind, e.to_string())
}

impl Read for PeerSource<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.manifest.size || buf.is_empty() {
            return Ok(0);
        }
        let index = (self.pos / CHUNK_SIZE as u64) as usize;
        if self.current.as_ref().is_none_or(|(i, _)| *i != index) {
            let bytes = self.load(index)?;
            self.current = Some((index, bytes));
        }
        let Some((_, bytes)) = &self.current else {
            return Ok(0);
        };
        let within = (self.pos - self.manifest.offset(index)) as usize;
        let n = buf.len().min(bytes.len() - within);
        buf[..n].copy_from_slice(&bytes[within..within + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Source for PeerSource<'_> {
    fn is_hole(&mut self, offset: u64, len: u64) -> bool {
        let first = (offset / CHUNK_SIZE as u64) as usize;
        let end = (offset + len).div_ceil(CHUNK_SIZE as u64) as usize;
        self.manifest
            .chunks
            .get(first..end)
            .is_some_and(|run| run.iter().all(|e| *e == Entry::Hole))
    }

    fn skip_to(&mut self, offset: u64) -> io::Result<()> {
        if offset < self.pos {
            return Err(io::Error::other("a peer's image is read forward only"));
        }
        self.pos = offset;
        Ok(())
    }

    fn cost(&mut self, _n: u64) -> u64 {
        std::mem::take(&mut self.cost)
    }

    /// Fetched chunks are checked as they arrive, local ones as they are read, and holes are
    /// zeros.
    fn checks_chunks(&self) -> bool {
        true
    }
}

impl Drop for PeerSource<'_> {
    fn drop(&mut self) {
        self.quit.store(true, Ordering::Relaxed);
        // The thread ends at its next chunk or pause; it is not waited for.
        drop(self.fetcher.take());
    }
}

/// Why a request for chunks ended before its last chunk.
enum Broke {
    /// The chunk at the queue's front arrived damaged or different from its manifest.
    Bad(usize, String),
    Remote(RemoteError),
    /// The copy no longer wants chunks.
    Gone,
}

/// The fetching of a copy's data chunks from a peer, on a thread of its own.
struct Fetch {
    client: Arc<PeerClient>,
    image: Uuid,
    size: u64,
    local: Option<Arc<dyn LocalChunks>>,
    delta: Arc<Delta>,
    quit: Arc<AtomicBool>,
}

impl Fetch {
    /// Hands `tx` an item for each of `data`'s chunks in order: those the chunk index names
    /// are left to the copy to read locally, the others are fetched, each checked against
    /// its hash. A chunk that arrives different is asked for again [`REFETCHES`] times; a peer
    /// that does not answer is asked again for up to [`PATIENCE`] without progress.
    fn run(&self, data: VecDeque<(usize, Hash)>, tx: &SyncSender<Fetched>) {
        let mut data = data;
        // Chunks looked up and found missing here, waiting to be fetched, in order.
        let mut queue: VecDeque<(usize, Hash)> = VecDeque::new();
        let mut bad = (usize::MAX, 0u32);
        let mut since = Instant::now();
        let mut wait = FIRST_PAUSE;
        let mut compression = Compression::default();
        loop {
            if self.quit.load(Ordering::Relaxed) {
                return;
            }
            // Local chunks before the next one to fetch go to the copy at once; the lookups
            // stop once a request's worth of chunks waits to be fetched.
            while queue.len() < BATCH {
                let Some((index, hash)) = data.pop_front() else {
                    break;
                };
                if self.local.as_ref().is_some_and(|l| l.has(&hash)) {
                    if queue.is_empty() {
                        if tx.send(Ok(Item::Local(index))).is_err() {
                            return;
                        }
                        continue;
                    }
                    // After chunks still to fetch: handed over in order once they are.
                    data.push_front((index, hash));
                    break;
                }
                queue.push_back((index, hash));
            }
            if queue.is_empty() {
                if data.is_empty() {
                    return;
                }
                continue;
            }
            let mut delivered = 0u64;
            let (compress, began) = (compression.choose(), Instant::now());
            let broke = self.batch(&mut queue, compress, &mut |item| {
                if let Item::Fetched(_, bytes, _) = &item {
                    delivered += bytes.len() as u64;
                }
                tx.send(Ok(item)).is_ok()
            });
            compression.moved(compress, delivered, began.elapsed());
            let delivered = delivered > 0;
            if delivered {
                since = Instant::now();
                wait = FIRST_PAUSE;
            }
            let e = match broke {
                None => continue,
                Some(Broke::Gone) => return,
                Some(Broke::Bad(index, why)) => {
                    bad = if bad.0 == index {
                        (index, bad.1 + 1)
                    } else {
                        (index, 1)
                    };
                    tracing::warn!(image = %self.image, chunk = index, times = bad.1, "a chunk from the peer was damaged or differs from its manifest; asking again: {why}");
                    if bad.1 <= REFETCHES {
                        continue;
                    }
                    RemoteError::Refused(format!(
                        "the peer appliance sent chunk {index} of image {} damaged or different from its manifest {} times ({why}); its copy of the image may be damaged",
                        self.image, bad.1
                    ))
                }
                Some(Broke::Remote(e)) => e,
            };
            if !e.is_transient() || !pause(since, &mut wait, &self.quit) {
                let _ = tx.send(Err(e));
                return;
            }
            tracing::warn!(image = %self.image, "fetching chunks from the peer failed, asking again: {e}");
        }
    }

    /// Asks for the chunks of `queue` and hands each to `deliver` as it arrives, checked,
    /// removing it from the queue; why the answer ended early, if it did.
    fn batch(
        &self,
        queue: &mut VecDeque<(usize, Hash)>,
        compress: bool,
        deliver: &mut dyn FnMut(Item) -> bool,
    ) -> Option<Broke> {
        let asked = ChunkRequest {
            ranges: Ranges::of(queue.iter().map(|(i, _)| *i)),
            compress,
        };
        let resp = match self.client.chunks(self.image, &asked) {
            Ok(resp) => resp,
            Err(e) => return Some(Broke::Remote(e)),
        };
        let mut frames = match FrameReader::for_size(resp, self.size) {
            Ok(frames) => frames,
            Err(e) => return Some(Broke::Remote(RemoteError::Unavailable(e.to_string()))),
        };
        while let Some(&(index, hash)) = queue.front() {
            let frame = match frames.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    return Some(Broke::Remote(RemoteError::Unavailable(format!(
                        "the peer appliance ended its answer before chunk {index}"
                    ))))
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    return Some(Broke::Bad(index, e.to_string()))
                }
                Err(e) => {
                    return Some(Broke::Remote(RemoteError::Unavailable(format!(
                        "the peer appliance broke off sending chunks: {e}"
                    ))))
                }
            };
            Delta::add(&self.delta.wire, frame.wire as u64);
            if frame.index != index {
                return Some(Broke::Bad(
                    index,
                    format!("chunk {} came where it was due", frame.index),
                ));
            }
            if blake3::hash(&frame.bytes).as_bytes() != &hash {
                return Some(Broke::Bad(index, "its BLAKE3 differs".into()));
            }
            Delta::add(&self.delta.fetched, frame.bytes.len() as u64);
            queue.pop_front();
            if !deliver(Item::Fetched(index, frame.bytes, frame.wire)) {
                return Some(Broke::Gone);
            }
        }
        None
    }
}

/// The thread that sends an upload's batches.
type Sending = JoinHandle<Result<(), RemoteError>>;

/// The upload of a copy into a peer.
struct PeerSink<'a> {
    client: Arc<PeerClient>,
    region: String,
    id: Uuid,
    image: UploadImage,
    /// Which chunks the peer lacks, once the upload is open ([`Sink::resume`]).
    missing: Option<Vec<bool>>,
    /// Frames not yet sent, and how many.
    batch: Vec<u8>,
    frames: usize,
    /// The thread sending batches, and where they go to it.
    sent: Option<(SyncSender<Vec<u8>>, Sending)>,
    delta: Arc<Delta>,
    /// Wire bytes of the frames made since the last [`Output::cost`].
    cost: u64,
    /// Whether chunks go compressed, chosen by timing batches: the one being made, when it
    /// was begun and the image bytes it holds.
    compression: Compression,
    compress: bool,
    batch_begun: Instant,
    batch_bytes: u64,
    stopping: &'a dyn Fn() -> bool,
}

impl PeerSink<'_> {
    /// Hands the frames made so far to the sending thread (started on first use).
    fn flush(&mut self) -> io::Result<()> {
        if self.frames == 0 {
            return Ok(());
        }
        if self.sent.is_none() {
            let (tx, rx) = sync_channel::<Vec<u8>>(1);
            let (client, id) = (Arc::clone(&self.client), self.id);
            let thread = std::thread::Builder::new()
                .name("peer-upload".into())
                .spawn(move || send_batches(&client, id, rx))?;
            self.sent = Some((tx, thread));
        }
        let batch = std::mem::take(&mut self.batch);
        self.frames = 0;
        let Some((tx, _)) = &self.sent else {
            return Ok(());
        };
        if tx.send(batch).is_err() {
            // The thread ended with an error; `finish` or `abort` reports it.
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the upload to the peer appliance stopped",
            ));
        }
        // A batch's time runs from its first chunk to its hand-over, which waits while the
        // link is still busy with the one before.
        let bytes = std::mem::take(&mut self.batch_bytes);
        self.compression
            .moved(self.compress, bytes, self.batch_begun.elapsed());
        self.compress = self.compression.choose();
        self.batch_begun = Instant::now();
        Ok(())
    }

    /// Waits for the sending thread; its failure if it had one.
    fn join(&mut self) -> Result<(), RemoteError> {
        let Some((tx, thread)) = self.sent.take() else {
            return Ok(());
        };
        drop(tx);
        thread.join().unwrap_or_else(|_| {
            Err(RemoteError::Unavailable(
                "the upload thread panicked".into(),
            ))
        })
    }
}

/// Sends each batch of frames, asking again while the peer does not answer.
fn send_batches(
    client: &PeerClient,
    id: Uuid,
    batches: Receiver<Vec<u8>>,
) -> Result<(), RemoteError> {
    let never = AtomicBool::new(false);
    for batch in batches {
        let (since, mut wait) = (Instant::now(), FIRST_PAUSE);
        loop {
            match client.send_chunks(id, batch.clone()) {
                Ok(_) => break,
                Err(e) if e.is_transient() && pause(since, &mut wait, &never) => {
                    tracing::warn!(image = %id, "sending chunks to the peer failed, sending again: {e}");
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

impl Output for PeerSink<'_> {
    fn write(&mut self, chunk: &Chunk, offset: u64) -> io::Result<()> {
        let Some(missing) = &self.missing else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a copy into peer region {} needs a source with a manifest (a directory or peer region)",
                    self.region
                ),
            ));
        };
        let first = (offset / CHUNK_SIZE as u64) as usize;
        let mut sends = Vec::new();
        for (i, part) in chunk.chunks(CHUNK_SIZE).enumerate() {
            if missing.get(first + i).copied().unwrap_or(false) {
                sends.push((first + i, part));
            } else if !crate::manifest::is_zero(part) {
                Delta::add(&self.delta.reused, part.len() as u64);
            }
        }
        for (index, part) in sends {
            let wire = encode_frame_as(&mut self.batch, index, part, self.compress) as u64;
            self.batch_bytes += part.len() as u64;
            self.frames += 1;
            self.cost += wire;
            Delta::add(&self.delta.wire, wire);
            Delta::add(&self.delta.fetched, part.len() as u64);
            if self.frames >= MAX_CHUNKS || self.batch.len() >= UPLOAD_BYTES {
                self.flush()?;
            }
        }
        if (self.stopping)() {
            return Err(io::Error::other("the copy is stopping"));
        }
        Ok(())
    }

    fn cost(&mut self, _read_cost: u64) -> u64 {
        std::mem::take(&mut self.cost)
    }
}

impl Sink for PeerSink<'_> {
    fn hashes(&self) -> Hashes {
        Hashes {
            sha512: false,
            md5: false,
        }
    }

    /// Opens (or continues) the upload with the source's manifest and learns what the peer
    /// lacks; the copy then reads the source from its start and sends only that.
    fn resume(&mut self, reference: &Manifest) -> Result<(usize, u64), StoreError> {
        if reference.sha512.is_none() || reference.covered() < reference.size {
            return Ok((0, 0));
        }
        let encoded = reference.encode();
        let missing = self
            .client
            .put_upload(self.id, self.image.clone(), &encoded)?;
        Delta::add(&self.delta.wire, encoded.len() as u64);
        let mut lacks = vec![false; reference.chunk_count()];
        for i in missing.missing.indexes() {
            if let Some(slot) = lacks.get_mut(i) {
                *slot = true;
            }
        }
        self.missing = Some(lacks);
        Ok((0, 0))
    }

    fn delta(&self) -> Option<Arc<Delta>> {
        Some(Arc::clone(&self.delta))
    }

    fn finish(
        mut self: Box<Self>,
        _streamed: &Digests,
        verify: &dyn Fn(&Recorded) -> Result<(), StoreError>,
    ) -> Result<Recorded, StoreError> {
        self.flush()
            .map_err(|e| StoreError::io("cannot send chunks to the peer", e))?;
        self.join()?;
        let record = match self.client.commit(self.id)? {
            Commit::Done(record) => record,
            Commit::Missing(ranges) => {
                return Err(StoreError::Transient(format!(
                    "the peer appliance still lacks {} chunks of image {} after the upload",
                    ranges.count(),
                    self.id
                )))
            }
        };
        let recorded = Recorded {
            size: record.size,
            checksum: record.checksum,
            os_hash_algo: record.os_hash_algo,
            os_hash_value: record.os_hash_value,
        };
        if let Err(e) = verify(&recorded) {
            if let Err(gone) = self.client.remove(self.id) {
                tracing::warn!(image = %self.id, "cannot remove the peer's image that failed verification: {gone}");
            }
            return Err(e);
        }
        Ok(recorded)
    }

    fn abort(mut self: Box<Self>) -> Option<StoreError> {
        // What reached the peer stays in its upload for the next attempt; a batch still on
        // its way is not waited for.
        let (tx, thread) = self.sent.take()?;
        drop(tx);
        if !thread.is_finished() {
            return None;
        }
        match thread.join() {
            Ok(Err(e)) => Some(e.into()),
            _ => None,
        }
    }
}
