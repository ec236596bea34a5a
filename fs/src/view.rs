//! The one read seam of the master target: a disk as it was at one recovery point. The NBD
//! server, the FUSE filesystem and the failback writer all read through [`DiskView`]; the
//! [`ExportCatalog`] names the views a client may open.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;

/// A run of bytes that is either stored data or a hole (reads back as zeros, never written).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    /// `false`: a hole; every byte of it reads as zero.
    pub allocated: bool,
}

/// A point-in-time view of one disk. Reads are async because a block may live in blob storage.
pub trait DiskView: Send + Sync {
    /// The disk's size in bytes.
    fn size(&self) -> u64;

    /// Reads `len` bytes at `offset`; the range lies inside `size()` (callers check).
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>>;

    /// The extents covering `[offset, offset + len)`, in order, merged where adjacent runs agree.
    /// The default says the whole range is data, which is always correct, never fast.
    fn extents(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<Vec<Extent>>> {
        Box::pin(async move {
            Ok(vec![Extent {
                offset,
                len,
                allocated: true,
            }])
        })
    }

    /// Whether `write_at` is allowed (a test-failover overlay); recovery points are read-only.
    fn writable(&self) -> bool {
        false
    }

    /// Writes `data` at `offset`. Read-only views refuse with `PermissionDenied`.
    fn write_at(&self, _offset: u64, _data: Bytes) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async { Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only export")) })
    }

    /// Makes earlier writes durable. Read-only views have nothing to flush.
    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// An export a client may open, as NBD_OPT_LIST shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
}

/// Resolves export names (`MACHINE/DISK@POINT`) to views.
pub trait ExportCatalog: Send + Sync {
    /// Every export that can be opened now.
    fn list(&self) -> BoxFuture<'_, io::Result<Vec<ExportInfo>>>;

    /// Opens one export by name; `NotFound` when no such export exists.
    fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Arc<dyn DiskView>>>;
}
