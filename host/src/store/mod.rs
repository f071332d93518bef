//! Where runs are kept: the [`RunStore`](crate::model::RunStore) backends,
//! and the one writer task that batches a host's writes off the run's path.
//!
//! A run hands its start and its summary to the writer's channel and goes
//! on; the writer writes whatever has queued up as one batch. The channel
//! is bounded: when the store cannot keep up, a new run waits for room
//! before it starts (back-pressure), and nothing already queued is dropped —
//! a failed batch is retried until it is written.

mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

pub use self::sqlite::SqliteStore;
use crate::model::{RunStore, RunSummary, StoreWrite};

/// How many writes may wait for the writer before new runs wait for it.
const QUEUE: usize = 1024;

/// The most writes in one batch (one transaction).
const BATCH: usize = 256;

/// The longest pause between two tries of a batch the store refused.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

enum Message {
    Write(StoreWrite),
    /// Answered once everything sent before it is written.
    Flush(oneshot::Sender<()>),
}

/// Answered once a write is in the store.
pub(crate) type Written = oneshot::Receiver<()>;

/// A host's handle on its writer task.
#[derive(Clone)]
pub(crate) struct RunWriter {
    sender: mpsc::Sender<Message>,
}

impl RunWriter {
    /// Starts the writer task for `store`; step outputs longer than
    /// `max_output_bytes` (as JSON) are stored as their SHA-256 and size.
    pub(crate) fn spawn(store: Arc<dyn RunStore>, max_output_bytes: usize) -> RunWriter {
        let (sender, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(write_all(store, receiver, max_output_bytes));
        RunWriter { sender }
    }

    /// Queues `write`, waiting while the queue is full.
    pub(crate) async fn send(&self, write: StoreWrite) {
        // The writer runs as long as a sender exists: it cannot be gone.
        let _ = self.sender.send(Message::Write(write)).await;
    }

    /// Queues `write`; the answer comes once it (and all before it) is in
    /// the store.
    pub(crate) async fn send_written(&self, write: StoreWrite) -> Written {
        self.send(write).await;
        let (done, written) = oneshot::channel();
        let _ = self.sender.send(Message::Flush(done)).await;
        written
    }

    /// Waits until everything queued so far is written, or `within` has
    /// passed; says whether it was written.
    pub(crate) async fn flush(&self, within: Duration) -> bool {
        let (done, written) = oneshot::channel();
        if self.sender.send(Message::Flush(done)).await.is_err() {
            return false;
        }
        matches!(tokio::time::timeout(within, written).await, Ok(Ok(())))
    }
}

async fn write_all(
    store: Arc<dyn RunStore>,
    mut receiver: mpsc::Receiver<Message>,
    max_output_bytes: usize,
) {
    let mut batch = Vec::new();
    let mut flushes = Vec::new();
    while let Some(first) = receiver.recv().await {
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Message::Write(StoreWrite::Finished { mut summary, ended_at_ms }) => {
                    trim_outputs(&mut summary, max_output_bytes);
                    batch.push(StoreWrite::Finished { summary, ended_at_ms });
                }
                Message::Write(write) => batch.push(write),
                Message::Flush(done) => flushes.push(done),
            }
            if batch.len() < BATCH {
                next = receiver.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            write_until_done(&*store, std::mem::take(&mut batch)).await;
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Writes `batch`, trying again (with a growing pause) until the store
/// takes it: a database that went away holds the queue, and so new runs,
/// until it is back.
async fn write_until_done(store: &dyn RunStore, batch: Vec<StoreWrite>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match store.write(batch.clone()).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(
                    "{e}; {} records wait, trying again in {} ms",
                    batch.len(),
                    backoff.as_millis()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Replaces every step output longer than `max` bytes of JSON with
/// `{"sha256", "bytes"}`: the store keeps what a reader needs to recognise
/// it, not the bulk.
fn trim_outputs(summary: &mut RunSummary, max: usize) {
    for step in &mut summary.steps {
        if let Some(output) = &step.output
            && output.len() > max
        {
            step.output = Some(output.digest());
        }
    }
}
