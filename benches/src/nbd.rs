//! `lifeboat-bench-nbd`: reading a recovery point over NBD against `qemu-nbd -r` serving the same
//! bytes as a raw file, in one run.
//!
//! It replicates a generated 1 GiB disk, then overlays it with at least 50 small syncs (each a
//! segment of its own), takes a bookmark, and once the point is in blob storage measures:
//! - sequential: `nbdcopy EXPORT null:` (chunks cached), median of runs, vs qemu-nbd, as a ratio;
//! - random 4 KiB reads at queue depth 1 from a minimal NBD client: p50 / p99 for both servers.
//!
//! Build the binaries first: `cargo build --release --bins`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rand::{Rng, SeedableRng};

mod appliance;

#[derive(Parser)]
#[command(about = "Lifeboat NBD reads of a recovery point vs qemu-nbd serving a raw file")]
struct Args {
    /// Disk size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Overlay syncs after the first full one (each at least one segment).
    #[arg(long, default_value_t = 50)]
    overlays: usize,
    /// Runs per sequential measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Random 4 KiB reads per server.
    #[arg(long, default_value_t = 5000)]
    random_reads: usize,
    #[arg(long, default_value = "/var/tmp/lifeboat-bench-nbd")]
    workdir: PathBuf,
    #[arg(long)]
    json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    v[v.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("exe dir")?.join(name);
    if !p.exists() {
        bail!("{} not found: run `cargo build --release --bins` first", p.display());
    }
    Ok(p)
}

fn run(cmd: &mut Command) -> anyhow::Result<std::process::Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_port(addr: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A minimal NBD client: fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies, one request at a time.
struct NbdClient {
    s: TcpStream,
    handle: u64,
}

impl NbdClient {
    fn connect(addr: &str, export: &str) -> anyhow::Result<(Self, u64)> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        if &hello[..8] != b"NBDMAGIC" || &hello[8..16] != b"IHAVEOPT" {
            bail!("{addr} is not a newstyle NBD server");
        }
        let no_zeroes = u16::from_be_bytes([hello[16], hello[17]]) & 2 != 0;
        let flags: u32 = 1 | if no_zeroes { 2 } else { 0 };
        s.write_all(&flags.to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        s.write_all(&opt)?;
        let mut reply = [0u8; 10];
        s.read_exact(&mut reply)?;
        let size = u64::from_be_bytes(reply[..8].try_into().expect("8"));
        if !no_zeroes {
            let mut z = [0u8; 124];
            s.read_exact(&mut z)?;
        }
        Ok((Self { s, handle: 0 }, size))
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        self.handle += 1;
        let mut req = Vec::with_capacity(28);
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
        req.extend_from_slice(&self.handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&(buf.len() as u32).to_be_bytes());
        self.s.write_all(&req)?;
        let mut head = [0u8; 16];
        self.s.read_exact(&mut head)?;
        let error = u32::from_be_bytes(head[4..8].try_into().expect("4"));
        if error != 0 {
            bail!("NBD read error {error}");
        }
        self.s.read_exact(buf)?;
        Ok(())
    }
}

/// QD1 random 4 KiB reads: returns sorted latencies in milliseconds.
fn random_reads(addr: &str, export: &str, n: usize) -> anyhow::Result<Vec<f64>> {
    let (mut c, size) = NbdClient::connect(addr, export)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut buf = vec![0u8; 4096];
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let off = rng.gen_range(0..size / 4096) * 4096;
        let t = Instant::now();
        c.read(off, &mut buf)?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    Ok(lat)
}

fn nbdcopy_seconds(uri: &str) -> anyhow::Result<f64> {
    let t = Instant::now();
    run(Command::new("nbdcopy").args([uri, "null:"]))?;
    Ok(t.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let lifeboat = bin("lifeboat")?;
    let _ = std::fs::remove_dir_all(&a.workdir);
    std::fs::create_dir_all(&a.workdir)?;
    let dir = a.workdir.canonicalize()?;
    let disk = dir.join("disk0.raw");
    let size = a.size_mib << 20;
    eprintln!("bench: generating a {} MiB disk", a.size_mib);
    gateway::testkit::make_disk(&disk, size, 5)?;
    let (app, ready) = appliance::Appliance::start(
        &lifeboat,
        &dir,
        &format!(
            "[cache]\nchunk_cache_bytes = \"{}MiB\"\n[policy]\ncrash_consistent_interval = \"24h\"\n",
            a.size_mib * 2
        ),
    )?;
    let nbd = ready["nbd"].as_str().map(str::to_string).context("ready line field")?;
    let (repl, cert, pass) = (&app.addr, &app.cert, &app.pass);
    let agent = |sub: &str| {
        let mut c = Command::new(&lifeboat);
        c.args(["agent", sub, "--server", &format!("https://{repl}"), "--ca", cert])
            .arg("--passphrase-file")
            .arg(pass)
            .args(["--machine", "bench"])
            .env("RUST_LOG", "warn");
        c
    };
    eprintln!("bench: initial sync, then {} overlay syncs", a.overlays);
    run(agent("sync").arg("--disk").arg(&disk).arg("--json"))?;
    for i in 0..a.overlays {
        gateway::testkit::scribble(&disk, 20, 100 + i as u64)?;
        run(agent("sync").arg("--disk").arg(&disk).arg("--json"))?;
    }
    let out = run(agent("bookmark").args(["--label", "bench", "--json"]))?;
    let ack: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let point = ack["point"].as_u64().context("bookmark point")?;
    let export = format!("bench/disk0@{point}");
    let list_points = || -> anyhow::Result<serde_json::Value> {
        let out = run(Command::new(&lifeboat)
            .args(["points", "list", "--json", "--machine", "bench", "--config"])
            .arg(dir.join("lifeboat.toml"))
            .env("RUST_LOG", "warn"))?;
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let pts = list_points()?;
        if pts
            .as_array()
            .is_some_and(|v| v.iter().any(|p| p["id"] == point && p["readable"] == true))
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("point {point} never reached blob storage");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let segments = std::fs::read_dir(dir.join("blob/machines/bench/disks/disk0/segments"))?.count();
    eprintln!("bench: point {point} over {segments} segments; measuring");

    // The peer: qemu-nbd serving the same bytes from a raw file (in the page cache).
    let qport = free_port();
    let qemu = Server(
        Command::new("qemu-nbd")
            .args([
                "-r",
                "-t",
                "-e",
                "8",
                "-f",
                "raw",
                "-b",
                "127.0.0.1",
                "-p",
                &qport.to_string(),
                "-x",
                "raw",
            ])
            .arg(&disk)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("qemu-nbd (apt-get install qemu-utils)")?,
    );
    let qaddr = format!("127.0.0.1:{qport}");
    wait_port(&qaddr)?;
    let lb_uri = format!("nbd://{nbd}/{export}");
    let q_uri = format!("nbd://{qaddr}/raw");
    // Warm both: Lifeboat's chunk cache, qemu-nbd's page cache.
    nbdcopy_seconds(&lb_uri)?;
    nbdcopy_seconds(&q_uri)?;
    let mut lb = Vec::new();
    let mut qm = Vec::new();
    for _ in 0..a.runs {
        lb.push(nbdcopy_seconds(&lb_uri)?);
        qm.push(nbdcopy_seconds(&q_uri)?);
    }
    let mb = size as f64 / 1e6;
    let (lb_mbps, q_mbps) = (mb / median(lb), mb / median(qm));
    let lb_lat = random_reads(&nbd, &export, a.random_reads)?;
    let q_lat = random_reads(&qaddr, "raw", a.random_reads)?;
    drop(qemu);
    let (lb50, lb99) = (percentile(&lb_lat, 0.5), percentile(&lb_lat, 0.99));
    let (q50, q99) = (percentile(&q_lat, 0.5), percentile(&q_lat, 0.99));
    println!(
        "recovery point: {} MiB disk, base + {} overlay syncs, {segments} segments",
        a.size_mib, a.overlays
    );
    println!("sequential nbdcopy (median of {}):", a.runs);
    println!("  lifeboat  {lb_mbps:8.0} MB/s");
    println!("  qemu-nbd  {q_mbps:8.0} MB/s");
    println!("  ratio     {:8.2}x  (target >= 0.8)", lb_mbps / q_mbps);
    println!("random 4 KiB reads, QD1, {} reads:", a.random_reads);
    println!("  lifeboat  p50 {lb50:.3} ms  p99 {lb99:.3} ms  (target p99 < 2 ms)");
    println!("  qemu-nbd  p50 {q50:.3} ms  p99 {q99:.3} ms");
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "segments": segments, "lifeboat_mbps": lb_mbps, "qemu_nbd_mbps": q_mbps,
                "ratio": lb_mbps / q_mbps, "lifeboat_p50_ms": lb50, "lifeboat_p99_ms": lb99,
                "qemu_nbd_p50_ms": q50, "qemu_nbd_p99_ms": q99,
            })
        );
    }
    Ok(())
}
