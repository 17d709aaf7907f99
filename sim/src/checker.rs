//! The invariants. The checker sees what the API would see (command results
//! and engine events), every envelope on the wire, and, at quiescence, each
//! node's store; it never looks inside a running engine.

// Hash maps here answer membership and lookups on hot paths; the one walk
// over a map (the accepted IDs at quiescence) sorts them first, so no output
// depends on hash order.
#![allow(clippy::disallowed_types, reason = "lookups only; see above")]

use std::collections::{BTreeMap, HashMap, HashSet};

use p2pchat_protocol::engine::{Event, Message, MessageStatus};
use p2pchat_protocol::wire::{ChatContent, Envelope, EnvelopeBody, GroupMessage};
use p2pchat_protocol::{ConversationId, MessageId};

use crate::trace::digest;

/// One message accepted by a node's API.
#[derive(Debug)]
struct Accepted {
    sender: usize,
    content: u64,
    /// Who must get it: the peer, or the group's members at send time.
    recipients: Vec<usize>,
    group: Option<ConversationId>,
    /// The furthest status the sender's events have shown.
    status: MessageStatus,
}

/// A broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation(pub String);

/// What the checker has seen.
#[derive(Default)]
pub(crate) struct Checker {
    /// Each node's peer ID, by index.
    peers: Vec<p2pchat_protocol::PeerId>,
    accepted: HashMap<MessageId, Accepted>,
    /// (node, message) → times the node's API announced it.
    received: HashMap<(usize, MessageId), u32>,
    /// Message key → digest of the only ciphertext it may seal.
    key_use: HashMap<Vec<u8>, u64>,
    /// The groups each node has left at some time.
    left: HashSet<(usize, ConversationId)>,
    /// Nodes that crashed at least once (and so may have lost events).
    crashed: Vec<bool>,
    /// Distinct ratchet public keys seen: each is one DH ratchet step.
    ratchet_keys: HashMap<[u8; 32], ()>,
    /// Messages received, in total.
    deliveries: u64,
    /// Every distinct group message put on the wire: what a relay carrying
    /// all of them could hand to anyone.
    group_messages: Vec<GroupMessage>,
    /// Their digests, to keep one copy of each.
    group_digests: HashSet<u64>,
}

impl Checker {
    /// A checker for nodes with these peer IDs.
    pub(crate) fn new(peers: Vec<p2pchat_protocol::PeerId>) -> Self {
        Self { peers, ..Self::default() }
    }

    /// Deliveries so far (each message at each recipient counts once).
    pub(crate) fn deliveries(&self) -> u64 {
        self.deliveries
    }

    /// DH ratchet steps seen on the wire.
    pub(crate) fn dh_steps(&self) -> u64 {
        self.ratchet_keys.len() as u64
    }

    /// Messages accepted by the API.
    pub(crate) fn accepted(&self) -> usize {
        self.accepted.len()
    }

    /// A node's API accepted a message.
    pub(crate) fn on_accepted(&mut self, sender: usize, message: &Message, recipients: Vec<usize>) {
        let group = message.group_position.map(|_| message.conversation_id);
        let content = digest(message.content.as_bytes());
        let accepted = Accepted { sender, content, recipients, group, status: message.status };
        self.accepted.insert(message.id, accepted);
    }

    /// A node left a group.
    pub(crate) fn on_left(&mut self, node: usize, group: ConversationId) {
        self.left.insert((node, group));
    }

    /// A node crashed: events of its last commit may be lost.
    pub(crate) fn on_crash(&mut self, node: usize) {
        if self.crashed.len() <= node {
            self.crashed.resize(node + 1, false);
        }
        self.crashed[node] = true;
    }

    /// Whether a recipient is owed a message for certain: a member at send
    /// time that never left the group. One that left (before the send and
    /// came back, or after it) may be dropped by a sender that processes
    /// its leave late; for it, only what the sender claims is checked: a
    /// recipient the sender's store marks delivered must have stored it.
    fn owed(&self, recipient: usize, accepted: &Accepted) -> bool {
        let Some(group) = accepted.group else { return true };
        !self.left.contains(&(recipient, group))
    }

    /// An envelope went on the wire: no message key may seal two different
    /// ciphertexts, across crashes and restarts.
    pub(crate) fn on_envelope(&mut self, bytes: &[u8]) -> Result<(), Violation> {
        let Ok(envelope) = Envelope::decode(bytes) else { return Ok(()) };
        let (key, ciphertext) = match envelope.body {
            EnvelopeBody::Ratchet(m) => {
                self.ratchet_keys.insert(m.header.ratchet_key, ());
                (m.header.to_bytes().to_vec(), m.ciphertext)
            }
            EnvelopeBody::Group(g) => {
                if self.group_digests.insert(digest(bytes)) {
                    self.group_messages.push(g.clone());
                }
                let mut key = g.group_id.as_bytes().to_vec();
                key.extend_from_slice(&g.sender.0);
                key.extend_from_slice(&g.key_id.to_be_bytes());
                key.extend_from_slice(&g.message_number.to_be_bytes());
                (key, g.ciphertext)
            }
            _ => return Ok(()),
        };
        let sealed = digest(&ciphertext);
        match self.key_use.insert(key, sealed) {
            Some(earlier) if earlier != sealed => {
                Err(Violation("a message key sealed two different plaintexts".into()))
            }
            _ => Ok(()),
        }
    }

    /// The group messages on the wire so far, for the confidentiality rule.
    pub(crate) fn group_messages(&self) -> &[GroupMessage] {
        &self.group_messages
    }

    /// Node `node`'s stored group keys opened a group message from the wire
    /// (whoever it was sent to): only the recipients at send time may ever
    /// read a message, so a member invited later, or one that left, must
    /// not, even with every envelope a relay saw.
    pub(crate) fn on_opened(&self, node: usize, plaintext: &[u8]) -> Result<(), Violation> {
        let Ok(chat) = ChatContent::decode(plaintext) else {
            return Err(Violation(format!("n{node} opened a group message whose content does not decode")));
        };
        let Some(accepted) = self.accepted.get(&chat.message_id) else {
            return Err(Violation(format!("n{node} opened group message {} that no API accepted", chat.message_id)));
        };
        if accepted.sender != node && !accepted.recipients.contains(&node) {
            return Err(Violation(format!(
                "n{node}'s group keys open message {} of n{}, sent when it was not a recipient",
                chat.message_id, accepted.sender
            )));
        }
        Ok(())
    }

    /// An event a node's engine released (so its effects are committed).
    pub(crate) fn on_event(&mut self, node: usize, event: &Event) -> Result<(), Violation> {
        match event {
            Event::MessageReceived(m) => self.on_received(node, m),
            Event::MessageSent { message_id, .. } => self.on_status(node, message_id, MessageStatus::Sent),
            Event::MessageDelivered { message_id, .. } => self.on_status(node, message_id, MessageStatus::Delivered),
            Event::MessageRead { message_id, .. } => self.on_status(node, message_id, MessageStatus::Read),
            Event::MessageFailed { message_id, failure_reason, .. } => {
                if failure_reason.is_empty() {
                    return Err(Violation(format!("message {message_id} failed without a reason")));
                }
                self.on_status(node, message_id, MessageStatus::Failed)
            }
            _ => Ok(()),
        }
    }

    /// The recipients of a message that have not announced it. A crash
    /// between a commit and the release of its events loses the events, so
    /// the driver looks for these in the recipients' stores.
    pub(crate) fn unannounced(&self, id: &MessageId) -> Vec<usize> {
        let Some(accepted) = self.accepted.get(id) else { return Vec::new() };
        accepted.recipients.iter().copied().filter(|&r| !self.received.contains_key(&(r, *id))).collect()
    }

    /// A message found in a recipient's store whose announcement a crash
    /// lost: it counts as received.
    pub(crate) fn on_stored(&mut self, node: usize, message: &Message) -> Result<(), Violation> {
        if !self.crashed.get(node).copied().unwrap_or(false) {
            return Err(Violation(format!(
                "n{node} stored message {} without announcing it, and never crashed",
                message.id
            )));
        }
        self.on_received(node, message)
    }

    fn on_received(&mut self, node: usize, message: &Message) -> Result<(), Violation> {
        let id = message.id;
        let Some(accepted) = self.accepted.get(&id) else {
            return Err(Violation(format!("n{node} received message {id} that no API accepted")));
        };
        if !accepted.recipients.contains(&node) {
            return Err(Violation(format!(
                "n{node} decrypted message {id} of n{} without being a recipient at send time",
                accepted.sender
            )));
        }
        if digest(message.content.as_bytes()) != accepted.content {
            return Err(Violation(format!("n{node} received message {id} with different content")));
        }
        let count = self.received.entry((node, id)).or_insert(0);
        *count += 1;
        if *count > 1 {
            return Err(Violation(format!("n{node} received message {id} {count} times")));
        }
        self.deliveries += 1;
        Ok(())
    }

    fn on_status(&mut self, node: usize, id: &MessageId, to: MessageStatus) -> Result<(), Violation> {
        let Some(accepted) = self.accepted.get(id) else {
            return Err(Violation(format!("n{node} reported a status for unknown message {id}")));
        };
        if accepted.sender != node {
            return Err(Violation(format!("n{node} reported a status for n{}'s message {id}", accepted.sender)));
        }
        let from = accepted.status;
        if backwards(from, to) {
            return Err(Violation(format!("message {id} went from {} to {}", from.as_str(), to.as_str())));
        }
        if matches!(to, MessageStatus::Delivered | MessageStatus::Read) {
            // Delivered (and so read) means every recipient stored it.
            for &r in &accepted.recipients {
                if self.owed(r, accepted) && !self.received.contains_key(&(r, *id)) {
                    return Err(Violation(format!("message {id} is {} but n{r} never stored it", to.as_str())));
                }
            }
        }
        if let Some(accepted) = self.accepted.get_mut(id) {
            accepted.status = to;
        }
        Ok(())
    }

    /// The final check once the network has healed and gone quiet: every
    /// accepted message reached each recipient it is owed to exactly once,
    /// or failed with a reason; none is left `created`; stores agree with
    /// what the API announced.
    pub(crate) fn at_quiescence(&mut self, stores: &[BTreeMap<MessageId, Message>]) -> Result<(), Violation> {
        let mut ids: Vec<MessageId> = self.accepted.keys().copied().collect();
        ids.sort();
        for id in &ids {
            for r in self.unannounced(id) {
                if let Some(m) = stores[r].get(id) {
                    self.on_stored(r, m)?;
                }
            }
        }
        let ids: Vec<&MessageId> = ids.iter().collect();
        for id in ids {
            let accepted = &self.accepted[id];
            let Some(stored) = stores[accepted.sender].get(id) else {
                return Err(Violation(format!("n{}'s message {id} is gone from its store", accepted.sender)));
            };
            // Events lost in a crash may leave the store ahead of them, never behind.
            if stored.status != accepted.status && backwards(accepted.status, stored.status) {
                return Err(Violation(format!(
                    "n{}'s message {id} is {} in its store but {} by its events",
                    accepted.sender,
                    stored.status.as_str(),
                    accepted.status.as_str()
                )));
            }
            match stored.status {
                MessageStatus::Created | MessageStatus::Sent => {
                    let per_recipient: Vec<String> = stored
                        .recipients
                        .iter()
                        .map(|(peer, status)| {
                            let r = self.peers.iter().position(|p| p == peer).unwrap_or(usize::MAX);
                            let kept =
                                if stores.get(r).is_some_and(|s| s.contains_key(id)) { "stored" } else { "not stored" };
                            format!("n{r} {} ({kept})", status.as_str())
                        })
                        .collect();
                    return Err(Violation(format!(
                        "n{}'s message {id} is still {} after the network healed (recipients: {}; waiting: {:?})",
                        accepted.sender,
                        stored.status.as_str(),
                        per_recipient.join(", "),
                        stored.waiting_reason,
                    )));
                }
                MessageStatus::Failed => {
                    if stored.failure_reason.as_deref().is_none_or(str::is_empty) {
                        return Err(Violation(format!("message {id} failed without a reason")));
                    }
                }
                MessageStatus::Delivered | MessageStatus::Read => {}
            }
            for (peer, status) in &stored.recipients {
                let Some(r) = self.peers.iter().position(|p| p == peer) else { continue };
                let claimed = matches!(status, MessageStatus::Delivered | MessageStatus::Read);
                let got = self.received.get(&(r, *id)).copied().unwrap_or(0);
                if claimed && got == 0 {
                    return Err(Violation(format!(
                        "n{}'s message {id} is {} for n{r}, which never stored it",
                        accepted.sender,
                        status.as_str()
                    )));
                }
            }
            for &r in &accepted.recipients {
                let got = self.received.get(&(r, *id)).copied().unwrap_or(0);
                let owed = self.owed(r, accepted) && stored.status != MessageStatus::Failed;
                if owed && got != 1 {
                    return Err(Violation(format!("n{r} received message {id} {got} times")));
                }
                if got == 1 {
                    let kept = stores[r].get(id).is_some_and(|m| digest(m.content.as_bytes()) == accepted.content);
                    // A member that left may have deleted the group with it.
                    if !kept && self.owed(r, accepted) {
                        return Err(Violation(format!("n{r} announced message {id} but its store lacks it")));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether a status change goes backwards: out of `failed`, from `delivered`
/// or `read` to `failed`, or down the created → sent → delivered → read line.
fn backwards(from: MessageStatus, to: MessageStatus) -> bool {
    match (from, to) {
        (MessageStatus::Failed, _) => true,
        (_, MessageStatus::Failed) => from >= MessageStatus::Delivered,
        _ => to <= from,
    }
}
