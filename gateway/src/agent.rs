//! The mobility agent's client side: registers with the process server, then replicates disks.
//! A sync reads each disk once, hashes it in 64 KiB blocks, compares with the replica's checksums
//! and sends only the blocks that differ (the first sync of a disk sends every non-zero block),
//! as batches of up to 8 MiB with several in flight. A batch is retried under the same id until
//! acked, so it is never lost and never committed twice.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use rand::RngCore;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::journal::{Ack, BLOCK_SIZE};
use crate::protocol::{encode_batch, IngestRecord};
use crate::server::{BookmarkRequest, DiskRequest, DiskResponse, ErrorBody, RegisterRequest, RegisterResponse};

use crate::disk_scan::{ScanJob, ScannedBody};
pub use crate::disk_scan::{BATCH_BYTES, EXTENT_BYTES};
/// Batches in flight at once (each being sent, or committed by the server). Six kept both cores
/// busier than four when batches were compressed in flight (1 GiB syncs, alternating runs: 1.43 s
/// against 1.55 s). The scan workers compress now; six has not been measured against four since.
pub const IN_FLIGHT: usize = 6;
/// Scan workers at most. There are two per core up to this, so that while one waits for the
/// disk another computes: each reads, hashes and compresses.
const MAX_SCAN_WORKERS: usize = 8;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("registration refused: wrong passphrase")]
    WrongPassphrase,
    #[error("cannot reach the process server at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the process server's certificate is not trusted (check --ca): {0}")]
    Untrusted(String),
    #[error("the process server refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("disk {name} ({path}): {source}")]
    Disk {
        name: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid CA certificate {0}")]
    BadCa(String),
    #[error("gave up after {0:?} of failed retries: {1}")]
    GaveUp(Duration, String),
}

/// Where and as whom the agent talks to the process server.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub server: String,
    pub ca_pem: Option<Vec<u8>>,
    pub passphrase: String,
    pub machine: String,
    /// How long transient failures (server restarting, network) are retried before giving up.
    pub retry_for: Duration,
    /// Whether block data is compressed here (zstd, as packed writes) rather than by the
    /// process server: less to send and to cache, at the cost of this machine's CPU.
    pub compress: bool,
}

/// One disk to replicate.
#[derive(Clone, Debug)]
pub struct DiskSpec {
    pub name: String,
    pub path: PathBuf,
}

/// Per-disk outcome of a sync.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DiskSummary {
    pub disk: String,
    pub size: u64,
    pub bytes_scanned: u64,
    /// Block data sent, as on the disk.
    pub bytes_sent: u64,
    /// Batch bytes that crossed the network for it (compressed, with framing).
    #[serde(default)]
    pub wire_bytes: u64,
    pub blocks_changed: u64,
    pub blocks_zeroed: u64,
    /// Highest sequence number acked for this disk (0 if nothing was sent).
    pub last_seq: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SyncSummary {
    pub machine: String,
    pub disks: Vec<DiskSummary>,
    pub bytes_scanned: u64,
    pub bytes_sent: u64,
    #[serde(default)]
    pub wire_bytes: u64,
    pub seconds: f64,
}

/// A registered session with the process server.
pub struct Agent {
    cfg: AgentConfig,
    http: reqwest::Client,
    token: String,
    session: u64,
    next_batch: std::sync::atomic::AtomicU64,
}

fn describe(e: &reqwest::Error, url: &str) -> AgentError {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    let mut deepest = e.to_string();
    while let Some(s) = source {
        if let Some(tls) = s.downcast_ref::<rustls::Error>() {
            return AgentError::Untrusted(tls.to_string());
        }
        let text = s.to_string();
        if text.contains("certificate") || text.contains("UnknownIssuer") {
            return AgentError::Untrusted(text);
        }
        deepest = text;
        source = s.source();
    }
    AgentError::Unreachable {
        url: url.to_owned(),
        reason: deepest,
    }
}

async fn refused(resp: reqwest::Response) -> AgentError {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let message = serde_json::from_str::<ErrorBody>(&text)
        .map(|b| b.error)
        .unwrap_or(text);
    AgentError::Refused { status, message }
}

impl Agent {
    /// Registers with the process server and returns a session. When the config server has
    /// assigned the machine to another (scale-out) process server, the answer names it and its
    /// certificate, and the agent registers there instead (one hop).
    pub async fn connect(mut cfg: AgentConfig) -> Result<Self, AgentError> {
        let (http, reg) = Self::register(&cfg).await?;
        let (http, reg) = match reg.redirect {
            None => (http, reg),
            Some(r) => {
                tracing::info!(process_server = %r.process_server, address = %r.address,
                    "this machine is assigned to another process server: registering there");
                cfg.server = format!("https://{}", r.address);
                cfg.ca_pem = Some(r.certificate_pem.into_bytes());
                let (http, reg) = Self::register(&cfg).await?;
                if reg.redirect.is_some() {
                    return Err(AgentError::Refused {
                        status: 508,
                        message: format!("process server {} redirected the agent again", r.process_server),
                    });
                }
                (http, reg)
            }
        };
        let mut raw = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut raw);
        Ok(Self {
            cfg,
            http,
            token: reg.token,
            session: u64::from_be_bytes(raw),
            next_batch: 1.into(),
        })
    }

    /// The process server this session replicates to (after any redirect).
    pub fn server(&self) -> &str {
        &self.cfg.server
    }

    async fn register(cfg: &AgentConfig) -> Result<(reqwest::Client, RegisterResponse), AgentError> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .pool_max_idle_per_host(IN_FLIGHT * 2)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120));
        if let Some(pem) = &cfg.ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem).map_err(|e| AgentError::BadCa(e.to_string()))? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| AgentError::BadCa(e.to_string()))?;
        let url = format!("{}/v1/register", cfg.server.trim_end_matches('/'));
        let req = RegisterRequest {
            machine: cfg.machine.clone(),
            passphrase: cfg.passphrase.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        };
        let resp = http
            .post(&url)
            .json(&req)
            .send()
            .await
            .map_err(|e| describe(&e, &cfg.server))?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(AgentError::WrongPassphrase);
        }
        if !resp.status().is_success() {
            return Err(refused(resp).await);
        }
        let reg: RegisterResponse = resp.json().await.map_err(|e| describe(&e, &cfg.server))?;
        Ok((http, reg))
    }

    fn url(&self, tail: &str) -> String {
        format!(
            "{}/v1/machines/{}/{tail}",
            self.cfg.server.trim_end_matches('/'),
            self.cfg.machine
        )
    }

    /// Sends a request built by `make`, retrying transient failures (transport errors, 5xx,
    /// 503 with Retry-After) until `retry_for` passes without success.
    async fn send_retrying(&self, make: impl Fn() -> reqwest::RequestBuilder) -> Result<reqwest::Response, AgentError> {
        let started = Instant::now();
        let mut wait = Duration::from_millis(200);
        loop {
            let last_error = match make().bearer_auth(&self.token).send().await {
                Ok(r) if r.status().is_success() => return Ok(r),
                Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => {
                    // Backpressure: the cache is full. Wait as told and never give up on it.
                    let secs = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(1u64);
                    let e = refused(r).await;
                    tracing::debug!(error = %e, "held back by the process server");
                    tokio::time::sleep(Duration::from_secs(secs.clamp(1, 30))).await;
                    continue;
                }
                Ok(r) if r.status().is_server_error() => refused(r).await,
                Ok(r) => return Err(refused(r).await),
                Err(e) => match describe(&e, &self.cfg.server) {
                    AgentError::Untrusted(m) => return Err(AgentError::Untrusted(m)),
                    other => other,
                },
            };
            if started.elapsed() > self.cfg.retry_for {
                return Err(AgentError::GaveUp(self.cfg.retry_for, last_error.to_string()));
            }
            tracing::warn!(error = %last_error, retry_in = ?wait, "request failed; retrying");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    /// Sends one batch and returns its ack (retrying as needed under the same batch id).
    pub async fn send_batch(&self, records: &[IngestRecord]) -> Result<Ack, AgentError> {
        self.send_body(&encode_batch(records)).await
    }

    /// Sends one encoded batch body (see [`BatchBuilder`]) and returns its ack.
    pub async fn send_body(&self, body: &Bytes) -> Result<Ack, AgentError> {
        let batch = self.next_batch.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let url = self.url("batches");
        let resp = self
            .send_retrying(|| {
                self.http
                    .post(&url)
                    .header("x-lifeboat-session", format!("{:x}", self.session))
                    .header("x-lifeboat-batch", format!("{batch:x}"))
                    .header("content-type", "application/octet-stream")
                    .body(body.clone())
            })
            .await?;
        resp.json().await.map_err(|e| describe(&e, &self.cfg.server))
    }

    /// Appends an app-consistent bookmark to the machine's stream; returns the ack with the point id.
    pub async fn bookmark(&self, label: &str) -> Result<Ack, AgentError> {
        self.answer_bookmark(label, None).await
    }

    /// Sends a bookmark, answering the server's request `request` when given. A replication
    /// group's member waits here until every member has sent its own (the group barrier).
    pub async fn answer_bookmark(&self, label: &str, request: Option<u64>) -> Result<Ack, AgentError> {
        let url = self.url("bookmarks");
        let req = BookmarkRequest {
            label: label.to_owned(),
            request,
        };
        let resp = self.send_retrying(|| self.http.post(&url).json(&req)).await?;
        resp.json().await.map_err(|e| describe(&e, &self.cfg.server))
    }

    /// Tells the appliance that this machine must resynchronise (`required`, with a reason) or
    /// that a full comparison sync finished (`done`).
    pub async fn report_resync(&self, status: &str, reason: &str) -> Result<(), AgentError> {
        let url = self.url("resync");
        let req = crate::server::ResyncReport {
            status: status.to_owned(),
            reason: reason.to_owned(),
        };
        self.send_retrying(|| self.http.post(&url).json(&req)).await?;
        Ok(())
    }

    /// What the server asks of this agent now (a scheduled app-consistent bookmark).
    pub async fn requests(&self) -> Result<crate::consistency::AgentRequests, AgentError> {
        let url = self.url("requests");
        let resp = self.send_retrying(|| self.http.get(&url)).await?;
        resp.json().await.map_err(|e| describe(&e, &self.cfg.server))
    }

    /// Registers a disk of `size` bytes with the process server (again: no change).
    pub async fn register_disk(&self, disk: &str, size: u64) -> Result<DiskResponse, AgentError> {
        let url = self.url(&format!("disks/{disk}"));
        let req = DiskRequest { size };
        let resp = self.send_retrying(|| self.http.put(&url).json(&req)).await?;
        resp.json().await.map_err(|e| describe(&e, &self.cfg.server))
    }

    async fn replica_checksums(&self, disk: &str) -> Result<Vec<u8>, AgentError> {
        let url = self.url(&format!("disks/{disk}/checksums"));
        let resp = self.send_retrying(|| self.http.get(&url)).await?;
        Ok(resp.bytes().await.map_err(|e| describe(&e, &self.cfg.server))?.to_vec())
    }

    /// Replicates `disks`; `progress` is told how many bytes were scanned.
    pub async fn sync(
        &self,
        disks: &[DiskSpec],
        progress: Arc<dyn Fn(u64) + Send + Sync>,
    ) -> Result<SyncSummary, AgentError> {
        let started = Instant::now();
        let mut summary = SyncSummary {
            machine: self.cfg.machine.clone(),
            ..Default::default()
        };
        for spec in disks {
            let d = self.sync_disk(spec, progress.clone()).await?;
            summary.bytes_scanned += d.bytes_scanned;
            summary.bytes_sent += d.bytes_sent;
            summary.wire_bytes += d.wire_bytes;
            summary.disks.push(d);
        }
        summary.seconds = started.elapsed().as_secs_f64();
        Ok(summary)
    }

    async fn sync_disk(
        &self,
        spec: &DiskSpec,
        progress: Arc<dyn Fn(u64) + Send + Sync>,
    ) -> Result<DiskSummary, AgentError> {
        let disk_err = |source| AgentError::Disk {
            name: spec.name.clone(),
            path: spec.path.display().to_string(),
            source,
        };
        let mut file = File::open(&spec.path).map_err(disk_err)?;
        let size = file.seek(SeekFrom::End(0)).map_err(disk_err)?;
        file.seek(SeekFrom::Start(0)).map_err(disk_err)?;
        if size == 0 {
            return Err(disk_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "disk is empty",
            )));
        }
        self.register_disk(&spec.name, size).await?;
        let replica = self.replica_checksums(&spec.name).await?;
        let expected = size.div_ceil(BLOCK_SIZE) as usize * 16;
        if replica.len() != expected {
            return Err(AgentError::Refused {
                status: 200,
                message: format!("checksum map of {} bytes, expected {expected}", replica.len()),
            });
        }
        // Scan workers read, diff and pack stripes of the disk on their own threads; bodies flow
        // back over a bounded channel, so at most one waits per worker while IN_FLIGHT are sent.
        let workers = (2 * std::thread::available_parallelism().map_or(1, |n| n.get())).min(MAX_SCAN_WORKERS);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<ScannedBody>(1);
        // Acked bodies' memory goes back to the workers to be filled again: no fresh pages per
        // batch.
        let (spare_tx, spare_rx) = crossbeam_channel::bounded::<bytes::BytesMut>(IN_FLIGHT + 2 * workers);
        let job = ScanJob {
            file,
            // Pieces not in the page cache are read directly (where the disk allows): no copy
            // through the cache, and the protected machine's own cached data is not evicted.
            direct: crate::direct_io::open_direct(&spec.path),
            size,
            disk: spec.name.clone(),
            replica,
            compress: self.cfg.compress,
        };
        let path = spec.path.display().to_string();
        let scanner = tokio::task::spawn_blocking(move || {
            crate::disk_scan::scan(&job, workers, &tx, &spare_rx, &*progress).map_err(|e| (path, e))
        });
        let mut summary = DiskSummary {
            disk: spec.name.clone(),
            size,
            ..Default::default()
        };
        let mut in_flight = FuturesUnordered::new();
        let mut channel_open = true;
        loop {
            tokio::select! {
                msg = rx.recv(), if channel_open && in_flight.len() < IN_FLIGHT => match msg {
                    Some(scanned) => {
                        summary.bytes_sent += scanned.data;
                        summary.blocks_changed += scanned.changed;
                        summary.blocks_zeroed += scanned.zeroed;
                        let body = scanned.body;
                        in_flight.push(async move { (self.send_body(&body).await, body) });
                    }
                    None => channel_open = false,
                },
                Some((ack, body)) = in_flight.next(), if !in_flight.is_empty() => {
                    let ack = ack?;
                    summary.wire_bytes += body.len() as u64;
                    if let Ok(mut memory) = body.try_into_mut() {
                        // Emptied first, so that turning it into a Vec moves nothing.
                        memory.clear();
                        let _ = spare_tx.try_send(memory);
                    }
                    if let Some(seq) = ack.seqs.get(&spec.name) {
                        summary.last_seq = summary.last_seq.max(*seq);
                    }
                },
                else => break,
            }
        }
        let scanned = scanner
            .await
            .expect("scan task")
            .map_err(|(path, source)| AgentError::Disk {
                name: spec.name.clone(),
                path,
                source,
            })?;
        summary.bytes_scanned = scanned;
        Ok(summary)
    }
}
