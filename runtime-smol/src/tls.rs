//! Transport authentication: every node presents a self-signed certificate
//! made from its Ed25519 identity key, and each side checks that the key in
//! the other's certificate hashes to the peer ID it expected (the dialler)
//! or learns who connected (the listener). TLS 1.3 only, ring only.
//!
//! The peer ID is taken from the certificate's subject public key info,
//! parsed by webpki, and the handshake signature is checked against that
//! same key: a certificate cannot name one key and sign with another.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use p2pchat_protocol::{IdentityKeyPair, IdentityPublicKey, PeerId};

/// The ALPN protocol of p2pchat connections.
pub const ALPN: &[u8] = b"p2pchat/1";

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the
/// 32-byte key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
/// The DER prefix of an Ed25519 PKCS#8 v1 private key; the 32-byte seed follows.
const ED25519_PKCS8_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

/// Why a TLS identity could not be made or checked.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate could not be generated.
    #[error("cannot make this node's certificate: {0}")]
    Certificate(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// This node's certificate and key, and its peer ID.
pub struct TlsIdentity {
    certificate: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    peer: PeerId,
}

impl core::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TlsIdentity").field("peer", &self.peer).finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// A self-signed certificate of `identity`'s Ed25519 key.
    pub fn new(identity: &IdentityKeyPair) -> Result<Self, TlsError> {
        let seed = identity.seed();
        let mut pkcs8 = zeroize::Zeroizing::new(ED25519_PKCS8_PREFIX.to_vec());
        pkcs8.extend_from_slice(seed.as_bytes());
        let pkcs8 = pkcs8.to_vec();
        let key = PrivatePkcs8KeyDer::from(pkcs8);
        let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key, &rcgen::PKCS_ED25519)
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        let params = rcgen::CertificateParams::new(vec!["p2pchat".to_owned()])
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        let certificate = params.self_signed(&pair).map_err(|e| TlsError::Certificate(e.to_string()))?;
        Ok(Self { certificate: certificate.der().clone(), key, peer: identity.peer_id() })
    }

    /// This node's peer ID.
    pub fn peer_id(&self) -> PeerId {
        self.peer
    }

    /// This node's certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// TLS for connections this node accepts: any p2pchat identity may
    /// connect (the node learns which from its certificate).
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = provider();
        let verifier = Arc::new(PeerVerifier { expected: None, provider: provider.clone() });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.certificate.clone()], PrivateKeyDer::Pkcs8(self.key.clone_key()))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// TLS for a connection this node dials to `expected`: the other side's
    /// certificate key must hash to that peer ID.
    pub fn client_config(&self, expected: PeerId) -> Result<rustls::ClientConfig, TlsError> {
        let provider = provider();
        let verifier = Arc::new(PeerVerifier { expected: Some(expected), provider: provider.clone() });
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(vec![self.certificate.clone()], PrivateKeyDer::Pkcs8(self.key.clone_key()))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The peer ID a certificate proves: the hash of its Ed25519 key. `None`
/// for a certificate that does not parse or holds another kind of key.
pub fn peer_of_certificate(certificate: &CertificateDer<'_>) -> Option<PeerId> {
    let cert = webpki::EndEntityCert::try_from(certificate).ok()?;
    let spki = cert.subject_public_key_info();
    let key = spki.as_ref().strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    let key: [u8; 32] = key.try_into().ok()?;
    // Strict parsing: the one canonical, non-small-order encoding of the
    // key, so one key has one peer ID.
    IdentityPublicKey::from_bytes(&key).ok().map(|k| k.peer_id())
}

/// Checks the other side's certificate; with `expected`, it must be that
/// peer's.
#[derive(Debug)]
struct PeerVerifier {
    expected: Option<PeerId>,
    provider: Arc<CryptoProvider>,
}

impl PeerVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            log::warn!("refused a connection: a p2pchat certificate comes alone, this one had a chain");
            return Err(rustls::Error::InvalidCertificate(CertificateError::BadEncoding));
        }
        let Some(peer) = peer_of_certificate(end_entity) else {
            log::warn!("refused a connection: the certificate holds no valid Ed25519 identity key");
            return Err(rustls::Error::InvalidCertificate(CertificateError::BadEncoding));
        };
        if let Some(expected) = self.expected {
            if peer != expected {
                log::warn!("refused a connection: expected peer {expected}, the certificate is {peer}'s");
                return Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
            }
        }
        Ok(())
    }

    fn signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates).map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}
