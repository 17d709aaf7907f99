//! The engine's scenario suite, generic over the store, so that every
//! `Store` implementation runs the very same scenarios (enable the
//! `testkit` feature and call [`scenario_tests!`](crate::scenario_tests)).
//!
//! The harness drives several engines over a simulated network with
//! virtual time, by the engine's driving rule: after every input, drain every
//! output. Transmits to an online node arrive at once; to an offline one
//! they fail (there is no relay here).

// Test support: a failed expectation must stop the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod commands;
mod crashes;
mod delivery;
mod groups;
mod invitations;
mod key_exchange;
mod net;
mod retention;

pub use commands::{
    a_batch_commits_together_or_not_at_all, bad_commands_get_clear_errors,
    commands_in_a_batch_commit_together_or_not_at_all, garbage_and_forgeries_are_rejected_without_damage,
    queries_page_newest_first_and_refuse_unknown_ids,
};
pub use crashes::a_crash_at_any_point_loses_nothing_and_never_reuses_a_message_key;
pub use delivery::{
    a_failed_commit_of_a_transmit_result_strands_nothing, a_failed_commit_releases_nothing_and_loses_nothing,
    a_lost_delivery_confirmation_is_repaired_by_retransmission,
    a_peer_offline_for_days_gets_what_was_sent_meanwhile_under_few_message_keys,
    an_engine_rebuilt_from_its_store_carries_on,
    messages_to_an_offline_peer_are_sent_then_delivered_in_order_exactly_once,
};
pub use groups::{
    a_group_message_before_its_sender_key_is_held_then_read,
    a_group_of_invented_members_cannot_grow_held_messages_or_key_exchanges_past_the_caps,
    a_group_of_ten_with_a_member_offline_during_creation,
    a_group_of_three_delivers_to_everyone_and_tracks_the_least_advanced_status,
    a_later_member_cannot_read_older_messages_answered_to_a_key_request,
    a_later_member_cannot_read_older_messages_caught_by_a_rotation, a_leave_before_its_join_notice_leaves_no_ghost,
    a_leavers_saved_keys_cannot_read_after_it_left, a_lost_invite_is_resent_until_acknowledged,
    a_resent_member_added_after_a_leave_changes_nothing,
    an_invitee_cannot_read_older_messages_and_a_leaver_cannot_read_newer_ones, crossing_leaves_settle,
    group_creation_needs_a_name_and_two_other_members, group_messages_from_outsiders_or_forged_are_rejected,
    non_admin_invites_and_forged_control_are_refused,
};
pub use invitations::{
    a_member_who_leaves_while_an_invitation_waits_is_not_in_the_group_accepted,
    a_strangers_invitation_waits_for_consent_and_a_declined_group_leaves_nothing,
    an_accepted_invitation_joins_and_receives_what_was_sent_while_it_waited,
    the_admins_word_of_a_leave_counts_only_for_a_current_join, waiting_invitations_stay_within_their_caps_and_expire,
};
pub use key_exchange::{
    a_clock_that_was_once_far_ahead_does_not_block_new_sessions,
    a_first_message_starts_the_key_exchange_and_is_delivered_then_read, a_key_exchange_can_be_initiated_again,
    a_message_under_an_unknown_session_rekeys_only_known_peers_and_at_most_once_a_minute,
    a_peer_unknown_to_the_directory_fails_after_the_retries,
    a_quiet_strangers_session_is_swept_and_its_next_message_still_arrives,
    an_offline_peer_makes_the_key_exchange_time_out_retry_and_fail, key_exchange_retries_follow_the_backoff,
};
pub use net::Net;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;
pub use retention::{
    kept_peer_records_stay_within_their_cap_survive_a_restart_and_expire, skipped_keys_are_cleaned_up_after_seven_days,
    undelivered_messages_expire_to_failed_and_old_ones_are_deleted,
};

use crate::engine::{MemoryStore, Store, Transmit};
use crate::Timestamp;

/// What the scenarios need of a store beyond [`Store`].
pub trait TestStore: Store + Sized {
    /// The committed state only, as a crash would leave it.
    fn crash_copy(&self) -> Self;
    /// Makes the next `count` commits fail.
    fn fail_next_commits(&mut self, count: u32);
}

impl TestStore for MemoryStore {
    fn crash_copy(&self) -> Self {
        MemoryStore::crash_copy(self)
    }

    fn fail_next_commits(&mut self, count: u32) {
        MemoryStore::fail_next_commits(self, count)
    }
}

/// The scenarios' start time.
pub const NOW: Timestamp = Timestamp::from_millis(1_735_401_234_000);

fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// Defines one `#[test]` per scenario, for a store made by `$make`.
#[macro_export]
macro_rules! scenario_tests {
    ($make:expr) => {
        #[test]
        fn a_strangers_invitation_waits_for_consent_and_a_declined_group_leaves_nothing() {
            $crate::testkit::a_strangers_invitation_waits_for_consent_and_a_declined_group_leaves_nothing($make);
        }
        #[test]
        fn an_accepted_invitation_joins_and_receives_what_was_sent_while_it_waited() {
            $crate::testkit::an_accepted_invitation_joins_and_receives_what_was_sent_while_it_waited($make);
        }
        #[test]
        fn waiting_invitations_stay_within_their_caps_and_expire() {
            $crate::testkit::waiting_invitations_stay_within_their_caps_and_expire($make);
        }
        #[test]
        fn kept_peer_records_stay_within_their_cap_survive_a_restart_and_expire() {
            $crate::testkit::kept_peer_records_stay_within_their_cap_survive_a_restart_and_expire($make);
        }
        #[test]
        fn a_quiet_strangers_session_is_swept_and_its_next_message_still_arrives() {
            $crate::testkit::a_quiet_strangers_session_is_swept_and_its_next_message_still_arrives($make);
        }
        #[test]
        fn a_member_who_leaves_while_an_invitation_waits_is_not_in_the_group_accepted() {
            $crate::testkit::a_member_who_leaves_while_an_invitation_waits_is_not_in_the_group_accepted($make);
        }
        #[test]
        fn the_admins_word_of_a_leave_counts_only_for_a_current_join() {
            $crate::testkit::the_admins_word_of_a_leave_counts_only_for_a_current_join($make);
        }
        #[test]
        fn a_first_message_starts_the_key_exchange_and_is_delivered_then_read() {
            $crate::testkit::a_first_message_starts_the_key_exchange_and_is_delivered_then_read($make);
        }
        #[test]
        fn an_offline_peer_makes_the_key_exchange_time_out_retry_and_fail() {
            $crate::testkit::an_offline_peer_makes_the_key_exchange_time_out_retry_and_fail($make);
        }
        #[test]
        fn a_peer_unknown_to_the_directory_fails_after_the_retries() {
            $crate::testkit::a_peer_unknown_to_the_directory_fails_after_the_retries($make);
        }
        #[test]
        fn messages_to_an_offline_peer_are_sent_then_delivered_in_order_exactly_once() {
            $crate::testkit::messages_to_an_offline_peer_are_sent_then_delivered_in_order_exactly_once($make);
        }
        #[test]
        fn a_peer_offline_for_days_gets_what_was_sent_meanwhile_under_few_message_keys() {
            $crate::testkit::a_peer_offline_for_days_gets_what_was_sent_meanwhile_under_few_message_keys($make);
        }
        #[test]
        fn a_lost_delivery_confirmation_is_repaired_by_retransmission() {
            $crate::testkit::a_lost_delivery_confirmation_is_repaired_by_retransmission($make);
        }
        #[test]
        fn a_failed_commit_releases_nothing_and_loses_nothing() {
            $crate::testkit::a_failed_commit_releases_nothing_and_loses_nothing($make);
        }
        #[test]
        fn an_engine_rebuilt_from_its_store_carries_on() {
            $crate::testkit::an_engine_rebuilt_from_its_store_carries_on($make);
        }
        #[test]
        fn undelivered_messages_expire_to_failed_and_old_ones_are_deleted() {
            $crate::testkit::undelivered_messages_expire_to_failed_and_old_ones_are_deleted($make);
        }
        #[test]
        fn bad_commands_get_clear_errors() {
            $crate::testkit::bad_commands_get_clear_errors($make);
        }
        #[test]
        fn garbage_and_forgeries_are_rejected_without_damage() {
            $crate::testkit::garbage_and_forgeries_are_rejected_without_damage($make);
        }
        #[test]
        fn a_group_of_three_delivers_to_everyone_and_tracks_the_least_advanced_status() {
            $crate::testkit::a_group_of_three_delivers_to_everyone_and_tracks_the_least_advanced_status($make);
        }
        #[test]
        fn a_group_of_ten_with_a_member_offline_during_creation() {
            $crate::testkit::a_group_of_ten_with_a_member_offline_during_creation($make);
        }
        #[test]
        fn an_invitee_cannot_read_older_messages_and_a_leaver_cannot_read_newer_ones() {
            $crate::testkit::an_invitee_cannot_read_older_messages_and_a_leaver_cannot_read_newer_ones($make);
        }
        #[test]
        fn a_later_member_cannot_read_older_messages_caught_by_a_rotation() {
            $crate::testkit::a_later_member_cannot_read_older_messages_caught_by_a_rotation($make);
        }
        #[test]
        fn a_later_member_cannot_read_older_messages_answered_to_a_key_request() {
            $crate::testkit::a_later_member_cannot_read_older_messages_answered_to_a_key_request($make);
        }
        #[test]
        fn a_clock_that_was_once_far_ahead_does_not_block_new_sessions() {
            $crate::testkit::a_clock_that_was_once_far_ahead_does_not_block_new_sessions($make);
        }
        #[test]
        fn a_message_under_an_unknown_session_rekeys_only_known_peers_and_at_most_once_a_minute() {
            $crate::testkit::a_message_under_an_unknown_session_rekeys_only_known_peers_and_at_most_once_a_minute(
                $make,
            );
        }
        #[test]
        fn a_group_of_invented_members_cannot_grow_held_messages_or_key_exchanges_past_the_caps() {
            $crate::testkit::a_group_of_invented_members_cannot_grow_held_messages_or_key_exchanges_past_the_caps(
                $make,
            );
        }
        #[test]
        fn non_admin_invites_and_forged_control_are_refused() {
            $crate::testkit::non_admin_invites_and_forged_control_are_refused($make);
        }
        #[test]
        fn group_creation_needs_a_name_and_two_other_members() {
            $crate::testkit::group_creation_needs_a_name_and_two_other_members($make);
        }
        #[test]
        fn skipped_keys_are_cleaned_up_after_seven_days() {
            $crate::testkit::skipped_keys_are_cleaned_up_after_seven_days($make);
        }
        #[test]
        fn a_key_exchange_can_be_initiated_again() {
            $crate::testkit::a_key_exchange_can_be_initiated_again($make);
        }
        #[test]
        fn key_exchange_retries_follow_the_backoff() {
            $crate::testkit::key_exchange_retries_follow_the_backoff($make);
        }
        #[test]
        fn a_group_message_before_its_sender_key_is_held_then_read() {
            $crate::testkit::a_group_message_before_its_sender_key_is_held_then_read($make);
        }
        #[test]
        fn group_messages_from_outsiders_or_forged_are_rejected() {
            $crate::testkit::group_messages_from_outsiders_or_forged_are_rejected($make);
        }
        #[test]
        fn a_leavers_saved_keys_cannot_read_after_it_left() {
            $crate::testkit::a_leavers_saved_keys_cannot_read_after_it_left($make);
        }
        #[test]
        fn a_batch_commits_together_or_not_at_all() {
            $crate::testkit::a_batch_commits_together_or_not_at_all($make);
        }
        #[test]
        fn commands_in_a_batch_commit_together_or_not_at_all() {
            $crate::testkit::commands_in_a_batch_commit_together_or_not_at_all($make);
        }
        #[test]
        fn queries_page_newest_first_and_refuse_unknown_ids() {
            $crate::testkit::queries_page_newest_first_and_refuse_unknown_ids($make);
        }
        #[test]
        fn a_failed_commit_of_a_transmit_result_strands_nothing() {
            $crate::testkit::a_failed_commit_of_a_transmit_result_strands_nothing($make);
        }
        #[test]
        fn a_lost_invite_is_resent_until_acknowledged() {
            $crate::testkit::a_lost_invite_is_resent_until_acknowledged($make);
        }
        #[test]
        fn a_resent_member_added_after_a_leave_changes_nothing() {
            $crate::testkit::a_resent_member_added_after_a_leave_changes_nothing($make);
        }
        #[test]
        fn a_leave_before_its_join_notice_leaves_no_ghost() {
            $crate::testkit::a_leave_before_its_join_notice_leaves_no_ghost($make);
        }
        #[test]
        fn crossing_leaves_settle() {
            $crate::testkit::crossing_leaves_settle($make);
        }
        #[test]
        fn a_crash_at_any_point_loses_nothing_and_never_reuses_a_message_key() {
            $crate::testkit::a_crash_at_any_point_loses_nothing_and_never_reuses_a_message_key($make);
        }
    };
}

/// A network of engines. Transmits to an online node arrive at once; to an
/// offline one they fail (there is no relay in these scenarios). `drop`
/// decides, per transmit, whether the network loses it.
/// Decides, per transmit (sender index, transmit), whether the network loses it.
pub type LossRule = Box<dyn FnMut(usize, &Transmit) -> bool>;
