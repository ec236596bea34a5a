//! Test support for the NBD server: an in-memory [`DiskView`] with real holes, a catalog of
//! them, a server on an ephemeral port, and checks that the external NBD clients are installed.
#![allow(dead_code)]

pub mod raw;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use futures::future::BoxFuture;
use lifeboat_fs::nbd::{NbdConfig, NbdServer, NbdStats};
use lifeboat_fs::view::{DiskView, ExportCatalog, ExportInfo, Extent};

/// Allocation is tracked per block of this size.
pub const BLOCK: u64 = 4096;

enum Store {
    /// Read-only: reads are zero-copy slices of one buffer.
    Frozen(Bytes),
    Mutable(RwLock<Vec<u8>>),
}

/// A disk in memory: bytes plus a per-4-KiB-block allocation map. Holes read as zeroes.
pub struct MemView {
    store: Store,
    size: u64,
    allocated: RwLock<Vec<bool>>,
    /// Copy every read out of the store (what a cache in front of decryption would cost).
    copy_reads: bool,
}

impl MemView {
    /// A read-only view of `data` whose blocks in `holes` (byte ranges, block-aligned or ending at
    /// the end) are unallocated; `data` must already be zero there.
    pub fn read_only(data: Vec<u8>, holes: &[(u64, u64)]) -> Self {
        let size = data.len() as u64;
        let view = Self {
            store: Store::Frozen(Bytes::from(data)),
            size,
            allocated: RwLock::new(vec![true; size.div_ceil(BLOCK) as usize]),
            copy_reads: false,
        };
        view.mark(holes, false);
        view
    }

    /// A writable view of `size` bytes, all hole.
    pub fn writable(size: u64) -> Self {
        Self {
            store: Store::Mutable(RwLock::new(vec![0; size as usize])),
            size,
            allocated: RwLock::new(vec![false; size.div_ceil(BLOCK) as usize]),
            copy_reads: false,
        }
    }

    pub fn with_copied_reads(mut self) -> Self {
        self.copy_reads = true;
        self
    }

    fn mark(&self, ranges: &[(u64, u64)], allocated: bool) {
        let mut map = self.allocated.write().unwrap();
        for &(start, end) in ranges {
            for block in start / BLOCK..end.div_ceil(BLOCK) {
                map[block as usize] = allocated;
            }
        }
    }

    /// The whole content.
    pub fn contents(&self) -> Vec<u8> {
        match &self.store {
            Store::Frozen(b) => b.to_vec(),
            Store::Mutable(v) => v.read().unwrap().clone(),
        }
    }
}

impl DiskView for MemView {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>> {
        Box::pin(async move {
            let (start, end) = (offset as usize, offset as usize + len);
            assert!(end as u64 <= self.size, "the server must check ranges before reading");
            Ok(match &self.store {
                Store::Frozen(b) if self.copy_reads => Bytes::copy_from_slice(&b[start..end]),
                Store::Frozen(b) => b.slice(start..end),
                Store::Mutable(v) => Bytes::copy_from_slice(&v.read().unwrap()[start..end]),
            })
        })
    }

    fn extents(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<Vec<Extent>>> {
        Box::pin(async move {
            let map = self.allocated.read().unwrap();
            let end = offset + len;
            let mut out: Vec<Extent> = Vec::new();
            let mut pos = offset;
            while pos < end {
                let block = pos / BLOCK;
                let stop = ((block + 1) * BLOCK).min(end);
                let allocated = map[block as usize];
                match out.last_mut() {
                    Some(last) if last.allocated == allocated => last.len += stop - pos,
                    _ => out.push(Extent {
                        offset: pos,
                        len: stop - pos,
                        allocated,
                    }),
                }
                pos = stop;
            }
            Ok(out)
        })
    }

    fn writable(&self) -> bool {
        matches!(self.store, Store::Mutable(_))
    }

    fn write_at(&self, offset: u64, data: Bytes) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let Store::Mutable(v) = &self.store else {
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only export"));
            };
            let end = offset + data.len() as u64;
            assert!(end <= self.size, "the server must check ranges before writing");
            v.write().unwrap()[offset as usize..end as usize].copy_from_slice(&data);
            self.mark(&[(offset, end)], true);
            Ok(())
        })
    }
}

/// A fixed set of exports.
#[derive(Default)]
pub struct MemCatalog {
    exports: Vec<(ExportInfo, Arc<dyn DiskView>)>,
}

impl MemCatalog {
    pub fn add(&mut self, name: &str, description: &str, view: Arc<dyn DiskView>) {
        self.exports.push((
            ExportInfo {
                name: name.into(),
                description: description.into(),
            },
            view,
        ));
    }
}

impl ExportCatalog for MemCatalog {
    fn list(&self) -> BoxFuture<'_, io::Result<Vec<ExportInfo>>> {
        Box::pin(async move { Ok(self.exports.iter().map(|(info, _)| info.clone()).collect()) })
    }

    fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Arc<dyn DiskView>>> {
        Box::pin(async move {
            self.exports
                .iter()
                .find(|(info, _)| info.name == name)
                .map(|(_, view)| view.clone())
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no export {name}")))
        })
    }
}

/// Deterministic bytes that differ at every offset (xorshift, seeded per call).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    out
}

/// A disk image of `size` bytes with `holes` zeroed (and unallocated in the view built from it).
pub fn image(size: usize, seed: u64, holes: &[(u64, u64)]) -> Vec<u8> {
    let mut data = pattern(size, seed);
    for &(start, end) in holes {
        data[start as usize..end as usize].fill(0);
    }
    data
}

/// A running server on 127.0.0.1; dropping it does not stop it, call [`TestServer::stop`].
pub struct TestServer {
    pub addr: SocketAddr,
    pub stats: Arc<NbdStats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(catalog: MemCatalog) -> Self {
        Self::start_with(catalog, NbdConfig::default()).await
    }

    pub async fn start_with(catalog: MemCatalog, config: NbdConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Arc::new(NbdServer::with_config(Arc::new(catalog), config));
        let stats = server.stats();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(server.serve(listener, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            stats,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// `nbd://127.0.0.1:PORT/NAME` with the name as written (see [`uri_encoded`] for the other form).
    pub fn uri(&self, name: &str) -> String {
        format!("nbd://{}/{}", self.addr, name)
    }

    /// Stops the server and waits for `serve` to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(std::time::Duration::from_secs(20), task)
                .await
                .expect("serve() did not return after shutdown")
                .unwrap();
        }
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn uri_encoded(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Fails loudly when an external client is missing: these tests never skip.
pub fn require_tool(tool: &str) {
    let ok = std::process::Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "`{tool}` is required by the NBD tests and was not found: install it with \
         `apt-get install -y libnbd-bin qemu-utils` (.ci/setup does)"
    );
}

/// Runs a command, panics with its output unless it succeeds, returns stdout.
pub async fn run(cmd: &str, args: &[&str]) -> String {
    require_tool(cmd);
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        tokio::process::Command::new(cmd).args(args).kill_on_drop(true).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{cmd} {args:?} timed out"))
    .unwrap_or_else(|e| panic!("{cmd} failed to start: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
