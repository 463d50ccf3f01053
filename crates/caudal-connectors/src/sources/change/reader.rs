//! The handle of one CDC run: the pages its reader task produces, and the
//! channel through which the pipeline reports what is durable (so the
//! source may be acknowledged up to there and no further).

use std::sync::Arc;

use caudal_core::record::{Position, Record};
use caudal_core::{Error, ErrorKind, Result};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// The pages of one CDC run. Dropping it stops the reader.
#[derive(Debug)]
pub struct CdcReader {
    pages: mpsc::Receiver<Result<Vec<Record>>>,
    durable: Arc<watch::Sender<Option<Position>>>,
    stop: CancellationToken,
    created_publication: bool,
    closed: Option<CancellationToken>,
}

impl CdcReader {
    /// The handle of a reader task that sends pages to `pages`, watches
    /// `durable` and ends when `stop` is cancelled.
    pub fn new(
        pages: mpsc::Receiver<Result<Vec<Record>>>,
        durable: watch::Sender<Option<Position>>,
        stop: CancellationToken,
        created_publication: bool,
    ) -> Self {
        Self {
            pages,
            durable: Arc::new(durable),
            stop,
            created_publication,
            closed: None,
        }
    }

    /// The same reader, whose task cancels `closed` once it has ended
    /// (after acknowledging what was durable to its source).
    #[must_use]
    pub fn with_closed(mut self, closed: CancellationToken) -> Self {
        self.closed = Some(closed);
        self
    }

    /// Cancelled once the reader task has ended, for a reader whose end
    /// is worth waiting for (it acknowledges its source as it stops).
    pub fn closed(&self) -> Option<CancellationToken> {
        self.closed.clone()
    }

    /// The next page of records; `None` when a bounded read is done.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Record>>> {
        match self.pages.recv().await {
            None => Ok(None),
            Some(Ok(page)) => Ok(Some(page)),
            Some(Err(e)) => Err(e),
        }
    }

    /// Whether this run created what the source keeps on the server for
    /// the pipeline (a publication), so that removing the pipeline may
    /// drop it; what an operator made is left alone.
    pub fn created_publication(&self) -> bool {
        self.created_publication
    }

    /// The handle through which the pipeline reports durable positions.
    pub fn durable(&self) -> Durable {
        Durable(self.durable.clone())
    }
}

impl Drop for CdcReader {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Reports the last position made durable, so the source may be
/// confirmed up to it.
#[derive(Clone, Debug)]
pub struct Durable(Arc<watch::Sender<Option<Position>>>);

impl Durable {
    /// A new handle and the receiver of what it reports (for sources other
    /// than CDC readers that need to know what is durable: the crawler).
    pub fn channel() -> (Self, watch::Receiver<Option<Position>>) {
        let (tx, rx) = watch::channel(None);
        (Self(Arc::new(tx)), rx)
    }

    pub fn mark(&self, position: &Position) {
        self.0.send_replace(Some(position.clone()));
    }
}

/// Runs a reader task; should it panic, the pipeline gets an error instead
/// of an end of pages (which a bounded read would take for "done").
pub fn spawn_reader<F>(task: F, out: mpsc::Sender<Result<Vec<Record>>>)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let handle = tokio::spawn(task);
    tokio::spawn(async move {
        if let Err(e) = handle.await
            && e.is_panic()
        {
            let what = e.into_panic();
            let text = what
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| what.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let _ = out
                .send(Err(Error::new(
                    ErrorKind::Internal,
                    format!("the CDC reader failed: {text}"),
                )))
                .await;
        }
    });
}
