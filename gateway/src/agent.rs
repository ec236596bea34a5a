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

use crate::journal::{block_checksum, Ack, BLOCK_SIZE};
use crate::protocol::{encode_batch, BatchBuilder, IngestRecord};
use crate::server::{BookmarkRequest, DiskRequest, DiskResponse, ErrorBody, RegisterRequest, RegisterResponse};

/// Most bytes of block data in one batch.
pub const BATCH_BYTES: usize = 8 << 20;
/// Longest extent in one record.
pub const EXTENT_BYTES: u64 = 1 << 20;
/// Batches in flight at once (each being compressed, sent, or committed by the server): six
/// kept both cores busier than four (1 GiB syncs, alternating runs: 1.43 s against 1.55 s).
pub const IN_FLIGHT: usize = 6;
const READ_BYTES: usize = 4 << 20;

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
    #[error("could not pack a batch for sending: {0}")]
    Pack(#[from] crate::protocol::FrameError),
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
        // A blocking thread reads and diffs the disk; batches flow back over a bounded channel.
        // One body waits while IN_FLIGHT are sent: the scanner keeps the senders fed, and the
        // bodies alive at once (each faulted in once, then reused) stay few.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Bytes, u64, u64, u64)>(1);
        // Acked bodies go back to the scanner to be filled again: no fresh pages per batch.
        let (free_tx, free_rx) = crossbeam_channel::bounded::<bytes::BytesMut>(IN_FLIGHT + 2);
        let name = spec.name.clone();
        let path = spec.path.display().to_string();
        // Chunks not in the page cache are read directly (where the disk allows): no copy
        // through the cache, and the protected machine's own cached data is not evicted.
        let direct = crate::direct_io::open_direct(&spec.path);
        // Bodies that are packed before sending need no CRCs of their own.
        let checksums = !self.cfg.compress;
        let scanner = tokio::task::spawn_blocking(move || {
            scan_disk(file, direct, size, &name, &replica, checksums, tx, free_rx, progress).map_err(|e| (path, e))
        });
        let mut summary = DiskSummary {
            disk: spec.name.clone(),
            size,
            ..Default::default()
        };
        let mut in_flight = FuturesUnordered::new();
        let mut channel_open = true;
        // Packed bodies' memory, back from acked batches, to pack the next ones into.
        let mut spare_packed: Vec<Vec<u8>> = Vec::new();
        let compress = self.cfg.compress;
        loop {
            tokio::select! {
                msg = rx.recv(), if channel_open && in_flight.len() < IN_FLIGHT => match msg {
                    Some((body, sent, changed, zeroed)) => {
                        summary.bytes_sent += sent;
                        summary.blocks_changed += changed;
                        summary.blocks_zeroed += zeroed;
                        let spare = spare_packed.pop().unwrap_or_default();
                        let free_tx = free_tx.clone();
                        in_flight.push(async move {
                            // Compressed on a blocking thread, so the batches in flight pack
                            // in parallel; the raw body goes back to the scanner at once.
                            let body = if compress {
                                tokio::task::spawn_blocking(move || {
                                    let packed = crate::protocol::pack_batch(&body, spare);
                                    if let Ok(buf) = body.try_into_mut() {
                                        let _ = free_tx.try_send(buf);
                                    }
                                    packed
                                })
                                .await
                                .expect("packing task")
                                .map_err(AgentError::from)
                            } else {
                                Ok(body)
                            };
                            match body {
                                Ok(body) => (self.send_body(&body).await, body),
                                Err(e) => (Err(e), Bytes::new()),
                            }
                        });
                    }
                    None => channel_open = false,
                },
                Some((ack, body)) = in_flight.next(), if !in_flight.is_empty() => {
                    let ack = ack?;
                    summary.wire_bytes += body.len() as u64;
                    if let Ok(buf) = body.try_into_mut() {
                        if compress {
                            spare_packed.push(buf.into());
                        } else {
                            let _ = free_tx.try_send(buf);
                        }
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

/// Reads the disk, diffs it against `replica` checksums, and sends batch bodies with
/// `(body, data bytes, changed blocks, zeroed blocks)`. Changed blocks are copied once, from the
/// read buffer straight into the body, with the checksums computed for the diff. Returns bytes
/// scanned. With `checksums` false the bodies carry no CRCs (see
/// [`BatchBuilder::without_checksums`]): they are packed before they are sent.
#[allow(clippy::too_many_arguments)]
fn scan_disk(
    file: File,
    direct: Option<File>,
    size: u64,
    disk: &str,
    replica: &[u8],
    checksums: bool,
    tx: tokio::sync::mpsc::Sender<(Bytes, u64, u64, u64)>,
    free: crossbeam_channel::Receiver<bytes::BytesMut>,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
) -> std::io::Result<u64> {
    // Room for a full batch plus one extent and the record framing, so the body never regrows.
    let capacity = BATCH_BYTES + EXTENT_BYTES as usize + (64 << 10);
    let builder = |b: BatchBuilder| if checksums { b } else { b.without_checksums() };
    let mut batch = builder(BatchBuilder::new(capacity));
    let mut batch_bytes = 0usize;
    let (mut changed, mut zeroed) = (0u64, 0u64);
    // The zero range being built: (start, len).
    let mut zero_run: Option<(u64, u64)> = None;
    let flush = |batch: &mut BatchBuilder, batch_bytes: &mut usize, changed: &mut u64, zeroed: &mut u64| -> bool {
        if batch.is_empty() {
            return true;
        }
        let next = match free.try_recv() {
            Ok(buf) if buf.capacity() >= capacity => builder(BatchBuilder::with_buffer(buf)),
            _ => builder(BatchBuilder::new(capacity)),
        };
        let body = std::mem::replace(batch, next).finish();
        let msg = (body, *batch_bytes as u64, *changed, *zeroed);
        *batch_bytes = 0;
        *changed = 0;
        *zeroed = 0;
        tx.blocking_send(msg).is_ok()
    };
    let reader = crate::disk_read::DiskReader::start(file, direct, size, READ_BYTES);
    while let Some(chunk) = reader.next() {
        let chunk = chunk?;
        let pos = chunk.pos;
        let data = chunk.buf.data();
        let want = data.len();
        for (i, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
            let off = pos + (i as u64) * BLOCK_SIZE;
            let index = (off / BLOCK_SIZE) as usize;
            let theirs = &replica[index * 16..index * 16 + 16];
            let replica_zero = crate::journal::is_zero(theirs);
            let is_zero = crate::journal::is_zero(block);
            let (differs, sum) = if is_zero {
                (!replica_zero, None)
            } else {
                let sum = block_checksum(block);
                (sum != theirs, Some(sum))
            };
            // Close runs that this block does not continue.
            let continues_write =
                differs && !is_zero && batch.open_write_ends_at(off) && (batch.open_write_len() as u64) < EXTENT_BYTES;
            if !continues_write {
                batch.close_write();
            }
            let continues_zero =
                differs && is_zero && zero_run.is_some_and(|(s, l)| s + l == off && l < (u32::MAX as u64 / 2));
            if !continues_zero {
                if let Some((s, l)) = zero_run.take() {
                    batch.zero(disk, s, l as u32);
                }
            }
            if differs {
                match sum {
                    None => {
                        zeroed += 1;
                        match &mut zero_run {
                            Some((_, l)) => *l += block.len() as u64,
                            None => zero_run = Some((off, block.len() as u64)),
                        }
                    }
                    Some(sum) => {
                        changed += 1;
                        if !continues_write {
                            batch.begin_write(disk, off);
                        }
                        batch.push_block(block, &sum);
                        batch_bytes += block.len();
                    }
                }
            }
            if (batch_bytes >= BATCH_BYTES || batch.records() >= 4096)
                && !flush(&mut batch, &mut batch_bytes, &mut changed, &mut zeroed)
            {
                return Err(std::io::Error::other("sync cancelled"));
            }
        }
        progress(want as u64);
        reader.recycle(chunk.buf);
    }
    if let Some((s, l)) = zero_run.take() {
        batch.zero(disk, s, l as u32);
    }
    if !flush(&mut batch, &mut batch_bytes, &mut changed, &mut zeroed) {
        return Err(std::io::Error::other("sync cancelled"));
    }
    Ok(size)
}
