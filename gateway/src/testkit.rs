//! Deterministic disk images for tests and benchmarks: a realistic mix of text, structured
//! binary, zero runs and incompressible data, and scattered changes to them.

use rand::{Rng, RngCore, SeedableRng};
use std::path::Path;

/// Writes a disk image of `size` bytes with a realistic mix: text, structured binary, long
/// zero runs and incompressible random data.
pub fn make_disk(path: &Path, size: u64, seed: u64) -> std::io::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; size as usize];
    let words = [
        "lifeboat", "replica", "segment", "journal", "the", "of", "disk", "block", "recovery", "point", "\n", "  ",
    ];
    let mut off = 0usize;
    while off < data.len() {
        let run = (rng.gen_range(16..512) * 1024).min(data.len() - off);
        let region = &mut data[off..off + run];
        match rng.gen_range(0..4) {
            0 => {
                let mut i = 0;
                while i < region.len() {
                    let w = words[rng.gen_range(0..words.len())].as_bytes();
                    let n = w.len().min(region.len() - i);
                    region[i..i + n].copy_from_slice(&w[..n]);
                    i += n;
                }
            }
            1 => {
                for (i, b) in region.iter_mut().enumerate() {
                    *b = ((i / 8) as u8).wrapping_mul(31) ^ (i as u8 & 0x0f);
                }
            }
            2 => {} // zeros
            _ => rng.fill_bytes(region),
        }
        off += run;
    }
    std::fs::write(path, data)
}

/// Changes `count` scattered regions: new random data, and some regions zeroed.
pub fn scribble(path: &Path, count: usize, seed: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let size = f.metadata()?.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..count {
        let len = rng.gen_range(1..64) * 4096;
        let off = rng.gen_range(0..(size - len as u64) / 512) * 512;
        let mut buf = vec![0u8; len];
        if i % 4 != 0 {
            rng.fill_bytes(&mut buf);
        }
        f.write_all_at(&buf, off)?;
    }
    // The very last bytes of the disk too (the short last block path).
    f.write_all_at(b"tail of the disk", size - 16)?;
    f.sync_all()
}
