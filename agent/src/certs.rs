//! `blixard-agent certs`: a cluster CA and the certificates of its hosts
//! and clients, for small clusters that have no PKI of their own.
//!
//! Every leaf certificate carries its blixard identity as a URI name
//! (`urn:blixard:member:NAME` or `urn:blixard:client:NAME` with
//! `urn:blixard:role:ROLE`, see `api::tls`). A host's certificate also names the addresses its peers
//! dial (IP addresses or DNS names) and is good for both ends of a TLS
//! connection, since an agent dials its peers with it; a client's is good
//! for the client end only.
//!
//! Keys are ECDSA P-256 (rcgen's default) and written with mode 0600;
//! nothing here prints or logs a key.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};

use crate::api::tls::CertIdentity;

/// The CA's files in a certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
/// How long a CA is valid: ten years.
pub const CA_VALID_DAYS: i64 = 3650;
/// How long a host or client certificate is valid by default.
pub const LEAF_VALID_DAYS_DEFAULT: i64 = 825;
/// Addresses named in one host certificate.
pub const ADDRESSES_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Io(String),
    #[error("cannot make the certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A certificate and its private key, PEM-encoded.
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// Valid from a day ago (clock skew) for `days` days.
fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days);
}

/// A new self-signed cluster CA.
pub fn make_ca(common_name: &str) -> Result<Pem, CertsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name.push(DnType::CommonName, common_name);
    validity(&mut params, CA_VALID_DAYS);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
}

/// One address a host is dialled at: an IP address, a DNS name, either
/// with a port (which is dropped).
pub fn parse_address(text: &str) -> Result<SanType, String> {
    if let Ok(socket) = text.parse::<SocketAddr>() {
        return Ok(SanType::IpAddress(socket.ip()));
    }
    let host = text.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let host = match text.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => text,
    };
    let dns_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
        });
    if !dns_ok {
        return Err(format!("{text:?} is not an IP address or DNS name"));
    }
    Ok(SanType::DnsName(host.to_ascii_lowercase().try_into().map_err(|_| format!("{text:?} is not a DNS name"))?))
}

/// A certificate for `identity`, signed by `ca`. `addresses` are the names
/// a member's peers dial it at (ignored for a client).
pub fn make_leaf(ca: &Pem, identity: &CertIdentity, addresses: &[SanType], days: i64) -> Result<Pem, CertsError> {
    let ca_key = KeyPair::from_pem(&ca.key).map_err(|e| CertsError::Usage(format!("the CA key does not load: {e}")))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)
        .map_err(|e| CertsError::Usage(format!("the CA certificate does not load: {e}")))?;
    let params = crate::pki::leaf_params(identity, addresses, days, None).map_err(|e| CertsError::Io(e.to_string()))?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
}

/// Reads the CA from `dir`.
pub fn read_ca(dir: &Path) -> Result<Pem, CertsError> {
    let read = |file: &str| {
        std::fs::read_to_string(dir.join(file)).map_err(|e| {
            CertsError::Usage(format!(
                "cannot read {}: {e}; create the CA first with `blixard-agent certs ca --dir {}`",
                dir.join(file).display(),
                dir.display()
            ))
        })
    };
    Ok(Pem { cert: read(CA_CERT_FILE)?, key: read(CA_KEY_FILE)? })
}

/// Writes `pem` as `dir/STEM.pem` and `dir/STEM.key` (mode 0600), never
/// over an existing file. Returns the paths written.
pub fn write_pair(dir: &Path, cert_file: &str, key_file: &str, pem: &Pem) -> Result<Vec<PathBuf>, CertsError> {
    std::fs::create_dir_all(dir).map_err(|e| CertsError::Io(format!("cannot create {}: {e}", dir.display())))?;
    let cert_path = dir.join(cert_file);
    let key_path = dir.join(key_file);
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(CertsError::Usage(format!(
                "{} already exists; remove it or choose another --dir",
                path.display()
            )));
        }
    }
    write_new(&key_path, &pem.key, 0o600)?;
    write_new(&cert_path, &pem.cert, 0o644)?;
    Ok(vec![cert_path, key_path])
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), CertsError> {
    let io = |e: std::io::Error| CertsError::Io(format!("cannot write {}: {e}", path.display()));
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tls::identity_of_pem;

    #[test]
    fn leaves_carry_their_identity_and_addresses_parse() {
        let ca = make_ca("test CA").unwrap();
        let member = CertIdentity::member("h1");
        let addresses = [parse_address("10.0.0.1:7000").unwrap(), parse_address("h1.example").unwrap()];
        let leaf = make_leaf(&ca, &member, &addresses, 30).unwrap();
        assert_eq!(identity_of_pem(leaf.cert.as_bytes()).unwrap(), member);
        let client = CertIdentity::client("ops", crate::api::tls::Role::ReadOnly);
        assert_eq!(identity_of_pem(make_leaf(&ca, &client, &[], 30).unwrap().cert.as_bytes()).unwrap(), client);
        assert!(matches!(parse_address("[::1]:7000").unwrap(), SanType::IpAddress(_)));
        assert!(matches!(parse_address("::1").unwrap(), SanType::IpAddress(_)));
        for bad in ["", "a b", "-x", "x..y", "h1:notaport"] {
            assert!(parse_address(bad).is_err(), "{bad}");
        }
    }
}
