//! tls: the rustls client side of `rediss://`, for every connection the
//! proxy opens to Redis (data links, the invalidation listener, Sentinels).
//!
//! Owns building the [`ClientConfig`] from the settings (CA file or the
//! system roots, client certificate and key, the name to check, the insecure
//! switch), checking those files at start (a bad one is a bad setting, exit
//! 2), and describing a failed handshake in words an operator can act on.
//! The handshake itself runs in `connect`, inside its timeout. Uses the
//! `ring` provider: it builds with a C compiler alone (aws-lc needs cmake).

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{self, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore};

use crate::config::ConfigError;

/// The TLS settings as given (files not read yet).
#[derive(Debug, Clone, Default)]
pub struct TlsOptions<'a> {
    /// PEM bundle that verifies the server; `None` = the system roots.
    pub ca_file: Option<&'a Path>,
    /// Client certificate chain (PEM), for mutual TLS.
    pub cert_file: Option<&'a Path>,
    /// The client certificate's private key (PEM).
    pub key_file: Option<&'a Path>,
    /// Name checked against the certificate and sent as SNI; `None` = the
    /// host each connection goes to.
    pub server_name: Option<&'a str>,
    /// Skip certificate verification.
    pub insecure: bool,
}

/// A loaded client configuration: cheap to clone, shared by every
/// connection. Two are equal when they are the same load.
#[derive(Clone)]
pub struct Tls {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
    insecure: bool,
}

impl PartialEq for Tls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
    }
}

impl Eq for Tls {}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .field("insecure", &self.insecure)
            .finish()
    }
}

impl Tls {
    /// Reads and checks every file named in `options`; the error names the
    /// setting at fault.
    pub fn load(options: &TlsOptions<'_>) -> Result<Tls, ConfigError> {
        let provider = Arc::new(crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError(format!("TLS setup failed: {e}")))?;
        let builder = if options.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider.clone())))
        } else {
            builder.with_root_certificates(roots(options.ca_file)?)
        };
        let config = match (options.cert_file, options.key_file) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert_file), Some(key_file)) => {
                let chain = certificates(cert_file, CERT_FILE)?;
                let key = PrivateKeyDer::from_pem_file(key_file)
                    .map_err(|e| bad_file(KEY_FILE, key_file, &pem_error(e)))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    let why = match e {
                        rustls::Error::InconsistentKeys(_) => format!(
                            "the key does not match the certificate in {}",
                            cert_file.display()
                        ),
                        other => other.to_string(),
                    };
                    bad_file(KEY_FILE, key_file, &why)
                })?
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError(
                    "REDIS_TLS_CERT_FILE (--redis-tls-cert-file) and REDIS_TLS_KEY_FILE \
                     (--redis-tls-key-file) must be set together"
                        .into(),
                ))
            }
        };
        let server_name = options
            .server_name
            .map(|name| {
                ServerName::try_from(name.to_string()).map_err(|_| {
                    ConfigError(format!(
                        "REDIS_TLS_SERVER_NAME (--redis-tls-server-name) must be a DNS name \
                         or an IP address, not {name:?}"
                    ))
                })
            })
            .transpose()?;
        Ok(Tls {
            config: Arc::new(config),
            server_name,
            insecure: options.insecure,
        })
    }

    /// True when certificates are not verified.
    pub fn insecure(&self) -> bool {
        self.insecure
    }

    /// A client session for a connection to `host`: checks the configured
    /// server name, else `host` (a DNS name or an IP address).
    pub(crate) fn session(&self, host: &str) -> Result<ClientConnection, String> {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(host.to_string()).map_err(|_| {
                format!("{host:?} is not a TLS server name (set REDIS_TLS_SERVER_NAME)")
            })?,
        };
        ClientConnection::new(self.config.clone(), name)
            .map_err(|e| format!("TLS setup failed: {e}"))
    }
}

const CA_FILE: &str = "REDIS_TLS_CA_FILE (--redis-tls-ca-file)";
const CERT_FILE: &str = "REDIS_TLS_CERT_FILE (--redis-tls-cert-file)";
const KEY_FILE: &str = "REDIS_TLS_KEY_FILE (--redis-tls-key-file)";

fn bad_file(setting: &str, path: &Path, why: &str) -> ConfigError {
    ConfigError(format!(
        "{setting} must name a readable PEM file: {}: {why}",
        path.display()
    ))
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(e) => e.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM item of the right kind in it".into(),
        other => format!("{other:?}"),
    }
}

/// Every certificate in a PEM file; at least one.
fn certificates(path: &Path, setting: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad_file(setting, path, &pem_error(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_file(setting, path, &pem_error(e)))?;
    if certs.is_empty() {
        return Err(bad_file(setting, path, "no certificate in it"));
    }
    Ok(certs)
}

/// The CA file's certificates, or the system's roots (the OS store, else
/// the Mozilla bundle compiled in, for containers without one).
fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in certificates(path, CA_FILE)? {
                roots
                    .add(cert)
                    .map_err(|e| bad_file(CA_FILE, path, &e.to_string()))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
        }
    }
    Ok(roots)
}

/// Describes a failed TLS handshake (or a refusal the server sends right
/// after it, as TLS 1.3 servers do for a missing client certificate).
pub(crate) fn describe(e: &io::Error) -> Option<String> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(match tls {
        rustls::Error::InvalidCertificate(_) => {
            format!("TLS certificate verification failed: {tls} (check REDIS_TLS_CA_FILE and REDIS_TLS_SERVER_NAME)")
        }
        rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired
            | rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::UnknownCA
            | rustls::AlertDescription::HandshakeFailure,
        ) => format!(
            "TLS refused by the server: {tls} (does it want a client certificate? \
             REDIS_TLS_CERT_FILE, REDIS_TLS_KEY_FILE)"
        ),
        other => format!("TLS handshake failed: {other}"),
    })
}

/// `REDIS_TLS_INSECURE`: accepts any certificate, still checks that the
/// handshake is signed by the key it presents.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A missing file names its setting; a lone certificate asks for its key.
    #[test]
    fn bad_settings_name_themselves() {
        let missing = Path::new("/nonexistent/ca.pem");
        let err = Tls::load(&TlsOptions {
            ca_file: Some(missing),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.0.starts_with("REDIS_TLS_CA_FILE"), "{err}");
        let err = Tls::load(&TlsOptions {
            cert_file: Some(missing),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.0.contains("must be set together"), "{err}");
        let err = Tls::load(&TlsOptions {
            server_name: Some("not a name"),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.0.starts_with("REDIS_TLS_SERVER_NAME"), "{err}");
    }

    /// System roots load (or fall back to the bundled ones); IP hosts are names.
    #[test]
    fn system_roots_and_ip_names() {
        let tls = Tls::load(&TlsOptions::default()).unwrap();
        assert!(!tls.insecure());
        assert!(tls.session("127.0.0.1").is_ok());
        assert!(tls.session("redis.example.com").is_ok());
        assert!(tls.session("bad host").is_err());
    }
}
