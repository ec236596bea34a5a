//! Throughput and latency check of the NBD server against `qemu-nbd -r` (a check, not a test):
//!
//! ```text
//! cargo run --release -p lifeboat-fs --example nbd_bench -- [SIZE_MIB] [RUNS]
//! ```
//!
//! Serves a SIZE_MIB (default 1024) in-memory image twice (zero-copy reads, and a copy per read as
//! a decrypting cache would cost), writes the same bytes to a file in /var/tmp served by
//! `qemu-nbd -r -f raw`, and times `nbdcopy URI null:` RUNS (default 3) times against each, with
//! nbdcopy's default connections and with one connection. Then p50/p99 of 20,000 sequential
//! random 4 KiB reads through a minimal client of this file (one request in flight).
//!
//! The copying variant mostly measures glibc malloc: a fresh 256 KiB buffer per read in tokio's
//! per-thread arenas is trimmed back (madvise) and faulted in again each time. With
//! `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824`
//! it runs as fast as the zero-copy view.
//!
//! `nbd_bench serve [PORT]` only serves a 64 MiB image with holes (`m1/disk0@latest`) and a
//! writable one (`m1/disk0@test-failover`) on 127.0.0.1 until killed, for trying clients by hand
//! (logs to stderr, `RUST_LOG=lifeboat_fs=debug` for every refused request).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pattern, MemCatalog, MemView};
use lifeboat_fs::nbd::NbdServer;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        return serve(args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10809));
    }
    let size_mib: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let runs: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    common::require_tool("nbdcopy");
    common::require_tool("qemu-nbd");
    let size = size_mib << 20;

    eprintln!("building a {size_mib} MiB image");
    let data = pattern(size, 42);
    let file = std::env::temp_dir().join(format!("lifeboat-nbd-bench-{}.raw", std::process::id()));
    let file = if std::path::Path::new("/var/tmp").is_dir() {
        std::path::PathBuf::from("/var/tmp").join(file.file_name().unwrap())
    } else {
        file
    };
    std::fs::write(&file, &data).unwrap();
    let _cleanup = Cleanup(file.clone());

    let mut catalog = MemCatalog::default();
    catalog.add(
        "bench",
        "zero-copy reads",
        Arc::new(MemView::read_only(data.clone(), &[])),
    );
    catalog.add(
        "bench-copy",
        "a copy per read",
        Arc::new(MemView::read_only(data, &[]).with_copied_reads()),
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let ours: SocketAddr = listener.local_addr().unwrap();
    let server = Arc::new(NbdServer::new(Arc::new(catalog)));
    rt.spawn(server.serve(listener, std::future::pending()));

    let qport = free_port();
    let _qemu = Kill(
        Command::new("qemu-nbd")
            .args([
                "-r",
                "-f",
                "raw",
                "-t",
                "-x",
                "bench",
                "-b",
                "127.0.0.1",
                "-p",
                &qport.to_string(),
            ])
            .arg(&file)
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-nbd"),
    );
    let qemu: SocketAddr = format!("127.0.0.1:{qport}").parse().unwrap();
    for _ in 0..100 {
        if TcpStream::connect(qemu).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Page cache warm for qemu-nbd, as the in-memory view is for us.
    std::io::copy(&mut std::fs::File::open(&file).unwrap(), &mut std::io::sink()).unwrap();

    println!("nbdcopy URI null: of {size_mib} MiB, {runs} runs, median (MiB/s)");
    let targets = [
        ("qemu-nbd -r -f raw (file, page cache)", format!("nbd://{qemu}/bench")),
        ("lifeboat, zero-copy view", format!("nbd://{ours}/bench")),
        ("lifeboat, copying view", format!("nbd://{ours}/bench-copy")),
    ];
    let mut baseline = [0.0f64; 2];
    for (name, uri) in &targets {
        for (i, conns) in [None, Some(1)].into_iter().enumerate() {
            let mut secs = Vec::new();
            for _ in 0..runs {
                let mut cmd = Command::new("nbdcopy");
                if let Some(c) = conns {
                    cmd.arg(format!("--connections={c}"));
                }
                let start = Instant::now();
                let status = cmd.args([uri.as_str(), "null:"]).status().expect("nbdcopy");
                assert!(status.success(), "nbdcopy {uri} failed");
                secs.push(start.elapsed().as_secs_f64());
            }
            secs.sort_by(|a, b| a.total_cmp(b));
            let median = secs[secs.len() / 2];
            let rate = size_mib as f64 / median;
            if baseline[i] == 0.0 {
                baseline[i] = rate;
            }
            let conns = conns.map_or("default conns".to_string(), |c| format!("{c} conn"));
            println!(
                "  {name:<40} {conns:<14} median {median:6.3} s  {rate:7.0} MiB/s  ratio {:.2}  (runs: {})",
                rate / baseline[i],
                secs.iter().map(|s| format!("{s:.3}")).collect::<Vec<_>>().join(" ")
            );
        }
    }

    println!("random 4 KiB reads, one in flight, 20000 requests (microseconds)");
    for (name, addr) in [("qemu-nbd", qemu), ("lifeboat zero-copy", ours)] {
        let mut lat = latencies(addr, "bench", size as u64, 20_000);
        lat.sort();
        let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e6;
        println!(
            "  {name:<20} p50 {:7.1}  p99 {:7.1}  p99.9 {:7.1}  max {:7.1}",
            pct(0.50),
            pct(0.99),
            pct(0.999),
            pct(1.0)
        );
    }
}

fn serve(port: u16) {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let holes = [(8 << 20, 24 << 20), (40 << 20, 41 << 20)];
    let mut catalog = MemCatalog::default();
    let view = MemView::read_only(common::image(64 << 20, 7, &holes), &holes);
    catalog.add("m1/disk0@latest", "64 MiB with two holes", Arc::new(view));
    catalog.add(
        "m1/disk0@test-failover",
        "writable",
        Arc::new(MemView::writable(64 << 20)),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        println!("serving on nbd://{}/", listener.local_addr().unwrap());
        let server = Arc::new(NbdServer::new(Arc::new(catalog)));
        server
            .serve(listener, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await;
    });
}

/// A minimal blocking client: fixed newstyle, NBD_OPT_GO, simple replies.
fn latencies(addr: SocketAddr, export: &str, size: u64, n: usize) -> Vec<Duration> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = Vec::new();
    opt.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d).unwrap();
        match ty {
            1 => break,
            3 => {}
            other => panic!("GO failed: {other:#x}"),
        }
    }
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut buf = vec![0u8; 16 + 4096];
    let mut out = Vec::with_capacity(n);
    for handle in 0..n as u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let offset = (x % (size / 4096)) * 4096;
        let mut req = [0u8; 28];
        req[..4].copy_from_slice(&0x2560_9513u32.to_be_bytes());
        req[8..16].copy_from_slice(&handle.to_be_bytes());
        req[16..24].copy_from_slice(&offset.to_be_bytes());
        req[24..28].copy_from_slice(&4096u32.to_be_bytes());
        let start = Instant::now();
        s.write_all(&req).unwrap();
        s.read_exact(&mut buf).unwrap();
        out.push(start.elapsed());
        assert_eq!(&buf[4..8], &[0; 4], "read error");
    }
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
