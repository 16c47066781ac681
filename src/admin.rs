//! The admin door: requests the CLI sends, the replies it gets, and the Unix socket
//! (`<data-dir>/admin.sock`) through which a running server takes them.
//!
//! sled lets one process open the store, so while `serve` runs the CLI cannot open it; it sends
//! its request here instead. With no server, the CLI opens the store and calls [`execute`]
//! itself. Either way the same service functions do the work.
//!
//! Wire format: one JSON request line from the client, one JSON reply line from the server.
//! A `job_seed` request line is followed by the seed file's bytes, as many as there are, up to
//! the client's shutdown of its sending half; the server reads them as they come.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::auth::AuthStats;
use crate::backup::Backup;
use crate::error::{Result, ServiceError};
use crate::model::{Image, Job, JobStatus, Limit, Region, RegionKind, Tenant, TokenInfo, User};
use crate::service::{ImportRequest, IssuedToken, PurgeRule, SeedOutcome, Service};

/// Largest request line the server reads (a seed's file follows its line, and is not bounded).
const MAX_REQUEST: u64 = 1 << 20;
/// Bytes of a seed's file the server reads from the socket at a time, and how many such chunks
/// wait for the seed at most.
const SEED_CHUNK: usize = 64 * 1024;
const SEED_CHUNKS_WAITING: usize = 8;

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    RegionAdd {
        id: String,
        /// `None`: a directory under the data directory.
        kind: Option<RegionKind>,
        disk_formats: Option<Vec<String>>,
        /// The node that alone runs its jobs.
        #[serde(default)]
        pin: Option<String>,
    },
    RegionList,
    RegionRemove {
        id: String,
    },
    TenantAdd {
        id: String,
        region: String,
        name: Option<String>,
        #[serde(default)]
        quota_bytes: Option<u64>,
        #[serde(default)]
        quota_jobs: Option<u64>,
    },
    /// Sets or clears quotas; a field left out is left as it is.
    TenantUpdate {
        id: String,
        #[serde(default)]
        quota_bytes: Option<Limit>,
        #[serde(default)]
        quota_jobs: Option<Limit>,
    },
    TenantList,
    TenantRemove {
        id: String,
    },
    UserAdd {
        name: String,
        tenants: Vec<String>,
        admin: bool,
    },
    UserList,
    UserRemove {
        name: String,
    },
    TokenIssue {
        user: String,
        tenant: String,
        expires_in_secs: Option<u64>,
        value: Option<String>,
    },
    TokenList,
    TokenRevoke {
        id: String,
    },
    ImageImport(ImportRequest),
    ImageList {
        tenant: Option<String>,
        region: Option<String>,
    },
    ImageShow {
        id: String,
    },
    ImageDelete {
        id: String,
    },
    /// The seed file's bytes follow the request line (they are the `input` of [`execute`]).
    JobSeed {
        enqueue: bool,
        /// What messages call the file: its path, or standard input.
        #[serde(default = "seed_file_name")]
        name: String,
    },
    JobList {
        tenant: Option<String>,
        status: Option<JobStatus>,
    },
    JobShow {
        id: String,
    },
    /// Jobs the worker has yet to finish.
    ActiveJobs,
    JobCancel {
        id: String,
    },
    /// A new job from an `error` or `canceled` one.
    JobRetry {
        id: String,
    },
    /// Removes terminal jobs that ended long enough ago.
    JobPurge(PurgeRule),
    UserUpdate {
        name: String,
        #[serde(default)]
        add_tenants: Vec<String>,
        #[serde(default)]
        remove_tenants: Vec<String>,
        #[serde(default)]
        admin: Option<bool>,
    },
    /// Every record, from one moment.
    Backup,
    /// The running server's own figures; only a server answers it.
    Status,
}

fn seed_file_name() -> String {
    "the seed file".into()
}

/// `job show`'s answer: the job and who holds it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct JobShown {
    #[serde(flatten)]
    pub job: Job,
    /// The node whose live claim holds the job (it is copying it or ending it).
    pub holder: Option<String>,
}

/// What a running server reports about itself.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ServerStatus {
    pub pid: u32,
    /// This appliance's node name.
    #[serde(default)]
    pub node: String,
    /// Where the records are: the data directory's sled, or a PostgreSQL database (its URL
    /// without a password).
    #[serde(default)]
    pub database: String,
    pub listen: String,
    pub data_dir: PathBuf,
    pub auth: AuthStats,
    /// Copies running now.
    pub active_copies: usize,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Reply {
    Region(Region),
    Regions(Vec<Region>),
    Tenant(Tenant),
    Tenants(Vec<Tenant>),
    User(User),
    Users(Vec<User>),
    UserRemoved {
        user: User,
        tokens_removed: usize,
    },
    IssuedToken(IssuedToken),
    Token(TokenInfo),
    Tokens(Vec<TokenInfo>),
    Image(Image),
    Images(Vec<Image>),
    Seeded(SeedOutcome),
    Job(Job),
    /// `job show`: the job and the appliance copying it now.
    JobShown(JobShown),
    Jobs(Vec<Job>),
    Status(ServerStatus),
    Purged {
        purged: usize,
    },
    UserUpdated {
        user: User,
        tokens_revoked: usize,
    },
    Backup(Box<Backup>),
}

/// Runs one admin request against the service (blocking). `input` is what follows the request:
/// a seed's file, read as the seed goes; every other request ignores it.
pub fn execute(
    svc: &Service,
    req: Request,
    status: Option<&ServerStatus>,
    input: &mut dyn Read,
) -> Result<Reply> {
    Ok(match req {
        Request::RegionAdd {
            id,
            kind,
            disk_formats,
            pin,
        } => Reply::Region(svc.region_add(&id, kind, disk_formats, pin)?),
        Request::RegionList => Reply::Regions(svc.region_list()?),
        Request::RegionRemove { id } => Reply::Region(svc.region_remove(&id)?),
        Request::TenantAdd {
            id,
            region,
            name,
            quota_bytes,
            quota_jobs,
        } => Reply::Tenant(svc.tenant_add_with_quotas(
            &id,
            &region,
            name,
            quota_bytes,
            quota_jobs,
        )?),
        Request::TenantUpdate {
            id,
            quota_bytes,
            quota_jobs,
        } => Reply::Tenant(svc.tenant_update(&id, quota_bytes, quota_jobs)?),
        Request::TenantList => Reply::Tenants(svc.tenant_list()?),
        Request::TenantRemove { id } => Reply::Tenant(svc.tenant_remove(&id)?),
        Request::UserAdd {
            name,
            tenants,
            admin,
        } => Reply::User(svc.user_add(&name, &tenants, admin)?),
        Request::UserList => Reply::Users(svc.user_list()?),
        Request::UserRemove { name } => {
            let (user, tokens_removed) = svc.user_remove(&name)?;
            Reply::UserRemoved {
                user,
                tokens_removed,
            }
        }
        Request::TokenIssue {
            user,
            tenant,
            expires_in_secs,
            value,
        } => Reply::IssuedToken(svc.token_issue(&user, &tenant, expires_in_secs, value)?),
        Request::TokenList => Reply::Tokens(svc.token_list()?),
        Request::TokenRevoke { id } => Reply::Token(svc.token_revoke(&id)?),
        Request::ImageImport(req) => Reply::Image(svc.image_import(&req)?),
        Request::ImageList { tenant, region } => {
            Reply::Images(svc.image_list(tenant.as_deref(), region.as_deref())?)
        }
        Request::ImageShow { id } => Reply::Image(svc.image_show(&id)?),
        Request::ImageDelete { id } => Reply::Image(svc.image_delete(&id)?),
        Request::JobSeed { enqueue, name } => Reply::Seeded(svc.job_seed(input, &name, enqueue)?),
        Request::JobList { tenant, status } => {
            Reply::Jobs(svc.job_list(tenant.as_deref(), status)?)
        }
        Request::JobShow { id } => {
            let job = svc.job_show(&id)?;
            let holder = svc.store.holder(job.wire.job_id)?;
            Reply::JobShown(JobShown { job, holder })
        }
        Request::ActiveJobs => Reply::Jobs(svc.active_jobs()?),
        Request::JobCancel { id } => Reply::Job(svc.job_cancel(&id)?),
        Request::JobRetry { id } => Reply::Job(svc.job_retry(&id)?),
        Request::JobPurge(rule) => Reply::Purged {
            purged: svc.purge_jobs(&rule)?,
        },
        Request::UserUpdate {
            name,
            add_tenants,
            remove_tenants,
            admin,
        } => {
            let (user, tokens_revoked) =
                svc.user_update(&name, &add_tenants, &remove_tenants, admin)?;
            Reply::UserUpdated {
                user,
                tokens_revoked,
            }
        }
        Request::Backup => Reply::Backup(Box::new(svc.backup()?)),
        Request::Status => match status {
            Some(s) => Reply::Status(ServerStatus {
                auth: svc.auth.stats(),
                active_copies: svc.board.active(),
                ..s.clone()
            }),
            None => {
                return Err(ServiceError::NotFound(
                    "no server is running on this data directory".into(),
                ))
            }
        },
    })
}

// ----- server side -----

fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Serves admin requests on `listener` until the task is dropped.
pub async fn serve(listener: UnixListener, svc: Arc<Service>, status: ServerStatus) {
    let status = Arc::new(status);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("admin socket accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (svc, status) = (Arc::clone(&svc), Arc::clone(&status));
        tokio::spawn(async move {
            if let Err(e) = handle(stream, svc, status).await {
                tracing::warn!("admin connection failed: {e}");
            }
        });
    }
}

async fn handle(
    mut stream: UnixStream,
    svc: Arc<Service>,
    status: Arc<ServerStatus>,
) -> std::io::Result<()> {
    let peer = stream.peer_cred()?.uid();
    let reply: Result<Reply> = if peer != 0 && peer != own_uid() {
        tracing::warn!(peer_uid = peer, "admin request refused: wrong uid");
        Err(ServiceError::Unauthorized(format!(
            "permission denied: the admin socket takes requests from root or uid {} only, not uid {peer}",
            own_uid()
        )))
    } else {
        let (read, _) = stream.split();
        let mut read = TokioBufReader::with_capacity(SEED_CHUNK, read);
        let mut line = String::new();
        (&mut read).take(MAX_REQUEST).read_line(&mut line).await?;
        match serde_json::from_str::<Request>(&line) {
            Err(e) => Err(ServiceError::BadRequest(format!(
                "malformed admin request: {e}"
            ))),
            Ok(req @ Request::JobSeed { .. }) => {
                tracing::info!(op = op_name(&req), "admin request");
                seed(read, svc, req, status).await
            }
            Ok(req) => {
                tracing::info!(op = op_name(&req), "admin request");
                tokio::task::spawn_blocking(move || {
                    execute(&svc, req, Some(&status), &mut std::io::empty())
                })
                .await
                .unwrap_or_else(|e| Err(ServiceError::internal("admin request failed", e)))
            }
        }
    };
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    stream.write_all(&out).await?;
    stream.shutdown().await
}

/// Runs a seed whose file is the rest of the connection (`read`, with what it has buffered
/// already): the bytes go to the seed's thread through a short channel as they arrive, so the
/// file is never held whole. A client that goes away mid-file leaves the seed a file that breaks
/// off, which it refuses (and rolls back).
async fn seed(
    mut read: impl tokio::io::AsyncBufRead + Unpin,
    svc: Arc<Service>,
    req: Request,
    status: Arc<ServerStatus>,
) -> Result<Reply> {
    let (chunks, waiting) = tokio::sync::mpsc::channel(SEED_CHUNKS_WAITING);
    let mut seeding = tokio::task::spawn_blocking(move || {
        execute(&svc, req, Some(&status), &mut ChannelReader::new(waiting))
    });
    let feed = async move {
        loop {
            let chunk = match read.fill_buf().await {
                Ok([]) => return,
                Ok(buffered) => Ok(buffered.to_vec()),
                Err(e) => Err(e),
            };
            let failed = chunk.is_err();
            if let Ok(bytes) = &chunk {
                read.consume(bytes.len());
            }
            // The seed ended early (refused): it reads no more.
            if chunks.send(chunk).await.is_err() || failed {
                return;
            }
        }
    };
    let joined = tokio::select! {
        joined = &mut seeding => joined,
        () = feed => seeding.await,
    };
    joined.unwrap_or_else(|e| Err(ServiceError::internal("admin request failed", e)))
}

/// A blocking [`Read`] over chunks sent from the async side; its end is the channel's close.
struct ChannelReader {
    chunks: tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    at: usize,
}

impl ChannelReader {
    fn new(chunks: tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>) -> ChannelReader {
        ChannelReader {
            chunks,
            chunk: Vec::new(),
            at: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.chunks.blocking_recv() {
                None => return Ok(0),
                Some(chunk) => {
                    self.chunk = chunk?;
                    self.at = 0;
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The request's name for logs (never its arguments: a token value may be among them).
fn op_name(req: &Request) -> String {
    serde_json::to_value(req)
        .ok()
        .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(String::from))
        .unwrap_or_default()
}

// ----- client side -----

/// Whether a server answers on the socket; `None` when none runs there.
///
/// Before a request goes out, the socket must be one the CLI can trust: a socket (not a link)
/// owned by the CLI's own uid or root, writable by its owner only, in a directory of that
/// owner that no one else may write to (or a sticky one); and the process that answers must
/// run as that uid or root. Anything else is refused with a sentence saying what is wrong: a
/// request may carry a token value, and the reply is believed.
pub fn connect(data_dir: &Path) -> std::result::Result<Option<StdUnixStream>, String> {
    let path = socket_path(data_dir);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(format!(
                "cannot examine the admin socket {}: {e}",
                path.display()
            ))
        }
    };
    trust_socket(&path, &meta)?;
    let stream = match StdUnixStream::connect(&path) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => {
            return Err(format!(
                "cannot reach the server's admin socket {}: {e}",
                path.display()
            ))
        }
    };
    // The path may have changed hands between the checks and the connect: the answering
    // process's own uid settles it.
    let peer = peer_uid(&stream).map_err(|e| {
        format!(
            "cannot tell who answers on the admin socket {}: {e}",
            path.display()
        )
    })?;
    if !trusted_uid(peer) {
        return Err(format!(
            "refusing the admin socket {}: the process answering on it runs as uid {peer}, not as uid {} or root",
            path.display(),
            own_uid()
        ));
    }
    Ok(Some(stream))
}

fn trusted_uid(uid: u32) -> bool {
    uid == 0 || uid == own_uid()
}

/// Whether the file at `path` (with `meta`, not following links) and its directory are fit to
/// talk to; a sentence saying why not.
fn trust_socket(path: &Path, meta: &std::fs::Metadata) -> std::result::Result<(), String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let refuse = |why: String| {
        Err(format!(
            "refusing the admin socket {}: {why}",
            path.display()
        ))
    };
    if !meta.file_type().is_socket() {
        return refuse("it is not a socket".into());
    }
    if !trusted_uid(meta.uid()) {
        return refuse(format!(
            "it belongs to uid {}, not to uid {} or root",
            meta.uid(),
            own_uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return refuse(format!(
            "its mode {:o} lets group or others write to it (the server makes it 0600)",
            meta.mode() & 0o7777
        ));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let dir_meta = std::fs::metadata(dir)
        .map_err(|e| format!("cannot examine the directory {}: {e}", dir.display()))?;
    if !trusted_uid(dir_meta.uid()) {
        return refuse(format!(
            "its directory belongs to uid {}, not to uid {} or root",
            dir_meta.uid(),
            own_uid()
        ));
    }
    let sticky = dir_meta.mode() & 0o1000 != 0;
    if dir_meta.mode() & 0o022 != 0 && !sticky {
        return refuse(format!(
            "its directory {} (mode {:o}) lets group or others replace it; chmod go-w {} if that is not meant",
            dir.display(),
            dir_meta.mode() & 0o7777,
            dir.display()
        ));
    }
    Ok(())
}

/// The effective uid of the process at the other end of a connected Unix socket.
fn peer_uid(stream: &StdUnixStream) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the fd is a live socket owned by `stream`; `cred` and `len` are valid for writes
    // of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Sends one request to a running server and waits for its reply.
pub fn send(stream: StdUnixStream, req: &Request) -> std::result::Result<Result<Reply>, String> {
    send_with(stream, req, &mut std::io::empty())
}

/// [`send`], with `input` (a seed's file) streamed after the request line, a chunk at a time.
pub fn send_with(
    mut stream: StdUnixStream,
    req: &Request,
    input: &mut dyn Read,
) -> std::result::Result<Result<Reply>, String> {
    let broken = |e: std::io::Error| format!("the server's admin socket failed: {e}");
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    // A server that refuses the peer (or the seed) answers at once and closes, so a write may
    // fail while its reply already waits to be read: read it before reporting the write error.
    let mut written = stream.write_all(&line);
    let mut chunk = vec![0; 64 * 1024];
    while written.is_ok() {
        let n = match input.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let name = match req {
                    Request::JobSeed { name, .. } => name.as_str(),
                    _ => "the input",
                };
                // Dropping the stream unfinished: the server sees a file that breaks off.
                return Err(format!("cannot read {name}: {e}"));
            }
        };
        written = stream.write_all(&chunk[..n]);
    }
    if written.is_ok() {
        written = stream.shutdown(std::net::Shutdown::Write);
    }
    let mut reply = String::new();
    let read = BufReader::new(stream).read_line(&mut reply);
    if reply.is_empty() {
        written.map_err(broken)?;
        read.map_err(broken)?;
        return Err("the server closed the admin connection without replying".into());
    }
    serde_json::from_str(&reply).map_err(|e| format!("unreadable reply from the server: {e}"))
}
