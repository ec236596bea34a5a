//! `lifeboat-bench`: end-to-end replication throughput against its peers, in one run.
//!
//! On a generated mixed corpus (text, binary, zeros, random) it measures, as medians over runs:
//! - Lifeboat end to end: first byte sent by `lifeboat agent sync` to the last segment durable in
//!   the local-folder blob store, and the durable-ack throughput (agent start to last ack);
//! - the appliance alone: the same data as the agent's packed batches, built in memory before
//!   the clock starts and sent over HTTPS, to the last segment durable — what one appliance
//!   takes in when the agents run on the protected machines, not on its own cores;
//! - restic: `restic backup` of the same file into a fresh local repository;
//! - the machine's limit for this pipeline: `zstd -1 -T1` of the file plus AES-256-GCM of the
//!   compressed bytes on one core, times the core count;
//!
//! and prints the ratios. Build the binaries first: `cargo build --release --bins`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

mod appliance;
mod corpus;
use appliance::Appliance;

/// The bench appliance's settings past the defaults: a cache that holds the whole corpus.
const BENCH_CONFIG: &str = "[cache]\nmax_bytes = \"8GiB\"\n";

#[derive(Parser)]
#[command(about = "Lifeboat replication throughput vs restic and the zstd+AES limit")]
struct Args {
    /// Corpus size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// The generated corpus: `realistic` (program code, text and logs, database pages,
    /// incompressible files, zeros: zstd -1 compresses it about 2.1× at about 400 MB/s per core,
    /// like real disks) or `simple` (the tests' disk: a 12-word vocabulary and a repeating
    /// pattern, 3.3× at 1.2 GB/s, far easier to compress than any real disk).
    #[arg(long, value_enum, default_value_t = CorpusKind::Realistic)]
    corpus: CorpusKind,
    /// Replicate this file instead of a generated corpus (a disk image of your own, say);
    /// `--size-mib` and `--corpus` are then ignored.
    #[arg(long, value_name = "FILE")]
    corpus_file: Option<PathBuf>,
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

#[derive(Clone, Copy, clap::ValueEnum)]
enum CorpusKind {
    Realistic,
    Simple,
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

/// How long the segments may take to catch up.
const CATCH_UP: Duration = Duration::from_secs(600);

/// Waits until the segments of machine `bench`, disk0, in the blob folder of the appliance
/// started under `dir` reach sequence number `last`.
fn wait_for_segments(dir: &Path, last: u64, started: Instant) -> anyhow::Result<()> {
    let segdir = dir.join("blob/machines/bench/disks/disk0/segments");
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
            return Ok(());
        }
        if started.elapsed() > CATCH_UP {
            bail!("segments never caught up");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One Lifeboat run: returns (end-to-end seconds, ack seconds, CPU use).
fn lifeboat_run(bin: &Path, corpus: &Path, dir: &Path) -> anyhow::Result<(Duration, Duration, CpuUse)> {
    let (app, _) = Appliance::start(bin, dir, BENCH_CONFIG)?;
    let server_before = process_cpu(app.server.id());
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
            &format!("https://{}", app.addr),
            "--ca",
            &app.cert,
            "--passphrase-file",
        ])
        .arg(&app.pass)
        .args(["--machine", "bench", "--json", "--disk"])
        .arg(corpus)
        .output()?;
    let acked = started.elapsed();
    if !out.status.success() {
        bail!("agent failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let summary: gateway::agent::SyncSummary = serde_json::from_slice(&out.stdout)?;
    wait_for_segments(dir, summary.disks[0].last_seq, started)?;
    let end_to_end = started.elapsed();
    let server_threads = thread_cpu(app.server.id());
    let server_cpu = process_cpu(app.server.id()) - server_before;
    drop(app);
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

/// The batches an agent's first sync of `corpus` sends, packed (compressed), built once in
/// memory by the agent's own scan against an empty replica.
fn packed_batches(corpus: &Path) -> anyhow::Result<Vec<bytes::Bytes>> {
    use gateway::disk_scan::{scan, ScanJob, ScannedBody};
    let size = std::fs::metadata(corpus)?.len();
    let job = ScanJob {
        file: std::fs::File::open(corpus)?,
        direct: None,
        size,
        disk: "disk0".into(),
        replica: vec![0; size.div_ceil(gateway::journal::BLOCK_SIZE) as usize * 16],
        compress: true,
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ScannedBody>(1);
    let (_spare_tx, spare) = crossbeam_channel::bounded(1);
    let collect = std::thread::spawn(move || {
        let mut out = Vec::new();
        while let Some(b) = rx.blocking_recv() {
            out.push(b.body);
        }
        out
    });
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    scan(&job, workers, &tx, &spare, &|_| {})?;
    drop(tx);
    Ok(collect.join().expect("collector"))
}

/// The appliance alone: a fresh appliance ingests `batches` (an agent's packed first sync,
/// prepared in memory beforehand, so the agent's reading, hashing and compression are not
/// measured) sent over HTTPS with the agent's batches in flight, until the last segment is
/// durable. Returns (seconds, appliance CPU seconds).
fn appliance_run(bin: &Path, batches: &[bytes::Bytes], size: u64, dir: &Path) -> anyhow::Result<(Duration, f64)> {
    use futures::stream::{self, StreamExt};
    let (app, _) = Appliance::start(bin, dir, BENCH_CONFIG)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let (started, cpu_before, last) = runtime.block_on(async {
        let agent = gateway::agent::Agent::connect(gateway::agent::AgentConfig {
            server: format!("https://{}", app.addr),
            ca_pem: Some(std::fs::read(&app.cert)?),
            passphrase: "bench-passphrase".into(),
            machine: "bench".into(),
            retry_for: Duration::from_secs(60),
            compress: true,
        })
        .await?;
        agent.register_disk("disk0", size).await?;
        let cpu_before = process_cpu(app.server.id());
        let started = Instant::now();
        let acks: Vec<_> = stream::iter(batches)
            .map(|b| agent.send_body(b))
            .buffer_unordered(gateway::agent::IN_FLIGHT)
            .collect()
            .await;
        let mut last = 0;
        for ack in acks {
            last = last.max(ack?.seqs.get("disk0").copied().unwrap_or(0));
        }
        anyhow::Ok((started, cpu_before, last))
    })?;
    wait_for_segments(dir, last, started)?;
    let took = started.elapsed();
    let cpu = process_cpu(app.server.id()) - cpu_before;
    Ok((took, cpu))
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
    let (corpus, label) = match &args.corpus_file {
        Some(file) => (file.clone(), file.display().to_string()),
        None => {
            let (name, label) = match args.corpus {
                // The simple corpus keeps its old name: earlier runs' files stay valid.
                CorpusKind::Simple => (format!("corpus-{}MiB.img", args.size_mib), "simple mixed"),
                CorpusKind::Realistic => (format!("realistic-v1-{}MiB.img", args.size_mib), "realistic mixed"),
            };
            let corpus = args.workdir.join(name);
            let size = args.size_mib << 20;
            if std::fs::metadata(&corpus).map(|m| m.len()).ok() != Some(size) {
                eprintln!(
                    "generating {} MiB {label} corpus at {}",
                    args.size_mib,
                    corpus.display()
                );
                match args.corpus {
                    CorpusKind::Simple => gateway::testkit::make_disk(&corpus, size, 42)?,
                    CorpusKind::Realistic => corpus::make_realistic_disk(&corpus, size, 42)?,
                }
            }
            (corpus, format!("{} MiB {label}", args.size_mib))
        }
    };
    let size = std::fs::metadata(&corpus)
        .with_context(|| format!("corpus {}", corpus.display()))?
        .len();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let (mut e2e, mut ack, mut restic, mut limit1) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut zstd1 = Vec::new();
    let (mut agent_cpu, mut server_cpu, mut restic_cpu, mut limit_cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let gib = size as f64 / (1u64 << 30) as f64;
    let mut ratio = 0.0;
    let batches = packed_batches(&corpus)?;
    let (mut alone, mut alone_cpu) = (Vec::new(), Vec::new());
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
        let (t, cpu) = appliance_run(&bin, &batches, size, &dir.path().join("appliance-alone"))?;
        alone.push(mbps(size, t));
        alone_cpu.push(cpu / gib);
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
        zstd1.push(mbps(size, z));
        eprintln!(
            "run {}: lifeboat e2e {:.0} MB/s (ack {:.0}), appliance alone {:.0} MB/s, restic {:.0} MB/s, zstd+aes {:.0} MB/s/core; CPU s/GiB: agent {:.2}, server {:.2} (alone {:.2}), restic {:.2}, zstd+aes {:.2}",
            run + 1,
            e2e[run],
            ack[run],
            alone[run],
            restic[run],
            limit1[run],
            agent_cpu[run],
            server_cpu[run],
            alone_cpu[run],
            restic_cpu[run],
            limit_cpu[run]
        );
    }
    let (e2e, ack, restic, limit1) = (median(e2e), median(ack), median(restic), median(limit1));
    let zstd1 = median(zstd1);
    let (alone, alone_cpu) = (median(alone), median(alone_cpu));
    let (agent_cpu, server_cpu, restic_cpu, limit_cpu) = (
        median(agent_cpu),
        median(server_cpu),
        median(restic_cpu),
        median(limit_cpu),
    );
    let limit = limit1 * cores as f64;
    println!(
        "corpus: {label}, zstd -1 ratio {ratio:.2} at {zstd1:.0} MB/s per core; {cores} cores; medians of {} runs",
        args.runs
    );
    println!("  lifeboat end to end (agent → durable segments)  {e2e:>7.0} MB/s");
    println!("  lifeboat durable ack                            {ack:>7.0} MB/s");
    println!("  appliance alone (agent's packed batches, built  {alone:>7.0} MB/s");
    println!("    beforehand, sent over HTTPS → durable segments)");
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
        "  ratio appliance alone / zstd+AES limit           {:>7.0}%",
        100.0 * alone / limit
    );
    println!(
        "  CPU s/GiB: lifeboat agent {agent_cpu:.2} + server {server_cpu:.2} = {:.2} (appliance alone {alone_cpu:.2}); restic {restic_cpu:.2}; zstd+AES {limit_cpu:.2}",
        agent_cpu + server_cpu
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({"corpus": label, "bytes": size, "runs": args.runs, "cores": cores,
                "zstd_ratio": ratio, "zstd_per_core_mbps": zstd1,
                "lifeboat_e2e_mbps": e2e, "lifeboat_ack_mbps": ack, "restic_mbps": restic,
                "appliance_alone_mbps": alone, "appliance_alone_cpu_s_per_gib": alone_cpu,
                "zstd_aes_per_core_mbps": limit1, "zstd_aes_limit_mbps": limit,
                "ratio_vs_restic": e2e / restic, "fraction_of_limit": e2e / limit,
                "agent_cpu_s_per_gib": agent_cpu, "server_cpu_s_per_gib": server_cpu,
                "restic_cpu_s_per_gib": restic_cpu, "zstd_aes_cpu_s_per_gib": limit_cpu})
        );
    }
    Ok(())
}
