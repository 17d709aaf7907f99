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
    Defaults { home: PathBuf::from("/home/tester"), data_home: None, cache_home: None }
}

#[test]
fn defaults_follow_the_reference() {
    let s = resolve(&Sources::default(), &defaults()).unwrap();
    assert_eq!(s.api.to_string(), "127.0.0.1:30069");
    assert_eq!((s.chat_message_ttl_days, s.chat_max_retries, s.chat_retry_backoff_ms), (30, 3, 2000));
    assert!(s.relays.is_empty() && !s.no_direct);
    assert_eq!(s.data_dir, PathBuf::from("/home/tester/.local/share/p2pchat"));
    assert_eq!(s.log_dir, PathBuf::from("/home/tester/.cache/p2pchat/logs"));
    let xdg = Defaults { data_home: Some("/xdg/data".into()), cache_home: Some("/xdg/cache".into()), ..defaults() };
    let s = resolve(&Sources::default(), &xdg).unwrap();
    assert_eq!(s.data_dir, PathBuf::from("/xdg/data/p2pchat"));
    assert_eq!(s.log_dir, PathBuf::from("/xdg/cache/p2pchat/logs"));
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
    let s = resolve(&Sources { flags: BTreeMap::new(), env, file: Some(file.clone()) }, &defaults()).unwrap();
    assert_eq!((s.chat_max_retries, s.chat_retry_backoff_ms), (7, 900));
    // Both names in one source: refused, naming the setting.
    std::fs::write(&file, "invoice_max_retries = 7\nchat_max_retries = 4\n").unwrap();
    let err = resolve(&Sources { file: Some(file), ..Sources::default() }, &defaults()).unwrap_err().to_string();
    assert!(err.contains("chat_max_retries") && err.contains("set twice"), "{err}");
    let mut env = BTreeMap::new();
    env.insert("P2PCHAT_INVOICE_MAX_RETRIES".to_owned(), "7".to_owned());
    env.insert("P2PCHAT_CHAT_MAX_RETRIES".to_owned(), "4".to_owned());
    let err = resolve(&Sources { env, ..Sources::default() }, &defaults()).unwrap_err().to_string();
    assert!(err.contains("chat_max_retries") && err.contains("keep one"), "{err}");
}

#[test]
fn flags_parse_through_the_command_line_including_the_aliases() {
    use clap::Parser;
    let cli = p2pchat::cli::Cli::try_parse_from([
        "p2pchat",
        "config",
        "--invoice-max-retries",
        "9",
        "--no-direct",
        "--relay",
        "00112233445566778899aabbccddeeff00112233@192.0.2.1:4433",
        "--mailbox-ttl-days",
        "3",
    ])
    .unwrap();
    let p2pchat::cli::Command::Config(args) = cli.command else { panic!("parsed as config") };
    let s = resolve(&args.sources(), &defaults()).unwrap();
    assert_eq!(s.chat_max_retries, 9);
    assert!(s.no_direct);
    assert_eq!(s.relays.len(), 1);
    assert_eq!(s.mailbox_ttl_days, 3);
    // --no-direct=false overrides the environment.
    let cli = p2pchat::cli::Cli::try_parse_from(["p2pchat", "config", "--no-direct=false"]).unwrap();
    let p2pchat::cli::Command::Config(args) = cli.command else { panic!("parsed as config") };
    let mut sources = args.sources();
    sources.env.insert("P2PCHAT_NO_DIRECT".to_owned(), "true".to_owned());
    assert!(!resolve(&sources, &defaults()).unwrap().no_direct);
}

#[test]
fn private_addresses_are_dialled_only_when_allowed_by_flag_environment_or_file() {
    use clap::Parser;
    assert!(!resolve(&Sources::default(), &defaults()).unwrap().allow_private_addresses, "off by default");
    let cli = p2pchat::cli::Cli::try_parse_from(["p2pchat", "config", "--allow-private-addresses"]).unwrap();
    let p2pchat::cli::Command::Config(args) = cli.command else { panic!("parsed as config") };
    assert!(resolve(&args.sources(), &defaults()).unwrap().allow_private_addresses);
    let env = [("P2PCHAT_ALLOW_PRIVATE_ADDRESSES".to_owned(), "true".to_owned())].into_iter().collect();
    assert!(resolve(&Sources { env, ..Sources::default() }, &defaults()).unwrap().allow_private_addresses);
    let dir = std::env::temp_dir().join(format!("p2pchat-settings-private-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("p2pchat.toml");
    std::fs::write(&file, "allow_private_addresses = true\n").unwrap();
    let from_file = resolve(&Sources { file: Some(file), ..Sources::default() }, &defaults()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(from_file.allow_private_addresses);
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
    // A test running beside this one may fork a child (to start `p2pchat`)
    // while the lock is held: the child shares the locked file until its
    // exec closes it, a moment later. So the lock is free again soon, not
    // necessarily at once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match DataDirLock::acquire(&dir.0) {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                assert!(matches!(e, LockError::Held { .. }), "{e}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("free again once released: {e}"),
        }
    }
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
    // Wait (up to 10 s) for the child to take the lock.
    let mut held = false;
    for _ in 0..200 {
        assert!(child.try_wait().unwrap().is_none(), "flock --no-fork is running");
        match DataDirLock::acquire(&dir.0) {
            Err(LockError::Held { .. }) => {
                held = true;
                break;
            }
            Ok(ours) => drop(ours), // the child has not locked yet
            Err(e) => panic!("{e}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(held, "the child took the lock");
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

/// Runs `p2pchat ARGS --data-dir DIR` with `stdin` as its standard input.
fn p2pchat_with_input(args: &[&str], dir: &std::path::Path, stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_p2pchat"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn a_passphrase_set_from_a_file_descriptor_is_needed_at_every_start() {
    let dir = TempDir::new("passphrase-cli");
    let plain = p2pchat_with_input(&["id"], &dir.0, "");
    assert!(plain.status.success(), "{}", String::from_utf8_lossy(&plain.stderr));
    let peer = String::from_utf8_lossy(&plain.stdout).trim().to_owned();
    let set = p2pchat_with_input(&["passphrase", "--new-passphrase-fd", "0"], &dir.0, "open sesame\n");
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    assert!(String::from_utf8_lossy(&set.stdout).contains("protected by the passphrase"));
    // Without it (no terminal to ask at): refused, saying what to do.
    let refused = p2pchat_with_input(&["id"], &dir.0, "");
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("protected by a passphrase") && why.contains("--passphrase-fd"), "{why}");
    // A wrong one: refused.
    let wrong = p2pchat_with_input(&["id", "--passphrase-fd", "0"], &dir.0, "open sesame!\n");
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("does not open"));
    // The right one: the same identity.
    let opened = p2pchat_with_input(&["id", "--passphrase-fd", "0"], &dir.0, "open sesame\n");
    assert!(opened.status.success(), "{}", String::from_utf8_lossy(&opened.stderr));
    assert_eq!(String::from_utf8_lossy(&opened.stdout).trim(), peer);
    // Removed again.
    let removed = p2pchat_with_input(&["passphrase", "--remove", "--passphrase-fd", "0"], &dir.0, "open sesame\n");
    assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));
    let again = p2pchat_with_input(&["id"], &dir.0, "");
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), peer);
    // On a directory with no identity yet, it is created wrapped: its key
    // never touches the disk unprotected.
    let fresh = TempDir::new("passphrase-cli-new");
    let made = p2pchat_with_input(&["passphrase", "--new-passphrase-fd", "0"], &fresh.0, "from the start\n");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let file = std::fs::read(fresh.0.join("identity.key")).unwrap();
    assert!(file.starts_with(b"p2pchat-identity-v2\n"), "created unwrapped");
    // The same descriptor for both passphrases is refused.
    let same = p2pchat_with_input(&["passphrase", "--passphrase-fd", "0", "--new-passphrase-fd", "0"], &fresh.0, "x\n");
    assert!(!same.status.success());
}

#[test]
fn public_addresses_come_from_every_source_and_an_unspecified_one_is_refused() {
    use clap::Parser;
    assert!(resolve(&Sources::default(), &defaults()).unwrap().public_addrs.is_empty(), "none by default");
    let cli = p2pchat::cli::Cli::try_parse_from([
        "p2pchat",
        "config",
        "--public-addr",
        "203.0.113.7:30070",
        "--public-addr",
        "[2001:db8::7]:30070",
    ])
    .unwrap();
    let p2pchat::cli::Command::Config(args) = cli.command else { panic!("parsed as config") };
    let from_flags = resolve(&args.sources(), &defaults()).unwrap().public_addrs;
    assert_eq!(from_flags, ["203.0.113.7:30070".parse().unwrap(), "[2001:db8::7]:30070".parse().unwrap()]);
    let env = [("P2PCHAT_PUBLIC_ADDR".to_owned(), "198.51.100.1:1, 198.51.100.2:2".to_owned())].into_iter().collect();
    assert_eq!(resolve(&Sources { env, ..Sources::default() }, &defaults()).unwrap().public_addrs.len(), 2);
    let dir = TempDir::new("public-addr");
    let file = dir.0.join("p2pchat.toml");
    std::fs::write(&file, "public_addr = [\"192.0.2.9:30070\"]\n").unwrap();
    let from_file = resolve(&Sources { file: Some(file), ..Sources::default() }, &defaults()).unwrap();
    assert_eq!(from_file.public_addrs, ["192.0.2.9:30070".parse().unwrap()]);
    for bad in ["0.0.0.0:30070", "[::]:30070", "192.0.2.9:0", "somewhere"] {
        let env = [("P2PCHAT_PUBLIC_ADDR".to_owned(), bad.to_owned())].into_iter().collect();
        let err = resolve(&Sources { env, ..Sources::default() }, &defaults()).unwrap_err().to_string();
        assert!(err.contains("public_addr"), "{bad}: {err}");
    }
}
