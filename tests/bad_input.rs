//! Bad input gets a clear error and the service stays up: wrong passphrase, untrusted
//! certificate, unreachable server, malformed / truncated / oversized frames, unknown disks,
//! foreign tokens, and a corrupted segment in blob storage.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use gateway::protocol::{encode_batch, IngestRecord};

fn client(app: &Appliance) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&app.cert).unwrap()).unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .build()
        .unwrap()
}

async fn token(c: &reqwest::Client, app: &Appliance, machine: &str) -> String {
    let r = c
        .post(format!("{}/v1/register", app.server_url()))
        .json(&serde_json::json!({"machine": machine, "passphrase": PASSPHRASE}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn assert_alive(c: &reqwest::Client, app: &mut Appliance) {
    assert!(app.is_running(), "the server died");
    let r = c.get(format!("{}/v1/health", app.server_url())).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// Sends `request` over a TLS connection that trusts the appliance's certificate and returns
/// everything the server answers until it closes the connection.
async fn raw_tls_exchange(app: &Appliance, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pem = std::fs::read(&app.cert).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let addr = app.server_url().trim_start_matches("https://").to_string();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

async fn post_batch(c: &reqwest::Client, app: &Appliance, token: &str, machine: &str, body: Vec<u8>) -> (u16, String) {
    let r = c
        .post(format!("{}/v1/machines/{machine}/batches", app.server_url()))
        .bearer_auth(token)
        .header("x-lifeboat-session", "1")
        .header("x-lifeboat-batch", format!("{:x}", rand::random::<u32>()))
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_errors_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(
        &dir.path().join("appliance"),
        &BlobTarget::Local(dir.path().join("blob")),
        "",
    );
    let disk = dir.path().join("d.img");
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();

    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not the passphrase").unwrap();
    let out = std::process::Command::new(lifeboat_bin())
        .args(["agent", "sync", "--server", &app.server_url(), "--ca"])
        .arg(&app.cert)
        .arg("--passphrase-file")
        .arg(&wrong)
        .args(["--machine", "m1", "--disk"])
        .arg(&disk)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("wrong passphrase"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    // No --ca: the self-signed certificate is not trusted.
    let out = std::process::Command::new(lifeboat_bin())
        .args(["agent", "sync", "--server", &app.server_url(), "--passphrase-file"])
        .arg(&app.passphrase_file)
        .args(["--machine", "m1", "--disk"])
        .arg(&disk)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not trusted"), "{err}");

    // Nothing listens there.
    let out = std::process::Command::new(lifeboat_bin())
        .args([
            "agent",
            "sync",
            "--server",
            &format!("https://127.0.0.1:{}", free_port()),
            "--ca",
        ])
        .arg(&app.cert)
        .arg("--passphrase-file")
        .arg(&app.passphrase_file)
        .args(["--machine", "m1", "--disk"])
        .arg(&disk)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cannot reach"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_get_clear_errors_and_the_server_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::start(
        &dir.path().join("appliance"),
        &BlobTarget::Local(dir.path().join("blob")),
        "",
    );
    let disk = dir.path().join("d.img");
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    app.sync("m1", &[&disk]);
    let c = client(&app);
    let t = token(&c, &app, "m1").await;

    // Wrong passphrase: 401 with a clear message.
    let r = c
        .post(format!("{}/v1/register", app.server_url()))
        .json(&serde_json::json!({"machine": "m1", "passphrase": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("wrong passphrase"));

    // No token, and another machine's token.
    let (status, _) = post_batch(&c, &app, "bogus", "m1", encode_batch(&[]).to_vec()).await;
    assert_eq!(status, 401);
    let other = token(&c, &app, "m2").await;
    let (status, body) = post_batch(&c, &app, &other, "m1", encode_batch(&[]).to_vec()).await;
    assert_eq!(status, 403, "{body}");

    let good = encode_batch(&[IngestRecord::write("disk0", 0, Bytes::from(vec![1u8; 8192]))]).to_vec();
    // Truncated at several places.
    for cut in [3, 11, 40, good.len() - 1] {
        let (status, body) = post_batch(&c, &app, &t, "m1", good[..cut].to_vec()).await;
        assert_eq!(status, 400, "cut {cut}: {body}");
        assert!(
            body.contains("truncated") || body.contains("checksum"),
            "cut {cut}: {body}"
        );
    }
    // Garbage.
    let (status, body) = post_batch(&c, &app, &t, "m1", b"GET / HTTP/1.1 garbage garbage".to_vec()).await;
    assert_eq!(status, 400);
    assert!(body.contains("bad magic"), "{body}");
    // A flipped payload byte.
    let mut bad = good.clone();
    bad[100] ^= 1;
    let (status, body) = post_batch(&c, &app, &t, "m1", bad).await;
    assert_eq!(status, 400);
    assert!(body.contains("checksum"), "{body}");
    // A packed write whose zstd frame holds another length than the write declares.
    let mut builder = gateway::protocol::BatchBuilder::new(1 << 20);
    builder.begin_write("disk0", 0);
    builder.push_block(&[3u8; 65536], &[9u8; 16]);
    let mut packed = gateway::protocol::pack_batch(&builder.finish(), Vec::new())
        .unwrap()
        .to_vec();
    // header 12 | kind 1 | disk_len 1 | "disk0" | offset 8 | len 4
    let len_at = 12 + 1 + 1 + 5 + 8;
    packed[len_at..len_at + 4].copy_from_slice(&61440u32.to_be_bytes());
    let (status, body) = post_batch(&c, &app, &t, "m1", packed).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("record 0: zstd frame content size 65536"), "{body}");
    // Oversized: the request declares 65 MiB and sends none of it, so the answer must come from
    // the declared length before the server reads any body.
    let head = format!(
        "POST /v1/machines/m1/batches HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {t}\r\n\
         x-lifeboat-session: 1\r\nx-lifeboat-batch: 1\r\ncontent-length: {}\r\n\r\n",
        65u64 << 20
    );
    let answer = tokio::time::timeout(Duration::from_secs(20), raw_tls_exchange(&app, head.as_bytes()))
        .await
        .expect("the server must answer an oversized request without reading it");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("limit"), "{answer}");
    // Unknown disk and out-of-range write.
    let body = encode_batch(&[IngestRecord::write("disk9", 0, Bytes::from(vec![1u8; 512]))]).to_vec();
    let (status, text) = post_batch(&c, &app, &t, "m1", body).await;
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("unknown disk"), "{text}");
    let body = encode_batch(&[IngestRecord::write(
        "disk0",
        (1 << 20) - 100,
        Bytes::from(vec![1u8; 512]),
    )])
    .to_vec();
    let (status, text) = post_batch(&c, &app, &t, "m1", body).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("beyond"), "{text}");
    // Invalid names never reach blob paths.
    let r = c
        .put(format!("{}/v1/machines/m1/disks/..%2Fetc", app.server_url()))
        .bearer_auth(&t)
        .json(&serde_json::json!({"size": 4096}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    assert_alive(&c, &mut app).await;
    // And it still replicates.
    let again = app.sync("m1", &[&disk]);
    assert_eq!(again.bytes_sent, 0, "nothing changed");
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_segment_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let blob_dir = dir.path().join("blob");
    let blob = BlobTarget::Local(blob_dir.clone());
    let app = Appliance::start(
        &dir.path().join("appliance"),
        &blob,
        "[policy]\ncrash_consistent_interval = \"1s\"\n",
    );
    let disk = dir.path().join("d.img");
    make_disk(&disk, 16 * MIB, 9).unwrap();
    let s = app.sync("m1", &[&disk]);
    // A readable recovery point over the whole sync, before the damage.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !app
        .points("m1")
        .iter()
        .any(|p| p.readable && p.seqs["disk0"] > s.disks[0].last_seq)
    {
        assert!(std::time::Instant::now() < deadline, "no readable point");
        std::thread::sleep(Duration::from_millis(200));
    }
    let store = blob.store();
    wait_uploaded(
        store.as_ref(),
        "m1",
        "disk0",
        s.disks[0].last_seq,
        Duration::from_secs(60),
    )
    .await;
    let segs = gateway::replay::list_segments(store.as_ref(), "m1", "disk0")
        .await
        .unwrap();
    // The biggest segment holds data every read of the disk needs (others may hold only points).
    let victim = segs.iter().max_by_key(|s| s.size).unwrap();
    let path = blob_dir.join(victim.path.as_ref());
    let mut data = std::fs::read(&path).unwrap();
    let i = data.len() / 2;
    data[i] ^= 0x20;
    std::fs::write(&path, data).unwrap();

    let kek = gateway::blob::open_keyring(store.as_ref(), PASSPHRASE)
        .await
        .unwrap()
        .unwrap();
    let err = gateway::replay::replay_disk(
        store.as_ref(),
        &kek,
        "m1",
        "disk0",
        16 * MIB,
        None,
        &dir.path().join("out.img"),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains(victim.path.as_ref()), "the error names the segment: {err}");

    // Over NBD the damaged chunk is an I/O error for that read, not a crash: the client fails,
    // the error is counted, and the server keeps serving.
    let copy = std::process::Command::new("nbdcopy")
        .arg(app.nbd_uri("m1/disk0@latest"))
        .arg("null:")
        .output()
        .expect("nbdcopy (apt-get install libnbd-bin)");
    assert!(!copy.status.success(), "a read of the damaged chunk must fail");
    assert!(app.metric("lifeboat_nbd_errors_total") > 0.0);
    let list = std::process::Command::new("nbdinfo")
        .args(["--list", &format!("nbd://{}", app.nbd)])
        .output()
        .unwrap();
    assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
    assert!(String::from_utf8_lossy(&list.stdout).contains("m1/disk0@latest"));

    // The CLI says the same, and a wrong passphrase is its own clear error.
    let out = std::process::Command::new(lifeboat_bin())
        .args([
            "replay",
            "--blob-url",
            &format!("file://{}", blob_dir.display()),
            "--passphrase-file",
        ])
        .arg(&app.passphrase_file)
        .args(["--machine", "m1", "--disk", "disk0", "--out"])
        .arg(dir.path().join("cli.img"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(victim.path.as_ref()));
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "nope").unwrap();
    let out = std::process::Command::new(lifeboat_bin())
        .args([
            "replay",
            "--blob-url",
            &format!("file://{}", blob_dir.display()),
            "--passphrase-file",
        ])
        .arg(&wrong)
        .args(["--machine", "m1", "--disk", "disk0", "--out"])
        .arg(dir.path().join("cli.img"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong passphrase"));
}

/// The management API: no token 401, a wrong token 401, an agent's token 403, an unknown machine
/// 404 with a message; the OpenAPI document describes what is served.
#[tokio::test(flavor = "multi_thread")]
async fn management_api_refuses_unauthenticated_and_agent_callers() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(
        &dir.path().join("appliance"),
        &BlobTarget::Local(dir.path().join("blob")),
        "",
    );
    let c = client(&app);
    let url = |p: &str| format!("https://{}{p}", app.management);
    let admin = std::fs::read_to_string(dir.path().join("appliance/data/admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let agent = token(&c, &app, "m1").await;
    let get = |path: &'static str, bearer: Option<String>| {
        let mut r = c.get(url(path));
        if let Some(t) = bearer {
            r = r.bearer_auth(t);
        }
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }
    };
    assert_eq!(get("/api/machines", None).await.0, 401);
    assert_eq!(get("/api/machines", Some("not-a-token".into())).await.0, 401);
    let (status, body) = get("/api/machines", Some(agent)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("agent tokens"), "{body}");
    assert_eq!(get("/api/machines", Some(admin.clone())).await.0, 200);
    let (status, body) = get("/api/machines/nosuch/points", Some(admin)).await;
    assert_eq!(status, 404);
    assert!(body.contains("unknown machine"), "{body}");
    let (status, body) = get("/api/openapi.json", None).await;
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    // Every documented operation is served (the router knows the path and the method: a
    // missing route is axum's bare 404 or 405, never our JSON error) ...
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 24, "{} paths documented", paths.len());
    for (path, ops) in paths {
        let concrete = path
            .replace("{machine}", "nosuch")
            .replace("{name}", "nosuch")
            .replace("{id}", "999");
        for method in ops.as_object().unwrap().keys() {
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let r = c
                .request(m, url(&concrete))
                .header("content-type", "application/json")
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body = r.text().await.unwrap();
            assert!(
                status != 405 && !(status == 404 && body.is_empty()),
                "documented {method} {path} is not served: {status} {body:?}"
            );
        }
    }
    // ... and every schema it refers to is defined.
    let text = doc.to_string();
    for part in text.split("\"#/components/schemas/").skip(1) {
        let name = &part[..part.find('"').unwrap()];
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "OpenAPI refers to an undefined schema {name}"
        );
    }
    for p in [
        "/api/machines",
        "/api/machines/{machine}/points",
        "/api/machines/{machine}/policy",
        "/api/policies",
        "/api/policies/{name}",
        "/api/health",
        "/api/agents",
        "/api/process-servers",
        "/api/process-servers/register",
        "/api/groups/{name}",
        "/api/plans/{name}",
        "/api/jobs",
        "/api/jobs/{id}/resume",
        "/api/events",
        "/api/mounts/{id}",
    ] {
        assert!(doc["paths"][p].is_object(), "OpenAPI lacks {p}");
    }
}
