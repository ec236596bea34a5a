//! `lifeboat-bench`: end-to-end replication throughput against its peers, in one run.
//!
//! On a generated mixed corpus (text, binary, zeros, random) it measures, as medians over runs:
//! - Lifeboat end to end: first byte sent by `lifeboat agent sync` to the last segment durable in
//!   the local-folder blob store, and the durable-ack throughput (agent start to last ack);
//! - restic: `restic backup` of the same file into a fresh local repository;
//! - the machine's limit for this pipeline: `zstd -1 -T1` of the file plus AES-256-GCM of the
//!   compressed bytes on one core, times the core count;
//!
//! and prints the ratios. Build the binaries first: `cargo build --release --bins`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Lifeboat replication throughput vs restic and the zstd+AES limit")]
struct Args {
    /// Corpus size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Runs per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Working folder (corpus, repositories); reused between invocations.
    #[arg(long, default_value = "/var/tmp/lifeboat-bench")]
    workdir: PathBuf,
    /// Print the results as JSON too.
    #[arg(long)]
    json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    v[v.len() / 2]
}

fn lifeboat_bin() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("LIFEBOAT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("exe dir")?.join("lifeboat");
    if !p.exists() {
        bail!("{} not found: run `cargo build --release --bins` first", p.display());
    }
    Ok(p)
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// CPU seconds (user + system) of a process's threads, grouped by thread name, from /proc.
fn thread_cpu(pid: u32) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ... : comm may hold spaces, so split at the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        // After "state": utime is field 14 of the full line, i.e. index 11 here; stime 12.
        let ticks: f64 = fields.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
            + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // Group numbered threads (rocksdb:low0, rayon-3, ...) under one name.
        let group = comm.trim_end_matches(|c: char| c.is_ascii_digit()).to_string();
        *out.entry(group).or_insert(0.0) += ticks / 100.0;
    }
    out
}

/// CPU seconds (user + system) of a whole process, exited threads included.
fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
    (11..=12)
        .filter_map(|i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>()
        / 100.0
}

/// CPU seconds of one Lifeboat run.
#[derive(Default, Clone)]
struct CpuUse {
    agent: f64,
    server: f64,
    server_threads: std::collections::BTreeMap<String, f64>,
}

/// One Lifeboat run: returns (end-to-end seconds, ack seconds, CPU use).
fn lifeboat_run(bin: &Path, corpus: &Path, dir: &Path) -> anyhow::Result<(Duration, Duration, CpuUse)> {
    let blob = dir.join("blob");
    std::fs::create_dir_all(dir)?;
    let pass = dir.join("passphrase");
    std::fs::write(&pass, "bench-passphrase\n")?;
    let config = dir.join("lifeboat.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[listen]\nmanagement = \"127.0.0.1:0\"\nreplication = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\nnbd = \"127.0.0.1:0\"\n[security]\npassphrase_file = \"{}\"\n[blob]\nurl = \"file://{}\"\n[cache]\nmax_bytes = \"8GiB\"\n",
            dir.join("data").display(),
            pass.display(),
            blob.display()
        ),
    )?;
    let mut server = Command::new(bin)
        .args(["serve", "--json", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(server.stdout.take().context("stdout")?).read_line(&mut line)?;
    let ready: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("ready line {line:?}"))?;
    let addr = ready["replication"]
        .as_str()
        .context("replication address")?
        .to_string();
    let cert = ready["cert"].as_str().context("cert")?.to_string();

    let server_before = process_cpu(server.id());
    let agent_times = dir.join("agent-times");
    let started = Instant::now();
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%U %S", "-o"])
        .arg(&agent_times)
        .arg(bin)
        .args([
            "agent",
            "sync",
            "--server",
            &format!("https://{addr}"),
            "--ca",
            &cert,
            "--passphrase-file",
        ])
        .arg(&pass)
        .args(["--machine", "bench", "--json", "--disk"])
        .arg(corpus)
        .output()?;
    let acked = started.elapsed();
    if !out.status.success() {
        let _ = server.kill();
        bail!("agent failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let summary: gateway::agent::SyncSummary = serde_json::from_slice(&out.stdout)?;
    let last = summary.disks[0].last_seq;
    let segdir = blob.join("machines/bench/disks/disk0/segments");
    loop {
        let through = std::fs::read_dir(&segdir)
            .map(|rd| {
                rd.filter_map(|e| {
                    let name = e.ok()?.file_name().into_string().ok()?;
                    name.strip_suffix(".lbseg")?.split_once('-')?.1.parse::<u64>().ok()
                })
                .max()
                .unwrap_or(0)
            })
            .unwrap_or(0);
        if through >= last {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("segments never caught up");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let end_to_end = started.elapsed();
    let server_threads = thread_cpu(server.id());
    let server_cpu = process_cpu(server.id()) - server_before;
    let _ = server.kill();
    let _ = server.wait();
    let agent: f64 = std::fs::read_to_string(&agent_times)
        .unwrap_or_default()
        .lines()
        .last()
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    let cpu = CpuUse {
        agent,
        server: server_cpu,
        server_threads,
    };
    Ok((end_to_end, acked, cpu))
}

fn restic_run(corpus: &Path, dir: &Path) -> anyhow::Result<Duration> {
    let repo = dir.join("restic-repo");
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let st = Command::new("restic")
            .args(args)
            .arg("--repo")
            .arg(&repo)
            .env("RESTIC_PASSWORD", "bench")
            .env("RESTIC_CACHE_DIR", dir.join("restic-cache"))
            .stdout(Stdio::null())
            .status()
            .context("running restic (apt-get install restic)")?;
        if !st.success() {
            bail!("restic {args:?} failed");
        }
        Ok(())
    };
    run(&["init", "-q"])?;
    let started = Instant::now();
    let path = corpus.to_str().context("corpus path")?;
    run(&["backup", "-q", path])?;
    Ok(started.elapsed())
}

/// `zstd -1 -T1` of the corpus: (seconds, compressed bytes).
fn zstd_run(corpus: &Path) -> anyhow::Result<(Duration, Vec<u8>)> {
    let started = Instant::now();
    let mut child = Command::new("zstd")
        .args(["-1", "-T1", "-c", "-q"])
        .arg(corpus)
        .stdout(Stdio::piped())
        .spawn()
        .context("zstd")?;
    let mut out = Vec::new();
    child.stdout.take().context("stdout")?.read_to_end(&mut out)?;
    if !child.wait()?.success() {
        bail!("zstd failed");
    }
    Ok((started.elapsed(), out))
}

/// AES-256-GCM over `data` in 1 MiB chunks on one core, with the cipher the pipeline seals
/// chunks with (ring's).
fn aes_run(data: &mut [u8]) -> Duration {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    let cipher = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).expect("key"));
    let started = Instant::now();
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
        let tag = cipher
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), chunk)
            .expect("seal");
        let _ = std::hint::black_box(tag);
    }
    started.elapsed()
}

/// CPU seconds (user + system) of this process's waited-for children, from /proc/self/stat.
fn children_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
    // cutime and cstime are fields 16 and 17 of the full line (indices 13, 14 after the state).
    (13..=14)
        .filter_map(|i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>()
        / 100.0
}

/// CPU seconds of the calling thread.
fn thread_cpu_self() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
    (11..=12)
        .filter_map(|i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>()
        / 100.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = lifeboat_bin()?;
    std::fs::create_dir_all(&args.workdir)?;
    let size = args.size_mib << 20;
    let corpus = args.workdir.join(format!("corpus-{}MiB.img", args.size_mib));
    if std::fs::metadata(&corpus).map(|m| m.len()).ok() != Some(size) {
        eprintln!("generating {} MiB corpus at {}", args.size_mib, corpus.display());
        gateway::testkit::make_disk(&corpus, size, 42)?;
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let (mut e2e, mut ack, mut restic, mut limit1) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut agent_cpu, mut server_cpu, mut restic_cpu, mut limit_cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let gib = size as f64 / (1u64 << 30) as f64;
    let mut ratio = 0.0;
    for run in 0..args.runs {
        let dir = tempfile::tempdir_in(&args.workdir)?;
        let (e, a, cpu) = lifeboat_run(&bin, &corpus, &dir.path().join("lifeboat"))?;
        e2e.push(mbps(size, e));
        ack.push(mbps(size, a));
        agent_cpu.push(cpu.agent / gib);
        server_cpu.push(cpu.server / gib);
        let threads: Vec<String> = cpu
            .server_threads
            .iter()
            .filter(|(_, s)| **s >= 0.05)
            .map(|(n, s)| format!("{n} {s:.2}"))
            .collect();
        eprintln!("run {}: server CPU s by thread: {}", run + 1, threads.join(", "));
        let children_before = children_cpu();
        let r = restic_run(&corpus, dir.path())?;
        restic.push(mbps(size, r));
        restic_cpu.push((children_cpu() - children_before) / gib);
        let children_before = children_cpu();
        let (z, mut compressed) = zstd_run(&corpus)?;
        let zstd_cpu = children_cpu() - children_before;
        ratio = size as f64 / compressed.len() as f64;
        let cpu_started = thread_cpu_self();
        let aes = aes_run(&mut compressed);
        limit_cpu.push((zstd_cpu + thread_cpu_self() - cpu_started) / gib);
        limit1.push(mbps(size, z + aes));
        eprintln!(
            "run {}: lifeboat e2e {:.0} MB/s (ack {:.0}), restic {:.0} MB/s, zstd+aes {:.0} MB/s/core; CPU s/GiB: agent {:.2}, server {:.2}, restic {:.2}, zstd+aes {:.2}",
            run + 1,
            e2e[run],
            ack[run],
            restic[run],
            limit1[run],
            agent_cpu[run],
            server_cpu[run],
            restic_cpu[run],
            limit_cpu[run]
        );
    }
    let (e2e, ack, restic, limit1) = (median(e2e), median(ack), median(restic), median(limit1));
    let (agent_cpu, server_cpu, restic_cpu, limit_cpu) = (
        median(agent_cpu),
        median(server_cpu),
        median(restic_cpu),
        median(limit_cpu),
    );
    let limit = limit1 * cores as f64;
    println!(
        "corpus: {} MiB mixed, zstd -1 ratio {:.2}; {} cores; medians of {} runs",
        args.size_mib, ratio, cores, args.runs
    );
    println!("  lifeboat end to end (agent → durable segments)  {e2e:>7.0} MB/s");
    println!("  lifeboat durable ack                            {ack:>7.0} MB/s");
    println!("  restic backup (peer)                            {restic:>7.0} MB/s");
    println!("  zstd -1 -T1 + AES-256-GCM, per core             {limit1:>7.0} MB/s");
    println!("  ... on {cores} cores (the pipeline's limit)           {limit:>7.0} MB/s");
    println!(
        "  ratio end to end / restic                        {:>7.2}x  (target ≥ 2)",
        e2e / restic
    );
    println!(
        "  ratio end to end / zstd+AES limit                {:>7.0}%  (target ≥ 60%)",
        100.0 * e2e / limit
    );
    println!(
        "  CPU s/GiB: lifeboat agent {agent_cpu:.2} + server {server_cpu:.2} = {:.2}; restic {restic_cpu:.2}; zstd+AES {limit_cpu:.2}",
        agent_cpu + server_cpu
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({"size_mib": args.size_mib, "runs": args.runs, "cores": cores, "zstd_ratio": ratio,
                "lifeboat_e2e_mbps": e2e, "lifeboat_ack_mbps": ack, "restic_mbps": restic,
                "zstd_aes_per_core_mbps": limit1, "zstd_aes_limit_mbps": limit,
                "ratio_vs_restic": e2e / restic, "fraction_of_limit": e2e / limit,
                "agent_cpu_s_per_gib": agent_cpu, "server_cpu_s_per_gib": server_cpu,
                "restic_cpu_s_per_gib": restic_cpu, "zstd_aes_cpu_s_per_gib": limit_cpu})
        );
    }
    Ok(())
}
