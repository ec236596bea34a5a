//! The bench's disk corpus: a generated image that looks, to a compressor, like a server's
//! disk: program code, text and logs, database pages, incompressible files (media, archives,
//! encrypted data) and unallocated zeros, in extents of 16–512 KiB.
//!
//! Calibrated against real data, not tuned to flatter the pipeline: `zstd -1` compresses it about
//! 2.1× at about 400 MB/s per core, the figures the replication issue gives for "such a mix",
//! where a tar of this machine's `/usr` gives 2.6× at 535 MB/s. The tests' corpus
//! (`gateway::testkit::make_disk`: a 12-word vocabulary, a 128-byte pattern) compresses 3.3× at
//! 1.2 GB/s, far easier than any real disk.

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use std::io::Write;
use std::path::Path;

/// Writes a `size`-byte realistic disk image to `path`; the same `seed` gives the same bytes.
pub fn make_realistic_disk(path: &Path, size: u64, seed: u64) -> std::io::Result<()> {
    let mut gen = Generator::new(seed);
    let mut out = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(path)?);
    let mut extent = Vec::with_capacity(512 << 10);
    let mut written = 0u64;
    while written < size {
        let len = ((gen.rng.gen_range(4..128u64) * 4096).min(size - written)) as usize;
        extent.clear();
        extent.resize(len, 0);
        gen.fill(&mut extent);
        out.write_all(&extent)?;
        written += len as u64;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// What an extent holds, with its share of the disk in percent.
const KINDS: [(Kind, u32); 5] = [
    (Kind::Code, 26),
    (Kind::Text, 22),
    (Kind::Database, 20),
    (Kind::Incompressible, 18),
    (Kind::Zeros, 14),
];

#[derive(Clone, Copy)]
enum Kind {
    Code,
    Text,
    Database,
    Incompressible,
    Zeros,
}

struct Generator {
    rng: SmallRng,
    /// Words of a generated language; `word_pick` maps a uniform 20-bit number to a word
    /// index with Zipf's law (s = 1), as word frequencies in real text are.
    words: Vec<Vec<u8>>,
    word_pick: Vec<u32>,
    /// Machine "instructions": short opcode sequences, picked the same Zipf way.
    ops: Vec<Vec<u8>>,
    /// Addresses code refers to (calls, globals): a program touches a limited set.
    addresses: Vec<u32>,
}

impl Generator {
    fn new(seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        const SYLLABLES: [&str; 24] = [
            "ka", "re", "to", "mi", "sa", "lo", "ne", "vi", "tra", "con", "ing", "er", "st", "pre", "al", "ex", "dis",
            "ment", "ous", "ly", "and", "th", "qu", "ion",
        ];
        let words: Vec<Vec<u8>> = (0..20_000)
            .map(|_| {
                let n = rng.gen_range(1..=4);
                (0..n)
                    .flat_map(|_| SYLLABLES[rng.gen_range(0..SYLLABLES.len())].bytes())
                    .collect()
            })
            .collect();
        let ops: Vec<Vec<u8>> = (0..4_000)
            .map(|_| {
                let n = rng.gen_range(1..=12);
                (0..n).map(|_| rng.gen()).collect()
            })
            .collect();
        let addresses = (0..2_000).map(|_| rng.gen::<u32>() & 0x00ff_fff0).collect();
        Self {
            word_pick: zipf_table(words.len()),
            words,
            ops,
            addresses,
            rng,
        }
    }

    fn pick(&mut self, table_len: usize) -> usize {
        // The Zipf table is built for `words.len()` entries; other vocabularies scale into it.
        let i = self.word_pick[(self.rng.next_u32() >> 12) as usize] as usize;
        i * table_len / self.words.len()
    }

    fn fill(&mut self, extent: &mut [u8]) {
        let roll = self.rng.gen_range(0..100);
        let mut acc = 0;
        let kind = KINDS
            .iter()
            .find(|(_, share)| {
                acc += share;
                roll < acc
            })
            .map_or(Kind::Zeros, |(k, _)| *k);
        match kind {
            Kind::Code => self.code(extent),
            Kind::Text => self.text(extent),
            Kind::Database => self.database(extent),
            Kind::Incompressible => self.rng.fill_bytes(extent),
            Kind::Zeros => {}
        }
    }

    /// Instruction streams: frequent opcode sequences with operands, addresses from the
    /// program's own set and, now and then, a random immediate.
    fn code(&mut self, out: &mut [u8]) {
        let mut at = 0;
        while at < out.len() {
            // Idioms recur: now and then a recent stretch of code again.
            if at > 4096 && self.rng.gen_range(0..6) == 0 {
                let from = at - self.rng.gen_range(64..4096);
                let n = self.rng.gen_range(8..48).min(out.len() - at);
                out.copy_within(from..from + n, at);
                at += n;
                continue;
            }
            let op = self.pick(self.ops.len());
            let mut piece = [0u8; 24];
            let mut n = self.ops[op].len();
            piece[..n].copy_from_slice(&self.ops[op]);
            match self.rng.gen_range(0..8) {
                0..=2 => {
                    let a = self.pick(self.addresses.len());
                    piece[n..n + 4].copy_from_slice(&self.addresses[a].to_le_bytes());
                    n += 4;
                }
                3 => {
                    piece[n] = self.rng.gen::<u8>() & 0x7f;
                    n += 1;
                }
                _ => {}
            }
            let n = n.min(out.len() - at);
            out[at..at + n].copy_from_slice(&piece[..n]);
            at += n;
        }
    }

    /// Prose and log lines: Zipf-distributed words, punctuation, timestamps, numbers and ids.
    fn text(&mut self, out: &mut [u8]) {
        let mut line = Vec::with_capacity(256);
        let mut at = 0;
        let mut clock = self.rng.gen_range(1_600_000_000u64..1_800_000_000);
        let log = self.rng.gen_bool(0.5);
        while at < out.len() {
            line.clear();
            if log {
                clock += self.rng.gen_range(0..3);
                let level = ["INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"][self.rng.gen_range(0..6)];
                let micros = self.rng.gen_range(0..1_000_000);
                let source = self.pick(64);
                let _ = write!(
                    line,
                    "{clock}.{micros:06} {level} [{}] ",
                    self.words[source].escape_ascii()
                );
            }
            let words = self.rng.gen_range(4..16);
            for w in 0..words {
                match self.rng.gen_range(0..24) {
                    0 => {
                        let _ = write!(line, "{}", self.rng.gen_range(0..100_000));
                    }
                    1 if log => {
                        let _ = write!(line, "{:08x}", self.rng.gen::<u32>());
                    }
                    _ => {
                        let word = self.pick(self.words.len());
                        line.extend_from_slice(&self.words[word]);
                    }
                }
                line.push(if w + 1 == words {
                    b'\n'
                } else if self.rng.gen_range(0..12) == 0 {
                    b','
                } else {
                    b' '
                });
            }
            let n = line.len().min(out.len() - at);
            out[at..at + n].copy_from_slice(&line[..n]);
            at += n;
        }
    }

    /// 8 KiB database pages: a page header, then rows of an id, a timestamp, small integers,
    /// a measurement (8 random bytes) and a short name.
    fn database(&mut self, out: &mut [u8]) {
        let mut id = self.rng.gen_range(0..1_000_000u64);
        let mut stamp = self.rng.gen_range(1_600_000_000u64..1_800_000_000);
        for (page_no, page) in out.chunks_mut(8192).enumerate() {
            let mut row = Vec::with_capacity(64);
            let mut at = 24.min(page.len());
            page[..at].copy_from_slice(
                &[
                    0xd0,
                    0x07,
                    0,
                    0,
                    (page_no as u8),
                    0,
                    0,
                    0,
                    0,
                    0x20,
                    0,
                    0x1f,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                ][..at],
            );
            while at < page.len() {
                row.clear();
                id += 1;
                stamp += self.rng.gen_range(0..60);
                row.extend_from_slice(&id.to_le_bytes());
                row.extend_from_slice(&stamp.to_le_bytes());
                row.extend_from_slice(&self.rng.gen_range(0..16u32).to_le_bytes());
                row.extend_from_slice(&self.rng.gen_range(0..1000u32).to_le_bytes());
                row.extend_from_slice(&self.rng.gen::<u64>().to_le_bytes());
                let name = self.pick(self.words.len());
                row.push(self.words[name].len() as u8);
                row.extend_from_slice(&self.words[name]);
                let n = row.len().min(page.len() - at);
                page[at..at + n].copy_from_slice(&row[..n]);
                at += n;
            }
        }
    }
}

/// A table of 2^20 entries mapping a uniform number to a rank in `0..n`, with Zipf's law
/// (probability of rank r proportional to 1 / (r + 1)).
fn zipf_table(n: usize) -> Vec<u32> {
    let weights: Vec<f64> = (0..n).map(|r| 1.0 / (r + 1) as f64).collect();
    let total: f64 = weights.iter().sum();
    let slots = 1usize << 20;
    let mut table = Vec::with_capacity(slots);
    let mut cumulative = 0.0;
    for (rank, w) in weights.iter().enumerate() {
        cumulative += w / total;
        let upto = ((cumulative * slots as f64) as usize).min(slots);
        while table.len() < upto {
            table.push(rank as u32);
        }
    }
    table.resize(slots, (n - 1) as u32);
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seed: u64) -> Vec<u8> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        make_realistic_disk(&path, 64 << 20, seed).expect("generate");
        std::fs::read(path).expect("read")
    }

    #[test]
    fn the_same_seed_gives_the_same_disk() {
        let a = sample(7);
        assert_eq!(a.len(), 64 << 20);
        assert_eq!(a, sample(7));
        assert_ne!(a, sample(8));
    }

    /// The calibration: zstd -1 compresses the corpus about 2.1× (the "such a mix"), with
    /// every kind of content present: zeros, incompressible and compressible extents.
    #[test]
    fn zstd_compresses_it_like_a_real_disk() {
        let disk = sample(42);
        let compressed = zstd::bulk::compress(&disk, 1).expect("zstd");
        let ratio = disk.len() as f64 / compressed.len() as f64;
        assert!((1.9..2.4).contains(&ratio), "zstd -1 ratio {ratio:.2}");
        let (mut zeros, mut random, mut compressible) = (0, 0, 0);
        for block in disk.chunks(64 << 10) {
            if block.iter().all(|&b| b == 0) {
                zeros += 1;
                continue;
            }
            let packed = zstd::bulk::compress(block, 1).expect("zstd").len();
            if packed * 100 > block.len() * 99 {
                random += 1;
            } else {
                compressible += 1;
            }
        }
        let blocks = disk.len() / (64 << 10);
        for (what, n, low, high) in [
            ("all-zero", zeros, 5, 20),
            ("incompressible", random, 8, 25),
            ("compressible", compressible, 55, 85),
        ] {
            let share = n * 100 / blocks;
            assert!((low..=high).contains(&share), "{what} blocks: {share}% of the disk");
        }
    }
}
