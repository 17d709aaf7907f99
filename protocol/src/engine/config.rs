//! The engine's limits and tunables: every bound on what a peer, a group's
//! admin or the user can make the engine hold, and the timings the
//! reference sets.

/// The fewest members a group may be created with besides its creator.
pub const MIN_GROUP_OTHERS: usize = 2;

/// The longest group name, in bytes of UTF-8: a name travels in every
/// invite, to every member.
pub const MAX_GROUP_NAME_LEN: usize = 256;

/// The most group messages held per sender while its key is missing.
pub const MAX_HELD_PER_SENDER: usize = 200;

/// The most envelope bytes held per sender while its key is missing.
pub const MAX_HELD_BYTES_PER_SENDER: usize = 4 * 1024 * 1024;

/// The most group messages held from everyone together: members are
/// chosen by a group's admin, and an admin can invent a thousand.
pub const MAX_HELD: usize = 5_000;

/// The most envelope bytes held from everyone together.
pub const MAX_HELD_BYTES: usize = 64 * 1024 * 1024;

/// The most key exchanges under way that no message of the user waits for
/// (sender keys, receipts and requests to group members met only through a
/// group): beyond it, such items wait and try again later, so a roster of
/// invented members cannot keep the node exchanging keys with all of them.
pub const MAX_BACKGROUND_KEY_EXCHANGES: usize = 64;

/// The most group invitations waiting for the user's answer: beyond it,
/// the oldest is declined to make room.
pub const MAX_INVITATIONS: usize = 100;

/// The most waiting group invitations from one admin: beyond it, its new
/// invitations are declined at once.
pub const MAX_INVITATIONS_PER_ADMIN: usize = 5;

/// The most records kept of when peers whose sessions were swept were last
/// heard from (about 60 bytes each on disk): beyond it, the oldest go, and
/// such a peer's next message under its old session is refused.
pub const MAX_QUIET_PEERS: usize = 10_000;

/// The most peer records kept across restarts ([`Input::KeepRecord`](crate::engine::Input::KeepRecord));
/// beyond it the least recently seen go.
pub const MAX_KEPT_RECORDS: usize = 4_096;

/// The largest record kept, encoded; a larger one (a record may list 32
/// addresses of 256 bytes) is used but not kept. With the count above this
/// bounds the kept records at 8 MiB.
pub const MAX_KEPT_RECORD_BYTES: usize = 2_048;

/// How long a record not seen again is kept: long past a relay mailbox's
/// week, so someone away for weeks is still reached where they were.
pub const KEPT_RECORD_LIFETIME_MS: u64 = 30 * DAY_MS;

/// The most message IDs (or acknowledged IDs) one receipt is taken to name;
/// the rest are ignored, so one envelope cannot cost unbounded work.
pub const MAX_IDS_PER_PAYLOAD: usize = 1_000;

/// The largest message content, in bytes.
pub const MAX_CONTENT_LEN: usize = 64 * 1024;

/// Tunables; the defaults are the reference's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Send attempts after the first before a message fails (`invoice_max_retries`).
    pub max_retries: u32,
    /// The first retry's backoff; it doubles each time (`invoice_retry_backoff_ms`).
    pub retry_backoff_ms: u64,
    /// How long to wait for a key exchange ack.
    pub key_exchange_timeout_ms: u64,
    /// How long messages are kept (`chat_message_ttl_days`).
    pub message_ttl_ms: u64,
    /// How long to wait for a delivery confirmation before sending again.
    pub confirmation_timeout_ms: u64,
    /// How often the retention sweep runs.
    pub retention_interval_ms: u64,
    /// The most items queued for one peer.
    pub max_outbox_per_peer: usize,
    /// Once the key exchange retries are spent, how often to try again
    /// while receipts, keys or group notices still wait for the peer.
    pub session_retry_ms: u64,
    /// Most group messages held per sender while its key is missing.
    pub held_max_per_sender: usize,
    /// Most envelope bytes held per sender.
    pub held_max_bytes_per_sender: usize,
    /// Most group messages held from everyone together.
    pub held_max: usize,
    /// Most envelope bytes held from everyone together.
    pub held_max_bytes: usize,
    /// Most key exchanges under way before those that no message of the
    /// user waits for are put off (see [`MAX_BACKGROUND_KEY_EXCHANGES`]).
    pub max_background_key_exchanges: usize,
    /// Most group invitations waiting for the user's answer.
    pub max_invitations: usize,
    /// Most waiting group invitations from one admin.
    pub max_invitations_per_admin: usize,
}

pub(super) const DAY_MS: u64 = 24 * 60 * 60 * 1000;

impl EngineConfig {
    /// Zero intervals would make deadlines that never move forward, and a
    /// huge retry count would overflow: clamp them.
    pub(super) fn sanitized(self) -> Self {
        Self {
            max_retries: self.max_retries.min(64),
            retry_backoff_ms: self.retry_backoff_ms.max(1),
            key_exchange_timeout_ms: self.key_exchange_timeout_ms.max(1),
            message_ttl_ms: self.message_ttl_ms.max(1),
            confirmation_timeout_ms: self.confirmation_timeout_ms.max(1),
            retention_interval_ms: self.retention_interval_ms.max(1),
            max_outbox_per_peer: self.max_outbox_per_peer.max(1),
            session_retry_ms: self.session_retry_ms.max(1),
            held_max_per_sender: self.held_max_per_sender,
            held_max_bytes_per_sender: self.held_max_bytes_per_sender,
            held_max: self.held_max,
            held_max_bytes: self.held_max_bytes,
            max_background_key_exchanges: self.max_background_key_exchanges,
            max_invitations: self.max_invitations.max(1),
            max_invitations_per_admin: self.max_invitations_per_admin,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_retries: 3,
            retry_backoff_ms: 2_000,
            key_exchange_timeout_ms: 10_000,
            message_ttl_ms: 30 * DAY_MS,
            confirmation_timeout_ms: 30_000,
            retention_interval_ms: DAY_MS,
            max_outbox_per_peer: 10_000,
            session_retry_ms: 5 * 60 * 1000,
            held_max_per_sender: MAX_HELD_PER_SENDER,
            held_max_bytes_per_sender: MAX_HELD_BYTES_PER_SENDER,
            held_max: MAX_HELD,
            held_max_bytes: MAX_HELD_BYTES,
            max_background_key_exchanges: MAX_BACKGROUND_KEY_EXCHANGES,
            max_invitations: MAX_INVITATIONS,
            max_invitations_per_admin: MAX_INVITATIONS_PER_ADMIN,
        }
    }
}
