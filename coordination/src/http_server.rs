//! The HTTP/WebSocket listener: accepts TCP connections, bounds them per
//! source ([`conn_limit`]), runs the TLS handshake and HTTP/1.1 under
//! deadlines, and hands the router every request.
//!
//! ```text
//!  accept ─▶ ConnLimiter::open ──refused──▶ close at once (counted)
//!              │ admitted: one task per connection
//!              ▼
//!           TLS handshake (tls_handshake_timeout)
//!              ▼
//!           hyper HTTP/1.1: request head within header_read_timeout,
//!           no byte either way for http_idle_timeout closes it
//!              ▼ 101 on /v1/connect
//!           WebSocket session: counted as authenticated, its own
//!           silence limit (`Limits::idle_timeout`) takes over
//! ```
//!
//! The accept loop waits on nothing but `accept` itself: a client that
//! connects and stays silent holds only its own task and slot.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{Request, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::{rustls, TlsAcceptor};
use tracing::debug;

use crate::config::Limits;
use crate::conn_limit::{ConnLimiter, ConnPermit, IpLimits};
use crate::metrics::Metrics;

/// How long shutdown waits for requests in flight (not WebSocket sessions,
/// which watch the shutdown signal themselves).
const REQUEST_DRAIN: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (typically EMFILE), instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What every connection task needs.
struct Shared {
    router: Router,
    tls: Option<TlsAcceptor>,
    limiter: Arc<ConnLimiter>,
    metrics: Arc<Metrics>,
    handshake_timeout: Duration,
    header_read_timeout: Duration,
    idle_timeout: Duration,
}

/// Serves `router` on `tcp` until `shutdown` turns true.
pub async fn serve(
    tcp: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let shared = Arc::new(Shared {
        router,
        tls: tls.map(TlsAcceptor::from),
        limiter: ConnLimiter::new(IpLimits {
            pending_per_ip: limits.pending_conns_per_ip,
            conns_per_ip: limits.conns_per_ip,
        }),
        metrics,
        handshake_timeout: limits.tls_handshake_timeout,
        header_read_timeout: limits.header_read_timeout,
        idle_timeout: limits.http_idle_timeout,
    });
    // Every connection task holds a sender; `recv` ends when all are gone.
    let (alive, mut all_done) = mpsc::channel::<()>(1);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    debug!("accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let permit = match shared.limiter.open(peer.ip()) {
            Ok(p) => Arc::new(p),
            Err(reason) => {
                shared
                    .metrics
                    .conn_refused_per_ip
                    .fetch_add(1, Ordering::Relaxed);
                debug!(%peer, ?reason, "connection refused: per-source limit");
                drop(stream);
                continue;
            }
        };
        tokio::spawn(serve_connection(
            stream,
            permit,
            Arc::clone(&shared),
            shutdown.clone(),
            alive.clone(),
        ));
    }
    drop(alive);
    let _ = tokio::time::timeout(REQUEST_DRAIN, all_done.recv()).await;
}

async fn serve_connection(
    stream: TcpStream,
    permit: Arc<ConnPermit>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    _alive: mpsc::Sender<()>,
) {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::default());
    let Some(acceptor) = &shared.tls else {
        let io = Metered::new(stream, Arc::clone(&permit), Arc::clone(&activity));
        return serve_http(io, permit, activity, &shared, shutdown).await;
    };
    let handshake = tokio::select! {
        h = tokio::time::timeout(shared.handshake_timeout, acceptor.accept(stream)) => h,
        _ = stopped(&mut shutdown) => return,
    };
    match handshake {
        Ok(Ok(tls)) => {
            // A TLS-ALPN-01 validation only looks at the certificate (RFC 8737).
            if tls.get_ref().1.alpn_protocol() == Some(crate::cert_resolver::ACME_TLS_ALPN) {
                return;
            }
            let io = Metered::new(tls, Arc::clone(&permit), Arc::clone(&activity));
            serve_http(io, permit, activity, &shared, shutdown).await
        }
        Ok(Err(e)) => debug!(?peer, "TLS handshake failed: {e}"),
        Err(_) => {
            shared.metrics.conn_timeouts.fetch_add(1, Ordering::Relaxed);
            debug!(?peer, "TLS handshake timed out");
        }
    }
}

async fn serve_http<IO>(
    io: Metered<IO>,
    permit: Arc<ConnPermit>,
    activity: Arc<Activity>,
    shared: &Shared,
    mut shutdown: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let router = TowerToHyperService::new(shared.router.clone());
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let response = router.call(req);
        let permit = Arc::clone(&permit);
        async move {
            let response = response.await;
            if let Ok(r) = &response {
                // Only /v1/connect upgrades, and only after the credential
                // was checked.
                if r.status() == StatusCode::SWITCHING_PROTOCOLS {
                    permit.authenticated();
                }
            }
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.header_read_timeout);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        let idle_left = shared.idle_timeout.saturating_sub(activity.idle_for());
        tokio::select! {
            // Also ends at an upgrade: the session task owns the socket then.
            served = conn.as_mut() => {
                if let Err(e) = served {
                    if e.is_timeout() {
                        shared.metrics.conn_timeouts.fetch_add(1, Ordering::Relaxed);
                    }
                    debug!("HTTP connection ended: {e}");
                }
                return;
            }
            _ = tokio::time::sleep(idle_left) => {
                if activity.idle_for() >= shared.idle_timeout {
                    shared.metrics.conn_timeouts.fetch_add(1, Ordering::Relaxed);
                    debug!("HTTP connection idle for {:?}: closed", shared.idle_timeout);
                    return;
                }
            }
            _ = stopped(&mut shutdown), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Completes once `shutdown` is true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Milliseconds since a process-wide epoch, for cheap atomic timestamps.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// When a connection last moved a byte.
#[derive(Debug)]
struct Activity {
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            last_ms: AtomicU64::new(now_ms()),
        }
    }
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A connection's byte stream that records activity and holds the
/// connection's [`ConnPermit`] for as long as the socket lives, through a
/// WebSocket upgrade.
struct Metered<IO> {
    inner: IO,
    activity: Arc<Activity>,
    _permit: Arc<ConnPermit>,
}

impl<IO> Metered<IO> {
    fn new(inner: IO, permit: Arc<ConnPermit>, activity: Arc<Activity>) -> Self {
        Metered {
            inner,
            activity,
            _permit: permit,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Metered<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Metered<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
