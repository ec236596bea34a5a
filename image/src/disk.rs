//! The raw disk: a GPT (protective MBR, primary and backup headers) with one EFI system
//! partition, FAT32, written from code into a plain file (no root, loop device or mount).
//!
//! ```text
//! LBA 0        protective MBR
//! LBA 1..33    GPT header and 128 partition entries
//! 1 MiB ..     ESP "lifeboat-esp" (FAT32): \EFI\BOOT\BOOTX64.EFI (systemd-boot),
//!              \loader\loader.conf, \loader\entries\lifeboat.conf, \lifeboat\vmlinuz,
//!              \lifeboat\initrd.img
//! last 33 LBAs backup partition entries and header
//! ```
//! GUIDs and the FAT volume id come from a hash of the contents, FAT timestamps are the DOS
//! epoch (1980-01-01), so equal inputs give equal bytes.

use std::io::{Cursor, Seek, SeekFrom, Write};

use anyhow::{ensure, Context};
use sha2::{Digest, Sha256};

pub const SECTOR: u64 = 512;
/// The ESP starts at 1 MiB (aligned for every storage stack).
pub const ESP_START: u64 = 1 << 20;
pub const ESP_NAME: &str = "lifeboat-esp";
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const ENTRIES: u64 = 128;
const ENTRY_SIZE: u64 = 128;
const ENTRY_SECTORS: u64 = ENTRIES * ENTRY_SIZE / SECTOR;

/// A file to put on the ESP: path with `/` separators, bytes.
pub type EspFile = (String, Vec<u8>);

/// GUID text to its on-disk (mixed-endian) bytes.
pub fn guid_bytes(s: &str) -> [u8; 16] {
    let hexs: String = s.chars().filter(|c| *c != '-').collect();
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hexs[i * 2..i * 2 + 2], 16).expect("hex GUID");
    }
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    b
}

/// A version-4-shaped GUID derived from `seed`.
fn derived_guid(seed: &[u8], label: &str) -> [u8; 16] {
    let h = Sha256::new()
        .chain_update(seed)
        .chain_update(label.as_bytes())
        .finalize();
    let mut g = [0u8; 16];
    g.copy_from_slice(&h[..16]);
    g[7] = (g[7] & 0x0f) | 0x40; // version 4 (mixed-endian field 3)
    g[8] = (g[8] & 0x3f) | 0x80; // variant
    g
}

fn gpt_header(
    current: u64,
    backup: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: &[u8; 16],
    entries_lba: u64,
    entries_crc: u32,
) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[0..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&current.to_le_bytes());
    h[32..40].copy_from_slice(&backup.to_le_bytes());
    h[40..48].copy_from_slice(&first_usable.to_le_bytes());
    h[48..56].copy_from_slice(&last_usable.to_le_bytes());
    h[56..72].copy_from_slice(disk_guid);
    h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
    h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
    h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
    h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
    let crc = crc32fast::hash(&h[..92]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Formats the ESP image (FAT32) holding `files`.
pub fn fat_image(size: u64, volume_id: u32, files: &[EspFile]) -> anyhow::Result<Vec<u8>> {
    let mut buf = Cursor::new(vec![0u8; size as usize]);
    fatfs::format_volume(
        &mut buf,
        fatfs::FormatVolumeOptions::new()
            .fat_type(fatfs::FatType::Fat32)
            // FAT32 needs at least 65525 clusters (readers decide the type by the count).
            .bytes_per_cluster(if size / 1024 >= 66_000 { 1024 } else { 512 })
            .volume_id(volume_id)
            .volume_label(*b"LIFEBOAT   "),
    )
    .context("formatting the EFI system partition")?;
    buf.seek(SeekFrom::Start(0))?;
    {
        let fs = fatfs::FileSystem::new(&mut buf, fatfs::FsOptions::new())?;
        {
            let root = fs.root_dir();
            let mut sorted: Vec<&EspFile> = files.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(&b.0));
            for (path, data) in sorted {
                let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
                let mut dir = root.clone();
                for d in &parts[..parts.len() - 1] {
                    dir = match dir.open_dir(d) {
                        Ok(x) => x,
                        Err(_) => dir.create_dir(d)?,
                    };
                }
                let mut f = dir
                    .create_file(parts[parts.len() - 1])
                    .with_context(|| format!("creating {path} on the ESP"))?;
                f.truncate()?;
                f.write_all(data).with_context(|| {
                    format!("writing {path} ({} bytes) on the ESP: partition too small?", data.len())
                })?;
            }
        }
        fs.unmount()?;
    }
    Ok(buf.into_inner())
}

/// Writes the whole disk image (`size` bytes) to `out`: GPT plus the ESP filling the disk.
pub fn write_disk<W: Write + Seek>(out: &mut W, size: u64, files: &[EspFile]) -> anyhow::Result<()> {
    ensure!(size.is_multiple_of(1 << 20), "disk size must be a whole number of MiB");
    let sectors = size / SECTOR;
    let last_usable = sectors - 1 - ENTRY_SECTORS - 1;
    let esp_first = ESP_START / SECTOR;
    // End the ESP on a MiB boundary inside the usable area.
    let esp_last = ((last_usable + 1) / 2048) * 2048 - 1;
    ensure!(
        esp_last > esp_first + 2048 * 33,
        "disk of {size} bytes is too small for the ESP"
    );
    let esp_size = (esp_last - esp_first + 1) * SECTOR;

    let mut seed = Sha256::new();
    for (p, d) in files {
        seed.update(p.as_bytes());
        seed.update((d.len() as u64).to_le_bytes());
        seed.update(d);
    }
    let seed = seed.finalize();
    let disk_guid = derived_guid(&seed, "disk");
    let part_guid = derived_guid(&seed, "esp");
    let volume_id = u32::from_le_bytes([seed[20], seed[21], seed[22], seed[23]]);

    let esp = fat_image(esp_size, volume_id, files)?;

    // Protective MBR.
    let mut mbr = [0u8; 512];
    let pe = &mut mbr[446..462];
    pe[1..4].copy_from_slice(&[0x00, 0x02, 0x00]);
    pe[4] = 0xee;
    pe[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    pe[8..12].copy_from_slice(&1u32.to_le_bytes());
    pe[12..16].copy_from_slice(&((sectors - 1).min(u32::MAX as u64) as u32).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;

    // Partition entries.
    let mut entries = vec![0u8; (ENTRIES * ENTRY_SIZE) as usize];
    entries[0..16].copy_from_slice(&guid_bytes(ESP_TYPE));
    entries[16..32].copy_from_slice(&part_guid);
    entries[32..40].copy_from_slice(&esp_first.to_le_bytes());
    entries[40..48].copy_from_slice(&esp_last.to_le_bytes());
    // attributes 0; name UTF-16LE
    for (i, u) in ESP_NAME.encode_utf16().enumerate() {
        entries[56 + i * 2..58 + i * 2].copy_from_slice(&u.to_le_bytes());
    }
    let entries_crc = crc32fast::hash(&entries);
    let first_usable = 2 + ENTRY_SECTORS;
    let primary = gpt_header(1, sectors - 1, first_usable, last_usable, &disk_guid, 2, entries_crc);
    let backup_entries_lba = sectors - 1 - ENTRY_SECTORS;
    let backup = gpt_header(
        sectors - 1,
        1,
        first_usable,
        last_usable,
        &disk_guid,
        backup_entries_lba,
        entries_crc,
    );

    // Write sequentially; gaps are zeros (written, so the output may be any Write + Seek).
    let zeros = vec![0u8; 1 << 20];
    out.write_all(&mbr)?;
    out.write_all(&primary)?;
    out.write_all(&entries)?;
    let mut pos = (2 + ENTRY_SECTORS) * SECTOR;
    out.write_all(&zeros[..(ESP_START - pos) as usize])?;
    out.write_all(&esp)?;
    pos = ESP_START + esp_size;
    let mut gap = backup_entries_lba * SECTOR - pos;
    while gap > 0 {
        let n = gap.min(zeros.len() as u64);
        out.write_all(&zeros[..n as usize])?;
        gap -= n;
    }
    out.write_all(&entries)?;
    out.write_all(&backup)?;
    out.flush()?;
    Ok(())
}

/// The ESP's byte range of a disk written by [`write_disk`] (for tests and checks).
pub fn esp_range(disk: &[u8]) -> anyhow::Result<(u64, u64)> {
    ensure!(disk.len() >= 34 * 512 && &disk[512..520] == b"EFI PART", "no GPT");
    let e = &disk[1024..1024 + 128];
    let first = u64::from_le_bytes(e[32..40].try_into()?);
    let last = u64::from_le_bytes(e[40..48].try_into()?);
    Ok((first * SECTOR, (last + 1) * SECTOR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn esp_type_guid_has_the_on_disk_byte_order() {
        assert_eq!(
            guid_bytes(ESP_TYPE),
            [0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b]
        );
    }

    fn disk(files: &[EspFile]) -> Vec<u8> {
        let mut c = Cursor::new(Vec::new());
        write_disk(&mut c, 64 << 20, files).unwrap();
        c.into_inner()
    }

    #[test]
    fn gpt_is_valid_and_files_read_back() {
        let files = vec![
            ("EFI/BOOT/BOOTX64.EFI".to_string(), vec![0xaa; 100_000]),
            ("loader/loader.conf".to_string(), b"timeout 0\n".to_vec()),
        ];
        let d = disk(&files);
        assert_eq!(d.len(), 64 << 20);
        assert_eq!(&d[510..512], &[0x55, 0xaa]);
        // Header CRC checks out, the backup header sits in the last sector.
        let h = &d[512..1024];
        let mut copy = h[..92].to_vec();
        copy[16..20].fill(0);
        assert_eq!(
            crc32fast::hash(&copy),
            u32::from_le_bytes(h[16..20].try_into().unwrap())
        );
        assert_eq!(&d[d.len() - 512..d.len() - 504], b"EFI PART");
        let (a, b) = esp_range(&d).unwrap();
        assert_eq!(a, ESP_START);
        let fs =
            fatfs::FileSystem::new(Cursor::new(d[a as usize..b as usize].to_vec()), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.fat_type(), fatfs::FatType::Fat32);
        let mut f = fs.root_dir().open_file("EFI/BOOT/BOOTX64.EFI").unwrap();
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut v).unwrap();
        assert_eq!(v, vec![0xaa; 100_000]);
    }

    #[test]
    fn same_files_same_bytes_other_files_other_guids() {
        let f1 = vec![("a/b.txt".to_string(), b"one".to_vec())];
        let f2 = vec![("a/b.txt".to_string(), b"two".to_vec())];
        assert!(disk(&f1) == disk(&f1));
        assert_ne!(disk(&f1)[568..584], disk(&f2)[568..584], "disk GUIDs differ");
    }
}
