//! Logs to stderr and to a rotating file (`<name>.log`, 10 MiB each, the
//! last 5 kept) in the configured directory, at the configured level. Each
//! process logs under its own name (the node's or relay's peer ID), so
//! several on one machine never rotate each other's files.
//!
//! Logs name peers, addresses and what happened when: readable by their
//! owner only. A directory this creates is 0700 and every log file it
//! opens 0600, tightened if an older one was looser. An existing directory
//! is left as it is (it may be one the user chose and shares, like
//! `/var/log`); files rotated by an older version keep their mode.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Bytes a log file grows to before it is rotated.
pub const ROTATE_BYTES: u64 = 10 * 1024 * 1024;
/// Rotated files kept (`p2pchat.log.1` … `.5`).
pub const KEEP: u32 = 5;

struct Sink {
    dir: PathBuf,
    name: String,
    file: File,
    written: u64,
}

/// The logger; install it once with [`init`].
pub struct Logger {
    level: log::LevelFilter,
    sink: Mutex<Option<Sink>>,
}

fn open(dir: &Path, name: &str) -> std::io::Result<(File, u64)> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = OpenOptions::new().create(true).append(true).mode(0o600).open(dir.join(format!("{name}.log")))?;
    let metadata = file.metadata()?;
    if metadata.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok((file, metadata.len()))
}

/// Creates the log directory (and any parents it lacks) owner-only.
fn create_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

impl Sink {
    fn rotate(&mut self) -> std::io::Result<()> {
        // Whatever happens below, the count restarts: a rotation that fails
        // is tried again after another full file, not on every line.
        self.written = 0;
        let name = &self.name;
        for n in (1..KEEP).rev() {
            let from = self.dir.join(format!("{name}.log.{n}"));
            if from.exists() {
                std::fs::rename(&from, self.dir.join(format!("{name}.log.{}", n + 1)))?;
            }
        }
        std::fs::rename(self.dir.join(format!("{name}.log")), self.dir.join(format!("{name}.log.1")))?;
        let (file, written) = open(&self.dir, name)?;
        self.file = file;
        self.written = written;
        Ok(())
    }
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let millis = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let line = format!("{millis} {:<5} {}: {}\n", record.level(), record.target(), record.args());
        let _ = std::io::stderr().write_all(line.as_bytes());
        let Ok(mut guard) = self.sink.lock() else { return };
        if let Some(sink) = guard.as_mut() {
            if sink.written + line.len() as u64 > ROTATE_BYTES {
                // A failed rotation keeps writing to the current file.
                let _ = sink.rotate();
            }
            if sink.file.write_all(line.as_bytes()).is_ok() {
                sink.written += line.len() as u64;
            }
        }
    }

    fn flush(&self) {
        if let Ok(mut guard) = self.sink.lock() {
            if let Some(sink) = guard.as_mut() {
                let _ = sink.file.flush();
            }
        }
    }
}

/// Installs the logger, writing `dir/<name>.log`. Returns an error naming
/// the directory if the file cannot be opened (stderr logging still works
/// then).
pub fn init(dir: &Path, name: &str, level: log::LevelFilter) -> Result<(), String> {
    let sink = create_dir(dir).and_then(|()| open(dir, name));
    let (sink, problem) = match sink {
        Ok((file, written)) => (Some(Sink { dir: dir.to_owned(), name: name.to_owned(), file, written }), None),
        Err(e) => (None, Some(format!("cannot write logs to {}: {e}", dir.display()))),
    };
    let logger = Box::leak(Box::new(Logger { level, sink: Mutex::new(sink) }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
    problem.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn log_directories_are_created_0700_and_log_files_0600_even_when_they_were_looser() {
        let base = std::env::temp_dir().join(format!("p2pchat-logging-{}", std::process::id()));
        let dir = base.join("new").join("logs");
        create_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&base.join("new")), 0o700, "parents it creates too");
        let (_, written) = open(&dir, "node").unwrap();
        assert_eq!(written, 0);
        assert_eq!(mode(&dir.join("node.log")), 0o600);
        // A file an older version left readable by others is tightened.
        std::fs::set_permissions(dir.join("node.log"), std::fs::Permissions::from_mode(0o644)).unwrap();
        open(&dir, "node").unwrap();
        assert_eq!(mode(&dir.join("node.log")), 0o600);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
