//! Packs the appliance image as an OVA for ESXi (issue 7).
//!
//! - [`vmdk`]: a streamOptimized VMDK writer (sparse extent, deflate grains, markers, footer).
//! - [`ovf`]: the OVF 1.0 descriptor (vmx-14, EFI, pvscsi system disk, blank cache disk, vmxnet3,
//!   ProductSection with the appliance's properties, ISO and guestinfo transports).
//! - [`manifest`] and [`package`]: the `.mf` with `SHA256(FILE)= HEX` lines and the OVA tar
//!   (ustar, descriptor first, then manifest, then disks; fixed owner, mode and mtime).
//!
//! [`build_ova`] turns a raw disk image into `DIR/lifeboat.ova`; the `ova` binary builds the
//! image first (crate `image`) and then calls it. Same input, same OVA bytes.

pub mod manifest;
pub mod ovf;
pub mod package;
pub mod vmdk;

use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};

pub const OVA_NAME: &str = "lifeboat.ova";
pub const OVF_NAME: &str = "lifeboat.ovf";
pub const MF_NAME: &str = "lifeboat.mf";
pub const VMDK_NAME: &str = "lifeboat-system.vmdk";

/// Options of [`build_ova`].
#[derive(Debug, Clone)]
pub struct OvaOptions {
    /// Size of the blank cache disk the OVF asks for, GiB.
    pub cache_disk_gib: u64,
    pub version: String,
}

impl Default for OvaOptions {
    fn default() -> Self {
        Self {
            cache_disk_gib: 256,
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// What [`build_ova`] wrote.
#[derive(Debug, Clone)]
pub struct OvaReport {
    pub ova: PathBuf,
    pub ova_size: u64,
    pub vmdk: vmdk::VmdkInfo,
    pub ovf: String,
    pub manifest: String,
}

/// Writes `out_dir/lifeboat.ova` from the raw disk `raw`. `work_dir` holds the intermediate
/// VMDK, descriptor and manifest (kept, so they can be inspected). `progress` gets
/// (bytes of the raw image read, total).
pub fn build_ova(
    raw: &Path,
    out_dir: &Path,
    work_dir: &Path,
    opts: &OvaOptions,
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<OvaReport> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    std::fs::create_dir_all(work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
    let mut f = std::fs::File::open(raw).with_context(|| format!("opening the disk image {}", raw.display()))?;
    let capacity = f.metadata()?.len();
    anyhow::ensure!(capacity > 0, "the disk image {} is empty", raw.display());
    // The descriptor's CID names the content: the first 4 bytes of the image's SHA-256.
    let mut h = Sha256::new();
    std::io::copy(&mut BufReader::new(&mut f), &mut h)?;
    let digest = h.finalize();
    let cid = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    f.rewind()?;

    let vmdk_path = work_dir.join(VMDK_NAME);
    let vopts = vmdk::VmdkOptions {
        extent_name: VMDK_NAME.into(),
        ..Default::default()
    };
    let info = {
        let mut out = BufWriter::new(std::fs::File::create(&vmdk_path)?);
        let info = vmdk::write_stream_optimized(
            BufReader::with_capacity(1 << 20, f),
            capacity,
            cid,
            &vopts,
            &mut out,
            |n| progress(n, capacity),
        )
        .with_context(|| format!("writing {}", vmdk_path.display()))?;
        out.flush()?;
        info
    };

    let ovf = ovf::render(&ovf::Descriptor {
        name: "Lifeboat".into(),
        version: opts.version.clone(),
        system_vmdk: VMDK_NAME.into(),
        system_vmdk_size: info.file_size,
        system_capacity: info.capacity,
        system_populated: info.populated,
        cache_disk_gib: opts.cache_disk_gib,
    });
    let ovf_path = work_dir.join(OVF_NAME);
    std::fs::write(&ovf_path, &ovf)?;
    let manifest = manifest::render(&[(OVF_NAME, ovf_path.as_path()), (VMDK_NAME, vmdk_path.as_path())])?;
    let mf_path = work_dir.join(MF_NAME);
    std::fs::write(&mf_path, &manifest)?;

    let ova = out_dir.join(OVA_NAME);
    let tmp = out_dir.join(format!(".{OVA_NAME}.tmp"));
    {
        let mut w = BufWriter::new(std::fs::File::create(&tmp)?);
        package::write_tar(
            &mut w,
            &[
                (OVF_NAME, ovf_path.as_path()),
                (MF_NAME, mf_path.as_path()),
                (VMDK_NAME, vmdk_path.as_path()),
            ],
        )?;
        w.flush()?;
        w.get_ref().sync_all()?;
    }
    std::fs::rename(&tmp, &ova)?;
    Ok(OvaReport {
        ova_size: std::fs::metadata(&ova)?.len(),
        ova,
        vmdk: info,
        ovf,
        manifest,
    })
}

/// Reads one member of an OVA (a tar) into memory; `None` when absent.
pub fn read_member(ova: &Path, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let mut ar = tar::Archive::new(std::fs::File::open(ova)?);
    for e in ar.entries()? {
        let mut e = e?;
        if e.path()?.to_string_lossy() == name {
            let mut v = Vec::new();
            e.read_to_end(&mut v)?;
            return Ok(Some(v));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ova_is_reproducible_ordered_and_its_manifest_and_descriptor_check_out() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.img");
        let mut data = vec![0u8; 6 << 20];
        for (i, b) in data.iter_mut().enumerate().skip(1 << 20).take(2 << 20) {
            *b = (i * 7 % 253) as u8;
        }
        std::fs::write(&raw, &data).unwrap();
        let a = build_ova(
            &raw,
            &dir.path().join("a"),
            &dir.path().join("wa"),
            &OvaOptions::default(),
            |_, _| {},
        )
        .unwrap();
        let b = build_ova(
            &raw,
            &dir.path().join("b"),
            &dir.path().join("wb"),
            &OvaOptions::default(),
            |_, _| {},
        )
        .unwrap();
        assert_eq!(a.ova.file_name().unwrap(), OVA_NAME);
        assert_eq!(
            std::fs::read(&a.ova).unwrap(),
            std::fs::read(&b.ova).unwrap(),
            "same input, same OVA"
        );

        let mut ar = tar::Archive::new(std::fs::File::open(&a.ova).unwrap());
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [OVF_NAME, MF_NAME, VMDK_NAME],
            "descriptor first, then manifest, then disk"
        );

        let mf = String::from_utf8(read_member(&a.ova, MF_NAME).unwrap().unwrap()).unwrap();
        assert_eq!(manifest::verify(&mf, |n| read_member(&a.ova, n).ok().flatten()), Ok(2));
        let ovf = String::from_utf8(read_member(&a.ova, OVF_NAME).unwrap().unwrap()).unwrap();
        assert!(ovf.contains(&format!("ovf:size=\"{}\"", a.vmdk.file_size)));
        assert!(ovf.contains(&format!("ovf:capacity=\"{}\"", 6 << 20)));
        let ovf_path = dir.path().join("check.ovf");
        std::fs::write(&ovf_path, &ovf).unwrap();
        ovf::tests::xmllint_validates(&ovf_path).unwrap();
    }
}
