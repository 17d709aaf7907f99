//! Group invitations waiting for an answer, on SQLite: sealed, with the
//! admin and arrival time plain for quotas and expiry.

use rusqlite::{params, OptionalExtension};

use p2pchat_protocol::engine::{Invitation, InvitationStore, StoreError};
use p2pchat_protocol::{ConversationId, PeerId, Timestamp};

use super::{backend, corrupt, encode, label, ts, SqliteStore};

impl InvitationStore for SqliteStore {
    fn invitations(&self) -> Result<Vec<Invitation>, StoreError> {
        let sql = "SELECT group_id, sealed FROM chat_invitations ORDER BY received_at, group_id";
        self.read_sealed_list(sql, [], label::INVITATION, "a group invitation")
    }

    fn invitation(&self, group: &ConversationId) -> Result<Option<Invitation>, StoreError> {
        let sql = "SELECT group_id, sealed FROM chat_invitations WHERE group_id = ?1";
        Ok(self.read_sealed_list(sql, [group.to_string()], label::INVITATION, "a group invitation")?.pop())
    }

    fn invitation_count(&self, admin: Option<&PeerId>) -> Result<usize, StoreError> {
        let count = match admin {
            Some(admin) => {
                self.scalar("SELECT COUNT(*) FROM chat_invitations WHERE admin_peer_id = ?1", [admin.to_string()])?
            }
            None => self.scalar("SELECT COUNT(*) FROM chat_invitations", [])?,
        };
        Ok(count.unwrap_or(0).max(0) as usize)
    }

    fn invitations_received_before(&self, cutoff: Timestamp) -> Result<Vec<ConversationId>, StoreError> {
        let ids = self.read_ids(
            "SELECT group_id FROM chat_invitations WHERE received_at < ?1 ORDER BY received_at, group_id",
            [ts(cutoff)],
        )?;
        // An unreadable ID is skipped: one bad row must not stop the sweep.
        Ok(ids.iter().filter_map(|id| id.parse().ok()).collect())
    }

    fn oldest_invitation(&self) -> Result<Option<ConversationId>, StoreError> {
        self.guard()?;
        let oldest: Option<String> = self
            .conn
            .prepare_cached("SELECT group_id FROM chat_invitations ORDER BY received_at, group_id LIMIT 1")
            .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
            .map_err(backend)?;
        oldest.map(|id| id.parse().map_err(|_| corrupt("a group invitation's ID"))).transpose()
    }

    fn put_invitation(&mut self, invitation: &Invitation) -> Result<(), StoreError> {
        let id = invitation.group_id.to_string();
        let sealed = self.key.seal(label::INVITATION, id.as_bytes(), &encode(invitation)?);
        self.execute(
            "INSERT INTO chat_invitations (group_id, admin_peer_id, received_at, sealed) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT(group_id) DO UPDATE SET admin_peer_id = excluded.admin_peer_id, \
             received_at = excluded.received_at, sealed = excluded.sealed",
            params![id, invitation.admin.to_string(), ts(invitation.received_at), sealed],
        )
    }

    fn delete_invitation(&mut self, group: &ConversationId) -> Result<(), StoreError> {
        self.execute("DELETE FROM chat_invitations WHERE group_id = ?1", [group.to_string()])
    }
}
