//! The engine's scenario suite on the in-memory store. The suite itself
//! lives in `p2pchat_protocol::testkit`, so other stores run it too.

use p2pchat_protocol::engine::MemoryStore;

p2pchat_protocol::scenario_tests!(MemoryStore::new);
