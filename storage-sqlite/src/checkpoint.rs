//! WAL checkpoints off the commit path.
//!
//! A checkpoint copies the WAL back into the database file and syncs it,
//! which takes milliseconds. Run by the committing connection (SQLite's
//! automatic checkpoint), it stalls whichever commit crosses the threshold,
//! and everything queued behind that commit. Here a second connection on
//! its own thread runs `PASSIVE` checkpoints instead: they take no write
//! lock, so commits go on meanwhile. The writer keeps its automatic
//! checkpoint at 16 MiB of WAL, which bounds the WAL under a steady load
//! (a WAL restarts only once fully copied, which commits landing during
//! every background checkpoint prevent); by then this thread has copied
//! nearly all of it, so the writer's checkpoint is short.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::thread::JoinHandle;
use std::time::Duration;

/// Commits between wake-ups of the checkpoint thread.
const COMMITS_PER_CHECKPOINT: u32 = 256;

/// How often the thread checkpoints when few commits come.
const IDLE_INTERVAL: Duration = Duration::from_secs(1);

/// The checkpoint thread of one database, started at its first commit (a
/// database only read never needs one) and stopped when this is dropped.
pub(crate) struct Checkpointer {
    path: PathBuf,
    commits: u32,
    running: Option<(SyncSender<()>, JoinHandle<()>)>,
    /// Starting the thread failed once; the writer's automatic checkpoint
    /// does the work from then on.
    unavailable: bool,
}

impl Checkpointer {
    pub(crate) fn new(path: &Path) -> Self {
        Self { path: path.to_owned(), commits: 0, running: None, unavailable: false }
    }

    /// Counts a commit, and wakes the thread every
    /// [`COMMITS_PER_CHECKPOINT`] of them. Never blocks.
    pub(crate) fn committed(&mut self) {
        if self.running.is_none() && !self.unavailable {
            match start(&self.path) {
                Ok(running) => self.running = Some(running),
                Err(e) => {
                    log::warn!("no background checkpoints for {}: {e}", self.path.display());
                    self.unavailable = true;
                }
            }
        }
        self.commits += 1;
        if self.commits < COMMITS_PER_CHECKPOINT {
            return;
        }
        self.commits = 0;
        if let Some((wake, _)) = &self.running {
            // Full means a wake-up is already pending: nothing is lost.
            let _ = wake.try_send(());
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        if let Some((wake, thread)) = self.running.take() {
            drop(wake);
            let _ = thread.join();
        }
    }
}

fn start(path: &Path) -> Result<(SyncSender<()>, JoinHandle<()>), String> {
    // Never creates: a database that has gone is not made again here.
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = rusqlite::Connection::open_with_flags(path, flags).map_err(|e| e.to_string())?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(|e| e.to_string())?;
    let (wake, woken) = mpsc::sync_channel::<()>(1);
    let name = path.file_name().map_or_else(|| "checkpoint".into(), |n| format!("checkpoint-{}", n.to_string_lossy()));
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || loop {
            match woken.recv_timeout(IDLE_INTERVAL) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {
                    // A busy database is tried again at the next wake-up.
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        log::debug!("background checkpoint: {e}");
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        })
        .map_err(|e| e.to_string())?;
    Ok((wake, thread))
}
