//! The NBD server against real clients (qemu-img, nbdcopy, nbdinfo, the `nbd` crate) and against
//! a raw socket that sends what real clients never do. External tools are required: a missing
//! one fails the test, it is never skipped.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;
use std::time::Duration;

use common::raw::*;
use common::{image, run, uri_encoded, MemCatalog, MemView, TestServer};
use lifeboat_fs::nbd::NbdConfig;
use lifeboat_fs::view::DiskView;

const MIB: u64 = 1 << 20;
/// Not a multiple of 4 KiB: the last block is partial.
const SIZE: u64 = 8 * MIB + 1536;
const HOLES: &[(u64, u64)] = &[(MIB, 3 * MIB), (5 * MIB + 64 * 1024, 6 * MIB), (8 * MIB, SIZE)];
/// Allocated, but its bytes are zero: must be reported as data, not as a hole.
const ZERO_DATA: (u64, u64) = (7 * MIB, 7 * MIB + 65536);

const LATEST: &str = "m1/disk0@latest";
const POINT: &str = "m1/disk0@2026-11-22T10:05:00Z";
const OTHER: &str = "m2/disk1@2026-11-22T10:05:00Z";
const SCRATCH: &str = "m1/disk0@test-failover";

struct Fixture {
    server: TestServer,
    latest: Vec<u8>,
    point: Vec<u8>,
    scratch: Arc<MemView>,
}

fn disk(seed: u64) -> Vec<u8> {
    let mut data = image(SIZE as usize, seed, HOLES);
    data[ZERO_DATA.0 as usize..ZERO_DATA.1 as usize].fill(0);
    data
}

async fn fixture() -> Fixture {
    fixture_with(NbdConfig::default()).await
}

async fn fixture_with(config: NbdConfig) -> Fixture {
    let latest = disk(1);
    let point = disk(2);
    let scratch = Arc::new(MemView::writable(SIZE));
    let mut catalog = MemCatalog::default();
    catalog.add(
        LATEST,
        "m1 disk0, newest point",
        Arc::new(MemView::read_only(latest.clone(), HOLES)),
    );
    catalog.add(
        POINT,
        "m1 disk0, crash-consistent",
        Arc::new(MemView::read_only(point.clone(), HOLES)),
    );
    catalog.add(OTHER, "", Arc::new(MemView::read_only(disk(3), HOLES)));
    catalog.add(SCRATCH, "test failover overlay", scratch.clone());
    Fixture {
        server: TestServer::start_with(catalog, config).await,
        latest,
        point,
        scratch,
    }
}

fn in_holes(start: u64, end: u64) -> bool {
    HOLES.iter().any(|&(s, e)| s <= start && end <= e)
}

fn overlaps_holes(start: u64, end: u64) -> bool {
    HOLES.iter().any(|&(s, e)| start < e && s < end)
}

fn hole_bytes() -> u64 {
    HOLES.iter().map(|(s, e)| e - s).sum()
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_and_nbdcopy_copy_exports_byte_identical() {
    let f = fixture().await;
    let dir = tempfile::tempdir().unwrap();
    for (name, want) in [(LATEST, &f.latest), (POINT, &f.point)] {
        let q = dir.path().join("qemu.raw");
        let n = dir.path().join("nbdcopy.raw");
        let (q, n) = (q.to_str().unwrap(), n.to_str().unwrap());
        run(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "raw", &f.server.uri(name), q],
        )
        .await;
        run("nbdcopy", &[&f.server.uri(name), n]).await;
        let (qb, nb) = (std::fs::read(q).unwrap(), std::fs::read(n).unwrap());
        assert_same(&qb, want, &format!("qemu-img convert of {name}"));
        assert_same(&nb, want, &format!("nbdcopy of {name}"));
        std::fs::remove_file(q).unwrap();
        std::fs::remove_file(n).unwrap();
    }
    let s = f.server.stats.snapshot();
    assert!(s.requests > 0 && s.bytes_read > 0, "{s:?}");
    assert_eq!(s.errors, 0, "{s:?}");
    f.server.stop().await;
}

/// Export names carry `/`, `@` and `:`. Both clients take the URI path (minus its leading `/`)
/// as the name and percent-decode it, so the name may be written as is or fully encoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uri_forms_of_names_with_slash_at_and_colon() {
    let f = fixture().await;
    let addr = f.server.addr;
    let forms = [
        format!("nbd://{addr}/{POINT}"),
        format!("nbd://{addr}/{}", uri_encoded(POINT)),
        format!("nbd://{addr}/m1/disk0%402026-11-22T10%3A05%3A00Z"),
    ];
    for uri in &forms {
        let size = run("nbdinfo", &["--size", uri]).await;
        assert_eq!(size.trim(), SIZE.to_string(), "nbdinfo {uri}");
        let info = run("qemu-img", &["info", "--output=json", "-f", "raw", uri]).await;
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["virtual-size"].as_u64(), Some(SIZE), "qemu-img info {uri}");
    }
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_every_export_and_describes_one() {
    let f = fixture().await;
    let list = run("nbdinfo", &["--list", "--json", &format!("nbd://{}", f.server.addr)]).await;
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let exports = list["exports"].as_array().expect("exports");
    let names: BTreeSet<&str> = exports.iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    assert_eq!(names, BTreeSet::from([LATEST, POINT, OTHER, SCRATCH]));
    let latest = exports.iter().find(|e| e["export-name"] == LATEST).unwrap();
    assert_eq!(latest["description"], "m1 disk0, newest point");
    assert_eq!(latest["export-size"].as_u64(), Some(SIZE));
    assert_eq!(latest["is_read_only"], true);
    assert!(latest["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "base:allocation"));
    let scratch = exports.iter().find(|e| e["export-name"] == SCRATCH).unwrap();
    assert_eq!(scratch["is_read_only"], false);

    let one = run("nbdinfo", &["--json", &f.server.uri(POINT)]).await;
    let one: serde_json::Value = serde_json::from_str(&one).unwrap();
    let e = &one["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(SIZE));
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["can_df"], true);
    assert_eq!(e["block_size_minimum"].as_u64(), Some(1));
    assert_eq!(e["block_size_preferred"].as_u64(), Some(4096));
    assert_eq!(e["block_size_maximum"].as_u64(), Some(32 * MIB));
    assert_eq!(one["structured"], true);
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_map_reports_holes_as_unallocated_zeroes() {
    let f = fixture().await;
    let map = run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &f.server.uri(LATEST)],
    )
    .await;
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let mut pos = 0;
    let mut hole_total = 0;
    for entry in map.as_array().unwrap() {
        let start = entry["start"].as_u64().unwrap();
        let len = entry["length"].as_u64().unwrap();
        assert_eq!(start, pos, "map entries are contiguous");
        pos += len;
        if entry["data"] == false {
            assert_eq!(entry["zero"], true, "{entry}");
            assert!(in_holes(start, start + len), "{entry} reported as hole");
            hole_total += len;
        } else {
            assert!(!overlaps_holes(start, start + len), "{entry} covers a hole");
        }
    }
    assert_eq!(pos, SIZE);
    assert_eq!(hole_total, hole_bytes());
    f.server.stop().await;
}

/// nbdcopy asks for block status and reads only the data: holes never cross the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_skips_holes_and_uses_several_connections() {
    let f = fixture().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    // nbdcopy opens min(connections, threads) connections (threads default to the CPU count).
    let args = [
        "--connections=4",
        "--threads=4",
        &f.server.uri(LATEST),
        out.to_str().unwrap(),
    ];
    run("nbdcopy", &args).await;
    assert_same(&std::fs::read(&out).unwrap(), &f.latest, "nbdcopy");
    let s = f.server.stats.snapshot();
    assert!(s.connections_total >= 4, "multi-conn used: {s:?}");
    // nbdcopy reads whole 256 KiB requests that are partly data (one such here), skips the rest.
    assert!(
        s.bytes_read <= SIZE - hole_bytes() + 256 * 1024,
        "holes were read: {s:?}"
    );
    f.server.stop().await;
}

/// The `nbd` crate: an independent client that only knows NBD_OPT_EXPORT_NAME, expects the 124
/// zero bytes and simple replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_crate_client_reads_writes_and_is_refused_on_read_only() {
    let f = fixture().await;
    let addr = f.server.addr;
    let latest = f.latest.clone();
    let scratch = f.scratch.clone();
    tokio::task::spawn_blocking(move || {
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        let export = nbd::client::handshake(&mut tcp, LATEST.as_bytes()).unwrap();
        assert_eq!(export.size, SIZE);
        assert!(export.readonly);
        let mut client = nbd::client::NbdClient::new(&mut tcp, &export);
        let mut got = vec![0u8; SIZE as usize];
        for chunk in got.chunks_mut(MIB as usize) {
            client.read_exact(chunk).unwrap();
        }
        assert_same(&got, &latest, "nbd crate read");
        // A write to a read-only export: EPERM, and the connection goes on.
        client.seek(SeekFrom::Start(4096)).unwrap();
        let err = client.write(&[1u8; 4096]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        client.seek(SeekFrom::Start(4096)).unwrap();
        let mut block = [0u8; 4096];
        client.read_exact(&mut block).unwrap();
        assert_eq!(&block[..], &latest[4096..8192]);

        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        let export = nbd::client::handshake(&mut tcp, SCRATCH.as_bytes()).unwrap();
        assert!(!export.readonly);
        let mut client = nbd::client::NbdClient::new(&mut tcp, &export);
        client.seek(SeekFrom::Start(MIB)).unwrap();
        client.write_all(&latest[..2 * MIB as usize]).unwrap();
        client.flush().unwrap();
        client.seek(SeekFrom::Start(MIB)).unwrap();
        let mut back = vec![0u8; 2 * MIB as usize];
        client.read_exact(&mut back).unwrap();
        assert_same(&back, &latest[..2 * MIB as usize], "nbd crate write read back");
        assert_same(
            &scratch.contents()[MIB as usize..3 * MIB as usize],
            &latest[..2 * MIB as usize],
            "view after nbd crate write",
        );
        // An unknown export on NBD_OPT_EXPORT_NAME: the server can only close.
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        assert!(nbd::client::handshake(&mut tcp, b"m9/none@latest").is_err());
    })
    .await
    .unwrap();
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_the_connection_keeps_serving_simple_replies() {
    let f = fixture().await;
    let mut c = Raw::connect(f.server.addr).await;
    let (size, flags) = c.go(LATEST).await;
    assert_eq!(size, SIZE);
    assert_eq!(
        flags & (FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN),
        0b1_0000_0011
    );
    assert_eq!(flags & FLAG_SEND_DF, 0, "no DF without structured replies");

    assert_eq!(c.read(1, SIZE - 100, 4096).await, Err(EINVAL), "read past the end");
    assert_eq!(c.read(2, u64::MAX - 10, 4096).await, Err(EINVAL), "offset overflow");
    assert_eq!(
        c.read(3, 0, 4096).await.unwrap(),
        f.latest[..4096],
        "good read after errors"
    );
    assert_eq!(c.read(4, 0, 32 * MIB as u32 + 1).await, Err(EINVAL), "read over 32 MiB");

    c.request(0, 42, 5, 0, 0, &[]).await;
    assert_eq!(c.simple_reply().await, (EINVAL, 5), "unknown command");

    c.request(0, CMD_WRITE, 6, 0, 4096, &[7u8; 4096]).await;
    assert_eq!(c.simple_reply().await, (EPERM, 6), "write to a read-only export");
    c.request(0, CMD_WRITE_ZEROES, 7, 0, 4096, &[]).await;
    assert_eq!(c.simple_reply().await, (EPERM, 7), "write zeroes to a read-only export");
    c.request(0, CMD_TRIM, 8, 0, 4096, &[]).await;
    assert_eq!(c.simple_reply().await, (EPERM, 8), "trim on a read-only export");

    c.request(0, CMD_BLOCK_STATUS, 9, 0, 4096, &[]).await;
    assert_eq!(c.simple_reply().await, (EINVAL, 9), "block status without a context");
    c.request(FLAG_DF, CMD_READ, 10, 0, 4096, &[]).await;
    assert_eq!(c.simple_reply().await, (EINVAL, 10), "DF without structured replies");
    c.request(0x8000, CMD_READ, 11, 0, 4096, &[]).await;
    assert_eq!(c.simple_reply().await, (EINVAL, 11), "unknown command flag");

    c.request(0, CMD_FLUSH, 12, 0, 0, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 12));
    c.request(0, CMD_CACHE, 13, 0, 65536, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 13));
    c.request(0, CMD_CACHE, 14, SIZE, 1, &[]).await;
    assert_eq!(c.simple_reply().await, (EINVAL, 14));

    // A write payload over 32 MiB is drained, refused, and the stream stays in step.
    let big = vec![0u8; 32 * MIB as usize + 4096];
    c.request(0, CMD_WRITE, 15, 0, big.len() as u32, &big).await;
    assert_eq!(
        c.simple_reply().await,
        (EPERM, 15),
        "oversized write to a read-only export"
    );
    let tail = SIZE - 1000;
    assert_eq!(
        c.read(16, tail, 1000).await.unwrap(),
        f.latest[tail as usize..],
        "unaligned tail read"
    );
    assert_eq!(c.read(17, 0, 0).await.unwrap(), Vec::<u8>::new(), "empty read");

    c.request(0, CMD_DISC, 18, 0, 0, &[]).await;
    c.expect_closed().await;
    let s = f.server.stats.snapshot();
    assert_eq!(s.errors, 12, "{s:?}");
    assert_eq!(s.protocol_errors, 0, "{s:?}");
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_replies_send_holes_errors_df_and_block_status() {
    let f = fixture().await;
    let mut c = Raw::connect(f.server.addr).await;
    c.structured().await;
    let contexts = c
        .set_meta(LATEST, &["base:allocation", "qemu:dirty-bitmap:x", "base:"])
        .await;
    assert_eq!(contexts.len(), 1);
    assert_eq!(contexts[0].1, "base:allocation");
    let (_, flags) = c.go(LATEST).await;
    assert_ne!(flags & FLAG_SEND_DF, 0);

    // A read across data, a hole and data again.
    let (off, len) = (MIB - 8192, 2 * MIB as u32 + 16384);
    c.request(0, CMD_READ, 1, off, len, &[]).await;
    let chunks = c.chunks().await;
    assert!(chunks.iter().all(|ch| ch.handle == 1));
    let holes: Vec<_> = chunks.iter().filter(|ch| ch.ty == REPLY_OFFSET_HOLE).collect();
    assert_eq!(holes.len(), 1, "{chunks:?}");
    assert_eq!(holes[0].payload[8..12], (2 * MIB as u32).to_be_bytes());
    let got = assemble(&chunks, off, len).unwrap();
    assert_eq!(got, f.latest[off as usize..(off + len as u64) as usize]);

    // DF: one data chunk, zeroes explicit.
    c.request(FLAG_DF, CMD_READ, 2, off, len, &[]).await;
    let chunks = c.chunks().await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].ty, REPLY_OFFSET_DATA);
    assert_eq!(assemble(&chunks, off, len).unwrap(), got);

    // Errors as error chunks; the connection goes on.
    assert_eq!(c.sread(3, 0, SIZE, 1).await, Err(EINVAL));
    assert_eq!(c.sread(4, 0, 0, 33 * MIB as u32).await, Err(EINVAL));
    c.request(0, CMD_WRITE, 5, 0, 512, &[1u8; 512]).await;
    let chunk = c.chunk().await;
    assert_eq!((chunk.ty, chunk.handle), (REPLY_ERROR, 5));
    assert_eq!(chunk.payload[..4], EPERM.to_be_bytes());
    let msg_len = u16::from_be_bytes([chunk.payload[4], chunk.payload[5]]) as usize;
    assert!(String::from_utf8_lossy(&chunk.payload[6..6 + msg_len]).contains("read-only"));
    assert_eq!(c.sread(6, 0, 0, 4096).await.unwrap(), f.latest[..4096]);
    assert_eq!(c.sread(7, 0, 100, 0).await.unwrap(), Vec::<u8>::new());

    // Block status: holes are HOLE|ZERO, the allocated zero run is data.
    c.request(0, CMD_BLOCK_STATUS, 8, 0, SIZE as u32, &[]).await;
    let chunks = c.chunks().await;
    assert_eq!(chunks.len(), 1);
    let mut pos = 0u64;
    for (len, flags) in descriptors(&chunks[0]) {
        let end = pos + u64::from(len);
        if flags == 3 {
            assert!(in_holes(pos, end), "[{pos},{end}) reported as hole");
        } else {
            assert_eq!(flags, 0);
            assert!(!overlaps_holes(pos, end), "[{pos},{end}) reported as data");
        }
        pos = end;
    }
    assert_eq!(pos, SIZE);
    c.request(FLAG_REQ_ONE, CMD_BLOCK_STATUS, 9, MIB + 4096, 4 * MIB as u32, &[])
        .await;
    let d = descriptors(&c.chunk().await);
    assert_eq!(d, vec![(2 * MIB as u32 - 4096, 3)]);
    c.request(0, CMD_BLOCK_STATUS, 10, SIZE - 10, 20, &[]).await;
    assert_eq!(c.chunk().await.ty, REPLY_ERROR);
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_errors_do_not_end_negotiation() {
    let f = fixture().await;
    let mut c = Raw::connect(f.server.addr).await;
    let (infos, ty) = c.info_or_go(OPT_GO, "m9/nothing@latest", &[]).await;
    assert!(infos.is_empty());
    assert_eq!(ty, REP_ERR_UNKNOWN, "unknown export");
    c.send_opt(999, b"some data").await;
    assert_eq!(
        c.opt_reply().await,
        (999, REP_ERR_UNSUP, b"option not supported".to_vec())
    );
    c.send_opt(OPT_STARTTLS, &[]).await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_UNSUP, "STARTTLS refused (NOTLS)");
    c.send_opt(OPT_LIST, b"x").await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_INVALID);
    c.send_opt(OPT_SET_META_CONTEXT, &meta_request(LATEST, &["base:allocation"]))
        .await;
    assert_eq!(
        c.opt_reply().await.1,
        REP_ERR_INVALID,
        "meta context before structured replies"
    );
    c.send_opt(OPT_GO, &[0, 0, 0, 50, b'x']).await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_INVALID, "malformed GO");

    c.send_opt(OPT_LIST, &[]).await;
    let mut listed = BTreeSet::new();
    loop {
        let (_, ty, data) = c.opt_reply().await;
        if ty == REP_ACK {
            break;
        }
        assert_eq!(ty, REP_SERVER);
        let n = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        listed.insert(String::from_utf8(data[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(listed.len(), 4);

    c.structured().await;
    c.send_opt(OPT_LIST_META_CONTEXT, &meta_request(POINT, &[])).await;
    assert_eq!(c.meta_replies().await, vec![(0, "base:allocation".to_string())]);
    c.send_opt(OPT_SET_META_CONTEXT, &meta_request("m9/none", &["base:allocation"]))
        .await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_UNKNOWN);

    let (infos, ty) = c.info_or_go(OPT_INFO, POINT, &[INFO_NAME, INFO_DESCRIPTION]).await;
    assert_eq!(ty, REP_ACK);
    let kinds: BTreeSet<u16> = infos.iter().map(|i| u16::from_be_bytes([i[0], i[1]])).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE])
    );
    let desc = infos.iter().find(|i| i[..2] == INFO_DESCRIPTION.to_be_bytes()).unwrap();
    assert_eq!(&desc[2..], b"m1 disk0, crash-consistent");
    let bs = infos.iter().find(|i| i[..2] == INFO_BLOCK_SIZE.to_be_bytes()).unwrap();
    let u32_at = |at: usize| u32::from_be_bytes(bs[at..at + 4].try_into().unwrap());
    assert_eq!(
        (u32_at(2), u32_at(6), u32_at(10)),
        (1, 4096, 32 << 20),
        "min, preferred, max"
    );

    let (size, _) = c.go(POINT).await;
    assert_eq!(size, SIZE);
    assert_eq!(c.sread(1, 0, 4096, 4096).await.unwrap(), f.point[4096..8192]);
    // No SET_META_CONTEXT for this export: block status is refused.
    c.request(0, CMD_BLOCK_STATUS, 2, 0, 4096, &[]).await;
    assert_eq!(c.chunk().await.ty, REPLY_ERROR);

    // NBD_OPT_ABORT is acknowledged, then the server closes.
    let mut a = Raw::connect(f.server.addr).await;
    a.send_opt(OPT_ABORT, &[]).await;
    assert_eq!(a.opt_reply().await.1, REP_ACK);
    a.expect_closed().await;

    // NBD_OPT_EXPORT_NAME with NO_ZEROES negotiated: size and flags only, then transmission.
    // (The `nbd` crate test covers the 124 zero bytes sent to clients without NO_ZEROES.)
    let mut e = Raw::connect(f.server.addr).await;
    e.send_opt(OPT_EXPORT_NAME, OTHER.as_bytes()).await;
    let reply = e.read_bytes(8 + 2).await;
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), SIZE);
    assert_ne!(u16::from_be_bytes([reply[8], reply[9]]) & FLAG_READ_ONLY, 0);
    assert_eq!(e.read(3, 0, 16).await.unwrap().len(), 16);
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_only_its_connection() {
    let f = fixture().await;
    let mut good = Raw::connect(f.server.addr).await;
    good.go(LATEST).await;
    assert!(good.read(1, 0, 4096).await.is_ok());

    // Bad request magic in transmission.
    let mut bad = Raw::connect(f.server.addr).await;
    bad.go(LATEST).await;
    use tokio::io::AsyncWriteExt;
    bad.s.write_all(&[0xde; 28]).await.unwrap();
    bad.expect_closed().await;

    // Bad option magic in the handshake; unknown client flags.
    let mut bad = Raw::connect(f.server.addr).await;
    bad.s.write_all(&[0xab; 16]).await.unwrap();
    bad.expect_closed().await;
    let mut bad = tokio::net::TcpStream::connect(f.server.addr).await.unwrap();
    let mut hello = [0u8; 18];
    tokio::io::AsyncReadExt::read_exact(&mut bad, &mut hello).await.unwrap();
    bad.write_all(&0xffff_fff0u32.to_be_bytes()).await.unwrap();
    let mut rest = Raw { s: bad };
    rest.expect_closed().await;

    assert_eq!(good.read(2, 4096, 4096).await.unwrap(), f.latest[4096..8192]);
    let mut fresh = Raw::connect(f.server.addr).await;
    fresh.go(POINT).await;
    assert_eq!(fresh.read(1, 0, 4096).await.unwrap(), f.point[..4096]);
    let s = f.server.stats.snapshot();
    assert_eq!(s.protocol_errors, 3, "{s:?}");
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_vanishing_mid_read_leaves_nothing_behind() {
    let f = fixture().await;
    for structured in [false, true] {
        let mut c = Raw::connect(f.server.addr).await;
        if structured {
            c.structured().await;
        }
        c.go(LATEST).await;
        // 64 pipelined 8 MiB reads (512 MiB of replies), then read a little and vanish.
        for h in 0..64 {
            c.request(0, CMD_READ, h, 0, SIZE as u32 - 1536, &[]).await;
        }
        let _ = c.read_bytes(100_000).await;
        drop(c);
    }
    // A write whose payload never fully arrives, and a half-sent request header.
    let mut c = Raw::connect(f.server.addr).await;
    c.go(SCRATCH).await;
    c.request(0, CMD_WRITE, 1, 0, 1 << 20, &[5u8; 1000]).await;
    drop(c);
    let mut c = Raw::connect(f.server.addr).await;
    c.go(SCRATCH).await;
    use tokio::io::AsyncWriteExt;
    c.s.write_all(&[0x25, 0x60, 0x95]).await.unwrap();
    drop(c);

    let stats = f.server.stats.clone();
    wait_for("connections and in-flight requests to drain", || {
        let s = stats.snapshot();
        s.connections_active == 0 && s.requests_in_flight == 0
    })
    .await;
    let mut c = Raw::connect(f.server.addr).await;
    c.go(LATEST).await;
    assert_eq!(c.read(1, 0, 4096).await.unwrap(), f.latest[..4096]);
    assert_eq!(
        f.scratch.contents()[..1000],
        [0u8; 1000],
        "a partial write is never applied"
    );
    f.server.stop().await;
}

/// Requests are pipelined (replies may come out of order) and many clients are served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_with_pipelined_requests() {
    let f = fixture().await;
    let latest = Arc::new(f.latest.clone());
    let mut clients = Vec::new();
    for i in 0..8u64 {
        let addr = f.server.addr;
        let latest = latest.clone();
        clients.push(tokio::spawn(async move {
            let mut c = Raw::connect(addr).await;
            let structured = i % 2 == 0;
            if structured {
                c.structured().await;
            }
            c.go(LATEST).await;
            let mut x = i * 7919 + 1;
            let mut want = std::collections::HashMap::new();
            for h in 0..200u64 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let len = [512u32, 4096, 65536, 262144][(x >> 60) as usize % 4];
                let off = (x >> 20) % (SIZE - u64::from(len));
                c.request(0, CMD_READ, h, off, len, &[]).await;
                want.insert(h, (off, len));
            }
            let mut seen = 0;
            while !want.is_empty() {
                let (h, data) = if structured {
                    let first = c.chunk().await;
                    let h = first.handle;
                    let mut chunks = vec![first];
                    while chunks.last().unwrap().flags & REPLY_FLAG_DONE == 0 {
                        let next = c.chunk().await;
                        assert_eq!(next.handle, h, "chunks of one reply stay together here");
                        chunks.push(next);
                    }
                    let (off, len) = want[&h];
                    (h, assemble(&chunks, off, len).unwrap())
                } else {
                    let (err, h) = c.simple_reply().await;
                    assert_eq!(err, 0);
                    let (_, len) = want[&h];
                    (h, c.read_bytes(len as usize).await)
                };
                let (off, len) = want.remove(&h).expect("reply to a pending handle");
                assert_eq!(
                    data,
                    latest[off as usize..(off + u64::from(len)) as usize],
                    "handle {h}"
                );
                seen += 1;
            }
            assert_eq!(seen, 200);
        }));
    }
    for c in clients {
        tokio::time::timeout(Duration::from_secs(60), c).await.unwrap().unwrap();
    }
    let s = f.server.stats.snapshot();
    assert_eq!(s.connections_total, 8);
    assert_eq!(s.errors, 0);
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writable_view_takes_qemu_img_and_nbdcopy_writes() {
    let f = fixture().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let src_bytes = disk(9);
    std::fs::write(&src, &src_bytes).unwrap();
    let src = src.to_str().unwrap();
    let uri = f.server.uri(SCRATCH);

    run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src, &uri]).await;
    assert_same(&f.scratch.contents(), &src_bytes, "view after qemu-img convert");
    let back = dir.path().join("back.raw");
    run("nbdcopy", &[&uri, back.to_str().unwrap()]).await;
    assert_same(&std::fs::read(&back).unwrap(), &src_bytes, "nbdcopy read back");

    // nbdcopy the other way: a different image over the same export.
    let src2 = dir.path().join("src2.raw");
    let src2_bytes = disk(10);
    std::fs::write(&src2, &src2_bytes).unwrap();
    run("nbdcopy", &["--flush", src2.to_str().unwrap(), &uri]).await;
    assert_same(&f.scratch.contents(), &src2_bytes, "view after nbdcopy write");

    // Raw: past the end is ENOSPC, write zeroes and trim work, FUA is honoured.
    let mut c = Raw::connect(f.server.addr).await;
    let (_, flags) = c.go(SCRATCH).await;
    assert_eq!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(flags & FLAG_CAN_MULTI_CONN, 0);
    c.request(0, CMD_WRITE, 1, SIZE - 100, 200, &[1u8; 200]).await;
    assert_eq!(c.simple_reply().await, (ENOSPC, 1));
    c.request(FLAG_FUA, CMD_WRITE, 2, 100, 4, b"abcd").await;
    assert_eq!(c.simple_reply().await, (0, 2));
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 3 * MIB as u32 + 5, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 3));
    c.request(0, CMD_WRITE_ZEROES, 4, SIZE, 1, &[]).await;
    assert_eq!(c.simple_reply().await, (ENOSPC, 4));
    c.request(0, CMD_TRIM, 5, 0, 4096, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 5));
    let big = vec![0u8; 32 * MIB as usize + 1];
    c.request(0, CMD_WRITE, 6, 0, big.len() as u32, &big).await;
    assert_eq!(c.simple_reply().await, (EINVAL, 6), "write over 32 MiB");
    c.request(0, CMD_FLUSH, 7, 0, 0, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 7));
    let contents = f.scratch.contents();
    assert!(contents[..3 * MIB as usize + 5].iter().all(|b| *b == 0));
    assert_eq!(contents[3 * MIB as usize + 5..], src2_bytes[3 * MIB as usize + 5..]);
    assert!(f.server.stats.snapshot().bytes_written >= 2 * SIZE);
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_work_and_closes_connections() {
    let f = fixture_with(NbdConfig {
        shutdown_grace: Duration::from_secs(5),
        ..NbdConfig::default()
    })
    .await;
    let mut idle = Raw::connect(f.server.addr).await;
    idle.go(LATEST).await;
    let mut haggling = Raw::connect(f.server.addr).await;
    let addr = f.server.addr;
    let stats = f.server.stats.clone();
    tokio::time::timeout(Duration::from_secs(10), f.server.stop())
        .await
        .unwrap();
    idle.expect_closed().await;
    haggling.expect_closed().await;
    assert_eq!(stats.snapshot().connections_active, 0);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
}

/// The handshake must finish in time: a silent client is disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_dropped_after_the_handshake_timeout() {
    let f = fixture_with(NbdConfig {
        handshake_timeout: Duration::from_millis(300),
        ..NbdConfig::default()
    })
    .await;
    let mut c = Raw::connect(f.server.addr).await;
    c.expect_closed().await;
    let stats = f.server.stats.clone();
    wait_for("the connection gauge to drop", || {
        stats.snapshot().connections_active == 0
    })
    .await;
    f.server.stop().await;
}

#[test]
fn mem_view_reports_its_holes() {
    // The fixture itself: holes where the test says, so the tests above check what they claim.
    let view = MemView::read_only(disk(1), HOLES);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let extents = rt.block_on(view.extents(0, SIZE)).unwrap();
    let holes: Vec<_> = extents
        .iter()
        .filter(|e| !e.allocated)
        .map(|e| (e.offset, e.offset + e.len))
        .collect();
    assert_eq!(holes, HOLES);
}

/// `serve_stream` speaks the same protocol over any byte stream (here an in-memory pipe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stream_works_over_an_in_memory_pipe() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let data = disk(4);
    let mut catalog = MemCatalog::default();
    catalog.add(LATEST, "", Arc::new(MemView::read_only(data.clone(), HOLES)));
    let server = Arc::new(lifeboat_fs::nbd::NbdServer::new(Arc::new(catalog)));
    let stats = server.stats();
    let (mut client, server_end) = tokio::io::duplex(1 << 20);
    let served = tokio::spawn(server.serve_stream(server_end, "pipe"));

    let mut hello = [0u8; 18];
    client.read_exact(&mut hello).await.unwrap();
    client.write_all(&3u32.to_be_bytes()).await.unwrap();
    let mut go = Vec::new();
    go.extend_from_slice(&IHAVEOPT.to_be_bytes());
    go.extend_from_slice(&OPT_GO.to_be_bytes());
    go.extend_from_slice(&(4 + LATEST.len() as u32 + 2).to_be_bytes());
    go.extend_from_slice(&(LATEST.len() as u32).to_be_bytes());
    go.extend_from_slice(LATEST.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    client.write_all(&go).await.unwrap();
    loop {
        let mut h = [0u8; 20];
        client.read_exact(&mut h).await.unwrap();
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        client.read_exact(&mut d).await.unwrap();
        if ty == REP_ACK {
            break;
        }
        assert_eq!(ty, REP_INFO);
    }
    let mut req = Vec::new();
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&[0, 0, 0, 0]);
    req.extend_from_slice(&77u64.to_be_bytes());
    req.extend_from_slice(&8192u64.to_be_bytes());
    req.extend_from_slice(&4096u32.to_be_bytes());
    client.write_all(&req).await.unwrap();
    let mut reply = vec![0u8; 16 + 4096];
    client.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[4..16], [&[0u8; 4][..], &77u64.to_be_bytes()].concat());
    assert_eq!(reply[16..], data[8192..12288]);
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stats.snapshot().connections_active, 0);
}
