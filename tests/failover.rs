//! The config server's DR scenario end to end, with the appliance restarted between every step:
//! two machines in one replication group replicate; the group's app-consistent point is taken
//! on the policy's schedule (agents in --watch answer the request; one point id across both);
//! a test failover of a plan (machines step, script step, manual pause + resume) exposes
//! writable NBD exports at that group point whose writes never reach the protected data;
//! cleanup removes them; a failover to files gives byte-exact disks and stops replication;
//! failback onto a changed copy of the original disk writes exactly the differing blocks and
//! replication resumes without a full copy; a resync asked by hand survives a restart and the
//! next full sync clears it. Plus the API's refusals (400/404/409).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use common::*;
use lifeboat_fs::pit::PointInfo;

const DISK_SIZE: usize = 16 << 20;
const BLOCK: usize = 64 << 10;

/// A disk of random data with a zeroed stretch (a hole the failover keeps sparse).
fn make_disk(path: &Path, seed: u64) -> Vec<u8> {
    let mut data = pseudo_random(DISK_SIZE, seed);
    data[4 << 20..6 << 20].fill(0);
    std::fs::write(path, &data).unwrap();
    data
}

/// Overwrites 4 KiB in each of `blocks` (64 KiB block numbers).
fn change_blocks(path: &Path, blocks: &[usize], byte: u8) {
    let mut data = std::fs::read(path).unwrap();
    for b in blocks {
        data[b * BLOCK + 100..b * BLOCK + 4196].fill(byte);
    }
    std::fs::write(path, &data).unwrap();
}

fn differing_blocks(a: &[u8], b: &[u8]) -> usize {
    a.chunks(BLOCK).zip(b.chunks(BLOCK)).filter(|(x, y)| x != y).count()
}

fn ok(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: Output, what: &str) -> serde_json::Value {
    let out = ok(out, what);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Fails with the expected HTTP status in the message.
fn refused(out: Output, status: &str, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{what} should have failed");
    assert!(err.contains(status), "{what}: expected {status}, got {err}");
    err
}

fn watch_agent(app: &Appliance, machine: &str, disk: &Path) -> Child {
    app.agent("sync", machine)
        .arg("--disk")
        .arg(disk)
        .args(["--watch", "1", "--json"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// `lifeboat failback` of m1 (its failed-over copy) onto `disk`; the job as JSON.
fn failback_m1(app: &Appliance, disk: &Path, what: &str) -> serde_json::Value {
    let target = format!("m1/disk0={}", disk.display());
    json(
        app.admin(&["failback", "--machine", "m1", "--target", &target, "--json"]),
        what,
    )
}

fn machine_state(app: &Appliance, machine: &str) -> String {
    let list = json(app.admin(&["machines", "list", "--json"]), "machines list");
    list.as_array()
        .unwrap()
        .iter()
        .find(|m| m["machine"] == machine)
        .unwrap_or_else(|| panic!("{machine} not listed: {list}"))["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Reads an NBD export whole with nbdcopy.
fn read_export(app: &Appliance, export: &str, scratch: &Path) -> Vec<u8> {
    let out = scratch.join("export.raw");
    let _ = std::fs::remove_file(&out);
    tool("nbdcopy", &[&app.nbd_uri(export), out.to_str().unwrap()]);
    std::fs::read(&out).unwrap()
}

fn app_points(app: &Appliance, machine: &str) -> Vec<PointInfo> {
    app.points(machine)
        .into_iter()
        .filter(|p| p.kind == "app-consistent" && p.readable)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn group_points_test_failover_failover_and_failback_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let blob = BlobTarget::Local(work.join("blob"));
    let mut app = Appliance::start(
        &work.join("appliance"),
        &blob,
        "[policy]\ncrash_consistent_interval = \"1h\"\napp_consistent_interval = \"24h\"\n",
    );
    let (d1, d2) = (work.join("m1-disk0.img"), work.join("m2-disk0.img"));
    make_disk(&d1, 1);
    make_disk(&d2, 2);
    app.sync("m1", &[&d1]);
    app.sync("m2", &[&d2]);

    // A group whose policy takes an app-consistent point every 3 s and a crash point every 2 s.
    ok(
        app.admin(&[
            "policy",
            "set",
            "grp",
            "--crash-consistent-interval",
            "2s",
            "--app-consistent-interval",
            "3s",
        ]),
        "policy set",
    );
    let bad = app.admin(&["group", "set", "g", "--machine", "m1", "--policy", "nosuch"]);
    refused(bad, "400", "group with an unknown policy");
    ok(
        app.admin(&[
            "group",
            "set",
            "app",
            "--machine",
            "m1",
            "--machine",
            "m2",
            "--policy",
            "grp",
        ]),
        "group set",
    );
    refused(
        app.admin(&["group", "set", "other", "--machine", "m2"]),
        "409",
        "a machine in two groups",
    );
    app.restart();
    let groups = json(app.admin(&["group", "list", "--json"]), "group list");
    assert_eq!(groups[0]["name"], "app", "{groups}");
    assert_eq!(groups[0]["machines"], serde_json::json!(["m1", "m2"]));

    // Agents in watch mode answer the scheduled request; the group barrier gives one point id.
    let mut agents = [watch_agent(&app, "m1", &d1), watch_agent(&app, "m2", &d2)];
    let deadline = Instant::now() + Duration::from_secs(120);
    let shared = loop {
        let (a, b) = (app_points(&app, "m1"), app_points(&app, "m2"));
        let ids2: BTreeSet<u64> = b.iter().map(|p| p.id).collect();
        if let Some(p) = a.iter().find(|p| ids2.contains(&p.id) && p.label == "scheduled") {
            break p.clone();
        }
        assert!(Instant::now() < deadline, "no shared app-consistent point: {a:?} {b:?}");
        std::thread::sleep(Duration::from_millis(500));
    };
    // Crash-consistent group points share ids too.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let crash = |m| -> BTreeSet<u64> {
            app.points(m)
                .into_iter()
                .filter(|p| p.kind == "crash-consistent")
                .map(|p| p.id)
                .collect()
        };
        if crash("m1").intersection(&crash("m2")).next().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "no shared crash-consistent point");
        std::thread::sleep(Duration::from_millis(500));
    }
    for a in &mut agents {
        a.kill().unwrap();
        a.wait().unwrap();
    }
    // The disks did not change while the agents ran: the app point is their content.
    let (v1_m1, v1_m2) = (std::fs::read(&d1).unwrap(), std::fs::read(&d2).unwrap());
    eprintln!("shared app-consistent point {}", shared.id);

    // A plan: the group, a script that sees the plan's context, and a manual pause.
    let marker = work.join("script-ran");
    let plan = serde_json::json!({"steps": [
        {"type": "machines", "machines": ["m1", "m2"]},
        {"type": "script", "command": format!("echo \"$LIFEBOAT_JOB_KIND $LIFEBOAT_MACHINES\" > {}", marker.display())},
        {"type": "pause", "message": "check the test VMs"}
    ]});
    let plan_file = work.join("plan.json");
    std::fs::write(&plan_file, plan.to_string()).unwrap();
    let bad_plan = work.join("bad-plan.json");
    std::fs::write(&bad_plan, r#"{"steps": [{"type": "pause"}]}"#).unwrap();
    refused(
        app.admin(&["plan", "set", "bad", "--file", bad_plan.to_str().unwrap()]),
        "400",
        "a plan without machines",
    );
    ok(
        app.admin(&["plan", "set", "site", "--file", plan_file.to_str().unwrap()]),
        "plan set",
    );
    app.restart();

    // Test failover of the plan at the latest app-consistent point: pauses at the manual step.
    let job = json(
        app.admin(&[
            "failover",
            "--test",
            "--plan",
            "site",
            "--point",
            "latest-app",
            "--json",
        ]),
        "test failover",
    );
    assert_eq!(job["state"], "paused", "{job}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), "test-failover m1,m2");
    let id = job["id"].as_u64().unwrap().to_string();
    app.restart();
    let job = json(app.admin(&["jobs", "resume", &id, "--json"]), "jobs resume");
    assert_eq!(job["state"], "succeeded", "{job}");
    let results = job["results"].as_array().unwrap();
    let points: BTreeSet<u64> = results.iter().map(|r| r["point"].as_u64().unwrap()).collect();
    assert_eq!(
        points,
        BTreeSet::from([shared.id]),
        "both machines at the group point: {job}"
    );
    app.restart();

    // The writable exports survive the restart; writes stay in the overlay.
    let scratch = work.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    assert_same_image(
        &read_export(&app, "m1/disk0@test-failover", &scratch),
        &v1_m1,
        "m1 test failover export",
    );
    assert_same_image(
        &read_export(&app, "m2/disk0@test-failover", &scratch),
        &v1_m2,
        "m2 test failover export",
    );
    tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1000 70000",
            &app.nbd_uri("m1/disk0@test-failover"),
        ],
    );
    let mut expected = v1_m1.clone();
    expected[1000..71000].fill(0xab);
    app.restart();
    assert_same_image(
        &read_export(&app, "m1/disk0@test-failover", &scratch),
        &expected,
        "test failover export after a write and a restart",
    );
    assert_same_image(
        &read_export(&app, &format!("m1/disk0@{}", shared.id), &scratch),
        &v1_m1,
        "the protected point is untouched by test writes",
    );
    assert_eq!(machine_state(&app, "m1"), "test-failover");
    // Replication keeps running during a test failover.
    change_blocks(&d1, &[3, 40, 41, 200], 0x11);
    let s = app.sync("m1", &[&d1]);
    assert!(s.bytes_sent > 0);
    refused(
        app.admin(&["failover", "--test", "--machine", "m1"]),
        "409",
        "a second test failover",
    );

    // Cleanup removes the exports.
    let job = json(
        app.admin(&["failover", "--cleanup", "--plan", "site", "--json"]),
        "cleanup",
    );
    assert_eq!(job["state"], "paused", "the plan's pause applies to cleanup too: {job}");
    let id = job["id"].as_u64().unwrap().to_string();
    json(app.admin(&["jobs", "resume", &id, "--json"]), "resume cleanup");
    app.restart();
    let gone = Command::new("nbdinfo")
        .arg(app.nbd_uri("m1/disk0@test-failover"))
        .output()
        .expect("nbdinfo is required (bash .ci/setup installs it)");
    assert!(!gone.status.success(), "the test export is gone after cleanup");
    assert!(
        !work.join("appliance/data/test-failover/m1/disk0").exists() || {
            std::fs::read_dir(work.join("appliance/data/test-failover/m1/disk0"))
                .map(|mut d| d.next().is_none())
                .unwrap_or(true)
        }
    );
    assert_eq!(machine_state(&app, "m1"), "protected");

    // Refusals: unknown machine 404, unknown plan 404.
    refused(
        app.admin(&["failover", "--machine", "nosuch", "--target-dir", "/tmp/x"]),
        "404",
        "unknown machine",
    );
    refused(
        app.admin(&["failover", "--plan", "nosuch", "--target-dir", "/tmp/x"]),
        "404",
        "unknown plan",
    );

    // Failover of both machines to files at the group point: byte-exact, replication stopped.
    let fo = work.join("failover");
    let job = json(
        app.admin(&[
            "failover",
            "--machine",
            "m1",
            "--machine",
            "m2",
            "--point",
            &shared.id.to_string(),
            "--target-dir",
            fo.to_str().unwrap(),
            "--json",
        ]),
        "failover",
    );
    assert_eq!(job["state"], "succeeded", "{job}");
    let (f1, f2) = (fo.join("m1/disk0.img"), fo.join("m2/disk0.img"));
    assert_same_image(&std::fs::read(&f1).unwrap(), &v1_m1, "m1 failed over");
    assert_same_image(&std::fs::read(&f2).unwrap(), &v1_m2, "m2 failed over");
    app.restart();
    assert_eq!(machine_state(&app, "m1"), "failed-over");
    let out = app.agent("sync", "m1").arg("--disk").arg(&d1).output().unwrap();
    refused(out, "409", "replication of a failed-over machine");
    // Two failovers of one machine: the second is refused.
    refused(
        app.admin(&["failover", "--machine", "m1", "--target-dir", fo.to_str().unwrap()]),
        "409",
        "a second failover",
    );
    json(
        app.admin(&["failover", "--commit", "--machine", "m1", "--machine", "m2", "--json"]),
        "commit",
    );
    app.restart();

    // In the "cloud", the failed-over m1 ran on and wrote to its disk.
    change_blocks(&f1, &[7, 100], 0x77);
    let cloud_m1 = std::fs::read(&f1).unwrap();
    // Failback onto the on-premises disk, which changed too since the point.
    change_blocks(&d1, &[5, 150], 0x22);
    let onprem = std::fs::read(&d1).unwrap();
    let expect_written = differing_blocks(&onprem, &cloud_m1);
    assert!(expect_written >= 6, "{expect_written}");
    let job = failback_m1(&app, &d1, "failback");
    assert_eq!(job["state"], "succeeded", "{job}");
    let r = &job["results"][0];
    assert_eq!(r["blocks_written"].as_u64().unwrap() as usize, expect_written, "{job}");
    assert_eq!(r["blocks_compared"].as_u64().unwrap() as usize, DISK_SIZE / BLOCK);
    assert_same_image(&std::fs::read(&d1).unwrap(), &cloud_m1, "m1 after failback");
    app.restart();

    // Re-protected: replication resumes without a full copy.
    assert_ne!(machine_state(&app, "m1"), "failed-over");
    let s = app.sync("m1", &[&d1]);
    assert!(
        s.bytes_sent > 0 && s.bytes_sent < (DISK_SIZE / 4) as u64,
        "only the differing blocks are sent: {s:?}"
    );
    // Resynchronisation by hand: marked, kept across a restart, cleared by the next full sync.
    ok(app.admin(&["machines", "resync", "m1"]), "machines resync");
    app.restart();
    assert_eq!(machine_state(&app, "m1"), "resync-required");
    let s = app.sync("m1", &[&d1]);
    assert_eq!(s.bytes_sent, 0, "nothing differs: {s:?}");
    assert_eq!(machine_state(&app, "m1"), "protected");
    refused(
        app.admin(&["machines", "resync", "nosuch"]),
        "404",
        "resync of an unknown machine",
    );

    let events = json(app.admin(&["events", "--json"]), "events");
    let kinds: BTreeSet<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for k in [
        "job-paused",
        "failed-over",
        "failed-back",
        "job-succeeded",
        "resync-required",
        "resynchronised",
    ] {
        assert!(kinds.contains(k), "event {k} missing: {kinds:?}");
    }
    let metrics = app.metrics_text();
    assert!(
        metrics.contains("lifeboat_jobs{kind=\"failback\",state=\"succeeded\"} 1"),
        "{metrics}"
    );
}

/// Waits until blob storage holds `machine`'s disk0 through `seq`, then replays it from there.
async fn replay_uploaded(store: &dyn object_store::ObjectStore, machine: &str, seq: u64, out: &Path) -> Vec<u8> {
    wait_uploaded(store, machine, "disk0", seq, Duration::from_secs(60)).await;
    replay(store, machine, "disk0", DISK_SIZE as u64, None, out).await
}

fn process_servers(app: &Appliance) -> serde_json::Value {
    json(
        app.admin(&["process-servers", "list", "--json"]),
        "process-servers list",
    )
}

fn process_server<'a>(list: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    list.as_array()?.iter().find(|p| p["name"] == name)
}

/// Waits until the config server's view of process server `name` satisfies `pred`.
fn wait_process_server(app: &Appliance, name: &str, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = process_servers(app);
        if process_server(&list, name).is_some_and(&pred) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process server {name}: {what}; list: {list:#}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Polls `f` (every 250 ms, for up to `limit`) until it gives a value.
fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The config server's newest readable point of `machine` covering disk0 through `seq` (none
/// while the machine is unknown there).
fn point_through(app: &Appliance, machine: &str, seq: u64) -> Option<PointInfo> {
    let out = app.admin(&["points", "list", "--json", "--machine", machine]);
    let points: Vec<PointInfo> = serde_json::from_slice(&out.stdout).ok()?;
    points
        .into_iter()
        .find(|p| p.readable && p.seqs.get("disk0").is_some_and(|s| *s >= seq))
}

/// Scale-out: a process-server-only appliance registers with the config server (passphrase,
/// then its own token) and sends heartbeats; a machine assigned to it has its agent redirected
/// there by the config server's process server; its data reaches the shared blob storage
/// through the scale-out process server; the config server follows that log live (the machine
/// and its points are listed there, and it fails over byte-exact from there, also after the
/// process server's own retention rolled the log into a base image), and the failover stops
/// its replication at the process server too until failback; registration and assignment
/// survive a config server restart; a stopped process server shows up as unreachable.
#[tokio::test(flavor = "multi_thread")]
async fn scale_out_process_server_takes_the_machines_assigned_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let blob = BlobTarget::Local(work.join("blob"));
    let mut cs = Appliance::start(&work.join("config-server"), &blob, "");
    // Process servers know the config server by address: keep its management port on restarts.
    let text = std::fs::read_to_string(&cs.config).unwrap();
    std::fs::write(
        &cs.config,
        text.replace(
            "management = \"127.0.0.1:0\"",
            &format!("management = \"{}\"", cs.management),
        ),
    )
    .unwrap();
    // ps2 cuts a crash point every second and keeps points for 12 s: its retention rolls the
    // log into a base image within the test.
    let ps2_toml = format!(
        "roles = [\"process\"]\n[config_server]\nurl = \"https://{}\"\nca = \"{}\"\nname = \"ps2\"\nheartbeat_interval = \"500ms\"\n[policy]\ncrash_consistent_interval = \"1s\"\nretention = \"12s\"\n",
        cs.management,
        cs.cert.display()
    );
    let mut ps2 = Appliance::start(&work.join("ps2"), &blob, &ps2_toml);
    wait_process_server(&cs, "ps2", "registered and reachable", |p| p["state"] == "ok");
    let list = process_servers(&cs);
    let local = process_server(&list, "local").expect("the local process server is listed");
    assert_eq!(local["local"], true);
    assert_eq!(
        process_server(&list, "ps2").unwrap()["address"].as_str(),
        Some(ps2.replication.as_str())
    );

    // Unknown process server or wrong credentials: refused with the reason.
    refused(
        cs.admin(&["process-servers", "assign", "m2", "nope"]),
        "404",
        "assign to an unknown process server",
    );
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&cs.cert).unwrap()).unwrap())
        .build()
        .unwrap();
    let base = format!("https://{}", cs.management);
    let wrong = http
        .post(format!("{base}/api/process-servers/register"))
        .json(
            &serde_json::json!({"name": "ps3", "address": "127.0.0.1:1", "passphrase": "wrong",
            "certificate_pem": "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401, "registration with a wrong passphrase");
    let forged = http
        .put(format!("{base}/api/process-servers/ps2/heartbeat"))
        .bearer_auth("0".repeat(64))
        .json(&serde_json::json!({"cache_used_bytes": 0, "cache_limit_bytes": 0, "machines": ["evil"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401, "heartbeat with a forged token");

    // m1 stays on the config server's process server; m2 goes to ps2.
    ok(cs.admin(&["process-servers", "assign", "m2", "ps2"]), "assign m2");
    let (d1, d2) = (work.join("m1-disk0.img"), work.join("m2-disk0.img"));
    make_disk(&d1, 11);
    let disk2 = make_disk(&d2, 12);
    cs.sync("m1", &[&d1]);
    // The agent is given the config server's process server; it is sent on to ps2.
    let s2 = cs.sync("m2", &[&d2]);
    wait_process_server(&cs, "ps2", "reports m2", |p| {
        p["machines"] == serde_json::json!(["m2"]) && p["assigned"] == serde_json::json!(["m2"])
    });
    let list = process_servers(&cs);
    assert_eq!(
        process_server(&list, "local").unwrap()["machines"],
        serde_json::json!(["m1"]),
        "m2 never reached the config server's own cache"
    );
    let agents = json(cs.admin(&["agents", "--json"]), "agents");
    let agent_machines: Vec<&str> = agents
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["machine"].as_str())
        .collect();
    assert_eq!(agent_machines, ["m1"], "m2's agent registered at ps2, not here");
    // ps2 wrote m2's log to the shared blob storage: it replays byte for byte.
    let store = blob.store();
    let replayed = replay_uploaded(
        store.as_ref(),
        "m2",
        s2.disks[0].last_seq,
        &work.join("m2-replayed.img"),
    )
    .await;
    assert_same_image(&replayed, &disk2, "m2 replicated through ps2");

    // The config server follows m2's log into its own catalogue, live: m2 is listed (on ps2)
    // with its points, without `index rebuild`.
    let first = wait_for(
        "the config server to follow m2's first point",
        Duration::from_secs(30),
        || point_through(&cs, "m2", s2.disks[0].last_seq),
    );
    let listed = json(cs.admin(&["machines", "list", "--json"]), "machines list");
    let m2 = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["machine"] == "m2")
        .unwrap_or_else(|| panic!("m2 not listed: {listed:#}"));
    assert_eq!(m2["process_server"], "ps2", "{m2}");
    assert_eq!(m2["state"], "protected", "{m2}");
    // Its points are cut where it replicates: asking here for a bookmark is refused.
    let err = refused(
        cs.admin(&["machines", "bookmark", "m2"]),
        "409",
        "bookmark of a followed machine",
    );
    assert!(err.contains("ps2"), "{err}");
    let metrics = cs.metrics_text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("lifeboat_recovery_points{machine=\"m2\"} ") && !l.ends_with(" 0")),
        "the config server counts m2's points: {metrics}"
    );
    // Retention runs on ps2 for its own disks: once m2's first points are past 12 s, its log is
    // rolled into a base image there; the config server follows the switch (the expired points
    // go from its list too).
    change_blocks(&d2, &[1, 30, 31, 90], 0x3c);
    let s2b = cs.sync("m2", &[&d2]);
    let disk2b = std::fs::read(&d2).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let base = loop {
        if let Some(b) = gateway::blob::get_base_manifest(store.as_ref(), "m2", "disk0")
            .await
            .unwrap()
        {
            break b;
        }
        assert!(Instant::now() < deadline, "ps2 never rolled m2's log into a base image");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(base.through_seq >= first.seqs["disk0"], "{base:?}");
    let latest = wait_for(
        "the config server to follow ps2's base switch",
        Duration::from_secs(30),
        || {
            let points = cs.points("m2");
            let latest = points
                .iter()
                .find(|p| p.readable && p.seqs["disk0"] >= s2b.disks[0].last_seq)?;
            (!points.iter().any(|p| p.id == first.id)).then(|| latest.clone())
        },
    );
    // Failover of m2 from the config server: the point, byte-exact.
    let fo = work.join("failover");
    let job = json(
        cs.admin(&[
            "failover",
            "--machine",
            "m2",
            "--point",
            &latest.id.to_string(),
            "--target-dir",
            fo.to_str().unwrap(),
            "--json",
        ]),
        "failover of m2",
    );
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_same_image(
        &std::fs::read(fo.join("m2/disk0.img")).unwrap(),
        &disk2b,
        "m2 failed over from the followed catalogue",
    );
    assert_eq!(machine_state(&cs, "m2"), "failed-over");
    // ps2 learns it in its next heartbeat: m2's agent is refused there as it would be here.
    let refusal = wait_for("ps2 to stop m2's replication", Duration::from_secs(15), || {
        let out = cs.agent("sync", "m2").arg("--disk").arg(&d2).output().unwrap();
        (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).to_string())
    });
    assert!(
        refusal.contains("409") && refusal.contains("replication of \"m2\" is stopped"),
        "{refusal}"
    );
    // Failback re-protects: nothing differs, and ps2 takes m2's writes again.
    let target = format!("m2/disk0={}", d2.display());
    let job = json(
        cs.admin(&["failback", "--machine", "m2", "--target", &target, "--json"]),
        "failback of m2",
    );
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["results"][0]["blocks_written"], 0, "{job}");
    wait_for("ps2 to resume m2's replication", Duration::from_secs(15), || {
        let out = cs.agent("sync", "m2").arg("--disk").arg(&d2).output().unwrap();
        out.status.success().then_some(())
    });
    assert_ne!(machine_state(&cs, "m2"), "failed-over");

    // The registry and the assignment are durable on the config server.
    cs.restart();
    let list = process_servers(&cs);
    assert_eq!(
        process_server(&list, "ps2").map(|p| p["assigned"].clone()),
        Some(serde_json::json!(["m2"]))
    );
    // ps2 keeps its token across the config server's restart and goes on reporting.
    let seen = process_server(&list, "ps2").unwrap()["last_seen_ms"].as_u64().unwrap();
    wait_process_server(&cs, "ps2", "heartbeats after the config server restarted", |p| {
        p["last_seen_ms"].as_u64().unwrap() > seen && p["state"] == "ok"
    });

    // A stopped process server is reported unreachable; started again, it is back.
    ps2.stop();
    wait_process_server(&cs, "ps2", "unreachable once stopped", |p| p["state"] == "unreachable");
    ps2.restart();
    wait_process_server(&cs, "ps2", "reachable again", |p| p["state"] == "ok");
    // Back to the config server's own process server. Its cache never saw m2, but blob storage
    // holds m2's log through ps2: issuing sequence numbers from 1 again would overwrite it, so
    // the disk is refused with the way out, and m2 is marked resync-required.
    ok(
        cs.admin(&["process-servers", "assign", "m2", "local"]),
        "assign m2 back",
    );
    let out = cs.agent("sync", "m2").arg("--disk").arg(&d2).output().unwrap();
    let err = refused(out, "409", "sync of a moved machine before its log is adopted");
    assert!(err.contains("index rebuild"), "{err}");
    let events = json(cs.admin(&["events", "--machine", "m2", "--json"]), "events");
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "resync-required"),
        "{events:#}"
    );
    // Adopt the log (stopped appliance), then the sync compares against what ps2 replicated:
    // nothing to send, and the resync is done.
    cs.stop();
    rebuild_index(&cs);
    cs.restart();
    let again = cs.sync("m2", &[&d2]);
    assert_eq!(again.bytes_sent, 0, "the adopted log already holds m2's disk");
    assert_ne!(
        machine_state(&cs, "m2"),
        "resync-required",
        "the full compare cleared the flag"
    );
    let list = process_servers(&cs);
    assert_eq!(
        process_server(&list, "local").unwrap()["machines"],
        serde_json::json!(["m1", "m2"])
    );
}

/// A gap in the sequence: the appliance's data folder is restored from an older copy while blob
/// storage holds later writes. The agent's next sync is refused (409, naming `index rebuild`)
/// instead of issuing sequence numbers twice, the machine becomes resync-required with an
/// event; after `index rebuild` adopts the log from blob storage, the sync compares every block
/// against what blob storage holds (nothing to send), the flag clears, and later writes go on
/// from there: blob storage replays byte-exact at every step.
#[tokio::test(flavor = "multi_thread")]
async fn a_sequence_gap_is_detected_and_resynchronised_without_losing_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let blob = BlobTarget::Local(work.join("blob"));
    let mut app = Appliance::start(&work.join("appliance"), &blob, "");
    let disk = work.join("m1-disk0.img");
    make_disk(&disk, 21);
    let s1 = app.sync("m1", &[&disk]);
    let store = blob.store();
    wait_uploaded(
        store.as_ref(),
        "m1",
        "disk0",
        s1.disks[0].last_seq,
        Duration::from_secs(60),
    )
    .await;
    // An older copy of the appliance's data (e.g. a VM snapshot), taken while it was stopped.
    app.stop();
    let data = work.join("appliance/data");
    let older = work.join("data-older");
    ok(
        Command::new("cp").arg("-a").arg(&data).arg(&older).output().unwrap(),
        "copy the data folder",
    );
    app.restart();
    change_blocks(&disk, &[3, 40, 41, 200], 0x5a);
    let s2 = app.sync("m1", &[&disk]);
    assert!(s2.disks[0].last_seq > s1.disks[0].last_seq);
    wait_uploaded(
        store.as_ref(),
        "m1",
        "disk0",
        s2.disks[0].last_seq,
        Duration::from_secs(60),
    )
    .await;
    let v2 = std::fs::read(&disk).unwrap();

    // The appliance comes back from the older copy: blob storage is ahead of its cache.
    app.stop();
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::rename(&older, &data).unwrap();
    app.restart();
    let out = app.agent("sync", "m1").arg("--disk").arg(&disk).output().unwrap();
    let err = refused(out, "409", "sync into a cache that is behind blob storage");
    assert!(err.contains("sequence gap") && err.contains("index rebuild"), "{err}");
    assert_eq!(machine_state(&app, "m1"), "resync-required");
    let replayed = replay(
        store.as_ref(),
        "m1",
        "disk0",
        DISK_SIZE as u64,
        None,
        &work.join("r1.img"),
    )
    .await;
    assert_same_image(&replayed, &v2, "blob storage after the refused sync");

    // Adopt the log; the resync finds nothing to send; later writes continue the log.
    app.stop();
    rebuild_index(&app);
    app.restart();
    let s3 = app.sync("m1", &[&disk]);
    assert_eq!(s3.bytes_sent, 0, "the adopted log already holds the disk");
    assert_ne!(machine_state(&app, "m1"), "resync-required");
    change_blocks(&disk, &[7, 100], 0xa5);
    let s4 = app.sync("m1", &[&disk]);
    assert!(
        s4.disks[0].last_seq > s2.disks[0].last_seq,
        "sequence numbers go on after the adopted log"
    );
    let replayed = replay_uploaded(store.as_ref(), "m1", s4.disks[0].last_seq, &work.join("r2.img")).await;
    assert_same_image(
        &replayed,
        &std::fs::read(&disk).unwrap(),
        "blob storage after the resync",
    );
}

/// Failover to the cloud: the point written as a fixed VHD in the appliance's blob storage,
/// which qemu-img reads as a VHD of the disk's size holding exactly the point's bytes; the
/// "cloud VM" then writes to it, and failback from that image onto the changed on-premises disk
/// writes only the differing blocks. Bad prefixes and formats are refused with the field named.
#[tokio::test(flavor = "multi_thread")]
async fn failover_to_a_vhd_in_blob_storage_and_failback_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let blob_dir = work.join("blob");
    let blob = BlobTarget::Local(blob_dir.clone());
    let mut app = Appliance::start(&work.join("appliance"), &blob, "");
    let disk = work.join("m1-disk0.img");
    let at_point = make_disk(&disk, 31);
    app.sync("m1", &[&disk]);
    ok(
        app.agent("bookmark", "m1")
            .args(["--label", "pre-failover"])
            .output()
            .unwrap(),
        "bookmark",
    );
    // The point is readable once its log is in blob storage.
    let deadline = Instant::now() + Duration::from_secs(30);
    while app_points(&app, "m1").is_empty() {
        assert!(Instant::now() < deadline, "the bookmark never became readable");
        std::thread::sleep(Duration::from_millis(200));
    }

    let bad = refused(
        app.admin(&["failover", "--machine", "m1", "--target-blob", "machines/x"]),
        "400",
        "a prefix inside the appliance's own objects",
    );
    assert!(bad.contains("target_blob"), "{bad}");
    let job = json(
        app.admin(&[
            "failover",
            "--machine",
            "m1",
            "--point",
            "latest-app",
            "--target-blob",
            "failover/site-a",
            "--image-format",
            "vhd",
            "--json",
        ]),
        "failover to blob storage",
    );
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        job["results"][0]["blob_targets"]["disk0"], "failover/site-a/m1/disk0.vhd",
        "{job}"
    );
    let vhd = blob_dir.join("failover/site-a/m1/disk0.vhd");
    let info: serde_json::Value = serde_json::from_slice(
        &tool(
            "qemu-img",
            &["info", "--output=json", "-f", "vpc", vhd.to_str().unwrap()],
        )
        .stdout,
    )
    .unwrap();
    assert_eq!(info["virtual-size"].as_u64(), Some(DISK_SIZE as u64), "{info}");
    let raw = work.join("from-vhd.raw");
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vpc",
            "-O",
            "raw",
            vhd.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert_same_image(&std::fs::read(&raw).unwrap(), &at_point, "the VHD read by qemu-img");
    app.restart();
    assert_eq!(machine_state(&app, "m1"), "failed-over");

    // The VM ran in the cloud and wrote to its disk (the image's data part); the on-premises
    // disk changed too. Failback from the image writes exactly the blocks that differ.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&vhd).unwrap();
        for b in [9usize, 120] {
            f.seek(SeekFrom::Start((b * BLOCK + 512) as u64)).unwrap();
            f.write_all(&[0x66; 3000]).unwrap();
        }
    }
    let mut cloud = std::fs::read(&vhd).unwrap();
    cloud.truncate(DISK_SIZE);
    change_blocks(&disk, &[2, 200], 0x33);
    let expect_written = differing_blocks(&std::fs::read(&disk).unwrap(), &cloud);
    assert_eq!(expect_written, 4);
    let job = failback_m1(&app, &disk, "failback from the blob image");
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        job["results"][0]["blocks_written"].as_u64(),
        Some(expect_written as u64),
        "{job}"
    );
    assert_same_image(
        &std::fs::read(&disk).unwrap(),
        &cloud,
        "on-premises disk after failback",
    );
    let s = app.sync("m1", &[&disk]);
    assert!(
        s.bytes_sent < (DISK_SIZE / 4) as u64,
        "re-protected without a full copy: {s:?}"
    );
}
