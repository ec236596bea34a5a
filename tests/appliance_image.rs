//! The appliance as operators get it: `cargo run --release -p ova -- build` makes the OVA; its
//! VMDK, converted back with qemu-img, boots under qemu (TCG, UEFI/OVMF, AHCI disks) with an ISO
//! holding `ovf-env.xml` (passphrase, Azurite blob storage, one bad property); within a bounded
//! time `/metrics` answers on the forwarded port, the console banner's TLS fingerprint matches
//! the served certificate, and an agent replicates a small disk that replays byte for byte from
//! blob storage. A second boot gets bad inputs (broken ovf-env.xml, a too-small cache disk) and
//! must still come up and say what is wrong. The serial console log is kept on failure.
//!
//! Every tool is required (.ci/setup installs them): a missing one fails the test.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

/// One qemu at a time: the machine has 2 cores.
static QEMU_LOCK: Mutex<()> = Mutex::new(());
const IMAGE_CACHE: &str = "/var/cache/lifeboat-image";
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

fn tool(name: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    for dir in ["/usr/sbin", "/sbin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is required for the appliance image test: run .ci/setup");
}

/// qemu-system-x86_64 from PATH, or the copy .ci/setup unpacks; with its firmware folder and
/// module folder.
fn qemu() -> (PathBuf, Option<PathBuf>, Option<PathBuf>) {
    if let Some(p) = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join("qemu-system-x86_64"))
        .find(|p| p.is_file())
    {
        return (p, None, None);
    }
    let root = Path::new(IMAGE_CACHE).join("qemu");
    let bin = root.join("usr/bin/qemu-system-x86_64");
    assert!(
        bin.is_file(),
        "qemu-system-x86_64 is required: run .ci/setup (it unpacks Debian's qemu-system-x86 into {})",
        root.display()
    );
    (
        bin,
        Some(root.join("usr/share/qemu")),
        Some(root.join("usr/lib/x86_64-linux-gnu/qemu")),
    )
}

fn ovmf() -> PathBuf {
    let p = PathBuf::from("/usr/share/ovmf/OVMF.fd");
    assert!(
        p.is_file(),
        "OVMF firmware missing at {}: run .ci/setup (package ovmf)",
        p.display()
    );
    p
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the OVA the way operators do; returns the OVA path and the build's wall time.
fn build_ova(out: &Path) -> (PathBuf, Duration) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let t = Instant::now();
    run_ok(
        Command::new(env!("CARGO"))
            .current_dir(&repo)
            .args(["run", "--release", "-q", "-p", "ova", "--", "build", "--quiet", "--out"])
            .arg(out)
            .arg("--lifeboat")
            .arg(lifeboat_bin()),
    );
    let ova = out.join("lifeboat.ova");
    assert!(ova.is_file(), "{} was not written", ova.display());
    (ova, t.elapsed())
}

/// Unpacks the OVA, checks member order, manifest and schema, converts the VMDK to raw.
fn unpack_and_convert(ova: &Path, dir: &Path) -> PathBuf {
    let listing = run_ok(Command::new(tool("tar")).arg("-tf").arg(ova));
    let names: Vec<&str> = listing.lines().collect();
    assert_eq!(
        names,
        ["lifeboat.ovf", "lifeboat.mf", "lifeboat-system.vmdk"],
        "OVA member order"
    );
    run_ok(Command::new(tool("tar")).arg("-xf").arg(ova).arg("-C").arg(dir));
    let mf = std::fs::read_to_string(dir.join("lifeboat.mf")).unwrap();
    for line in mf.lines() {
        let (name, hexd) = line
            .strip_prefix("SHA256(")
            .and_then(|r| r.split_once(")= "))
            .unwrap_or_else(|| panic!("manifest line {line:?}"));
        use sha2::Digest;
        let got = hex::encode(sha2::Sha256::digest(std::fs::read(dir.join(name)).unwrap()));
        assert_eq!(got, hexd, "manifest digest of {name}");
    }
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/ovf-schema/ovf-envelope.xsd");
    assert!(schema.is_file(), "DMTF schema missing at {}", schema.display());
    run_ok(
        Command::new(tool("xmllint"))
            .args(["--noout", "--schema"])
            .arg(&schema)
            .arg(dir.join("lifeboat.ovf")),
    );
    let vmdk = dir.join("lifeboat-system.vmdk");
    let check = Command::new(tool("qemu-img")).arg("check").arg(&vmdk).output().unwrap();
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let raw = dir.join("system.raw");
    run_ok(
        Command::new(tool("qemu-img"))
            .args(["convert", "-O", "raw"])
            .arg(&vmdk)
            .arg(&raw),
    );
    // The converted disk equals the image the build wrote.
    let built = Path::new(ova).parent().unwrap().join("work/lifeboat.img");
    run_ok(
        Command::new(tool("qemu-img"))
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&built)
            .arg(&raw),
    );
    raw
}

fn ovf_env(props: &[(&str, String)]) -> String {
    let mut s = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Environment xmlns=\"http://schemas.dmtf.org/ovf/environment/1\" \
         xmlns:oe=\"http://schemas.dmtf.org/ovf/environment/1\" oe:id=\"\">\n  <PlatformSection><Kind>qemu</Kind></PlatformSection>\n  <PropertySection>\n",
    );
    for (k, v) in props {
        s.push_str(&format!("    <Property oe:key=\"{k}\" oe:value=\"{v}\"/>\n"));
    }
    s.push_str("  </PropertySection>\n</Environment>\n");
    s
}

fn make_iso(dir: &Path, xml: &str) -> PathBuf {
    let src = dir.join("iso-src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("ovf-env.xml"), xml).unwrap();
    let iso = dir.join("ovf-env.iso");
    run_ok(
        Command::new(tool("genisoimage"))
            .args(["-quiet", "-r", "-J", "-V", "OVF ENV", "-o"])
            .arg(&iso)
            .arg(&src),
    );
    iso
}

/// A booted appliance VM; killed when dropped, its serial log kept when the test fails.
struct Vm {
    child: Child,
    serial: PathBuf,
    started: Instant,
    metrics_port: u16,
    replication_port: u16,
    management_port: u16,
}

impl Vm {
    fn boot(dir: &Path, system: &Path, data: &Path, iso: &Path) -> Self {
        let (bin, fw, modules) = qemu();
        let serial = dir.join("serial.log");
        let (metrics_port, replication_port, management_port) = (free_port(), free_port(), free_port());
        let mut c = Command::new(bin);
        if let Some(fw) = fw {
            c.arg("-L").arg(fw);
        }
        if let Some(m) = modules {
            c.env("QEMU_MODULE_DIR", m);
        }
        let drive = |id: &str, p: &Path, extra: &str| format!("if=none,id={id},file={},format=raw{extra}", p.display());
        c.args(["-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2"])
            .arg("-bios")
            .arg(ovmf())
            .args(["-display", "none", "-vga", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args(["-device", "ahci,id=ahci"])
            .args(["-drive", &drive("sys", system, ""), "-device", "ide-hd,drive=sys,bus=ahci.0"])
            .args(["-drive", &drive("data", data, ""), "-device", "ide-hd,drive=data,bus=ahci.1"])
            .args(["-drive", &drive("cd", iso, ",media=cdrom,readonly=on"), "-device", "ide-cd,drive=cd,bus=ahci.2"])
            .args([
                "-netdev",
                &format!(
                    "user,id=n0,hostfwd=tcp:127.0.0.1:{metrics_port}-:9464,hostfwd=tcp:127.0.0.1:{replication_port}-:9443,hostfwd=tcp:127.0.0.1:{management_port}-:443"
                ),
                "-device",
                "e1000,netdev=n0,romfile=",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let child = c.spawn().expect("start qemu-system-x86_64");
        Self {
            child,
            serial,
            started,
            metrics_port,
            replication_port,
            management_port,
        }
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).replace('\r', "")
    }

    /// Waits until `/metrics` answers over the forwarded port; the time since qemu started.
    fn wait_metrics(&mut self) -> Duration {
        let deadline = self.started + BOOT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("qemu exited ({status}): {err}");
            }
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)) {
                use std::io::Write;
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: appliance\r\n\r\n");
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if out.starts_with("HTTP/1.") && out.contains(" 200") {
                    return self.started.elapsed();
                }
            }
            assert!(
                Instant::now() < deadline,
                "/metrics did not answer within {BOOT_TIMEOUT:?} of qemu starting"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits for `needle` on the console (the banner comes right after the ready line).
    fn wait_console(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.console();
            if c.contains(needle) {
                return c;
            }
            assert!(Instant::now() < deadline, "console never showed {needle:?}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let keep = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("appliance_image-serial-{}.log", std::process::id()));
            let _ = std::fs::copy(&self.serial, &keep);
            let c = self.console();
            let tail: Vec<&str> = c.lines().rev().take(60).collect();
            eprintln!(
                "---- serial console (kept at {}) last lines ----\n{}",
                keep.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

fn sparse(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// The certificate the appliance serves, as PEM (fetched without verification, then pinned).
fn fetch_cert(port: u16) -> String {
    let out = Command::new(tool("openssl"))
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-showcerts"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate from the appliance");
    let end = text[start..].find("-----END CERTIFICATE-----").unwrap() + start + "-----END CERTIFICATE-----".len();
    format!("{}\n", &text[start..end])
}

fn fingerprint_of_pem(pem: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn banner_fingerprint(console: &str) -> String {
    let mut lines = console.lines();
    lines
        .find(|l| l.contains("TLS certificate SHA-256 fingerprint"))
        .and_then(|_| lines.next())
        .map(|l| l.trim().to_string())
        .expect("banner with the fingerprint")
}

#[test]
fn the_ova_boots_and_an_agent_replicates_to_it() {
    let _one = QEMU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    let (ova, build_time) = build_ova(&dir.join("out"));
    let ova_size = std::fs::metadata(&ova).unwrap().len();
    assert!(
        ova_size < 150_000_000,
        "the OVA is {ova_size} bytes, over the 150 MB target"
    );
    let system = unpack_and_convert(&ova, dir);

    let azurite = Azurite::start(&dir.join("azurite"));
    let blob = azurite.create_container("lifeboat-appliance");
    let data = dir.join("cache.raw");
    sparse(&data, 2 << 30);
    let iso = make_iso(
        dir,
        &ovf_env(&[
            ("hostname", "lifeboat-e2e".into()),
            ("passphrase", PASSPHRASE.into()),
            ("blob_url", "az://lifeboat-appliance".into()),
            ("blob_account", AZURITE_ACCOUNT.into()),
            ("blob_secret", AZURITE_KEY.into()),
            // qemu's user network: the host's loopback is 10.0.2.2 from the guest.
            (
                "blob_endpoint",
                format!("http://10.0.2.2:{}/{AZURITE_ACCOUNT}", azurite.port),
            ),
            ("dns", "not-an-address".into()),
        ]),
    );

    let mut vm = Vm::boot(dir, &system, &data, &iso);
    let to_metrics = vm.wait_metrics();
    let console = vm.wait_console("is ready", Duration::from_secs(30));
    let console = {
        // The banner is a block of lines; give it a moment to be written out completely.
        std::thread::sleep(Duration::from_millis(500));
        let _ = console;
        vm.console()
    };
    eprintln!(
        "figures: OVA {:.1} MB, build (image + OVA) {:.1} s, qemu start -> /metrics {:.1} s",
        ova_size as f64 / 1e6,
        build_time.as_secs_f64(),
        to_metrics.as_secs_f64()
    );
    assert!(
        console.contains("formatting the blank cache disk"),
        "first boot formats the cache disk"
    );
    assert!(
        console.contains("PROBLEM: property dns: \"not-an-address\""),
        "the bad property is named on the console"
    );
    assert!(console.contains("Blob storage az://lifeboat-appliance"));
    let metrics = http_get(&format!("127.0.0.1:{}", vm.metrics_port), "/metrics");
    assert!(metrics.contains("# TYPE"), "metrics text: {metrics:.200}");

    // Pin the served certificate to the fingerprint the console printed.
    let pem = fetch_cert(vm.replication_port);
    assert_eq!(
        fingerprint_of_pem(&pem),
        banner_fingerprint(&console),
        "console fingerprint"
    );
    let mgmt_pem = fetch_cert(vm.management_port);
    assert_eq!(mgmt_pem, pem, "management (443) serves the same certificate");
    let ca = dir.join("appliance-cert.pem");
    std::fs::write(&ca, &pem).unwrap();
    let pass = dir.join("passphrase");
    std::fs::write(&pass, format!("{PASSPHRASE}\n")).unwrap();

    // An agent registers and replicates a small disk over the forwarded replication port.
    let disk = dir.join("vm-disk.img");
    make_disk(&disk, 16 * MIB, 7).unwrap();
    let out = Command::new(lifeboat_bin())
        .args([
            "agent",
            "sync",
            "--server",
            &format!("https://127.0.0.1:{}", vm.replication_port),
        ])
        .arg("--ca")
        .arg(&ca)
        .arg("--passphrase-file")
        .arg(&pass)
        .args(["--machine", "vm-e2e", "--disk"])
        .arg(&disk)
        .arg("--json")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "agent sync to the booted appliance failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: gateway::agent::SyncSummary = serde_json::from_slice(&out.stdout).unwrap();
    let seq = summary.disks[0].last_seq;
    assert!(summary.bytes_sent > 0 && seq > 0);

    // The appliance uploads to the Azurite blob store it was given; the disk replays exactly.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = blob.store();
        wait_uploaded(store.as_ref(), "vm-e2e", "disk0", seq, Duration::from_secs(120)).await;
        let replayed = replay(
            store.as_ref(),
            "vm-e2e",
            "disk0",
            16 * MIB,
            None,
            &dir.join("replayed.img"),
        )
        .await;
        assert_same_image(
            &replayed,
            &std::fs::read(&disk).unwrap(),
            "disk replayed from the appliance's blob storage",
        );
    });
    drop(vm);
}

#[test]
fn bad_inputs_are_named_and_the_appliance_still_comes_up() {
    // Build time: a missing kernel package is a clear error.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = Command::new(env!("CARGO"))
        .current_dir(&repo)
        .args(["run", "--release", "-q", "-p", "ova", "--", "build", "--quiet", "--out"])
        .arg(dir.join("bad"))
        .arg("--lifeboat")
        .arg(lifeboat_bin())
        .args([
            "--kernel-deb",
            "/nonexistent/linux-image-6.1.0-99-amd64_6.1.0_amd64.deb",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("kernel package") && err.contains("not found"),
        "missing kernel package error: {err}"
    );

    // Boot time: a broken ovf-env.xml and a 64 MiB cache disk.
    let _one = QEMU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (ova, _) = build_ova(&dir.join("out"));
    let system = unpack_and_convert(&ova, dir);
    let data = dir.join("tiny.raw");
    sparse(&data, 64 * MIB);
    let iso = make_iso(dir, "<Environment><PropertySection><Property oe:key=\"ip0\"");
    let mut vm = Vm::boot(dir, &system, &data, &iso);
    vm.wait_metrics();
    let console = vm.wait_console("is ready", Duration::from_secs(30));
    assert!(
        console.contains("PROBLEM: ovf-env.xml is not well-formed XML"),
        "unreadable properties are named"
    );
    assert!(
        console.contains("smaller than the 1 GiB minimum"),
        "the too-small cache disk is named"
    );
    assert!(console.contains("Data:        RAM (tmpfs)"));
    drop(vm);
}
