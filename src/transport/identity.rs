//! Node identity: a key pair and a self-signed certificate in the home directory. A node's
//! ID is the SHA-256 digest of its certificate (DER), written in base32 in groups, so it
//! can be cross-checked with `openssl x509 -noout -fingerprint -sha256 -in cert.pem`.
//! Peers pin IDs; no certificate authority is involved.

use crate::error::Error;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

const KEY_FILE: &str = "key.pem";
const CERT_FILE: &str = "cert.pem";
const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// A node ID: the SHA-256 digest of a certificate.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    pub(crate) fn of_cert(der: &[u8]) -> NodeId {
        let d = ring::digest::digest(&ring::digest::SHA256, der);
        let mut id = [0u8; 32];
        id.copy_from_slice(d.as_ref());
        NodeId(id)
    }

    /// Parses an ID as printed by `hotsync id`; case, dashes and spaces do not matter.
    pub fn parse(s: &str) -> Result<NodeId, String> {
        let bad =
            || format!("bad ID {s:?}: expected the 52 base32 characters that `hotsync id` prints");
        let mut bits: u64 = 0;
        let mut nbits = 0;
        let mut out = Vec::with_capacity(32);
        let mut count = 0;
        for c in s.chars().filter(|c| *c != '-' && !c.is_whitespace()) {
            let c = c.to_ascii_uppercase() as u8;
            let v = ALPHABET.iter().position(|&a| a == c).ok_or_else(bad)? as u64;
            count += 1;
            bits = (bits << 5) | v;
            nbits += 5;
            if nbits >= 8 {
                nbits -= 8;
                out.push((bits >> nbits) as u8);
                bits &= (1 << nbits) - 1;
            }
        }
        if count != 52 || out.len() != 32 || bits != 0 {
            return Err(bad());
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(&out);
        Ok(NodeId(id))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = Vec::with_capacity(52);
        let mut bits: u64 = 0;
        let mut nbits = 0;
        for &b in &self.0 {
            bits = (bits << 8) | b as u64;
            nbits += 8;
            while nbits >= 5 {
                nbits -= 5;
                chars.push(ALPHABET[((bits >> nbits) & 31) as usize]);
            }
        }
        if nbits > 0 {
            chars.push(ALPHABET[((bits << (5 - nbits)) & 31) as usize]);
        }
        for (i, group) in chars.chunks(13).enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            f.write_str(std::str::from_utf8(group).unwrap())?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// This node's certificate and key.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    pub id: NodeId,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            id: self.id,
        }
    }
}

/// The home directory: `--home`, else `$HOTSYNC_HOME`, else `$XDG_CONFIG_HOME/hotsync`,
/// else `~/.config/hotsync`.
pub fn home_dir(flag: Option<&Path>) -> Result<PathBuf, Error> {
    if let Some(h) = flag {
        return Ok(h.to_path_buf());
    }
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(h) = var("HOTSYNC_HOME") {
        return Ok(h);
    }
    if let Some(x) = var("XDG_CONFIG_HOME") {
        return Ok(x.join("hotsync"));
    }
    if let Some(h) = var("HOME") {
        return Ok(h.join(".config").join("hotsync"));
    }
    Err(Error::Usage(
        "no home directory: set --home, HOTSYNC_HOME or HOME".into(),
    ))
}

/// Creates the identity in `home` unless one exists; returns it and whether it was created.
pub fn keygen(home: &Path) -> Result<(Identity, bool), Error> {
    if home.join(KEY_FILE).exists() || home.join(CERT_FILE).exists() {
        return Ok((load(home)?, false));
    }
    let io = |what: &str, e: std::io::Error| Error::io(format!("{what} {}", home.display()), e);
    std::fs::create_dir_all(home).map_err(|e| io("cannot create home directory", e))?;
    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io("cannot restrict home directory", e))?;
    let ck = rcgen::generate_simple_self_signed(vec!["hotsync".to_string()])
        .map_err(|e| Error::Usage(format!("cannot generate a key pair: {e}")))?;
    let write = |name: &str, data: &str| -> Result<(), Error> {
        let path = home.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
        f.write_all(data.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
    };
    write(KEY_FILE, &ck.signing_key.serialize_pem())?;
    write(CERT_FILE, &ck.cert.pem())?;
    Ok((load(home)?, true))
}

/// Loads the identity from `home`.
pub fn load(home: &Path) -> Result<Identity, Error> {
    let key_path = home.join(KEY_FILE);
    let cert_path = home.join(CERT_FILE);
    if !key_path.exists() || !cert_path.exists() {
        return Err(Error::Usage(format!(
            "no identity in {}: run `hotsync keygen` first",
            home.display()
        )));
    }
    if let Ok(m) = std::fs::metadata(&key_path)
        && m.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            "{} is readable by others; it should be mode 0600",
            key_path.display()
        );
    }
    let cert = CertificateDer::from_pem_file(&cert_path)
        .map_err(|e| Error::Usage(format!("cannot read {}: {e}", cert_path.display())))?;
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| Error::Usage(format!("cannot read {}: {e}", key_path.display())))?;
    let id = NodeId::of_cert(&cert);
    Ok(Identity { cert, key, id })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_and_parse() {
        let id = NodeId::of_cert(b"some certificate");
        let s = id.to_string();
        assert_eq!(s.len(), 52 + 3);
        assert_eq!(NodeId::parse(&s).unwrap(), id);
        assert_eq!(
            NodeId::parse(&s.to_lowercase().replace('-', "")).unwrap(),
            id
        );
        assert!(NodeId::parse(&s[..50]).is_err());
        assert!(NodeId::parse(&format!("{s}A")).is_err());
        assert!(NodeId::parse("not an id at all").is_err());
        let e = NodeId::parse("0000").unwrap_err();
        assert!(e.contains("hotsync id"), "{e}");
    }

    #[test]
    fn keygen_is_idempotent_and_private() {
        let t = tempfile::tempdir().unwrap();
        let home = t.path().join("h");
        let (a, created) = keygen(&home).unwrap();
        assert!(created);
        let (b, created) = keygen(&home).unwrap();
        assert!(!created);
        assert_eq!(a.id, b.id);
        for f in [KEY_FILE, CERT_FILE] {
            let mode = std::fs::metadata(home.join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        assert_eq!(
            std::fs::metadata(&home).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(load(&t.path().join("none")).is_err());
    }
}
