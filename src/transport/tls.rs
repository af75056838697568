//! Mutual TLS with pinned identities. Certificates are self-signed; what authenticates a
//! peer is the SHA-256 of its certificate (its [`NodeId`]) together with the handshake's
//! signature, which proves it holds the certificate's key. The primary accepts only the
//! server ID it was given; the standby accepts any well-formed client certificate at the
//! TLS layer and checks the ID against `--allow` before reading a single frame, so a
//! refused primary can be told exactly why.

use crate::transport::identity::{Identity, NodeId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::sync::{Arc, Mutex};

/// The ALPN protocol name. It names the transport and stays fixed: protocol versions are
/// negotiated in the greeting that follows, so a peer of another version is told which.
pub(crate) const ALPN: &[u8] = b"hotsync/1";

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// The handshake-signature checks both verifiers share: whatever the ID, the peer must
/// prove it holds the key of the certificate it shows. (`self.algs` holds the algorithms.)
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

/// Accepts exactly one server ID, and remembers the ID it was shown.
#[derive(Debug)]
pub(crate) struct PinnedServer {
    pub expected: NodeId,
    pub seen: Mutex<Option<NodeId>>,
    algs: WebPkiSupportedAlgorithms,
}

impl PinnedServer {
    pub(crate) fn new(expected: NodeId) -> Arc<Self> {
        Arc::new(PinnedServer {
            expected,
            seen: Mutex::new(None),
            algs: algorithms(),
        })
    }
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = NodeId::of_cert(end_entity);
        *self.seen.lock().unwrap() = Some(id);
        if id == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    signature_checks!();
}

/// Requires a client certificate and checks its signature; authorisation by ID comes after
/// the handshake (see the module docs).
#[derive(Debug)]
pub(crate) struct AnyClient {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClient {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    signature_checks!();

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

/// The primary's TLS configuration: our certificate, and only `server` accepted.
pub(crate) fn client_config(
    me: &Identity,
    server: Arc<PinnedServer>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(server)
        .with_client_auth_cert(vec![me.cert.clone()], me.key.clone_key())?;
    c.alpn_protocols = vec![ALPN.to_vec()];
    Ok(c)
}

/// The standby's TLS configuration: our certificate, a client certificate required.
pub(crate) fn server_config(me: &Identity) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AnyClient { algs: algorithms() }))
        .with_single_cert(vec![me.cert.clone()], me.key.clone_key())?;
    c.alpn_protocols = vec![ALPN.to_vec()];
    Ok(c)
}

/// The ID of the peer of an established QUIC connection.
pub(crate) fn peer_id(conn: &quinn::Connection) -> Option<NodeId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| NodeId::of_cert(c))
}
