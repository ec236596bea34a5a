//! The Debian kernel package: found, unpacked without installing (`dpkg-deb --fsys-tarfile`
//! read as a stream), and reduced to `vmlinuz` plus the modules the appliance's virtual hardware
//! needs with their dependencies, in load order.
//!
//! Debian's package ships no `modules.dep` (its postinst makes it), so dependencies are read
//! from each module's own `.modinfo` section (`depends=` and `softdep=pre:`), and
//! `modules.builtin` says which wanted drivers need no module.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// Drivers for ESXi's and qemu's virtual hardware, the CD-ROM with the OVF environment, and the
/// data disk's filesystem.
pub const WANTED_MODULES: &[&str] = &[
    // disks and controllers: pvscsi, LSI SAS, SATA (AHCI), NVMe, virtio
    "vmw_pvscsi",
    "mptsas",
    "ahci",
    "nvme",
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    // OVF environment ISO
    "sr_mod",
    "cdrom",
    "isofs",
    "nls_utf8",
    "nls_iso8859_1",
    // NICs: vmxnet3 (ESXi), e1000/e1000e (ESXi and qemu), virtio
    "vmxnet3",
    "e1000",
    "e1000e",
    "virtio_net",
    // data disk
    "ext4",
    "crc32c_generic",
    "crc32c_intel",
    // DHCP client's raw sockets (built in on Debian)
    "af_packet",
];

/// Where `.ci/setup` puts the kernel package.
pub const DEFAULT_CACHE: &str = "/var/cache/lifeboat-image";

/// A kernel module picked for the initramfs.
#[derive(Debug, Clone)]
pub struct Module {
    pub name: String,
    /// File name inside the initramfs' module folder.
    pub file: String,
    pub data: Vec<u8>,
}

/// The parts of the kernel package the image uses.
#[derive(Debug)]
pub struct Kernel {
    pub version: String,
    pub vmlinuz: Vec<u8>,
    /// In load order (dependencies first).
    pub modules: Vec<Module>,
    /// Wanted drivers that are built into the kernel.
    pub builtin: Vec<String>,
    pub package: PathBuf,
}

/// Module names compare with `-` and `_` the same.
fn norm(name: &str) -> String {
    name.replace('-', "_")
}

/// Finds the kernel package: `explicit`, else `$LIFEBOAT_KERNEL_DEB`, else the newest
/// `linux-image-*-amd64*.deb` in `$LIFEBOAT_IMAGE_CACHE` or [`DEFAULT_CACHE`].
pub fn find_package(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let hint = "run .ci/setup (it fetches the package with `apt-get download`) or pass --kernel-deb FILE";
    if let Some(p) = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("LIFEBOAT_KERNEL_DEB").map(PathBuf::from))
    {
        if !p.is_file() {
            bail!("kernel package {} not found: {hint}", p.display());
        }
        return Ok(p);
    }
    let dir = std::env::var_os("LIFEBOAT_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE));
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let n = p.file_name().unwrap_or_default().to_string_lossy();
                    n.starts_with("linux-image-") && n.contains("-amd64") && n.ends_with(".deb") && !n.contains("-dbg")
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().with_context(|| {
        format!(
            "no Debian kernel package (linux-image-*-amd64*.deb) in {}: {hint}",
            dir.display()
        )
    })
}

/// Reads a string table entry.
fn cstr(data: &[u8], at: usize) -> &[u8] {
    let rest = data.get(at..).unwrap_or_default();
    &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
}

/// The `key=value` entries of an ELF64 module's `.modinfo` section.
pub fn modinfo(ko: &[u8]) -> anyhow::Result<Vec<(String, String)>> {
    let u16at = |o: usize| -> anyhow::Result<u16> {
        Ok(u16::from_le_bytes(
            ko.get(o..o + 2).context("truncated ELF")?.try_into()?,
        ))
    };
    let u32at = |o: usize| -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(
            ko.get(o..o + 4).context("truncated ELF")?.try_into()?,
        ))
    };
    let u64at = |o: usize| -> anyhow::Result<u64> {
        Ok(u64::from_le_bytes(
            ko.get(o..o + 8).context("truncated ELF")?.try_into()?,
        ))
    };
    if ko.get(..5) != Some(b"\x7fELF\x02") || ko.get(5) != Some(&1) {
        bail!("not a little-endian ELF64 module");
    }
    let shoff = u64at(0x28)? as usize;
    let shentsize = u16at(0x3a)? as usize;
    let shnum = u16at(0x3c)? as usize;
    let shstrndx = u16at(0x3e)? as usize;
    let sh = |i: usize| shoff + i * shentsize;
    let strtab = u64at(sh(shstrndx) + 0x18)? as usize;
    for i in 0..shnum {
        let name = cstr(ko, strtab + u32at(sh(i))? as usize);
        if name == b".modinfo" {
            let off = u64at(sh(i) + 0x18)? as usize;
            let size = u64at(sh(i) + 0x20)? as usize;
            let sec = ko.get(off..off + size).context("truncated .modinfo")?;
            return Ok(sec
                .split(|&b| b == 0)
                .filter_map(|e| {
                    let s = String::from_utf8_lossy(e);
                    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect());
        }
    }
    bail!("no .modinfo section")
}

/// Hard and pre-soft dependencies of a module.
fn deps_of(info: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in info {
        if k == "depends" {
            out.extend(v.split(',').filter(|s| !s.is_empty()).map(norm));
        } else if k == "softdep" {
            // "pre: a b post: c"
            let mut pre = false;
            for w in v.split_whitespace() {
                match w {
                    "pre:" => pre = true,
                    "post:" => pre = false,
                    m if pre => out.push(norm(m)),
                    _ => {}
                }
            }
        }
    }
    out
}

/// Unpacks `deb` and picks `wanted` modules (and what they need).
pub fn load(deb: &Path, wanted: &[&str]) -> anyhow::Result<Kernel> {
    let mut child = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running dpkg-deb (Debian's dpkg package) to unpack the kernel package")?;
    let stdout = child.stdout.take().context("dpkg-deb stdout")?;
    let mut ar = tar::Archive::new(stdout);
    let mut vmlinuz: Option<(String, Vec<u8>)> = None;
    let mut builtin_text = String::new();
    // name -> (file name, bytes)
    let mut all: BTreeMap<String, (String, Vec<u8>)> = BTreeMap::new();
    for e in ar.entries().context("reading the kernel package's data")? {
        let mut e = e?;
        let path = e.path()?.to_string_lossy().into_owned();
        let file = path.rsplit('/').next().unwrap_or_default().to_string();
        if path.contains("/boot/vmlinuz-") || path.starts_with("boot/vmlinuz-") {
            let mut v = Vec::new();
            e.read_to_end(&mut v)?;
            vmlinuz = Some((file.trim_start_matches("vmlinuz-").to_string(), v));
        } else if path.ends_with("/modules.builtin") {
            e.read_to_string(&mut builtin_text)?;
        } else if let Some(stem) = file.strip_suffix(".ko") {
            let mut v = Vec::new();
            e.read_to_end(&mut v)?;
            all.insert(norm(stem), (file.clone(), v));
        }
    }
    let mut err = String::new();
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("dpkg-deb could not read {}: {}", deb.display(), err.trim());
    }
    let (version, vmlinuz) = vmlinuz.with_context(|| {
        format!(
            "{} holds no /boot/vmlinuz-*: is it a linux-image package (not the linux-image-amd64 metapackage)?",
            deb.display()
        )
    })?;
    let builtin: BTreeSet<String> = builtin_text
        .lines()
        .filter_map(|l| l.rsplit('/').next()?.strip_suffix(".ko").map(norm))
        .collect();

    // Depth-first: dependencies before dependants.
    let mut order: Vec<String> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut builtin_wanted = Vec::new();
    fn visit(
        name: &str,
        all: &BTreeMap<String, (String, Vec<u8>)>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> anyhow::Result<()> {
        if !seen.insert(name.to_string()) || depth > 64 {
            return Ok(());
        }
        let (file, data) = &all[name];
        let info = modinfo(data).with_context(|| format!("reading {file}"))?;
        for d in deps_of(&info) {
            if all.contains_key(&d) {
                visit(&d, all, seen, order, depth + 1)?;
            }
        }
        order.push(name.to_string());
        Ok(())
    }
    for w in wanted {
        let w = norm(w);
        if all.contains_key(&w) {
            visit(&w, &all, &mut seen, &mut order, 0)?;
        } else if builtin.contains(&w) {
            builtin_wanted.push(w);
        } else {
            bail!(
                "kernel {version} in {} has no module or built-in driver {w}",
                deb.display()
            );
        }
    }
    let modules = order
        .into_iter()
        .map(|n| {
            let (file, data) = all.remove(&n).expect("visited module");
            Module { name: n, file, data }
        })
        .collect();
    Ok(Kernel {
        version,
        vmlinuz,
        modules,
        builtin: builtin_wanted,
        package: deb.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softdeps_and_depends_are_both_followed() {
        let info = vec![
            ("depends".to_string(), "mbcache,jbd2,crc16".to_string()),
            ("softdep".to_string(), "pre: crc32c post: foo-bar".to_string()),
        ];
        assert_eq!(deps_of(&info), ["mbcache", "jbd2", "crc16", "crc32c"]);
    }

    #[test]
    fn a_missing_package_is_a_clear_error() {
        let e = find_package(Some(Path::new("/nonexistent/linux-image.deb"))).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("kernel package") && msg.contains("--kernel-deb"), "{msg}");
    }

    #[test]
    fn a_package_without_a_kernel_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let deb = dir.path().join("linux-image-bogus-amd64.deb");
        std::fs::write(&deb, b"not a deb").unwrap();
        let msg = format!("{:#}", load(&deb, &["ext4"]).unwrap_err());
        assert!(msg.contains("dpkg-deb"), "{msg}");
    }
}
