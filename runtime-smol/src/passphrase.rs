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
    BufReader::new(file.take(MAX_PASSPHRASE_LEN as u64))
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("cannot read the passphrase from {path}: {e}"))?;
    Passphrase::new(line.to_vec()).map_err(|e| e.to_string())
}

/// Asks at the controlling terminal, with echo off.
pub fn ask(prompt: &str) -> Result<Passphrase, String> {
    use rustix::termios::{tcgetattr, tcsetattr, LocalModes, OptionalActions, SpecialCodeIndex};
    let no_terminal =
        |e: std::io::Error| format!("cannot ask for the passphrase (no terminal: {e}); use --passphrase-fd");
    let mut tty = std::fs::OpenOptions::new().read(true).write(true).open("/dev/tty").map_err(no_terminal)?;
    let before = tcgetattr(&tty).map_err(|e| no_terminal(e.into()))?;
    // No echo, and keys one at a time, Ctrl-C among them: were Ctrl-C a
    // signal, it would end the process with the terminal's echo still off.
    let mut quiet = before.clone();
    quiet.local_modes.remove(LocalModes::ECHO | LocalModes::ICANON | LocalModes::ISIG);
    quiet.special_codes[SpecialCodeIndex::VMIN] = 1;
    quiet.special_codes[SpecialCodeIndex::VTIME] = 0;
    tcsetattr(&tty, OptionalActions::Flush, &quiet).map_err(|e| no_terminal(e.into()))?;
    let read = tty
        .write_all(prompt.as_bytes())
        .map_err(|e| format!("cannot ask for the passphrase: {e}"))
        .and_then(|()| read_keys(&mut tty));
    // The terminal gets its settings back whatever happened.
    let _ = tcsetattr(&tty, OptionalActions::Flush, &before);
    let _ = tty.write_all(b"\n");
    let line = read?;
    Passphrase::new(line.to_vec()).map_err(|e| e.to_string())
}

/// The longest passphrase read, in bytes.
const MAX_PASSPHRASE_LEN: usize = 4096;

/// Reads keys until Enter, editing as a terminal line would: Backspace
/// removes the last character, Ctrl-U the whole line; Ctrl-C, or Ctrl-D on
/// an empty line, cancels.
fn read_keys(tty: &mut impl Read) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    let cancelled = || "the passphrase prompt was cancelled".to_owned();
    let mut line = zeroize::Zeroizing::new(Vec::new());
    let mut key = zeroize::Zeroizing::new([0u8; 1]);
    loop {
        if tty.read(&mut key[..]).map_err(|e| format!("cannot read the passphrase: {e}"))? == 0 {
            return Ok(line);
        }
        match key[0] {
            b'\r' | b'\n' => return Ok(line),
            0x03 => return Err(cancelled()),
            0x04 if line.is_empty() => return Err(cancelled()),
            0x15 => line.clear(),
            0x7f | 0x08 => {
                // One character, however many bytes of UTF-8 it took.
                while let Some(byte) = line.pop() {
                    if byte & 0xc0 != 0x80 {
                        break;
                    }
                }
            }
            byte if line.len() < MAX_PASSPHRASE_LEN => line.push(byte),
            _ => return Err(format!("a passphrase is at most {MAX_PASSPHRASE_LEN} bytes")),
        }
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::read_keys;

    fn typed(keys: &[u8]) -> Result<Vec<u8>, String> {
        read_keys(&mut &keys[..]).map(|line| line.to_vec())
    }

    #[test]
    fn keys_edit_the_line_as_a_terminal_would() {
        assert_eq!(typed(b"secret\r").unwrap(), b"secret");
        assert_eq!(typed(b"secreX\x7ft\n").unwrap(), b"secret");
        assert_eq!(typed("pä\x7fa€\x7fs\r".as_bytes()).unwrap(), b"pas", "a character of several bytes goes whole");
        assert_eq!(typed(b"wrong\x15right\r").unwrap(), b"right");
        assert_eq!(typed(b"no newline").unwrap(), b"no newline");
    }

    #[test]
    fn ctrl_c_and_ctrl_d_on_an_empty_line_cancel_and_overlong_lines_are_refused() {
        assert!(typed(b"half\x03rest\r").unwrap_err().contains("cancelled"));
        assert!(typed(b"\x04").unwrap_err().contains("cancelled"));
        assert_eq!(typed(b"a\x04b\r").unwrap(), b"a\x04b");
        assert!(typed(&[b'x'; 5000]).unwrap_err().contains("at most 4096 bytes"));
    }
}
