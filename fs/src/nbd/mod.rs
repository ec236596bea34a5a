//! NBD server of the master target: fixed-newstyle handshake, structured replies and
//! `base:allocation` block status over tokio, exporting the [`DiskView`]s an [`ExportCatalog`]
//! names. Requests of a connection are served concurrently; one writer serialises the replies.

mod handshake;
mod proto;
mod transmission;

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::view::{DiskView, ExportCatalog};

/// Tunables of an [`NbdServer`]; [`Default`] gives the values the appliance uses.
#[derive(Clone, Debug)]
pub struct NbdConfig {
    /// Requests of one connection served at the same time (further requests wait unread).
    pub max_in_flight: usize,
    /// Bytes of read and write payloads one connection may hold at a time (at least
    /// `max_request`).
    pub max_in_flight_bytes: usize,
    /// Largest read or write payload (`NBD_INFO_BLOCK_SIZE` maximum); larger requests get
    /// `EINVAL`.
    pub max_request: u32,
    /// Smallest alignment advertised (`NBD_INFO_BLOCK_SIZE` minimum): 1 or 512.
    pub min_block: u32,
    /// Connections beyond this many are closed right after accept.
    pub max_connections: usize,
    /// A client must reach the transmission phase within this time.
    pub handshake_timeout: Duration,
    /// On shutdown, connections get this long to finish their in-flight requests.
    pub shutdown_grace: Duration,
    /// TCP keepalive idle time, so connections of clients that vanished (host crashed, network
    /// cut) are noticed and their views released; `None` disables keepalive.
    pub keepalive: Option<Duration>,
}

impl Default for NbdConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            max_in_flight_bytes: 128 << 20,
            max_request: 32 << 20,
            min_block: 1,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            keepalive: Some(Duration::from_secs(60)),
        }
    }
}

/// Counters of an [`NbdServer`], updated lock-free; read them for metrics export.
#[derive(Debug, Default)]
pub struct NbdStats {
    /// Gauge: clients connected now (handshake or transmission).
    pub connections_active: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Transmission requests received (every command, errors included).
    pub requests: AtomicU64,
    /// Gauge: requests being served or waiting for their reply to be written.
    pub requests_in_flight: AtomicU64,
    /// Bytes returned by successful reads (holes included).
    pub bytes_read: AtomicU64,
    /// Bytes stored by successful writes and write-zeroes.
    pub bytes_written: AtomicU64,
    /// Error replies sent to clients (`EINVAL`, `EPERM`, `EIO`, ...).
    pub errors: AtomicU64,
    /// Connections closed because the client broke the protocol (bad magic, bad flags, ...).
    pub protocol_errors: AtomicU64,
}

/// A point-in-time copy of [`NbdStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NbdStatsSnapshot {
    pub connections_active: u64,
    pub connections_total: u64,
    pub requests: u64,
    pub requests_in_flight: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
    pub protocol_errors: u64,
}

impl NbdStats {
    /// Reads every counter (each atomically; the set is not one consistent cut).
    pub fn snapshot(&self) -> NbdStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NbdStatsSnapshot {
            connections_active: get(&self.connections_active),
            connections_total: get(&self.connections_total),
            requests: get(&self.requests),
            requests_in_flight: get(&self.requests_in_flight),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            errors: get(&self.errors),
            protocol_errors: get(&self.protocol_errors),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Counts a connection in `connections_active` for as long as it lives.
struct ConnectionGauge(Arc<NbdStats>);

impl ConnectionGauge {
    fn new(stats: Arc<NbdStats>) -> Self {
        NbdStats::add(&stats.connections_active, 1);
        NbdStats::add(&stats.connections_total, 1);
        Self(stats)
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The NBD server: serves every export of one [`ExportCatalog`] to any number of clients.
///
/// Export names travel in NBD URIs as the URI path: `nbd://HOST:PORT/m1/disk0@2026-11-22T10:05:00Z`
/// works as written with qemu and libnbd (`/`, `@` and `:` are legal in a URI path), and the
/// percent-encoded form (`m1%2Fdisk0%402026-11-22T10%3A05%3A00Z`) is decoded by both. Characters
/// outside RFC 3986 `pchar` (space, `?`, `#`, `%`, ...) must be percent-encoded.
///
/// TLS is not offered: `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_UNSUP` (NOTLS mode).
///
/// ```no_run
/// # use std::sync::Arc;
/// # async fn run(catalog: Arc<dyn lifeboat_fs::view::ExportCatalog>) -> std::io::Result<()> {
/// use lifeboat_fs::nbd::NbdServer;
/// let server = Arc::new(NbdServer::new(catalog));
/// let stats = server.stats(); // for /metrics
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:10809").await?;
/// server.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await;
/// # let _ = stats; Ok(()) }
/// ```
pub struct NbdServer {
    catalog: Arc<dyn ExportCatalog>,
    config: NbdConfig,
    stats: Arc<NbdStats>,
}

impl NbdServer {
    /// A server with the default [`NbdConfig`].
    pub fn new(catalog: Arc<dyn ExportCatalog>) -> Self {
        Self::with_config(catalog, NbdConfig::default())
    }

    /// A server with explicit tunables (out-of-range values are clamped to sane ones).
    pub fn with_config(catalog: Arc<dyn ExportCatalog>, mut config: NbdConfig) -> Self {
        config.max_request = config.max_request.clamp(4096, 1 << 30);
        config.min_block = if config.min_block >= 512 { 512 } else { 1 };
        config.max_in_flight = config.max_in_flight.clamp(1, 4096);
        config.max_in_flight_bytes = config.max_in_flight_bytes.max(config.max_request as usize);
        config.max_connections = config.max_connections.max(1);
        Self {
            catalog,
            config,
            stats: Arc::new(NbdStats::default()),
        }
    }

    /// The live counters (shared; they keep counting after this call).
    pub fn stats(&self) -> Arc<NbdStats> {
        self.stats.clone()
    }

    /// The tunables in force.
    pub fn config(&self) -> &NbdConfig {
        &self.config
    }

    /// Accepts clients on `listener` until `shutdown` completes; then stops accepting, lets open
    /// connections finish their in-flight requests (up to `shutdown_grace`), closes them and
    /// returns.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let local = listener.local_addr().ok();
        info!(addr = ?local, "NBD server listening");
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if connections.len() >= self.config.max_connections {
                            warn!(%peer, limit = self.config.max_connections, "NBD connection refused: too many clients");
                            drop(stream);
                            continue;
                        }
                        let server = self.clone();
                        let stop = stop_rx.clone();
                        connections.spawn(
                            async move { server.serve_tcp(stream, stop).await }
                                .instrument(info_span!("nbd", %peer)),
                        );
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "NBD accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        let _ = stop_tx.send(true);
        let open = connections.len();
        if open > 0 {
            info!(open, "NBD server stopping: waiting for open connections");
        }
        let drained = tokio::time::timeout(self.config.shutdown_grace, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                left = connections.len(),
                "NBD connections still busy after the grace period: closing them"
            );
            connections.shutdown().await;
        }
        info!(addr = ?local, "NBD server stopped");
    }

    async fn serve_tcp(self: Arc<Self>, stream: TcpStream, stop: watch::Receiver<bool>) {
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "TCP_NODELAY failed");
        }
        if let Some(idle) = self.config.keepalive {
            let params = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(Duration::from_secs(10));
            if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&params) {
                debug!(error = %e, "TCP keepalive failed");
            }
        }
        let (r, w) = stream.into_split();
        self.run_connection(r, w, stop).await;
    }

    /// Serves one already-connected client over any byte stream (a Unix socket, a TLS stream, a
    /// test pipe) until it disconnects. Returns when the connection is finished.
    pub async fn serve_stream<S>(self: Arc<Self>, stream: S, peer: &str)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        let (_tx, rx) = watch::channel(false);
        let span = info_span!("nbd", peer);
        self.run_connection(r, w, rx).instrument(span).await;
    }

    /// One client, start to end; runs inside a span that names the peer.
    async fn run_connection<R, W>(self: Arc<Self>, r: R, mut w: W, mut stop: watch::Receiver<bool>)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let _gauge = ConnectionGauge::new(self.stats.clone());
        debug!("NBD client connected");
        let mut reader = BufReader::with_capacity(64 << 10, r);
        let negotiated = tokio::time::timeout(
            self.config.handshake_timeout,
            handshake::negotiate(&self, &mut reader, &mut w, &mut stop),
        )
        .await;
        let session = match negotiated {
            Err(_) => {
                info!("NBD handshake timed out");
                return;
            }
            Ok(Ok(Some(session))) => session,
            Ok(Ok(None)) => {
                debug!("NBD client left during the handshake");
                return;
            }
            Ok(Err(e)) => {
                self.note_connection_error("handshake", &e);
                return;
            }
        };
        info!(export = %session.name, size = session.size, writable = session.writable,
              structured = session.structured, "NBD export opened");
        let export = session.name.clone();
        match transmission::run(self.clone(), reader, w, session, stop).await {
            Ok(()) => info!(%export, "NBD client disconnected"),
            Err(e) => self.note_connection_error(&format!("transmission of {export}"), &e),
        }
    }

    fn note_connection_error(&self, phase: &str, e: &io::Error) {
        if e.kind() == io::ErrorKind::InvalidData {
            NbdStats::add(&self.stats.protocol_errors, 1);
            warn!(phase, error = %e, "NBD client broke the protocol: connection closed");
        } else {
            info!(phase, error = %e, "NBD connection ended");
        }
    }

    async fn open(&self, name: &str) -> io::Result<Arc<dyn DiskView>> {
        self.catalog.open(name).await
    }
}

/// A protocol violation: the connection is closed (counted in `protocol_errors`).
fn violation(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Resolves once the server has been asked to stop (never, if the sender is gone unsent).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
