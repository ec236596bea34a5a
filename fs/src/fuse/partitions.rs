//! Partition tables: GPT (checksums verified, backup header used when the primary is damaged)
//! and MBR with extended (logical) partitions. Partitions are numbered as Linux numbers them:
//! GPT by entry slot, MBR primaries 1-4 and logical ones from 5.

use std::io;

use crate::view::DiskView;

/// One partition, in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// 1-based, as in `p1`, `p2`, ...
    pub index: u32,
    pub start: u64,
    pub len: u64,
}

const SECTOR: u64 = 512;
const MAX_GPT_ENTRIES: u32 = 1024;
const MAX_LOGICAL: u32 = 128;

fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}
fn u64le(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

async fn read(view: &dyn DiskView, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let size = view.size();
    if offset >= size {
        return Ok(Vec::new());
    }
    let n = (len as u64).min(size - offset) as usize;
    Ok(view.read_at(offset, n).await?.to_vec())
}

/// A GPT header's fields the reader needs.
struct GptHeader {
    entries_lba: u64,
    count: u32,
    entry_size: u32,
    entries_crc: u32,
}

fn parse_gpt_header(b: &[u8]) -> Option<GptHeader> {
    if b.len() < 92 || &b[0..8] != b"EFI PART" {
        return None;
    }
    let header_size = u32le(b, 12) as usize;
    if !(92..=b.len()).contains(&header_size) {
        return None;
    }
    let mut h = b[..header_size].to_vec();
    h[16..20].fill(0);
    if crc32fast::hash(&h) != u32le(b, 16) {
        return None;
    }
    let count = u32le(b, 80);
    let entry_size = u32le(b, 84);
    if count > MAX_GPT_ENTRIES || !(128..=4096).contains(&entry_size) || !entry_size.is_multiple_of(8) {
        return None;
    }
    Some(GptHeader {
        entries_lba: u64le(b, 72),
        count,
        entry_size,
        entries_crc: u32le(b, 88),
    })
}

/// Parses GPT entries; `None` when their checksum does not match.
fn parse_gpt_entries(h: &GptHeader, b: &[u8], disk_size: u64) -> Option<Vec<Partition>> {
    let len = (h.count * h.entry_size) as usize;
    if b.len() < len || crc32fast::hash(&b[..len]) != h.entries_crc {
        return None;
    }
    let mut out = Vec::new();
    for i in 0..h.count {
        let e = &b[(i * h.entry_size) as usize..((i + 1) * h.entry_size) as usize];
        if e[0..16].iter().all(|x| *x == 0) {
            continue;
        }
        let (first, last) = (u64le(e, 32), u64le(e, 40));
        let start = first.saturating_mul(SECTOR);
        let end = last.saturating_add(1).saturating_mul(SECTOR).min(disk_size);
        if first == 0 || end <= start {
            continue;
        }
        out.push(Partition {
            index: i + 1,
            start,
            len: end - start,
        });
    }
    Some(out)
}

async fn gpt_at(view: &dyn DiskView, header_offset: u64) -> io::Result<Option<Vec<Partition>>> {
    let b = read(view, header_offset, SECTOR as usize).await?;
    let Some(h) = parse_gpt_header(&b) else {
        return Ok(None);
    };
    let entries = read(
        view,
        h.entries_lba.saturating_mul(SECTOR),
        (h.count * h.entry_size) as usize,
    )
    .await?;
    Ok(parse_gpt_entries(&h, &entries, view.size()))
}

/// MBR primary entries: `(index, type, start, len)` in bytes.
fn mbr_entries(sector: &[u8]) -> Option<Vec<(u32, u8, u64, u64)>> {
    if sector.len() < 512 || sector[510] != 0x55 || sector[511] != 0xaa {
        return None;
    }
    let mut out = Vec::new();
    for i in 0..4 {
        let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
        let ty = e[4];
        let (lba, sectors) = (u64::from(u32le(e, 8)), u64::from(u32le(e, 12)));
        if ty == 0 || sectors == 0 {
            continue;
        }
        out.push((i as u32 + 1, ty, lba * SECTOR, sectors * SECTOR));
    }
    Some(out)
}

fn is_extended(ty: u8) -> bool {
    matches!(ty, 0x05 | 0x0f | 0x85)
}

/// The partitions of a disk: GPT if the protective MBR says so, else MBR; empty when neither.
pub async fn read_partitions(view: &dyn DiskView) -> io::Result<Vec<Partition>> {
    let size = view.size();
    let mbr = read(view, 0, SECTOR as usize).await?;
    let Some(primaries) = mbr_entries(&mbr) else {
        return Ok(Vec::new());
    };
    if primaries.iter().any(|p| p.1 == 0xee) {
        if let Some(parts) = gpt_at(view, SECTOR).await? {
            return Ok(parts);
        }
        if size >= 2 * SECTOR {
            if let Some(parts) = gpt_at(view, (size / SECTOR - 1) * SECTOR).await? {
                return Ok(parts);
            }
        }
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for &(index, ty, start, len) in &primaries {
        if is_extended(ty) {
            // Logical partitions: a chain of EBRs, each relative to the extended partition.
            let mut next = start;
            let mut n = 5;
            while n < 5 + MAX_LOGICAL {
                let ebr = read(view, next, SECTOR as usize).await?;
                let Some(entries) = mbr_entries(&ebr) else { break };
                let mut link = None;
                for &(slot, ety, rel, elen) in &entries {
                    if slot == 1 && !is_extended(ety) {
                        let s = next + rel;
                        if s < size {
                            out.push(Partition {
                                index: n,
                                start: s,
                                len: elen.min(size - s),
                            });
                        }
                        n += 1;
                    } else if slot == 2 && is_extended(ety) {
                        link = Some(start + rel);
                    }
                }
                match link {
                    Some(l) if l > next => next = l,
                    _ => break,
                }
            }
        } else if start < size && start > 0 {
            out.push(Partition {
                index,
                start,
                len: len.min(size - start),
            });
        }
    }
    out.sort_by_key(|p| p.index);
    Ok(out)
}

/// Whether `sb` (the 1024 bytes at offset 1024 of a partition) is an ext2/3/4 superblock.
pub fn is_ext_superblock(sb: &[u8]) -> bool {
    sb.len() >= 58 && u16le(sb, 56) == 0xef53
}

/// A GPT disk image in memory (for tests): `parts` are `(first_lba, last_lba)`.
#[cfg(test)]
pub fn gpt_image(size: u64, parts: &[(u64, u64)]) -> Vec<u8> {
    let mut d = vec![0u8; size as usize];
    let sectors = size / SECTOR;
    // Protective MBR.
    let e = &mut d[446..462];
    e[4] = 0xee;
    e[8..12].copy_from_slice(&1u32.to_le_bytes());
    e[12..16].copy_from_slice(&((sectors - 1).min(u32::MAX as u64) as u32).to_le_bytes());
    d[510] = 0x55;
    d[511] = 0xaa;
    let mut entries = vec![0u8; 128 * 128];
    for (i, &(first, last)) in parts.iter().enumerate() {
        let e = &mut entries[i * 128..(i + 1) * 128];
        e[0..16].copy_from_slice(&[
            0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4,
        ]);
        e[16] = i as u8 + 1;
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&last.to_le_bytes());
    }
    let entries_crc = crc32fast::hash(&entries);
    let header = |current: u64, backup: u64, entries_lba: u64| {
        let mut h = vec![0u8; 92];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&current.to_le_bytes());
        h[32..40].copy_from_slice(&backup.to_le_bytes());
        h[40..48].copy_from_slice(&34u64.to_le_bytes());
        h[48..56].copy_from_slice(&(sectors - 34).to_le_bytes());
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32fast::hash(&h);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    };
    d[512..604].copy_from_slice(&header(1, sectors - 1, 2));
    d[1024..1024 + entries.len()].copy_from_slice(&entries);
    let backup_entries = ((sectors - 33) * SECTOR) as usize;
    d[backup_entries..backup_entries + entries.len()].copy_from_slice(&entries);
    let b = ((sectors - 1) * SECTOR) as usize;
    d[b..b + 92].copy_from_slice(&header(sectors - 1, 1, sectors - 33));
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures::future::BoxFuture;

    struct Mem(Bytes);
    impl DiskView for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>> {
            let b = self.0.slice(offset as usize..offset as usize + len);
            Box::pin(async move { Ok(b) })
        }
    }

    fn parts(d: Vec<u8>) -> Vec<Partition> {
        futures::executor::block_on(read_partitions(&Mem(Bytes::from(d)))).unwrap()
    }

    #[test]
    fn gpt_primary_and_backup() {
        let d = gpt_image(4 << 20, &[(2048, 4095), (4096, 8158)]);
        let want = vec![
            Partition {
                index: 1,
                start: 2048 * 512,
                len: 2048 * 512,
            },
            Partition {
                index: 2,
                start: 4096 * 512,
                len: (8159 - 4096) * 512,
            },
        ];
        assert_eq!(parts(d.clone()), want);
        // A damaged primary header: the backup at the last sector is used.
        let mut bad = d.clone();
        bad[512 + 40] ^= 1;
        assert_eq!(parts(bad), want);
        // Damaged entries in both copies: no partitions rather than garbage.
        let mut bad = d;
        bad[1024 + 33] ^= 1;
        let n = bad.len() - 33 * 512 + 33;
        bad[n] ^= 1;
        assert_eq!(parts(bad), vec![]);
    }

    #[test]
    fn mbr_with_logical_partitions() {
        let mut d = vec![0u8; 8 << 20];
        let entry = |d: &mut [u8], at: usize, ty: u8, lba: u32, n: u32| {
            d[at + 4] = ty;
            d[at + 8..at + 12].copy_from_slice(&lba.to_le_bytes());
            d[at + 12..at + 16].copy_from_slice(&n.to_le_bytes());
        };
        entry(&mut d, 446, 0x83, 2048, 2048);
        entry(&mut d, 462, 0x05, 4096, 8192);
        d[510] = 0x55;
        d[511] = 0xaa;
        // EBR 1 at 4096: logical at +63, next EBR at +4096.
        let e1 = 4096 * 512;
        entry(&mut d, e1 + 446, 0x83, 63, 1000);
        entry(&mut d, e1 + 462, 0x05, 4096, 2000);
        d[e1 + 510] = 0x55;
        d[e1 + 511] = 0xaa;
        let e2 = 8192 * 512;
        entry(&mut d, e2 + 446, 0x07, 63, 500);
        d[e2 + 510] = 0x55;
        d[e2 + 511] = 0xaa;
        let p = parts(d);
        assert_eq!(
            p,
            vec![
                Partition {
                    index: 1,
                    start: 2048 * 512,
                    len: 2048 * 512
                },
                Partition {
                    index: 5,
                    start: (4096 + 63) * 512,
                    len: 1000 * 512
                },
                Partition {
                    index: 6,
                    start: (8192 + 63) * 512,
                    len: 500 * 512
                },
            ]
        );
    }

    #[test]
    fn no_table() {
        assert_eq!(parts(vec![0u8; 1 << 20]), vec![]);
        let mut sb = vec![0u8; 1024];
        sb[56] = 0x53;
        sb[57] = 0xef;
        assert!(is_ext_superblock(&sb));
    }
}
