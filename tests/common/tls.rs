//! TLS harness: certificates made in the test (a CA, and server and client
//! certificates it signs, with rcgen), written as PEM files into a temp dir
//! removed on drop; and a `redis-server` with a TLS port beside its plain
//! one (the plain port sets data up and tells when it is ready).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

use super::{free_port, Redis};

static DIRS: AtomicU32 = AtomicU32::new(0);

/// A certificate authority and the directory its files go in.
pub struct Certs {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Certs {
    /// A new CA named `name`, its certificate in `<dir>/ca.pem`.
    pub fn new(name: &str) -> Certs {
        let dir = std::env::temp_dir().join(format!(
            "redis-proxy-tls-{}-{}-{name}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("create the certificate dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let ca = CertifiedIssuer::self_signed(params, key).expect("self-sign the CA");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write ca.pem");
        Certs { dir, ca }
    }

    /// The CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A path in this CA's directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// A new key and a certificate for `names` (DNS names or IP addresses)
    /// signed by this CA, written to `<stem>.pem` and `<stem>.key`.
    pub fn issue(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            self.path(&format!("{stem}.pem")),
            self.path(&format!("{stem}.key")),
        );
        self.issue_to(&cert, &key, names);
        (cert, key)
    }

    /// [`Certs::issue`] to the given paths (to replace a server's files).
    pub fn issue_to(&self, cert: &Path, key: &Path, names: &[&str]) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("certificate params");
        params
            .distinguished_name
            .push(DnType::CommonName, "redis-proxy test");
        let pair = KeyPair::generate().expect("key");
        let signed = params.signed_by(&pair, &self.ca).expect("sign");
        std::fs::write(cert, signed.pem()).expect("write the certificate");
        std::fs::write(key, pair.serialize_pem()).expect("write the key");
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A redis-server with a TLS port (and its plain port, for the test's own
/// commands), its certificate files at fixed paths so a restart after
/// [`Certs::issue_to`] picks up new ones.
pub struct TlsRedis {
    pub redis: Redis,
    pub tls_port: u16,
}

impl TlsRedis {
    /// Serves TLS with `cert`/`key`, verifies clients against `ca` and asks
    /// them for a certificate when `auth_clients`.
    pub fn start(cert: &Path, key: &Path, ca: &Path, auth_clients: bool) -> TlsRedis {
        let tls_port = free_port();
        let port = tls_port.to_string();
        let (cert, key, ca) = (
            cert.to_string_lossy(),
            key.to_string_lossy(),
            ca.to_string_lossy(),
        );
        let auth = if auth_clients { "yes" } else { "no" };
        let redis = Redis::start_with(&[
            "--tls-port",
            &port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            auth,
        ]);
        TlsRedis { redis, tls_port }
    }

    /// A server certificate from `certs` for `localhost` and `127.0.0.1`,
    /// in `server.pem`/`server.key`.
    pub fn start_signed_by(certs: &Certs, auth_clients: bool) -> TlsRedis {
        let (cert, key) = certs.issue("server", &["localhost", "127.0.0.1"]);
        TlsRedis::start(&cert, &key, &certs.ca_file(), auth_clients)
    }

    /// `rediss://127.0.0.1:<tls port>/0`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.tls_port)
    }
}
