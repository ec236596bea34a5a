//! The metrics endpoint serves valid Prometheus text (checked by the real `promtool`) with the
//! data path's metrics after a sync.

mod common;

use common::*;

fn promtool() -> std::path::PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = std::path::Path::new(dir).join("promtool");
        if p.exists() {
            return p;
        }
    }
    panic!("promtool not found: install the Debian package prometheus (.ci/setup does)");
}

#[test]
fn metrics_pass_promtool_and_count_the_sync() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(
        &dir.path().join("appliance"),
        &BlobTarget::Local(dir.path().join("blob")),
        "",
    );
    let disk = dir.path().join("d.img");
    make_disk(&disk, 8 * MIB, 11).unwrap();
    let s = app.sync("m1", &[&disk]);
    let text = app.metrics_text();
    assert_eq!(metric_value(&text, "lifeboat_ingest_bytes_total") as u64, s.bytes_sent);
    assert_eq!(metric_value(&text, "lifeboat_build_info"), 1.0);
    assert!(metric_value(&text, "lifeboat_cache_limit_bytes") > 0.0);
    assert!(metric_value(&text, "lifeboat_host_memory_total_bytes") > 0.0);
    assert!(
        text.contains("lifeboat_ingest_bytes_total{disk=\"disk0\",machine=\"m1\"}"),
        "{text}"
    );

    let mut child = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
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
