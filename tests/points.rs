//! Recovery points end to end: crash-consistent points on the server's timer and app-consistent
//! bookmarks, listed by `lifeboat points list`, and every point read back over NBD by real
//! clients (`qemu-img`, `nbdcopy`, `nbdinfo`) byte for byte; holes reported as holes; the
//! catalogue rebuilt from blob storage alone on an empty data dir.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use lifeboat_fs::pit::PointInfo;

const DISK_SIZE: u64 = 256 << 20;

/// Waits for a readable crash-consistent point that covers everything acked so far.
fn wait_crash_point_after(app: &Appliance, machine: &str, disk: &str, acked: u64) -> PointInfo {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let points = app.points(machine);
        if let Some(p) = points
            .iter()
            .find(|p| p.kind == "crash-consistent" && p.readable && p.seqs[disk] > acked)
        {
            return p.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no crash-consistent point after seq {acked}: {points:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn wait_readable(app: &Appliance, machine: &str, id: u64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !app.points(machine).iter().any(|p| p.id == id && p.readable) {
        assert!(Instant::now() < deadline, "point {id} never became readable");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn snapshot(src: &Path, dst: &Path) {
    std::fs::copy(src, dst).unwrap();
}

/// Reads an export with qemu-img and with nbdcopy and checks both against `expected`.
fn assert_export_equals(app: &Appliance, export: &str, expected: &Path, scratch: &Path) {
    let want = std::fs::read(expected).unwrap();
    eprintln!("checking {export} against {}", expected.display());
    let a = scratch.join("qemu.raw");
    let _ = std::fs::remove_file(&a);
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &app.nbd_uri(export),
            a.to_str().unwrap(),
        ],
    );
    assert_same_image(
        &std::fs::read(&a).unwrap(),
        &want,
        &format!("qemu-img convert of {export}"),
    );
    let b = scratch.join("nbdcopy.raw");
    let _ = std::fs::remove_file(&b);
    tool("nbdcopy", &[&app.nbd_uri(export), b.to_str().unwrap()]);
    assert_same_image(&std::fs::read(&b).unwrap(), &want, &format!("nbdcopy of {export}"));
}

/// The image a point should show, rebuilt independently by replaying blob storage to its seq.
async fn replayed(app_blob: &BlobTarget, point: &PointInfo, disk: &str, size: u64, out: &Path) -> PathBuf {
    replay(app_blob.store().as_ref(), "m1", disk, size, Some(point.seqs[disk]), out).await;
    out.to_path_buf()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_point_reads_back_over_nbd_and_survives_an_index_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    eprintln!("test dir {}", dir.path().display());
    let blob = BlobTarget::Local(dir.path().join("blob"));
    let extra = "[policy]\ncrash_consistent_interval = \"2s\"\n";
    let mut app = Appliance::start(&dir.path().join("appliance"), &blob, extra);
    let src = dir.path().join("disk0.raw");
    gateway::testkit::make_disk(&src, DISK_SIZE, 7).unwrap();
    // A mostly-empty second disk: two written ranges in 64 MiB.
    let sparse = dir.path().join("disk1.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&sparse).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&vec![0xabu8; 1 << 20], 8 << 20).unwrap();
        f.write_all_at(&vec![0x5au8; 256 << 10], 40 << 20).unwrap();
    }

    // Sync 1, then a crash-consistent point covering it.
    let s1 = app.sync("m1", &[&src, &sparse]);
    let p1 = wait_crash_point_after(&app, "m1", "disk0", s1.disks[0].last_seq);
    let at1 = dir.path().join("at1.raw");
    snapshot(&src, &at1);

    // Sync 2, then an app-consistent bookmark.
    gateway::testkit::scribble(&src, 300, 11).unwrap();
    app.sync("m1", &[&src, &sparse]);
    let out = app
        .agent("bookmark", "m1")
        .args(["--label", "nightly", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ack: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p2_id = ack["point"].as_u64().expect("bookmark point id");
    let at2 = dir.path().join("at2.raw");
    snapshot(&src, &at2);

    // Sync 3, then another crash-consistent point.
    gateway::testkit::scribble(&src, 300, 12).unwrap();
    let s3 = app.sync("m1", &[&src, &sparse]);
    let p3 = wait_crash_point_after(&app, "m1", "disk0", s3.disks[0].last_seq);
    let at3 = dir.path().join("at3.raw");
    snapshot(&src, &at3);
    wait_readable(&app, "m1", p2_id);

    // The list: newest first, with kinds and labels.
    let points = app.points("m1");
    assert!(points.windows(2).all(|w| w[0].time_ms >= w[1].time_ms), "{points:?}");
    let p2 = points
        .iter()
        .find(|p| p.id == p2_id)
        .expect("bookmark point listed")
        .clone();
    assert_eq!(p2.kind, "app-consistent");
    assert_eq!(p2.label, "nightly");
    assert_eq!(points[0].id, p3.id, "the newest point comes first");
    assert!(points.iter().any(|p| p.id == p1.id));

    // Exports are listed.
    let list = tool("nbdinfo", &["--list", &format!("nbd://{}", app.nbd)]);
    let listing = String::from_utf8_lossy(&list.stdout);
    for name in [
        format!("m1/disk0@{}", p1.id),
        format!("m1/disk0@{p2_id}"),
        "m1/disk0@latest".into(),
        "m1/disk1@latest".into(),
    ] {
        assert!(listing.contains(&name), "nbdinfo --list lacks {name}: {listing}");
    }

    // Every point between syncs equals the source as it was; by id, by time and as latest.
    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    assert_export_equals(&app, &format!("m1/disk0@{}", p1.id), &at1, &scratch);
    assert_export_equals(&app, &format!("m1/disk0@{p2_id}"), &at2, &scratch);
    assert_export_equals(&app, &format!("m1/disk0@{}", p3.id), &at3, &scratch);
    // The same point again: every chunk comes from the chunk cache, none from blob storage.
    let fetches = app.metric("lifeboat_chunk_fetches_total");
    assert!(fetches > 0.0);
    assert_export_equals(&app, "m1/disk0@latest", &at3, &scratch);
    assert_eq!(
        app.metric("lifeboat_chunk_fetches_total"),
        fetches,
        "a cached chunk was fetched again"
    );
    assert!(app.metric("lifeboat_chunk_cache_hits_total") > 0.0);
    let just_after_p1 = lifeboat_fs::pit::format_time((p1.time_ms / 1000 + 1) * 1000);
    if points
        .iter()
        .all(|p| p.id == p1.id || p.time_ms > (p1.time_ms / 1000 + 1) * 1000)
    {
        assert_export_equals(&app, &format!("m1/disk0@{just_after_p1}"), &at1, &scratch);
    }
    // Every other point (cut while a sync ran) equals an independent replay to its sequence.
    for p in points
        .iter()
        .filter(|p| p.readable && ![p1.id, p2_id, p3.id].contains(&p.id))
    {
        let want = replayed(&blob, p, "disk0", DISK_SIZE, &scratch.join("replayed.raw")).await;
        assert_export_equals(&app, &format!("m1/disk0@{}", p.id), &want, &scratch);
    }

    // The mostly-empty disk: qemu-img map reports its holes, and it reads back exactly.
    let map = tool(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &app.nbd_uri("m1/disk1@latest")],
    );
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    let data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"].as_bool() == Some(true))
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(data, (1 << 20) + (256 << 10), "only the written ranges are data: {map}");
    assert_export_equals(&app, "m1/disk1@latest", &sparse, &scratch);

    // Unknown exports are refused with a clear error, and the server keeps serving.
    let bad = Command::new("nbdinfo")
        .arg(app.nbd_uri("m1/disk0@999999"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    tool("nbdinfo", &[&app.nbd_uri("m1/disk0@latest")]);

    // Disaster: the appliance is gone. A new one with an empty data dir, the same blob store
    // and passphrase rebuilds the catalogue, and every point reads back exactly.
    app.stop();
    drop(app);
    let fresh_dir = dir.path().join("fresh");
    let mut fresh = Appliance::start(&fresh_dir, &blob, extra);
    fresh.stop();
    std::fs::remove_dir_all(fresh_dir.join("data/journal")).unwrap();
    let summary = rebuild_index(&fresh);
    assert_eq!(summary["disks"], 2, "{summary}");
    assert_eq!(summary["points"].as_u64().unwrap() as usize, points.len(), "{summary}");
    fresh.restart();
    let rebuilt = fresh.points("m1");
    let ids = |v: &[PointInfo]| {
        v.iter()
            .map(|p| (p.id, p.kind.clone(), p.label.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&rebuilt), ids(&points));
    assert_export_equals(&fresh, &format!("m1/disk0@{}", p1.id), &at1, &scratch);
    assert_export_equals(&fresh, &format!("m1/disk0@{p2_id}"), &at2, &scratch);
    assert_export_equals(&fresh, "m1/disk0@latest", &at3, &scratch);
    assert_export_equals(&fresh, "m1/disk1@latest", &sparse, &scratch);

    // Replication resumes on the rebuilt appliance, and the new data reads back too.
    gateway::testkit::scribble(&src, 50, 13).unwrap();
    let s4 = fresh.sync("m1", &[&src, &sparse]);
    assert!(
        s4.bytes_sent < 32 << 20,
        "after the rebuild only changed blocks are sent, not {} bytes",
        s4.bytes_sent
    );
    let p4 = wait_crash_point_after(&fresh, "m1", "disk0", s4.disks[0].last_seq);
    assert!(p4.id > p3.id, "point ids keep increasing after a rebuild");
    assert_export_equals(&fresh, &format!("m1/disk0@{}", p4.id), &src, &scratch);
}

/// Retention with a tiny window: old points leave the list, the log segments only they needed
/// are rolled into the base image and deleted from blob storage, and the retained points still
/// read back exactly — over NBD, by `lifeboat replay`, and after an index rebuild.
#[tokio::test(flavor = "multi_thread")]
async fn retention_rolls_expired_points_into_the_base_image() {
    const SIZE: u64 = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let blob = BlobTarget::Local(dir.path().join("blob"));
    let extra = "[policy]\ncrash_consistent_interval = \"1s\"\nretention = \"20s\"\n";
    let mut app = Appliance::start(&dir.path().join("appliance"), &blob, extra);
    let src = dir.path().join("disk0.raw");
    gateway::testkit::make_disk(&src, SIZE, 21).unwrap();
    let s1 = app.sync("m1", &[&src]);
    let p1 = wait_crash_point_after(&app, "m1", "disk0", s1.disks[0].last_seq);
    std::thread::sleep(Duration::from_secs(8));
    gateway::testkit::scribble(&src, 200, 22).unwrap();
    let s2 = app.sync("m1", &[&src]);
    let p2 = wait_crash_point_after(&app, "m1", "disk0", s2.disks[0].last_seq);
    let at2 = dir.path().join("at2.raw");
    snapshot(&src, &at2);
    let segments_before = gateway::replay::list_segments(blob.store().as_ref(), "m1", "disk0")
        .await
        .unwrap();

    // p1 expires while p2 is still inside the window.
    let deadline = Instant::now() + Duration::from_secs(60);
    while app.points("m1").iter().any(|p| p.id == p1.id) {
        assert!(Instant::now() < deadline, "point {} never expired", p1.id);
        std::thread::sleep(Duration::from_millis(500));
    }
    let points = app.points("m1");
    assert!(
        points.iter().any(|p| p.id == p2.id),
        "p2 is inside retention: {points:?}"
    );
    assert!(points.iter().all(|p| p.time_ms >= p1.time_ms), "{points:?}");
    let nbd = app.nbd.clone();
    let bad = Command::new("nbdinfo")
        .arg(format!("nbd://{nbd}/m1/disk0@{}", p1.id))
        .output()
        .unwrap();
    assert!(!bad.status.success(), "an expired point is no longer exported");

    // The roll-up happened: the base image now holds p1's part of the log (everything before
    // the oldest retained point), and those log segments are gone.
    let store = blob.store();
    let deadline = Instant::now() + Duration::from_secs(30);
    // (The manifest switches before the rolled segments are deleted: wait for both.)
    let (base, segs) = loop {
        let m = gateway::blob::get_base_manifest(store.as_ref(), "m1", "disk0")
            .await
            .unwrap();
        let segs = gateway::replay::list_segments(store.as_ref(), "m1", "disk0")
            .await
            .unwrap();
        if let Some(m) = m.filter(|m| m.through_seq >= p1.seqs["disk0"]) {
            if segs.iter().all(|s| s.last_seq > m.through_seq) {
                break (m, segs);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the log before the oldest retained point was not rolled up and deleted"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(base.through_seq < p2.seqs["disk0"]);
    assert!(!base.parts.is_empty());
    let names = |v: &[gateway::replay::SegmentRef]| v.iter().map(|s| (s.first_seq, s.last_seq)).collect::<Vec<_>>();
    assert!(
        segs.len() < segments_before.len(),
        "segments before {:?}, after {:?}, base {base:?}, points {points:?}",
        names(&segments_before),
        names(&segs)
    );

    // Retained points read back exactly: over NBD, by replay from blob storage alone.
    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    assert_export_equals(&app, &format!("m1/disk0@{}", p2.id), &at2, &scratch);
    let replayed = replay(
        store.as_ref(),
        "m1",
        "disk0",
        SIZE,
        Some(p2.seqs["disk0"]),
        &scratch.join("r.raw"),
    )
    .await;
    assert_same_image(&replayed, &std::fs::read(&at2).unwrap(), "replay over the base image");

    // And a new appliance rebuilt from blob storage serves them too.
    app.stop();
    let fresh_dir = dir.path().join("fresh");
    let mut fresh = Appliance::start(&fresh_dir, &blob, "[policy]\nretention = \"72h\"\n");
    fresh.stop();
    std::fs::remove_dir_all(fresh_dir.join("data/journal")).unwrap();
    rebuild_index(&fresh);
    fresh.restart();
    assert!(fresh.points("m1").iter().any(|p| p.id == p2.id));
    assert_export_equals(&fresh, &format!("m1/disk0@{}", p2.id), &at2, &scratch);
}

/// The roll-up dies (abort, like kill -9) at each of its steps in turn; after a restart every
/// retained point reads back exactly, the roll-up completes, and what it left behind is swept.
#[tokio::test(flavor = "multi_thread")]
async fn retention_roll_up_survives_a_crash_at_every_step() {
    const SIZE: u64 = 16 << 20;
    for step in [
        "retention-after-parts",
        "retention-after-manifest",
        "retention-after-catalogue",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let blob = BlobTarget::Local(dir.path().join("blob"));
        let extra = "[policy]\ncrash_consistent_interval = \"1h\"\nretention = \"3s\"\n";
        let mut app = Appliance::start_with_env(
            &dir.path().join("appliance"),
            &blob,
            extra,
            &[("LIFEBOAT_FAILPOINT", step)],
        );
        let src = dir.path().join("disk0.raw");
        gateway::testkit::make_disk(&src, SIZE, 31).unwrap();
        let synced = app.sync("m1", &[&src]);
        wait_uploaded(
            blob.store().as_ref(),
            "m1",
            "disk0",
            synced.disks[0].last_seq,
            Duration::from_secs(60),
        )
        .await;
        // Two bookmarks 4 s apart with a 3 s retention: the first expires, which starts the
        // roll-up of the log before the second.
        let bookmark = |app: &Appliance| {
            let out = app.agent("bookmark", "m1").args(["--json"]).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let ack: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            ack["point"].as_u64().unwrap()
        };
        bookmark(&app);
        std::thread::sleep(Duration::from_secs(4));
        let point = bookmark(&app);
        let deadline = Instant::now() + Duration::from_secs(60);
        while app.is_running() {
            assert!(Instant::now() < deadline, "{step}: the failpoint was never reached");
            std::thread::sleep(Duration::from_millis(200));
        }
        app.env.clear();
        app.restart();
        let scratch = dir.path().join("scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        wait_readable(&app, "m1", point);
        assert_export_equals(&app, &format!("m1/disk0@{point}"), &src, &scratch);
        // The roll-up completes and sweeps: only the manifest's parts and later segments remain.
        let store = blob.store();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let base = gateway::blob::get_base_manifest(store.as_ref(), "m1", "disk0")
                .await
                .unwrap();
            let segs = gateway::replay::list_segments(store.as_ref(), "m1", "disk0")
                .await
                .unwrap();
            let parts: Vec<String> = futures::TryStreamExt::try_collect::<Vec<_>>(
                store.list(Some(&gateway::blob::layout::base_dir("m1", "disk0"))),
            )
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.location.to_string())
            .collect();
            if let Some(b) = &base {
                let mut listed = b.parts.clone();
                listed.sort();
                let mut found = parts.clone();
                found.sort();
                if segs.iter().all(|s| s.last_seq > b.through_seq) && listed == found && b.through_seq > 0 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{step}: roll-up not completed: base {base:?}, parts {parts:?}, segments {:?}",
                segs.iter().map(|s| (s.first_seq, s.last_seq)).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert_export_equals(&app, &format!("m1/disk0@{point}"), &src, &scratch);
        let replayed = replay(store.as_ref(), "m1", "disk0", SIZE, None, &scratch.join("r.raw")).await;
        assert_same_image(&replayed, &std::fs::read(&src).unwrap(), &format!("{step}: replay"));
    }
}

/// Policies through the CLI and the management API: checked (400 names the field), durable across
/// a restart, assigned per machine, and in force at once — a machine moved to a 1 s
/// crash-consistent policy gets its point without waiting for the default hour.
#[tokio::test(flavor = "multi_thread")]
async fn policies_are_checked_durable_and_applied_per_machine() {
    let dir = tempfile::tempdir().unwrap();
    let blob = BlobTarget::Local(dir.path().join("blob"));
    let mut app = Appliance::start(
        &dir.path().join("appliance"),
        &blob,
        "[policy]\ncrash_consistent_interval = \"1h\"\n",
    );
    let src = dir.path().join("disk0.raw");
    gateway::testkit::make_disk(&src, 8 << 20, 41).unwrap();
    let s = app.sync("m1", &[&src]);

    let bad = app.admin(&["policy", "set", "fast", "--retention", "73h"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("400") && err.contains("retention"), "{err}");
    let bad = app.admin(&["policy", "set", "fast", "--retention", "0s"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("retention"));
    let ok = app.admin(&["policy", "set", "fast", "--crash-consistent-interval", "1s", "--json"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let unknown = app.admin(&["policy", "assign", "--machine", "m1", "nosuch"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("404"));
    let assign = app.admin(&["policy", "assign", "--machine", "m1", "fast"]);
    assert!(assign.status.success(), "{}", String::from_utf8_lossy(&assign.stderr));

    // In force at once: a crash-consistent point within seconds, not an hour.
    let p = wait_crash_point_after(&app, "m1", "disk0", s.disks[0].last_seq);
    assert_eq!(p.kind, "crash-consistent");

    // Durable: after a restart the policy and the assignment are still there.
    app.restart();
    let out = app.admin(&["policy", "list", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fast = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "fast")
        .expect("policy fast survives a restart");
    assert_eq!(fast["crash_consistent_interval"], "1s");
    assert_eq!(fast["machines"], serde_json::json!(["m1"]));
    assert!(list.as_array().unwrap().iter().any(|p| p["name"] == "default"));
    let busy = app.admin(&["policy", "list"]);
    assert!(busy.status.success());
}
