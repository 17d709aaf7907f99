//! Every decoder of bytes from a peer, a relay or a database, chosen by the
//! first byte: envelopes (all four kinds), pairwise payloads, group chat
//! contents, relay frames (all kinds), and the stored state blobs.
//!
//! Each must be total (a value or an error, never a panic), and the wire
//! decoders canonical: what decodes encodes back to the same bytes, so that
//! no two encodings carry one message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2pchat_protocol::handshake::PendingKeyExchange;
use p2pchat_protocol::relay::RelayFrame;
use p2pchat_protocol::wire::{ChatContent, Envelope, PairwisePayload};
use p2pchat_protocol::{GroupSession, PairwiseSessions};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    match which % 7 {
        0 => {
            if let Ok(envelope) = Envelope::decode(bytes) {
                assert_eq!(envelope.encode(), bytes, "a non-canonical envelope was accepted");
            }
        }
        1 => {
            if let Ok(payload) = PairwisePayload::decode(bytes) {
                assert_eq!(payload.encode().as_slice(), bytes, "a non-canonical pairwise payload was accepted");
            }
        }
        2 => {
            if let Ok(content) = ChatContent::decode(bytes) {
                assert_eq!(content.encode().as_slice(), bytes, "a non-canonical chat content was accepted");
            }
        }
        3 => {
            if let Ok(frame) = RelayFrame::decode(bytes) {
                assert_eq!(frame.encode(), bytes, "a non-canonical relay frame was accepted");
            }
        }
        4 => {
            if let Ok(sessions) = PairwiseSessions::from_bytes(bytes) {
                let _ = sessions.to_bytes();
            }
        }
        5 => {
            if let Ok(group) = GroupSession::from_bytes(bytes) {
                let _ = group.to_bytes();
            }
        }
        _ => {
            if let Ok(pending) = PendingKeyExchange::from_bytes(bytes) {
                let _ = pending.to_bytes();
            }
        }
    }
});
