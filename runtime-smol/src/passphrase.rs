//! The passphrase that may wrap the identity key: read from a file
//! descriptor (`--passphrase-fd N`, for scripts and service managers), or
//! asked for at the terminal without echo. Never taken from the command
//! line or the environment, where other local users and logs can see it.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use p2pchat_storage_sqlite::{identity_is_wrapped, Passphrase};

/// The first line readable from file descriptor `fd`.
pub fn from_fd(fd: u32) -> Result<Passphrase, String> {
    let path = format!("/dev/fd/{fd}");
    let file = std::fs::File::open(&path).map_err(|e| format!("cannot read the passphrase from {path}: {e}"))?;
    let mut line = zeroize::Zeroizing::new(Vec::new());
    BufReader::new(file.take(4096))
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("cannot read the passphrase from {path}: {e}"))?;
    Passphrase::new(line.to_vec()).map_err(|e| e.to_string())
}

/// Asks at the controlling terminal, with echo off.
pub fn ask(prompt: &str) -> Result<Passphrase, String> {
    use rustix::termios::{tcgetattr, tcsetattr, LocalModes, OptionalActions};
    let no_terminal =
        |e: std::io::Error| format!("cannot ask for the passphrase (no terminal: {e}); use --passphrase-fd");
    let mut tty = std::fs::OpenOptions::new().read(true).write(true).open("/dev/tty").map_err(no_terminal)?;
    let before = tcgetattr(&tty).map_err(|e| no_terminal(e.into()))?;
    let mut quiet = before.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    tcsetattr(&tty, OptionalActions::Flush, &quiet).map_err(|e| no_terminal(e.into()))?;
    let mut line = zeroize::Zeroizing::new(Vec::new());
    let read = tty.write_all(prompt.as_bytes()).and_then(|()| {
        let mut reader = BufReader::new((&tty).take(4096));
        reader.read_until(b'\n', &mut line).map(|_| ())
    });
    // The terminal gets its echo back whatever happened.
    let _ = tcsetattr(&tty, OptionalActions::Flush, &before);
    let _ = tty.write_all(b"\n");
    read.map_err(|e| format!("cannot read the passphrase: {e}"))?;
    Passphrase::new(line.to_vec()).map_err(|e| e.to_string())
}

/// The passphrase a start needs: from `fd` if given; else, if the identity
/// in `dir` is wrapped, asked for at the terminal; else none.
pub fn for_start(dir: &Path, fd: Option<u32>) -> Result<Option<Passphrase>, String> {
    let wrapped = identity_is_wrapped(dir).map_err(|e| e.to_string())?;
    let exists = dir.join(p2pchat_storage_sqlite::IDENTITY_FILE).exists();
    if let Some(fd) = fd {
        let passphrase = from_fd(fd)?;
        if exists && !wrapped {
            // Said, so nobody believes a key is protected that is not.
            eprintln!(
                "p2pchat: the identity key has no passphrase, so the one given was not used; \
                 `p2pchat passphrase` sets one"
            );
        }
        return Ok(Some(passphrase));
    }
    if !wrapped {
        return Ok(None);
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return Err(p2pchat_storage_sqlite::StorageError::PassphraseNeeded {
            path: dir.join(p2pchat_storage_sqlite::IDENTITY_FILE),
        }
        .to_string());
    }
    ask(&format!("passphrase for {}: ", dir.join(p2pchat_storage_sqlite::IDENTITY_FILE).display())).map(Some)
}
