//! First-start material kept in the data dir: the TLS certificate (self-signed when none is
//! configured) and the registration passphrase (random when none is set). Files holding secrets
//! are created with mode 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rand::Rng;
use sha2::{Digest, Sha256};

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// TLS material: the rustls server config and what to tell the operator.
pub struct TlsMaterial {
    pub server_config: Arc<rustls::ServerConfig>,
    pub fingerprint: String,
    pub generated: bool,
}

/// Loads the certificate and key, generating a self-signed pair when both files are missing.
pub fn load_or_create_tls(cert: &Path, key: &Path, extra_names: &[String]) -> anyhow::Result<TlsMaterial> {
    let mut generated = false;
    if !cert.exists() && !key.exists() {
        let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
        if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
            let h = h.trim();
            if !h.is_empty() {
                names.push(h.to_string());
            }
        }
        names.extend(extra_names.iter().cloned());
        let ck = rcgen::generate_simple_self_signed(names).context("generating the self-signed certificate")?;
        write_private(key, ck.key_pair.serialize_pem().as_bytes())?;
        write_private(cert, ck.cert.pem().as_bytes())?;
        generated = true;
    }
    let cert_pem = std::fs::read(cert).with_context(|| format!("reading certificate {}", cert.display()))?;
    let key_pem = std::fs::read(key).with_context(|| format!("reading key {}", key.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let first = certs
        .first()
        .with_context(|| format!("{} holds no certificate", cert.display()))?;
    let fingerprint = fingerprint(first.as_ref());
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .with_context(|| format!("parsing {}", key.display()))?
        .with_context(|| format!("{} holds no private key", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not match")?;
    Ok(TlsMaterial {
        server_config: Arc::new(config),
        fingerprint,
        generated,
    })
}

/// SHA-256 fingerprint of a DER certificate, as `AB:CD:…`.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Reads the passphrase file, or creates it with a random passphrase. Returns it and whether it
/// was generated now.
pub fn load_or_create_passphrase(path: &Path) -> anyhow::Result<(String, bool)> {
    if path.exists() {
        let p = std::fs::read_to_string(path).with_context(|| format!("reading passphrase {}", path.display()))?;
        let p = p.trim().to_string();
        anyhow::ensure!(!p.is_empty(), "passphrase file {} is empty", path.display());
        return Ok((p, false));
    }
    // 5 groups of 5 characters from an unambiguous alphabet: about 124 bits.
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
    let mut rng = rand::thread_rng();
    let groups: Vec<String> = (0..5)
        .map(|_| {
            (0..5)
                .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
                .collect()
        })
        .collect();
    let p = groups.join("-");
    write_private(path, format!("{p}\n").as_bytes())?;
    Ok((p, true))
}

/// Loads the management API's admin token from `path`, creating a random one on first start.
/// The file (mode 0600) is the operator's credential; the server keeps only its hash.
pub fn load_or_create_admin_token(path: &Path) -> anyhow::Result<String> {
    if let Ok(t) = std::fs::read_to_string(path) {
        let t = t.trim().to_string();
        anyhow::ensure!(t.len() >= 32, "admin token in {} is too short", path.display());
        return Ok(t);
    }
    let mut raw = [0u8; 32];
    rand::thread_rng().fill(&mut raw);
    let t = hex::encode(raw);
    write_private(path, format!("{t}\n").as_bytes())?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("tls/cert.pem"), dir.path().join("tls/key.pem"));
        let a = load_or_create_tls(&c, &k, &[]).unwrap();
        let b = load_or_create_tls(&c, &k, &[]).unwrap();
        assert!(a.generated && !b.generated);
        assert_eq!(a.fingerprint, b.fingerprint);
        let (p1, new1) = load_or_create_passphrase(&dir.path().join("passphrase")).unwrap();
        let (p2, new2) = load_or_create_passphrase(&dir.path().join("passphrase")).unwrap();
        assert!(new1 && !new2);
        assert_eq!(p1, p2);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&k).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
