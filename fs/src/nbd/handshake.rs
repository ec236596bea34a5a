//! The fixed-newstyle handshake: option haggling up to `NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`.

use std::collections::BTreeSet;
use std::io;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info};

use super::proto::*;
use super::{stopped, violation, NbdServer};
use crate::view::DiskView;

/// Option payloads above this size are refused with `NBD_REP_ERR_TOO_BIG` (names and queries are
/// at most 4 KiB each).
const MAX_OPTION_DATA: u32 = 64 << 10;
/// Option payloads above this size are a denial of service: the connection is closed.
const MAX_OPTION_DRAIN: u32 = 16 << 20;
/// The id of `base:allocation` once selected.
pub(super) const ALLOCATION_CONTEXT_ID: u32 = 1;

/// What the handshake agreed on: the export and how to talk about it.
pub(super) struct Session {
    pub name: String,
    pub view: Arc<dyn DiskView>,
    pub size: u64,
    pub writable: bool,
    pub structured: bool,
    /// `base:allocation` was selected for this export (`NBD_CMD_BLOCK_STATUS` allowed).
    pub allocation_context: bool,
}

/// The transmission flags of an export.
pub(super) fn transmission_flags(writable: bool, structured: bool) -> u16 {
    let mut flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_CACHE;
    if structured {
        flags |= NBD_FLAG_SEND_DF;
    }
    if writable {
        flags |= NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
    } else {
        // Nothing changes under a read-only export, so every connection sees the same bytes.
        flags |= NBD_FLAG_READ_ONLY | NBD_FLAG_CAN_MULTI_CONN;
    }
    flags
}

struct State {
    no_zeroes: bool,
    structured: bool,
    /// The export named by the last `NBD_OPT_SET_META_CONTEXT` and whether it selected
    /// `base:allocation`.
    meta: Option<(String, bool)>,
}

/// Runs the handshake. `Ok(None)`: the client aborted or left, or the server is stopping.
pub(super) async fn negotiate<R, W>(
    server: &NbdServer,
    r: &mut R,
    w: &mut W,
    stop: &mut watch::Receiver<bool>,
) -> io::Result<Option<Session>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = BytesMut::with_capacity(18);
    hello.put_u64(NBDMAGIC);
    hello.put_u64(IHAVEOPT);
    hello.put_u16(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    w.write_all(&hello).await?;
    w.flush().await?;

    let client_flags = r.read_u32().await?;
    if client_flags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(violation(format!("unknown client flags {client_flags:#x}")));
    }
    let mut state = State {
        no_zeroes: client_flags & NBD_FLAG_C_NO_ZEROES != 0,
        structured: false,
        meta: None,
    };

    loop {
        let mut header = [0u8; 16];
        tokio::select! {
            biased;
            _ = stopped(stop) => return Ok(None),
            read = read_exact_or_eof(r, &mut header) => {
                if !read? {
                    return Ok(None);
                }
            }
        }
        let magic = u64::from_be_bytes(header[0..8].try_into().unwrap_or_default());
        let option = u32::from_be_bytes(header[8..12].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(header[12..16].try_into().unwrap_or_default());
        if magic != IHAVEOPT {
            return Err(violation(format!("bad option magic {magic:#x}")));
        }
        if len > MAX_OPTION_DATA {
            if len > MAX_OPTION_DRAIN || option == NBD_OPT_EXPORT_NAME {
                return Err(violation(format!("option {option} with {len} bytes of data")));
            }
            drain(r, u64::from(len)).await?;
            reply(w, option, NBD_REP_ERR_TOO_BIG, b"option data too large").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;

        if *stop.borrow() {
            if option != NBD_OPT_EXPORT_NAME {
                let _ = reply(w, option, NBD_REP_ERR_SHUTDOWN, b"server is shutting down").await;
            }
            return Ok(None);
        }

        match option {
            NBD_OPT_EXPORT_NAME => {
                let Ok(name) = String::from_utf8(data) else {
                    return Err(violation("export name is not UTF-8"));
                };
                let view = match server.open(&name).await {
                    Ok(view) => view,
                    Err(e) => {
                        // This option cannot fail politely: the spec says to close.
                        info!(export = %name, error = %e, "NBD_OPT_EXPORT_NAME of an export that cannot be opened");
                        return Ok(None);
                    }
                };
                let session = session(name, view, &state);
                let mut out = BytesMut::with_capacity(134);
                out.put_u64(session.size);
                out.put_u16(transmission_flags(session.writable, session.structured));
                if !state.no_zeroes {
                    out.put_bytes(0, 124);
                }
                w.write_all(&out).await?;
                w.flush().await?;
                return Ok(Some(session));
            }
            NBD_OPT_ABORT => {
                let _ = reply(w, option, NBD_REP_ACK, b"").await;
                return Ok(None);
            }
            NBD_OPT_LIST => {
                if !data.is_empty() {
                    reply(w, option, NBD_REP_ERR_INVALID, b"NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                match server.catalog.list().await {
                    Ok(exports) => {
                        let mut out = BytesMut::new();
                        for export in exports {
                            let name = export.name.as_bytes();
                            let description = truncate(&export.description, MAX_STRING).as_bytes();
                            let mut body = BytesMut::with_capacity(4 + name.len() + description.len());
                            body.put_u32(name.len() as u32);
                            body.put_slice(name);
                            body.put_slice(description);
                            put_reply(&mut out, option, NBD_REP_SERVER, &body);
                        }
                        put_reply(&mut out, option, NBD_REP_ACK, b"");
                        w.write_all(&out).await?;
                        w.flush().await?;
                    }
                    Err(e) => {
                        let msg = format!("cannot list exports: {e}");
                        reply(w, option, NBD_REP_ERR_POLICY, truncate(&msg, MAX_STRING).as_bytes()).await?;
                    }
                }
            }
            NBD_OPT_STARTTLS => {
                // NOTLS mode (policy for now): the spec allows ERR_UNSUP or ERR_POLICY here.
                reply(w, option, NBD_REP_ERR_UNSUP, b"TLS is not supported by this server").await?;
            }
            NBD_OPT_INFO | NBD_OPT_GO => {
                if let Some(session) = info_or_go(server, w, option, &data, &state).await? {
                    return Ok(Some(session));
                }
            }
            NBD_OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(
                        w,
                        option,
                        NBD_REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                } else {
                    state.structured = true;
                    reply(w, option, NBD_REP_ACK, b"").await?;
                }
            }
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                meta_context(server, w, option, &data, &mut state).await?;
            }
            other => {
                debug!(option = other, "unsupported NBD option");
                reply(w, other, NBD_REP_ERR_UNSUP, b"option not supported").await?;
            }
        }
    }
}

fn session(name: String, view: Arc<dyn DiskView>, state: &State) -> Session {
    let allocation_context = state.structured && matches!(&state.meta, Some((n, true)) if *n == name);
    Session {
        size: view.size(),
        writable: view.writable(),
        structured: state.structured,
        allocation_context,
        name,
        view,
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`: returns the session when `NBD_OPT_GO` succeeded.
async fn info_or_go<W: AsyncWrite + Unpin>(
    server: &NbdServer,
    w: &mut W,
    option: u32,
    data: &[u8],
    state: &State,
) -> io::Result<Option<Session>> {
    let mut p = Parser(data);
    let parsed = (|| {
        let name = p.string_u32()?;
        let n = p.u16()?;
        let mut requests = BTreeSet::new();
        for _ in 0..n {
            requests.insert(p.u16()?);
        }
        p.end()?;
        Some((name, requests))
    })();
    let Some((name, requests)) = parsed else {
        reply(w, option, NBD_REP_ERR_INVALID, b"malformed NBD_OPT_INFO/NBD_OPT_GO").await?;
        return Ok(None);
    };
    let view = match server.open(&name).await {
        Ok(view) => view,
        Err(e) => {
            let (code, msg) = open_error(&name, &e);
            reply(w, option, code, msg.as_bytes()).await?;
            return Ok(None);
        }
    };
    let session = session(name, view, state);
    let cfg = server.config();

    let mut out = BytesMut::new();
    let mut info = BytesMut::with_capacity(12);
    info.put_u16(NBD_INFO_EXPORT);
    info.put_u64(session.size);
    info.put_u16(transmission_flags(session.writable, session.structured));
    put_reply(&mut out, option, NBD_REP_INFO, &info);

    // Sent whether asked or not (clients ignore what they do not understand).
    let mut info = BytesMut::with_capacity(14);
    info.put_u16(NBD_INFO_BLOCK_SIZE);
    info.put_u32(cfg.min_block);
    info.put_u32(4096);
    info.put_u32(cfg.max_request);
    put_reply(&mut out, option, NBD_REP_INFO, &info);

    if requests.contains(&NBD_INFO_NAME) {
        let mut info = BytesMut::with_capacity(2 + session.name.len());
        info.put_u16(NBD_INFO_NAME);
        info.put_slice(session.name.as_bytes());
        put_reply(&mut out, option, NBD_REP_INFO, &info);
    }
    if requests.contains(&NBD_INFO_DESCRIPTION) {
        if let Ok(exports) = server.catalog.list().await {
            if let Some(export) = exports.iter().find(|e| e.name == session.name) {
                if !export.description.is_empty() {
                    let description = truncate(&export.description, MAX_STRING);
                    let mut info = BytesMut::with_capacity(2 + description.len());
                    info.put_u16(NBD_INFO_DESCRIPTION);
                    info.put_slice(description.as_bytes());
                    put_reply(&mut out, option, NBD_REP_INFO, &info);
                }
            }
        }
    }
    put_reply(&mut out, option, NBD_REP_ACK, b"");
    w.write_all(&out).await?;
    w.flush().await?;
    Ok((option == NBD_OPT_GO).then_some(session))
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: only `base:allocation` exists.
async fn meta_context<W: AsyncWrite + Unpin>(
    server: &NbdServer,
    w: &mut W,
    option: u32,
    data: &[u8],
    state: &mut State,
) -> io::Result<()> {
    let set = option == NBD_OPT_SET_META_CONTEXT;
    if set {
        // A SET replaces the selection even when it fails.
        state.meta = None;
    }
    if !state.structured {
        return reply(
            w,
            option,
            NBD_REP_ERR_INVALID,
            b"negotiate NBD_OPT_STRUCTURED_REPLY first",
        )
        .await;
    }
    let mut p = Parser(data);
    let parsed = (|| {
        let name = p.string_u32()?;
        let n = p.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(p.string_u32()?);
        }
        p.end()?;
        Some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        return reply(w, option, NBD_REP_ERR_INVALID, b"malformed meta context request").await;
    };
    if let Err(e) = server.open(&name).await {
        let (code, msg) = open_error(&name, &e);
        return reply(w, option, code, msg.as_bytes()).await;
    }
    let allocation = if set {
        queries.iter().any(|q| q == BASE_ALLOCATION)
    } else {
        queries.is_empty() || queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:")
    };
    let mut out = BytesMut::new();
    if allocation {
        let mut body = BytesMut::with_capacity(4 + BASE_ALLOCATION.len());
        body.put_u32(if set { ALLOCATION_CONTEXT_ID } else { 0 });
        body.put_slice(BASE_ALLOCATION.as_bytes());
        put_reply(&mut out, option, NBD_REP_META_CONTEXT, &body);
    }
    put_reply(&mut out, option, NBD_REP_ACK, b"");
    if set {
        state.meta = Some((name, allocation));
    }
    w.write_all(&out).await?;
    w.flush().await
}

fn open_error(name: &str, e: &io::Error) -> (u32, String) {
    let code = match e.kind() {
        io::ErrorKind::PermissionDenied => NBD_REP_ERR_POLICY,
        _ => NBD_REP_ERR_UNKNOWN,
    };
    let msg = if e.kind() == io::ErrorKind::NotFound {
        format!("no export named {name:?}")
    } else {
        format!("export {name:?} cannot be opened: {e}")
    };
    (code, truncate(&msg, MAX_STRING).to_owned())
}

fn put_reply(out: &mut BytesMut, option: u32, ty: u32, data: &[u8]) {
    out.reserve(20 + data.len());
    out.put_u64(OPT_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(ty);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

async fn reply<W: AsyncWrite + Unpin>(w: &mut W, option: u32, ty: u32, data: &[u8]) -> io::Result<()> {
    let mut out = BytesMut::with_capacity(20 + data.len());
    put_reply(&mut out, option, ty, data);
    w.write_all(&out).await?;
    w.flush().await
}

/// Fills `buf`; `Ok(false)` on a clean EOF before its first byte.
pub(super) async fn read_exact_or_eof<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = r.read(&mut buf[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-message",
            ));
        }
        filled += n;
    }
    Ok(true)
}

/// Reads and discards `len` bytes.
pub(super) async fn drain<R: AsyncRead + Unpin>(r: &mut R, len: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed mid-message",
        ));
    }
    Ok(())
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(super) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A bounds-checked reader over option data.
struct Parser<'a>(&'a [u8]);

impl Parser<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    /// A string preceded by its 32-bit length; UTF-8 and at most 4096 bytes.
    fn string_u32(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return None;
        }
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }

    fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}
