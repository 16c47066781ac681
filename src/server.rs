//! `image-replicator serve`: opens the store, binds the HTTP listener and the admin socket, and
//! runs both until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};

use crate::admin::{self, ServerStatus};
use crate::service::Service;
use crate::store::{self, OpenError, Repo};
use crate::worker::{self, WorkerConfig};

/// How long `serve` keeps trying to open a store that another process holds (an admin command
/// that is just finishing, say).
const LOCK_WAIT: Duration = Duration::from_secs(5);
/// How long open connections get to finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(3);
/// Pending connections the kernel queues for the API (capped by net.core.somaxconn).
const BACKLOG: u32 = 4096;
/// How long copies get to reach a chunk boundary after a shutdown signal.
const WORKER_GRACE: Duration = Duration::from_secs(5);

pub struct ServeOptions {
    /// Resolved from `--listen` while the arguments were parsed.
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Which store, and this appliance's name.
    pub store: store::StoreConfig,
    pub demo: bool,
    /// `None`: the API alone (`--no-worker`).
    pub worker: Option<WorkerConfig>,
    /// PEM certificate chain and private key: serve HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Accept Keystone's tokens too.
    pub keystone: Option<crate::keystone::ValidatorConfig>,
    /// The free-space reserve of every file system the appliance writes.
    pub min_free: worker::MinFree,
    /// Terminal jobs are purged in the background this long after they ended (`None`: kept).
    pub job_retention: Option<Duration>,
}

/// Files and directories this process creates are its user's alone (0600 and 0700), whatever
/// umask it was started with: the store holds token hashes, regions hold tenants' images.
pub fn private_umask() {
    // SAFETY: umask only sets the process's file mode creation mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// Opens the store, waiting up to `wait` while another process holds its lock.
pub fn open_store(
    data_dir: &Path,
    config: &store::StoreConfig,
    wait: Duration,
) -> Result<Arc<dyn Repo>, OpenError> {
    private_umask();
    let deadline = std::time::Instant::now() + wait;
    loop {
        match store::open(data_dir, config) {
            Err(OpenError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Creates the data directory, readable by its owner only (it holds token hashes).
pub fn create_data_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Raises the soft limit on open files to the hard limit (at most 65,536): every connection
/// is a descriptor, and the usual soft limit of 1,024 is far below what a server needs.
fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        let wanted = limit.rlim_max.min(65_536);
        if limit.rlim_cur < wanted {
            limit.rlim_cur = wanted;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!(
                    "cannot raise the open-file limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

pub async fn run(opts: ServeOptions) -> Result<(), String> {
    private_umask();
    raise_file_limit();
    create_data_dir(&opts.data_dir).map_err(|e| {
        format!(
            "cannot create the data directory {}: {e}",
            opts.data_dir.display()
        )
    })?;
    let data_dir = std::path::absolute(&opts.data_dir).map_err(|e| e.to_string())?;
    let store = open_store(&data_dir, &opts.store, LOCK_WAIT).map_err(|e| match e {
        OpenError::Locked(path) => format!(
            "the store {path} is in use by another image-replicator process; is a server already running on {}?",
            data_dir.display()
        ),
        other => other.to_string(),
    })?;
    let mut service = Service::new(store, data_dir.clone());
    service.min_free = opts.min_free;
    service.https = opts.tls.is_some();
    let svc = Arc::new(service);
    if let Some(config) = opts.keystone.clone() {
        let url = config.credentials.auth_url.clone();
        let validator =
            tokio::task::spawn_blocking(move || crate::keystone::Validator::new(config))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot use Keystone at {url}: {e}"))?;
        svc.auth.use_keystone(validator);
        tracing::info!(keystone = %url, "accepting Keystone tokens too");
    }
    let demo_token = if opts.demo {
        let demo_svc = Arc::clone(&svc);
        let token = tokio::task::spawn_blocking(move || crate::demo::prepare(&demo_svc))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot prepare the demo: {e}"))?;
        Some(token)
    } else {
        None
    };

    let addr = opts.listen;
    let tls = match &opts.tls {
        Some((cert, key)) => Some(crate::net::tls_acceptor(cert, key)?),
        None => None,
    };
    let tcp = listen(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let bound = tcp.local_addr().map_err(|e| e.to_string())?;

    // We hold the store's lock, so a socket file left here is a dead server's.
    let socket = admin::socket_path(&data_dir);
    let _ = std::fs::remove_file(&socket);
    let unix = UnixListener::bind(&socket)
        .map_err(|e| format!("cannot create the admin socket {}: {e}", socket.display()))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict the admin socket {}: {e}", socket.display()))?;

    let status = ServerStatus {
        pid: std::process::id(),
        node: opts.store.node.clone(),
        database: match &opts.store.database_url {
            Some(url) => store::redacted(url),
            None => format!("sled in {}", data_dir.join("db").display()),
        },
        listen: bound.to_string(),
        data_dir: data_dir.clone(),
        auth: Default::default(),
        active_copies: 0,
    };
    // Crash cleanup runs before any admin request or copy can touch the regions.
    let parts = svc.worker_parts();
    let recover_parts = parts.clone();
    tokio::task::spawn_blocking(move || worker::recover(&recover_parts))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot clean up after the last run: {e}"))?;
    let promises_svc = Arc::clone(&svc);
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || promises_svc.load_promises()).await {
        tracing::warn!("cannot count the room the queued copies need: {e}");
    }
    let admin_task = tokio::spawn(admin::serve(unix, Arc::clone(&svc), status));
    let retention_task = opts
        .job_retention
        .map(|keep| tokio::spawn(purge_in_background(Arc::clone(&svc), keep)));
    let max_bandwidth = opts.worker.as_ref().and_then(|w| w.max_bandwidth);
    let workers = match opts.worker {
        Some(config) => {
            let started = tokio::task::spawn_blocking(move || worker::start(parts, &config))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot start the replication worker: {e}"))?;
            Some(started)
        }
        None => None,
    };

    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(listen = %bound, scheme, data_dir = %data_dir.display(), "image-replicator serving");
    println!("image-replicator listening on {scheme}://{bound}");
    println!("admin socket {}", socket.display());
    if let Some(token) = &demo_token {
        let reach = crate::demo::Reach {
            addr: bound,
            data_dir: &data_dir,
            tls_cert: opts.tls.as_ref().map(|(cert, _)| cert.as_path()),
            token,
            max_bandwidth,
        };
        println!("{}", crate::demo::instructions(&reach));
    }

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let routes = crate::http::routes(Arc::clone(&svc));
    let stop = async {
        let _ = stop_rx.await;
    };
    let mut http = tokio::spawn(crate::net::serve(tcp, tls, routes, stop, DRAIN));

    // systemd (Type=notify): ready now, then a heartbeat at half the watchdog period.
    notify(sd_notify::NotifyState::Ready);
    let watchdog = sd_notify::watchdog_enabled().map(|period| {
        tokio::spawn(async move {
            let mut beat = tokio::time::interval(period / 2);
            loop {
                beat.tick().await;
                notify(sd_notify::NotifyState::Watchdog);
            }
        })
    });

    let signal_name = tokio::select! {
        name = shutdown_signal() => name?,
        _ = &mut http => return Err("the HTTP server stopped unexpectedly".into()),
    };
    tracing::info!("{signal_name} received, shutting down");
    notify(sd_notify::NotifyState::Stopping);
    let _ = stop_tx.send(());
    if let Some(workers) = workers {
        let _ = tokio::task::spawn_blocking(move || workers.stop(WORKER_GRACE)).await;
    }
    // net::serve gives connections DRAIN itself; this only guards against it hanging.
    if tokio::time::timeout(DRAIN + Duration::from_secs(1), &mut http)
        .await
        .is_err()
    {
        http.abort();
    }
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    admin_task.abort();
    if let Some(task) = retention_task {
        task.abort();
    }
    let _ = std::fs::remove_file(&socket);
    svc.store.flush().map_err(|e| e.to_string())?;
    tracing::info!("stopped");
    Ok(())
}

/// The API's listening socket, with a connection queue of [`BACKLOG`]: the default 128
/// overflowed when 1,000 clients connected at once, each overflow costing a client a 1 s SYN
/// retransmission (opening 1,000 connections took 4.1 s in the debug build).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// `serve --job-retention`: purges the terminal jobs that ended `keep` ago or longer, at the
/// start and then every quarter of `keep` (at least every second, at most every 10 minutes).
async fn purge_in_background(svc: Arc<Service>, keep: Duration) {
    let rule = crate::service::PurgeRule {
        older_than_secs: keep.as_secs().max(1),
        statuses: Vec::new(),
    };
    let mut tick =
        tokio::time::interval((keep / 4).clamp(Duration::from_secs(1), Duration::from_secs(600)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (svc, rule) = (Arc::clone(&svc), rule.clone());
        match tokio::task::spawn_blocking(move || svc.purge_jobs(&rule)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("the background purge of old jobs failed: {e}"),
            Err(e) => tracing::warn!("the background purge of old jobs failed: {e}"),
        }
    }
}

/// Tells systemd our state; a no-op without `NOTIFY_SOCKET`.
fn notify(state: sd_notify::NotifyState) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

async fn shutdown_signal() -> Result<&'static str, String> {
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
