//! Write-path timestamps, for finding where a write's latency goes across the members.
//!
//! Built only with the `latency-probe` feature (`scripts/bench/write-path`); without it every
//! [`mark`] compiles to nothing. With it, and `KEYHOLD_LATENCY_PROBE=<path>` set, each member
//! records `(stage, raft log index, wall-clock ns)` at the points below and appends them to
//! `<path>.<pid>` once a second. The clock is the wall clock so that the members' records line
//! up: the analysis joins them by log index.

/// A point on a write's path. The values are what the records hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    /// Raft appended entries to this member's log (index: the last one).
    LogAppended = 1,
    /// The flusher synced entries (index: the last one).
    LogSynced = 2,
    /// The leader starts sending an AppendEntries (index: its last entry, 0 for none).
    AppendSending = 3,
    /// The leader has the follower's answer.
    AppendAnswered = 4,
    /// A follower has read an AppendEntries request off its stream.
    AppendReceived = 5,
    /// A follower has written its answer.
    AppendAnswerWritten = 6,
    /// The state machine starts applying entries (index: the last one).
    ApplyStarted = 7,
    /// A client write entered `Node::propose` (index: 0, not known yet).
    ProposeStarted = 8,
    /// Raft answered the leader's proposal (index: its entry).
    ProposalApplied = 9,
    /// `Node::propose` returns (index: the entry, 0 on error).
    ProposeReturned = 10,
    /// The KV service's Put handler starts (index: 0).
    PutHandlerStarted = 11,
    /// The KV service's Put handler returns its response (index: 0).
    PutHandlerReturned = 12,
    /// A read from a client connection returned bytes (index: how many).
    ClientRead = 13,
    /// A write to a client connection took bytes (index: how many).
    ClientWritten = 14,
    /// The flusher starts an fsync (index: the last entry it covers).
    FsyncStarted = 15,
    /// The state machine has applied entries (index: the last one).
    ApplyDone = 16,
    /// A runtime worker starts polling a task (index: its spawn location's number, see
    /// [`task_polled`]).
    TaskPollStarted = 17,
    /// A runtime worker has polled a task (index: as above).
    TaskPollDone = 18,
    /// A runtime worker parks (index: 0).
    WorkerParked = 19,
    /// A runtime worker unparks (index: 0).
    WorkerUnparked = 20,
}

#[cfg(feature = "latency-probe")]
mod recorder {
    use std::fmt::Write as _;
    use std::io::Write;
    use std::sync::{Mutex, Once};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    /// Records kept between two writes of the file; more in one second are dropped.
    const RECORDS_PER_SECOND_MAX: usize = 2_000_000;

    static RECORDS: Mutex<Vec<(u8, u64, u64)>> = Mutex::new(Vec::new());
    static START: Once = Once::new();

    pub(super) fn mark(stage: super::Stage, index: u64) {
        START.call_once(start);
        let ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        if let Ok(mut r) = RECORDS.lock()
            && r.len() < RECORDS_PER_SECOND_MAX
        {
            r.push((stage as u8, index, ns));
        }
    }

    static LOCATIONS: Mutex<Vec<&'static std::panic::Location<'static>>> = Mutex::new(Vec::new());

    pub(super) fn location_number(at: &'static std::panic::Location<'static>) -> u64 {
        let mut l = LOCATIONS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = l.iter().position(|x| std::ptr::eq(*x, at)) {
            return n as u64;
        }
        l.push(at);
        (l.len() - 1) as u64
    }

    fn start() {
        let Ok(path) = std::env::var("KEYHOLD_LATENCY_PROBE") else {
            return;
        };
        let path = format!("{path}.{}", std::process::id());
        let spawned = std::thread::Builder::new()
            .name("latency-probe".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    let records =
                        std::mem::take(&mut *RECORDS.lock().unwrap_or_else(|p| p.into_inner()));
                    let locations: Vec<String> = LOCATIONS
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .enumerate()
                        .map(|(n, l)| format!("{n} {}:{}\n", l.file(), l.line()))
                        .collect();
                    let _ = std::fs::write(format!("{path}-tasks"), locations.concat());
                    let mut text = String::with_capacity(records.len() * 32);
                    for (stage, index, ns) in records {
                        let _ = writeln!(text, "{stage} {index} {ns}");
                    }
                    let file = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path);
                    if let Err(e) = file.and_then(|mut f| f.write_all(text.as_bytes())) {
                        tracing::warn!(error = %e, path, "latency probe stops");
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "latency probe not started");
        }
    }
}

/// Records that the write path reached `stage` for log `index`.
#[cfg(feature = "latency-probe")]
pub fn mark(stage: Stage, index: u64) {
    recorder::mark(stage, index);
}

/// Records a task poll's start or end, naming the task by where it was spawned.
#[cfg(feature = "latency-probe")]
pub fn task_polled(at: &'static std::panic::Location<'static>, id: tokio::task::Id, started: bool) {
    let stage = if started {
        Stage::TaskPollStarted
    } else {
        Stage::TaskPollDone
    };
    let id: u64 = id.to_string().parse().unwrap_or(0);
    recorder::mark(
        stage,
        recorder::location_number(at) * 1_000_000 + id % 1_000_000,
    );
}

/// Records nothing: built without the `latency-probe` feature.
#[cfg(not(feature = "latency-probe"))]
#[inline(always)]
pub fn mark(_stage: Stage, _index: u64) {}

/// A client listener whose connections record each read and write ([`Stage::ClientRead`],
/// [`Stage::ClientWritten`]): where a request's bytes arrive and its response's leave, around
/// the handler. Only in builds with the `latency-probe` feature.
#[cfg(feature = "latency-probe")]
pub struct TimedListener<L>(pub L);

#[cfg(feature = "latency-probe")]
mod timed {
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    use super::{Stage, TimedListener, mark};

    /// A connection that records its reads and writes.
    pub struct TimedIo<T>(T);

    impl<L: axum::serve::Listener> axum::serve::Listener for TimedListener<L> {
        type Io = TimedIo<L::Io>;
        type Addr = L::Addr;

        async fn accept(&mut self) -> (Self::Io, Self::Addr) {
            let (io, addr) = self.0.accept().await;
            (TimedIo(io), addr)
        }

        fn local_addr(&self) -> io::Result<Self::Addr> {
            self.0.local_addr()
        }
    }

    fn written(r: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = r
            && *n > 0
        {
            mark(Stage::ClientWritten, *n as u64);
        }
    }

    impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let before = buf.filled().len();
            let r = Pin::new(&mut self.0).poll_read(cx, buf);
            let n = buf.filled().len() - before;
            if n > 0 {
                mark(Stage::ClientRead, n as u64);
            }
            r
        }
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.0).poll_write(cx, buf);
            written(&r);
            r
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.0).poll_write_vectored(cx, bufs);
            written(&r);
            r
        }

        fn is_write_vectored(&self) -> bool {
            self.0.is_write_vectored()
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }
}
