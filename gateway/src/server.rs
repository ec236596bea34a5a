//! The process server's ingest API (HTTPS, replication port). Agents register with the
//! appliance passphrase and get a bearer token; with it they register disks, fetch the replica's
//! block checksums, and stream batches, which are acked once durable in the journal.
//!
//! | method | path | body → answer |
//! |---|---|---|
//! | POST | `/v1/register` | `{machine, passphrase}` → `{token}`; 401 on a wrong passphrase |
//! | PUT | `/v1/machines/M/disks/D` | `{size}` → disk record |
//! | GET | `/v1/machines/M/disks/D/checksums` | → 16 bytes per 64 KiB block, zeros = zero block |
//! | POST | `/v1/machines/M/batches` | batch body (see `protocol`), headers `x-lifeboat-session`, `x-lifeboat-batch` → ack |
//! | POST | `/v1/machines/M/bookmarks` | `{label}` → ack with the point id |
//!
//! A full cache holds a batch for a few seconds waiting for space, then answers 503 with
//! `Retry-After`; the agent resends the same batch id, and a batch is never committed twice.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};

use crate::blob;
use crate::crypto::{Key, WrappedKey};
use crate::journal::{self, Journal, JournalError};
use crate::metrics::GatewayMetrics;
use crate::protocol::{self, MAX_BATCH_BYTES};
use crate::uploader::BlobStore;

/// Shared state of the ingest API.
pub struct IngestState {
    pub journal: Journal,
    pub blob: BlobStore,
    pub kek: Key,
    pub passphrase: String,
    pub metrics: GatewayMetrics,
    /// Bookmark requests and group barriers.
    pub coordinator: Arc<crate::consistency::Coordinator>,
    /// Scale-out process servers and machine assignments (kept by the config server).
    pub process_servers: crate::process_servers::ProcessServers,
    tokens: Mutex<HashMap<[u8; 32], String>>,
    disk_setup: Mutex<()>,
    /// Machine → (last request, when that was last written to RocksDB), in ms.
    seen: std::sync::Mutex<HashMap<String, (u64, u64)>>,
    /// Disks whose journal was checked against blob storage's log since this process started.
    log_checked: Mutex<std::collections::HashSet<(String, String)>>,
    /// Batch body buffers, back from the journal's hot tail once their records are uploaded.
    bodies: Arc<crate::pool::Pool<Vec<u8>>>,
}

/// Idle batch bodies kept for reuse (8 MiB each from current agents).
const IDLE_BODIES: usize = 2;

/// A registered agent, as the management API lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentInfo {
    pub machine: String,
    pub version: String,
    pub registered_ms: u64,
    /// Last authenticated request (kept durably at most a minute behind).
    pub last_seen_ms: u64,
}

fn agent_key(machine: &str) -> Vec<u8> {
    format!("agent/{machine}").into_bytes()
}

/// How often an agent's last-seen time is written down.
const SEEN_PERSIST_MS: u64 = 60_000;

impl IngestState {
    pub fn new(
        journal: Journal,
        blob: BlobStore,
        kek: Key,
        passphrase: String,
        metrics: GatewayMetrics,
        coordinator: Arc<crate::consistency::Coordinator>,
    ) -> Arc<Self> {
        Arc::new(Self {
            process_servers: crate::process_servers::ProcessServers::new(journal.db().clone()),
            journal,
            blob,
            kek,
            passphrase,
            metrics,
            coordinator,
            tokens: Mutex::new(HashMap::new()),
            disk_setup: Mutex::new(()),
            seen: std::sync::Mutex::new(HashMap::new()),
            log_checked: Mutex::new(std::collections::HashSet::new()),
            bodies: crate::pool::Pool::new(IDLE_BODIES),
        })
    }

    fn put_agent(&self, info: &AgentInfo) -> Result<(), JournalError> {
        let db = self.journal.db();
        let meta = db.cf_handle(journal::CF_META).expect("meta cf");
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        db.put_cf_opt(
            meta,
            agent_key(&info.machine),
            serde_json::to_vec(info).expect("json"),
            &wo,
        )?;
        Ok(())
    }

    /// Registered agents with their last-seen times (blocking read).
    pub fn agents(&self) -> Result<Vec<AgentInfo>, JournalError> {
        let db = self.journal.db();
        let meta = db.cf_handle(journal::CF_META).expect("meta cf");
        let seen = self.seen.lock().expect("lock").clone();
        let mut out = Vec::new();
        for item in db.prefix_iterator_cf(meta, b"agent/") {
            let (k, v) = item?;
            if !k.starts_with(b"agent/") {
                break;
            }
            let mut a: AgentInfo =
                serde_json::from_slice(&v).map_err(|e| JournalError::Corrupt(format!("agent record: {e}")))?;
            if let Some((t, _)) = seen.get(&a.machine) {
                a.last_seen_ms = a.last_seen_ms.max(*t);
            }
            out.push(a);
        }
        Ok(out)
    }

    /// Notes a request of `machine`'s agent; writes it down at most once a minute.
    fn saw(self: &Arc<Self>, machine: &str) {
        let now = journal::now_ms();
        let persist = {
            let mut seen = self.seen.lock().expect("lock");
            let e = seen.entry(machine.to_owned()).or_insert((now, 0));
            e.0 = now;
            let due = now.saturating_sub(e.1) >= SEEN_PERSIST_MS;
            if due {
                e.1 = now;
            }
            due
        };
        if persist {
            let me = self.clone();
            let m = machine.to_owned();
            tokio::task::spawn_blocking(move || {
                let db = me.journal.db();
                let meta = db.cf_handle(journal::CF_META).expect("meta cf");
                if let Ok(Some(v)) = db.get_cf(meta, agent_key(&m)) {
                    if let Ok(mut a) = serde_json::from_slice::<AgentInfo>(&v) {
                        a.last_seen_ms = now;
                        let _ = me.put_agent(&a);
                    }
                }
            });
        }
    }
}

/// An API error: a status and one clear sentence.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    retry_after: Option<u64>,
}

#[derive(Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(ErrorBody { error: self.message })).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert("retry-after", HeaderValue::from(s));
        }
        r
    }
}

impl From<JournalError> for ApiError {
    fn from(e: JournalError) -> Self {
        let status = match &e {
            JournalError::CacheFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
            JournalError::UnknownDisk { .. } => StatusCode::NOT_FOUND,
            JournalError::OutOfRange { .. } => StatusCode::BAD_REQUEST,
            JournalError::Followed { .. } => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let retry_after = matches!(e, JournalError::CacheFull { .. }).then_some(1);
        Self {
            status,
            message: e.to_string(),
            retry_after,
        }
    }
}

/// Whether `name` is a valid machine or disk name (it becomes part of object paths).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn check_name(kind: &str, name: &str) -> Result<(), ApiError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid {kind} name {name:?}: use 1-64 letters, digits, '-', '_' or '.'"),
        ))
    }
}

pub fn router(state: Arc<IngestState>) -> Router {
    Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/v1/register", post(register))
        .route("/v1/machines/{machine}/disks/{disk}", put(register_disk))
        .route("/v1/machines/{machine}/disks/{disk}/checksums", get(checksums))
        .route("/v1/machines/{machine}/batches", post(batch))
        .route("/v1/machines/{machine}/bookmarks", post(bookmark))
        .route("/v1/machines/{machine}/requests", get(requests))
        .route("/v1/machines/{machine}/resync", post(agent_resync))
        .layer(DefaultBodyLimit::max(MAX_BATCH_BYTES))
        .layer(axum::middleware::from_fn(refuse_oversized))
        .with_state(state)
}

/// Answers 413 from the headers alone when the declared body is over the limit, so a client
/// sending one gets the answer at once instead of a reset after the server read 64 MiB.
async fn refuse_oversized(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > MAX_BATCH_BYTES as u64 => {
            let mut r = ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body of {n} bytes is over the {MAX_BATCH_BYTES}-byte limit"),
            )
            .into_response();
            r.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            r
        }
        _ => next.run(req).await,
    }
}

#[derive(Serialize, Deserialize)]
pub struct RegisterRequest {
    pub machine: String,
    pub passphrase: String,
    #[serde(default)]
    pub agent_version: String,
}

#[derive(Serialize, Deserialize)]
pub struct RegisterResponse {
    pub machine: String,
    /// Empty when the agent is redirected.
    pub token: String,
    /// The machine is assigned to another process server: register there instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<crate::process_servers::Redirect>,
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Compare digests so the time does not depend on where the inputs differ, nor on length.
    let (da, db) = (blake3::hash(a), blake3::hash(b));
    da.as_bytes()
        .iter()
        .zip(db.as_bytes())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

async fn register(
    State(s): State<Arc<IngestState>>,
    Json(req): Json<RegisterRequest>,
) -> Result<Json<RegisterResponse>, ApiError> {
    check_name("machine", &req.machine)?;
    if !constant_time_eq(req.passphrase.as_bytes(), s.passphrase.as_bytes()) {
        s.metrics.ingest_rejected.with_label_values(&["unauthorized"]).inc();
        tracing::warn!(machine = %req.machine, "agent registration refused: wrong passphrase");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "registration refused: wrong passphrase",
        ));
    }
    let ps = s.process_servers.clone();
    let m = req.machine.clone();
    let redirect = tokio::task::spawn_blocking(move || ps.redirect_for(&m))
        .await
        .expect("assignment lookup")
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if let Some(redirect) = redirect {
        tracing::info!(machine = %req.machine, process_server = %redirect.process_server,
            address = %redirect.address, "agent sent to its assigned process server");
        return Ok(Json(RegisterResponse {
            machine: req.machine,
            token: String::new(),
            redirect: Some(redirect),
        }));
    }
    let mut raw = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut raw);
    let token = hex::encode(raw);
    let hash = *blake3::hash(token.as_bytes()).as_bytes();
    s.journal.add_token(hash, &req.machine).await?;
    s.tokens.lock().await.insert(hash, req.machine.clone());
    let now = journal::now_ms();
    let info = AgentInfo {
        machine: req.machine.clone(),
        version: req.agent_version.clone(),
        registered_ms: now,
        last_seen_ms: now,
    };
    let me = s.clone();
    tokio::task::spawn_blocking(move || me.put_agent(&info))
        .await
        .expect("agent record")?;
    tracing::info!(machine = %req.machine, agent_version = %req.agent_version, "agent registered");
    Ok(Json(RegisterResponse {
        machine: req.machine,
        token,
        redirect: None,
    }))
}

/// The token of an `Authorization: Bearer TOKEN` header, if there is one.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Checks the bearer token and that it belongs to `machine`.
async fn authorize(s: &Arc<IngestState>, headers: &HeaderMap, machine: &str) -> Result<(), ApiError> {
    let unauthorized = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or unknown agent token: register first",
        )
    };
    let token = bearer_token(headers).ok_or_else(unauthorized)?;
    let hash = *blake3::hash(token.as_bytes()).as_bytes();
    let cached = s.tokens.lock().await.get(&hash).cloned();
    let owner = match cached {
        Some(m) => m,
        None => {
            let j = s.journal.clone();
            let found = tokio::task::spawn_blocking(move || j.token_machine(&hash))
                .await
                .expect("token lookup")?;
            let m = found.ok_or_else(unauthorized)?;
            s.tokens.lock().await.insert(hash, m.clone());
            m
        }
    };
    if owner != machine {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("this token belongs to machine {owner:?}, not {machine:?}"),
        ));
    }
    s.saw(machine);
    Ok(())
}

#[derive(Serialize, Deserialize)]
pub struct DiskRequest {
    pub size: u64,
}

#[derive(Serialize, Deserialize)]
pub struct DiskResponse {
    pub machine: String,
    pub disk: String,
    pub size: u64,
    pub block_size: u64,
    pub next_seq: u64,
}

/// Blob-side description of a disk, for readers that start from blob storage alone.
#[derive(Serialize, Deserialize)]
pub struct DiskDescriptor {
    pub format: String,
    pub version: u32,
    pub machine: String,
    pub disk: String,
    pub size: u64,
}

async fn register_disk(
    State(s): State<Arc<IngestState>>,
    Path((machine, disk)): Path<(String, String)>,
    headers: HeaderMap,
    Json(req): Json<DiskRequest>,
) -> Result<Json<DiskResponse>, ApiError> {
    check_name("machine", &machine)?;
    check_name("disk", &disk)?;
    authorize(&s, &headers, &machine).await?;
    refuse_if_stopped(&s, &machine)?;
    if req.size == 0 {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "disk size must be positive"));
    }
    let _guard = s.disk_setup.lock().await;
    let store = s.blob.store.as_ref();
    let unavailable = |e: blob::BlobError| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("blob storage unavailable: {e}"),
        )
    };
    let existing = s.journal.disk(&machine, &disk);
    check_log_continuity(&s, &machine, &disk, existing.as_ref()).await?;
    if let Some(d) = existing.as_ref().filter(|d| d.size == req.size) {
        return Ok(Json(DiskResponse {
            machine,
            disk,
            size: d.size,
            block_size: journal::BLOCK_SIZE,
            next_seq: d.next_seq,
        }));
    }
    if let Some(d) = &existing {
        // A resized disk: blocks may have moved under the agent; compare everything again.
        let co = s.coordinator.clone();
        let (m, why) = (
            machine.clone(),
            format!("disk {disk} resized from {} to {} bytes", d.size, req.size),
        );
        tokio::task::spawn_blocking(move || co.require_resync(&m, &why))
            .await
            .expect("resync flag")?;
    }
    let key_id = match existing {
        Some(d) => d.key_id,
        None => {
            // A new data key generation: never reuse a key whose nonce counters we don't hold.
            let key_id = blob::max_key_id(store, &machine, &disk).await.map_err(unavailable)? + 1;
            let wrapped = WrappedKey::wrap(&s.kek, &Key::random(), &machine, &disk, key_id);
            blob::put_wrapped_key(store, &wrapped).await.map_err(unavailable)?;
            key_id
        }
    };
    let descriptor = DiskDescriptor {
        format: "lifeboat-disk".into(),
        version: 1,
        machine: machine.clone(),
        disk: disk.clone(),
        size: req.size,
    };
    let path = object_store::path::Path::from(format!("{}/disk.json", blob::layout::disk_prefix(&machine, &disk)));
    s.blob
        .put_durable(
            &path,
            Bytes::from(serde_json::to_vec_pretty(&descriptor).expect("json")),
        )
        .await
        .map_err(|e| unavailable(e.into()))?;
    let d = s.journal.register_disk(&machine, &disk, req.size, key_id).await?;
    Ok(Json(DiskResponse {
        machine,
        disk,
        size: d.size,
        block_size: journal::BLOCK_SIZE,
        next_seq: d.next_seq,
    }))
}

/// Sequence numbers (and segment names) of a disk's log must never be issued twice. Once per
/// disk per process start — always for a disk new to this journal — the highest sequence in
/// blob storage is compared with the journal's: when blob storage is ahead, another process
/// server wrote this disk's log (the machine was moved here) or this appliance's cache was lost
/// or restored from an older copy. That is a gap in the sequence: replication of the disk is
/// refused (409) until `lifeboat index rebuild` adopts the log from blob storage, and the machine
/// is marked resync-required so its next sync compares every block.
async fn check_log_continuity(
    s: &Arc<IngestState>,
    machine: &str,
    disk: &str,
    existing: Option<&journal::DiskMeta>,
) -> Result<(), ApiError> {
    // A disk another process server writes (the config server follows its log) was never
    // written here: its log is a gap like any other until `index rebuild` adopts it.
    let existing = existing.filter(|d| !d.is_followed());
    let key = (machine.to_owned(), disk.to_owned());
    if existing.is_some() && s.log_checked.lock().await.contains(&key) {
        return Ok(());
    }
    let store = s.blob.store.as_ref();
    let listed = async {
        let segments = crate::replay::list_segments(store, machine, disk)
            .await
            .map_err(|e| e.to_string())?;
        let base = blob::get_base_manifest(store, machine, disk)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(
            segments
                .iter()
                .map(|seg| seg.last_seq)
                .chain(base.map(|b| b.through_seq))
                .max()
                .unwrap_or(0),
        )
    };
    let blob_through = match (listed.await, existing) {
        (Ok(through), _) => through,
        // A known disk keeps replicating through a blob-store outage (the cache absorbs it);
        // the check runs again at its next registration.
        (Err(e), Some(_)) => {
            tracing::warn!(machine, disk, error = %e, "cannot check the log in blob storage now");
            return Ok(());
        }
        (Err(e), None) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("blob storage unavailable: {e}"),
            ))
        }
    };
    let journal_through = existing.map(|d| d.next_seq - 1).unwrap_or(0);
    if blob_through > journal_through {
        let why = match existing {
            None => format!(
                "blob storage already holds the log of {machine}/{disk} through sequence {blob_through}, \
                 which this process server never wrote (the machine replicated to another process \
                 server, or this appliance's cache was lost)"
            ),
            Some(_) => format!(
                "sequence gap on {machine}/{disk}: blob storage holds the log through sequence \
                 {blob_through} but this appliance's cache only through {journal_through} (was it \
                 restored from an older copy?)"
            ),
        };
        tracing::error!(machine, disk, blob_through, journal_through, "{why}");
        let co = s.coordinator.clone();
        let (m, reason) = (machine.to_owned(), why.clone());
        tokio::task::spawn_blocking(move || match co.resync_required(&m) {
            Some(_) => Ok(()), // flagged (and the event posted) at an earlier attempt
            None => co.require_resync(&m, &reason),
        })
        .await
        .expect("resync flag")?;
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{why}; stop the appliance and run `lifeboat index rebuild` to adopt that log, then sync again"),
        ));
    }
    s.log_checked.lock().await.insert(key);
    Ok(())
}

async fn checksums(
    State(s): State<Arc<IngestState>>,
    Path((machine, disk)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, &machine).await?;
    let d = s.journal.disk(&machine, &disk).ok_or_else(|| {
        ApiError::from(JournalError::UnknownDisk {
            machine: machine.clone(),
            disk: disk.clone(),
        })
    })?;
    let j = s.journal.clone();
    let sums = tokio::task::spawn_blocking(move || j.checksums(&d))
        .await
        .expect("checksums task")?;
    Ok(([("content-type", "application/octet-stream")], sums).into_response())
}

fn header_u64(headers: &HeaderMap, name: &str) -> Result<u64, ApiError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("missing or malformed {name} header (hex u64)"),
            )
        })
}

/// How long a batch waits for cache space before the server answers 503.
/// A failed-over machine's writes are refused until failback re-protects it.
fn refuse_if_stopped(s: &IngestState, machine: &str) -> Result<(), ApiError> {
    match s.coordinator.replication_stopped(machine) {
        Some(why) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("replication of {machine:?} is stopped ({why}); failback re-protects it"),
        )),
        None => Ok(()),
    }
}

const HOLD_WHEN_FULL: Duration = Duration::from_secs(5);

/// Reads a batch body into one buffer sized from its Content-Length, copying each frame as it
/// arrives. hyper can then reuse its read buffer for the next frame, where collecting the frames
/// first kept every one alive (and made hyper allocate fresh buffers for a whole batch) until a
/// final copy. The buffer comes from `pool` and returns there when the last record slicing it
/// is dropped. Runs after authorisation, so an unknown client never gets a body buffered.
async fn read_batch_body(
    body: axum::body::Body,
    headers: &HeaderMap,
    pool: &Arc<crate::pool::Pool<Vec<u8>>>,
) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is over the {MAX_BATCH_BYTES}-byte limit"),
        )
    };
    let mut buf = crate::pool::vec_with_room(pool, declared.min(MAX_BATCH_BYTES));
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("reading the batch body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > MAX_BATCH_BYTES {
                return Err(too_large());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(pool.share(buf))
}

async fn batch(
    State(s): State<Arc<IngestState>>,
    Path(machine): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<journal::Ack>, ApiError> {
    let started = Instant::now();
    authorize(&s, &headers, &machine).await?;
    refuse_if_stopped(&s, &machine)?;
    let session = header_u64(&headers, "x-lifeboat-session")?;
    let batch_no = header_u64(&headers, "x-lifeboat-batch")?;
    let body = read_batch_body(body, &headers, &s.bodies).await?;
    let j = s.journal.clone();
    let m = machine.clone();
    let prepared = tokio::task::spawn_blocking(move || -> Result<_, protocol::FrameError> {
        // Writes from current agents carry their blocks' checksums: no second hash here.
        let records = protocol::decode_batch_with_sums(body)?;
        Ok(records
            .into_iter()
            .map(|(r, sums, crc)| {
                let size = j.disk(&m, &r.disk).map(|d| d.size).unwrap_or(0);
                journal::prepare_with_sums(r, size, sums.as_deref()).with_payload_crc(crc)
            })
            .collect::<Vec<_>>())
    })
    .await
    .expect("decode task")
    .map_err(|e| {
        s.metrics.ingest_rejected.with_label_values(&["malformed"]).inc();
        tracing::warn!(machine = %machine, error = %e, "malformed batch refused");
        ApiError::new(StatusCode::BAD_REQUEST, format!("malformed batch: {e}"))
    })?;
    let per_disk: Vec<(String, u64, u64)> = prepared
        .iter()
        .map(|p| {
            // Block data as written to the disk: a packed write counts the bytes it holds.
            let cached = p.record.payload.len() as u64;
            let n = match p.record.kind {
                protocol::RecordKind::PackedWrite => u64::from(p.record.len),
                _ => cached,
            };
            (p.record.disk.clone(), n, cached)
        })
        .collect();
    let mut prepared = Some(prepared);
    let deadline = Instant::now() + HOLD_WHEN_FULL;
    let ack = loop {
        let freed = s.journal.state.freed.notified();
        // The journal only takes the records on success or a final error; keep a copy for a retry.
        let attempt = prepared.take().expect("records");
        let keep = attempt.clone();
        match s.journal.commit(&machine, session, batch_no, attempt).await {
            Ok(ack) => break ack,
            Err(JournalError::CacheFull { .. }) if Instant::now() < deadline => {
                s.metrics.note_held_back();
                prepared = Some(keep);
                let _ = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), freed).await;
            }
            Err(e) => {
                let reason = if matches!(e, JournalError::CacheFull { .. }) {
                    "cache_full"
                } else {
                    "refused"
                };
                s.metrics.ingest_rejected.with_label_values(&[reason]).inc();
                return Err(e.into());
            }
        }
    };
    s.metrics.cache_used_bytes.set(s.journal.cache_used() as i64);
    if !ack.duplicate {
        s.metrics.ingest_batches.inc();
        for (disk, n, cached) in per_disk {
            if !disk.is_empty() {
                s.metrics.record_ingest(&machine, &disk, n, cached);
            }
        }
    }
    s.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
    Ok(Json(ack))
}

#[derive(Serialize, Deserialize)]
pub struct BookmarkRequest {
    #[serde(default)]
    pub label: String,
    /// The server's request this bookmark answers (from `GET .../requests`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<u64>,
}

/// The agent's resynchronisation report.
#[derive(Serialize, Deserialize)]
pub struct ResyncReport {
    /// `required` (e.g. the agent found it was shut down uncleanly: its change tracking is lost)
    /// or `done` (it compared every block and sent what differed).
    pub status: String,
    #[serde(default)]
    pub reason: String,
}

async fn agent_resync(
    State(s): State<Arc<IngestState>>,
    Path(machine): Path<String>,
    headers: HeaderMap,
    Json(req): Json<ResyncReport>,
) -> Result<StatusCode, ApiError> {
    authorize(&s, &headers, &machine).await?;
    let co = s.coordinator.clone();
    let r = match req.status.as_str() {
        "required" => {
            let why = if req.reason.is_empty() {
                "reported by the agent".to_string()
            } else {
                format!("reported by the agent: {}", req.reason)
            };
            tokio::task::spawn_blocking(move || co.require_resync(&machine, &why)).await
        }
        "done" => tokio::task::spawn_blocking(move || co.resync_done(&machine)).await,
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("status {other:?}: expected required or done"),
            ))
        }
    };
    r.expect("resync flag")?;
    Ok(StatusCode::NO_CONTENT)
}

/// What the server asks of the agent (an app-consistent bookmark on the policy's schedule).
async fn requests(
    State(s): State<Arc<IngestState>>,
    Path(machine): Path<String>,
    headers: HeaderMap,
) -> Result<Json<crate::consistency::AgentRequests>, ApiError> {
    authorize(&s, &headers, &machine).await?;
    s.coordinator
        .requests(&machine)
        .await
        .map(Json)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn bookmark(
    State(s): State<Arc<IngestState>>,
    Path(machine): Path<String>,
    headers: HeaderMap,
    Json(req): Json<BookmarkRequest>,
) -> Result<Json<journal::Ack>, ApiError> {
    authorize(&s, &headers, &machine).await?;
    if req.label.len() > 200 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bookmark label longer than 200 bytes",
        ));
    }
    if s.journal.disks().iter().all(|d| d.machine != machine) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("machine {machine:?} has no disks yet: sync before bookmarking"),
        ));
    }
    use crate::consistency::BookmarkError;
    match s.coordinator.bookmark(&machine, &req.label, req.request).await {
        Ok(ack) => Ok(Json(ack)),
        Err(BookmarkError::Journal(e)) => Err(e.into()),
        Err(e @ BookmarkError::BarrierTimeout { .. }) => Err(ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string())),
        Err(e @ BookmarkError::Stopped(_)) => Err(ApiError::new(StatusCode::CONFLICT, e.to_string())),
        Err(e) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// Serves `router` over TLS on `listener` until `shutdown` turns true. Each connection runs in
/// its own task; a failed handshake or a broken connection is logged and forgotten.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(Duration::from_secs(30), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
