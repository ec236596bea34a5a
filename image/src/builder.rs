//! `lifeboat-image build`: the stages that make the raw disk, each shown with a progress
//! indicator (a plain line per stage when stderr is not a terminal).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cpio::{Node, Tree};
use crate::kernel;

/// Kernel command line: VGA console for the vSphere console, serial for logs (the last one is
/// `/dev/console`); reboot 10 s after a panic.
pub const CMDLINE: &str = "console=tty0 console=ttyS0,115200n8 panic=10 loglevel=4";
pub const SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";

/// Inputs of a build. Equal inputs give an equal image.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub out: PathBuf,
    /// Debian kernel package; found by [`kernel::find_package`] when `None`.
    pub kernel_deb: Option<PathBuf>,
    /// The release `lifeboat` binary.
    pub lifeboat: PathBuf,
    /// The init put at `/init` (the builder's own executable).
    pub init: PathBuf,
    pub busybox: PathBuf,
    pub mke2fs: PathBuf,
    pub systemd_boot: PathBuf,
    pub size_mib: u64,
    pub cmdline: String,
    pub zstd_level: i32,
    pub progress: bool,
}

impl BuildOptions {
    /// Defaults for everything but the output and the lifeboat binary.
    pub fn new(out: PathBuf, lifeboat: PathBuf) -> anyhow::Result<Self> {
        Ok(Self {
            out,
            kernel_deb: None,
            lifeboat,
            init: std::env::current_exe().context("locating the builder's own executable")?,
            busybox: PathBuf::from("/bin/busybox"),
            mke2fs: PathBuf::from("/sbin/mke2fs"),
            systemd_boot: PathBuf::from(SYSTEMD_BOOT),
            size_mib: 128,
            cmdline: CMDLINE.into(),
            zstd_level: 12,
            progress: true,
        })
    }
}

/// What a build made.
#[derive(Debug, Clone)]
pub struct BuildReport {
    pub out: PathBuf,
    pub size: u64,
    pub kernel_version: String,
    pub kernel_package: PathBuf,
    pub modules: Vec<String>,
    pub initrd_bytes: u64,
    pub initrd_unpacked: u64,
    pub sha256: String,
    pub stages: Vec<(String, Duration)>,
    pub elapsed: Duration,
}

struct Stages {
    n: usize,
    total: usize,
    progress: bool,
    done: Vec<(String, Duration)>,
}

impl Stages {
    fn start(&mut self, name: &str, len: Option<u64>) -> (ProgressBar, Instant) {
        self.n += 1;
        let prefix = format!("[{}/{}]", self.n, self.total);
        let pb = match len {
            Some(l) => ProgressBar::new(l).with_style(
                ProgressStyle::with_template("{prefix} {msg:<34} [{bar:30}] {bytes}/{total_bytes}")
                    .expect("template")
                    .progress_chars("=> "),
            ),
            None => ProgressBar::new_spinner()
                .with_style(ProgressStyle::with_template("{prefix} {msg:<34} {spinner}").expect("template")),
        };
        let visible = self.progress && console_is_tty();
        pb.set_draw_target(if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        pb.set_prefix(prefix.clone());
        pb.set_message(name.to_string());
        if len.is_none() {
            pb.enable_steady_tick(Duration::from_millis(120));
        }
        if self.progress && !visible {
            eprintln!("{prefix} {name} ...");
        }
        (pb, Instant::now())
    }

    fn finish(&mut self, pb: ProgressBar, t: Instant, name: &str, detail: &str) {
        let d = t.elapsed();
        pb.finish_and_clear();
        if self.progress {
            eprintln!(
                "[{}/{}] {name}: {detail} ({:.1} s)",
                self.n,
                self.total,
                d.as_secs_f64()
            );
        }
        self.done.push((name.to_string(), d));
    }
}

fn console_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// Strips symbols (the release profile keeps line tables); falls back to the file as is.
fn stripped(path: &Path) -> anyhow::Result<Vec<u8>> {
    let tmp = tempfile_path("strip");
    let ok = Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&tmp)
        .arg(path)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let data = if ok {
        std::fs::read(&tmp)?
    } else {
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
    };
    let _ = std::fs::remove_file(&tmp);
    Ok(data)
}

fn tempfile_path(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "lifeboat-image-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The shared libraries `ldd` lists for `bin` (absolute paths as the loader looks them up).
pub fn shared_libraries(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd (libc-bin) to list the shared libraries")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("{}: shared library missing: {line}", bin.display());
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Busybox applets the init and the DHCP hook use, plus a few for an operator's inspection.
const APPLETS: &[&str] = &[
    "sh", "ip", "udhcpc", "mount", "umount", "cat", "ls", "ps", "dmesg", "echo", "mkdir", "rm", "sleep", "df", "free",
    "ifconfig", "route", "ping", "top", "uptime", "hostname", "grep", "sed", "sync",
];

/// The initramfs tree: `/init`, lifeboat, busybox, mke2fs, their libraries, the modules.
pub fn initramfs_tree(opts: &BuildOptions, k: &kernel::Kernel) -> anyhow::Result<Tree> {
    let mut t = Tree::new();
    for d in ["dev", "proc", "sys", "run", "tmp", "data", "etc", "mnt", "var", "root"] {
        t.add(d, Node::Dir);
    }
    t.add("dev/console", Node::CharDev(5, 1));
    t.add("dev/null", Node::CharDev(1, 3));
    t.add("dev/ttyS0", Node::CharDev(4, 64));
    t.add("dev/tty0", Node::CharDev(4, 0));
    t.add("var/run", Node::Symlink("/run".into()));

    let need = |p: &Path, what: &str, hint: &str| -> anyhow::Result<()> {
        if !p.is_file() {
            bail!("{what} not found at {}: {hint}", p.display());
        }
        Ok(())
    };
    need(
        &opts.lifeboat,
        "the lifeboat binary",
        "build it with `cargo build --release -p appliance` or pass --lifeboat",
    )?;
    need(&opts.init, "the init", "pass --init")?;
    need(&opts.busybox, "busybox", "install busybox-static (.ci/setup does)")?;
    need(&opts.mke2fs, "mke2fs", "install e2fsprogs (.ci/setup does)")?;

    t.file("init", stripped(&opts.init)?, 0o755);
    t.file("usr/bin/lifeboat", stripped(&opts.lifeboat)?, 0o755);
    let bb = std::fs::read(&opts.busybox)?;
    if !shared_libraries(&opts.busybox)?.is_empty() {
        bail!(
            "{} is dynamically linked: install busybox-static (.ci/setup does) or pass --busybox",
            opts.busybox.display()
        );
    }
    t.file("bin/busybox", bb, 0o755);
    for a in APPLETS {
        t.add(&format!("bin/{a}"), Node::Symlink("busybox".into()));
    }
    t.file("sbin/mke2fs", stripped(&opts.mke2fs)?, 0o755);
    t.add("sbin/mkfs.ext4", Node::Symlink("mke2fs".into()));
    if let Ok(conf) = std::fs::read("/etc/mke2fs.conf") {
        t.file("etc/mke2fs.conf", conf, 0o644);
    }
    for bin in [&opts.lifeboat, &opts.init, &opts.mke2fs] {
        for lib in shared_libraries(bin)? {
            let rel = lib.to_string_lossy().trim_start_matches('/').to_string();
            if !t.contains(&rel) {
                let data = std::fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?;
                t.file(&rel, data, 0o755);
            }
        }
    }
    if let Ok(ca) = std::fs::read("/etc/ssl/certs/ca-certificates.crt") {
        t.file("etc/ssl/certs/ca-certificates.crt", ca, 0o644);
    }
    let mut list = String::new();
    for m in &k.modules {
        t.file(&format!("lib/modules/lifeboat/{}", m.file), m.data.clone(), 0o644);
        list.push_str(&m.file);
        list.push('\n');
    }
    t.file("lib/modules/lifeboat/load.list", list.into_bytes(), 0o644);
    t.file(
        "etc/lifeboat-release",
        format!("LIFEBOAT_VERSION={}\nKERNEL={}\n", env!("CARGO_PKG_VERSION"), k.version).into_bytes(),
        0o644,
    );
    Ok(t)
}

/// Builds the raw disk image.
pub fn build(opts: &BuildOptions) -> anyhow::Result<BuildReport> {
    let t0 = Instant::now();
    let mut st = Stages {
        n: 0,
        total: 4,
        progress: opts.progress,
        done: Vec::new(),
    };
    anyhow::ensure!(
        opts.size_mib >= 64,
        "--size-mib {} is below the 64 MiB minimum",
        opts.size_mib
    );

    let (pb, t) = st.start("Unpacking the kernel package", None);
    let deb = kernel::find_package(opts.kernel_deb.as_deref())?;
    let k = kernel::load(&deb, kernel::WANTED_MODULES)?;
    st.finish(
        pb,
        t,
        "Unpacking the kernel package",
        &format!("{} ({} modules)", k.version, k.modules.len()),
    );

    let (pb, t) = st.start("Collecting the appliance files", None);
    let tree = initramfs_tree(opts, &k)?;
    let raw = tree.to_newc();
    st.finish(
        pb,
        t,
        "Collecting the appliance files",
        &format!("{} entries, {} MiB", tree.paths().count(), raw.len() >> 20),
    );

    let (pb, t) = st.start("Compressing the initramfs (zstd)", Some(raw.len() as u64));
    let mut enc = zstd::stream::Encoder::new(Vec::new(), opts.zstd_level)?;
    // The kernel's decompressor wants a content size-free, single-frame stream with checksums.
    enc.include_checksum(true)?;
    for chunk in raw.chunks(1 << 20) {
        enc.write_all(chunk)?;
        pb.inc(chunk.len() as u64);
    }
    let initrd = enc.finish()?;
    st.finish(
        pb,
        t,
        "Compressing the initramfs (zstd)",
        &format!("{} MiB", initrd.len() >> 20),
    );

    let (pb, t) = st.start("Writing GPT and the EFI partition", Some(opts.size_mib << 20));
    let boot = std::fs::read(&opts.systemd_boot).with_context(|| {
        format!(
            "reading systemd-boot at {}: install systemd-boot-efi (.ci/setup does)",
            opts.systemd_boot.display()
        )
    })?;
    let files = vec![
        ("EFI/BOOT/BOOTX64.EFI".to_string(), boot),
        (
            "loader/loader.conf".to_string(),
            b"timeout 0\ndefault lifeboat.conf\neditor no\nconsole-mode keep\n".to_vec(),
        ),
        (
            "loader/entries/lifeboat.conf".to_string(),
            format!(
                "title Lifeboat appliance {}\nversion {}\nlinux /lifeboat/vmlinuz\ninitrd /lifeboat/initrd.img\noptions {}\n",
                env!("CARGO_PKG_VERSION"),
                k.version,
                opts.cmdline
            )
            .into_bytes(),
        ),
        ("lifeboat/vmlinuz".to_string(), k.vmlinuz.clone()),
        ("lifeboat/initrd.img".to_string(), initrd.clone()),
    ];
    let size = opts.size_mib << 20;
    let needed: u64 = files.iter().map(|f| f.1.len() as u64).sum::<u64>() + (4 << 20);
    if needed > size {
        bail!(
            "the boot files need {} MiB but the disk is {} MiB: raise --size-mib",
            needed >> 20,
            opts.size_mib
        );
    }
    if let Some(dir) = opts.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = opts.out.with_extension("img.partial");
    {
        let f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = ProgressWriter {
            inner: std::io::BufWriter::with_capacity(1 << 20, f),
            pb: pb.clone(),
            pos: 0,
        };
        crate::disk::write_disk(&mut w, size, &files)?;
        w.inner.flush()?;
        w.inner.get_ref().sync_all()?;
    }
    std::fs::rename(&tmp, &opts.out)?;
    let sha256 = sha256_file(&opts.out)?;
    st.finish(
        pb,
        t,
        "Writing GPT and the EFI partition",
        &format!("{} ({} MiB)", opts.out.display(), opts.size_mib),
    );

    Ok(BuildReport {
        out: opts.out.clone(),
        size,
        kernel_version: k.version.clone(),
        kernel_package: k.package.clone(),
        modules: k.modules.iter().map(|m| m.name.clone()).collect(),
        initrd_bytes: initrd.len() as u64,
        initrd_unpacked: raw.len() as u64,
        sha256,
        stages: st.done,
        elapsed: t0.elapsed(),
    })
}

fn sha256_file(p: &Path) -> anyhow::Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut std::io::BufReader::new(std::fs::File::open(p)?), &mut h)?;
    Ok(hex::encode(h.finalize()))
}

struct ProgressWriter<W> {
    inner: W,
    pb: ProgressBar,
    pos: u64,
}

impl<W: Write> Write for ProgressWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.pos += n as u64;
        self.pb.set_position(self.pos);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write + std::io::Seek> std::io::Seek for ProgressWriter<W> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A build with stand-ins for lifeboat and the init (the real kernel package is required).
    fn small_build(dir: &Path, name: &str) -> BuildReport {
        let mut o = BuildOptions::new(dir.join(name), PathBuf::from("/bin/true")).unwrap();
        o.init = PathBuf::from("/bin/true");
        o.size_mib = 64;
        o.zstd_level = 3;
        o.progress = false;
        build(&o).unwrap_or_else(|e| panic!("image build: {e:#}"))
    }

    #[test]
    fn same_inputs_give_the_same_image_bytes_and_the_esp_boots_systemd_boot() {
        let dir = tempfile::tempdir().unwrap();
        let a = small_build(dir.path(), "a.img");
        let b = small_build(dir.path(), "b.img");
        assert_eq!(a.sha256, b.sha256, "two builds from the same inputs differ");
        assert_eq!(a.size, 64 << 20);
        for m in [
            "vmxnet3",
            "vmw_pvscsi",
            "ahci",
            "virtio_net",
            "virtio_blk",
            "e1000",
            "sd_mod",
            "sr_mod",
            "isofs",
            "ext4",
        ] {
            assert!(
                a.modules.iter().any(|x| x == m),
                "module {m} missing from {:?}",
                a.modules
            );
        }
        // Dependencies come before the modules that need them.
        let pos = |m: &str| a.modules.iter().position(|x| x == m).unwrap();
        assert!(pos("jbd2") < pos("ext4") && pos("libata") < pos("ahci") && pos("scsi_mod") < pos("sd_mod"));

        let disk = std::fs::read(&a.out).unwrap();
        let (s, e) = crate::disk::esp_range(&disk).unwrap();
        let fs = fatfs::FileSystem::new(
            std::io::Cursor::new(disk[s as usize..e as usize].to_vec()),
            fatfs::FsOptions::new(),
        )
        .unwrap();
        let read = |p: &str| {
            let mut v = Vec::new();
            fs.root_dir().open_file(p).unwrap().read_to_end(&mut v).unwrap();
            v
        };
        assert_eq!(read("EFI/BOOT/BOOTX64.EFI"), std::fs::read(SYSTEMD_BOOT).unwrap());
        let entry = String::from_utf8(read("loader/entries/lifeboat.conf")).unwrap();
        assert!(
            entry.contains("linux /lifeboat/vmlinuz") && entry.contains("console=ttyS0"),
            "{entry}"
        );
        assert_eq!(&read("lifeboat/vmlinuz")[0x202..0x206], b"HdrS", "a bzImage");
        let initrd = zstd::decode_all(&read("lifeboat/initrd.img")[..]).unwrap();
        let text = String::from_utf8_lossy(&initrd);
        for p in [
            "init\0",
            "usr/bin/lifeboat\0",
            "bin/busybox\0",
            "sbin/mke2fs\0",
            "lib/modules/lifeboat/load.list\0",
        ] {
            assert!(text.contains(p), "initramfs lacks {p}");
        }
    }

    #[test]
    fn a_missing_lifeboat_binary_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = BuildOptions::new(dir.path().join("x.img"), PathBuf::from("/nonexistent/lifeboat")).unwrap();
        o.progress = false;
        let e = format!("{:#}", build(&o).unwrap_err());
        assert!(
            e.contains("the lifeboat binary not found") && e.contains("cargo build --release -p appliance"),
            "{e}"
        );
    }

    #[test]
    fn ldd_lists_glibc_for_a_dynamic_binary_and_nothing_for_busybox() {
        let libs = shared_libraries(Path::new("/bin/true")).unwrap();
        assert!(libs.iter().any(|l| l.to_string_lossy().contains("libc.so")), "{libs:?}");
        assert!(shared_libraries(Path::new("/bin/busybox")).unwrap().is_empty());
    }
}
