//! Test harness shared by the end-to-end scenarios: runs the real `lifeboat` binary as the
//! appliance and as the agent, runs a real Azurite server, makes disk images and compares replays.
//! Every server listens on 127.0.0.1 only.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Deterministic incompressible bytes (xorshift), the same for the same seed.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub const PASSPHRASE: &str = "test-passphrase-lifeboat";
pub const MIB: u64 = 1 << 20;

pub fn lifeboat_bin() -> &'static str {
    env!("CARGO_BIN_EXE_lifeboat")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Blob storage a test appliance uses.
#[derive(Clone, Debug)]
pub enum BlobTarget {
    Local(PathBuf),
    Azurite { port: u16, container: String },
}

impl BlobTarget {
    fn toml(&self) -> String {
        match self {
            BlobTarget::Local(p) => format!("[blob]\nurl = \"file://{}\"\n", p.display()),
            BlobTarget::Azurite { port, container } => format!(
                "[blob]\nurl = \"az://{container}\"\n[blob.options]\nazure_storage_account_name = \"{AZURITE_ACCOUNT}\"\nazure_storage_account_key = \"{AZURITE_KEY}\"\nazure_storage_endpoint = \"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}\"\nazure_allow_http = \"true\"\n"
            ),
        }
    }

    pub fn url_and_options(&self) -> (String, std::collections::BTreeMap<String, String>) {
        let mut o = std::collections::BTreeMap::new();
        match self {
            BlobTarget::Local(p) => (format!("file://{}", p.display()), o),
            BlobTarget::Azurite { port, container } => {
                o.insert("azure_storage_account_name".into(), AZURITE_ACCOUNT.into());
                o.insert("azure_storage_account_key".into(), AZURITE_KEY.into());
                o.insert(
                    "azure_storage_endpoint".into(),
                    format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"),
                );
                o.insert("azure_allow_http".into(), "true".into());
                (format!("az://{container}"), o)
            }
        }
    }

    pub fn store(&self) -> std::sync::Arc<dyn object_store::ObjectStore> {
        let (url, opts) = self.url_and_options();
        gateway::blob::open_store(&url, &opts).unwrap()
    }
}

/// A running appliance (`lifeboat serve`), killed when dropped.
pub struct Appliance {
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub replication: String,
    pub management: String,
    pub metrics: String,
    pub nbd: String,
    pub cert: PathBuf,
    pub passphrase_file: PathBuf,
    pub config: PathBuf,
    /// Extra environment for the server process (e.g. `LIFEBOAT_FAILPOINT`).
    pub env: Vec<(String, String)>,
}

impl Appliance {
    /// Writes a config into `dir` and starts the appliance on free loopback ports.
    pub fn start(dir: &Path, blob: &BlobTarget, extra_toml: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let passphrase_file = dir.join("passphrase");
        std::fs::write(&passphrase_file, format!("{PASSPHRASE}\n")).unwrap();
        let config = dir.join("lifeboat.toml");
        let text = format!(
            "data_dir = \"{}\"\n{extra_toml}\n[listen]\nmanagement = \"127.0.0.1:0\"\nreplication = \"127.0.0.1:0\"\nnbd = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\n[security]\npassphrase_file = \"{}\"\n{}",
            dir.join("data").display(),
            passphrase_file.display(),
            blob.toml()
        );
        std::fs::write(&config, text).unwrap();
        Self::launch(dir.to_path_buf(), config, passphrase_file, Vec::new())
    }

    /// Like `start`, with extra environment for the server process.
    pub fn start_with_env(dir: &Path, blob: &BlobTarget, extra_toml: &str, env: &[(&str, &str)]) -> Self {
        let mut app = Self::start(dir, blob, extra_toml);
        app.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        app.restart();
        app
    }

    fn launch(dir: PathBuf, config: PathBuf, passphrase_file: PathBuf, env: Vec<(String, String)>) -> Self {
        let mut child = Command::new(lifeboat_bin())
            .args(["serve", "--json", "--config"])
            .arg(&config)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "warn,gateway=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start lifeboat serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("lifeboat serve did not become ready"));
        let ready: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("ready line {line:?}: {e}"));
        let get = |k: &str| {
            ready[k]
                .as_str()
                .unwrap_or_else(|| panic!("ready line lacks {k}: {line}"))
                .to_string()
        };
        Self {
            replication: get("replication"),
            // A process-server-only appliance has no management API.
            management: ready["management"].as_str().unwrap_or_default().to_string(),
            metrics: get("metrics"),
            nbd: ready["nbd"].as_str().unwrap_or_default().to_string(),
            cert: PathBuf::from(get("cert")),
            dir,
            child: Some(child),
            passphrase_file,
            config,
            env,
        }
    }

    /// Starts the appliance again on the same config and data.
    pub fn restart(&mut self) {
        self.stop();
        let next = Self::launch(
            self.dir.clone(),
            self.config.clone(),
            self.passphrase_file.clone(),
            self.env.clone(),
        );
        *self = next;
    }

    pub fn server_url(&self) -> String {
        format!("https://{}", self.replication)
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if c.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// The agent command line for this appliance.
    pub fn agent(&self, sub: &str, machine: &str) -> Command {
        let mut c = Command::new(lifeboat_bin());
        c.args(["agent", sub, "--server", &self.server_url(), "--ca"])
            .arg(&self.cert)
            .arg("--passphrase-file")
            .arg(&self.passphrase_file)
            .args(["--machine", machine])
            .env("RUST_LOG", "warn");
        c
    }

    /// Runs `agent sync --json` on the given disks and returns the summary.
    pub fn sync(&self, machine: &str, disks: &[&Path]) -> gateway::agent::SyncSummary {
        self.sync_with(machine, disks, &[])
    }

    /// Like [`Self::sync`], with more agent options (e.g. `--no-compress`).
    pub fn sync_with(&self, machine: &str, disks: &[&Path], options: &[&str]) -> gateway::agent::SyncSummary {
        let mut c = self.agent("sync", machine);
        c.args(options);
        for d in disks {
            c.arg("--disk").arg(d);
        }
        let out = c.arg("--json").output().unwrap();
        assert!(
            out.status.success(),
            "agent sync failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("summary {:?}: {e}", String::from_utf8_lossy(&out.stdout)))
    }

    /// `lifeboat points list --json` through the management API, newest first.
    pub fn points(&self, machine: &str) -> Vec<lifeboat_fs::pit::PointInfo> {
        let out = Command::new(lifeboat_bin())
            .args(["points", "list", "--json", "--machine", machine, "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "points list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("points {:?}: {e}", String::from_utf8_lossy(&out.stdout)))
    }

    /// An operator command (`lifeboat ARGS --config CONFIG`) against this appliance; not checked.
    pub fn admin(&self, args: &[&str]) -> std::process::Output {
        Command::new(lifeboat_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    }

    /// An `nbd://` URI of an export on this appliance.
    pub fn nbd_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.nbd)
    }

    /// Fetches `/metrics` as text.
    pub fn metrics_text(&self) -> String {
        http_get(&self.metrics, "/metrics")
    }

    /// Reads one metric's value (sum over label sets) from `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        metric_value(&self.metrics_text(), name)
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A tiny HTTP/1.0 GET over loopback (the metrics port is plain HTTP).
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

#[allow(unused_imports)]
pub use gateway::testkit::{make_disk, scribble};

/// Waits until blob storage holds `machine/disk`'s log through `seq`.
pub async fn wait_uploaded(
    store: &dyn object_store::ObjectStore,
    machine: &str,
    disk: &str,
    seq: u64,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let segs = gateway::replay::list_segments(store, machine, disk)
            .await
            .unwrap_or_default();
        let through = segs.iter().map(|s| s.last_seq).max().unwrap_or(0);
        if through >= seq {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "blob storage holds {machine}/{disk} only through seq {through}, waited for {seq}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Replays `machine/disk` from blob storage through `until` into `out` and returns its bytes.
pub async fn replay(
    store: &dyn object_store::ObjectStore,
    machine: &str,
    disk: &str,
    size: u64,
    until: Option<u64>,
    out: &Path,
) -> Vec<u8> {
    let kek = gateway::blob::open_keyring(store, PASSPHRASE)
        .await
        .unwrap()
        .expect("keyring in blob storage");
    gateway::replay::replay_disk(store, &kek, machine, disk, size, until, out)
        .await
        .unwrap();
    std::fs::read(out).unwrap()
}

fn hex_preview(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Asserts two images are equal, naming the first differing 4 KiB block.
pub fn assert_same_image(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: sizes differ");
    if actual != expected {
        let block = actual
            .chunks(4096)
            .zip(expected.chunks(4096))
            .position(|(a, b)| a != b)
            .unwrap();
        let at = block * 4096;
        let differing = actual
            .chunks(4096)
            .zip(expected.chunks(4096))
            .filter(|(a, b)| a != b)
            .count();
        let show = |v: &[u8]| hex_preview(&v[at..(at + 32).min(v.len())]);
        panic!(
            "{what}: images differ in {differing} 4 KiB blocks, first at byte {at}: got {} want {}",
            show(actual),
            show(expected)
        );
    }
}

/// A real Azurite blob server on a loopback port, data in `dir`; stopped when dropped.
pub struct Azurite {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn azurite_bin() -> PathBuf {
    if let Ok(p) = std::env::var("AZURITE_BIN") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("azurite-blob");
        if p.exists() {
            return p;
        }
    }
    panic!("azurite-blob not found: install it with `npm install -g azurite` (.ci/run does) or set AZURITE_BIN");
}

impl Azurite {
    pub fn start(dir: &Path) -> Self {
        let mut a = Self {
            port: free_port(),
            dir: dir.to_path_buf(),
            child: None,
        };
        a.launch();
        a
    }

    fn launch(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let child = Command::new(azurite_bin())
            .args([
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                &self.port.to_string(),
                "--disableTelemetry",
                "--skipApiVersionCheck",
                "--silent",
                "--location",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start azurite");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "azurite did not start on port {}", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM (Azurite may lose acknowledged writes on SIGKILL, which would blame Lifeboat).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Creates a container with a SharedKey-signed request (object_store cannot).
    pub fn create_container(&self, name: &str) -> BlobTarget {
        use base64::Engine;
        use hmac::Mac;
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        let version = "2021-08-06";
        let string_to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{name}\nrestype:container"
        );
        let key = base64::engine::general_purpose::STANDARD.decode(AZURITE_KEY).unwrap();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(string_to_sign.as_bytes());
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let url = format!(
            "http://127.0.0.1:{}/{AZURITE_ACCOUNT}/{name}?restype=container",
            self.port
        );
        let resp = rawhttp::blocking_put(&url, &date, version, &format!("SharedKey {AZURITE_ACCOUNT}:{sig}"));
        assert!(resp == 201 || resp == 409, "create container {name}: HTTP {resp}");
        BlobTarget::Azurite {
            port: self.port,
            container: name.into(),
        }
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A minimal blocking HTTP PUT over loopback for the container request.
mod rawhttp {
    use std::io::{Read, Write};
    pub fn blocking_put(url: &str, date: &str, version: &str, auth: &str) -> u16 {
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_once('/').unwrap();
        let mut s = std::net::TcpStream::connect(host).unwrap();
        write!(
            s,
            "PUT /{path} HTTP/1.1\r\nHost: {host}\r\nx-ms-date: {date}\r\nx-ms-version: {version}\r\nAuthorization: {auth}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
    }
}

/// Runs a tool that CI installs (.ci/setup); a missing tool fails the test loudly.
pub fn tool(name: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name} is required (bash .ci/setup installs it): {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `lifeboat index rebuild --json` with an appliance's config; returns the summary.
pub fn rebuild_index(app: &Appliance) -> serde_json::Value {
    let out = Command::new(lifeboat_bin())
        .args(["index", "rebuild", "--json", "--config"])
        .arg(&app.config)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "index rebuild: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
