//! QUIC between nodes on loopback: authenticated both ways, frames
//! delivered and acknowledged, wrong identities and dial-only endpoints
//! refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use p2pchat::admission::IncomingLimits;
use p2pchat::tls::TlsIdentity;
use p2pchat::transport::{Inbound, Transport, TransportError};
use p2pchat_protocol::keys::IdentitySeed;
use p2pchat_protocol::IdentityKeyPair;

fn node(seed: u8, accept: bool) -> Transport {
    let identity = IdentityKeyPair::from_seed(&IdentitySeed::from_bytes([seed; 32]));
    let inbound = if accept { Inbound::Limited(IncomingLimits::NODE) } else { Inbound::Refused };
    Transport::bind("127.0.0.1:0".parse().unwrap(), TlsIdentity::new(&identity).unwrap(), inbound).unwrap()
}

fn with_timeout<T>(f: impl std::future::Future<Output = T>) -> T {
    smol::block_on(async {
        let timeout = async {
            smol::Timer::after(Duration::from_secs(10)).await;
            panic!("timed out");
        };
        smol::future::or(f, timeout).await
    })
}

#[test]
fn two_nodes_exchange_frames_and_know_who_is_who() {
    let (alice, bob) = (node(1, true), node(2, true));
    let bob_addr = bob.local_addr().unwrap();
    with_timeout(async {
        let accept = smol::spawn({
            let bob_peer = bob.peer_id();
            async move {
                let conn = bob.accept().await.unwrap().await.unwrap();
                let frame = conn.accept_frame().await.unwrap().await.unwrap();
                conn.send(b"pong").await.unwrap();
                assert_ne!(conn.peer(), bob_peer);
                let big = conn.accept_frame().await.unwrap().await.unwrap();
                (conn.peer(), frame, big, bob)
            }
        });
        let conn = alice.dial(bob_addr, node(2, false).peer_id()).await.unwrap();
        conn.send(b"ping").await.unwrap();
        let reply = conn.accept_frame().await.unwrap().await.unwrap();
        // A frame of the largest size goes through whole; one byte more is
        // refused before anything is sent.
        let big = vec![7u8; p2pchat::transport::MAX_FRAME_LEN];
        let over = vec![7u8; p2pchat::transport::MAX_FRAME_LEN + 1];
        assert!(matches!(conn.send(&over).await, Err(TransportError::TooLarge { .. })));
        conn.send(&big).await.unwrap();
        let (seen, frame, got_big, _bob) = accept.await;
        assert_eq!(seen, alice.peer_id(), "bob learns alice's peer ID from her certificate");
        assert_eq!(frame, b"ping");
        assert_eq!(reply, b"pong");
        assert_eq!(got_big, big);
    });
}

#[test]
fn a_node_that_is_not_the_expected_peer_is_refused() {
    let (alice, mallory) = (node(1, true), node(3, true));
    let expected_bob = node(2, false).peer_id();
    let addr = mallory.local_addr().unwrap();
    with_timeout(async {
        let _server = smol::spawn(async move {
            // Mallory accepts; the handshake fails on alice's side.
            if let Some(handshake) = mallory.accept().await {
                let _ = handshake.await;
            }
            mallory
        });
        let err = alice.dial(addr, expected_bob).await.unwrap_err();
        // TLS alert 42 (bad certificate) from alice's refusal.
        assert!(matches!(err, TransportError::Connection(quinn::ConnectionError::TransportError(_))), "{err:?}");
    });
}

#[test]
fn a_dial_only_node_accepts_no_connections() {
    let (alice, hidden) = (node(1, true), node(4, false));
    let addr = hidden.local_addr().unwrap();
    with_timeout(async {
        let refuser = smol::spawn(async move { hidden.accept().await.is_some() });
        let err = alice.dial(addr, node(4, false).peer_id()).await.unwrap_err();
        assert!(matches!(err, TransportError::Connection(quinn::ConnectionError::ConnectionClosed(_))), "{err:?}");
        // The refusing side handed out no connection.
        let handed_out = smol::future::or(refuser, async {
            smol::Timer::after(Duration::from_millis(200)).await;
            false
        });
        assert!(!handed_out.await);
    });
}
