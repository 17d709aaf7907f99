//! Settings precedence and checks, the data directory lock, and `p2pchat id`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use p2pchat::config::{resolve, ConfigError, Defaults, Raw, Sources};
use p2pchat::lock::{DataDirLock, LockError};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("p2pchat-runtime-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn defaults() -> Defaults {
    Defaults { home: PathBuf::from("/home/tester") }
}

#[test]
fn defaults_follow_the_reference() {
    let s = resolve(&Sources::default(), &defaults()).unwrap();
    assert_eq!(s.api.to_string(), "127.0.0.1:30069");
    assert_eq!((s.chat_message_ttl_days, s.chat_max_retries, s.chat_retry_backoff_ms), (30, 3, 2000));
    assert!(s.relays.is_empty() && !s.no_direct);
    if std::env::var_os("XDG_DATA_HOME").is_none() {
        assert_eq!(s.data_dir, PathBuf::from("/home/tester/.local/share/p2pchat"));
    }
    if std::env::var_os("XDG_CACHE_HOME").is_none() {
        assert_eq!(s.log_dir, PathBuf::from("/home/tester/.cache/p2pchat/logs"));
    }
}

#[test]
fn flags_win_over_the_environment_which_wins_over_the_file() {
    let dir = TempDir::new("precedence");
    let file = dir.0.join("p2pchat.toml");
    std::fs::write(
        &file,
        "chat_max_retries = 5\nchat_retry_backoff_ms = 500\nchat_message_ttl_days = 10\napi = \"127.0.0.1:4000\"\n",
    )
    .unwrap();
    let mut env = BTreeMap::new();
    env.insert("P2PCHAT_CHAT_RETRY_BACKOFF_MS".to_owned(), "700".to_owned());
    env.insert("P2PCHAT_CHAT_MESSAGE_TTL_DAYS".to_owned(), "12".to_owned());
    let mut flags = BTreeMap::new();
    flags.insert("chat_message_ttl_days", Raw::One("14".into()));
    let s = resolve(&Sources { flags, env, file: Some(file) }, &defaults()).unwrap();
    assert_eq!(s.chat_max_retries, 5, "from the file");
    assert_eq!(s.chat_retry_backoff_ms, 700, "the environment over the file");
    assert_eq!(s.chat_message_ttl_days, 14, "the flag over both");
    assert_eq!(s.api.to_string(), "127.0.0.1:4000");
}

#[test]
fn the_references_setting_names_are_accepted_as_aliases() {
    let dir = TempDir::new("aliases");
    let file = dir.0.join("p2pchat.toml");
    std::fs::write(&file, "invoice_max_retries = 7\n").unwrap();
    let mut env = BTreeMap::new();
    env.insert("P2PCHAT_INVOICE_RETRY_BACKOFF_MS".to_owned(), "900".to_owned());
    let s = resolve(&Sources { flags: BTreeMap::new(), env, file: Some(file) }, &defaults()).unwrap();
    assert_eq!((s.chat_max_retries, s.chat_retry_backoff_ms), (7, 900));
}

#[test]
fn bad_settings_stop_start_up_naming_the_setting_and_the_problem() {
    let check = |env: &[(&str, &str)], expect: &[&str]| {
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let err = resolve(&Sources { env, ..Sources::default() }, &defaults()).unwrap_err().to_string();
        for part in expect {
            assert!(err.contains(part), "{err:?} should mention {part:?}");
        }
    };
    check(
        &[("P2PCHAT_CHAT_MAX_RETRIES", "lots")],
        &["chat_max_retries", "P2PCHAT_CHAT_MAX_RETRIES", "not a whole number"],
    );
    check(&[("P2PCHAT_CHAT_MAX_RETRIES", "1000")], &["chat_max_retries", "out of range"]);
    check(&[("P2PCHAT_API", "localhost")], &["api", "not an address"]);
    check(&[("P2PCHAT_RELAY", "nonsense")], &["relay", "PEER_ID@ADDRESS"]);
    check(&[("P2PCHAT_DURABILITY", "sometimes")], &["durability", "normal or full"]);
    check(&[("P2PCHAT_LOG_LEVEL", "loud")], &["log_level"]);
    // An unknown key in the file, and a file that does not parse.
    let dir = TempDir::new("bad-file");
    let file = dir.0.join("p2pchat.toml");
    std::fs::write(&file, "chat_max_retires = 3\n").unwrap();
    let err = resolve(&Sources { file: Some(file.clone()), ..Sources::default() }, &defaults()).unwrap_err();
    assert!(matches!(&err, ConfigError::Unknown { key, .. } if key == "chat_max_retires"), "{err}");
    std::fs::write(&file, "chat_max_retries = \n").unwrap();
    let err = resolve(&Sources { file: Some(file), ..Sources::default() }, &defaults()).unwrap_err();
    assert!(matches!(err, ConfigError::File { .. }), "{err}");
}

#[test]
fn relays_parse_from_every_source() {
    let peer = "00112233445566778899aabbccddeeff00112233";
    let mut env = BTreeMap::new();
    env.insert("P2PCHAT_RELAY".to_owned(), format!("{peer}@192.0.2.1:4433, {peer}@192.0.2.2:4433"));
    let s = resolve(&Sources { env, ..Sources::default() }, &defaults()).unwrap();
    assert_eq!(s.relays.len(), 2);
    assert_eq!(s.relays[1].to_string(), format!("{peer}@192.0.2.2:4433"));
}

#[test]
fn a_second_node_on_the_same_data_directory_is_refused() {
    let dir = TempDir::new("lock");
    let held = DataDirLock::acquire(&dir.0).unwrap();
    let err = DataDirLock::acquire(&dir.0).unwrap_err();
    assert!(matches!(err, LockError::Held { .. }), "{err}");
    assert!(err.to_string().contains("another p2pchat process"), "{err}");
    drop(held);
    DataDirLock::acquire(&dir.0).expect("free again once released");
}

#[test]
fn the_lock_goes_with_a_killed_process() {
    let dir = TempDir::new("lock-kill");
    // Another process takes the same flock: util-linux flock(1), which
    // `.ci/run` installs, with --no-fork so that the killed process is the
    // one holding the lock.
    let mut child = Command::new("flock")
        .arg("--no-fork")
        .arg(dir.0.join(p2pchat::lock::LOCK_FILE))
        .args(["sleep", "30"])
        .spawn()
        .expect("flock(1) from util-linux");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "flock --no-fork is running");
    assert!(matches!(DataDirLock::acquire(&dir.0), Err(LockError::Held { .. })), "held by the child");
    child.kill().unwrap();
    child.wait().unwrap();
    DataDirLock::acquire(&dir.0).expect("the lock went with the killed process");
}

#[test]
fn id_prints_the_same_peer_id_every_time() {
    let dir = TempDir::new("id");
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_p2pchat")).args(["id", "--data-dir"]).arg(&dir.0).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let first = run();
    assert_eq!(first.len(), 40, "{first:?}");
    assert!(first.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(run(), first);
}
