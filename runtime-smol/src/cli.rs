//! The command line.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Raw, Sources};

/// p2pchat: an end-to-end encrypted peer-to-peer chat node.
#[derive(Debug, Parser)]
#[command(name = "p2pchat", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print this node's peer ID (creating its identity on first use).
    Id {
        /// Where the data directory is.
        #[command(flatten)]
        dir: DirArgs,
        /// Read the identity key's passphrase from this file descriptor
        /// (otherwise it is asked for at the terminal, if the key has one).
        #[arg(long, value_name = "FD")]
        passphrase_fd: Option<u32>,
    },
    /// Protect the identity key with a passphrase, change it, or remove
    /// it. Whoever has the data directory's files otherwise has the key,
    /// and with it every conversation stored there.
    Passphrase {
        /// Where the data directory is.
        #[command(flatten)]
        dir: DirArgs,
        /// Read the current passphrase from this file descriptor.
        #[arg(long, value_name = "FD")]
        passphrase_fd: Option<u32>,
        /// Read the new passphrase from this file descriptor (otherwise it
        /// is asked for twice at the terminal).
        #[arg(long, value_name = "FD")]
        new_passphrase_fd: Option<u32>,
        /// Remove the passphrase: the key is stored unwrapped again.
        #[arg(long, conflicts_with = "new_passphrase_fd")]
        remove: bool,
    },
    /// Print the API token (creating it on first use), for
    /// `Authorization: Bearer <token>`.
    Token {
        /// Where the data directory is.
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Print the settings a node would start with, after the file, the
    /// environment and the flags.
    Config(Box<SettingsArgs>),
    /// Run a node until SIGINT or SIGTERM.
    Node(Box<SettingsArgs>),
    /// Run a relay until SIGINT or SIGTERM; prints the address nodes pass
    /// to `--relay`.
    Relay(Box<SettingsArgs>),
    /// A relay and three nodes (alice, bob, carol) on loopback, in one
    /// process: alice makes a group with bob and carol and greets them.
    Demo {
        /// Keep the data here (default: a temporary directory, removed at exit).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
}

/// The data directory, for the commands that need only it.
#[derive(Debug, Args, Default)]
pub struct DirArgs {
    /// The data directory (default: ~/.local/share/p2pchat).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A TOML file of settings (its `data_dir` counts).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl DirArgs {
    /// The data directory, after the file, the environment and the flag.
    pub fn resolve(self) -> Result<PathBuf, String> {
        let flags = SettingsArgs { data_dir: self.data_dir, config: self.config, ..Default::default() };
        crate::config::resolve_data_dir(&flags.sources().with_process_env(), &crate::config::Defaults::from_env())
            .map_err(|e| e.to_string())
    }
}

/// Every setting as a flag; flags win over `P2PCHAT_*` variables, which win
/// over the `--config` file, which wins over the defaults.
#[derive(Debug, Args, Default)]
pub struct SettingsArgs {
    /// A TOML file of settings.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The data directory: identity key file and databases.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The QUIC listen address.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// The API address.
    #[arg(long, value_name = "ADDR")]
    pub api: Option<String>,
    /// A `Host` name the API accepts besides loopback names (repeat for more).
    #[arg(long = "api-allowed-host", value_name = "NAME")]
    pub api_allowed_hosts: Vec<String>,
    /// A relay, as `p2pchat relay` prints it (repeat for more).
    #[arg(long = "relay", value_name = "PEER_ID@ADDR")]
    pub relays: Vec<String>,
    /// Act as if behind NAT: no direct connections, no direct address
    /// (`--no-direct=false` overrides a file or the environment).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub no_direct: Option<String>,
    /// An address this node is reached at, to publish in its record (a
    /// port forwarded on a router; repeat for more). The listen address is
    /// published too when it is a specific one, never `0.0.0.0`, and so is
    /// the address each relay sees this node's connection come from.
    #[arg(long = "public-addr", value_name = "ADDR")]
    pub public_addrs: Vec<String>,
    /// Dial loopback and private (LAN) addresses that peers' records list;
    /// off by default, so a stranger's record cannot aim this node at its
    /// own machine or network. For a LAN, a test or the demo.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub allow_private_addresses: Option<String>,
    /// Where the rotating log files go.
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// off, error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// normal (survives crashes) or full (also power loss).
    #[arg(long, value_name = "MODE")]
    pub durability: Option<String>,
    /// Message retention in days.
    #[arg(long, value_name = "DAYS")]
    pub chat_message_ttl_days: Option<String>,
    /// Send retries before a message fails.
    #[arg(long, value_name = "N", alias = "invoice-max-retries")]
    pub chat_max_retries: Option<String>,
    /// The first retry's backoff in milliseconds.
    #[arg(long, value_name = "MS", alias = "invoice-retry-backoff-ms")]
    pub chat_retry_backoff_ms: Option<String>,
    /// Relay: most entries held per recipient.
    #[arg(long, value_name = "N")]
    pub mailbox_max_count: Option<String>,
    /// Relay: most bytes held per recipient.
    #[arg(long, value_name = "BYTES")]
    pub mailbox_max_bytes: Option<String>,
    /// Relay: most entries one sender may hold in one recipient's mailbox.
    #[arg(long, value_name = "N")]
    pub mailbox_max_count_per_sender: Option<String>,
    /// Relay: most entries senders from one address may hold in one
    /// recipient's mailbox, whatever identities they use.
    #[arg(long, value_name = "N")]
    pub mailbox_max_count_per_source: Option<String>,
    /// Relay: days an entry is held.
    #[arg(long, value_name = "DAYS")]
    pub mailbox_ttl_days: Option<String>,
    /// Relay: frames per second a peer may sustain.
    #[arg(long, value_name = "N")]
    pub relay_rate_per_sec: Option<String>,
    /// Relay: frames a peer may send in a burst.
    #[arg(long, value_name = "N")]
    pub relay_rate_burst: Option<String>,
    /// Read the identity key's passphrase from this file descriptor
    /// (otherwise it is asked for at the terminal, if the key has one).
    /// Not a setting: never from a file or the environment.
    #[arg(long, value_name = "FD")]
    pub passphrase_fd: Option<u32>,
}

impl SettingsArgs {
    /// The flags given, as a settings source.
    pub fn sources(&self) -> Sources {
        let mut flags: BTreeMap<&'static str, Raw> = BTreeMap::new();
        let mut put = |name: &'static str, value: Option<String>| {
            if let Some(v) = value {
                flags.insert(name, Raw::One(v));
            }
        };
        put("data_dir", self.data_dir.as_ref().map(|p| p.to_string_lossy().into_owned()));
        put("listen", self.listen.clone());
        put("api", self.api.clone());
        put("log_dir", self.log_dir.as_ref().map(|p| p.to_string_lossy().into_owned()));
        put("log_level", self.log_level.clone());
        put("durability", self.durability.clone());
        put("chat_message_ttl_days", self.chat_message_ttl_days.clone());
        put("chat_max_retries", self.chat_max_retries.clone());
        put("chat_retry_backoff_ms", self.chat_retry_backoff_ms.clone());
        put("mailbox_max_count", self.mailbox_max_count.clone());
        put("mailbox_max_bytes", self.mailbox_max_bytes.clone());
        put("mailbox_max_count_per_sender", self.mailbox_max_count_per_sender.clone());
        put("mailbox_max_count_per_source", self.mailbox_max_count_per_source.clone());
        put("mailbox_ttl_days", self.mailbox_ttl_days.clone());
        put("relay_rate_per_sec", self.relay_rate_per_sec.clone());
        put("relay_rate_burst", self.relay_rate_burst.clone());
        put("no_direct", self.no_direct.clone());
        put("allow_private_addresses", self.allow_private_addresses.clone());
        if !self.relays.is_empty() {
            flags.insert("relay", Raw::Many(self.relays.clone()));
        }
        if !self.public_addrs.is_empty() {
            flags.insert("public_addr", Raw::Many(self.public_addrs.clone()));
        }
        if !self.api_allowed_hosts.is_empty() {
            flags.insert("api_allowed_hosts", Raw::Many(self.api_allowed_hosts.clone()));
        }
        Sources { flags, env: BTreeMap::new(), file: self.config.clone() }
    }
}
