//! The p2pchat node's runtime: settings, the data directory lock, logging,
//! and (coming with the QUIC transport) the smol executor that drives the
//! engine and the relay.
#![forbid(unsafe_code)]

pub mod admission;
pub mod api;
pub mod cli;
pub mod config;
pub mod lock;
pub mod logging;
pub mod node;
pub mod passphrase;
pub mod queues;
pub mod relay_server;
pub mod run;
pub mod tls;
pub mod transport;
