//! `lifeboat mount` end to end, through a real FUSE mount: an ext4 filesystem built with
//! `mkfs.ext4 -d` inside a GPT disk is replicated, changed and replicated again; through the
//! mount every point shows exactly the files (contents, sizes, modes, owners, symlinks) and the
//! raw disk it had; writes get EROFS, bad paths ENOENT; new points appear without remounting;
//! Ctrl-C and `fusermount3 -u` unmount cleanly even while a reader is busy; an unprivileged user
//! mounts (through the setuid fusermount3), reads and unmounts where /dev/fuse is open to it, and
//! is refused clearly where it is not.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use lifeboat_fs::pit::PointInfo;

const DISK_SIZE: u64 = 40 << 20;
const SECTOR: u64 = 512;
/// p1: the ext4 filesystem; p2: 1 MiB of raw bytes (shown as p2.img).
const P1: (u64, u64) = (2048, 2048 + (24 << 20) / SECTOR - 1);
const P2: (u64, u64) = (P1.1 + 1, P1.1 + (1 << 20) / SECTOR);

fn write_file(path: &Path, data: &[u8], mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The source tree of `version` (1 or 2) in `dir`.
fn make_tree(dir: &Path, version: u32) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    write_file(
        &dir.join("hello.txt"),
        format!("hello from version {version}\n").as_bytes(),
        0o644,
    );
    write_file(&dir.join("empty"), b"", 0o600);
    write_file(&dir.join("script.sh"), b"#!/bin/sh\necho hi\n", 0o755);
    write_file(&dir.join("medium.bin"), &pseudo_random(100_000 + 17, 1), 0o640);
    let mut big = pseudo_random(3 << 20, 2);
    if version == 2 {
        big[1_500_000..1_504_096].fill(0x5a);
        big.extend_from_slice(b"appended in v2");
    }
    write_file(&dir.join("big.bin"), &big, 0o644);
    write_file(&dir.join("sub/dir/nested.txt"), &pseudo_random(10_000, 3), 0o400);
    std::fs::set_permissions(dir.join("sub/dir"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("hello.txt", dir.join("link")).unwrap();
    std::os::unix::fs::symlink("/etc/does-not-exist", dir.join("sub/dangling")).unwrap();
    if version == 1 {
        write_file(&dir.join("only-in-v1.txt"), b"deleted later\n", 0o644);
    } else {
        write_file(&dir.join("only-in-v2.txt"), b"added later\n", 0o644);
        std::fs::set_permissions(dir.join("medium.bin"), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// A tiny GPT writer (protective MBR, both headers, both entry arrays), independent of the
/// mount's parser.
fn write_gpt(disk: &mut [u8], parts: &[(u64, u64)]) {
    let sectors = disk.len() as u64 / SECTOR;
    disk[446 + 4] = 0xee;
    disk[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    disk[446 + 12..446 + 16].copy_from_slice(&((sectors - 1) as u32).to_le_bytes());
    disk[510] = 0x55;
    disk[511] = 0xaa;
    let mut entries = vec![0u8; 128 * 128];
    let linux_fs: [u8; 16] = [
        0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4,
    ];
    for (i, &(first, last)) in parts.iter().enumerate() {
        let e = &mut entries[i * 128..(i + 1) * 128];
        e[0..16].copy_from_slice(&linux_fs);
        e[16..32].copy_from_slice(&pseudo_random(16, 100 + i as u64));
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&last.to_le_bytes());
    }
    let entries_crc = crc32fast::hash(&entries);
    let header = |current: u64, backup: u64, entries_lba: u64| {
        let mut h = vec![0u8; 92];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&current.to_le_bytes());
        h[32..40].copy_from_slice(&backup.to_le_bytes());
        h[40..48].copy_from_slice(&34u64.to_le_bytes());
        h[48..56].copy_from_slice(&(sectors - 34).to_le_bytes());
        h[56..72].copy_from_slice(&pseudo_random(16, 99));
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32fast::hash(&h);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    };
    disk[512..604].copy_from_slice(&header(1, sectors - 1, 2));
    disk[1024..1024 + entries.len()].copy_from_slice(&entries);
    let backup_entries = ((sectors - 33) * SECTOR) as usize;
    disk[backup_entries..backup_entries + entries.len()].copy_from_slice(&entries);
    let b = ((sectors - 1) * SECTOR) as usize;
    disk[b..b + 92].copy_from_slice(&header(sectors - 1, 1, sectors - 33));
}

/// Commits a new block of hello.txt to the journal of `fs` without applying it (the filesystem
/// then needs recovery, as a crash-consistent copy of a mounted one does) and changes the tree to
/// match: the mount must replay the journal (through `ext4-view`) to show the new text.
fn journal_hello(scratch: &Path, tree: &Path, fs: &Path) {
    let fs = fs.to_str().unwrap();
    let out = tool("debugfs", &["-R", "bmap /hello.txt 0", fs]);
    let block: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("bmap output");
    let hello = tree.join("hello.txt");
    let old = std::fs::read(&hello).unwrap();
    let new = String::from_utf8(old).unwrap().to_uppercase().into_bytes();
    let mut data = new.clone();
    data.resize(4096, 0);
    let (blk, cmds) = (scratch.join("journal-block"), scratch.join("journal-cmds"));
    std::fs::write(&blk, &data).unwrap();
    std::fs::write(&cmds, format!("jo -c -v 3\njw -b {block} {}\njc\n", blk.display())).unwrap();
    tool("debugfs", &["-w", "-f", cmds.to_str().unwrap(), fs]);
    let out = tool("dumpe2fs", &["-h", fs]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("needs_recovery"),
        "journal not written"
    );
    let mtime = std::fs::metadata(&hello).unwrap().modified().unwrap();
    std::fs::write(&hello, &new).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&hello)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
}

/// Builds the disk of `version`: GPT, ext4 of the tree in p1, raw bytes in p2. Version 2 needs
/// journal recovery, which the mount leaves to `ext4-view` (version 1 is read by inode number):
/// both readers are checked.
fn make_disk(scratch: &Path, tree: &Path, disk: &Path, version: u32) {
    make_tree(tree, version);
    let fs = scratch.join(format!("fs-v{version}.img"));
    let _ = std::fs::remove_file(&fs);
    let blocks = ((P1.1 - P1.0 + 1) * SECTOR / 1024).to_string();
    tool(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-L",
            "lifeboat-test",
            "-d",
            tree.to_str().unwrap(),
            fs.to_str().unwrap(),
            &format!("{blocks}k"),
        ],
    );
    if version == 2 {
        journal_hello(scratch, tree, &fs);
    }
    let fs_bytes = std::fs::read(&fs).unwrap();
    let mut d = vec![0u8; DISK_SIZE as usize];
    write_gpt(&mut d, &[P1, P2]);
    let p1 = (P1.0 * SECTOR) as usize;
    d[p1..p1 + fs_bytes.len()].copy_from_slice(&fs_bytes);
    let p2 = (P2.0 * SECTOR) as usize;
    d[p2..p2 + (1 << 20)].copy_from_slice(&pseudo_random(1 << 20, 40 + u64::from(version)));
    std::fs::write(disk, &d).unwrap();
}

/// The running `lifeboat mount`; killed and unmounted (lazily) when dropped so a failing test
/// never leaves a stale mount behind.
struct Mount {
    child: Option<Child>,
    dir: PathBuf,
}

impl Mount {
    fn start(app: &Appliance, dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut cmd = Command::new(lifeboat_bin());
        cmd.arg("mount").arg(dir).arg("--config").arg(&app.config);
        Self::spawn(cmd, dir)
    }

    /// Runs `cmd` (a `lifeboat mount` of `dir`) and waits for the mount to appear.
    fn spawn(mut cmd: Command, dir: &Path) -> Self {
        let child = cmd
            .env("RUST_LOG", "warn,lifeboat_fs=info")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start lifeboat mount");
        let m = Self {
            child: Some(child),
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !m.mounted() {
            assert!(
                Instant::now() < deadline,
                "lifeboat mount did not mount {}",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        m
    }

    fn mounted(&self) -> bool {
        self.mount_line().is_some()
    }

    /// The line of /proc/self/mounts for this mount.
    fn mount_line(&self) -> Option<String> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let canon = self.dir.canonicalize().unwrap_or(self.dir.clone());
        mounts
            .lines()
            .find(|l| l.split(' ').nth(1) == Some(canon.to_str().unwrap()) && l.contains("fuse"))
            .map(str::to_string)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
    }

    /// Waits for the process to exit by itself; its status.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "lifeboat mount did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.mounted() {
            let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(&self.dir).status();
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

fn wait_point(app: &Appliance, what: &str, pred: impl Fn(&PointInfo) -> bool) -> PointInfo {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let points = app.points("m1");
        if let Some(p) = points.iter().find(|p| p.readable && pred(p)) {
            return p.clone();
        }
        assert!(Instant::now() < deadline, "no readable {what} point: {points:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The directory name the mount gives `point` (among all readable points of m1).
fn point_dir(app: &Appliance, point: &PointInfo) -> String {
    let mut points: Vec<PointInfo> = app.points("m1").into_iter().filter(|p| p.readable).collect();
    points.sort_by_key(|p| (p.time_ms, p.id));
    let names = lifeboat_fs::fuse::names::unique_names(&points);
    let i = points.iter().position(|p| p.id == point.id).expect("point listed");
    names[i].clone()
}

fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// Checks that `mounted` shows exactly the tree `src` (contents, sizes, modes, owners, times,
/// symlink targets).
fn assert_same_tree(mounted: &Path, src: &Path, top: bool) {
    let mut want = entries(src);
    let got = entries(mounted);
    if top {
        want.insert("lost+found".into());
    }
    assert_eq!(got, want, "entries of {}", mounted.display());
    for name in want {
        if top && name == "lost+found" {
            continue;
        }
        let (m, s) = (mounted.join(&name), src.join(&name));
        let (mm, sm) = (
            std::fs::symlink_metadata(&m).unwrap(),
            std::fs::symlink_metadata(&s).unwrap(),
        );
        assert_eq!(
            mm.file_type().is_symlink(),
            sm.file_type().is_symlink(),
            "{}",
            m.display()
        );
        assert_eq!(mm.is_dir(), sm.is_dir(), "{}", m.display());
        assert_eq!(mm.mode() & 0o7777, sm.mode() & 0o7777, "mode of {}", m.display());
        assert_eq!((mm.uid(), mm.gid()), (sm.uid(), sm.gid()), "owner of {}", m.display());
        if sm.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&m).unwrap(),
                std::fs::read_link(&s).unwrap(),
                "{}",
                m.display()
            );
        } else if sm.is_dir() {
            assert_same_tree(&m, &s, false);
        } else {
            assert_eq!(mm.len(), sm.len(), "size of {}", m.display());
            assert_eq!(mm.mtime(), sm.mtime(), "mtime of {}", m.display());
            let (a, b) = (std::fs::read(&m).unwrap(), std::fs::read(&s).unwrap());
            assert!(a == b, "contents of {} differ", m.display());
        }
    }
}

fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

const EROFS: i32 = 30;
const ENOENT: i32 = 2;

#[tokio::test(flavor = "multi_thread")]
async fn points_browse_as_files_through_a_real_mount() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    eprintln!("test dir {}", root.display());
    let blob = BlobTarget::Local(root.join("blob"));
    let app = Appliance::start(
        &root.join("appliance"),
        &blob,
        "[policy]\ncrash_consistent_interval = \"2s\"\n",
    );
    let disk = root.join("disk0.raw");
    let (tree1, tree2) = (root.join("tree-v1"), root.join("tree-v2"));

    // Version 1, then a crash-consistent point covering it.
    make_disk(root, &tree1, &disk, 1);
    let disk_v1 = std::fs::read(&disk).unwrap();
    let s1 = app.sync("m1", &[&disk]);
    let acked1 = s1.disks[0].last_seq;
    let p1 = wait_point(&app, "crash-consistent", |p| {
        p.kind == "crash-consistent" && p.seqs["disk0"] >= acked1
    });

    // Version 2: files changed, added, removed; synced and bookmarked.
    make_disk(root, &tree2, &disk, 2);
    let disk_v2 = std::fs::read(&disk).unwrap();
    let s2 = app.sync("m1", &[&disk]);
    assert!(s2.disks[0].last_seq > acked1);
    let out = app
        .agent("bookmark", "m1")
        .args(["--label", "nightly", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bookmark: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p2 = wait_point(&app, "app-consistent", |p| {
        p.kind == "app-consistent" && p.label == "nightly"
    });
    assert!(p2.seqs["disk0"] >= s2.disks[0].last_seq);

    let mnt = root.join("mnt");
    let mut mount = Mount::start(&app, &mnt);
    assert_eq!(entries(&mnt), BTreeSet::from(["m1".to_string()]));
    // The appliance knows about the mount: the gauge and `lifeboat mounts` show it.
    let deadline = Instant::now() + Duration::from_secs(15);
    while app.metric("lifeboat_fuse_clients") != 1.0 {
        assert!(Instant::now() < deadline, "lifeboat_fuse_clients never reached 1");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = app.admin(&["mounts", "--json"]);
    assert!(out.status.success(), "mounts: {}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(
        listed[0]["mountpoint"].as_str().map(Path::new),
        Some(std::fs::canonicalize(&mnt).unwrap().as_path())
    );
    let (n1, n2) = (point_dir(&app, &p1), point_dir(&app, &p2));
    assert!(
        n1.ends_with("Z-crash") && n1.len() == "2026-11-22T10-05-00Z-crash".len(),
        "{n1}"
    );
    assert!(n2.ends_with("Z-app-nightly"), "{n2}");
    let machine = mnt.join("m1");
    let listed = entries(&machine);
    assert!(
        listed.contains(&n1) && listed.contains(&n2) && listed.contains("latest"),
        "{listed:?}"
    );
    let newest = {
        let mut ps: Vec<PointInfo> = app.points("m1").into_iter().filter(|p| p.readable).collect();
        ps.sort_by_key(|p| (p.time_ms, p.id));
        point_dir(&app, ps.last().unwrap())
    };
    assert_eq!(
        std::fs::read_link(machine.join("latest")).unwrap(),
        PathBuf::from(&newest)
    );

    for (name, tree, image) in [(&n1, &tree1, &disk_v1), (&n2, &tree2, &disk_v2)] {
        eprintln!("checking point {name}");
        let point = machine.join(name);
        assert_eq!(
            entries(&point),
            BTreeSet::from(["disk0".to_string(), "disk0.img".to_string()])
        );
        let img = point.join("disk0.img");
        assert_eq!(std::fs::metadata(&img).unwrap().len(), DISK_SIZE);
        assert_same_image(&std::fs::read(&img).unwrap(), image, &format!("{name}/disk0.img"));
        assert_eq!(
            entries(&point.join("disk0")),
            BTreeSet::from(["p1".to_string(), "p2.img".to_string()])
        );
        let p2img = std::fs::read(point.join("disk0/p2.img")).unwrap();
        let at = (P2.0 * SECTOR) as usize;
        assert!(p2img[..] == image[at..at + (1 << 20)], "{name}/disk0/p2.img differs");
        assert_same_tree(&point.join("disk0/p1"), tree, true);
        // Random access inside a large file.
        let mut f = std::fs::File::open(point.join("disk0/p1/big.bin")).unwrap();
        let want = std::fs::read(tree.join("big.bin")).unwrap();
        for off in [2_999_999u64, 17, 1_500_001, 0] {
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(off)).unwrap();
            let mut buf = vec![0u8; 5000];
            let n = f.read(&mut buf).unwrap();
            assert!(n > 0);
            assert_eq!(&buf[..n], &want[off as usize..off as usize + n], "big.bin at {off}");
        }
    }

    // Read-only and clear errors.
    let point = machine.join(&n2);
    let img = point.join("disk0.img");
    assert_eq!(errno_of(std::fs::OpenOptions::new().write(true).open(&img)), EROFS);
    assert_eq!(errno_of(std::fs::write(point.join("disk0/p1/new.txt"), b"x")), EROFS);
    assert_eq!(errno_of(std::fs::create_dir(point.join("disk0/p1/newdir"))), EROFS);
    assert_eq!(errno_of(std::fs::remove_file(point.join("disk0/p1/hello.txt"))), EROFS);
    assert_eq!(errno_of(std::fs::rename(&img, point.join("x.img"))), EROFS);
    for bad in [
        mnt.join("nope"),
        machine.join("nope"),
        machine.join("2020-01-01T00-00-00Z-crash"),
        point.join("disk9.img"),
        point.join("disk0/p7"),
        point.join("disk0/p1/nope.txt"),
        point.join("disk0/p1/sub/dir/nope"),
    ] {
        assert_eq!(errno_of(std::fs::metadata(&bad)), ENOENT, "{}", bad.display());
    }
    assert!(std::fs::metadata(point.join("disk0/p1/sub/dangling")).is_err());
    let st = nix_statfs(&mnt);
    assert!(st > 0, "statfs reports no blocks");

    // A new point appears without remounting.
    {
        let mut d = disk_v2.clone();
        let at = (P2.0 * SECTOR) as usize;
        d[at..at + 4096].fill(0x77);
        std::fs::write(&disk, &d).unwrap();
    }
    let s3 = app.sync("m1", &[&disk]);
    let acked3 = s3.disks[0].last_seq;
    let p3 = wait_point(&app, "new", |p| p.seqs["disk0"] >= acked3);
    let n3 = point_dir(&app, &p3);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !entries(&machine).contains(&n3) {
        assert!(
            Instant::now() < deadline,
            "point {n3} did not appear in {:?}",
            entries(&machine)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let p2img = std::fs::read(machine.join(&n3).join("disk0/p2.img")).unwrap();
    assert!(p2img[..4096].iter().all(|b| *b == 0x77));
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::fs::read_link(machine.join("latest")).unwrap() != Path::new(&n3) {
        assert!(Instant::now() < deadline, "latest does not follow the new point");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Ctrl-C while a reader is busy: the mount goes away, nothing hangs.
    let busy = img.clone();
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::open(&busy).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut errors = 0;
        for _ in 0..400 {
            match f.read(&mut buf) {
                Ok(0) => {
                    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).unwrap();
                }
                Ok(_) => {}
                Err(_) => errors += 1,
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        errors
    });
    std::thread::sleep(Duration::from_millis(300));
    mount.signal(nix::sys::signal::Signal::SIGINT);
    let status = mount.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "lifeboat mount exited with {status}");
    assert!(!mount.mounted(), "still mounted after Ctrl-C");
    let errors = reader.join().unwrap();
    eprintln!("busy reader saw {errors} errors after the unmount");
    drop(mount);
    assert_eq!(
        app.metric("lifeboat_fuse_clients"),
        0.0,
        "an unmounted client is no longer counted"
    );

    // Mount again; `fusermount3 -u` from outside ends the process cleanly.
    let mut mount = Mount::start(&app, &mnt);
    assert!(entries(&mnt.join("m1")).contains(&n1));
    tool("fusermount3", &["-u", mnt.to_str().unwrap()]);
    let status = mount.wait_exit(Duration::from_secs(15));
    assert!(
        status.success(),
        "lifeboat mount exited with {status} after fusermount3 -u"
    );
    assert!(!mount.mounted());
}

/// The uid and gid the unprivileged test runs `lifeboat mount` as (nobody/nogroup).
const NOBODY: u32 = 65534;

/// `cmd args...` as uid/gid [`NOBODY`] without supplementary groups.
fn as_nobody(cmd: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .arg("--clear-groups")
        .arg(cmd);
    c
}

#[test]
fn mounts_as_an_unprivileged_user() {
    // Switching to an unprivileged uid needs root; the mount itself then goes through the
    // setuid-root fusermount3 of Debian's fuse3 package (.ci/setup installs it).
    let uid = String::from_utf8_lossy(&tool("id", &["-u"]).stdout).trim().to_string();
    assert_eq!(
        uid, "0",
        "this test switches to uid {NOBODY} with setpriv: run it as root"
    );
    let fusermount = String::from_utf8_lossy(&tool("sh", &["-c", "command -v fusermount3"]).stdout)
        .trim()
        .to_string();
    let mode = std::fs::metadata(&fusermount).unwrap().mode();
    assert!(
        mode & 0o4000 != 0,
        "{fusermount} is not setuid root: unprivileged FUSE mounts cannot work"
    );
    tool("setpriv", &["--version"]);

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let app = Appliance::start(
        &root.join("appliance"),
        &BlobTarget::Local(root.join("blob")),
        "[policy]\ncrash_consistent_interval = \"2s\"\n",
    );
    let disk = root.join("disk0.raw");
    let tree = root.join("tree");
    make_disk(root, &tree, &disk, 1);
    let acked = app.sync("m1", &[&disk]).disks[0].last_seq;
    let point = wait_point(&app, "synced", |p| p.seqs["disk0"] >= acked);

    // Everything the unprivileged mount reads, readable by it alone: admin token, CA certificate;
    // and a mount point it owns.
    let user_dir = tempfile::Builder::new()
        .prefix("lifeboat-unpriv")
        .tempdir_in("/tmp")
        .unwrap();
    let home = user_dir.path();
    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (token, ca, mnt) = (home.join("admin-token"), home.join("ca.pem"), home.join("mnt"));
    std::fs::copy(app.dir.join("data/admin-token"), &token).unwrap();
    std::fs::copy(&app.cert, &ca).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    for f in [&token, &ca] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o400)).unwrap();
    }
    let owner = format!("{NOBODY}:{NOBODY}");
    for f in [&token, &ca, &mnt] {
        tool("chown", &[&owner, f.to_str().unwrap()]);
    }

    let mut cmd = as_nobody(lifeboat_bin());
    cmd.arg("mount")
        .arg(&mnt)
        .args(["--server", &format!("https://{}", app.management), "--nbd", &app.nbd])
        .arg("--ca")
        .arg(&ca)
        .arg("--token-file")
        .arg(&token);

    // FUSE allows unprivileged mounts only where /dev/fuse is open to the user (0666, as the fuse3
    // package's udev rule makes it): fusermount3 opens it as the calling user. Where it is closed
    // (0600 device nodes of some containers), the mount must fail fast and say why.
    let fuse_open = as_nobody("sh")
        .args(["-c", "exec 3<>/dev/fuse"])
        .status()
        .unwrap()
        .success();
    if !fuse_open {
        eprintln!("/dev/fuse is closed to uid {NOBODY} here: checking the refusal (make it 0666 to test reads)");
        let out = cmd.env("RUST_LOG", "warn").stdin(Stdio::null()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "mounted without access to /dev/fuse?");
        assert!(err.contains("FUSE is not available to this user"), "{err}");
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(
            !mounts.contains(mnt.to_str().unwrap()),
            "a mount was left behind: {mounts}"
        );
        return;
    }
    let mut mount = Mount::spawn(cmd, &mnt);
    let line = mount.mount_line().unwrap();
    assert!(
        line.contains(&format!("user_id={NOBODY}")),
        "not mounted by uid {NOBODY}: {line}"
    );

    // The unprivileged user reads files through its mount.
    let name = point_dir(&app, &point);
    let p1 = mnt.join("m1").join(&name).join("disk0/p1");
    for file in ["hello.txt", "medium.bin", "sub/dir/nested.txt"] {
        let out = as_nobody("cat").arg(p1.join(file)).output().unwrap();
        assert!(
            out.status.success(),
            "cat {file} as uid {NOBODY}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == std::fs::read(tree.join(file)).unwrap(), "{file} differs");
    }
    let out = as_nobody("cat").arg(mnt.join("m1/latest/disk0.img")).output().unwrap();
    assert!(
        out.status.success(),
        "reading disk0.img: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_image(&out.stdout, &std::fs::read(&disk).unwrap(), "disk0.img as nobody");

    // It unmounts it too; the process ends cleanly.
    let out = as_nobody("fusermount3").arg("-u").arg(&mnt).output().unwrap();
    assert!(
        out.status.success(),
        "fusermount3 -u: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = mount.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "unprivileged lifeboat mount exited with {status}");
}

/// Total blocks statfs reports for `path` (through `stat -f`, no unsafe code).
fn nix_statfs(path: &Path) -> u64 {
    let out = tool("stat", &["-f", "-c", "%b", path.to_str().unwrap()]);
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

#[test]
fn mount_refuses_a_missing_mountpoint_clearly() {
    let out = Command::new(lifeboat_bin())
        .args(["mount", "/nonexistent/lifeboat-mnt", "--server", "https://127.0.0.1:1"])
        .args(["--token-file", "/nonexistent/token", "--nbd", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a directory"), "{err}");
    let _ = std::io::stderr().flush();
}
