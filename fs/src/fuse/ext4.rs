//! ext2/3/4 partitions read in user space with `ext4-view`. Its handle is `Rc` (not `Send`), so
//! each partition gets a few worker threads, each with its own handle over the same bytes; jobs
//! are closures sent to a worker. The bytes come through a shared chunk cache with sequential
//! prefetch, so ext4-view's small block reads turn into few large remote reads.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ext4_view::{Ext4, Ext4Error, Ext4Read, Metadata};
use tokio::runtime::Handle;
use tracing::{debug, info, warn};

use super::inodes::InodeFs;
use crate::view::DiskView;

/// Bytes per cached chunk for filesystem reads (small files stay cheap)...
pub const FS_CHUNK: u64 = 256 << 10;
/// ... and for raw image reads (fewer, larger remote reads).
pub const RAW_CHUNK: u64 = 1 << 20;
/// Chunks kept in flight ahead of a sequential reader.
const PREFETCH: u64 = 8;

#[derive(Clone)]
struct Weight;

impl quick_cache::Weighter<u64, Bytes> for Weight {
    fn weight(&self, _key: &u64, val: &Bytes) -> u64 {
        val.len().max(1) as u64
    }
}

/// Aligned chunks of one disk view, fetched once however many readers ask.
pub struct ChunkCache {
    view: Arc<dyn DiskView>,
    chunk: u64,
    chunks: quick_cache::sync::Cache<u64, Bytes, Weight>,
    /// Chunks being prefetched (so each is asked for once).
    inflight: std::sync::Mutex<std::collections::HashSet<u64>>,
    rt: Handle,
}

impl ChunkCache {
    /// A cache of `bytes` in chunks of `chunk` bytes.
    pub fn new(view: Arc<dyn DiskView>, chunk: u64, bytes: u64, rt: Handle) -> Arc<Self> {
        let items = (bytes / chunk).max(16) as usize;
        Arc::new(Self {
            view,
            chunk,
            chunks: quick_cache::sync::Cache::with_weighter(items, bytes.max(16 * chunk), Weight),
            inflight: std::sync::Mutex::new(std::collections::HashSet::new()),
            rt,
        })
    }

    pub fn size(&self) -> u64 {
        self.view.size()
    }

    async fn chunk(self: &Arc<Self>, idx: u64) -> io::Result<Bytes> {
        self.prefetch(idx);
        if let Some(hit) = self.chunks.get(&idx) {
            return Ok(hit);
        }
        self.load(idx).await
    }

    /// A reader at chunk `idx` that looks sequential (the predecessor is here): keeps the next
    /// chunks in flight.
    fn prefetch(self: &Arc<Self>, idx: u64) {
        if idx > 0 && self.chunks.peek(&(idx - 1)).is_some() {
            for next in idx + 1..=idx + PREFETCH {
                if next * self.chunk >= self.view.size() {
                    break;
                }
                if self.chunks.peek(&next).is_none() && self.inflight.lock().expect("lock").insert(next) {
                    let me = self.clone();
                    self.rt.spawn(async move {
                        let _ = me.load(next).await;
                        me.inflight.lock().expect("lock").remove(&next);
                    });
                }
            }
        }
    }

    /// One chunk from the cache, or fetched once however many ask at the same time.
    fn load(&self, idx: u64) -> futures::future::BoxFuture<'_, io::Result<Bytes>> {
        Box::pin(async move {
            let guard = match self.chunks.get_value_or_guard_async(&idx).await {
                Ok(hit) => return Ok(hit),
                Err(guard) => guard,
            };
            let at = idx * self.chunk;
            let n = (self.view.size() - at).min(self.chunk) as usize;
            let data = self.view.read_at(at, n).await?;
            let _ = guard.insert(data.clone());
            Ok(data)
        })
    }

    /// Fills `dst` from `offset` when every chunk it needs is cached; `false` (and `dst`
    /// partly written) otherwise. No runtime needed: the hot path of ext4 metadata reads.
    pub fn read_cached(&self, offset: u64, dst: &mut [u8]) -> bool {
        let end = offset + dst.len() as u64;
        let mut at = offset;
        while at < end {
            let idx = at / self.chunk;
            let Some(c) = self.chunks.get(&idx) else {
                return false;
            };
            let lo = (at - idx * self.chunk) as usize;
            if lo >= c.len() {
                return false;
            }
            let n = ((end - at) as usize).min(c.len() - lo);
            let d = (at - offset) as usize;
            dst[d..d + n].copy_from_slice(&c[lo..lo + n]);
            at += n as u64;
        }
        true
    }

    /// Like [`Self::read_cached`], for readers of file data: also keeps a sequential reader's
    /// next chunks in flight, as [`Self::read`] does.
    pub fn try_read(self: &Arc<Self>, offset: u64, dst: &mut [u8]) -> bool {
        let end = offset + dst.len() as u64;
        if end > self.view.size() {
            return false;
        }
        for idx in offset / self.chunk..end.div_ceil(self.chunk) {
            self.prefetch(idx);
        }
        self.read_cached(offset, dst)
    }

    /// Fills `dst` from `offset` of the disk.
    pub async fn read(self: &Arc<Self>, offset: u64, dst: &mut [u8]) -> io::Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(dst.len() as u64)
            .filter(|e| *e <= self.view.size())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read beyond the end of the disk"))?;
        let mut at = offset;
        while at < end {
            let idx = at / self.chunk;
            let c = self.chunk(idx).await?;
            let lo = (at - idx * self.chunk) as usize;
            let n = ((end - at) as usize).min(c.len() - lo);
            let d = (at - offset) as usize;
            dst[d..d + n].copy_from_slice(&c[lo..lo + n]);
            at += n as u64;
        }
        Ok(())
    }
}

/// One partition's bytes, as ext4-view reads them (blocking, from a worker thread).
struct PartReader {
    cache: Arc<ChunkCache>,
    start: u64,
    len: u64,
}

impl Ext4Read for PartReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        if start_byte.saturating_add(dst.len() as u64) > self.len {
            return Err(Box::new(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read beyond the end of the partition",
            )));
        }
        let cache = self.cache.clone();
        let at = self.start + start_byte;
        cache
            .rt
            .clone()
            .block_on(cache.read(at, dst))
            .map_err(|e| Box::new(e) as _)
    }
}

/// Files a worker keeps open (by node inode) before it starts over.
const WORKER_FILES: usize = 256;

/// What a worker thread owns: its filesystem handle and the files opened on it.
pub struct Worker {
    pub fs: Ext4,
    pub files: HashMap<u64, ext4_view::File>,
}

impl Worker {
    /// The file at `path`, opened once and kept under `key` (at most [`WORKER_FILES`]).
    pub fn file(&mut self, key: u64, path: &[u8]) -> Result<&mut ext4_view::File, Ext4Error> {
        if !self.files.contains_key(&key) {
            if self.files.len() >= WORKER_FILES {
                self.files.clear();
            }
            let f = self.fs.open(ext4_view::Path::new(path))?;
            self.files.insert(key, f);
        }
        Ok(self.files.get_mut(&key).expect("inserted"))
    }
}

/// A job for a worker; `None` when this worker could not load the filesystem.
pub type Job = Box<dyn FnOnce(Option<&mut Worker>) + Send>;

static NEXT_PART: AtomicU64 = AtomicU64::new(1);

/// An ext2/3/4 partition: read by inode number in place when [`InodeFs`] can, else served by a
/// few `ext4-view` worker threads.
pub struct Ext4Part {
    pub id: u64,
    pub fast: Option<Arc<InodeFs>>,
    workers: Vec<mpsc::Sender<Job>>,
    next: AtomicUsize,
}

impl Ext4Part {
    /// Starts `workers` threads over the partition `[start, start + len)` of the cached disk;
    /// fails (without leaving threads behind) when the first cannot load the filesystem.
    pub fn open(cache: Arc<ChunkCache>, start: u64, len: u64, workers: usize, name: &str) -> io::Result<Arc<Self>> {
        match InodeFs::open(cache.clone(), start, len, cache.rt.clone()) {
            Ok(Some(fast)) => {
                return Ok(Arc::new(Self {
                    id: NEXT_PART.fetch_add(1, Ordering::Relaxed),
                    fast: Some(fast),
                    workers: Vec::new(),
                    next: AtomicUsize::new(0),
                }))
            }
            Ok(None) => info!(
                partition = name,
                "journal to replay or features the inode reader lacks: ext4-view reads it"
            ),
            Err(e) => debug!(partition = name, error = %e, "inode reader refused the partition"),
        }
        let mut senders = Vec::new();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        for i in 0..workers.max(1) {
            let (tx, rx) = mpsc::channel::<Job>();
            let reader = PartReader {
                cache: cache.clone(),
                start,
                len,
            };
            let ready = (i == 0).then(|| ready_tx.clone());
            std::thread::Builder::new()
                .name(format!("ext4-{i}"))
                .spawn(move || worker(reader, rx, ready))?;
            senders.push(tx);
            if i == 0 {
                let loaded = ready_rx
                    .recv_timeout(Duration::from_secs(120))
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("{name}: loading ext4 timed out")))?;
                if let Err(e) = loaded {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{name}: {e}")));
                }
            }
        }
        Ok(Arc::new(Self {
            id: NEXT_PART.fetch_add(1, Ordering::Relaxed),
            fast: None,
            workers: senders,
            next: AtomicUsize::new(0),
        }))
    }

    /// Runs `job` on any worker (round robin).
    pub fn run_any(&self, job: Job) {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.run_on(i as u64, job);
    }

    /// Runs `job` on the worker that owns file handle `fh`.
    pub fn run_on(&self, fh: u64, job: Job) {
        if self.workers.is_empty() {
            return job(None);
        }
        let w = &self.workers[(fh % self.workers.len() as u64) as usize];
        if let Err(mpsc::SendError(job)) = w.send(job) {
            job(None);
        }
    }
}

fn worker(reader: PartReader, rx: mpsc::Receiver<Job>, ready: Option<mpsc::Sender<Result<(), String>>>) {
    let mut state = match Ext4::load(Box::new(reader)) {
        Ok(fs) => {
            if let Some(r) = ready {
                let _ = r.send(Ok(()));
            }
            Some(Worker {
                fs,
                files: HashMap::new(),
            })
        }
        Err(e) => {
            debug!(error = %e, "not a readable ext2/3/4 filesystem");
            if let Some(r) = ready {
                let _ = r.send(Err(e.to_string()));
            } else {
                warn!(error = %e, "ext4 worker could not load the filesystem");
            }
            None
        }
    };
    while let Ok(job) = rx.recv() {
        job(state.as_mut());
    }
}

/// The attributes of an ext4 inode that the mount shows.
#[derive(Clone, Debug)]
pub struct Meta {
    pub kind: fuser::FileType,
    pub size: u64,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

fn time(t: ext4_view::Timestamp) -> SystemTime {
    let s = t.seconds();
    let base = if s >= 0 {
        UNIX_EPOCH + Duration::from_secs(s as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(s.unsigned_abs())
    };
    base + Duration::from_nanos(u64::from(t.nanoseconds().min(999_999_999)))
}

impl From<&Metadata> for Meta {
    fn from(m: &Metadata) -> Self {
        use ext4_view::FileType as F;
        let kind = match m.file_type() {
            F::Directory => fuser::FileType::Directory,
            F::Symlink => fuser::FileType::Symlink,
            F::BlockDevice => fuser::FileType::BlockDevice,
            F::CharacterDevice => fuser::FileType::CharDevice,
            F::Fifo => fuser::FileType::NamedPipe,
            F::Socket => fuser::FileType::Socket,
            _ => fuser::FileType::RegularFile,
        };
        Self {
            kind,
            size: m.len(),
            perm: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            atime: time(m.accessed()),
            mtime: time(m.modified()),
            // ext4-view exposes no ctime: the modification time stands in.
            ctime: time(m.modified()),
        }
    }
}

/// The errno an ext4-view error stands for.
pub fn errno(e: &Ext4Error) -> fuser::Errno {
    match e {
        Ext4Error::NotFound => fuser::Errno::ENOENT,
        Ext4Error::NotADirectory => fuser::Errno::ENOTDIR,
        Ext4Error::IsADirectory => fuser::Errno::EISDIR,
        Ext4Error::MalformedPath | Ext4Error::PathTooLong => fuser::Errno::ENAMETOOLONG,
        Ext4Error::NotASymlink => fuser::Errno::EINVAL,
        Ext4Error::Encrypted | Ext4Error::IsASpecialFile => fuser::Errno::EACCES,
        _ => fuser::Errno::EIO,
    }
}
