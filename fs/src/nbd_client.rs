//! An async NBD client: fixed-newstyle handshake with `NBD_OPT_GO`, structured replies and
//! `base:allocation` when the server offers them, and pipelined requests: any number in flight on
//! one connection, a reader task matching replies to requests by handle. A small pool of
//! connections serves one export when the server advertises `NBD_FLAG_CAN_MULTI_CONN`.
//!
//! [`NbdExport`] implements [`DiskView`], so whatever reads a recovery point in process (the FUSE
//! filesystem) reads a remote appliance's export the same way. A connection that breaks fails
//! its in-flight requests with an error and is replaced on the next request.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tracing::debug;

use crate::view::{DiskView, Extent};

// Wire constants (NetworkBlockDevice/nbd doc/proto.md).
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;
const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
const NBD_FLAG_SEND_DF: u16 = 1 << 7;
const NBD_OPT_ABORT: u32 = 2;
const NBD_OPT_GO: u32 = 7;
const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
const NBD_OPT_SET_META_CONTEXT: u32 = 10;
const NBD_REP_ACK: u32 = 1;
const NBD_REP_INFO: u32 = 3;
const NBD_REP_META_CONTEXT: u32 = 4;
const NBD_REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const NBD_REP_ERR_POLICY: u32 = (1 << 31) + 2;
const NBD_INFO_EXPORT: u16 = 0;
const NBD_INFO_BLOCK_SIZE: u16 = 3;
const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const NBD_CMD_READ: u16 = 0;
const NBD_CMD_DISC: u16 = 2;
const NBD_CMD_BLOCK_STATUS: u16 = 7;
const NBD_CMD_FLAG_DF: u16 = 1 << 2;
const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
const NBD_REPLY_TYPE_NONE: u16 = 0;
const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const NBD_STATE_HOLE: u32 = 1 << 0;
const BASE_ALLOCATION: &str = "base:allocation";
/// Largest option reply the client accepts (names and messages are at most 4 KiB).
const MAX_OPTION_REPLY: u32 = 1 << 20;

/// Tunables of an [`NbdExport`].
#[derive(Clone, Debug)]
pub struct NbdClientConfig {
    /// Connections per export when the server allows multi-conn (1 otherwise).
    pub connections: usize,
    /// Largest single read sent to the server (further capped by the server's block-size info).
    pub max_request: u32,
    /// A request without a reply after this long fails (and its connection is dropped).
    pub request_timeout: Duration,
    /// Connecting plus the handshake must finish within this time.
    pub connect_timeout: Duration,
}

impl Default for NbdClientConfig {
    fn default() -> Self {
        Self {
            connections: 4,
            max_request: 4 << 20,
            request_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(30),
        }
    }
}

fn violation(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// What the handshake learned about an export.
#[derive(Clone, Debug)]
struct ExportInfo {
    size: u64,
    flags: u16,
    structured: bool,
    /// The metadata context id of `base:allocation`, when selected.
    allocation: Option<u32>,
    max_block: u32,
}

/// An NBD export on a remote server, readable as a [`DiskView`] through a small connection pool.
pub struct NbdExport {
    addr: String,
    name: String,
    info: ExportInfo,
    config: NbdClientConfig,
    slots: Vec<tokio::sync::Mutex<Option<Arc<Connection>>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for NbdExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdExport")
            .field("addr", &self.addr)
            .field("name", &self.name)
            .field("size", &self.info.size)
            .finish_non_exhaustive()
    }
}

impl NbdExport {
    /// Connects to `addr` (HOST:PORT) and opens `export`; `NotFound` when the server has no such
    /// export.
    pub async fn connect(addr: &str, export: &str, config: NbdClientConfig) -> io::Result<Arc<Self>> {
        let conn = Connection::open(addr, export, &config).await?;
        let info = conn.info.clone();
        let n = if info.flags & NBD_FLAG_CAN_MULTI_CONN != 0 {
            config.connections.max(1)
        } else {
            1
        };
        let slots: Vec<_> = (0..n).map(|_| tokio::sync::Mutex::new(None)).collect();
        *slots[0].lock().await = Some(conn);
        Ok(Arc::new(Self {
            addr: addr.to_string(),
            name: export.to_string(),
            info,
            config,
            slots,
            next: AtomicUsize::new(0),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the server marked the export read-only.
    pub fn read_only(&self) -> bool {
        self.info.flags & NBD_FLAG_READ_ONLY != 0
    }

    /// Connections the pool may open (1 unless the server allows multi-conn).
    pub fn max_connections(&self) -> usize {
        self.slots.len()
    }

    /// Whether `NBD_CMD_BLOCK_STATUS` (`base:allocation`) is available.
    pub fn has_block_status(&self) -> bool {
        self.info.allocation.is_some()
    }

    /// A live connection, round robin over the pool; dead ones are replaced.
    async fn connection(&self) -> io::Result<Arc<Connection>> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[i].lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.dead.load(Ordering::Acquire) {
                return Ok(c.clone());
            }
            debug!(export = %self.name, slot = i, "NBD connection broke: reconnecting");
        }
        let c = Connection::open(&self.addr, &self.name, &self.config).await?;
        if c.info.size != self.info.size {
            return Err(io::Error::other(format!(
                "export {} changed size from {} to {} bytes",
                self.name, self.info.size, c.info.size
            )));
        }
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn request(&self, ty: u16, flags: u16, offset: u64, len: u32) -> io::Result<Answer> {
        let conn = self.connection().await?;
        let rx = conn.send(ty, flags, offset, len).await?;
        match tokio::time::timeout(self.config.request_timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("NBD connection to {} closed mid-request", self.addr),
            )),
            Err(_) => {
                conn.kill();
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("NBD request to {} timed out", self.addr),
                ))
            }
        }
    }

    async fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let end = offset
            .checked_add(len as u64)
            .filter(|e| *e <= self.info.size)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "read beyond the end of the export"))?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let step = u64::from(self.config.max_request.min(self.info.max_block).max(4096));
        if len as u64 <= step {
            return self.read_one(offset, len as u32).await;
        }
        let parts = (offset..end).step_by(step as usize).map(|at| {
            let n = (end - at).min(step) as u32;
            self.read_one(at, n)
        });
        let parts = futures::future::try_join_all(parts).await?;
        let mut out = BytesMut::with_capacity(len);
        for p in parts {
            out.extend_from_slice(&p);
        }
        Ok(out.freeze())
    }

    async fn read_one(&self, offset: u64, len: u32) -> io::Result<Bytes> {
        let flags = if self.info.structured && self.info.flags & NBD_FLAG_SEND_DF != 0 {
            NBD_CMD_FLAG_DF
        } else {
            0
        };
        match self.request(NBD_CMD_READ, flags, offset, len).await? {
            Answer::Data(b) if b.len() == len as usize => Ok(b),
            Answer::Data(b) => Err(violation(format!("read of {len} bytes answered with {}", b.len()))),
            Answer::Extents(_) => Err(violation("read answered with block status")),
        }
    }

    async fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = (offset.saturating_add(len)).min(self.info.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        if self.info.allocation.is_none() {
            return Ok(vec![Extent {
                offset,
                len: end - offset,
                allocated: true,
            }]);
        }
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < end {
            // Block status lengths are 32-bit: ask in pieces of at most 2 GiB.
            let n = (end - at).min(1 << 31) as u32;
            let extents = match self.request(NBD_CMD_BLOCK_STATUS, 0, at, n).await? {
                Answer::Extents(e) => e,
                Answer::Data(_) => return Err(violation("block status answered with data")),
            };
            if extents.is_empty() {
                return Err(violation("block status reply without descriptors"));
            }
            for (elen, flags) in extents {
                if at >= end || elen == 0 {
                    break;
                }
                let elen = u64::from(elen).min(end - at);
                let allocated = flags & NBD_STATE_HOLE == 0;
                match out.last_mut() {
                    Some(e) if e.allocated == allocated && e.offset + e.len == at => e.len += elen,
                    _ => out.push(Extent {
                        offset: at,
                        len: elen,
                        allocated,
                    }),
                }
                at += elen;
            }
        }
        Ok(out)
    }
}

impl DiskView for NbdExport {
    fn size(&self) -> u64 {
        self.info.size
    }

    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>> {
        Box::pin(self.read(offset, len))
    }

    fn extents(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<Vec<Extent>>> {
        Box::pin(self.allocation(offset, len))
    }
}

/// What a request got back.
enum Answer {
    Data(Bytes),
    /// `(length, flags)` descriptors of `base:allocation`.
    Extents(Vec<(u32, u32)>),
}

/// A request waiting for its reply.
struct Pending {
    ty: u16,
    offset: u64,
    len: u32,
    /// Structured read replies land here chunk by chunk (holes stay zero).
    buf: Option<BytesMut>,
    extents: Vec<(u32, u32)>,
    error: Option<io::Error>,
    tx: oneshot::Sender<io::Result<Answer>>,
}

type PendingMap = Arc<Mutex<HashMap<u64, Pending>>>;

/// One TCP connection in the transmission phase.
struct Connection {
    info: ExportInfo,
    writer: tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>,
    pending: PendingMap,
    next_handle: AtomicU64,
    dead: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
        // Best effort: tell the server we are leaving (it treats EOF the same way).
        if let Ok(w) = self.writer.try_lock() {
            let mut req = [0u8; 28];
            req[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
            req[6..8].copy_from_slice(&NBD_CMD_DISC.to_be_bytes());
            let _ = w.try_write(&req);
        }
    }
}

impl Connection {
    async fn open(addr: &str, export: &str, config: &NbdClientConfig) -> io::Result<Arc<Self>> {
        let connecting = async {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::with_capacity(256 << 10, r);
            let info = handshake(&mut r, &mut w, export).await?;
            Ok::<_, io::Error>((r, w, info))
        };
        let (r, w, mut info) = tokio::time::timeout(config.connect_timeout, connecting)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("NBD handshake with {addr} timed out")))??;
        info.max_block = info.max_block.max(4096);
        let pending: PendingMap = Arc::new(Mutex::new(HashMap::new()));
        let dead = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(read_replies(r, pending.clone(), dead.clone()));
        Ok(Arc::new(Self {
            info,
            writer: tokio::sync::Mutex::new(w),
            pending,
            next_handle: AtomicU64::new(1),
            dead,
            reader,
        }))
    }

    fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        self.reader.abort();
        fail_all(&self.pending, "NBD connection dropped after a timeout");
    }

    async fn send(
        &self,
        ty: u16,
        flags: u16,
        offset: u64,
        len: u32,
    ) -> io::Result<oneshot::Receiver<io::Result<Answer>>> {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let buf = (ty == NBD_CMD_READ && self.info.structured).then(|| BytesMut::zeroed(len as usize));
        {
            let mut pending = self.pending.lock().expect("lock");
            if self.dead.load(Ordering::Acquire) {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "NBD connection is closed",
                ));
            }
            pending.insert(
                handle,
                Pending {
                    ty,
                    offset,
                    len,
                    buf,
                    extents: Vec::new(),
                    error: None,
                    tx,
                },
            );
        }
        let mut req = BytesMut::with_capacity(28);
        req.put_u32(NBD_REQUEST_MAGIC);
        req.put_u16(flags);
        req.put_u16(ty);
        req.put_u64(handle);
        req.put_u64(offset);
        req.put_u32(len);
        let written = {
            let mut w = self.writer.lock().await;
            w.write_all(&req).await
        };
        if let Err(e) = written {
            self.dead.store(true, Ordering::Release);
            self.pending.lock().expect("lock").remove(&handle);
            return Err(e);
        }
        Ok(rx)
    }
}

fn fail_all(pending: &PendingMap, why: &str) {
    let drained: Vec<Pending> = pending.lock().expect("lock").drain().map(|(_, p)| p).collect();
    for p in drained {
        let _ =
            p.tx.send(Err(io::Error::new(io::ErrorKind::ConnectionAborted, why.to_string())));
    }
}

/// The reader task: matches replies to requests until the connection ends, then fails whatever
/// is still waiting.
async fn read_replies<R: AsyncRead + Unpin>(mut r: R, pending: PendingMap, dead: Arc<AtomicBool>) {
    let why = match reply_loop(&mut r, &pending).await {
        Ok(()) => "NBD server closed the connection".to_string(),
        Err(e) => format!("NBD connection failed: {e}"),
    };
    debug!(reason = %why, "NBD reader stopped");
    // Mark dead under the lock so `send` cannot add a request nobody will answer.
    {
        let _guard = pending.lock().expect("lock");
        dead.store(true, Ordering::Release);
    }
    fail_all(&pending, &why);
}

fn nbd_error(errno: u32, msg: &str) -> io::Error {
    let base = io::Error::from_raw_os_error(errno as i32);
    if msg.is_empty() {
        base
    } else {
        io::Error::new(base.kind(), format!("{msg} (NBD error {errno})"))
    }
}

async fn reply_loop<R: AsyncRead + Unpin>(r: &mut R, pending: &PendingMap) -> io::Result<()> {
    loop {
        let mut magic = [0u8; 4];
        match r.read_exact(&mut magic).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        match u32::from_be_bytes(magic) {
            NBD_SIMPLE_REPLY_MAGIC => {
                let errno = r.read_u32().await?;
                let handle = r.read_u64().await?;
                let p = pending
                    .lock()
                    .expect("lock")
                    .remove(&handle)
                    .ok_or_else(|| violation(format!("reply to unknown handle {handle}")))?;
                if errno != 0 {
                    let _ = p.tx.send(Err(nbd_error(errno, "")));
                } else if p.ty == NBD_CMD_READ {
                    let mut buf = BytesMut::zeroed(p.len as usize);
                    r.read_exact(&mut buf).await?;
                    let _ = p.tx.send(Ok(Answer::Data(buf.freeze())));
                } else {
                    let _ = p.tx.send(Ok(Answer::Extents(Vec::new())));
                }
            }
            NBD_STRUCTURED_REPLY_MAGIC => {
                let flags = r.read_u16().await?;
                let ty = r.read_u16().await?;
                let handle = r.read_u64().await?;
                let len = r.read_u32().await?;
                // The payload is read with the lock released; the entry stays in the map.
                let mut entry = {
                    let mut guard = pending.lock().expect("lock");
                    let p = guard
                        .get_mut(&handle)
                        .ok_or_else(|| violation(format!("reply chunk for unknown handle {handle}")))?;
                    std::mem::replace(
                        p,
                        Pending {
                            ty: p.ty,
                            offset: p.offset,
                            len: p.len,
                            buf: None,
                            extents: Vec::new(),
                            error: None,
                            tx: oneshot::channel().0,
                        },
                    )
                };
                chunk(r, &mut entry, ty, len).await?;
                if flags & NBD_REPLY_FLAG_DONE != 0 {
                    pending.lock().expect("lock").remove(&handle);
                    finish(entry);
                } else if let Some(slot) = pending.lock().expect("lock").get_mut(&handle) {
                    *slot = entry;
                }
            }
            other => return Err(violation(format!("bad reply magic {other:#010x}"))),
        }
    }
}

/// Reads one structured reply chunk's payload into the request's state.
async fn chunk<R: AsyncRead + Unpin>(r: &mut R, p: &mut Pending, ty: u16, len: u32) -> io::Result<()> {
    match ty {
        NBD_REPLY_TYPE_NONE => {
            if len != 0 {
                return Err(violation("NBD_REPLY_TYPE_NONE with a payload"));
            }
        }
        NBD_REPLY_TYPE_OFFSET_DATA => {
            if len < 8 {
                return Err(violation("short OFFSET_DATA chunk"));
            }
            let offset = r.read_u64().await?;
            let n = u64::from(len - 8);
            let lo = offset.wrapping_sub(p.offset);
            match p.buf.as_mut() {
                Some(buf) if offset >= p.offset && lo + n <= buf.len() as u64 => {
                    r.read_exact(&mut buf[lo as usize..(lo + n) as usize]).await?;
                }
                _ => return Err(violation("OFFSET_DATA chunk outside its request")),
            }
        }
        NBD_REPLY_TYPE_OFFSET_HOLE => {
            if len != 12 {
                return Err(violation("OFFSET_HOLE chunk of the wrong size"));
            }
            let offset = r.read_u64().await?;
            let n = r.read_u32().await?;
            let inside = offset >= p.offset && offset - p.offset + u64::from(n) <= u64::from(p.len);
            if !inside || p.buf.is_none() {
                return Err(violation("OFFSET_HOLE chunk outside its request"));
            }
            // The buffer started zeroed.
        }
        NBD_REPLY_TYPE_BLOCK_STATUS => {
            if len < 4 || !(len - 4).is_multiple_of(8) {
                return Err(violation("BLOCK_STATUS chunk of the wrong size"));
            }
            let _context = r.read_u32().await?;
            for _ in 0..(len - 4) / 8 {
                let elen = r.read_u32().await?;
                let flags = r.read_u32().await?;
                p.extents.push((elen, flags));
            }
        }
        t if t & (1 << 15) != 0 => {
            // Error chunks: errno, message length, message, then type-specific data.
            if len < 6 {
                return Err(violation("short error chunk"));
            }
            let errno = r.read_u32().await?;
            let mlen = r.read_u16().await?;
            if u32::from(mlen) + 6 > len {
                return Err(violation("error message longer than its chunk"));
            }
            let mut msg = vec![0u8; mlen as usize];
            r.read_exact(&mut msg).await?;
            let rest = u64::from(len - 6 - u32::from(mlen));
            tokio::io::copy(&mut (&mut *r).take(rest), &mut tokio::io::sink()).await?;
            p.error
                .get_or_insert_with(|| nbd_error(errno, &String::from_utf8_lossy(&msg)));
        }
        _ => {
            // Unknown non-error chunk types must be ignored.
            tokio::io::copy(&mut (&mut *r).take(u64::from(len)), &mut tokio::io::sink()).await?;
        }
    }
    Ok(())
}

fn finish(p: Pending) {
    let answer = match p.error {
        Some(e) => Err(e),
        None if p.ty == NBD_CMD_READ => Ok(Answer::Data(p.buf.map(BytesMut::freeze).unwrap_or_default())),
        None => Ok(Answer::Extents(p.extents)),
    };
    let _ = p.tx.send(answer);
}

async fn send_option<W: AsyncWrite + Unpin>(w: &mut W, option: u32, data: &[u8]) -> io::Result<()> {
    let mut out = BytesMut::with_capacity(16 + data.len());
    out.put_u64(IHAVEOPT);
    out.put_u32(option);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
    w.write_all(&out).await?;
    w.flush().await
}

/// One option reply: `(type, data)`.
async fn option_reply<R: AsyncRead + Unpin>(r: &mut R, option: u32) -> io::Result<(u32, Vec<u8>)> {
    let magic = r.read_u64().await?;
    if magic != OPT_REPLY_MAGIC {
        return Err(violation(format!("bad option reply magic {magic:#x}")));
    }
    let opt = r.read_u32().await?;
    let ty = r.read_u32().await?;
    let len = r.read_u32().await?;
    if opt != option {
        return Err(violation(format!("reply to option {opt}, expected {option}")));
    }
    if len > MAX_OPTION_REPLY {
        return Err(violation(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data).await?;
    Ok((ty, data))
}

fn option_error(option: u32, ty: u32, data: &[u8], export: &str) -> io::Error {
    let msg = String::from_utf8_lossy(data);
    let kind = match ty {
        NBD_REP_ERR_UNKNOWN => io::ErrorKind::NotFound,
        NBD_REP_ERR_POLICY => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(
        kind,
        format!("NBD server refused option {option} for {export:?} ({ty:#x}): {msg}"),
    )
}

async fn handshake<R, W>(r: &mut R, w: &mut W, export: &str) -> io::Result<ExportInfo>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if r.read_u64().await? != NBDMAGIC {
        return Err(violation("not an NBD server (bad magic)"));
    }
    if r.read_u64().await? != IHAVEOPT {
        return Err(violation("NBD server does not speak the newstyle protocol"));
    }
    let server_flags = r.read_u16().await?;
    if server_flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(violation("NBD server does not speak fixed newstyle"));
    }
    let mut client_flags = NBD_FLAG_C_FIXED_NEWSTYLE;
    if server_flags & NBD_FLAG_NO_ZEROES != 0 {
        client_flags |= NBD_FLAG_C_NO_ZEROES;
    }
    w.write_all(&client_flags.to_be_bytes()).await?;

    // Structured replies: optional.
    send_option(w, NBD_OPT_STRUCTURED_REPLY, &[]).await?;
    let (ty, _) = option_reply(r, NBD_OPT_STRUCTURED_REPLY).await?;
    let structured = ty == NBD_REP_ACK;

    // base:allocation: optional, needs structured replies.
    let mut allocation = None;
    if structured {
        let mut data = BytesMut::new();
        data.put_u32(export.len() as u32);
        data.put_slice(export.as_bytes());
        data.put_u32(1);
        data.put_u32(BASE_ALLOCATION.len() as u32);
        data.put_slice(BASE_ALLOCATION.as_bytes());
        send_option(w, NBD_OPT_SET_META_CONTEXT, &data).await?;
        loop {
            let (ty, data) = option_reply(r, NBD_OPT_SET_META_CONTEXT).await?;
            match ty {
                NBD_REP_META_CONTEXT if data.len() >= 4 && &data[4..] == BASE_ALLOCATION.as_bytes() => {
                    allocation = Some(u32::from_be_bytes([data[0], data[1], data[2], data[3]]));
                }
                NBD_REP_ACK => break,
                t if t & (1 << 31) != 0 => break,
                _ => {}
            }
        }
    }

    let mut data = BytesMut::new();
    data.put_u32(export.len() as u32);
    data.put_slice(export.as_bytes());
    data.put_u16(1);
    data.put_u16(NBD_INFO_BLOCK_SIZE);
    send_option(w, NBD_OPT_GO, &data).await?;
    let mut size = None;
    let mut flags = 0;
    let mut max_block = u32::MAX;
    loop {
        let (ty, data) = option_reply(r, NBD_OPT_GO).await?;
        match ty {
            NBD_REP_INFO if data.len() >= 2 => {
                let info = u16::from_be_bytes([data[0], data[1]]);
                match info {
                    NBD_INFO_EXPORT if data.len() >= 12 => {
                        size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap_or_default()));
                        flags = u16::from_be_bytes([data[10], data[11]]);
                    }
                    NBD_INFO_BLOCK_SIZE if data.len() >= 14 => {
                        max_block = u32::from_be_bytes(data[10..14].try_into().unwrap_or_default());
                    }
                    _ => {}
                }
            }
            NBD_REP_ACK => break,
            t if t & (1 << 31) != 0 => {
                let e = option_error(NBD_OPT_GO, t, &data, export);
                // Leave politely so the server does not log a broken client.
                let _ = send_option(w, NBD_OPT_ABORT, &[]).await;
                return Err(e);
            }
            _ => {}
        }
    }
    let size = size.ok_or_else(|| violation("NBD_OPT_GO succeeded without NBD_INFO_EXPORT"))?;
    Ok(ExportInfo {
        size,
        flags,
        structured,
        allocation: allocation.filter(|_| structured),
        max_block,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::NbdServer;
    use crate::view::{ExportCatalog, ExportInfo as CatalogEntry};

    /// An in-memory disk with holes at whole 64 KiB blocks that are all zero.
    struct Mem {
        data: Bytes,
    }

    const BLOCK: u64 = 64 << 10;

    impl DiskView for Mem {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>> {
            let out = self.data.slice(offset as usize..offset as usize + len);
            Box::pin(async move { Ok(out) })
        }
        fn extents(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<Vec<Extent>>> {
            let mut out: Vec<Extent> = Vec::new();
            let end = offset + len;
            let mut at = offset;
            while at < end {
                let b = at / BLOCK;
                let hi = ((b + 1) * BLOCK).min(end);
                let lo_b = (b * BLOCK) as usize;
                let hi_b = (((b + 1) * BLOCK) as usize).min(self.data.len());
                let allocated = self.data[lo_b..hi_b].iter().any(|x| *x != 0);
                match out.last_mut() {
                    Some(e) if e.allocated == allocated => e.len += hi - at,
                    _ => out.push(Extent {
                        offset: at,
                        len: hi - at,
                        allocated,
                    }),
                }
                at = hi;
            }
            Box::pin(async move { Ok(out) })
        }
    }

    struct Catalog(Arc<Mem>);

    impl ExportCatalog for Catalog {
        fn list(&self) -> BoxFuture<'_, io::Result<Vec<CatalogEntry>>> {
            Box::pin(async {
                Ok(vec![CatalogEntry {
                    name: "m1/disk0@1".into(),
                    description: String::new(),
                }])
            })
        }
        fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Arc<dyn DiskView>>> {
            Box::pin(async move {
                if name == "m1/disk0@1" {
                    Ok(self.0.clone() as Arc<dyn DiskView>)
                } else {
                    Err(io::Error::new(io::ErrorKind::NotFound, "no such export"))
                }
            })
        }
    }

    fn pattern(size: usize) -> Vec<u8> {
        let mut v: Vec<u8> = (0..size).map(|i| ((i * 7 + i / 4093) % 251) as u8).collect();
        // Two holes.
        v[(BLOCK * 3) as usize..(BLOCK * 5) as usize].fill(0);
        let n = v.len();
        v[n - BLOCK as usize..].fill(0);
        v
    }

    async fn server(data: Vec<u8>) -> (String, tokio::sync::oneshot::Sender<()>) {
        let catalog = Arc::new(Catalog(Arc::new(Mem {
            data: Bytes::from(data),
        })));
        let server = Arc::new(NbdServer::new(catalog));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.serve(listener, async move {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_match_the_export_with_many_requests_in_flight() {
        let data = pattern(8 << 20);
        let (addr, _stop) = server(data.clone()).await;
        let cfg = NbdClientConfig {
            max_request: 256 << 10,
            ..Default::default()
        };
        let export = NbdExport::connect(&addr, "m1/disk0@1", cfg).await.unwrap();
        assert_eq!(export.size(), data.len() as u64);
        assert!(export.read_only());
        assert!(export.has_block_status());
        assert_eq!(export.max_connections(), 4);
        // Whole disk in one call (split into 256 KiB requests, pipelined over the pool).
        let all = export.read_at(0, data.len()).await.unwrap();
        assert!(all[..] == data[..], "whole-disk read differs");
        // Many small unaligned reads at once.
        let reads = (0..500u64).map(|i| {
            let off = (i * 16_411) % (data.len() as u64 - 9000);
            let export = export.clone();
            async move { (off, export.read_at(off, 9000 - (i as usize % 7)).await.unwrap()) }
        });
        for (off, got) in futures::future::join_all(reads).await {
            assert_eq!(&got[..], &data[off as usize..off as usize + got.len()], "read at {off}");
        }
        assert_eq!(export.read_at(5, 0).await.unwrap().len(), 0);
        assert!(export.read_at(data.len() as u64 - 1, 2).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn block_status_reports_holes() {
        let data = pattern(1 << 20);
        let (addr, _stop) = server(data.clone()).await;
        let export = NbdExport::connect(&addr, "m1/disk0@1", NbdClientConfig::default())
            .await
            .unwrap();
        let e = export.extents(0, 1 << 20).await.unwrap();
        let ext = |offset, len, allocated| Extent { offset, len, allocated };
        assert_eq!(
            e,
            vec![
                ext(0, 3 * BLOCK, true),
                ext(3 * BLOCK, 2 * BLOCK, false),
                ext(5 * BLOCK, (1 << 20) - 6 * BLOCK, true),
                ext((1 << 20) - BLOCK, BLOCK, false),
            ]
        );
        let e = export.extents(BLOCK * 4 + 10, 100).await.unwrap();
        assert_eq!(e, vec![ext(BLOCK * 4 + 10, 100, false)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_export_is_not_found_and_a_dead_server_fails_requests() {
        let (addr, stop) = server(pattern(1 << 20)).await;
        let e = NbdExport::connect(&addr, "m1/nope@1", NbdClientConfig::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        let export = NbdExport::connect(&addr, "m1/disk0@1", NbdClientConfig::default())
            .await
            .unwrap();
        export.read_at(0, 4096).await.unwrap();
        drop(stop);
        // The server drains and closes; requests now fail instead of hanging.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let r = tokio::time::timeout(Duration::from_secs(5), export.read_at(0, 4096))
                .await
                .expect("a read on a closed server must not hang");
            if r.is_err() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "reads keep succeeding after shutdown"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
