//! The metrics endpoint serves valid Prometheus text (checked by the real `promtool`) with the
//! data path's metrics after a sync; the RPO grows and crosses the policy's threshold during a
//! blob-store outage (a real Azurite server, stopped) and falls back to 0 once it is back; and a
//! real Prometheus server scrapes the appliance and answers a PromQL query for the RPO.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn tool(name: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found: install the Debian package prometheus (.ci/setup does)");
}

/// The value of the one series of `name` whose labels include every `k="v"` of `labels`.
fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .find(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
}

/// Polls `/metrics` until `ok` holds, panicking with `what` and the last text after `timeout`.
fn wait_metrics(app: &Appliance, timeout: Duration, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = app.metrics_text();
        if ok(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what}; last scrape:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn promtool_check(text: &str) {
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const M1_DISK0: &[(&str, &str)] = &[("machine", "m1"), ("disk", "disk0")];

#[test]
fn metrics_pass_promtool_and_count_the_sync() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(
        &dir.path().join("appliance"),
        &BlobTarget::Local(dir.path().join("blob")),
        "[policy]\ncrash_consistent_interval = \"1s\"\n",
    );
    let disk = dir.path().join("d.img");
    make_disk(&disk, 8 * MIB, 11).unwrap();
    let s = app.sync("m1", &[&disk]);
    // Everything acked gets uploaded (RPO 0) and a crash-consistent point becomes readable.
    let text = wait_metrics(&app, Duration::from_secs(60), "RPO 0 and machine protected", |t| {
        series(t, "lifeboat_rpo_seconds", M1_DISK0) == Some(0.0)
            && series(
                t,
                "lifeboat_machine_state",
                &[("machine", "m1"), ("state", "protected")],
            ) == Some(1.0)
    });
    assert_eq!(metric_value(&text, "lifeboat_ingest_bytes_total") as u64, s.bytes_sent);
    assert_eq!(metric_value(&text, "lifeboat_build_info"), 1.0);
    assert!(metric_value(&text, "lifeboat_cache_limit_bytes") > 0.0);
    assert!(metric_value(&text, "lifeboat_host_memory_total_bytes") > 0.0);
    assert!(
        text.contains("lifeboat_ingest_bytes_total{disk=\"disk0\",machine=\"m1\"}"),
        "{text}"
    );
    assert_eq!(
        series(
            &text,
            "lifeboat_machine_state",
            &[("machine", "m1"), ("state", "initial-sync")]
        ),
        Some(0.0)
    );
    assert_eq!(series(&text, "lifeboat_rpo_threshold_exceeded", M1_DISK0), Some(0.0));
    assert_eq!(
        metric_value(&text, "lifeboat_rpo_threshold_seconds"),
        900.0,
        "the 15m default"
    );
    assert_eq!(series(&text, "lifeboat_pending_upload_records", M1_DISK0), Some(0.0));
    assert_eq!(metric_value(&text, "lifeboat_segments_pending"), 0.0);
    // Churn is the 60 s average of the bytes just sent (the sync took well under 60 s).
    let churn = series(&text, "lifeboat_churn_bytes_per_second", M1_DISK0).expect("churn series");
    assert_eq!(churn, s.bytes_sent as f64 / 60.0, "{text}");
    assert!(metric_value(&text, "lifeboat_upload_drain_bytes_per_second") > 0.0);
    // Uploads drained everything: the cache is not filling.
    assert_eq!(
        metric_value(&text, "lifeboat_cache_time_to_full_seconds"),
        f64::INFINITY
    );
    // (The prometheus crate writes it as `inf`, which Prometheus and promtool parse as +Inf.)
    let ratio = metric_value(&text, "lifeboat_compression_ratio");
    let expect = metric_value(&text, "lifeboat_compressed_input_bytes_total")
        / metric_value(&text, "lifeboat_uploaded_bytes_total");
    assert!(
        ratio > 0.5 && (ratio - expect).abs() < 1e-9,
        "ratio {ratio}, expected {expect}"
    );
    assert!(series(&text, "lifeboat_recovery_points", &[("machine", "m1")]).unwrap_or(0.0) >= 1.0);
    assert_eq!(metric_value(&text, "lifeboat_fuse_clients"), 0.0);
    assert_eq!(metric_value(&text, "lifeboat_upload_errors_total"), 0.0);
    assert_eq!(metric_value(&text, "lifeboat_upload_retries_total"), 0.0);
    promtool_check(&text);
}

/// Blob storage (a real Azurite) goes down after a sync: the next sync is acked into the journal
/// but cannot be uploaded, so the RPO grows second by second and crosses a 1 s threshold; once
/// Azurite is back the backlog uploads and the RPO returns to 0.
#[test]
fn rpo_grows_during_a_blob_outage_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut azurite = Azurite::start(&dir.path().join("azurite"));
    let blob = azurite.create_container("rpo");
    let app = Appliance::start(
        &dir.path().join("appliance"),
        &blob,
        "[policy]\nrpo_threshold = \"1s\"\n",
    );
    let disk = dir.path().join("d.img");
    make_disk(&disk, 8 * MIB, 21).unwrap();
    app.sync("m1", &[&disk]);
    let text = wait_metrics(&app, Duration::from_secs(60), "RPO 0 after the first sync", |t| {
        series(t, "lifeboat_rpo_seconds", M1_DISK0) == Some(0.0)
    });
    assert_eq!(metric_value(&text, "lifeboat_rpo_threshold_seconds"), 1.0);
    assert_eq!(series(&text, "lifeboat_rpo_threshold_exceeded", M1_DISK0), Some(0.0));

    azurite.stop();
    scribble(&disk, 40, 22).unwrap();
    let s = app.sync("m1", &[&disk]);
    assert!(s.bytes_sent > 0);
    let text = wait_metrics(&app, Duration::from_secs(30), "RPO over the 1 s threshold", |t| {
        series(t, "lifeboat_rpo_threshold_exceeded", M1_DISK0) == Some(1.0)
    });
    let first = series(&text, "lifeboat_rpo_seconds", M1_DISK0).unwrap();
    assert!(first > 1.0, "{first}");
    assert!(series(&text, "lifeboat_pending_upload_records", M1_DISK0).unwrap() > 0.0);
    assert_eq!(metric_value(&text, "lifeboat_segments_pending"), 1.0);
    std::thread::sleep(Duration::from_secs(2));
    let text = app.metrics_text();
    let later = series(&text, "lifeboat_rpo_seconds", M1_DISK0).unwrap();
    assert!(
        later >= first + 1.5,
        "the RPO keeps growing during the outage: {first} then {later}"
    );
    assert_eq!(series(&text, "lifeboat_rpo_threshold_exceeded", M1_DISK0), Some(1.0));
    promtool_check(&text);

    azurite.restart();
    wait_metrics(&app, Duration::from_secs(180), "RPO back to 0 after the outage", |t| {
        series(t, "lifeboat_rpo_seconds", M1_DISK0) == Some(0.0)
            && series(t, "lifeboat_rpo_threshold_exceeded", M1_DISK0) == Some(0.0)
    });
}

/// A real Prometheus server on loopback, killed when dropped.
struct Prometheus {
    child: Child,
    addr: String,
}

impl Prometheus {
    fn start(dir: &Path, target: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: lifeboat\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("start prometheus");
        Self { child, addr }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_the_appliance_and_answers_the_rpo_query() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(
        &dir.path().join("appliance"),
        &BlobTarget::Local(dir.path().join("blob")),
        "",
    );
    let disk = dir.path().join("d.img");
    make_disk(&disk, 4 * MIB, 31).unwrap();
    app.sync("m1", &[&disk]);
    let prom = Prometheus::start(&dir.path().join("prometheus"), &app.metrics);
    let deadline = Instant::now() + Duration::from_secs(90);
    let answer = loop {
        let body = if std::net::TcpStream::connect(&prom.addr).is_ok() {
            http_get(&prom.addr, "/api/v1/query?query=lifeboat_rpo_seconds")
        } else {
            String::new()
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let has_series = v["status"] == "success"
            && v["data"]["result"].as_array().is_some_and(|r| {
                r.iter().any(|s| {
                    s["metric"]["machine"] == "m1"
                        && s["metric"]["disk"] == "disk0"
                        && s["metric"]["job"] == "lifeboat"
                        && s["metric"]["instance"] == app.metrics.as_str()
                })
            });
        if has_series {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never returned the appliance's RPO series; last answer: {body}\nlog: {}",
            std::fs::read_to_string(dir.path().join("prometheus/prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let sample = &answer["data"]["result"][0]["value"][1];
    let rpo: f64 = sample.as_str().unwrap().parse().unwrap();
    assert!(rpo >= 0.0, "{answer}");
    // The scrape itself is healthy: `up` is 1 for the appliance.
    let up = http_get(&prom.addr, "/api/v1/query?query=up");
    let v: serde_json::Value = serde_json::from_str(&up).unwrap();
    assert_eq!(v["data"]["result"][0]["value"][1], "1", "{up}");
}
