//! The HTTP listener: plain TCP or TLS, with the limits an exposed service needs.
//!
//! warp's own server has no TLS in 0.4 and no header timeout, so connections are accepted here
//! and each is served by hyper with warp's filter as the service (`warp::service`):
//! - headers must arrive within [`HEADER_TIMEOUT`] (a client dribbling bytes is cut off);
//! - the request line and headers may take [`MAX_HEADER_BYTES`]; beyond that the answer is a
//!   431 in the reference's plain-text shape and the connection closes;
//! - a TLS handshake must finish within [`HANDSHAKE_TIMEOUT`];
//! - a connection whose client takes none of the bytes sent to it for [`WRITE_TIMEOUT`] is
//!   closed (a client that never reads its answer holds no buffers and no slot beyond that);
//! - a `Transfer-Encoding` other than exactly `chunked` is refused (400, also for `chunked`
//!   twice) before the request reaches warp;
//! - at most [`MAX_CONNECTIONS`] connections at once; beyond that new ones are closed at once;
//! - on shutdown the listener closes and open connections finish their current request.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use warp::Filter;

pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_CONNECTIONS: usize = 4096;
/// Longest a write may make no progress (the client reads nothing) before the connection
/// is closed. A keep-alive connection waiting for its next request is bounded by
/// [`HEADER_TIMEOUT`] instead.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request line plus header section (hyper's own cap is about 400 KB).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// The certificates of a PEM file, at least one; `what` names the file in errors.
pub fn pem_certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {what} {shown}: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot parse {what} {shown}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what} {shown} holds no certificate in PEM form"));
    }
    Ok(certs)
}

/// Loads a PEM certificate chain and private key into a TLS acceptor.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let chain = pem_certificates(cert, "the certificate file")?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read the private key {}: {e}", key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("the certificate and key do not form a usable pair: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `filter` on `listener` until `stop` resolves, then drains for up to `drain`.
pub async fn serve<F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    filter: F,
    stop: impl std::future::Future<Output = ()>,
    drain: Duration,
) where
    F: Filter<Extract = (warp::reply::Response,), Error = warp::Rejection>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut stop = std::pin::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit of {MAX_CONNECTIONS} reached; closing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let warp_service = warp::service(filter.clone());
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let mut warp_service = warp_service.clone();
            async move {
                // warp assumes an origin-form target (`/path?query`); anything else stops here.
                if req.uri().path_and_query().is_none() {
                    return Ok::<_, Infallible>(crate::http::bad_target());
                }
                if let Some(refusal) = crate::http::refuse_transfer_coding(req.headers()) {
                    return Ok(refusal);
                }
                tower_service::Service::call(&mut warp_service, req).await
            }
        });
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_header_size(MAX_HEADER_BYTES);
            let served = match tls {
                None => {
                    let conn = http.serve_connection(TokioIo::new(Guarded::new(stream)), service);
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
                    match tokio::time::timeout_at(deadline, speaks_tls(&stream)).await {
                        Ok(Some(true)) => {}
                        Ok(Some(false)) => return refuse_plain_http(stream, peer).await,
                        Ok(None) | Err(_) => return,
                    }
                    let stream =
                        match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, "TLS handshake failed: {e}");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    let conn = http.serve_connection(TokioIo::new(Guarded::new(stream)), service);
                    watcher.watch(conn).await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {drain:?}; closing them");
    }
}

/// Whether a client of the TLS port starts with a TLS record (a handshake: 0x16) rather than
/// plain HTTP (a method's capital letter); `None` if it sent nothing or the connection failed.
async fn speaks_tls(stream: &tokio::net::TcpStream) -> Option<bool> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) => Some(!first[0].is_ascii_uppercase()),
        _ => None,
    }
}

/// How long a plain HTTP client of the TLS port gets to send its request head before the 400,
/// and to go away after it.
const PLAIN_HTTP_GRACE: Duration = Duration::from_secs(2);

/// Answers plain HTTP sent to the TLS port as nginx does: a plain-text 400 saying to use
/// https, then closes. The request head is read first (a close with unread bytes would reset
/// the connection and lose the answer), and whatever else comes is drained for a moment.
async fn refuse_plain_http(mut stream: tokio::net::TcpStream, peer: std::net::SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tracing::info!(%peer, "plain HTTP sent to the HTTPS port; answered 400");
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(PLAIN_HTTP_GRACE, async {
        while head.len() < MAX_HEADER_BYTES && !contains(&head, b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let body = crate::http::error_text(
        warp::http::StatusCode::BAD_REQUEST,
        "The plain HTTP request was sent to an HTTPS port: use https:// instead of http://.",
    );
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=UTF-8\r\ncontent-length: {}\r\nconnection: close\r\nx-openstack-request-id: {}\r\n\r\n{body}",
        body.len(),
        crate::http::new_request_id()
    );
    let _ = tokio::time::timeout(PLAIN_HTTP_GRACE, async {
        if stream.write_all(answer.as_bytes()).await.is_ok() {
            let _ = stream.shutdown().await;
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        }
    })
    .await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A connection as hyper sees it, with two guards hyper lacks:
/// - a write (or flush) that makes no progress for [`WRITE_TIMEOUT`] fails with `TimedOut`,
///   which ends the connection;
/// - hyper answers a header section over [`MAX_HEADER_BYTES`] itself, with a bodiless `431`
///   head, and then closes; that head is sent here in the reference's plain-text shape
///   instead (hyper never hands it to the service).
struct Guarded<S> {
    inner: S,
    /// Bytes to send in place of what hyper wrote, and how many of them went out.
    replacement: Option<(Vec<u8>, usize)>,
    /// Running while the client has taken none of the bytes offered to it.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Guarded<S> {
    fn new(inner: S) -> Self {
        Guarded {
            inner,
            replacement: None,
            stalled: None,
        }
    }

    /// Passes a write's outcome on; a `Pending` one starts (or checks) the stall clock, any
    /// progress stops it.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        outcome: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match outcome {
            Poll::Pending => {
                let clock = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
                match clock.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        tracing::info!(
                            "a client took none of its answer for {} s; closing",
                            WRITE_TIMEOUT.as_secs()
                        );
                        Poll::Ready(Err(io::ErrorKind::TimedOut.into()))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> Guarded<S> {
    /// Sends what is left of the replacement.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, sent)) = self.replacement.take() {
            let Some(rest) = bytes.get(sent..).filter(|r| !r.is_empty()) else {
                break;
            };
            let outcome = Pin::new(&mut self.inner).poll_write(cx, rest);
            match self.watch(cx, outcome) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.replacement = Some((bytes, sent + n)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.replacement = Some((bytes, sent));
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// If `head` is hyper's own 431, takes it over; the caller reports it as written.
    fn take_over(&mut self, head: &[u8]) -> bool {
        match rewrite_431(head) {
            Some(bytes) => {
                tracing::info!(
                    "a request's header section is over {MAX_HEADER_BYTES} bytes; answered 431"
                );
                self.replacement = Some((bytes, 0));
                true
            }
            None => false,
        }
    }
}

/// hyper's automatic 431 head (`HTTP/1.1 431 …`, nothing after the blank line) with the
/// plain-text body, its type and length, `Connection: close` and a request id; `None` for
/// anything else.
fn rewrite_431(head: &[u8]) -> Option<Vec<u8>> {
    if !head.starts_with(b"HTTP/1.1 431 ") || !head.ends_with(b"\r\n\r\n") {
        return None;
    }
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.trim_end().split("\r\n");
    let status_line = lines.next()?;
    // hyper's `date` line is kept; its `content-length: 0` is replaced.
    let kept: Vec<&str> = lines
        .filter(|l| {
            let name = l.split(':').next().unwrap_or_default().trim();
            !["content-length", "connection", "content-type"]
                .iter()
                .any(|n| name.eq_ignore_ascii_case(n))
        })
        .collect();
    let body = crate::http::error_text(
        warp::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        &format!("The request line and headers are larger than {MAX_HEADER_BYTES} bytes."),
    );
    let mut out = format!("{status_line}\r\n");
    for line in kept {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str(&format!(
        "content-type: text/plain; charset=UTF-8\r\ncontent-length: {}\r\nconnection: close\r\nx-openstack-request-id: {}\r\n\r\n{body}",
        body.len(),
        crate::http::new_request_id()
    ));
    Some(out.into_bytes())
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = std::task::ready!(this.drain(cx)) {
            return Poll::Ready(Err(e));
        }
        if this.take_over(buf) {
            // Sent by the next drain if the socket is full now; hyper flushes before closing.
            if let Poll::Ready(Err(e)) = this.drain(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        let outcome = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, outcome)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = std::task::ready!(this.drain(cx)) {
            return Poll::Ready(Err(e));
        }
        let first = bufs.iter().find(|b| !b.is_empty());
        if first.is_some_and(|b| b.starts_with(b"HTTP/1.1 431 ")) {
            let whole: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            if this.take_over(&whole) {
                if let Poll::Ready(Err(e)) = this.drain(cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(whole.len()));
            }
        }
        let outcome = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, outcome)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = std::task::ready!(this.drain(cx)) {
            return Poll::Ready(Err(e));
        }
        let outcome = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, outcome)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = std::task::ready!(this.drain(cx)) {
            return Poll::Ready(Err(e));
        }
        let outcome = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(cx, outcome)
    }
}
