//! The OVA manifest: one `SHA256(FILE)= HEX` line per file (ESXi 6.7+ and ovftool accept
//! SHA-256), and its check.

use std::io::BufReader;
use std::path::Path;

use sha2::{Digest, Sha256};

/// SHA-256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut h = Sha256::new();
    std::io::copy(&mut BufReader::new(std::fs::File::open(path)?), &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// The manifest text for `(name in the OVA, file on disk)` pairs, in the order given.
pub fn render(files: &[(&str, &Path)]) -> std::io::Result<String> {
    let mut s = String::new();
    for (name, path) in files {
        s.push_str(&format!("SHA256({name})= {}\n", sha256_file(path)?));
    }
    Ok(s)
}

/// Parses a manifest into `(name, hex)` pairs; refuses lines in any other form.
pub fn parse(text: &str) -> Result<Vec<(String, String)>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let rest = l
                .strip_prefix("SHA256(")
                .ok_or_else(|| format!("not a SHA256 line: {l:?}"))?;
            let (name, hexpart) = rest.split_once(")= ").ok_or_else(|| format!("malformed line: {l:?}"))?;
            if hexpart.len() != 64 || !hexpart.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("bad digest in {l:?}"));
            }
            Ok((name.to_string(), hexpart.to_string()))
        })
        .collect()
}

/// Checks every manifest line against the bytes given for that name.
pub fn verify(text: &str, get: impl Fn(&str) -> Option<Vec<u8>>) -> Result<usize, String> {
    let lines = parse(text)?;
    for (name, want) in &lines {
        let data = get(name).ok_or_else(|| format!("manifest names {name}, which is missing"))?;
        let got = hex::encode(Sha256::digest(&data));
        if &got != want {
            return Err(format!("{name}: SHA-256 {got}, manifest says {want}"));
        }
    }
    Ok(lines.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_lines_have_the_ovf_form_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"abc").unwrap();
        let text = render(&[("x.ovf", a.as_path())]).unwrap();
        assert_eq!(
            text,
            "SHA256(x.ovf)= ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
        );
        assert_eq!(verify(&text, |_| Some(b"abc".to_vec())), Ok(1));
        assert!(verify(&text, |_| Some(b"abd".to_vec())).is_err());
        assert!(verify(&text, |_| None).is_err());
        assert!(parse("SHA1(x)= 00").is_err());
    }
}
