//! The transmission phase. The reader parses requests back to back and spawns one task per
//! request (at most `max_in_flight` requests and `max_in_flight_bytes` of payload per
//! connection); each task builds its whole reply and hands it to the one writer, so replies
//! never interleave and a reply is never half-sent because of a later error.

use std::borrow::Cow;
use std::io::{self, IoSlice};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::try_join_all;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, warn, Instrument};

use super::handshake::{drain, read_exact_or_eof, truncate, Session, ALLOCATION_CONTEXT_ID};
use super::proto::*;
use super::{stopped, violation, NbdServer, NbdStats};
use crate::view::Extent;

/// Replies parts up to this size are copied into the coalescing buffer; larger ones are written
/// straight from their `Bytes`.
const SMALL_PART: usize = 16 << 10;
/// The writer sends its coalescing buffer once it holds this much (or nothing more is queued).
const COALESCE: usize = 64 << 10;
/// At most this many block status descriptors in one reply (the client asks again for the rest).
const MAX_DESCRIPTORS: usize = 1 << 16;
/// `NBD_CMD_WRITE_ZEROES` writes zeroes in pieces of this size, from one static buffer.
static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

/// One client request header.
#[derive(Clone, Copy, Debug)]
struct Request {
    flags: u16,
    ty: u16,
    handle: u64,
    offset: u64,
    len: u32,
}

/// Holds a request's share of the connection's in-flight budget until its reply is written.
struct Ticket {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
    stats: Arc<NbdStats>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.stats.requests_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A complete reply, as the byte runs to send in order.
struct Reply {
    parts: Vec<Bytes>,
    _ticket: Ticket,
}

/// Why a request failed: the NBD error value and a message for the client's user.
struct Failure {
    errno: u32,
    msg: Cow<'static, str>,
}

fn fail(errno: u32, msg: impl Into<Cow<'static, str>>) -> Failure {
    Failure { errno, msg: msg.into() }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        use io::ErrorKind as K;
        let errno = match e.kind() {
            K::PermissionDenied | K::ReadOnlyFilesystem => NBD_EPERM,
            K::InvalidInput => NBD_EINVAL,
            K::StorageFull | K::QuotaExceeded | K::FileTooLarge => NBD_ENOSPC,
            K::OutOfMemory => NBD_ENOMEM,
            // EFBIG, ENOSPC, EDQUOT.
            _ if matches!(e.raw_os_error(), Some(27 | 28 | 122)) => NBD_ENOSPC,
            _ => NBD_EIO,
        };
        fail(errno, e.to_string())
    }
}

/// What the connection's tasks share.
struct Conn {
    session: Session,
    stats: Arc<NbdStats>,
    max_request: u32,
}

impl Conn {
    fn in_range(&self, offset: u64, len: u32) -> bool {
        offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= self.session.size)
    }
}

/// Serves requests until the client disconnects, breaks the protocol, or the server stops.
pub(super) async fn run<R, W>(
    server: Arc<NbdServer>,
    reader: BufReader<R>,
    writer: W,
    session: Session,
    stop: watch::Receiver<bool>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(Conn {
        session,
        stats: server.stats.clone(),
        max_request: server.config.max_request,
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let (read_side, write_side) = tokio::join!(
        read_requests(conn, &server, reader, tx, stop),
        write_replies(writer, rx)
    );
    read_side?;
    write_side
}

enum End {
    /// Clean end (NBD_CMD_DISC, EOF, server shutdown): finish what is in flight, then close.
    Drain,
    /// The client is gone or broke the protocol: drop what is in flight.
    Abort(Option<io::Error>),
}

async fn read_requests<R>(
    conn: Arc<Conn>,
    server: &NbdServer,
    mut reader: BufReader<R>,
    tx: mpsc::UnboundedSender<Reply>,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let cfg = &server.config;
    let stats = conn.stats.clone();
    let slots = Arc::new(Semaphore::new(cfg.max_in_flight));
    let budget = Arc::new(Semaphore::new(cfg.max_in_flight_bytes));
    let mut tasks = JoinSet::new();

    let end = loop {
        while tasks.try_join_next().is_some() {}
        let mut header = [0u8; REQUEST_HEADER_LEN];
        let read = tokio::select! {
            biased;
            _ = tx.closed() => break End::Abort(None),
            _ = stopped(&mut stop) => break End::Drain,
            read = read_exact_or_eof(&mut reader, &mut header) => read,
        };
        match read {
            Ok(true) => {}
            Ok(false) => break End::Drain,
            Err(e) => break End::Abort(Some(e)),
        }
        let (magic, req) = parse_request(&header);
        if magic != NBD_REQUEST_MAGIC {
            break End::Abort(Some(violation(format!("bad request magic {magic:#010x}"))));
        }
        NbdStats::add(&stats.requests, 1);
        if req.ty == NBD_CMD_DISC {
            break End::Drain;
        }

        let cost = match req.ty {
            NBD_CMD_READ | NBD_CMD_WRITE if req.len <= conn.max_request => req.len,
            _ => 0,
        };
        let ticket = tokio::select! {
            biased;
            _ = tx.closed() => break End::Abort(None),
            ticket = admit(&slots, &budget, cost, &stats) => ticket,
        };
        let Some(ticket) = ticket else {
            break End::Abort(None);
        };

        // A write's payload follows its header whatever becomes of the request.
        let payload = if req.ty == NBD_CMD_WRITE {
            if req.len <= conn.max_request {
                match read_payload(&mut reader, req.len as usize).await {
                    Ok(payload) => Some(payload),
                    Err(e) => break End::Abort(Some(e)),
                }
            } else {
                if let Err(e) = drain(&mut reader, u64::from(req.len)).await {
                    break End::Abort(Some(e));
                }
                None
            }
        } else {
            None
        };

        let conn = conn.clone();
        let tx = tx.clone();
        tasks.spawn(
            async move {
                let parts = handle(&conn, &req, payload).await;
                // The writer is gone only when the connection is: nothing to do then.
                let _ = tx.send(Reply { parts, _ticket: ticket });
            }
            .in_current_span(),
        );
    };

    match end {
        End::Drain => {
            // Every outstanding request is answered before the connection closes.
            loop {
                tokio::select! {
                    biased;
                    _ = tx.closed() => {
                        tasks.abort_all();
                        break;
                    }
                    next = tasks.join_next() => if next.is_none() { break },
                }
            }
            Ok(())
        }
        End::Abort(error) => {
            tasks.abort_all();
            error.map_or(Ok(()), Err)
        }
    }
}

fn parse_request(h: &[u8; REQUEST_HEADER_LEN]) -> (u32, Request) {
    let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let req = Request {
        flags: u16::from_be_bytes([h[4], h[5]]),
        ty: u16::from_be_bytes([h[6], h[7]]),
        handle: u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]),
        offset: u64::from_be_bytes([h[16], h[17], h[18], h[19], h[20], h[21], h[22], h[23]]),
        len: u32::from_be_bytes([h[24], h[25], h[26], h[27]]),
    };
    (magic, req)
}

async fn admit(slots: &Arc<Semaphore>, budget: &Arc<Semaphore>, cost: u32, stats: &Arc<NbdStats>) -> Option<Ticket> {
    let request = slots.clone().acquire_owned().await.ok()?;
    let bytes = if cost > 0 {
        Some(budget.clone().acquire_many_owned(cost).await.ok()?)
    } else {
        None
    };
    NbdStats::add(&stats.requests_in_flight, 1);
    Some(Ticket {
        _request: request,
        _bytes: bytes,
        stats: stats.clone(),
    })
}

/// Reads a write payload straight into one buffer (no zero-fill, no copy).
async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let want = len - buf.len();
        if r.read_buf(&mut (&mut buf).limit(want)).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-write",
            ));
        }
    }
    Ok(buf.freeze())
}

/// Serves one request and returns its complete reply.
async fn handle(conn: &Conn, req: &Request, payload: Option<Bytes>) -> Vec<Bytes> {
    let result = match req.ty {
        NBD_CMD_READ => read(conn, req).await,
        NBD_CMD_BLOCK_STATUS => block_status(conn, req).await,
        other => {
            let done = match other {
                NBD_CMD_WRITE => write(conn, req, payload).await,
                NBD_CMD_WRITE_ZEROES => write_zeroes(conn, req).await,
                NBD_CMD_TRIM => trim(conn, req),
                NBD_CMD_FLUSH => flush(conn, req).await,
                NBD_CMD_CACHE => cache(conn, req),
                _ => Err(fail(NBD_EINVAL, format!("unknown command {other}"))),
            };
            done.map(|()| vec![simple_reply(req.handle, 0)])
        }
    };
    match result {
        Ok(parts) => parts,
        Err(failure) => {
            NbdStats::add(&conn.stats.errors, 1);
            if failure.errno == NBD_EIO {
                warn!(export = %conn.session.name, command = req.ty, offset = req.offset, len = req.len,
                      error = %failure.msg, "NBD request failed");
            } else {
                debug!(export = %conn.session.name, command = req.ty, offset = req.offset, len = req.len,
                       errno = failure.errno, error = %failure.msg, "NBD request refused");
            }
            vec![error_reply(conn.session.structured, req.handle, &failure)]
        }
    }
}

fn check_flags(req: &Request, allowed: u16) -> Result<(), Failure> {
    // FUA is accepted on every command: clients are known to set it everywhere.
    let unknown = req.flags & !(allowed | NBD_CMD_FLAG_FUA);
    if unknown != 0 {
        return Err(fail(
            NBD_EINVAL,
            format!("command flags {unknown:#x} not valid for command {}", req.ty),
        ));
    }
    Ok(())
}

fn check_size(conn: &Conn, req: &Request) -> Result<(), Failure> {
    if req.len > conn.max_request {
        return Err(fail(
            NBD_EINVAL,
            format!(
                "request of {} bytes exceeds the maximum of {} bytes",
                req.len, conn.max_request
            ),
        ));
    }
    Ok(())
}

fn out_of_range(conn: &Conn, req: &Request, errno: u32) -> Failure {
    fail(
        errno,
        format!(
            "request [{}, +{}) lies beyond the end of the export ({} bytes)",
            req.offset, req.len, conn.session.size
        ),
    )
}

async fn read_exact(conn: &Conn, offset: u64, len: u64) -> Result<Bytes, Failure> {
    let data = conn.session.view.read_at(offset, len as usize).await?;
    if data.len() as u64 != len {
        return Err(fail(
            NBD_EIO,
            format!("view returned {} bytes for a read of {len} at {offset}", data.len()),
        ));
    }
    Ok(data)
}

async fn read(conn: &Conn, req: &Request) -> Result<Vec<Bytes>, Failure> {
    let structured = conn.session.structured;
    check_flags(req, if structured { NBD_CMD_FLAG_DF } else { 0 })?;
    check_size(conn, req)?;
    if !conn.in_range(req.offset, req.len) {
        return Err(out_of_range(conn, req, NBD_EINVAL));
    }
    let len = u64::from(req.len);
    let parts = if len == 0 {
        if structured {
            vec![chunk_header(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, req.handle, 0).freeze()]
        } else {
            vec![simple_reply(req.handle, 0)]
        }
    } else if !structured {
        let data = read_exact(conn, req.offset, len).await?;
        vec![simple_reply(req.handle, 0), data]
    } else if req.flags & NBD_CMD_FLAG_DF != 0 {
        // One content chunk; holes travel as explicit zeroes.
        let data = read_exact(conn, req.offset, len).await?;
        let mut header = chunk_header(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, req.handle, 8 + req.len);
        header.put_u64(req.offset);
        vec![header.freeze(), data]
    } else {
        structured_read(conn, req).await?
    };
    NbdStats::add(&conn.stats.bytes_read, len);
    Ok(parts)
}

/// A structured read: data chunks for allocated extents, hole chunks for the rest.
async fn structured_read(conn: &Conn, req: &Request) -> Result<Vec<Bytes>, Failure> {
    let len = u64::from(req.len);
    let extents = match conn.session.view.extents(req.offset, len).await {
        Ok(extents) => normalize(req.offset, len, extents),
        Err(e) => {
            debug!(error = %e, "extents failed; reading the range as data");
            vec![Extent {
                offset: req.offset,
                len,
                allocated: true,
            }]
        }
    };
    let reads = extents
        .iter()
        .filter(|e| e.allocated)
        .map(|e| read_exact(conn, e.offset, e.len));
    let mut data = try_join_all(reads).await?.into_iter();

    let mut parts = Vec::with_capacity(2 * extents.len());
    let mut headers = BytesMut::with_capacity(32 * extents.len());
    for (i, extent) in extents.iter().enumerate() {
        let flags = if i + 1 == extents.len() { NBD_REPLY_FLAG_DONE } else { 0 };
        // Extents lie inside the request, so their lengths fit in 32 bits.
        let extent_len = extent.len as u32;
        if extent.allocated {
            let Some(bytes) = data.next() else {
                return Err(fail(NBD_EIO, "internal error: missing data for an extent"));
            };
            put_chunk_header(
                &mut headers,
                flags,
                NBD_REPLY_TYPE_OFFSET_DATA,
                req.handle,
                8 + extent_len,
            );
            headers.put_u64(extent.offset);
            parts.push(headers.split().freeze());
            parts.push(bytes);
        } else {
            put_chunk_header(&mut headers, flags, NBD_REPLY_TYPE_OFFSET_HOLE, req.handle, 12);
            headers.put_u64(extent.offset);
            headers.put_u32(extent_len);
        }
    }
    if !headers.is_empty() {
        parts.push(headers.freeze());
    }
    Ok(parts)
}

async fn block_status(conn: &Conn, req: &Request) -> Result<Vec<Bytes>, Failure> {
    if !conn.session.allocation_context {
        return Err(fail(NBD_EINVAL, "no metadata context was negotiated for this export"));
    }
    check_flags(req, NBD_CMD_FLAG_REQ_ONE)?;
    if req.len == 0 {
        return Err(fail(NBD_EINVAL, "block status of an empty range"));
    }
    if !conn.in_range(req.offset, req.len) {
        return Err(out_of_range(conn, req, NBD_EINVAL));
    }
    let len = u64::from(req.len);
    let mut extents = match conn.session.view.extents(req.offset, len).await {
        Ok(extents) => normalize(req.offset, len, extents),
        Err(e) => {
            // Allowed by the spec: one descriptor, status unknown (0).
            debug!(error = %e, "extents failed; reporting the range as data");
            vec![Extent {
                offset: req.offset,
                len,
                allocated: true,
            }]
        }
    };
    let keep = if req.flags & NBD_CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        MAX_DESCRIPTORS
    };
    extents.truncate(keep);
    let mut out = chunk_header(
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_BLOCK_STATUS,
        req.handle,
        4 + 8 * extents.len() as u32,
    );
    out.put_u32(ALLOCATION_CONTEXT_ID);
    for extent in &extents {
        out.put_u32(extent.len as u32);
        out.put_u32(if extent.allocated {
            0
        } else {
            NBD_STATE_HOLE | NBD_STATE_ZERO
        });
    }
    Ok(vec![out.freeze()])
}

async fn write(conn: &Conn, req: &Request, payload: Option<Bytes>) -> Result<(), Failure> {
    check_flags(req, 0)?;
    if !conn.session.writable {
        return Err(fail(NBD_EPERM, "the export is read-only"));
    }
    let Some(payload) = payload else {
        return Err(fail(
            NBD_EINVAL,
            format!(
                "write of {} bytes exceeds the maximum of {} bytes",
                req.len, conn.max_request
            ),
        ));
    };
    if !conn.in_range(req.offset, req.len) {
        return Err(out_of_range(conn, req, NBD_ENOSPC));
    }
    if !payload.is_empty() {
        conn.session.view.write_at(req.offset, payload).await?;
        if req.flags & NBD_CMD_FLAG_FUA != 0 {
            conn.session.view.flush().await?;
        }
    }
    NbdStats::add(&conn.stats.bytes_written, u64::from(req.len));
    Ok(())
}

async fn write_zeroes(conn: &Conn, req: &Request) -> Result<(), Failure> {
    check_flags(req, NBD_CMD_FLAG_NO_HOLE)?;
    if !conn.session.writable {
        return Err(fail(NBD_EPERM, "the export is read-only"));
    }
    if !conn.in_range(req.offset, req.len) {
        return Err(out_of_range(conn, req, NBD_ENOSPC));
    }
    let end = req.offset + u64::from(req.len);
    let mut at = req.offset;
    while at < end {
        let n = (end - at).min(ZEROES.len() as u64) as usize;
        conn.session.view.write_at(at, Bytes::from_static(&ZEROES[..n])).await?;
        at += n as u64;
    }
    if req.flags & NBD_CMD_FLAG_FUA != 0 {
        conn.session.view.flush().await?;
    }
    NbdStats::add(&conn.stats.bytes_written, u64::from(req.len));
    Ok(())
}

/// A hint the view has no use for (it keeps no discard): checked, then acknowledged.
fn trim(conn: &Conn, req: &Request) -> Result<(), Failure> {
    check_flags(req, 0)?;
    if !conn.session.writable {
        return Err(fail(NBD_EPERM, "the export is read-only"));
    }
    if !conn.in_range(req.offset, req.len) {
        return Err(out_of_range(conn, req, NBD_EINVAL));
    }
    Ok(())
}

async fn flush(conn: &Conn, req: &Request) -> Result<(), Failure> {
    check_flags(req, 0)?;
    conn.session.view.flush().await?;
    Ok(())
}

/// A hint: checked, then acknowledged (the view caches on its own).
fn cache(conn: &Conn, req: &Request) -> Result<(), Failure> {
    check_flags(req, 0)?;
    if !conn.in_range(req.offset, req.len) {
        return Err(out_of_range(conn, req, NBD_EINVAL));
    }
    Ok(())
}

/// Clips the view's extents to `[offset, offset + len)`, fills gaps as data (always safe), drops
/// overlaps and merges neighbours that agree: the result covers the range exactly, in order.
fn normalize(offset: u64, len: u64, extents: Vec<Extent>) -> Vec<Extent> {
    let end = offset + len;
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len().min(1024) + 1);
    let push = |out: &mut Vec<Extent>, start: u64, stop: u64, allocated: bool| {
        if let Some(last) = out.last_mut() {
            if last.allocated == allocated && last.offset + last.len == start {
                last.len += stop - start;
                return;
            }
        }
        out.push(Extent {
            offset: start,
            len: stop - start,
            allocated,
        });
    };
    let mut pos = offset;
    for e in extents {
        let e_end = e.offset.saturating_add(e.len);
        if e.len == 0 || e_end <= pos {
            continue;
        }
        if e.offset >= end {
            break;
        }
        if e.offset > pos {
            push(&mut out, pos, e.offset, true);
        }
        let stop = e_end.min(end);
        push(&mut out, e.offset.max(pos), stop, e.allocated);
        pos = stop;
        if pos >= end {
            break;
        }
    }
    if pos < end {
        push(&mut out, pos, end, true);
    }
    out
}

fn simple_reply(handle: u64, errno: u32) -> Bytes {
    let mut out = BytesMut::with_capacity(16);
    out.put_u32(NBD_SIMPLE_REPLY_MAGIC);
    out.put_u32(errno);
    out.put_u64(handle);
    out.freeze()
}

fn put_chunk_header(out: &mut BytesMut, flags: u16, ty: u16, handle: u64, len: u32) {
    out.put_u32(NBD_STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(ty);
    out.put_u64(handle);
    out.put_u32(len);
}

fn chunk_header(flags: u16, ty: u16, handle: u64, len: u32) -> BytesMut {
    let mut out = BytesMut::with_capacity(20 + 12);
    put_chunk_header(&mut out, flags, ty, handle, len);
    out
}

fn error_reply(structured: bool, handle: u64, failure: &Failure) -> Bytes {
    if !structured {
        return simple_reply(handle, failure.errno);
    }
    let msg = truncate(&failure.msg, MAX_STRING).as_bytes();
    let mut out = chunk_header(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, handle, 6 + msg.len() as u32);
    out.put_u32(failure.errno);
    out.put_u16(msg.len() as u16);
    out.put_slice(msg);
    out.freeze()
}

/// The one writer of a connection: small parts are coalesced, large ones go out vectored with
/// whatever is pending, and the socket sees a write only when a batch is complete.
async fn write_replies<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::UnboundedReceiver<Reply>) -> io::Result<()> {
    let mut pending = BytesMut::with_capacity(COALESCE + SMALL_PART);
    while let Some(reply) = rx.recv().await {
        for part in &reply.parts {
            if part.len() <= SMALL_PART {
                pending.extend_from_slice(part);
            } else {
                write_two(&mut w, &pending, part).await?;
                pending.clear();
            }
        }
        drop(reply);
        if !pending.is_empty() && (pending.len() >= COALESCE || rx.is_empty()) {
            w.write_all(&pending).await?;
            pending.clear();
        }
        if rx.is_empty() {
            w.flush().await?;
        }
    }
    if !pending.is_empty() {
        w.write_all(&pending).await?;
    }
    w.flush().await?;
    let _ = w.shutdown().await;
    Ok(())
}

/// Writes `a` then `b` with as few system calls as possible.
async fn write_two<W: AsyncWrite + Unpin>(w: &mut W, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() {
        let n = w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n >= a.len() {
            b = &b[(n - a.len()).min(b.len())..];
            a = &[];
        } else {
            a = &a[n..];
        }
    }
    w.write_all(b).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(offset: u64, len: u64, allocated: bool) -> Extent {
        Extent { offset, len, allocated }
    }

    #[test]
    fn normalize_clips_fills_and_merges() {
        assert_eq!(normalize(100, 50, vec![]), vec![e(100, 50, true)]);
        assert_eq!(
            normalize(100, 50, vec![e(0, 120, false), e(120, 10, true), e(130, 100, false)]),
            vec![e(100, 20, false), e(120, 10, true), e(130, 20, false)]
        );
        // Gap, overlap, zero length, out of order, beyond the end.
        assert_eq!(
            normalize(
                0,
                100,
                vec![
                    e(10, 10, false),
                    e(15, 10, false),
                    e(5, 0, false),
                    e(0, 5, false),
                    e(200, 5, false)
                ]
            ),
            vec![e(0, 10, true), e(10, 15, false), e(25, 75, true)]
        );
        assert_eq!(
            normalize(0, 10, vec![e(0, 5, true), e(5, 5, true)]),
            vec![e(0, 10, true)]
        );
        assert_eq!(
            normalize(u64::MAX - 10, 10, vec![e(u64::MAX - 20, u64::MAX, false)]),
            vec![e(u64::MAX - 10, 10, false)]
        );
    }

    #[test]
    fn io_errors_map_to_nbd_errors() {
        let errno = |k: io::ErrorKind| Failure::from(io::Error::from(k)).errno;
        assert_eq!(errno(io::ErrorKind::PermissionDenied), NBD_EPERM);
        assert_eq!(errno(io::ErrorKind::InvalidInput), NBD_EINVAL);
        assert_eq!(errno(io::ErrorKind::StorageFull), NBD_ENOSPC);
        assert_eq!(errno(io::ErrorKind::Other), NBD_EIO);
        assert_eq!(Failure::from(io::Error::from_raw_os_error(122)).errno, NBD_ENOSPC);
    }
}
