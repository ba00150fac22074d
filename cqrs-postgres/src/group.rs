//! Group commit: concurrent appends to different streams, written by one task in one statement and
//! one commit. Whatever the group cannot settle for a caller (a refused expectation, a retry of
//! stored ids, a failed statement) goes back to that caller, who appends alone with the full
//! checks; so every caller gets exactly the result or error an individual append would give.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cqrs_core::{AppendResult, ExpectedVersion, Position, StreamId};
use sqlx::postgres::PgPool;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

use crate::append::{expected_code, to_version, Encoded};
use crate::row::parse_tx;
use crate::sql::Statements;

/// Group-commit settings for [`crate::PostgresStore::with_group_commit`].
///
/// The writer takes the first waiting append, then gathers more (appends to a stream already in the
/// group wait for the next one) until it has `max_batch` or `max_wait` has passed, and writes them
/// in one statement. While a group is being written, new appends queue up for the next: under load,
/// groups fill by themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommit {
    /// The most appends written together (at least 1).
    pub max_batch: usize,
    /// How long to wait for more appends after the first; `Duration::ZERO` takes only what is
    /// already queued.
    pub max_wait: Duration,
}

impl Default for GroupCommit {
    /// 64 appends, 1 ms.
    fn default() -> Self {
        Self {
            max_batch: 64,
            max_wait: Duration::from_millis(1),
        }
    }
}

struct Request {
    stream: StreamId,
    expected: i64,
    batch: Arc<Encoded>,
    /// `Some`: written by the group. `None` (or dropped): append alone.
    reply: oneshot::Sender<Option<AppendResult>>,
}

pub(crate) struct GroupCommitter {
    config: GroupCommit,
    pool: PgPool,
    sql: Arc<Statements>,
    /// The writer starts on first use, on the caller's runtime; it stops when every store clone
    /// holding this is dropped (the channel closes).
    sender: OnceLock<mpsc::Sender<Request>>,
}

impl GroupCommitter {
    pub(crate) fn new(pool: PgPool, sql: Arc<Statements>, config: GroupCommit) -> Arc<Self> {
        Arc::new(Self {
            config: GroupCommit {
                max_batch: config.max_batch.max(1),
                ..config
            },
            pool,
            sql,
            sender: OnceLock::new(),
        })
    }

    pub(crate) fn config(&self) -> GroupCommit {
        self.config
    }

    /// Hands the batch to the writer; `None` if the caller must append alone.
    pub(crate) async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        batch: &Arc<Encoded>,
    ) -> Option<AppendResult> {
        let sender = self.sender.get_or_init(|| {
            let (sender, receiver) = mpsc::channel(self.config.max_batch.saturating_mul(4));
            tokio::spawn(writer(
                self.pool.clone(),
                self.sql.clone(),
                receiver,
                self.config,
            ));
            sender
        });
        let (reply, result) = oneshot::channel();
        let request = Request {
            stream: stream.clone(),
            expected: expected_code(expected),
            batch: batch.clone(),
            reply,
        };
        // A closed channel or a dropped reply (the writer's runtime is gone): append alone.
        sender.send(request).await.ok()?;
        result.await.ok().flatten()
    }
}

async fn writer(
    pool: PgPool,
    sql: Arc<Statements>,
    mut receiver: mpsc::Receiver<Request>,
    config: GroupCommit,
) {
    // Appends that arrived while their stream was already in the group, oldest first.
    let mut deferred: VecDeque<Request> = VecDeque::new();
    loop {
        let mut group = Vec::with_capacity(config.max_batch);
        let mut streams = HashSet::new();
        let mut later = VecDeque::new();
        while let Some(request) = deferred.pop_front() {
            if group.len() < config.max_batch && streams.insert(request.stream.clone()) {
                group.push(request);
            } else {
                later.push_back(request);
            }
        }
        deferred = later;
        if group.is_empty() {
            match receiver.recv().await {
                Some(request) => {
                    streams.insert(request.stream.clone());
                    group.push(request);
                }
                None => return,
            }
        }
        let deadline = tokio::time::Instant::now() + config.max_wait;
        while group.len() < config.max_batch {
            let request = match receiver.try_recv() {
                Ok(request) => request,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if config.max_wait.is_zero() {
                        break;
                    }
                    match tokio::time::timeout_at(deadline, receiver.recv()).await {
                        Ok(Some(request)) => request,
                        Ok(None) | Err(_) => break,
                    }
                }
            };
            if streams.insert(request.stream.clone()) {
                group.push(request);
            } else {
                deferred.push_back(request);
            }
        }
        write_group(&pool, &sql, group).await;
    }
}

/// One statement for the whole group; replies to every request.
async fn write_group(pool: &PgPool, sql: &Statements, group: Vec<Request>) {
    let events: usize = group.iter().map(|r| r.batch.len()).sum();
    let mut columns = Columns::with_capacity(events);
    for (b, request) in (0_i32..).zip(&group) {
        columns.push(b, request);
    }
    let result = sqlx::query(sql.append_many.clone())
        .bind(&columns.batch)
        .bind(&columns.stream_type)
        .bind(&columns.stream_id)
        .bind(&columns.expected)
        .bind(&columns.offset)
        .bind(&columns.ids)
        .bind(&columns.types)
        .bind(&columns.schema_versions)
        .bind(&columns.payloads)
        .bind(&columns.metadata)
        .fetch_all(pool)
        .await;
    let mut written: Vec<Option<AppendResult>> = vec![None; group.len()];
    match result {
        Ok(rows) => {
            for row in &rows {
                if let Some((b, result)) = settled(row) {
                    let n = group.get(b).map(|r| r.batch.len());
                    if let (Some(slot), Some(n)) = (written.get_mut(b), n) {
                        // Only a whole batch counts; anything else is re-checked alone.
                        if result.0 == n as u64 {
                            *slot = Some(result.1);
                        }
                    }
                }
            }
            tracing::trace!(appends = group.len(), events, "group committed");
        }
        // Nothing of the group was written (one statement, one transaction), or the commit's
        // outcome is unknown (lost connection): each caller appends alone, and idempotency returns
        // the original result if the group did commit.
        Err(error) => {
            tracing::debug!(%error, appends = group.len(), "group append failed; appending individually")
        }
    }
    for (request, result) in group.into_iter().zip(written) {
        let _ = request.reply.send(result);
    }
}

/// A summary row as (batch index, (events written, result)); `None` for a refused batch or an
/// unreadable row (the caller then appends alone and finds out).
fn settled(row: &sqlx::postgres::PgRow) -> Option<(usize, (u64, AppendResult))> {
    let b: i32 = row.try_get("b").ok()?;
    let n: i64 = row.try_get("n").ok()?;
    if n <= 0 {
        return None;
    }
    let actual: i64 = row.try_get("actual").ok()?;
    let last: i64 = row.try_get("last").ok()?;
    let tx: String = row.try_get("tx").ok()?;
    let n = u64::try_from(n).ok()?;
    Some((
        usize::try_from(b).ok()?,
        (
            n,
            AppendResult {
                stream_version: to_version(actual).advance(n),
                position: Position::new(parse_tx(&tx).ok()?, u64::try_from(last).ok()?),
            },
        ),
    ))
}

/// The group flattened into the statement's parallel arrays, one entry per event.
struct Columns {
    batch: Vec<i32>,
    stream_type: Vec<String>,
    stream_id: Vec<String>,
    expected: Vec<i64>,
    offset: Vec<i64>,
    ids: Vec<uuid::Uuid>,
    types: Vec<String>,
    schema_versions: Vec<i32>,
    payloads: Vec<String>,
    metadata: Vec<String>,
}

impl Columns {
    fn with_capacity(n: usize) -> Self {
        Self {
            batch: Vec::with_capacity(n),
            stream_type: Vec::with_capacity(n),
            stream_id: Vec::with_capacity(n),
            expected: Vec::with_capacity(n),
            offset: Vec::with_capacity(n),
            ids: Vec::with_capacity(n),
            types: Vec::with_capacity(n),
            schema_versions: Vec::with_capacity(n),
            payloads: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, b: i32, request: &Request) {
        let batch = &request.batch;
        for (i, offset) in (0..batch.len()).zip(1_i64..) {
            self.batch.push(b);
            self.stream_type
                .push(request.stream.stream_type().to_owned());
            self.stream_id.push(request.stream.id().to_owned());
            self.expected.push(request.expected);
            self.offset.push(offset);
            self.ids.push(batch.ids[i]);
            self.types.push(batch.types[i].clone());
            self.schema_versions.push(batch.schema_versions[i]);
            self.payloads.push(batch.payloads[i].clone());
            self.metadata.push(batch.metadata[i].clone());
        }
    }
}
