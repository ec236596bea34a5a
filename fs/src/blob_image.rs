//! Disk images in blob storage, for failover to the cloud: a recovery point written as one
//! object (raw, or a fixed VHD — the raw bytes plus the 512-byte footer Azure imports as a
//! managed disk), and a read-only view of such an object (ranged GETs) for failing back from it.
//! The image holds the disk in clear, as a cloud VM boots it: the storage account's own
//! encryption and access control protect it, and it is written only when a failover asks.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, WriteMultipart};

use crate::copy::CopyStats;
use crate::view::DiskView;

/// Bytes read from the view and written per multipart part.
const PIECE: u64 = 8 << 20;
/// View reads and part uploads in flight.
const IN_FLIGHT: usize = 4;
/// The size of a VHD footer.
pub const VHD_FOOTER: u64 = 512;

/// How a failover image is laid out in blob storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// The disk's bytes, nothing else.
    Raw,
    /// A fixed VHD: the disk's bytes and a 512-byte footer (size must be a multiple of 512).
    Vhd,
}

impl ImageFormat {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "raw" => Some(Self::Raw),
            "vhd" => Some(Self::Vhd),
            _ => None,
        }
    }

    /// The name `parse` takes: `raw` or `vhd`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Vhd => "vhd",
        }
    }

    /// The file name extension: `img` or `vhd`.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Raw => "img",
            Self::Vhd => "vhd",
        }
    }
}

fn store_error(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { path, .. } => {
            io::Error::new(io::ErrorKind::NotFound, format!("{path} not found in blob storage"))
        }
        other => io::Error::other(other.to_string()),
    }
}

/// The CHS geometry of the VHD specification (appendix "CHS calculation").
fn vhd_geometry(size: u64) -> (u16, u8, u8) {
    let mut total = (size / 512).min(65535 * 16 * 255);
    let (sectors, heads, cyl_heads);
    if total >= 65535 * 16 * 63 {
        sectors = 255u64;
        heads = 16u64;
        cyl_heads = total / sectors;
    } else {
        let mut s = 17u64;
        let mut ch = total / s;
        let mut h = ch.div_ceil(1024);
        if h < 4 {
            h = 4;
        }
        if ch >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            ch = total / s;
        }
        if ch >= h * 1024 {
            s = 63;
            h = 16;
            ch = total / s;
        }
        sectors = s;
        heads = h;
        cyl_heads = ch;
    }
    total = cyl_heads / heads;
    (total.min(65535) as u16, heads as u8, sectors as u8)
}

/// The footer of a fixed VHD of `size` bytes (big-endian fields, one's-complement checksum).
pub fn vhd_footer(size: u64, unique_id: [u8; 16], unix_secs: u64) -> [u8; 512] {
    let mut f = [0u8; 512];
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: reserved bit set
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // format version 1.0
    f[16..24].copy_from_slice(&u64::MAX.to_be_bytes()); // data offset: none (fixed disk)
    let since_2000 = unix_secs.saturating_sub(946_684_800) as u32;
    f[24..28].copy_from_slice(&since_2000.to_be_bytes());
    // "win ": what Hyper-V writes; readers then trust current_size over the CHS geometry.
    f[28..32].copy_from_slice(b"win ");
    f[32..36].copy_from_slice(&0x000a_0000u32.to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&size.to_be_bytes()); // original size
    f[48..56].copy_from_slice(&size.to_be_bytes()); // current size
    let (c, h, s) = vhd_geometry(size);
    f[56..58].copy_from_slice(&c.to_be_bytes());
    f[58] = h;
    f[59] = s;
    f[60..64].copy_from_slice(&2u32.to_be_bytes()); // disk type: fixed
    f[68..84].copy_from_slice(&unique_id);
    let sum = f.iter().fold(0u32, |acc, b| acc.wrapping_add(*b as u32));
    f[64..68].copy_from_slice(&(!sum).to_be_bytes());
    f
}

/// Checks a VHD footer and returns the disk size it declares.
pub fn parse_vhd_footer(f: &[u8]) -> io::Result<u64> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("not a fixed VHD: {why}"));
    if f.len() != 512 || &f[0..8] != b"conectix" {
        return Err(bad("no conectix footer"));
    }
    let mut copy = [0u8; 512];
    copy.copy_from_slice(f);
    copy[64..68].fill(0);
    let sum = !copy.iter().fold(0u32, |acc, b| acc.wrapping_add(*b as u32));
    if sum.to_be_bytes() != f[64..68] {
        return Err(bad("footer checksum mismatch"));
    }
    if u32::from_be_bytes(f[60..64].try_into().expect("4")) != 2 {
        return Err(bad("not a fixed disk"));
    }
    Ok(u64::from_be_bytes(f[48..56].try_into().expect("8")))
}

/// Writes `view` whole to `path` in `store` (multipart upload: pieces read and parts put
/// concurrently, in order); a VHD gets its footer last. An interrupted upload is aborted, so no
/// partial image is left under `path`. `progress(done, total)` follows the bytes read.
pub async fn write_image(
    view: Arc<dyn DiskView>,
    store: &dyn ObjectStore,
    path: &Path,
    format: ImageFormat,
    progress: impl Fn(u64, u64) + Send + Sync,
) -> io::Result<CopyStats> {
    let size = view.size();
    if format == ImageFormat::Vhd && !size.is_multiple_of(512) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a VHD needs a size that is a multiple of 512 bytes, not {size}"),
        ));
    }
    let upload = store.put_multipart(path).await.map_err(store_error)?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PIECE as usize);
    let done = AtomicU64::new(0);
    progress(0, size);
    let pieces = futures::stream::iter((0..size.div_ceil(PIECE)).map(|i| {
        let view = view.clone();
        async move {
            let off = i * PIECE;
            view.read_at(off, PIECE.min(size - off) as usize).await
        }
    }))
    .buffered(IN_FLIGHT);
    futures::pin_mut!(pieces);
    let copied: io::Result<()> = async {
        while let Some(piece) = pieces.try_next().await? {
            writer.wait_for_capacity(IN_FLIGHT).await.map_err(store_error)?;
            writer.write(&piece);
            progress(
                done.fetch_add(piece.len() as u64, Ordering::Relaxed) + piece.len() as u64,
                size,
            );
        }
        Ok(())
    }
    .await;
    if let Err(e) = copied {
        let _ = writer.abort().await;
        return Err(e);
    }
    if format == ImageFormat::Vhd {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        writer.write(&vhd_footer(size, rand::random(), secs));
    }
    writer.finish().await.map_err(store_error)?;
    Ok(CopyStats {
        bytes_total: size,
        blocks_written: size.div_ceil(crate::copy::COMPARE_BLOCK),
        bytes_written: size + if format == ImageFormat::Vhd { VHD_FOOTER } else { 0 },
        ..Default::default()
    })
}

/// A read-only view of a disk image in blob storage (raw, or a fixed VHD whose footer is
/// checked at open), read with ranged GETs.
pub struct BlobImageView {
    store: Arc<dyn ObjectStore>,
    path: Path,
    size: u64,
}

impl BlobImageView {
    pub async fn open(store: Arc<dyn ObjectStore>, path: Path, format: ImageFormat) -> io::Result<Self> {
        let object = store.head(&path).await.map_err(store_error)?.size;
        let size = match format {
            ImageFormat::Raw => object,
            ImageFormat::Vhd => {
                if object < VHD_FOOTER {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{path}: {object} bytes is too short for a VHD"),
                    ));
                }
                let footer = store
                    .get_range(&path, object - VHD_FOOTER..object)
                    .await
                    .map_err(store_error)?;
                let declared =
                    parse_vhd_footer(&footer).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
                if declared != object - VHD_FOOTER {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{path}: footer says {declared} bytes, the data is {}",
                            object - VHD_FOOTER
                        ),
                    ));
                }
                declared
            }
        };
        Ok(Self { store, path, size })
    }
}

impl DiskView for BlobImageView {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>> {
        Box::pin(async move {
            let end = offset + len as u64;
            if end > self.size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("read past the end of {} ({end} > {})", self.path, self.size),
                ));
            }
            self.store.get_range(&self.path, offset..end).await.map_err(store_error)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    struct MemView(Bytes);

    impl DiskView for MemView {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>> {
            Box::pin(async move { Ok(self.0.slice(offset as usize..offset as usize + len)) })
        }
    }

    fn disk(len: usize) -> Bytes {
        Bytes::from((0..len).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>())
    }

    #[test]
    fn vhd_footer_round_trips_and_detects_damage() {
        let f = vhd_footer(16 << 20, [7; 16], 1_800_000_000);
        assert_eq!(parse_vhd_footer(&f).unwrap(), 16 << 20);
        let mut bad = f;
        bad[50] ^= 1;
        assert!(parse_vhd_footer(&bad).unwrap_err().to_string().contains("checksum"));
        assert!(parse_vhd_footer(&[0u8; 512]).is_err());
        // 16 MiB by the specification's algorithm: 32768 sectors / 17 per track / 4 heads.
        assert_eq!(vhd_geometry(16 << 20), (481, 4, 17));
    }

    #[tokio::test]
    async fn images_round_trip_through_blob_storage() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let data = disk((20 << 20) + 4096);
        for format in [ImageFormat::Raw, ImageFormat::Vhd] {
            let path = Path::from(format!("failover/m1/disk0.{}", format.extension()));
            let view: Arc<dyn DiskView> = Arc::new(MemView(data.clone()));
            let last = Arc::new(AtomicU64::new(0));
            let l = last.clone();
            let stats = write_image(view, store.as_ref(), &path, format, move |d, _| {
                l.store(d, Ordering::Relaxed);
            })
            .await
            .unwrap();
            assert_eq!(last.load(Ordering::Relaxed), data.len() as u64);
            assert_eq!(stats.bytes_total, data.len() as u64);
            let object = store.get(&path).await.unwrap().bytes().await.unwrap();
            assert_eq!(&object[..data.len()], &data[..]);
            let back = BlobImageView::open(store.clone(), path.clone(), format).await.unwrap();
            assert_eq!(back.size(), data.len() as u64);
            assert_eq!(back.read_at(4096, 8192).await.unwrap(), data.slice(4096..12288));
            assert!(back.read_at(data.len() as u64 - 10, 20).await.is_err());
        }
        // A raw object opened as a VHD is refused with the reason.
        let raw = Path::from("failover/m1/disk0.img");
        let e = BlobImageView::open(store.clone(), raw, ImageFormat::Vhd)
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let odd: Arc<dyn DiskView> = Arc::new(MemView(disk(1000)));
        assert!(
            write_image(odd, store.as_ref(), &Path::from("x.vhd"), ImageFormat::Vhd, |_, _| {})
                .await
                .is_err()
        );
    }
}
