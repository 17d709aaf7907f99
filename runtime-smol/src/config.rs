//! Settings: defaults, then a TOML file, then `P2PCHAT_<SETTING>`
//! environment variables, then command-line flags; each later source wins.
//! Every value is checked at start, and a bad one stops start-up with its
//! setting, its source and the problem.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use p2pchat_protocol::PeerId;
use p2pchat_storage_sqlite::Durability;

/// Where a value came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Built in.
    Default,
    /// The configuration file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A command-line flag.
    Flag,
}

impl core::fmt::Display for Source {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Default => f.write_str("the default"),
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Env(var) => write!(f, "${var}"),
            Self::Flag => f.write_str("the command line"),
        }
    }
}

/// A bad setting: which one, from where, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that does not parse or is out of range.
    #[error("setting `{setting}` (from {origin}): {problem}")]
    Invalid {
        /// The setting's name.
        setting: &'static str,
        /// Where the value came from.
        origin: Source,
        /// What is wrong, and what is accepted.
        problem: String,
    },
    /// The file does not read or parse.
    #[error("configuration file {path}: {problem}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A key in the file that no setting has.
    #[error("configuration file {path}: unknown setting `{key}` (known: {known})")]
    Unknown {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The known names.
        known: String,
    },
}

/// A relay to use: its peer ID (which its certificate must match) and address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayAddress {
    /// The relay's peer ID.
    pub peer: PeerId,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl core::str::FromStr for RelayAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (peer, addr) =
            s.split_once('@').ok_or_else(|| format!("{s:?} is not PEER_ID@ADDRESS (as `p2pchat relay` prints it)"))?;
        let peer = peer.parse().map_err(|_| format!("{peer:?} is not a peer ID (40 hex digits)"))?;
        let addr = addr.parse().map_err(|_| format!("{addr:?} is not an address like 192.0.2.1:4433"))?;
        Ok(Self { peer, addr })
    }
}

impl core::fmt::Display for RelayAddress {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}@{}", self.peer, self.addr)
    }
}

/// Every setting, resolved and checked.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Identity key file and databases.
    pub data_dir: PathBuf,
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// REST and WebSocket API address.
    pub api: SocketAddr,
    /// `Host` names the API accepts besides loopback ones.
    pub api_allowed_hosts: Vec<String>,
    /// Relays to connect to.
    pub relays: Vec<RelayAddress>,
    /// Behave as if behind NAT: no direct connections, no direct address.
    pub no_direct: bool,
    /// Addresses this node is reached at, to publish (a port forwarded on a
    /// router, a public IP in front of a private listen address).
    pub public_addrs: Vec<SocketAddr>,
    /// Dial loopback and private addresses that peers' records list.
    pub allow_private_addresses: bool,
    /// Where the rotating log files go.
    pub log_dir: PathBuf,
    /// The least severe level logged.
    pub log_level: log::LevelFilter,
    /// How hard commits try to survive failures.
    pub durability: Durability,
    /// Message retention in days (`chat_message_ttl_days`).
    pub chat_message_ttl_days: u32,
    /// Send retries before a message fails (`chat_max_retries`, alias `invoice_max_retries`).
    pub chat_max_retries: u32,
    /// First retry backoff (`chat_retry_backoff_ms`, alias `invoice_retry_backoff_ms`).
    pub chat_retry_backoff_ms: u64,
    /// Relay: most entries per recipient's mailbox.
    pub mailbox_max_count: usize,
    /// Relay: most bytes per recipient's mailbox.
    pub mailbox_max_bytes: usize,
    /// Relay: most entries one sender may hold in one recipient's mailbox.
    pub mailbox_max_count_per_sender: usize,
    /// Relay: most entries senders from one address may hold in one
    /// recipient's mailbox.
    pub mailbox_max_count_per_source: usize,
    /// Relay: days a mailbox entry is kept.
    pub mailbox_ttl_days: u32,
    /// Relay: sustained frames per second per peer.
    pub relay_rate_per_sec: u64,
    /// Relay: burst of frames per peer.
    pub relay_rate_burst: u64,
}

/// One setting's name, the names it is also accepted under, and its default.
struct Spec {
    name: &'static str,
    aliases: &'static [&'static str],
    default: fn(&Defaults) -> Raw,
}

/// Values gathered for a setting before checking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Raw {
    /// A single value.
    One(String),
    /// A list (relays).
    Many(Vec<String>),
}

/// Where defaults come from, so tests can set it.
#[derive(Clone, Debug)]
pub struct Defaults {
    /// `$HOME`.
    pub home: PathBuf,
    /// `$XDG_DATA_HOME`, if set to an absolute path.
    pub data_home: Option<PathBuf>,
    /// `$XDG_CACHE_HOME`, if set to an absolute path.
    pub cache_home: Option<PathBuf>,
}

impl Defaults {
    /// From the environment, following XDG: `~/.local/share/p2pchat` and
    /// `~/.cache/p2pchat/logs` unless `XDG_DATA_HOME` / `XDG_CACHE_HOME` say
    /// otherwise.
    pub fn from_env() -> Self {
        let absolute = |var: &str| std::env::var_os(var).map(PathBuf::from).filter(|p| p.is_absolute());
        Self {
            home: std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from),
            data_home: absolute("XDG_DATA_HOME"),
            cache_home: absolute("XDG_CACHE_HOME"),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.data_home.clone().unwrap_or_else(|| self.home.join(".local/share")).join("p2pchat")
    }

    fn log_dir(&self) -> PathBuf {
        self.cache_home.clone().unwrap_or_else(|| self.home.join(".cache")).join("p2pchat").join("logs")
    }
}

fn one(s: &str) -> Raw {
    Raw::One(s.to_owned())
}

const SPECS: &[Spec] = &[
    Spec { name: "data_dir", aliases: &[], default: |d| Raw::One(d.data_dir().to_string_lossy().into_owned()) },
    Spec { name: "listen", aliases: &[], default: |_| one("0.0.0.0:30070") },
    Spec { name: "api", aliases: &[], default: |_| one("127.0.0.1:30069") },
    Spec { name: "api_allowed_hosts", aliases: &[], default: |_| Raw::Many(Vec::new()) },
    Spec { name: "relay", aliases: &["relays"], default: |_| Raw::Many(Vec::new()) },
    Spec { name: "no_direct", aliases: &[], default: |_| one("false") },
    Spec { name: "public_addr", aliases: &["public_addrs"], default: |_| Raw::Many(Vec::new()) },
    Spec { name: "allow_private_addresses", aliases: &[], default: |_| one("false") },
    Spec { name: "log_dir", aliases: &[], default: |d| Raw::One(d.log_dir().to_string_lossy().into_owned()) },
    Spec { name: "log_level", aliases: &[], default: |_| one("info") },
    Spec { name: "durability", aliases: &[], default: |_| one("normal") },
    Spec { name: "chat_message_ttl_days", aliases: &[], default: |_| one("30") },
    Spec { name: "chat_max_retries", aliases: &["invoice_max_retries"], default: |_| one("3") },
    Spec { name: "chat_retry_backoff_ms", aliases: &["invoice_retry_backoff_ms"], default: |_| one("2000") },
    Spec { name: "mailbox_max_count", aliases: &[], default: |_| one("1000") },
    Spec { name: "mailbox_max_count_per_sender", aliases: &[], default: |_| one("100") },
    Spec { name: "mailbox_max_count_per_source", aliases: &[], default: |_| one("250") },
    Spec { name: "mailbox_max_bytes", aliases: &[], default: |_| one("67108864") },
    Spec { name: "mailbox_ttl_days", aliases: &[], default: |_| one("7") },
    Spec { name: "relay_rate_per_sec", aliases: &[], default: |_| one("50") },
    Spec { name: "relay_rate_burst", aliases: &[], default: |_| one("200") },
];

/// An address given to publish: one others can dial, so never an
/// unspecified one (`0.0.0.0`, `::`) nor port 0.
fn public_address(text: &str, source: &Source) -> Result<SocketAddr, ConfigError> {
    let problem = |why: String| ConfigError::Invalid { setting: "public_addr", origin: source.clone(), problem: why };
    let addr: SocketAddr =
        text.trim().parse().map_err(|_| problem(format!("{text:?} is not an address such as 203.0.113.7:30070")))?;
    if addr.ip().is_unspecified() || addr.port() == 0 {
        return Err(problem(format!(
            "{addr} is not an address others can dial; give the address and port this node is reached at"
        )));
    }
    Ok(addr)
}

fn spec_for(key: &str) -> Option<&'static Spec> {
    SPECS.iter().find(|s| s.name == key || s.aliases.contains(&key))
}

/// The sources of one start, before resolution.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// Values from flags, by setting name.
    pub flags: BTreeMap<&'static str, Raw>,
    /// The environment (`P2PCHAT_*` variables are read from it).
    pub env: BTreeMap<String, String>,
    /// The configuration file, if any.
    pub file: Option<PathBuf>,
}

impl Sources {
    /// This process's environment.
    pub fn with_process_env(mut self) -> Self {
        self.env = std::env::vars().filter(|(k, _)| k.starts_with("P2PCHAT_")).collect();
        self
    }
}

fn file_values(path: &Path) -> Result<BTreeMap<&'static str, Raw>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::File { path: path.to_owned(), problem: e.to_string() })?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| ConfigError::File { path: path.to_owned(), problem: e.to_string() })?;
    let mut out = BTreeMap::new();
    for (key, value) in table {
        let Some(spec) = spec_for(&key) else {
            let known = SPECS.iter().map(|s| s.name).collect::<Vec<_>>().join(", ");
            return Err(ConfigError::Unknown { path: path.to_owned(), key, known });
        };
        if out.contains_key(spec.name) {
            return Err(ConfigError::File {
                path: path.to_owned(),
                problem: format!("`{}` is set twice (under its own name and an alias); keep one", spec.name),
            });
        }
        let raw = match value {
            toml::Value::String(s) => Raw::One(s),
            toml::Value::Integer(i) => Raw::One(i.to_string()),
            toml::Value::Boolean(b) => Raw::One(b.to_string()),
            toml::Value::Array(items) => Raw::Many(
                items
                    .into_iter()
                    .map(|v| match v {
                        toml::Value::String(s) => Ok(s),
                        other => Err(ConfigError::Invalid {
                            setting: spec.name,
                            origin: Source::File(path.to_owned()),
                            problem: format!("list items must be strings, not {}", other.type_str()),
                        }),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            other => {
                return Err(ConfigError::Invalid {
                    setting: spec.name,
                    origin: Source::File(path.to_owned()),
                    problem: format!("a {} is not a string, number, boolean or list", other.type_str()),
                })
            }
        };
        out.insert(spec.name, raw);
    }
    Ok(out)
}

/// Resolves only the data directory (for `p2pchat id`, which must not fail
/// over an unrelated setting).
pub fn resolve_data_dir(sources: &Sources, defaults: &Defaults) -> Result<PathBuf, ConfigError> {
    let only = Sources {
        flags: sources.flags.iter().filter(|(k, _)| **k == "data_dir").map(|(k, v)| (*k, v.clone())).collect(),
        env: sources
            .env
            .iter()
            .filter(|(k, _)| *k == "P2PCHAT_DATA_DIR")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        file: None,
    };
    let mut settings_file = BTreeMap::new();
    if let Some(path) = &sources.file {
        if let Some(raw) = file_values(path)?.remove("data_dir") {
            settings_file.insert("data_dir", (raw, Source::File(path.clone())));
        }
    }
    let (raw, origin) = if let Some(raw) = only.flags.get("data_dir") {
        (raw.clone(), Source::Flag)
    } else if let Some(v) = only.env.get("P2PCHAT_DATA_DIR") {
        (Raw::One(v.clone()), Source::Env("P2PCHAT_DATA_DIR".into()))
    } else if let Some((raw, origin)) = settings_file.remove("data_dir") {
        (raw, origin)
    } else {
        (Raw::One(defaults.data_dir().to_string_lossy().into_owned()), Source::Default)
    };
    match raw {
        Raw::One(s) if !s.trim().is_empty() => Ok(PathBuf::from(s)),
        _ => Err(ConfigError::Invalid { setting: "data_dir", origin, problem: "needs one directory".into() }),
    }
}

/// Resolves every setting: flags over environment over file over defaults.
pub fn resolve(sources: &Sources, defaults: &Defaults) -> Result<Settings, ConfigError> {
    let file = match &sources.file {
        Some(path) => file_values(path)?,
        None => BTreeMap::new(),
    };
    let mut chosen: BTreeMap<&'static str, (Raw, Source)> = BTreeMap::new();
    for spec in SPECS {
        let mut value = ((spec.default)(defaults), Source::Default);
        if let (Some(raw), Some(path)) = (file.get(spec.name), &sources.file) {
            value = (raw.clone(), Source::File(path.clone()));
        }
        let mut from_env: Option<String> = None;
        for name in std::iter::once(&spec.name).chain(spec.aliases.iter()) {
            let var = format!("P2PCHAT_{}", name.to_uppercase());
            if let Some(v) = sources.env.get(&var) {
                if let Some(earlier) = from_env.replace(var.clone()) {
                    return Err(ConfigError::Invalid {
                        setting: spec.name,
                        origin: Source::Env(var),
                        problem: format!("also set as ${earlier}; keep one"),
                    });
                }
                let raw = if spec.name == "relay" {
                    Raw::Many(v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
                } else {
                    Raw::One(v.clone())
                };
                value = (raw, Source::Env(var));
            }
        }
        if let Some(raw) = sources.flags.get(spec.name) {
            value = (raw.clone(), Source::Flag);
        }
        chosen.insert(spec.name, value);
    }
    let get = |name: &'static str| chosen.get(name).cloned().unwrap_or((Raw::Many(Vec::new()), Source::Default));
    let parse = |name: &'static str| -> Result<(String, Source), ConfigError> {
        match get(name) {
            (Raw::One(s), source) => Ok((s, source)),
            (Raw::Many(_), origin) => {
                Err(ConfigError::Invalid { setting: name, origin, problem: "takes one value, not a list".into() })
            }
        }
    };
    fn invalid(setting: &'static str, origin: Source, problem: String) -> ConfigError {
        ConfigError::Invalid { setting, origin, problem }
    }
    let number = |name: &'static str, min: u64, max: u64| -> Result<u64, ConfigError> {
        let (s, source) = parse(name)?;
        let n: u64 =
            s.trim().parse().map_err(|_| invalid(name, source.clone(), format!("{s:?} is not a whole number")))?;
        if n < min || n > max {
            return Err(invalid(name, source, format!("{n} is out of range; use {min} to {max}")));
        }
        Ok(n)
    };
    let address = |name: &'static str| -> Result<SocketAddr, ConfigError> {
        let (s, source) = parse(name)?;
        s.trim().parse().map_err(|_| invalid(name, source, format!("{s:?} is not an address like 127.0.0.1:30069")))
    };
    let path = |name: &'static str| -> Result<PathBuf, ConfigError> {
        let (s, source) = parse(name)?;
        if s.trim().is_empty() {
            return Err(invalid(name, source, "is empty".into()));
        }
        Ok(PathBuf::from(s))
    };
    let boolean = |name: &'static str| -> Result<bool, ConfigError> {
        let (s, source) = parse(name)?;
        match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(invalid(name, source, format!("{s:?} is not true or false"))),
        }
    };
    let relays = match get("relay") {
        (Raw::Many(items), source) => items
            .iter()
            .map(|s| s.parse::<RelayAddress>().map_err(|e| invalid("relay", source.clone(), e)))
            .collect::<Result<Vec<_>, _>>()?,
        (Raw::One(s), source) => vec![s.parse::<RelayAddress>().map_err(|e| invalid("relay", source, e))?],
    };
    let api_allowed_hosts = match get("api_allowed_hosts") {
        (Raw::Many(items), _) => items.clone(),
        (Raw::One(s), _) => s.split(',').map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()).collect(),
    };
    if let Some(bad) =
        api_allowed_hosts.iter().find(|h| !h.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'))
    {
        let (_, source) = get("api_allowed_hosts");
        return Err(invalid("api_allowed_hosts", source, format!("{bad:?} is not a host name")));
    }
    let public_addrs = match get("public_addr") {
        (Raw::Many(items), source) => {
            items.iter().map(|a| public_address(a, &source)).collect::<Result<Vec<_>, _>>()?
        }
        (Raw::One(s), source) => s
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| public_address(a, &source))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let (level, level_source) = parse("log_level")?;
    let log_level = level.trim().parse::<log::LevelFilter>().map_err(|_| {
        invalid("log_level", level_source, format!("{level:?} is not one of off, error, warn, info, debug, trace"))
    })?;
    let (durability, durability_source) = parse("durability")?;
    let durability = match durability.trim().to_ascii_lowercase().as_str() {
        "normal" => Durability::Normal,
        "full" => Durability::Full,
        _ => return Err(invalid("durability", durability_source, format!("{durability:?} is not normal or full"))),
    };
    Ok(Settings {
        data_dir: path("data_dir")?,
        listen: address("listen")?,
        api: address("api")?,
        api_allowed_hosts,
        relays,
        no_direct: boolean("no_direct")?,
        public_addrs,
        allow_private_addresses: boolean("allow_private_addresses")?,
        log_dir: path("log_dir")?,
        log_level,
        durability,
        chat_message_ttl_days: number("chat_message_ttl_days", 1, 36_500)? as u32,
        chat_max_retries: number("chat_max_retries", 0, 64)? as u32,
        chat_retry_backoff_ms: number("chat_retry_backoff_ms", 1, 3_600_000)?,
        mailbox_max_count: number("mailbox_max_count", 1, 1_000_000)? as usize,
        mailbox_max_count_per_sender: number("mailbox_max_count_per_sender", 1, 1_000_000)? as usize,
        mailbox_max_count_per_source: number("mailbox_max_count_per_source", 1, 1_000_000)? as usize,
        mailbox_max_bytes: usize::try_from(number("mailbox_max_bytes", 1_024, 1 << 40)?).unwrap_or(usize::MAX),
        mailbox_ttl_days: number("mailbox_ttl_days", 1, 365)? as u32,
        relay_rate_per_sec: number("relay_rate_per_sec", 1, 1_000_000)?,
        relay_rate_burst: number("relay_rate_burst", 1, 1_000_000)?,
    })
}
