//! Transport authentication: certificates from identity keys, checked
//! against the peer ID each side expects. Handshakes run in memory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use p2pchat::tls::{peer_of_certificate, TlsIdentity};
use p2pchat_protocol::keys::IdentitySeed;
use p2pchat_protocol::{IdentityKeyPair, PeerId};
use rustls::pki_types::ServerName;

fn identity(seed: u8) -> IdentityKeyPair {
    IdentityKeyPair::from_seed(&IdentitySeed::from_bytes([seed; 32]))
}

/// Runs a handshake between the two configurations; the server's view of
/// the client's peer ID on success, the first error otherwise.
fn handshake(client: rustls::ClientConfig, server: rustls::ServerConfig) -> Result<PeerId, rustls::Error> {
    let name = ServerName::try_from("p2pchat").unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(client), name)?;
    let mut server = rustls::ServerConnection::new(Arc::new(server))?;
    for _ in 0..10 {
        let mut buf = Vec::new();
        client.write_tls(&mut buf).unwrap();
        if !buf.is_empty() {
            server.read_tls(&mut &buf[..]).unwrap();
            server.process_new_packets()?;
        }
        let mut buf = Vec::new();
        server.write_tls(&mut buf).unwrap();
        if !buf.is_empty() {
            client.read_tls(&mut &buf[..]).unwrap();
            client.process_new_packets()?;
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            let certs = server.peer_certificates().expect("the client presented a certificate");
            return Ok(peer_of_certificate(&certs[0]).expect("a p2pchat certificate"));
        }
    }
    panic!("the handshake did not finish");
}

#[test]
fn a_certificate_names_its_identity() {
    let alice = identity(1);
    let tls = TlsIdentity::new(&alice).unwrap();
    assert_eq!(peer_of_certificate(tls.certificate()), Some(alice.peer_id()), "read from the certificate itself");
    let bob = TlsIdentity::new(&identity(2)).unwrap();
    assert_eq!(peer_of_certificate(bob.certificate()), Some(identity(2).peer_id()));
    let config = tls.server_config().unwrap();
    assert_eq!(config.alpn_protocols, vec![b"p2pchat/1".to_vec()]);
}

#[test]
fn each_side_learns_or_checks_the_others_peer_id() {
    let (alice, bob) = (TlsIdentity::new(&identity(1)).unwrap(), TlsIdentity::new(&identity(2)).unwrap());
    let seen = handshake(alice.client_config(bob.peer_id()).unwrap(), bob.server_config().unwrap()).unwrap();
    assert_eq!(seen, alice.peer_id(), "the listener learns who connected");
}

#[test]
fn a_wrong_certificate_is_refused() {
    let (alice, bob, mallory) = (
        TlsIdentity::new(&identity(1)).unwrap(),
        TlsIdentity::new(&identity(2)).unwrap(),
        TlsIdentity::new(&identity(3)).unwrap(),
    );
    // Alice dials Bob, but Mallory answers.
    let err = handshake(alice.client_config(bob.peer_id()).unwrap(), mallory.server_config().unwrap()).unwrap_err();
    assert!(
        matches!(err, rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)),
        "{err:?}"
    );
}

#[test]
fn a_certificate_without_an_identity_key_is_refused() {
    // An ordinary ECDSA certificate: it proves no peer ID.
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["p2pchat".to_owned()]).unwrap().self_signed(&pair).unwrap();
    assert_eq!(peer_of_certificate(cert.der()), None);
    assert_eq!(peer_of_certificate(&rustls::pki_types::CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])), None);
    // And in a handshake: a server presenting it is refused by our dialler
    // (we offer only Ed25519 signatures, so it cannot even sign).
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(pair.serialize_der().into());
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
    let alice = TlsIdentity::new(&identity(1)).unwrap();
    let err = handshake(alice.client_config(identity(2).peer_id()).unwrap(), server).unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoSignatureSchemesInCommon)
                | rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        ),
        "{err:?}"
    );
}
