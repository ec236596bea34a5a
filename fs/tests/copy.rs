//! Writing a view onto a disk: full copies (failover) equal the view byte for byte and keep its
//! holes sparse; differential copies (failback) write exactly the 64 KiB blocks that differ, and
//! nothing on a second run; a failback from a test-failover overlay writes only what changed.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::{image, pattern, MemView};
use lifeboat_fs::copy::{copy_view, CopyMode, CopyStats, COMPARE_BLOCK};
use lifeboat_fs::overlay::Overlay;
use lifeboat_fs::view::DiskView;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
/// Several chunks, a partial last 64 KiB block.
const SIZE: u64 = 21 * MIB + 5 * 4096 + 512;
/// Large holes, small ones, one across a chunk boundary, and the tail.
const HOLES: &[(u64, u64)] = &[
    (MIB, 4 * MIB),
    (6 * MIB + 8 * KIB, 6 * MIB + 20 * KIB),
    (9 * MIB - 128 * KIB, 10 * MIB + 256 * KIB),
    (15 * MIB, 18 * MIB),
    (21 * MIB, SIZE),
];

fn hole_bytes() -> u64 {
    HOLES.iter().map(|(s, e)| e - s).sum()
}

fn view(seed: u64) -> (Vec<u8>, Arc<MemView>) {
    let bytes = image(SIZE as usize, seed, HOLES);
    let view = Arc::new(MemView::read_only(bytes.clone(), HOLES));
    (bytes, view)
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

/// Aligned 64 KiB blocks (the last one partial) in which `a` and `b` differ.
fn differing_blocks(a: &[u8], b: &[u8]) -> u64 {
    a.chunks(COMPARE_BLOCK as usize)
        .zip(b.chunks(COMPARE_BLOCK as usize))
        .filter(|(x, y)| x != y)
        .count() as u64
}

/// Copies and checks that progress rose monotonically to the total.
async fn copy(view: Arc<dyn DiskView>, target: &Path, mode: CopyMode) -> std::io::Result<CopyStats> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let stats = copy_view(view.clone(), target, mode, move |done, total| {
        s.lock().unwrap().push((done, total))
    })
    .await?;
    let seen = seen.lock().unwrap();
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(seen.iter().all(|&(_, t)| t == view.size()));
    assert!(
        seen.windows(2).all(|w| w[0].0 <= w[1].0),
        "progress goes backwards: {seen:?}"
    );
    assert_eq!(seen.last().unwrap().0, view.size());
    assert_eq!(stats.bytes_total, view.size());
    Ok(stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_copy_equals_the_view_and_keeps_holes_sparse() {
    let (bytes, view) = view(1);
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("disk.raw");
    let stats = copy(view, &target, CopyMode::Full).await.unwrap();
    assert_same(&std::fs::read(&target).unwrap(), &bytes, "full copy");
    let data = SIZE - hole_bytes();
    assert_eq!(stats.bytes_written, data, "{stats:?}");
    assert_eq!(stats.bytes_skipped_holes, hole_bytes(), "{stats:?}");
    assert_eq!(stats.blocks_compared, 0, "a new file is known zero: {stats:?}");
    let allocated = std::fs::metadata(&target).unwrap().blocks() * 512;
    assert!(
        (data..=data + 64 * KIB).contains(&allocated),
        "{allocated} bytes allocated for {data} bytes of data"
    );
}

/// Failover onto a disk that held something else: the holes of the view are zeroed where the
/// old content was not zero, and a shorter file is extended (the new part stays sparse).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_copy_over_old_content_and_onto_a_shorter_file() {
    let (bytes, view) = view(2);
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("old.raw");
    // Old content over the first 12 MiB (non-zero everywhere), nothing after.
    std::fs::write(&target, pattern(12 * MIB as usize, 77)).unwrap();
    let stats = copy(view.clone(), &target, CopyMode::Full).await.unwrap();
    assert_same(&std::fs::read(&target).unwrap(), &bytes, "full copy over old content");
    // Holes below 12 MiB were compared and zeroed, holes above skipped without reading.
    let holes_below: u64 = HOLES.iter().map(|&(s, e)| e.min(12 * MIB).saturating_sub(s)).sum();
    assert_eq!(stats.bytes_skipped_holes, hole_bytes() - holes_below, "{stats:?}");
    assert!(stats.blocks_compared > 0);

    // Run again: blocks with data are written whole (over an old disk the small hole inside a
    // data block is written as zeroes), blocks that are all hole compare equal and are skipped.
    let again = copy(view, &target, CopyMode::Full).await.unwrap();
    let hole_in_data_block = 12 * KIB;
    assert_eq!(
        again.bytes_written,
        SIZE - hole_bytes() + hole_in_data_block,
        "{again:?}"
    );
    assert_eq!(
        again.bytes_skipped_holes,
        hole_bytes() - hole_in_data_block,
        "{again:?}"
    );
    assert_same(&std::fs::read(&target).unwrap(), &bytes, "full copy run twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_copy_writes_exactly_the_blocks_that_differ() {
    let (bytes, view) = view(3);
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("disk.raw");
    let mut old = bytes.clone();
    // Scattered changes: single bytes, two in one block, one across a block boundary, one in a
    // hole of the view (the target has data where the view reads zero), the partial last block.
    for at in [
        0,
        100,
        200,
        5 * MIB + 3,
        7 * MIB + COMPARE_BLOCK - 2,
        2 * MIB + 12345,
        9 * MIB + 7,
        12 * MIB + 64 * KIB * 5,
        SIZE - 1,
    ] {
        for i in 0..4 {
            if at + i < SIZE {
                old[(at + i) as usize] ^= 0x5a;
            }
        }
    }
    let want = differing_blocks(&old, &bytes);
    assert_eq!(want, 8, "the changes fall in 8 distinct blocks");
    std::fs::write(&target, &old).unwrap();

    let stats = copy(view.clone(), &target, CopyMode::Differential).await.unwrap();
    assert_same(&std::fs::read(&target).unwrap(), &bytes, "differential copy");
    let blocks = SIZE.div_ceil(COMPARE_BLOCK);
    assert_eq!(stats.blocks_compared, blocks, "{stats:?}");
    assert_eq!(stats.blocks_written, want, "{stats:?}");
    assert!(stats.bytes_written <= want * COMPARE_BLOCK, "{stats:?}");

    let again = copy(view, &target, CopyMode::Differential).await.unwrap();
    assert_eq!((again.blocks_written, again.bytes_written), (0, 0), "{again:?}");
    assert_eq!(again.blocks_compared, blocks);
}

/// Failback onto a disk that grew: only the view's range is touched; onto a shorter file: the
/// file is extended and the new part compared against zeroes without reading it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_copy_onto_a_larger_and_a_shorter_file() {
    let (bytes, view) = view(4);
    let tmp = tempfile::tempdir().unwrap();
    let larger = tmp.path().join("larger.raw");
    let tail = pattern(3 * MIB as usize + 77, 8);
    let mut old = pattern(SIZE as usize, 9);
    old.extend_from_slice(&tail);
    std::fs::write(&larger, &old).unwrap();
    copy(view.clone(), &larger, CopyMode::Differential).await.unwrap();
    let got = std::fs::read(&larger).unwrap();
    assert_eq!(got.len(), old.len(), "the file keeps its length");
    assert_same(&got[..SIZE as usize], &bytes, "the view's range");
    assert_same(&got[SIZE as usize..], &tail, "past the view's range");

    let shorter = tmp.path().join("shorter.raw");
    std::fs::write(&shorter, &bytes[..5 * MIB as usize]).unwrap();
    let stats = copy(view, &shorter, CopyMode::Differential).await.unwrap();
    assert_same(&std::fs::read(&shorter).unwrap(), &bytes, "extended file");
    // The first 5 MiB were equal; past them every block with data differs from zeroes.
    let want = differing_blocks(&bytes, &{
        let mut v = bytes[..5 * MIB as usize].to_vec();
        v.resize(SIZE as usize, 0);
        v
    });
    assert_eq!(stats.blocks_written, want, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_that_are_neither_files_nor_block_devices_are_refused() {
    let (_, view) = view(5);
    let tmp = tempfile::tempdir().unwrap();
    let e = copy_view(view, tmp.path(), CopyMode::Full, |_, _| {})
        .await
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    assert!(
        e.to_string().contains("neither a regular file nor a block device"),
        "{e}"
    );
}

/// The whole cycle on real parts: fail over (full copy of the point), run on a test-failover
/// overlay of the point, fail back (differential copy of the overlay onto the failed-over disk).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_from_an_overlay_writes_only_what_changed() {
    let (bytes, point) = view(6);
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.raw");
    copy(point.clone(), &disk, CopyMode::Full).await.unwrap();

    let overlay = Overlay::open(&tmp.path().join("overlay"), point.clone() as Arc<dyn DiskView>).unwrap();
    let mut want = bytes.clone();
    for (at, len, seed) in [
        (3 * MIB + 5, 10_000, 1),
        (11 * MIB, 4096, 2),
        (20 * MIB + 65_000, 1000, 3),
    ] {
        let data = pattern(len, seed);
        want[at as usize..at as usize + len].copy_from_slice(&data);
        overlay.write_at(at, Bytes::from(data)).await.unwrap();
    }
    let stats = copy(overlay.clone(), &disk, CopyMode::Differential).await.unwrap();
    assert_same(&std::fs::read(&disk).unwrap(), &want, "disk after failback");
    assert_eq!(stats.blocks_written, differing_blocks(&bytes, &want), "{stats:?}");
    assert_same(&point.contents(), &bytes, "the point after failback");
}
