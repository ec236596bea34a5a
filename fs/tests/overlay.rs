//! The copy-on-write overlay of test failover, served as a writable export by the real NBD server
//! to real clients (qemu-io, nbdcopy, qemu-img): writes land in the overlay, the base never
//! changes, flushed writes survive a restart and a crash, damage to the map is reported clearly.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use common::{image, pattern, run, MemCatalog, MemView, TestServer};
use lifeboat_fs::overlay::{discard, Overlay, BLOCK_SIZE};
use lifeboat_fs::view::{DiskView, Extent};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
/// Not a multiple of 4 KiB: the last block is partial.
const SIZE: u64 = 8 * MIB + 1536;
const HOLES: &[(u64, u64)] = &[(MIB, 3 * MIB), (5 * MIB + 64 * KIB, 6 * MIB), (8 * MIB, SIZE)];
const OVERLAY: &str = "m1/disk0@test-failover";
const POINT: &str = "m1/disk0@latest";

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i} ({} != {})", got[i], want[i]);
    }
}

/// What the overlay must read back: the base plus every write, and the blocks writes touched.
struct Model {
    bytes: Vec<u8>,
    touched: BTreeSet<u64>,
}

impl Model {
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.bytes[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        for b in offset / BLOCK_SIZE..(offset + data.len() as u64).div_ceil(BLOCK_SIZE) {
            self.touched.insert(b);
        }
    }

    fn block(&self, b: u64) -> &[u8] {
        let s = (b * BLOCK_SIZE) as usize;
        &self.bytes[s..(s + BLOCK_SIZE as usize).min(self.bytes.len())]
    }

    /// Bytes of touched blocks that hold something other than zeroes (what the data file keeps).
    fn data_bytes(&self) -> u64 {
        self.touched
            .iter()
            .map(|&b| self.block(b))
            .filter(|blk| blk.iter().any(|x| *x != 0))
            .map(|blk| blk.len() as u64)
            .sum()
    }
}

async fn read_all(view: &dyn DiskView) -> Vec<u8> {
    view.read_at(0, view.size() as usize).await.unwrap().to_vec()
}

fn open(dir: &std::path::Path, base: &Arc<MemView>) -> Arc<Overlay> {
    Overlay::open(dir, base.clone() as Arc<dyn DiskView>).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_writes_land_in_the_overlay_the_base_is_untouched_and_a_restart_keeps_them() {
    let original = image(SIZE as usize, 7, HOLES);
    let base = Arc::new(MemView::read_only(original.clone(), HOLES));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m1-disk0");
    let overlay = open(&dir, &base);
    assert!(overlay.writable());
    assert_eq!(overlay.size(), SIZE);
    assert_eq!(overlay.written_bytes(), 0);

    let mut catalog = MemCatalog::default();
    catalog.add(OVERLAY, "test failover (writable)", overlay.clone());
    catalog.add(POINT, "the point under it", base.clone());
    let server = TestServer::start(catalog).await;
    let uri = server.uri(OVERLAY);

    let mut model = Model {
        bytes: original.clone(),
        touched: BTreeSet::new(),
    };
    // (qemu-io command, what it does to the model): aligned, unaligned across blocks, inside one
    // block, into a hole of the base, write-zeroes over data (aligned and not), the partial last
    // block, and a flush; a discard (trim) is accepted and changes nothing the server keeps.
    let cmds: Vec<(String, u64, Vec<u8>)> = vec![
        (format!("write -P 0x11 0 {}", MIB), 0, vec![0x11; MIB as usize]),
        ("write -P 0x22 5000 10000".into(), 5000, vec![0x22; 10000]),
        (
            format!("write -P 0x33 {} 17", MIB + 4096 + 1),
            MIB + 4096 + 1,
            vec![0x33; 17],
        ),
        (
            format!("write -P 0x44 {} 4096", MIB + MIB / 2),
            MIB + MIB / 2,
            vec![0x44; 4096],
        ),
        (
            format!("write -z {} {}", 3 * MIB, 512 * KIB),
            3 * MIB,
            vec![0; 512 * KIB as usize],
        ),
        ("write -z 4100 100".into(), 4100, vec![0; 100]),
        (
            format!("write -P 0x55 {} 1000", SIZE - 1000),
            SIZE - 1000,
            vec![0x55; 1000],
        ),
    ];
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for (cmd, offset, data) in &cmds {
        args.extend(["-c".into(), cmd.clone()]);
        model.write(*offset, data);
    }
    args.extend([
        "-c".into(),
        format!("discard {} {}", 6 * MIB, 64 * KIB),
        "-c".into(),
        "flush".into(),
        uri.clone(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-io", &args).await;

    // Read back through NBD (nbdcopy pipelines requests) and directly.
    let back = tmp.path().join("back.raw");
    run("nbdcopy", &[&uri, back.to_str().unwrap()]).await;
    assert_same(&std::fs::read(&back).unwrap(), &model.bytes, "nbdcopy of the overlay");
    assert_same(&read_all(&*overlay).await, &model.bytes, "overlay read_at");
    let verify = run("qemu-io", &["-f", "raw", "-r", "-c", "read -P 0x44 1572864 4096", &uri]).await;
    assert!(!verify.contains("Pattern verification failed"), "{verify}");

    // The base and the point served beside the overlay never changed.
    assert_same(&base.contents(), &original, "base after writes");
    let point = tmp.path().join("point.raw");
    run("nbdcopy", &[&server.uri(POINT), point.to_str().unwrap()]).await;
    assert_same(&std::fs::read(&point).unwrap(), &original, "the point over NBD");

    // Accounting: touched blocks that are not all zero are held as data.
    assert_eq!(overlay.written_bytes(), model.data_bytes());
    assert!(overlay.zeroed_bytes() >= 512 * KIB, "{}", overlay.zeroed_bytes());

    // Extents merge the overlay over the base: zeroes written over data are a hole, data written
    // into a base hole is data, the base's other holes stay holes.
    let ext = overlay.extents(3 * MIB - 4096, 512 * KIB + 8192).await.unwrap();
    assert_eq!(
        ext,
        vec![
            Extent {
                offset: 3 * MIB - 4096,
                len: 4096,
                allocated: false
            },
            Extent {
                offset: 3 * MIB,
                len: 512 * KIB,
                allocated: false
            },
            Extent {
                offset: 3 * MIB + 512 * KIB,
                len: 4096,
                allocated: true
            },
        ]
        .into_iter()
        .fold(Vec::<Extent>::new(), |mut v, e| {
            match v.last_mut() {
                Some(l) if l.allocated == e.allocated => l.len += e.len,
                _ => v.push(e),
            }
            v
        })
    );
    let ext = overlay.extents(MIB + MIB / 2 - 4096, 3 * 4096).await.unwrap();
    assert_eq!(
        ext,
        vec![
            Extent {
                offset: MIB + MIB / 2 - 4096,
                len: 4096,
                allocated: false
            },
            Extent {
                offset: MIB + MIB / 2,
                len: 4096,
                allocated: true
            },
            Extent {
                offset: MIB + MIB / 2 + 4096,
                len: 4096,
                allocated: false
            },
        ]
    );
    let map = run("qemu-img", &["map", "--output=json", "-f", "raw", &uri]).await;
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let holes: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    let mut want_holes = 0;
    for b in 0..SIZE.div_ceil(BLOCK_SIZE) {
        let len = (SIZE - b * BLOCK_SIZE).min(BLOCK_SIZE);
        let in_base_hole = HOLES
            .iter()
            .any(|&(s, e)| s <= b * BLOCK_SIZE && b * BLOCK_SIZE + len <= e);
        let hole = if model.touched.contains(&b) {
            model.block(b).iter().all(|x| *x == 0)
        } else {
            in_base_hole
        };
        if hole {
            want_holes += len;
        }
    }
    assert_eq!(holes, want_holes, "qemu-img map holes of the overlay");
    assert_eq!(server.stats.snapshot().errors, 0);
    server.stop().await;

    // A restart: the overlay is closed and opened again from its directory over the same base.
    drop(overlay);
    let reopened = open(&dir, &base);
    assert_same(&read_all(&*reopened).await, &model.bytes, "overlay after reopen");
    assert_eq!(reopened.written_bytes(), model.data_bytes());
    // It takes more writes after the restart.
    reopened
        .write_at(2 * MIB + 3, Bytes::from_static(b"after restart"))
        .await
        .unwrap();
    reopened.flush().await.unwrap();
    model.write(2 * MIB + 3, b"after restart");
    assert_same(&read_all(&*reopened).await, &model.bytes, "write after reopen");
    drop(reopened);

    // Cleanup discards it all; the same directory then starts a clean overlay.
    discard(&dir).unwrap();
    assert!(!dir.exists());
    discard(&dir).unwrap();
    let fresh = open(&dir, &base);
    assert_same(&read_all(&*fresh).await, &original, "a new overlay after discard");
    assert_eq!(fresh.written_bytes(), 0);
    drop(fresh);
    discard(&dir).unwrap();
    assert_same(&base.contents(), &original, "base at the end");
}

/// nbdcopy overwrites the whole export with an image (pipelined requests; zero runs become
/// write-zeroes): the overlay then reads as that image and stores only its non-zero blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_writes_a_whole_image_into_the_overlay() {
    let original = image(SIZE as usize, 3, HOLES);
    let base = Arc::new(MemView::read_only(original.clone(), HOLES));
    let tmp = tempfile::tempdir().unwrap();
    let overlay = open(&tmp.path().join("o"), &base);
    let mut catalog = MemCatalog::default();
    catalog.add(OVERLAY, "", overlay.clone());
    let server = TestServer::start(catalog).await;

    let new_holes = &[(0, 2 * MIB), (4 * MIB, 4 * MIB + 12 * KIB)];
    let src_bytes = image(SIZE as usize, 99, new_holes);
    let src = tmp.path().join("src.raw");
    std::fs::write(&src, &src_bytes).unwrap();
    run("nbdcopy", &["--flush", src.to_str().unwrap(), &server.uri(OVERLAY)]).await;
    server.stop().await;

    assert_same(&read_all(&*overlay).await, &src_bytes, "overlay after nbdcopy");
    assert_same(&base.contents(), &original, "base after nbdcopy");
    let zero: u64 = new_holes.iter().map(|(s, e)| e - s).sum();
    assert_eq!(overlay.written_bytes(), SIZE - zero, "only non-zero blocks are stored");
    let data_file = std::fs::metadata(tmp.path().join("o").join("data")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        data_file.blocks() * 512 <= SIZE - zero + 64 * KIB,
        "data file allocates {} bytes for {} bytes of data",
        data_file.blocks() * 512,
        SIZE - zero
    );
}

/// Many concurrent sub-block writes to the same blocks (as pipelined 512-byte sector writes
/// from several connections would be): none is lost to another's read-modify-write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_partial_writes_to_the_same_blocks_all_land() {
    let original = image(SIZE as usize, 5, HOLES);
    let base = Arc::new(MemView::read_only(original.clone(), HOLES));
    let tmp = tempfile::tempdir().unwrap();
    let overlay = open(&tmp.path().join("o"), &base);
    let mut want = original.clone();
    let mut tasks = Vec::new();
    // 16 blocks straddling a base hole's edge, 8 sectors each, written in shuffled order.
    let first = MIB - 8 * BLOCK_SIZE;
    let mut sectors: Vec<u64> = (0..16 * 8).map(|i| first + i * 512).collect();
    sectors.sort_by_key(|s| (s * 2_654_435_761) % 1031);
    for (i, &at) in sectors.iter().enumerate() {
        let data = pattern(512, 1000 + i as u64);
        want[at as usize..at as usize + 512].copy_from_slice(&data);
        let o = overlay.clone();
        tasks.push(tokio::spawn(async move { o.write_at(at, Bytes::from(data)).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_same(&read_all(&*overlay).await, &want, "after concurrent sector writes");
    assert_eq!(overlay.written_bytes(), 16 * BLOCK_SIZE);
}

/// A crash (no close, no flush after the last writes): what was flushed is there after reopen;
/// what was not is either wholly there or not at all, never torn within a write.
#[test]
fn flushed_writes_survive_a_crash() {
    let original = image(SIZE as usize, 11, HOLES);
    let base = Arc::new(MemView::read_only(original.clone(), HOLES));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("o");
    // Opened outside a runtime: no background flush, so only the explicit flush counts.
    let overlay = open(&dir, &base);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let flushed = pattern(3 * 4096 + 700, 1);
    let unflushed = pattern(5000, 2);
    rt.block_on(async {
        overlay.write_at(100, Bytes::from(flushed.clone())).await.unwrap();
        overlay.flush().await.unwrap();
        overlay
            .write_at(4 * MIB + 10, Bytes::from(unflushed.clone()))
            .await
            .unwrap();
    });
    std::mem::forget(overlay);

    let reopened = open(&dir, &base);
    let got = rt.block_on(read_all(&*reopened));
    let mut want = original.clone();
    want[100..100 + flushed.len()].copy_from_slice(&flushed);
    let u = 4 * MIB as usize + 10..4 * MIB as usize + 10 + unflushed.len();
    assert!(
        got[u.clone()] == original[u.clone()] || got[u.clone()] == unflushed[..],
        "an unflushed write came back torn"
    );
    want[u.clone()].copy_from_slice(&got[u]);
    assert_same(&got, &want, "after crash and reopen");
}

#[test]
fn a_damaged_or_foreign_map_is_a_clear_error() {
    let original = image(SIZE as usize, 13, HOLES);
    let base = Arc::new(MemView::read_only(original.clone(), HOLES));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("o");
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let overlay = open(&dir, &base);
    rt.block_on(async {
        overlay.write_at(0, Bytes::from(vec![9u8; 8192])).await.unwrap();
        overlay.flush().await.unwrap();
    });
    drop(overlay);
    let map = dir.join("map");
    let good = std::fs::read(&map).unwrap();
    let err = |expect: &str| {
        let e = Overlay::open(&dir, base.clone() as Arc<dyn DiskView>)
            .err()
            .expect("open must fail");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        let msg = e.to_string();
        assert!(msg.contains(map.to_str().unwrap()) && msg.contains(expect), "{msg}");
    };

    let mut flipped = good.clone();
    flipped[45] ^= 0x40;
    std::fs::write(&map, &flipped).unwrap();
    err("corrupt: checksum mismatch");
    std::fs::write(&map, &good[..good.len() - 7]).unwrap();
    err("corrupt");
    std::fs::write(&map, b"").unwrap();
    err("corrupt");

    // Intact, but made for a disk of another size.
    std::fs::write(&map, &good).unwrap();
    let other = Arc::new(MemView::read_only(image(SIZE as usize - 4096, 1, &[]), &[]));
    let e = Overlay::open(&dir, other as Arc<dyn DiskView>).err().unwrap();
    assert!(e.to_string().contains("not this disk's overlay"), "{e}");

    // Restored, it opens with its data.
    let overlay = open(&dir, &base);
    let got = rt.block_on(overlay.read_at(0, 8192)).unwrap();
    assert!(got.iter().all(|b| *b == 9));
    drop(overlay);
    discard(&dir).unwrap();
}
