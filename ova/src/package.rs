//! The OVA container: a POSIX ustar archive, members in the order given (descriptor first, as
//! OVF requires), owner 0/0 with no names, mode 0644, a fixed mtime, so equal inputs give equal
//! bytes.

use std::io::Write;
use std::path::Path;

/// The mtime every member gets (2024-01-01T00:00:00Z).
pub const MTIME: u64 = 1_704_067_200;

/// Writes `(name, file)` members as ustar to `out`.
pub fn write_tar<W: Write>(out: W, members: &[(&str, &Path)]) -> std::io::Result<()> {
    let mut b = tar::Builder::new(out);
    b.mode(tar::HeaderMode::Deterministic);
    for (name, path) in members {
        let f = std::fs::File::open(path)?;
        let mut h = tar::Header::new_ustar();
        h.set_path(name)?;
        h.set_size(f.metadata()?.len());
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, f)?;
    }
    b.into_inner()?.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_keep_their_order_and_the_bytes_are_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.ovf");
        let b = dir.path().join("b.mf");
        std::fs::write(&a, b"<Envelope/>").unwrap();
        std::fs::write(&b, b"SHA256(a.ovf)= 00\n").unwrap();
        let mut t1 = Vec::new();
        write_tar(&mut t1, &[("x.ovf", a.as_path()), ("x.mf", b.as_path())]).unwrap();
        let mut t2 = Vec::new();
        write_tar(&mut t2, &[("x.ovf", a.as_path()), ("x.mf", b.as_path())]).unwrap();
        assert_eq!(t1, t2);
        let mut ar = tar::Archive::new(&t1[..]);
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["x.ovf", "x.mf"]);
        // ustar magic in the first header.
        assert_eq!(&t1[257..263], b"ustar\0");
    }
}
