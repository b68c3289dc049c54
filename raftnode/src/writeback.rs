//! Keeps the store's journal written out to disk in small steps, so that fjall's own syncs of
//! it stay short.
//!
//! Keyhold writes fjall's journal to the page cache only: the raft log is the durable record,
//! and a restart re-applies what the store lacks. fjall syncs the journal when a raft snapshot
//! makes the store durable before the log is purged (`KvStore::persist`) and when it seals a
//! journal, and it holds its journal lock while it does: no write batch commits, so no entry
//! applies, until everything written since the last sync is on disk. The members reach a
//! snapshot at the same log index, so they stall together: at 20k puts/s every member's journal
//! fsync took about 30 ms every 1,000 entries, the raft log's fsyncs beside it as long, and the
//! p99 of a 256-client put run rose from about 20 ms to 40–90 ms (BENCHMARKS.md).
//!
//! The writeback thread asks the kernel to start writing the journal's dirty pages back every
//! [`WRITEBACK_INTERVAL`] (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: it neither waits for the
//! disk nor takes any lock of fjall's), so those syncs find little left to write. (fjall
//! preallocates its journal files, so their size says nothing of what was written; the kernel
//! skips clean pages.) It changes what is durable when, never what is acknowledged.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the journal's dirty pages are sent to the disk: at 20k puts/s about half a
/// megabyte each time, a few milliseconds of disk work for fjall's next sync; under a light
/// load a few small writes a second beside the raft log's fsyncs.
const WRITEBACK_INTERVAL: Duration = Duration::from_millis(50);

/// The running writeback thread; dropping it stops the thread.
pub struct JournalWriteback {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl JournalWriteback {
    /// Starts writing back the journal of the fjall database in `db_dir`.
    ///
    /// # Errors
    /// When the thread cannot be spawned.
    pub fn start(db_dir: PathBuf) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("journal-writeback".into())
            .spawn(move || run(db_dir, &stopped))?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it (the shutdown path).
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for JournalWriteback {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// The journal being written.
struct Active {
    number: u64,
    file: File,
}

/// The thread's state: the database directory and the journal it follows.
struct Writeback {
    dir: PathBuf,
    active: Option<Active>,
}

impl Writeback {
    /// Follows the newest journal and starts the writeback of its dirty pages.
    fn tick(&mut self) {
        // fjall seals a journal by starting the next number (and syncs the sealed one itself).
        let sealed = self
            .active
            .as_ref()
            .is_none_or(|a| journal_path(&self.dir, a.number + 1).exists());
        if sealed && let Some(number) = newest_journal(&self.dir) {
            self.active = File::open(journal_path(&self.dir, number))
                .ok()
                .map(|file| Active { number, file });
        }
        if let Some(a) = &self.active {
            start_writeback(&a.file);
        }
    }
}

fn run(dir: PathBuf, stopped: &mpsc::Receiver<()>) {
    let mut writeback = Writeback { dir, active: None };
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(WRITEBACK_INTERVAL) {
        writeback.tick();
    }
}

fn journal_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number}.jnl"))
}

/// The number of the newest journal file (`<n>.jnl`) in `dir`.
fn newest_journal(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| name.strip_suffix(".jnl")?.parse().ok())
        .max()
}

/// Starts the writeback of `file`'s dirty pages without waiting for it.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range(2) reads and writes no memory of ours; `file` stays open for the
    // duration of the call. Offset 0 and length 0 cover the whole file.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "journal writeback");
    }
}

/// Elsewhere the kernel's own writeback has to do.
#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_journal_is_the_highest_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(newest_journal(dir.path()), None);
        for name in ["0.jnl", "12.jnl", "3.jnl", "99.jnl.tmp", "x.jnl", "lock"] {
            std::fs::write(dir.path().join(name), b"").expect("write");
        }
        assert_eq!(newest_journal(dir.path()), Some(12));
    }

    fn following(w: &Writeback) -> Option<u64> {
        w.active.as_ref().map(|a| a.number)
    }

    #[test]
    fn follows_the_newest_journal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = Writeback {
            dir: dir.path().to_path_buf(),
            active: None,
        };
        w.tick();
        assert_eq!(following(&w), None, "no journal yet");
        std::fs::write(journal_path(dir.path(), 0), b"batches").expect("write");
        w.tick();
        assert_eq!(following(&w), Some(0));
        std::fs::write(journal_path(dir.path(), 1), b"more batches").expect("write");
        w.tick();
        assert_eq!(
            following(&w),
            Some(1),
            "a sealed journal is left for the next"
        );
        std::fs::remove_file(journal_path(dir.path(), 0)).expect("remove");
        w.tick();
        assert_eq!(following(&w), Some(1));
    }

    #[test]
    fn the_thread_ends_when_told_to_stop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (stop, stopped) = mpsc::channel::<()>();
        drop(stop);
        // Returns at once instead of ticking forever.
        run(dir.path().to_path_buf(), &stopped);
        let writeback = JournalWriteback::start(dir.path().to_path_buf()).expect("starts");
        writeback.stop();
    }
}
