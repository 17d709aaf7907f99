//! `p2pchat demo`: a relay and three nodes in one process; alice's greeting
//! reaches bob (direct) and carol (relay only), and SIGINT stops it cleanly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[test]
fn the_demo_delivers_a_group_greeting_and_stops_on_sigint() {
    let dir = std::env::temp_dir().join(format!("p2pchat-demo-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_p2pchat"))
        .args(["demo", "--data-dir"])
        .arg(&dir)
        .env("P2PCHAT_LOG_DIR", dir.join("logs"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let wanted =
        ["bob received: \"hello bob and carol, from alice\"", "carol received: \"hello bob and carol, from alice\""];
    while !wanted.iter().all(|w| seen.iter().any(|l: &String| l.contains(w))) {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("the demo did not deliver in time; it printed:\n{}", seen.join("\n"));
            }
        }
    }
    assert!(seen.iter().any(|l| l.starts_with("relay ")), "it prints the relay's address");
    assert!(seen.iter().any(|l| l.starts_with("carol ") && l.contains("relay only")));
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "SIGINT stops it with exit code 0, not {exit}");
    let _ = std::fs::remove_dir_all(&dir);
}
