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
//!
//! Every commit of a node rewrites some ratchet or sender-key state, and
//! the WAL keeps the superseded versions (sealed, but under a key that sits
//! beside the database) until it is reset. So once commits pause for a
//! second, this thread runs a `TRUNCATE` checkpoint: it copies everything
//! back, and the WAL file goes to zero bytes (`secure_delete` already
//! zeroes what the database file itself frees). Old key material then
//! outlives its replacement by about a second of quiet, not until the WAL
//! happens to wrap.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::Arc;
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
    /// Every commit, counted for the thread to see when commits pause.
    total: Arc<AtomicU64>,
    running: Option<(SyncSender<()>, JoinHandle<()>)>,
    /// Starting the thread failed once; the writer's automatic checkpoint
    /// does the work from then on.
    unavailable: bool,
}

impl Checkpointer {
    pub(crate) fn new(path: &Path) -> Self {
        Self { path: path.to_owned(), commits: 0, total: Arc::default(), running: None, unavailable: false }
    }

    /// Counts a commit, and wakes the thread every
    /// [`COMMITS_PER_CHECKPOINT`] of them. Never blocks.
    pub(crate) fn committed(&mut self) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if self.running.is_none() && !self.unavailable {
            match start(&self.path, self.total.clone()) {
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

fn start(path: &Path, total: Arc<AtomicU64>) -> Result<(SyncSender<()>, JoinHandle<()>), String> {
    // Never creates: a database that has gone is not made again here.
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = rusqlite::Connection::open_with_flags(path, flags).map_err(|e| e.to_string())?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(|e| e.to_string())?;
    let (wake, woken) = mpsc::sync_channel::<()>(1);
    let name = path.file_name().map_or_else(|| "checkpoint".into(), |n| format!("checkpoint-{}", n.to_string_lossy()));
    // Commits seen at the last wake-up, and at the last truncation.
    let (mut seen, mut truncated) = (0u64, 0u64);
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || loop {
            let woke = woken.recv_timeout(IDLE_INTERVAL);
            if woke == Err(RecvTimeoutError::Disconnected) {
                return;
            }
            let now = total.load(Ordering::Relaxed);
            // Quiet for a whole interval since commits that were not yet
            // truncated away: reset the WAL. Otherwise copy what is there.
            let quiet = woke.is_err() && now == seen && now != truncated;
            seen = now;
            // (blocked, WAL frames, frames copied): copying never blocks the
            // writer.
            let passive = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            });
            match passive {
                Ok((0, frames, copied)) if quiet && frames == copied => {
                    // Everything is copied: resetting the WAL is quick, but
                    // a TRUNCATE holds new writers back while it waits, so
                    // it waits for nobody (busy now: the next quiet second).
                    let _ = conn.busy_timeout(Duration::ZERO);
                    match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0)) {
                        Ok(0) => truncated = now,
                        Ok(_) => {}
                        Err(e) => log::debug!("background checkpoint: {e}"),
                    }
                    let _ = conn.busy_timeout(Duration::from_secs(5));
                }
                Ok(_) => {}
                Err(e) => log::debug!("background checkpoint: {e}"),
            }
        })
        .map_err(|e| e.to_string())?;
    Ok((wake, thread))
}
