//! The cluster secret and the certificates that stand for it.
//!
//! One file, the **cluster secret** (`cluster_secret_file`: `blxsec_` and
//! 64 hex digits, 32 random bytes), is all the initial members of a cluster
//! share. From it every holder derives the same **cluster CA**, with no
//! message exchanged:
//!
//! - HKDF-SHA256 (RFC 5869; salt [`CA_KEY_SALT`], info [`CA_KEY_INFO`]) of
//!   the secret gives a 32-byte Ed25519 seed, the CA's private key (its
//!   PKCS#8 form is a fixed prefix and the seed);
//! - the CA certificate is self-signed with fixed contents: a subject that
//!   names the key's fingerprint, the serial number rcgen derives from the
//!   public key, a fixed validity. Ed25519 signatures are deterministic, so
//!   every holder makes the very same certificate, byte for byte.
//!
//! Each member then issues its own member certificate locally, with a key
//! it makes at start ([`ClusterCa::issue`]), and trusts that CA. The
//! secret never crosses the network: a host that joins without it makes
//! its own key and sends only a certificate signing request, which the
//! member it joins through signs (`Peer.Admit`); clients get theirs the
//! same way (`cluster issue-client`). A join token carries the CA's
//! [`Fingerprint`] (the SHA-256 of its SubjectPublicKeyInfo, as kubeadm's
//! discovery hash), so a joiner checks it reached this cluster before it
//! sends anything.
//!
//! Rotation: a member given `cluster_secret_accepted_file` as well trusts
//! that secret's CA too (and still issues from its `cluster_secret_file`),
//! so a cluster changes its secret in three rolling restarts (accept the
//! new one everywhere, issue from it, stop accepting the old one) and two
//! members never refuse each other on the way (docs/security.md).
//!
//! The files a host that joined without the secret keeps in its data dir
//! ([`JoinedFiles`]): its private key, made before its first admission
//! attempt and kept across restarts until it is admitted; its member id;
//! and, once admitted, the certificate the cluster issued and the CA
//! certificates the cluster trusts.
//!
//! Nothing here formats a secret or a private key: [`ClusterSecret`]'s and
//! [`ClusterCa`]'s `Debug` leave them out.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ED25519, PublicKeyData, SanType, SerialNumber,
};
use ring::rand::SecureRandom as _;
use sha2::{Digest, Sha256};

use crate::api::tls::{CertIdentity, Kind};

/// What every cluster secret starts with, so a leaked one is recognisable.
pub const SECRET_PREFIX: &str = "blxsec_";
/// Bytes of randomness in a secret.
pub const SECRET_BYTES: usize = 32;
/// HKDF salt and info of the CA key: a new derivation gets new labels.
pub const CA_KEY_SALT: &[u8] = b"blixard cluster CA key";
pub const CA_KEY_INFO: &[u8] = b"ed25519 seed v1";
/// The PKCS#8 v1 encoding of an Ed25519 private key (RFC 8410): this
/// prefix, then the 32-byte seed.
const ED25519_PKCS8_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
/// How long a member or client certificate is valid by default.
pub const LEAF_VALID_DAYS_DEFAULT: i64 = 825;
/// The longest validity `cluster issue-client` grants.
pub const LEAF_VALID_DAYS_MAX: i64 = 3650;
/// How long the client certificate the CLI issues itself lives: one call.
pub const CLI_CERT_VALID_DAYS: i64 = 1;
/// Longest certificate signing request accepted (a few hundred bytes).
pub const CSR_BYTES_MAX: usize = 16 * 1024;
/// Longest secret, key or certificate file read.
const FILE_BYTES_MAX: u64 = 1024 * 1024;
/// Addresses (IP or DNS) named in one member certificate.
pub const SANS_MAX: usize = 16;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PkiError {
    /// A file that is not what it should be, or cannot be read: the
    /// operator's to fix.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Io(String),
    #[error("cannot make the certificate: {0}")]
    Generate(String),
}

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> Self {
        PkiError::Generate(e.to_string())
    }
}

fn random_bytes(bytes: &mut [u8]) -> Result<(), PkiError> {
    ring::rand::SystemRandom::new()
        .fill(bytes)
        .map_err(|_| PkiError::Io("cannot read random bytes from the operating system".into()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

/// Reads a small file, refusing anything larger than a key or certificate
/// can be.
pub fn read_small(what: &str, path: &Path) -> Result<Vec<u8>, PkiError> {
    let cannot = |e: String| PkiError::Invalid(format!("cannot read {what} {}: {e}", path.display()));
    let len = std::fs::metadata(path).map_err(|e| cannot(io_reason(&e)))?.len();
    if len > FILE_BYTES_MAX {
        return Err(cannot(format!("it is {len} bytes, larger than {what} can be")));
    }
    std::fs::read(path).map_err(|e| cannot(io_reason(&e)))
}

/// "No such file or directory (os error 2)" -> "No such file or directory"
pub fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// The shared secret a cluster's certificates derive from.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret([u8; SECRET_BYTES]);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// A new secret from the operating system's random generator.
    pub fn generate() -> Result<ClusterSecret, PkiError> {
        let mut bytes = [0u8; SECRET_BYTES];
        random_bytes(&mut bytes)?;
        Ok(ClusterSecret(bytes))
    }

    /// The file's text: the prefix and 64 hex digits (surrounding
    /// whitespace ignored).
    pub fn parse(text: &str) -> Option<ClusterSecret> {
        let bytes = unhex(text.trim().strip_prefix(SECRET_PREFIX)?)?;
        Some(ClusterSecret(bytes.try_into().ok()?))
    }

    /// Reads a secret file. A file others can read is used with a warning
    /// (systemd credentials and agenix may leave group bits set).
    pub fn read(path: &Path) -> Result<ClusterSecret, PkiError> {
        let text = read_small("the cluster secret", path)?;
        let secret = std::str::from_utf8(&text).ok().and_then(ClusterSecret::parse).ok_or_else(|| {
            PkiError::Invalid(format!(
                "{} is not a cluster secret ({SECRET_PREFIX} and 64 hex digits); make one with \
                 `blixard-agent cluster new-secret FILE`",
                path.display()
            ))
        })?;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o007 != 0
        {
            tracing::warn!(
                path = %path.display(),
                "the cluster secret file can be read by every user of this host; make it mode 0600 or 0400"
            );
        }
        Ok(secret)
    }

    /// The file's text.
    pub fn to_text(&self) -> String {
        format!("{SECRET_PREFIX}{}\n", hex(&self.0))
    }

    /// Writes a new secret file with mode 0600, never over an existing file.
    pub fn write_new(&self, path: &Path) -> Result<(), PkiError> {
        write_new(path, self.to_text().as_bytes(), 0o600)
    }

    /// The Ed25519 seed of the cluster CA's key (HKDF-SHA256).
    fn ca_seed(&self) -> [u8; 32] {
        struct Len;
        impl ring::hkdf::KeyType for Len {
            fn len(&self) -> usize {
                32
            }
        }
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, CA_KEY_SALT).extract(&self.0);
        let mut seed = [0u8; 32];
        prk.expand(&[CA_KEY_INFO], Len)
            .and_then(|okm| okm.fill(&mut seed))
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        seed
    }
}

/// The SHA-256 of a CA certificate's SubjectPublicKeyInfo: what a join
/// token pins. Written `sha256:` and 64 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of_spki(spki_der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(spki_der).into())
    }

    /// The fingerprint of a DER certificate's public key.
    pub fn of_cert_der(der: &[u8]) -> Result<Fingerprint, PkiError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| PkiError::Invalid(format!("a certificate does not parse: {e}")))?;
        Ok(Fingerprint::of_spki(cert.tbs_certificate.subject_pki.raw))
    }

    /// 64 hex digits.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }

    pub fn from_hex(text: &str) -> Option<Fingerprint> {
        Some(Fingerprint(unhex(text)?.try_into().ok()?))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

/// A certificate and its private key, PEM-encoded.
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// A CA that issues certificates: the one derived from the cluster secret.
pub struct ClusterCa {
    key: KeyPair,
    params: CertificateParams,
    cert_pem: String,
    cert_der: Vec<u8>,
    fingerprint: Fingerprint,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").field("fingerprint", &self.fingerprint).finish_non_exhaustive()
    }
}

/// Valid from a day ago (clock skew between hosts) for `days` days.
fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days);
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    random_bytes(&mut bytes)?;
    // Positive, and 16 bytes long in its DER encoding.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

impl ClusterCa {
    /// The CA every holder of `secret` derives (see the module doc).
    pub fn from_secret(secret: &ClusterSecret) -> ClusterCa {
        let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
        pkcs8.extend_from_slice(&secret.ca_seed());
        let key = KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8.as_slice().into(), &PKCS_ED25519)
            .expect("a 32-byte seed is a valid Ed25519 key");
        let fingerprint = Fingerprint::of_spki(&key.subject_public_key_info());
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        // Distinct subjects for distinct secrets: during a rotation two CAs
        // are trusted at once, and a verifier finds an issuer by its name.
        params.distinguished_name.push(DnType::CommonName, format!("blixard cluster CA {}", &fingerprint.hex()[..16]));
        params.distinguished_name.push(DnType::OrganizationName, "blixard");
        let day = |year, month, day| {
            time::Date::from_calendar_date(year, month, day).expect("a valid date").midnight().assume_utc()
        };
        params.not_before = day(2025, time::Month::January, 1);
        params.not_after = day(9999, time::Month::December, 31);
        let cert = params.self_signed(&key).expect("the CA's fixed parameters are valid");
        ClusterCa { cert_pem: cert.pem(), cert_der: cert.der().to_vec(), key, params, fingerprint }
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// A certificate for `identity` and `public_key`, valid for `days`.
    /// A member's names its peers dial it by (`sans`); a client's carries
    /// its role.
    pub fn issue(
        &self,
        identity: &CertIdentity,
        public_key: &impl PublicKeyData,
        sans: &[SanType],
        days: i64,
    ) -> Result<String, PkiError> {
        let params = leaf_params(identity, sans, days, Some(random_serial()?))?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        Ok(params.signed_by(public_key, &issuer)?.pem())
    }

    /// [`ClusterCa::issue`] with a new ECDSA P-256 key made here.
    pub fn issue_with_new_key(&self, identity: &CertIdentity, sans: &[SanType], days: i64) -> Result<Pem, PkiError> {
        let key = KeyPair::generate()?;
        let cert = self.issue(identity, &key, sans, days)?;
        Ok(Pem { cert, key: key.serialize_pem() })
    }

    /// Signs a certificate signing request for `identity`: only the
    /// request's public key is used (after checking its signature, which
    /// proves the sender holds the key); names and extensions come from
    /// here, never from the request.
    pub fn sign_request(
        &self,
        identity: &CertIdentity,
        csr_der: &[u8],
        sans: &[SanType],
        days: i64,
    ) -> Result<String, PkiError> {
        let request = parse_request(csr_der)?;
        self.issue(identity, &request.public_key, sans, days)
    }
}

/// Parses and checks a certificate signing request.
pub fn parse_request(csr_der: &[u8]) -> Result<CertificateSigningRequestParams, PkiError> {
    if csr_der.is_empty() || csr_der.len() > CSR_BYTES_MAX {
        return Err(PkiError::Invalid(format!(
            "a certificate signing request is 1 to {CSR_BYTES_MAX} bytes, not {}",
            csr_der.len()
        )));
    }
    CertificateSigningRequestParams::from_der(&csr_der.into())
        .map_err(|e| PkiError::Invalid(format!("the certificate signing request is not valid: {e}")))
}

/// The parameters of a member or client certificate: the blixard identity
/// as URI names (`api::tls`), the addresses for a member, the key usages.
pub fn leaf_params(
    identity: &CertIdentity,
    sans: &[SanType],
    days: i64,
    serial: Option<SerialNumber>,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, identity.name.as_str());
    params.distinguished_name.push(DnType::OrganizationalUnitName, identity.kind.as_str());
    params.subject_alt_names.push(SanType::URI(identity.uri().try_into()?));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    match identity.kind {
        Kind::Member => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            params.subject_alt_names.extend(sans.iter().cloned());
        }
        Kind::Client => {
            params.subject_alt_names.push(SanType::URI(identity.role_uri().try_into()?));
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    params.use_authority_key_identifier_extension = true;
    params.serial_number = serial;
    validity(&mut params, days);
    Ok(params)
}

/// The names a member is dialled by: the host of its address (an IP or a
/// DNS name) and its node name (a valid DNS label, for `--endpoint h1:7000`).
pub fn member_sans(address: &str, node_name: &str) -> Vec<SanType> {
    let mut sans = Vec::new();
    if let Ok(san) = crate::certs::parse_address(address) {
        sans.push(san);
    }
    if let Ok(name) = node_name.to_string().try_into() {
        let san = SanType::DnsName(name);
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    sans
}

/// A new key and a certificate signing request for it (the joiner's and
/// `cluster issue-client`'s side). The request's subject is informative
/// only: the issuer decides every name.
pub fn new_key_and_request(common_name: &str) -> Result<(KeyPair, Vec<u8>), PkiError> {
    let key = KeyPair::generate()?;
    let request = request_for(&key, common_name)?;
    Ok((key, request))
}

/// A certificate signing request for `key`.
pub fn request_for(key: &KeyPair, common_name: &str) -> Result<Vec<u8>, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, common_name);
    Ok(params.serialize_request(key)?.der().to_vec())
}

/// The DER certificates of a PEM text, in order.
pub fn certs_of_pem(pem: &[u8]) -> Result<Vec<Vec<u8>>, PkiError> {
    let text = std::str::from_utf8(pem).map_err(|_| PkiError::Invalid("the PEM text is not UTF-8".into()))?;
    let blocks = ::pem::parse_many(text).map_err(|e| PkiError::Invalid(format!("the PEM text does not parse: {e}")))?;
    let certs: Vec<Vec<u8>> =
        blocks.into_iter().filter(|b| b.tag() == "CERTIFICATE").map(|b| b.contents().to_vec()).collect();
    if certs.is_empty() {
        return Err(PkiError::Invalid("the PEM text holds no certificate".into()));
    }
    Ok(certs)
}

/// DER as one PEM certificate block.
pub fn pem_of_cert(der: &[u8]) -> String {
    ::pem::encode(&::pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// Checks a certificate the cluster issued to this host: it parses, is
/// for `identity`, holds `key`'s public key, and is signed by one of the
/// CA certificates in `ca_pem`.
pub fn check_issued(cert_pem: &[u8], key: &KeyPair, identity: &CertIdentity, ca_pem: &[u8]) -> Result<(), PkiError> {
    let der = certs_of_pem(cert_pem)?.into_iter().next().expect("at least one");
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| PkiError::Invalid(format!("the issued certificate does not parse: {e}")))?;
    let got = crate::api::tls::identity_of_der(&der).map_err(PkiError::Invalid)?;
    if got != *identity {
        return Err(PkiError::Invalid(format!("the issued certificate is for {}, not {}", got.uri(), identity.uri())));
    }
    if cert.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
        return Err(PkiError::Invalid("the issued certificate is not for this host's key".into()));
    }
    issuer_in(&der, ca_pem)
        .map(|_| ())
        .ok_or_else(|| PkiError::Invalid("the issued certificate is not signed by the cluster's CA".into()))
}

/// The certificate (DER) among the CA certificates of `ca_pem` whose key
/// signed the DER certificate `cert_der`, if any.
pub fn issuer_in(cert_der: &[u8], ca_pem: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    certs_of_pem(ca_pem).ok()?.into_iter().find(|ca| {
        x509_parser::parse_x509_certificate(ca)
            .is_ok_and(|(_, ca)| cert.verify_signature(Some(ca.public_key())).is_ok())
    })
}

/// Writes `bytes` to a new file with `mode`, never over an existing one.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |e: std::io::Error| PkiError::Io(format!("cannot write {}: {}", path.display(), io_reason(&e)));
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Replaces `path` with `bytes` atomically and durably: a temporary file
/// in the same directory, fsynced, renamed over it, the directory fsynced.
/// A crash leaves the old file or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |e: std::io::Error| PkiError::Io(format!("cannot write {}: {}", path.display(), io_reason(&e)));
    let dir = path.parent().ok_or_else(|| PkiError::Io(format!("{} has no directory", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    let _ = std::fs::remove_file(&tmp);
    {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io)?;
        file.write_all(bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

/// The credentials a host that joined without the cluster secret keeps in
/// its data dir (`DATA_DIR/tls/`, mode 0700).
#[derive(Debug, Clone)]
pub struct JoinedFiles {
    pub dir: PathBuf,
}

impl JoinedFiles {
    pub fn in_data_dir(data_dir: &Path) -> JoinedFiles {
        JoinedFiles { dir: data_dir.join("tls") }
    }

    /// This host's private key (PKCS#8 PEM, mode 0600).
    pub fn key(&self) -> PathBuf {
        self.dir.join("member.key")
    }

    /// The member certificate the cluster issued.
    pub fn cert(&self) -> PathBuf {
        self.dir.join("member.pem")
    }

    /// The CA certificates the cluster trusts.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Whether the cluster issued this host its certificate.
    pub fn admitted(&self) -> bool {
        self.cert().exists() && self.ca().exists() && self.key().exists()
    }

    /// This host's key: the one made before an earlier attempt, or a new
    /// one, written (durably) before it is used, so that every attempt to
    /// join, across restarts, presents the same key.
    pub fn key_or_create(&self) -> Result<KeyPair, PkiError> {
        let path = self.key();
        if path.exists() {
            let pem = read_small("this host's key", &path)?;
            let text = std::str::from_utf8(&pem)
                .map_err(|_| PkiError::Invalid(format!("{} is not a PEM private key", path.display())))?;
            return KeyPair::from_pem(text)
                .map_err(|e| PkiError::Invalid(format!("{} is not a usable private key: {e}", path.display())));
        }
        self.create_dir()?;
        let key = KeyPair::generate()?;
        write_atomic(&path, key.serialize_pem().as_bytes(), 0o600)?;
        Ok(key)
    }

    fn create_dir(&self) -> Result<(), PkiError> {
        std::fs::create_dir_all(&self.dir)
            .and_then(|()| std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| PkiError::Io(format!("cannot create {}: {}", self.dir.display(), io_reason(&e))))
    }

    /// Records what the cluster issued: the CA certificates first, then
    /// the certificate, whose presence marks the host admitted.
    pub fn write_issued(&self, cert_pem: &[u8], ca_pem: &[u8]) -> Result<(), PkiError> {
        self.create_dir()?;
        write_atomic(&self.ca(), ca_pem, 0o644)?;
        write_atomic(&self.cert(), cert_pem, 0o644)
    }
}

/// Where a joining host keeps the member id it asks for, in its data dir.
pub const JOIN_ID_FILE: &str = "join-id";

/// The member id a joining host asks for, kept in `DATA_DIR/join-id`
/// across restarts: a retried admission whose first attempt landed is
/// then recognised as the same host (and its join token as its own).
pub fn join_id_or_create(data_dir: &Path, random: impl FnOnce() -> u64) -> Result<u64, PkiError> {
    let path = data_dir.join(JOIN_ID_FILE);
    if path.exists() {
        let text = read_small("the join id", &path)?;
        return std::str::from_utf8(&text)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .filter(|id| *id != 0)
            .ok_or_else(|| PkiError::Invalid(format!("{} does not hold a member id", path.display())));
    }
    std::fs::create_dir_all(data_dir)
        .map_err(|e| PkiError::Io(format!("cannot create {}: {}", data_dir.display(), io_reason(&e))))?;
    let id = random();
    write_atomic(&path, format!("{id}\n").as_bytes(), 0o644)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tls::{Role, identity_of_pem};

    #[test]
    fn secrets_round_trip_and_bad_ones_are_refused() {
        let secret = ClusterSecret::generate().unwrap();
        assert_eq!(ClusterSecret::parse(&secret.to_text()), Some(secret.clone()));
        assert_ne!(ClusterSecret::generate().unwrap(), secret);
        assert!(!format!("{secret:?}").contains(&secret.to_text()[SECRET_PREFIX.len()..][..8]));
        for bad in ["", "blxsec_", "blxsec_00", &format!("blxsec_{}", "g".repeat(64)), &"0".repeat(71)] {
            assert!(ClusterSecret::parse(bad).is_none(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        secret.write_new(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(secret.write_new(&path).is_err(), "never over an existing file");
        assert_eq!(ClusterSecret::read(&path).unwrap(), secret);
        std::fs::write(dir.path().join("junk"), "hello").unwrap();
        let e = ClusterSecret::read(&dir.path().join("junk")).unwrap_err();
        assert!(e.to_string().contains("is not a cluster secret"), "{e}");
    }

    #[test]
    fn every_holder_derives_the_same_ca_and_other_secrets_another() {
        let secret = ClusterSecret::parse(&format!("{SECRET_PREFIX}{}", "ab".repeat(32))).unwrap();
        let (a, b) = (ClusterCa::from_secret(&secret), ClusterCa::from_secret(&secret));
        assert_eq!(a.cert_pem(), b.cert_pem(), "byte for byte");
        assert_eq!(a.fingerprint(), Fingerprint::of_cert_der(a.cert_der()).unwrap());
        let other = ClusterCa::from_secret(&ClusterSecret::generate().unwrap());
        assert_ne!(other.fingerprint(), a.fingerprint());
        assert_eq!(Fingerprint::from_hex(&a.fingerprint().hex()), Some(a.fingerprint()));
        assert!(a.fingerprint().to_string().starts_with("sha256:"));
    }

    #[test]
    fn issued_certificates_carry_identity_role_and_pass_the_joiners_check() {
        let ca = ClusterCa::from_secret(&ClusterSecret::generate().unwrap());
        let member = CertIdentity::member("h4");
        let (key, csr) = new_key_and_request("anything").unwrap();
        let sans = member_sans("10.0.0.4:7000", "h4");
        let cert = ca.sign_request(&member, &csr, &sans, 30).unwrap();
        assert_eq!(identity_of_pem(cert.as_bytes()).unwrap(), member);
        check_issued(cert.as_bytes(), &key, &member, ca.cert_pem().as_bytes()).unwrap();
        // Another key, another identity, another CA: each refused.
        let other_key = KeyPair::generate().unwrap();
        assert!(check_issued(cert.as_bytes(), &other_key, &member, ca.cert_pem().as_bytes()).is_err());
        assert!(check_issued(cert.as_bytes(), &key, &CertIdentity::member("h5"), ca.cert_pem().as_bytes()).is_err());
        let other_ca = ClusterCa::from_secret(&ClusterSecret::generate().unwrap());
        assert!(check_issued(cert.as_bytes(), &key, &member, other_ca.cert_pem().as_bytes()).is_err());

        let reader = CertIdentity::client("ops", Role::ReadOnly);
        let pem = ca.issue_with_new_key(&reader, &[], 30).unwrap();
        assert_eq!(identity_of_pem(pem.cert.as_bytes()).unwrap(), reader);
        assert!(parse_request(b"not a request").is_err());
        assert!(parse_request(&vec![0u8; CSR_BYTES_MAX + 1]).is_err());
    }

    /// The crates really do it: rustls with the ring provider completes a
    /// TLS 1.3 handshake, both sides verifying the other's certificate
    /// against the Ed25519 CA derived from a secret, and refuses a client
    /// of another secret's CA.
    #[tokio::test]
    async fn tls13_with_the_derived_ed25519_ca_works_through_rustls_and_ring() {
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
        use tokio_rustls::rustls::{self, RootCertStore};

        let ca = ClusterCa::from_secret(&ClusterSecret::generate().unwrap());
        let stranger = ClusterCa::from_secret(&ClusterSecret::generate().unwrap());
        let provider = || Arc::new(rustls::crypto::ring::default_provider());
        let chain = |pem: &Pem, ca: &ClusterCa| {
            let mut chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(pem.cert.as_bytes()).map(Result::unwrap).collect();
            chain.push(CertificateDer::from(ca.cert_der().to_vec()));
            (chain, PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).unwrap())
        };
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(ca.cert_der().to_vec())).unwrap();
        let roots = Arc::new(roots);

        let server_pem =
            ca.issue_with_new_key(&CertIdentity::member("h1"), &member_sans("127.0.0.1:7000", "h1"), 1).unwrap();
        let (server_chain, server_key) = chain(&server_pem, &ca);
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider()).build().unwrap();
        let server_config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(server_chain, server_key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));

        let handshake = |client_ca: &ClusterCa| {
            let client_pem = client_ca.issue_with_new_key(&CertIdentity::client("ops", Role::Admin), &[], 1).unwrap();
            let (client_chain, client_key) = chain(&client_pem, client_ca);
            let client_config = rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_client_auth_cert(client_chain, client_key)
                .unwrap();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
            let acceptor = acceptor.clone();
            async move {
                let (client_io, server_io) = tokio::io::duplex(64 * 1024);
                let server = tokio::spawn(async move {
                    let mut tls = acceptor.accept(server_io).await?;
                    let (_, session) = tls.get_ref();
                    assert_eq!(session.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
                    let peer = session.peer_certificates().expect("a client certificate").to_vec();
                    let mut byte = [0u8; 1];
                    tls.read_exact(&mut byte).await?;
                    tls.write_all(&byte).await?;
                    tls.flush().await?;
                    Ok::<_, std::io::Error>(peer)
                });
                let name = ServerName::try_from("127.0.0.1").unwrap();
                let client = async {
                    let mut tls = connector.connect(name, client_io).await?;
                    tls.write_all(b"x").await?;
                    tls.flush().await?;
                    // Until the server answers: it checks our certificate
                    // after our first bytes.
                    let mut byte = [0u8; 1];
                    tls.read_exact(&mut byte).await?;
                    Ok::<_, std::io::Error>(())
                };
                let (client, server) = tokio::join!(client, server);
                client.and(server.unwrap())
            }
        };
        let peer = handshake(&ca).await.expect("same CA: the handshake completes");
        let identity = crate::api::tls::identity_of_der(peer[0].as_ref()).unwrap();
        assert_eq!(identity, CertIdentity::client("ops", Role::Admin));
        assert!(handshake(&stranger).await.is_err(), "another secret's client is refused");
    }

    #[test]
    fn joined_files_keep_the_key_and_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let files = JoinedFiles::in_data_dir(dir.path());
        assert!(!files.admitted());
        let key = files.key_or_create().unwrap();
        assert_eq!(files.key_or_create().unwrap().public_key_raw(), key.public_key_raw());
        assert_eq!(std::fs::metadata(files.key()).unwrap().permissions().mode() & 0o777, 0o600);
        let id = join_id_or_create(dir.path(), || 42).unwrap();
        assert_eq!(id, 42);
        assert_eq!(join_id_or_create(dir.path(), || 7).unwrap(), 42, "kept across restarts");
        files.write_issued(b"cert", b"ca").unwrap();
        assert!(files.admitted());
    }
}
