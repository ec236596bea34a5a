//! End-to-end replication: agent → process server → RocksDB journal → segments → blob storage
//! (a local folder, and a real Azurite server) → replay, byte for byte; with the server killed
//! mid-sync, and with the blob store down while the agent syncs.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use gateway::agent::{Agent, AgentConfig};
use gateway::protocol::IngestRecord;

const DISK_SIZE: u64 = 256 * MIB;

/// Acked writes by sequence number: `(offset, data)`.
type AckedWrites = BTreeMap<u64, (u64, Vec<u8>)>;

/// Two syncs with scattered changes between them; both points replay byte-identical. The second
/// sync passes `second_options` to the agent (`--no-compress` mixes writes the appliance
/// compresses into a log of writes the agent compressed).
async fn two_syncs_replay_exactly(blob: BlobTarget, dir: &std::path::Path, second_options: &[&str]) {
    let app = Appliance::start(&dir.join("appliance"), &blob, "");
    let disk = dir.join("disk.img");
    make_disk(&disk, DISK_SIZE, 1).unwrap();
    let first = app.sync("web01", &[&disk]);
    let snapshot1 = std::fs::read(&disk).unwrap();
    assert!(
        first.bytes_sent < DISK_SIZE,
        "zero blocks must not be sent ({} of {DISK_SIZE})",
        first.bytes_sent
    );
    assert!(
        first.bytes_sent > DISK_SIZE / 3,
        "the first sync sends the data ({})",
        first.bytes_sent
    );
    assert!(
        first.wire_bytes < first.bytes_sent * 3 / 4,
        "the agent compresses ({} of {} bytes on the wire)",
        first.wire_bytes,
        first.bytes_sent
    );
    let seq1 = first.disks[0].last_seq;

    scribble(&disk, 200, 2).unwrap();
    let second = app.sync_with("web01", &[&disk], second_options);
    let seq2 = second.disks[0].last_seq;
    assert!(seq2 > seq1);
    let uncompressed = second_options.contains(&"--no-compress");
    assert_eq!(
        second.wire_bytes > second.bytes_sent,
        uncompressed,
        "{second_options:?}: {} of {} bytes on the wire",
        second.wire_bytes,
        second.bytes_sent
    );
    assert!(
        second.bytes_sent < DISK_SIZE / 8,
        "a delta sync sends only changed blocks ({})",
        second.bytes_sent
    );
    assert!(
        second.disks[0].blocks_zeroed > 0,
        "zeroed regions travel as zero records"
    );

    // An app-consistent bookmark lands in the log right after the second sync.
    let out = app
        .agent("bookmark", "web01")
        .args(["--label", "nightly", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ack: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bookmark_seq = ack["seqs"]["disk0"].as_u64().unwrap();
    assert_eq!(bookmark_seq, seq2 + 1);

    let store = blob.store();
    wait_uploaded(store.as_ref(), "web01", "disk0", bookmark_seq, Duration::from_secs(120)).await;
    let kek = gateway::blob::open_keyring(store.as_ref(), PASSPHRASE)
        .await
        .unwrap()
        .unwrap();
    let outcome = gateway::replay::replay_disk(
        store.as_ref(),
        &kek,
        "web01",
        "disk0",
        DISK_SIZE,
        None,
        &dir.join("all.img"),
    )
    .await
    .unwrap();
    assert_eq!(outcome.last_seq, bookmark_seq);
    assert_eq!(outcome.bookmarks.len(), 1);
    assert_eq!(outcome.bookmarks[0].0, bookmark_seq);
    assert_eq!(outcome.bookmarks[0].2, "nightly");
    let at1 = replay(
        store.as_ref(),
        "web01",
        "disk0",
        DISK_SIZE,
        Some(seq1),
        &dir.join("replay1.img"),
    )
    .await;
    assert_same_image(&at1, &snapshot1, "replay at the first sync");
    let at2 = replay(
        store.as_ref(),
        "web01",
        "disk0",
        DISK_SIZE,
        Some(seq2),
        &dir.join("replay2.img"),
    )
    .await;
    assert_same_image(&at2, &std::fs::read(&disk).unwrap(), "replay at the second sync");

    // No key in clear anywhere in blob storage: every object is a segment, a wrapped key, the
    // keyring (salt + verifier) or a disk descriptor.
    use futures::TryStreamExt;
    let all: Vec<_> = store.list(None).try_collect().await.unwrap();
    for m in &all {
        let p = m.location.to_string();
        assert!(
            p == "keyring.json" || p.ends_with(".lbseg") || p.contains("/keys/") || p.ends_with("/disk.json"),
            "unexpected object {p}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn local_folder_two_syncs_replay_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let blob = BlobTarget::Local(dir.path().join("blob"));
    two_syncs_replay_exactly(blob, dir.path(), &["--no-compress"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn azurite_two_syncs_replay_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let azurite = Azurite::start(&dir.path().join("azurite"));
    let blob = azurite.create_container("lifeboat");
    two_syncs_replay_exactly(blob, dir.path(), &[]).await;
}

/// Kill -9 the server while batches stream in; every acked batch must reach blob storage after a
/// restart, and re-running the agent completes the replica.
#[tokio::test(flavor = "multi_thread")]
async fn kill9_mid_sync_loses_no_acked_write() {
    let dir = tempfile::tempdir().unwrap();
    let blob = BlobTarget::Local(dir.path().join("blob"));
    let mut app = Appliance::start(&dir.path().join("appliance"), &blob, "");
    let disk = dir.path().join("disk.img");
    make_disk(&disk, DISK_SIZE, 3).unwrap();

    // Register the disk through a normal sync of an empty-ish prefix, then stream batches by hand
    // so the test knows exactly which writes were acked.
    let agent = Agent::connect(AgentConfig {
        server: app.server_url(),
        ca_pem: Some(std::fs::read(&app.cert).unwrap()),
        passphrase: PASSPHRASE.into(),
        machine: "db01".into(),
        retry_for: Duration::from_millis(500),
        compress: true,
    })
    .await
    .unwrap();
    let first = app.sync("db01", &[&disk]);
    assert!(first.disks[0].last_seq > 0);
    let acked: Arc<Mutex<AckedWrites>> = Arc::default();
    let agent = Arc::new(agent);
    let mut tasks = Vec::new();
    for worker in 0..4u64 {
        let agent = agent.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..200u64 {
                let off = ((worker * 200 + i) * 256 * 1024) % (DISK_SIZE - 256 * 1024);
                let data: Vec<u8> = (0..256 * 1024).map(|b| (b as u64 ^ (worker * 7 + i)) as u8).collect();
                let rec = IngestRecord::write("disk0", off, Bytes::from(data.clone()));
                match agent.send_batch(&[rec]).await {
                    Ok(ack) => {
                        acked.lock().unwrap().insert(ack.seqs["disk0"], (off, data));
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    // Let some batches commit, then pull the plug.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 40 {
        assert!(std::time::Instant::now() < deadline, "no acks");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    app.kill9();
    for t in tasks {
        let _ = t.await;
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(!acked.is_empty());

    app.restart();
    let store = blob.store();
    let last_acked = *acked.keys().max().unwrap();
    wait_uploaded(store.as_ref(), "db01", "disk0", last_acked, Duration::from_secs(120)).await;
    let image = replay(
        store.as_ref(),
        "db01",
        "disk0",
        DISK_SIZE,
        Some(last_acked),
        &dir.path().join("after-crash.img"),
    )
    .await;
    // Each acked write is there, unless a later acked write covered the same range.
    let mut newest: BTreeMap<u64, u64> = BTreeMap::new();
    for (seq, (off, _)) in &acked {
        newest.insert(*off, *seq);
    }
    for (seq, (off, data)) in &acked {
        if newest[off] == *seq {
            assert!(
                &image[*off as usize..*off as usize + data.len()] == data.as_slice(),
                "acked write seq {seq} at {off} lost"
            );
        }
    }

    // Re-running the agent makes the replica equal to the source again.
    let again = app.sync("db01", &[&disk]);
    wait_uploaded(
        store.as_ref(),
        "db01",
        "disk0",
        again.disks[0].last_seq,
        Duration::from_secs(120),
    )
    .await;
    let image = replay(
        store.as_ref(),
        "db01",
        "disk0",
        DISK_SIZE,
        None,
        &dir.path().join("final.img"),
    )
    .await;
    assert_same_image(&image, &std::fs::read(&disk).unwrap(), "replay after crash and resync");
}

/// The blob store is down while the agent syncs: the cache fills, the agent is held back (not
/// failed), and once the store is back everything catches up.
#[tokio::test(flavor = "multi_thread")]
async fn blob_outage_holds_agent_back_then_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut azurite = Azurite::start(&dir.path().join("azurite"));
    let blob = azurite.create_container("outage");
    let app = Appliance::start(&dir.path().join("appliance"), &blob, "[cache]\nmax_bytes = \"64MiB\"\n");
    let disk = dir.path().join("disk.img");
    make_disk(&disk, DISK_SIZE, 4).unwrap();
    // Register the machine and its disk (and its key) while the store is up.
    let small = dir.path().join("small.img");
    let f = std::fs::File::create(&small).unwrap();
    f.set_len(DISK_SIZE).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 65536], 0).unwrap();
    let mut pre = app.agent("sync", "fs01");
    let out = pre
        .arg("--disk")
        .arg(format!("disk1={}", small.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    azurite.stop();
    let mut agent = app.agent("sync", "fs01");
    let child = agent
        .arg("--disk")
        .arg(format!("disk1={}", disk.display()))
        .arg("--json")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the cache is full and the agent is being held back.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let text = app.metrics_text();
        let used = metric_value(&text, "lifeboat_cache_used_bytes");
        let held = metric_value(&text, "lifeboat_ingest_rejected_total");
        let upload_errors = metric_value(&text, "lifeboat_upload_errors_total");
        if held > 0.0 && used > 32.0 * MIB as f64 && upload_errors > 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cache never filled (used {used}, held back {held})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Several seconds of outage with the agent held back, then the store comes back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    azurite.restart();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "agent failed during the outage: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: gateway::agent::SyncSummary = serde_json::from_slice(&out.stdout).unwrap();
    let store = blob.store();
    wait_uploaded(
        store.as_ref(),
        "fs01",
        "disk1",
        summary.disks[0].last_seq,
        Duration::from_secs(180),
    )
    .await;
    let image = replay(
        store.as_ref(),
        "fs01",
        "disk1",
        DISK_SIZE,
        None,
        &dir.path().join("after-outage.img"),
    )
    .await;
    assert_same_image(&image, &std::fs::read(&disk).unwrap(), "replay after the outage");
}

/// The appliance restarts while blob storage is down: it starts from its cached keyring, keeps
/// acking writes into the journal, and uploads them once the store is back.
#[tokio::test(flavor = "multi_thread")]
async fn restart_during_blob_outage_keeps_accepting_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut azurite = Azurite::start(&dir.path().join("azurite"));
    let blob = azurite.create_container("restart");
    let mut app = Appliance::start(&dir.path().join("appliance"), &blob, "");
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 32 * MIB, 5).unwrap();
    app.sync("app01", &[&disk]);

    azurite.stop();
    app.restart();
    scribble(&disk, 50, 6).unwrap();
    let summary = app.sync("app01", &[&disk]);
    assert!(summary.bytes_sent > 0);
    azurite.restart();
    let store = blob.store();
    wait_uploaded(
        store.as_ref(),
        "app01",
        "disk0",
        summary.disks[0].last_seq,
        Duration::from_secs(120),
    )
    .await;
    let image = replay(
        store.as_ref(),
        "app01",
        "disk0",
        32 * MIB,
        None,
        &dir.path().join("replay.img"),
    )
    .await;
    assert_same_image(
        &image,
        &std::fs::read(&disk).unwrap(),
        "replay after a restart during the outage",
    );
}
