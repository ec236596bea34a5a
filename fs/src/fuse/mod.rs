//! The recovery points as a read-only FUSE filesystem (`lifeboat mount`):
//!
//! ```text
//! MOUNTPOINT/MACHINE/latest -> 2026-11-22T12-00-00Z-app-nightly
//! MOUNTPOINT/MACHINE/2026-11-22T10-05-00Z-crash/disk0.img      the raw disk at that point
//! MOUNTPOINT/MACHINE/2026-11-22T10-05-00Z-crash/disk0/p1/...   an ext2/3/4 partition's files
//! MOUNTPOINT/MACHINE/2026-11-22T10-05-00Z-crash/disk0/p2.img   a partition it cannot read
//! ```
//!
//! The tree (machines, points, disks) comes from a [`PointSource`] and is refreshed when older
//! than [`MountConfig::listing_ttl`], so new points appear and expired ones vanish without
//! remounting; a file already open keeps its view and reads on. Everything inside a point is
//! immutable, so the kernel is told to keep it: listings carry attributes (READDIRPLUS), opens
//! are zero-message (reads name the inode), symlinks and pages stay cached; reading a small file
//! costs one READ. Cached reads reply on the FUSE thread, others run as tasks on a tokio runtime;
//! ext4 partitions are read by inode number ([`inodes`]: directories read once, files mapped from
//! their inode), or on per-partition `ext4-view` worker threads ([`ext4`]) when a journal needs
//! replaying; the FUSE session has several threads, so one slow read never stalls the filesystem.

pub mod ext4;
pub mod inodes;
pub mod names;
pub mod partitions;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, OpenAccMode,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request,
};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tracing::{debug, info, warn};

use crate::pit::PointInfo;
use crate::view::DiskView;
use ext4::{ChunkCache, Ext4Part, Meta};
use inodes::InodeFs;
use partitions::Partition;

/// A disk of a machine, as the management API lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSize {
    pub disk: String,
    pub size: u64,
}

/// A protected machine and its disks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineDisks {
    pub machine: String,
    pub disks: Vec<DiskSize>,
}

/// Where the mount gets its tree and its bytes: the management API and the NBD port of an
/// appliance, or anything else (tests use memory).
pub trait PointSource: Send + Sync + 'static {
    fn machines(&self) -> BoxFuture<'_, io::Result<Vec<MachineDisks>>>;
    /// A machine's recovery points (any order; unreadable ones are skipped).
    fn points<'a>(&'a self, machine: &'a str) -> BoxFuture<'a, io::Result<Vec<PointInfo>>>;
    /// The view of `machine/disk` at point `point` (an id).
    fn open<'a>(&'a self, machine: &'a str, disk: &'a str, point: u64) -> BoxFuture<'a, io::Result<Arc<dyn DiskView>>>;
}

/// Tunables of the mount.
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// Show only this machine.
    pub machine: Option<String>,
    /// The machine and point listings are fetched again when older than this.
    pub listing_ttl: Duration,
    /// FUSE session threads.
    pub threads: usize,
    /// Worker threads per ext4 partition.
    pub ext4_workers: usize,
    /// Bytes of chunk cache per disk read through ext4.
    pub cache_bytes: u64,
}

impl Default for MountConfig {
    fn default() -> Self {
        Self {
            machine: None,
            listing_ttl: Duration::from_secs(2),
            threads: 4,
            ext4_workers: 4,
            cache_bytes: 64 << 20,
        }
    }
}

/// Kernel cache lifetime of names and attributes that change (machines, points, `latest`).
const SHORT_TTL: Duration = Duration::from_secs(1);
/// ... and of everything inside a point, which never changes.
const LONG_TTL: Duration = Duration::from_secs(60);
const SEEK_DATA: i32 = 3;
const SEEK_HOLE: i32 = 4;
/// Largest read the kernel is asked to send (also its readahead).
const MAX_READ: u32 = 1 << 20;

/// One disk at one point, shared by every node that shows it.
struct DiskRef {
    machine: String,
    point: u64,
    disk: String,
    size: u64,
    time: SystemTime,
    view: tokio::sync::OnceCell<Arc<dyn DiskView>>,
    layout: tokio::sync::OnceCell<Arc<Vec<PartEntry>>>,
}

struct PartEntry {
    part: Partition,
    ext4: Option<Arc<Ext4Part>>,
}

#[derive(Clone, Hash, PartialEq, Eq)]
enum Key {
    Root,
    Machine(String),
    /// `latest` of a machine while it names one point: a new node when it moves, so each
    /// symlink's target never changes and the kernel may cache it.
    Latest(String, String),
    Point(String, u64),
    DiskImg(String, u64, String),
    DiskDir(String, u64, String),
    Part(String, u64, String, u32),
    Ext4(u64, Vec<u8>),
}

enum Kind {
    Root,
    Machine(String),
    /// `latest`: its target (a point's directory name).
    Latest(String),
    Point {
        machine: String,
        id: u64,
        time: SystemTime,
    },
    DiskImg(Arc<DiskRef>),
    DiskDir(Arc<DiskRef>),
    PartImg {
        disk: Arc<DiskRef>,
        start: u64,
        len: u64,
    },
    Ext4 {
        part: Arc<Ext4Part>,
        path: Vec<u8>,
        /// The ext4 inode number (0: unknown, the partition is read through `ext4-view`).
        ino: u32,
        meta: OnceLock<Meta>,
        time: SystemTime,
    },
}

struct Node {
    ino: u64,
    parent: u64,
    kind: Kind,
}

impl Node {
    fn file_type(&self) -> FileType {
        match &self.kind {
            Kind::Latest(_) => FileType::Symlink,
            Kind::DiskImg(_) | Kind::PartImg { .. } => FileType::RegularFile,
            Kind::Ext4 { meta, path, .. } => match meta.get() {
                Some(m) => m.kind,
                None if path == b"/" => FileType::Directory,
                None => FileType::RegularFile,
            },
            _ => FileType::Directory,
        }
    }
}

#[derive(Default)]
struct Nodes {
    by_ino: HashMap<u64, Arc<Node>>,
    by_key: HashMap<Key, u64>,
    next: u64,
}

struct PointEntry {
    id: u64,
    name: String,
    time: SystemTime,
    disks: Vec<DiskSize>,
}

#[derive(Default)]
struct Listing {
    machines: Option<(Instant, Arc<Vec<MachineDisks>>)>,
    points: HashMap<String, (Instant, Arc<Vec<PointEntry>>)>,
}

/// A directory entry: name, inode, type.
type Entry = (OsString, u64, FileType);
/// Receives a directory listing.
type ListDone = Box<dyn FnOnce(Result<(Arc<Node>, Arc<Vec<Entry>>), Errno>) + Send>;

/// How a regular file's bytes are read, resolved once from its node (not per open: opens are
/// zero-message where the kernel allows) and kept in the bounded [`Inner::files`] cache.
enum FileRead {
    /// A raw image: `[base, base + len)` of a view.
    Raw {
        cache: Arc<ChunkCache>,
        view: Arc<dyn DiskView>,
        base: u64,
        len: u64,
    },
    /// A file of a partition read through `ext4-view` (workers open it by path).
    Ext4 {
        part: Arc<Ext4Part>,
        path: Vec<u8>,
        size: u64,
    },
    /// A file read by inode: its block runs.
    Inode {
        fs: Arc<InodeFs>,
        runs: Arc<Vec<inodes::Run>>,
        size: u64,
    },
}

#[derive(Clone)]
struct FileWeight;

impl quick_cache::Weighter<u64, Arc<FileRead>> for FileWeight {
    fn weight(&self, _key: &u64, val: &Arc<FileRead>) -> u64 {
        match &**val {
            FileRead::Inode { runs, .. } => runs.len() as u64 + 1,
            _ => 1,
        }
    }
}

/// An open directory: its listing, read on the handle's first READDIR.
struct DirHandle {
    entries: Mutex<Option<Arc<Vec<Entry>>>>,
}

struct Inner {
    source: Arc<dyn PointSource>,
    rt: Handle,
    cfg: MountConfig,
    nodes: Mutex<Nodes>,
    listing: Mutex<Listing>,
    disks: Mutex<HashMap<(String, u64, String), Arc<DiskRef>>>,
    caches: Mutex<HashMap<(String, u64, String), Arc<ChunkCache>>>,
    raw_caches: Mutex<HashMap<(String, u64, String), Arc<ChunkCache>>>,
    /// Open directories by handle.
    open: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    /// How files are read, by node inode (up to ~2M block runs in all).
    files: quick_cache::sync::Cache<u64, Arc<FileRead>, FileWeight>,
    /// The kernel takes ENOSYS from OPEN as "no opens needed" (FUSE_NO_OPEN_SUPPORT): no OPEN
    /// nor RELEASE round trip per file after the first.
    zero_open: AtomicBool,
    uid: u32,
    gid: u32,
    started: SystemTime,
}

/// The filesystem; hand it to [`mount`].
pub struct LifeboatFs {
    inner: Arc<Inner>,
}

fn ms_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn eio(e: impl std::fmt::Display) -> Errno {
    warn!(error = %e, "mount: I/O error");
    Errno::EIO
}

impl LifeboatFs {
    /// A filesystem over `source`; async work runs on `rt`.
    pub fn new(source: Arc<dyn PointSource>, cfg: MountConfig, rt: Handle) -> Self {
        // The mounting user owns the tree (FUSE lets only them in unless allow_other).
        let (uid, gid) = std::fs::metadata("/proc/self")
            .map(|m| (m.uid(), m.gid()))
            .unwrap_or((0, 0));
        let mut nodes = Nodes {
            next: 2,
            ..Default::default()
        };
        nodes.by_key.insert(Key::Root, 1);
        nodes.by_ino.insert(
            1,
            Arc::new(Node {
                ino: 1,
                parent: 1,
                kind: Kind::Root,
            }),
        );
        Self {
            inner: Arc::new(Inner {
                source,
                rt,
                cfg,
                nodes: Mutex::new(nodes),
                listing: Mutex::new(Listing::default()),
                disks: Mutex::new(HashMap::new()),
                caches: Mutex::new(HashMap::new()),
                raw_caches: Mutex::new(HashMap::new()),
                open: Mutex::new(HashMap::new()),
                next_fh: AtomicU64::new(1),
                files: quick_cache::sync::Cache::with_weighter(16384, 1 << 21, FileWeight),
                zero_open: AtomicBool::new(false),
                uid,
                gid,
                started: SystemTime::now(),
            }),
        }
    }
}

impl Inner {
    fn node(&self, ino: INodeNo) -> Result<Arc<Node>, Errno> {
        self.nodes
            .lock()
            .expect("lock")
            .by_ino
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    /// The inode of `key`, created by `make` the first time.
    fn intern(&self, key: Key, parent: u64, make: impl FnOnce() -> Kind) -> Arc<Node> {
        let mut nodes = self.nodes.lock().expect("lock");
        if let Some(ino) = nodes.by_key.get(&key) {
            return nodes.by_ino[ino].clone();
        }
        let ino = nodes.next;
        nodes.next += 1;
        let node = Arc::new(Node {
            ino,
            parent,
            kind: make(),
        });
        nodes.by_key.insert(key, ino);
        nodes.by_ino.insert(ino, node.clone());
        node
    }

    fn lookup_key(&self, key: &Key) -> Option<Arc<Node>> {
        let nodes = self.nodes.lock().expect("lock");
        nodes.by_key.get(key).map(|ino| nodes.by_ino[ino].clone())
    }

    fn fresh(&self, at: Instant) -> bool {
        at.elapsed() < self.cfg.listing_ttl
    }

    fn machines(&self) -> Result<Arc<Vec<MachineDisks>>, Errno> {
        if let Some((at, m)) = &self.listing.lock().expect("lock").machines {
            if self.fresh(*at) {
                return Ok(m.clone());
            }
        }
        match self.rt.block_on(self.source.machines()) {
            Ok(mut m) => {
                if let Some(only) = &self.cfg.machine {
                    m.retain(|x| &x.machine == only);
                }
                m.sort_by(|a, b| a.machine.cmp(&b.machine));
                let m = Arc::new(m);
                self.listing.lock().expect("lock").machines = Some((Instant::now(), m.clone()));
                Ok(m)
            }
            Err(e) => {
                warn!(error = %e, "mount: listing machines failed");
                match &self.listing.lock().expect("lock").machines {
                    Some((_, m)) => Ok(m.clone()),
                    None => Err(Errno::EIO),
                }
            }
        }
    }

    fn machine(&self, machine: &str) -> Result<MachineDisks, Errno> {
        self.machines()?
            .iter()
            .find(|m| m.machine == machine)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    /// A machine's readable points, oldest first, with their directory names.
    fn points(&self, machine: &str) -> Result<Arc<Vec<PointEntry>>, Errno> {
        if let Some((at, p)) = self.listing.lock().expect("lock").points.get(machine) {
            if self.fresh(*at) {
                return Ok(p.clone());
            }
        }
        let disks = self.machine(machine)?.disks;
        match self.rt.block_on(self.source.points(machine)) {
            Ok(mut points) => {
                points.retain(|p| p.readable);
                points.sort_by_key(|p| (p.time_ms, p.id));
                let names = names::unique_names(&points);
                let entries: Vec<PointEntry> = points
                    .iter()
                    .zip(names)
                    .map(|(p, name)| PointEntry {
                        id: p.id,
                        name,
                        time: ms_time(p.time_ms),
                        disks: disks.iter().filter(|d| p.seqs.contains_key(&d.disk)).cloned().collect(),
                    })
                    .collect();
                let entries = Arc::new(entries);
                self.listing
                    .lock()
                    .expect("lock")
                    .points
                    .insert(machine.to_string(), (Instant::now(), entries.clone()));
                Ok(entries)
            }
            Err(e) => {
                warn!(machine, error = %e, "mount: listing points failed");
                match self.listing.lock().expect("lock").points.get(machine) {
                    Some((_, p)) => Ok(p.clone()),
                    None if e.kind() == io::ErrorKind::NotFound => Err(Errno::ENOENT),
                    None => Err(Errno::EIO),
                }
            }
        }
    }

    fn disk_ref(&self, machine: &str, p: &PointEntry, d: &DiskSize) -> Arc<DiskRef> {
        self.disks
            .lock()
            .expect("lock")
            .entry((machine.to_string(), p.id, d.disk.clone()))
            .or_insert_with(|| {
                Arc::new(DiskRef {
                    machine: machine.to_string(),
                    point: p.id,
                    disk: d.disk.clone(),
                    size: d.size,
                    time: p.time,
                    view: tokio::sync::OnceCell::new(),
                    layout: tokio::sync::OnceCell::new(),
                })
            })
            .clone()
    }

    async fn view(&self, d: &DiskRef) -> io::Result<Arc<dyn DiskView>> {
        d.view
            .get_or_try_init(|| self.source.open(&d.machine, &d.disk, d.point))
            .await
            .cloned()
    }

    fn chunk_cache(&self, d: &DiskRef, view: Arc<dyn DiskView>) -> Arc<ChunkCache> {
        self.caches
            .lock()
            .expect("lock")
            .entry((d.machine.clone(), d.point, d.disk.clone()))
            .or_insert_with(|| ChunkCache::new(view, ext4::FS_CHUNK, self.cfg.cache_bytes, self.rt.clone()))
            .clone()
    }

    /// The cache raw image reads go through (large chunks, read ahead).
    fn raw_cache(&self, d: &DiskRef, view: Arc<dyn DiskView>) -> Arc<ChunkCache> {
        self.raw_caches
            .lock()
            .expect("lock")
            .entry((d.machine.clone(), d.point, d.disk.clone()))
            .or_insert_with(|| ChunkCache::new(view, ext4::RAW_CHUNK, self.cfg.cache_bytes, self.rt.clone()))
            .clone()
    }

    /// The partitions of a disk, each probed for ext2/3/4 once (blocking).
    fn layout(&self, d: &Arc<DiskRef>) -> Result<Arc<Vec<PartEntry>>, Errno> {
        let result = self.rt.block_on(d.layout.get_or_try_init(|| async {
            let view = self.view(d).await?;
            let parts = partitions::read_partitions(view.as_ref()).await?;
            let mut out = Vec::new();
            for part in parts {
                let mut ext4 = None;
                if part.len >= 2048 {
                    let sb = view.read_at(part.start + 1024, 1024).await?;
                    if partitions::is_ext_superblock(&sb) {
                        let cache = self.chunk_cache(d, view.clone());
                        let name = format!("{}/{}@{} p{}", d.machine, d.disk, d.point, part.index);
                        let (start, len, workers) = (part.start, part.len, self.cfg.ext4_workers);
                        let opened =
                            tokio::task::spawn_blocking(move || Ext4Part::open(cache, start, len, workers, &name))
                                .await
                                .map_err(io::Error::other)?;
                        match opened {
                            Ok(p) => ext4 = Some(p),
                            Err(e) => info!(error = %e, "partition shown as a raw image"),
                        }
                    }
                }
                out.push(PartEntry { part, ext4 });
            }
            Ok::<_, io::Error>(Arc::new(out))
        }));
        result.cloned().map_err(eio)
    }

    /// The entries of a directory that is not inside an ext4 filesystem.
    fn children(&self, node: &Node) -> Result<Vec<Entry>, Errno> {
        let mut out = Vec::new();
        match &node.kind {
            Kind::Root => {
                for m in self.machines()?.iter() {
                    let name = m.machine.clone();
                    let n = self.intern(Key::Machine(name.clone()), 1, || Kind::Machine(name.clone()));
                    out.push((OsString::from(name), n.ino, FileType::Directory));
                }
            }
            Kind::Machine(machine) => {
                let points = self.points(machine)?;
                for p in points.iter() {
                    let n = self.intern(Key::Point(machine.clone(), p.id), node.ino, || Kind::Point {
                        machine: machine.clone(),
                        id: p.id,
                        time: p.time,
                    });
                    out.push((OsString::from(&p.name), n.ino, FileType::Directory));
                }
                if let Some(last) = points.last() {
                    let key = Key::Latest(machine.clone(), last.name.clone());
                    let n = self.intern(key, node.ino, || Kind::Latest(last.name.clone()));
                    out.push((OsString::from("latest"), n.ino, FileType::Symlink));
                }
            }
            Kind::Point { machine, id, .. } => {
                let (machine, id) = (machine.clone(), *id);
                let points = self.points(&machine)?;
                // A point that vanished since it was looked up shows what it had.
                let Some(p) = points.iter().find(|p| p.id == id) else {
                    return Ok(out);
                };
                for d in &p.disks {
                    let disk = self.disk_ref(&machine, p, d);
                    let img = self.intern(Key::DiskImg(machine.clone(), id, d.disk.clone()), node.ino, || {
                        Kind::DiskImg(disk.clone())
                    });
                    let dir = self.intern(Key::DiskDir(machine.clone(), id, d.disk.clone()), node.ino, || {
                        Kind::DiskDir(disk.clone())
                    });
                    out.push((
                        OsString::from(format!("{}.img", d.disk)),
                        img.ino,
                        FileType::RegularFile,
                    ));
                    out.push((OsString::from(&d.disk), dir.ino, FileType::Directory));
                }
            }
            Kind::DiskDir(disk) => {
                for e in self.layout(disk)?.iter() {
                    let key = Key::Part(disk.machine.clone(), disk.point, disk.disk.clone(), e.part.index);
                    match &e.ext4 {
                        Some(part) => {
                            let n = self.intern(key, node.ino, || Kind::Ext4 {
                                part: part.clone(),
                                path: b"/".to_vec(),
                                ino: if part.fast.is_some() { 2 } else { 0 },
                                meta: OnceLock::new(),
                                time: disk.time,
                            });
                            out.push((OsString::from(format!("p{}", e.part.index)), n.ino, FileType::Directory));
                        }
                        None => {
                            let n = self.intern(key, node.ino, || Kind::PartImg {
                                disk: disk.clone(),
                                start: e.part.start,
                                len: e.part.len,
                            });
                            out.push((
                                OsString::from(format!("p{}.img", e.part.index)),
                                n.ino,
                                FileType::RegularFile,
                            ));
                        }
                    }
                }
            }
            _ => return Err(Errno::ENOTDIR),
        }
        Ok(out)
    }

    fn attr(&self, node: &Node) -> Result<(FileAttr, Duration), Errno> {
        let mut a = FileAttr {
            ino: INodeNo(node.ino),
            size: 0,
            blocks: 0,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: node.file_type(),
            perm: 0o555,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        };
        let mut ttl = LONG_TTL;
        let set_time = |a: &mut FileAttr, t: SystemTime| {
            a.atime = t;
            a.mtime = t;
            a.ctime = t;
            a.crtime = t;
        };
        match &node.kind {
            Kind::Root | Kind::Machine(_) => ttl = SHORT_TTL,
            Kind::Latest(target) => {
                ttl = SHORT_TTL;
                a.perm = 0o777;
                a.nlink = 1;
                a.size = target.len() as u64;
            }
            Kind::Point { time, .. } => set_time(&mut a, *time),
            Kind::DiskDir(d) => set_time(&mut a, d.time),
            Kind::DiskImg(d) => {
                set_time(&mut a, d.time);
                a.perm = 0o444;
                a.nlink = 1;
                a.size = d.size;
            }
            Kind::PartImg { disk, len, .. } => {
                set_time(&mut a, disk.time);
                a.perm = 0o444;
                a.nlink = 1;
                a.size = *len;
            }
            Kind::Ext4 { meta, time, .. } => match meta.get() {
                Some(m) => {
                    a.kind = m.kind;
                    a.size = m.size;
                    a.blocks = m.size.div_ceil(512);
                    a.perm = m.perm;
                    a.nlink = if m.kind == FileType::Directory { 2 } else { 1 };
                    a.uid = m.uid;
                    a.gid = m.gid;
                    a.atime = m.atime;
                    a.mtime = m.mtime;
                    a.ctime = m.ctime;
                    a.crtime = m.mtime;
                }
                None => set_time(&mut a, *time),
            },
        }
        if matches!(node.kind, Kind::DiskImg(_) | Kind::PartImg { .. }) {
            a.blocks = a.size.div_ceil(512);
        }
        Ok((a, ttl))
    }

    fn reply_entry(&self, node: &Node, reply: ReplyEntry) {
        match self.attr(node) {
            Ok((a, ttl)) => reply.entry(&ttl, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn new_fh(&self, dir: DirHandle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.open.lock().expect("lock").insert(fh, Arc::new(dir));
        fh
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<DirHandle>, Errno> {
        self.open.lock().expect("lock").get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    /// How the file of `node` is read (blocking the first time: opens the view or reads the
    /// inode and its extent tree). A node outlives the point it shows, so a file keeps reading
    /// after its point vanished from the listing.
    fn file_of(&self, node: &Node) -> Result<Arc<FileRead>, Errno> {
        if let Some(f) = self.files.get(&node.ino) {
            return Ok(f);
        }
        let raw = |disk: &DiskRef, base: u64, len: u64| match self.rt.block_on(self.view(disk)) {
            Ok(view) => Ok(FileRead::Raw {
                cache: self.raw_cache(disk, view.clone()),
                view,
                base,
                len,
            }),
            Err(e) => Err(eio(format!(
                "opening {}/{}@{}: {e}",
                disk.machine, disk.disk, disk.point
            ))),
        };
        let file = match &node.kind {
            Kind::DiskImg(d) => raw(d, 0, d.size)?,
            Kind::PartImg { disk, start, len } => raw(disk, *start, *len)?,
            Kind::Ext4 { part, ino, .. } if part.fast.is_some() => {
                let fs = part.fast.as_ref().expect("checked");
                let inode = fs.inode(*ino).map_err(|e| io_errno(&e))?;
                match inode.meta.kind {
                    FileType::Directory => return Err(Errno::EISDIR),
                    FileType::RegularFile => FileRead::Inode {
                        runs: Arc::new(fs.map(&inode).map_err(|e| io_errno(&e))?),
                        fs: fs.clone(),
                        size: inode.meta.size,
                    },
                    _ => return Err(Errno::EACCES),
                }
            }
            Kind::Ext4 { part, path, meta, .. } => {
                if meta.get().is_some_and(|m| m.kind == FileType::Directory) {
                    return Err(Errno::EISDIR);
                }
                FileRead::Ext4 {
                    part: part.clone(),
                    path: path.clone(),
                    size: meta.get().map(|m| m.size).unwrap_or(0),
                }
            }
            _ => return Err(Errno::EISDIR),
        };
        let file = Arc::new(file);
        self.files.insert(node.ino, file.clone());
        Ok(file)
    }

    /// The entries of directory `ino` open as `fh`, read once per handle; `done` gets them (on a
    /// worker for partitions read through `ext4-view`).
    fn list(self: &Arc<Self>, ino: INodeNo, fh: FileHandle, done: ListDone) {
        let (node, open) = match (self.node(ino), self.handle(fh)) {
            (Ok(n), Ok(o)) => (n, o),
            (Err(e), _) | (_, Err(e)) => return done(Err(e)),
        };
        let entries = &open.entries;
        if let Some(list) = entries.lock().expect("lock").clone() {
            return done(Ok((node, list)));
        }
        if matches!(node.kind, Kind::Ext4 { .. }) {
            let (open2, node2) = (open.clone(), node.clone());
            return self.ext4_list(
                node,
                Box::new(move |list| match list {
                    Ok(list) => {
                        let list = Arc::new(list);
                        *open2.entries.lock().expect("lock") = Some(list.clone());
                        done(Ok((node2, list)))
                    }
                    Err(e) => done(Err(e)),
                }),
            );
        }
        match self.children(&node) {
            Ok(list) => {
                let list = Arc::new(list);
                *entries.lock().expect("lock") = Some(list.clone());
                done(Ok((node, list)))
            }
            Err(e) => done(Err(e)),
        }
    }

    /// Looks up `name` in an ext4 directory on its worker and replies.
    fn ext4_lookup(self: &Arc<Self>, dir: Arc<Node>, name: &OsStr, reply: ReplyEntry) {
        let Kind::Ext4 { part, path, time, .. } = &dir.kind else {
            return reply.error(Errno::ENOTDIR);
        };
        if name.as_bytes().contains(&b'/') || name.len() > 255 {
            return reply.error(Errno::ENOENT);
        }
        let child = join(path, name.as_bytes());
        let key = Key::Ext4(part.id, child.clone());
        if let Some(n) = self.lookup_key(&key) {
            if let Kind::Ext4 { meta, .. } = &n.kind {
                if meta.get().is_some() {
                    return self.reply_entry(&n, reply);
                }
            }
        }
        if let (Some(fs), Kind::Ext4 { ino: dir_ino, .. }) = (&part.fast, &dir.kind) {
            let found = fs.dir_of(*dir_ino).and_then(|d| match d.get(name.as_bytes()) {
                Some(e) => fs.inode(e.ino),
                None => Err(io::ErrorKind::NotFound.into()),
            });
            return match found {
                Ok(inode) => {
                    let n = self.intern(key, dir.ino, || Kind::Ext4 {
                        part: part.clone(),
                        path: child,
                        ino: inode.ino,
                        meta: OnceLock::new(),
                        time: *time,
                    });
                    if let Kind::Ext4 { meta, .. } = &n.kind {
                        let _ = meta.set(inode.meta);
                    }
                    self.reply_entry(&n, reply)
                }
                Err(e) => reply.error(io_errno(&e)),
            };
        }
        let (me, dir2) = (self.clone(), dir.clone());
        let (part2, time) = (part.clone(), *time);
        part.run_any(Box::new(move |w| {
            let dir = dir2;
            let Some(w) = w else { return reply.error(Errno::EIO) };
            match w.fs.symlink_metadata(ext4_view::Path::new(&child)) {
                Ok(m) => {
                    let n = me.intern(key, dir.ino, || Kind::Ext4 {
                        part: part2,
                        path: child,
                        ino: 0,
                        meta: OnceLock::new(),
                        time,
                    });
                    if let Kind::Ext4 { meta, .. } = &n.kind {
                        let _ = meta.set(Meta::from(&m));
                    }
                    me.reply_entry(&n, reply);
                }
                Err(e) => reply.error(ext4::errno(&e)),
            }
        }));
    }

    /// Lists an ext4 directory on a worker (metadata of every entry included, so the lookups
    /// that follow a readdir need no worker).
    fn ext4_list(self: &Arc<Self>, dir: Arc<Node>, done: Box<dyn FnOnce(Result<Vec<Entry>, Errno>) + Send>) {
        let Kind::Ext4 {
            part, path, time, ino, ..
        } = &dir.kind
        else {
            return done(Err(Errno::ENOTDIR));
        };
        if let Some(fs) = &part.fast {
            let list = fs.dir_of(*ino).and_then(|d| {
                let mut out = Vec::with_capacity(d.entries.len());
                for e in &d.entries {
                    let child = join(path, &e.name);
                    let n = self.intern(Key::Ext4(part.id, child.clone()), dir.ino, || Kind::Ext4 {
                        part: part.clone(),
                        path: child,
                        ino: e.ino,
                        meta: OnceLock::new(),
                        time: *time,
                    });
                    if let Kind::Ext4 { meta, .. } = &n.kind {
                        if meta.get().is_none() {
                            let _ = meta.set(fs.inode(e.ino)?.meta);
                        }
                    }
                    out.push((OsString::from_vec(e.name.clone()), n.ino, e.kind));
                }
                Ok(out)
            });
            return done(list.map_err(|e| io_errno(&e)));
        }
        let (me, dir2) = (self.clone(), dir.clone());
        let (part2, path, time) = (part.clone(), path.clone(), *time);
        part.run_any(Box::new(move |w| {
            let dir = dir2;
            let Some(w) = w else { return done(Err(Errno::EIO)) };
            let list = (|| -> Result<Vec<Entry>, ext4_view::Ext4Error> {
                let mut out = Vec::new();
                for entry in w.fs.read_dir(ext4_view::Path::new(&path))? {
                    let entry = entry?;
                    let name = entry.file_name().as_ref().to_vec();
                    if name == b"." || name == b".." {
                        continue;
                    }
                    let meta = Meta::from(&entry.metadata()?);
                    let child = join(&path, &name);
                    let kind = meta.kind;
                    let n = me.intern(Key::Ext4(part2.id, child.clone()), dir.ino, || Kind::Ext4 {
                        part: part2.clone(),
                        path: child,
                        ino: 0,
                        meta: OnceLock::new(),
                        time,
                    });
                    if let Kind::Ext4 { meta: m, .. } = &n.kind {
                        let _ = m.set(meta);
                    }
                    out.push((OsString::from_vec(name), n.ino, kind));
                }
                Ok(out)
            })();
            done(list.map_err(|e| ext4::errno(&e)));
        }));
    }
}

/// The errno an I/O error of the inode reader stands for.
fn io_errno(e: &io::Error) -> Errno {
    match e.kind() {
        io::ErrorKind::NotFound => Errno::ENOENT,
        io::ErrorKind::NotADirectory => Errno::ENOTDIR,
        io::ErrorKind::PermissionDenied => Errno::EACCES,
        io::ErrorKind::InvalidInput => Errno::EINVAL,
        _ => eio(e),
    }
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if !p.ends_with(b"/") {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Replies one page of a directory listing (`offset` = entries already returned).
fn page(node: &Node, entries: &[Entry], offset: u64, mut reply: ReplyDirectory) {
    let dots = [
        (OsString::from("."), node.ino, FileType::Directory),
        (OsString::from(".."), node.parent, FileType::Directory),
    ];
    for (i, (name, ino, kind)) in dots.iter().chain(entries.iter()).enumerate().skip(offset as usize) {
        if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
            break;
        }
    }
    reply.ok();
}

/// Replies one page of a listing with every entry's attributes (READDIRPLUS); each entry
/// returned counts as a lookup for the kernel, as after LOOKUP.
fn page_plus(inner: &Inner, node: &Node, entries: &[Entry], offset: u64, mut reply: ReplyDirectoryPlus) {
    let dots = [
        (OsString::from("."), node.ino, FileType::Directory),
        (OsString::from(".."), node.parent, FileType::Directory),
    ];
    for (i, (name, ino, _)) in dots.iter().chain(entries.iter()).enumerate().skip(offset as usize) {
        let attr = inner.node(INodeNo(*ino)).and_then(|n| inner.attr(&n));
        let (a, ttl) = match attr {
            Ok(x) => x,
            // Vanished since it was listed (a point retention removed): leave it out.
            Err(_) => continue,
        };
        if reply.add(INodeNo(*ino), i as u64 + 1, name, &ttl, &a, Generation(0)) {
            break;
        }
    }
    reply.ok();
}

/// SEEK_DATA / SEEK_HOLE over a view's extents, within `[base, base + len)`.
async fn seek(view: &dyn DiskView, base: u64, len: u64, offset: u64, whence: i32) -> Result<i64, Errno> {
    if offset >= len {
        return Err(Errno::ENXIO);
    }
    let mut at = offset;
    while at < len {
        let window = (len - at).min(1 << 30);
        let extents = view.extents(base + at, window).await.map_err(eio)?;
        for e in extents {
            let (lo, hi) = (
                e.offset.saturating_sub(base).max(at),
                (e.offset + e.len).saturating_sub(base),
            );
            if hi <= lo {
                continue;
            }
            if (whence == SEEK_DATA) == e.allocated {
                return Ok(lo as i64);
            }
        }
        at += window;
    }
    if whence == SEEK_HOLE {
        Ok(len as i64)
    } else {
        Err(Errno::ENXIO)
    }
}

impl fuser::Filesystem for LifeboatFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_readahead(MAX_READ);
        let _ = config.set_max_write(MAX_READ);
        let _ = config.set_max_background(64);
        // Listings carry every entry's attributes, so reading a directory's files needs no
        // LOOKUP per file (the names and attributes never change inside a point).
        let zero_open = config.capabilities().contains(InitFlags::FUSE_NO_OPEN_SUPPORT);
        self.inner.zero_open.store(zero_open, Ordering::Relaxed);
        if config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS).is_err() {
            debug!("kernel without READDIRPLUS: one LOOKUP per name");
        }
        // Symlink targets never change (`latest` gets a new inode when it moves): the kernel
        // keeps them, instead of a READLINK each time a path goes through `latest`.
        if config.add_capabilities(InitFlags::FUSE_CACHE_SYMLINKS).is_err() {
            debug!("kernel without symlink caching: one READLINK per path through a symlink");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let inner = &self.inner;
        let dir = match inner.node(parent) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        if matches!(dir.kind, Kind::Ext4 { .. }) {
            return inner.ext4_lookup(dir, name, reply);
        }
        match inner.children(&dir) {
            Ok(entries) => match entries.iter().find(|(n, ..)| n == name) {
                Some((_, ino, _)) => match inner.node(INodeNo(*ino)) {
                    Ok(n) => inner.reply_entry(&n, reply),
                    Err(e) => reply.error(e),
                },
                None => reply.error(Errno::ENOENT),
            },
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let inner = &self.inner;
        let node = match inner.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        if let Kind::Ext4 {
            part, path, meta, ino, ..
        } = &node.kind
        {
            if let (None, Some(fs)) = (meta.get(), &part.fast) {
                match fs.inode(*ino) {
                    Ok(i) => {
                        let _ = meta.set(i.meta);
                    }
                    Err(e) => return reply.error(io_errno(&e)),
                }
            }
            if meta.get().is_none() {
                let (me, node2, path) = (inner.clone(), node.clone(), path.clone());
                return part.run_any(Box::new(move |w| {
                    let Some(w) = w else { return reply.error(Errno::EIO) };
                    match w.fs.symlink_metadata(ext4_view::Path::new(&path)) {
                        Ok(m) => {
                            if let Kind::Ext4 { meta, .. } = &node2.kind {
                                let _ = meta.set(Meta::from(&m));
                            }
                            match me.attr(&node2) {
                                Ok((a, ttl)) => reply.attr(&ttl, &a),
                                Err(e) => reply.error(e),
                            }
                        }
                        Err(e) => reply.error(ext4::errno(&e)),
                    }
                }));
            }
        }
        match inner.attr(&node) {
            Ok((a, ttl)) => reply.attr(&ttl, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let node = match self.inner.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        match &node.kind {
            Kind::Latest(target) => reply.data(target.as_bytes()),
            Kind::Ext4 { part, ino, .. } if part.fast.is_some() => {
                let fs = part.fast.as_ref().expect("checked");
                match fs.inode(*ino).and_then(|i| fs.readlink(&i)) {
                    Ok(t) => reply.data(&t),
                    Err(e) => reply.error(io_errno(&e)),
                }
            }
            Kind::Ext4 { part, path, .. } => {
                let path = path.clone();
                part.run_any(Box::new(move |w| {
                    let Some(w) = w else { return reply.error(Errno::EIO) };
                    match w.fs.read_link(ext4_view::Path::new(&path)) {
                        Ok(t) => reply.data(t.as_ref()),
                        Err(e) => reply.error(ext4::errno(&e)),
                    }
                }));
            }
            _ => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc_o_trunc() != 0 {
            return reply.error(Errno::EROFS);
        }
        let inner = &self.inner;
        let node = match inner.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        match inner.file_of(&node) {
            // Zero-message opens: the kernel sends no OPEN nor RELEASE for files from now on, and
            // reads name the inode (the page cache is kept, as points never change).
            Ok(_) if inner.zero_open.load(Ordering::Relaxed) => reply.error(Errno::ENOSYS),
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let file = match self.inner.node(ino).and_then(|n| self.inner.file_of(&n)) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        match &*file {
            FileRead::Raw { cache, base, len, .. } => {
                if offset >= *len {
                    return reply.data(&[]);
                }
                let n = (u64::from(size)).min(len - offset) as usize;
                let at = base + offset;
                let mut buf = vec![0u8; n];
                // Cached: reply from this thread, without a hop through the runtime.
                if cache.try_read(at, &mut buf) {
                    return reply.data(&buf);
                }
                let cache = cache.clone();
                self.inner.rt.spawn(async move {
                    match cache.read(at, &mut buf).await {
                        Ok(()) => reply.data(&buf),
                        Err(e) => reply.error(eio(e)),
                    }
                });
            }
            FileRead::Inode { fs, runs, size: fsize } => {
                if offset >= *fsize {
                    return reply.data(&[]);
                }
                let n = u64::from(size).min(fsize - offset) as usize;
                let mut buf = vec![0u8; n];
                if fs.read_file_cached(runs, offset, &mut buf) {
                    return reply.data(&buf);
                }
                let (fs, runs) = (fs.clone(), runs.clone());
                self.inner.rt.spawn(async move {
                    match fs.read_file(&runs, offset, &mut buf).await {
                        Ok(()) => reply.data(&buf),
                        Err(e) => reply.error(eio(e)),
                    }
                });
            }
            FileRead::Ext4 { part, path, .. } => {
                let (key, path) = (ino.0, path.clone());
                part.run_on(
                    key,
                    Box::new(move |w| {
                        let Some(w) = w else {
                            return reply.error(Errno::EIO);
                        };
                        let file = match w.file(key, &path) {
                            Ok(f) => f,
                            Err(e) => return reply.error(ext4::errno(&e)),
                        };
                        if file.position() != offset {
                            if let Err(e) = file.seek_to(offset) {
                                return reply.error(ext4::errno(&e));
                            }
                        }
                        let mut buf = vec![0u8; size as usize];
                        let mut filled = 0;
                        while filled < buf.len() {
                            match file.read_bytes(&mut buf[filled..]) {
                                Ok(0) => break,
                                Ok(n) => filled += n,
                                Err(e) => return reply.error(ext4::errno(&e)),
                            }
                        }
                        reply.data(&buf[..filled]);
                    }),
                );
            }
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Files hold nothing per open (reads go by inode).
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.inner.node(ino) {
            Ok(n) if n.file_type() == FileType::Directory => {
                let fh = self.inner.new_fh(DirHandle {
                    entries: Mutex::new(None),
                });
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        self.inner.list(
            ino,
            fh,
            Box::new(move |got| match got {
                Ok((node, list)) => page(&node, &list, offset, reply),
                Err(e) => reply.error(e),
            }),
        );
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectoryPlus) {
        let inner = self.inner.clone();
        self.inner.list(
            ino,
            fh,
            Box::new(move |got| match got {
                Ok((node, list)) => page_plus(&inner, &node, &list, offset, reply),
                Err(e) => reply.error(e),
            }),
        );
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: fuser::LockOwner, reply: ReplyEmpty) {
        // Nothing to flush on a read-only tree: ENOSYS tells the kernel to stop sending FLUSH,
        // which saves a round trip on every close.
        reply.error(Errno::ENOSYS);
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::NO_XATTR);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.inner.open.lock().expect("lock").remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let nodes = self.inner.nodes.lock().expect("lock").by_ino.len() as u64;
        let bytes: u64 = self.inner.disks.lock().expect("lock").values().map(|d| d.size).sum();
        reply.statfs(bytes / 4096, 0, 0, nodes, 0, 4096, 255, 4096);
    }

    fn lseek(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        let file = match self.inner.node(ino).and_then(|n| self.inner.file_of(&n)) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        if offset < 0 || (whence != SEEK_DATA && whence != SEEK_HOLE) {
            return reply.error(Errno::EINVAL);
        }
        let offset = offset as u64;
        match &*file {
            FileRead::Raw { view, base, len, .. } => {
                let (view, base, len) = (view.clone(), *base, *len);
                self.inner.rt.spawn(async move {
                    match seek(view.as_ref(), base, len, offset, whence).await {
                        Ok(o) => reply.offset(o),
                        Err(e) => reply.error(e),
                    }
                });
            }
            FileRead::Inode { fs, runs, size } => {
                match inodes::seek(runs, fs.block_size(), *size, offset, whence == SEEK_DATA) {
                    Some(o) => reply.offset(o as i64),
                    None => reply.error(Errno::ENXIO),
                }
            }
            FileRead::Ext4 { size, .. } => {
                // ext4-view exposes no extent map: the whole file counts as data.
                if offset >= *size {
                    reply.error(Errno::ENXIO)
                } else if whence == SEEK_DATA {
                    reply.offset(offset as i64)
                } else {
                    reply.offset(*size as i64)
                }
            }
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        if mask.contains(fuser::AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        match self.inner.node(ino) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, _mode: u32, _umask: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(&self, _req: &Request, _parent: INodeNo, _link_name: &OsStr, _target: &Path, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(&self, _req: &Request, _ino: INodeNo, _newparent: INodeNo, _newname: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }
}

fn libc_o_trunc() -> i32 {
    0o1000
}

/// A mounted filesystem running on its own threads; [`Mounted::unmount`] or an external
/// `fusermount3 -u` ends it.
pub struct Mounted {
    unmounter: fuser::SessionUnmounter,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
    mountpoint: std::path::PathBuf,
}

impl Mounted {
    /// Whether the session has ended (unmounted from outside).
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for the session to end.
    pub fn join(mut self) -> io::Result<()> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| io::Error::other("FUSE session panicked"))?,
            None => Ok(()),
        }
    }

    /// Unmounts; if files are still open (`EBUSY`), detaches lazily so the mount point is free at
    /// once. Waits up to `grace` for the session to end.
    pub fn unmount(mut self, grace: Duration) -> io::Result<()> {
        if let Err(e) = self.unmounter.unmount() {
            debug!(error = %e, "unmount failed: detaching lazily");
            lazy_unmount(&self.mountpoint);
        }
        let deadline = Instant::now() + grace;
        while !self.finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.finished() {
            self.join()
        } else {
            // Readers hold the detached mount: leave the session thread; the process ends it.
            lazy_unmount(&self.mountpoint);
            Ok(())
        }
    }
}

/// `fusermount3 -u -z` (works unprivileged), then `umount -l` (root).
fn lazy_unmount(mountpoint: &Path) {
    for (tool, args) in [("fusermount3", &["-u", "-z"][..]), ("umount", &["-l"][..])] {
        let ok = std::process::Command::new(tool)
            .args(args)
            .arg(mountpoint)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
    }
}

/// Mounts `fs` read-only at `mountpoint` and serves it on background threads.
pub fn mount(fs: LifeboatFs, mountpoint: &Path) -> io::Result<Mounted> {
    let threads = fs.inner.cfg.threads.max(1);
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName("lifeboat".into()),
        fuser::MountOption::Subtype("lifeboat".into()),
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    config.n_threads = Some(threads);
    // fusermount3 opens /dev/fuse as the calling user: where the device is closed to this user
    // (0600 instead of the usual 0666), FUSE is not allowed and no mount can work.
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        return Err(io::Error::new(
            e.kind(),
            format!(
                "FUSE is not available to this user: cannot open /dev/fuse ({e}); it must be readable and \
                 writable (mode 0666, the fuse3 default) or the mount run as root"
            ),
        ));
    }
    config.clone_fd = true;
    let mut session = fuser::Session::new(fs, mountpoint, &config)?;
    let unmounter = session.unmount_callable();
    let thread = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || session.run())?;
    Ok(Mounted {
        unmounter,
        thread: Some(thread),
        mountpoint: mountpoint.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::Extent;
    use bytes::Bytes;

    /// 1 MiB: data, hole, data, hole (64 KiB granules).
    struct Holes;
    impl DiskView for Holes {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_at(&self, _offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>> {
            Box::pin(async move { Ok(Bytes::from(vec![0; len])) })
        }
        fn extents(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<Vec<Extent>>> {
            let map = [
                (0u64, 65536u64, true),
                (65536, 131072, false),
                (196608, 65536, true),
                (262144, 786432, false),
            ];
            let out = map
                .iter()
                .filter(|(o, l, _)| o + l > offset && *o < offset + len)
                .map(|&(o, l, allocated)| Extent {
                    offset: o,
                    len: l,
                    allocated,
                })
                .collect();
            Box::pin(async move { Ok(out) })
        }
    }

    #[test]
    fn seek_data_and_hole() {
        let s = |base, len, off, whence| futures::executor::block_on(seek(&Holes, base, len, off, whence));
        assert_eq!(s(0, 1 << 20, 0, SEEK_HOLE), Ok(65536));
        assert_eq!(s(0, 1 << 20, 0, SEEK_DATA), Ok(0));
        assert_eq!(s(0, 1 << 20, 70000, SEEK_DATA), Ok(196608));
        assert_eq!(s(0, 1 << 20, 200000, SEEK_HOLE), Ok(262144));
        assert_eq!(s(0, 1 << 20, 300000, SEEK_DATA), Err(Errno::ENXIO));
        assert_eq!(s(0, 1 << 20, 1 << 20, SEEK_HOLE), Err(Errno::ENXIO));
        // A partition starting at 131072: offsets are relative to it.
        assert_eq!(s(131072, 262144, 0, SEEK_DATA), Ok(65536));
        assert_eq!(s(131072, 262144, 65536, SEEK_HOLE), Ok(131072));
        // Data up to the end: the hole is the end of the file.
        assert_eq!(s(0, 65536, 0, SEEK_HOLE), Ok(65536));
    }

    #[test]
    fn paths_join() {
        assert_eq!(join(b"/", b"a"), b"/a");
        assert_eq!(join(b"/a", b"b"), b"/a/b");
    }
}
