//! A streamOptimized VMDK writer (VMware Virtual Disk Format 5.0, "stream-optimized compressed
//! sparse extent"): the format OVA packages carry and ESXi imports.
//!
//! Layout written, in one forward pass over the input (no seeking, so the output may be a pipe):
//!
//! ```text
//! sector 0        sparse extent header (gdOffset = GD_AT_END, the real one is in the footer)
//! sector 1..21    embedded descriptor (createType="streamOptimized")
//! sector 128..    grains: {lba u64, size u32, zlib data} padded to a sector, only non-zero grains
//!                 GT marker + grain table, for every grain table (512 grains = 32 MiB each)
//!                 GD marker + grain directory
//!                 footer marker + footer (the header again, with the real gdOffset)
//!                 end-of-stream marker
//! ```
//!
//! All-zero grains are left out (their grain-table entry is 0: reads as zeros). The last grain
//! is zero-padded to a full grain when the capacity is not a multiple of 64 KiB; capacity is
//! rounded up to whole sectors.

use std::io::{self, Read, Write};

use flate2::write::ZlibEncoder;
use flate2::Compression;

pub const SECTOR: u64 = 512;
/// Sectors per grain (64 KiB grains, what VMware writes).
pub const GRAIN_SECTORS: u64 = 128;
pub const GRAIN_BYTES: u64 = GRAIN_SECTORS * SECTOR;
/// Grain-table entries per grain table.
pub const GTES_PER_GT: u64 = 512;
const MAGIC: u32 = 0x564d_444b; // "KDMV"
const GD_AT_END: u64 = u64::MAX;
const FLAG_NL_DETECT: u32 = 1;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const COMPRESSION_DEFLATE: u16 = 1;
const DESCRIPTOR_SECTORS: u64 = 20;
/// Grains start at the first grain boundary after the descriptor, as VMware's writer does.
const OVERHEAD_SECTORS: u64 = 128;
const MARKER_EOS: u32 = 0;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;
const MARKER_FOOTER: u32 = 3;

/// What the writer produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmdkInfo {
    /// Virtual disk size in bytes (a multiple of 512).
    pub capacity: u64,
    /// Bytes of the VMDK file.
    pub file_size: u64,
    /// Bytes of the virtual disk that hold data (non-zero grains × 64 KiB): OVF `populatedSize`.
    pub populated: u64,
    /// Grains written.
    pub grains: u64,
}

/// Options of the embedded descriptor.
#[derive(Debug, Clone)]
pub struct VmdkOptions {
    /// `ddb.adapterType`: `ide`, `buslogic`, `lsilogic` or `legacyESX`.
    pub adapter_type: String,
    /// `ddb.virtualHWVersion`.
    pub hw_version: u32,
    /// Name of the extent in the descriptor (the VMDK's own file name).
    pub extent_name: String,
    /// Deflate level 0–9.
    pub level: u32,
}

impl Default for VmdkOptions {
    fn default() -> Self {
        Self {
            adapter_type: "lsilogic".into(),
            hw_version: 14,
            extent_name: "disk.vmdk".into(),
            level: 6,
        }
    }
}

/// Counts bytes written through it.
struct Counting<W> {
    inner: W,
    pos: u64,
}

impl<W: Write> Counting<W> {
    fn put(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn pad_to_sector(&mut self) -> io::Result<()> {
        let rem = self.pos % SECTOR;
        if rem != 0 {
            self.put(&vec![0u8; (SECTOR - rem) as usize])?;
        }
        Ok(())
    }

    fn sector(&self) -> u64 {
        debug_assert_eq!(self.pos % SECTOR, 0);
        self.pos / SECTOR
    }
}

fn header(capacity_sectors: u64, gd_offset: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&3u32.to_le_bytes());
    h[8..12].copy_from_slice(&(FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS).to_le_bytes());
    h[12..20].copy_from_slice(&capacity_sectors.to_le_bytes());
    h[20..28].copy_from_slice(&GRAIN_SECTORS.to_le_bytes());
    h[28..36].copy_from_slice(&1u64.to_le_bytes()); // descriptorOffset
    h[36..44].copy_from_slice(&DESCRIPTOR_SECTORS.to_le_bytes());
    h[44..48].copy_from_slice(&(GTES_PER_GT as u32).to_le_bytes());
    h[48..56].copy_from_slice(&0u64.to_le_bytes()); // rgdOffset
    h[56..64].copy_from_slice(&gd_offset.to_le_bytes());
    h[64..72].copy_from_slice(&OVERHEAD_SECTORS.to_le_bytes());
    h[72] = 0; // uncleanShutdown
    h[73] = b'\n';
    h[74] = b' ';
    h[75] = b'\r';
    h[76] = b'\n';
    h[77..79].copy_from_slice(&COMPRESSION_DEFLATE.to_le_bytes());
    h
}

fn marker(num_sectors: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    m[0..8].copy_from_slice(&num_sectors.to_le_bytes());
    // m[8..12]: size = 0 for metadata markers
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

/// The embedded descriptor text. `cid` identifies the content (any 32-bit value).
pub fn descriptor(capacity_sectors: u64, cid: u32, opts: &VmdkOptions) -> String {
    let cylinders = (capacity_sectors / (255 * 63)).clamp(1, 65535);
    format!(
        "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n\n\
         # Extent description\nRW {capacity_sectors} SPARSE \"{name}\"\n\n\
         # The Disk Data Base\n#DDB\n\n\
         ddb.virtualHWVersion = \"{hw}\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\nddb.geometry.heads = \"255\"\nddb.geometry.sectors = \"63\"\n\
         ddb.adapterType = \"{adapter}\"\n",
        name = opts.extent_name,
        hw = opts.hw_version,
        adapter = opts.adapter_type,
    )
}

/// Reads `capacity` bytes of `input` (short input reads as zeros) and writes a streamOptimized
/// VMDK of them to `out`. `cid` goes into the descriptor; derive it from the content for
/// reproducible output.
pub fn write_stream_optimized<R: Read, W: Write>(
    mut input: R,
    capacity: u64,
    cid: u32,
    opts: &VmdkOptions,
    out: W,
    mut progress: impl FnMut(u64),
) -> io::Result<VmdkInfo> {
    let capacity_sectors = capacity.div_ceil(SECTOR);
    let n_grains = capacity_sectors.div_ceil(GRAIN_SECTORS);
    let n_gts = n_grains.div_ceil(GTES_PER_GT).max(1);
    let mut out = Counting { inner: out, pos: 0 };

    out.put(&header(capacity_sectors, GD_AT_END))?;
    let desc = descriptor(capacity_sectors, cid, opts);
    if desc.len() as u64 > DESCRIPTOR_SECTORS * SECTOR {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "VMDK descriptor too long"));
    }
    out.put(desc.as_bytes())?;
    out.put(&vec![0u8; (OVERHEAD_SECTORS * SECTOR) as usize - 512 - desc.len()])?;

    let mut gt = vec![0u32; (n_gts * GTES_PER_GT) as usize];
    let mut buf = vec![0u8; GRAIN_BYTES as usize];
    let mut compressed = Vec::with_capacity(GRAIN_BYTES as usize + 1024);
    let mut grains = 0u64;
    let mut eof = false;
    for g in 0..n_grains {
        let want = (capacity_sectors * SECTOR - g * GRAIN_BYTES).min(GRAIN_BYTES) as usize;
        buf.fill(0);
        let mut got = 0;
        while !eof && got < want {
            let n = input.read(&mut buf[got..want])?;
            if n == 0 {
                eof = true;
            }
            got += n;
        }
        progress((g * GRAIN_BYTES + want as u64).min(capacity));
        if buf.iter().all(|&b| b == 0) {
            continue;
        }
        compressed.clear();
        let mut z = ZlibEncoder::new(&mut compressed, Compression::new(opts.level));
        z.write_all(&buf)?;
        z.finish()?;
        let sector = out.sector();
        gt[g as usize] = u32::try_from(sector)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "VMDK larger than 2 TiB of sectors"))?;
        out.put(&(g * GRAIN_SECTORS).to_le_bytes())?;
        out.put(&(compressed.len() as u32).to_le_bytes())?;
        out.put(&compressed)?;
        out.pad_to_sector()?;
        grains += 1;
    }

    // Grain tables, then the directory pointing at them.
    let gt_sectors = GTES_PER_GT * 4 / SECTOR;
    let mut gd = Vec::with_capacity(n_gts as usize);
    for t in 0..n_gts as usize {
        out.put(&marker(gt_sectors, MARKER_GT))?;
        gd.push(out.sector() as u32);
        let bytes: Vec<u8> = gt[t * GTES_PER_GT as usize..(t + 1) * GTES_PER_GT as usize]
            .iter()
            .flat_map(|e| e.to_le_bytes())
            .collect();
        out.put(&bytes)?;
    }
    let gd_bytes: Vec<u8> = gd.iter().flat_map(|e| e.to_le_bytes()).collect();
    let gd_sectors = (gd_bytes.len() as u64).div_ceil(SECTOR);
    out.put(&marker(gd_sectors, MARKER_GD))?;
    let gd_offset = out.sector();
    out.put(&gd_bytes)?;
    out.pad_to_sector()?;

    out.put(&marker(1, MARKER_FOOTER))?;
    out.put(&header(capacity_sectors, gd_offset))?;
    out.put(&marker(0, MARKER_EOS))?;
    out.inner.flush()?;
    Ok(VmdkInfo {
        capacity: capacity_sectors * SECTOR,
        file_size: out.pos,
        populated: grains * GRAIN_BYTES,
        grains,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    fn qemu_img(args: &[&str]) -> std::process::Output {
        Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img must be installed (.ci/setup installs qemu-utils)")
    }

    fn write_file(input: &Path, out: &Path, size: u64) -> VmdkInfo {
        let f = std::fs::File::open(input).unwrap();
        let o = std::io::BufWriter::new(std::fs::File::create(out).unwrap());
        let opts = VmdkOptions {
            extent_name: out.file_name().unwrap().to_string_lossy().into_owned(),
            ..Default::default()
        };
        write_stream_optimized(f, size, 7, &opts, o, |_| {}).unwrap()
    }

    /// A disk with data, runs of zeros, a partial last grain and incompressible bytes.
    fn sample(size: usize) -> Vec<u8> {
        let mut v = vec![0u8; size];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for (i, b) in v.iter_mut().enumerate() {
            let region = i / (100 * 1024);
            if region % 3 == 1 {
                continue; // zeros
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = if region % 3 == 0 { (i % 251) as u8 } else { x as u8 };
        }
        v
    }

    fn check_against_qemu(size: usize) {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        let vmdk = dir.path().join("disk.vmdk");
        std::fs::write(&raw, sample(size)).unwrap();
        let info = write_file(&raw, &vmdk, size as u64);
        assert_eq!(info.file_size, std::fs::metadata(&vmdk).unwrap().len());
        let info_out = qemu_img(&["info", "--output=json", vmdk.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&info_out.stdout);
        assert!(text.contains("streamOptimized"), "qemu-img info: {text}");
        let check = qemu_img(&["check", vmdk.to_str().unwrap()]);
        assert!(
            check.status.success(),
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        // compare, not check, is what catches a corrupt grain; size may be rounded up to a sector.
        if size.is_multiple_of(512) {
            let cmp = qemu_img(&[
                "compare",
                "-f",
                "raw",
                "-F",
                "vmdk",
                raw.to_str().unwrap(),
                vmdk.to_str().unwrap(),
            ]);
            assert!(
                cmp.status.success(),
                "qemu-img compare: {}{}",
                String::from_utf8_lossy(&cmp.stdout),
                String::from_utf8_lossy(&cmp.stderr)
            );
        }
        // Convert back and compare bytes, which covers the padded tail too.
        let back = dir.path().join("back.raw");
        let conv = qemu_img(&["convert", "-O", "raw", vmdk.to_str().unwrap(), back.to_str().unwrap()]);
        assert!(conv.status.success(), "{}", String::from_utf8_lossy(&conv.stderr));
        let b = std::fs::read(&back).unwrap();
        let a = std::fs::read(&raw).unwrap();
        assert_eq!(b.len() as u64, size.div_ceil(512) as u64 * 512);
        assert!(b[..a.len()] == a[..], "converted image differs");
        assert!(b[a.len()..].iter().all(|&x| x == 0));
    }

    #[test]
    fn qemu_img_compare_and_check_agree_with_raw_input() {
        // 40 MiB + 3 sectors: more than one grain table, a partial last grain.
        check_against_qemu(40 * 1024 * 1024 + 3 * 512);
    }

    #[test]
    fn unaligned_capacity_rounds_up_to_a_sector() {
        check_against_qemu(200_000);
    }

    #[test]
    fn an_empty_disk_has_no_grains_and_reads_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("zero.raw");
        let vmdk = dir.path().join("zero.vmdk");
        std::fs::File::create(&raw).unwrap().set_len(8 << 20).unwrap();
        let info = write_file(&raw, &vmdk, 8 << 20);
        assert_eq!(info.grains, 0);
        assert!(info.file_size < 128 * 1024 + 8 * 1024);
        let cmp = qemu_img(&["compare", "-f", "raw", raw.to_str().unwrap(), vmdk.to_str().unwrap()]);
        assert!(cmp.status.success());
    }

    #[test]
    fn a_corrupt_grain_is_caught_by_compare() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        let vmdk = dir.path().join("disk.vmdk");
        std::fs::write(&raw, sample(1 << 20)).unwrap();
        write_file(&raw, &vmdk, 1 << 20);
        let mut bytes = std::fs::read(&vmdk).unwrap();
        // Flip a byte inside the first grain's compressed data.
        let at = (OVERHEAD_SECTORS * SECTOR) as usize + 12 + 40;
        bytes[at] ^= 0xff;
        std::fs::write(&vmdk, &bytes).unwrap();
        let cmp = qemu_img(&["compare", "-f", "raw", raw.to_str().unwrap(), vmdk.to_str().unwrap()]);
        assert!(!cmp.status.success(), "compare must notice the corrupt grain");
    }

    #[test]
    fn output_is_deterministic() {
        let data = sample(3 << 20);
        let opts = VmdkOptions::default();
        let mut a = Vec::new();
        let mut b = Vec::new();
        write_stream_optimized(&data[..], data.len() as u64, 1, &opts, &mut a, |_| {}).unwrap();
        write_stream_optimized(&data[..], data.len() as u64, 1, &opts, &mut b, |_| {}).unwrap();
        assert_eq!(a, b);
        let text = String::from_utf8_lossy(&a[512..1024]);
        assert!(text.contains("createType=\"streamOptimized\""));
    }
}
