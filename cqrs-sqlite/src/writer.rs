//! The process's one writer, and group commit.
//!
//! Every append of a process is written on one connection. Appends are queued to one task that
//! takes what is queued (up to `max_group` appends) and writes it in one `BEGIN IMMEDIATE`
//! transaction and one commit, so one disk flush serves every append in the group. An append that
//! finds the queue empty and the connection idle, of one event and without inline projections,
//! does not queue: its caller writes it on the connection, as the one autocommit statement the
//! writer would run for it, which saves the two hand-offs between tasks (to the writer and back)
//! that a lone append would otherwise wait for. Only that statement runs on a caller's task:
//! it commits by itself, so a caller dropped mid-write leaves no transaction open on the
//! connection. If it stores nothing (a conflict, or a retry of stored events: only a transaction
//! tells which), the append queues like any other. The task writes such an append, alone in the
//! queue, the same way (one statement, its own write transaction). A conflict, an idempotency error
//! or a failing inline projection undoes that append alone (an append with inline projections
//! runs in a savepoint; one without writes nothing before it fails), and its caller gets exactly
//! its own result or error. A storage failure (a full disk, an I/O error) ends the group: it is
//! rolled back and none of its appends is stored. Appends of one group see each other in queue
//! order, exactly as if they had been committed one by one.

use std::sync::Arc;

use cqrs_core::{AppendResult, ExpectedVersion, NewEvent, StoreError, StreamId};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::ConnectOptions;
use tokio::sync::{mpsc, oneshot, watch, Mutex};

use crate::append::{self, Appended, Encoded};
use crate::error::{is_connection_error, Errors, SqliteError};
use cqrs_core::backend::InlineProjections;

/// Where an append's caller waits for its result.
type Reply = oneshot::Sender<Result<AppendResult, StoreError>>;

/// One append waiting for the writer.
pub(crate) struct Request {
    pub stream: StreamId,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    pub batch: Encoded,
    pub inline: InlineProjections<SqliteConnection>,
    pub reply: Reply,
}

/// The queue to the writer task, and the connection it writes on.
pub(crate) struct Writer {
    queue: mpsc::Sender<Request>,
    shared: Arc<WriterShared>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

/// What the writer task and the callers writing alone share: the connection (opened on first
/// use, dropped after a connection error) and the settings. Whoever writes holds `conn`, then
/// `gate`, in that order.
struct WriterShared {
    conn: Mutex<Option<SqliteConnection>>,
    parts: WriterParts,
}

/// What the writer task needs.
pub(crate) struct WriterParts {
    pub options: SqliteConnectOptions,
    pub errors: Errors,
    /// Shared with every other write transaction of the process.
    pub gate: Arc<Mutex<()>>,
    /// The key of the last event this process committed: wakes its projection runners.
    pub appended: watch::Sender<i64>,
    pub queue_size: usize,
    pub max_group: usize,
}

impl Writer {
    /// Starts the writer task on the current runtime; it ends when the last [`Writer`] clone's
    /// queue is dropped.
    pub(crate) fn start(parts: WriterParts) -> Self {
        let (queue, requests) = mpsc::channel(parts.queue_size);
        let shared = Arc::new(WriterShared {
            conn: Mutex::new(None),
            parts,
        });
        tokio::spawn(run(requests, Arc::clone(&shared)));
        Self { queue, shared }
    }

    pub(crate) async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        batch: Encoded,
        inline: InlineProjections<SqliteConnection>,
    ) -> Result<AppendResult, StoreError> {
        if inline.is_empty() && batch.len() == 1 {
            if let Some(written) = self.write_alone(stream, expected, &batch).await {
                return written;
            }
        }
        let (reply, outcome) = oneshot::channel();
        let request = Request {
            stream: stream.clone(),
            expected,
            events,
            batch,
            inline,
            reply,
        };
        if self.queue.send(request).await.is_err() {
            return Err(StoreError::Connection(Box::new(SqliteError::WriterStopped)));
        }
        // The writer dropped the request without answering: it died during the group, which may
        // or may not have committed.
        outcome.await.unwrap_or_else(|_| {
            Err(StoreError::OutcomeUnknown(Box::new(
                SqliteError::WriterStopped,
            )))
        })
    }

    /// Writes a one-event append on the caller's task if nothing is queued and the connection
    /// is idle: `None` if it is not, or if the statement stored nothing (the queue then decides
    /// between a conflict and a retry).
    async fn write_alone(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        batch: &Encoded,
    ) -> Option<Result<AppendResult, StoreError>> {
        // Queued appends go first: they wait for the connection already.
        if self.queue.capacity() < self.queue.max_capacity() {
            return None;
        }
        let mut slot = self.shared.conn.try_lock().ok()?;
        let parts = &self.shared.parts;
        let _gate = parts.gate.lock().await;
        if slot.is_none() {
            match parts.options.connect().await {
                Ok(conn) => *slot = Some(conn),
                Err(error) => return Some(Err(parts.errors.map(error))),
            }
        }
        write_lone(&mut slot, parts, stream, expected, batch).await
    }
}

async fn run(mut requests: mpsc::Receiver<Request>, shared: Arc<WriterShared>) {
    let parts = &shared.parts;
    let mut group = Vec::with_capacity(parts.max_group);
    while let Some(first) = requests.recv().await {
        group.push(first);
        while group.len() < parts.max_group {
            match requests.try_recv() {
                Ok(request) => group.push(request),
                Err(_) => break,
            }
        }
        let mut conn = shared.conn.lock().await;
        commit_group(&mut conn, &mut group, parts).await;
        group.clear();
    }
    if let Some(conn) = shared.conn.lock().await.take() {
        let _ = sqlx::Connection::close(conn).await;
    }
}

/// Writes `group` in one transaction and answers every caller.
async fn commit_group(
    slot: &mut Option<SqliteConnection>,
    group: &mut Vec<Request>,
    parts: &WriterParts,
) {
    let errors = &parts.errors;
    // A caller that gave up (its future was dropped) learns nothing either way: skip it.
    group.retain(|request| !request.reply.is_closed());
    if group.is_empty() {
        return;
    }
    let _gate = parts.gate.lock().await;
    if slot.is_none() {
        match parts.options.connect().await {
            Ok(conn) => *slot = Some(conn),
            Err(error) => {
                answer_all(group, errors.map(error));
                return;
            }
        }
    }
    // One event: the guarded statement alone is the whole write. A batch of several is a version
    // read and a plain insert (see `append::insert`), in a transaction.
    let alone = matches!(group.as_slice(), [request]
        if request.inline.is_empty() && request.batch.len() == 1);
    if alone && commit_alone(slot, group, parts).await {
        return;
    }
    let Some(conn) = slot.as_mut() else { return };
    if let Err(error) = sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut *conn).await {
        if is_connection_error(&error) {
            *slot = None;
        }
        answer_all(group, errors.map(error));
        return;
    }
    cqrs_core::metrics::group_commit("sqlite", group.len());
    let mut outcomes = Vec::with_capacity(group.len());
    let mut failure = None;
    for request in group.drain(..) {
        let outcome = match &failure {
            Some(failure) => Err(same_kind(failure)),
            None => append_one(conn, errors, &request).await,
        };
        if let Err(error) = &outcome {
            if failure.is_none() && is_storage_failure(error) {
                failure = Some(same_kind(error));
            }
        }
        outcomes.push((request.reply, outcome));
    }
    // On a storage failure (a full disk, an I/O error, a lost connection) SQLite may have rolled
    // the whole transaction back by itself, and a later statement would then commit on its own:
    // nothing more is written, the transaction is rolled back, and no append of the group is
    // stored.
    if let Some(failure) = failure {
        if sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.is_err() {
            *slot = None;
        }
        answer_uncommitted(outcomes, &failure);
        return;
    }
    match sqlx::raw_sql("COMMIT").execute(&mut *conn).await {
        Ok(_) => answer_committed(outcomes, parts),
        Err(error) => {
            let lost = is_connection_error(&error);
            let failure = errors.map_commit(error);
            if lost {
                *slot = None;
            } else if let Some(conn) = slot.as_mut() {
                // The commit did not happen (SQLite says so for a lock or a full disk): end
                // the transaction so the connection can be used again.
                if sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.is_err() {
                    *slot = None;
                }
            }
            answer_uncommitted(outcomes, &failure);
        }
    }
}

/// A group of one single-event append without inline projections, as one statement in
/// autocommit mode.
/// `false`: it stored nothing (a retry or a conflict: only a transaction tells which) and the
/// caller has not been answered.
async fn commit_alone(
    slot: &mut Option<SqliteConnection>,
    group: &mut Vec<Request>,
    parts: &WriterParts,
) -> bool {
    let Some(request) = group.first() else {
        return false;
    };
    let Some(outcome) = write_lone(
        slot,
        parts,
        &request.stream,
        request.expected,
        &request.batch,
    )
    .await
    else {
        return false;
    };
    match outcome {
        Ok(result) => {
            if let Some(request) = group.pop() {
                let _ = request.reply.send(Ok(result));
            }
        }
        Err(error) => answer_all(group, error),
    }
    true
}

/// A lone one-event append without inline projections, as its one autocommit statement on the
/// writer's connection (by the task or by the caller): `None` if there is no connection or the
/// statement stored nothing (a conflict or a retry: only a transaction tells which). A stored
/// append wakes the process's projection runners.
async fn write_lone(
    slot: &mut Option<SqliteConnection>,
    parts: &WriterParts,
    stream: &StreamId,
    expected: ExpectedVersion,
    batch: &Encoded,
) -> Option<Result<AppendResult, StoreError>> {
    let conn = slot.as_mut()?;
    let outcome = match append::append_alone(conn, stream, expected, batch).await {
        Ok(Some(appended)) => {
            announce(&parts.appended, [&appended]);
            Ok(appended.result)
        }
        Ok(None) => return None,
        Err(error) => {
            if is_connection_error(&error) {
                *slot = None;
            }
            // The statement included the commit.
            Err(parts.errors.map_commit(error))
        }
    };
    cqrs_core::metrics::group_commit("sqlite", 1);
    Some(outcome)
}

/// Answers a group whose transaction committed, and wakes the projection runners of the process.
fn answer_committed(
    outcomes: impl IntoIterator<Item = (Reply, Result<Appended, StoreError>)>,
    parts: &WriterParts,
) {
    let outcomes: Vec<_> = outcomes.into_iter().collect();
    announce(
        &parts.appended,
        outcomes
            .iter()
            .filter_map(|(_, outcome)| outcome.as_ref().ok()),
    );
    for (reply, outcome) in outcomes {
        let _ = reply.send(outcome.map(|appended| appended.result));
    }
}

/// Wakes the projection runners of the process with the newest event the committed appends
/// stored (retries of stored events store nothing).
fn announce<'a>(appended: &watch::Sender<i64>, committed: impl IntoIterator<Item = &'a Appended>) {
    let last = committed
        .into_iter()
        .filter(|appended| appended.fresh)
        .map(|appended| appended.result.position.sequence)
        .max();
    if let Some(last) = last.and_then(|key| i64::try_from(key).ok()) {
        appended.send_if_modified(|known| {
            let newer = last > *known;
            if newer {
                *known = last;
            }
            newer
        });
    }
}

/// Answers a group whose transaction did not commit: conflicts and idempotent replays were
/// decided inside the transaction and stay true; the writes get `failure`.
fn answer_uncommitted(outcomes: Vec<(Reply, Result<Appended, StoreError>)>, failure: &StoreError) {
    for (reply, outcome) in outcomes {
        let outcome = match outcome {
            Ok(appended) if appended.fresh => Err(same_kind(failure)),
            other => other,
        };
        let _ = reply.send(outcome.map(|appended| appended.result));
    }
}

/// A failure of the database rather than of one append's request (a conflict, an idempotency
/// error, an inline projection's error): the transaction may be gone with it.
fn is_storage_failure(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Connection(_) | StoreError::OutcomeUnknown(_) | StoreError::Backend(_)
    )
}

/// One append, with the inline projections of its store, in its own savepoint where it needs
/// one.
async fn append_one(
    conn: &mut SqliteConnection,
    errors: &Errors,
    request: &Request,
) -> Result<Appended, StoreError> {
    // A savepoint undoes what a failed append wrote before failing: its inline projections'
    // rows. Without inline projections a failed append wrote nothing (the version is checked
    // before the insert, and the insert undoes itself), so it needs none.
    if request.inline.is_empty() {
        return append_request(conn, errors, request).await;
    }
    sqlx::raw_sql("SAVEPOINT cqrs_request")
        .execute(&mut *conn)
        .await
        .map_err(|e| errors.map(e))?;
    let outcome = async {
        let appended = append_request(conn, errors, request).await?;
        if appended.fresh {
            let events = append::read_back(
                conn,
                errors,
                &request.stream,
                &appended.result,
                request.events.len(),
            )
            .await?;
            request.inline.apply(&events, conn).await?;
        }
        Ok(appended)
    }
    .await;
    let end = if outcome.is_ok() {
        "RELEASE cqrs_request"
    } else {
        "ROLLBACK TO cqrs_request; RELEASE cqrs_request"
    };
    sqlx::raw_sql(end)
        .execute(&mut *conn)
        .await
        .map_err(|e| errors.map(e))?;
    outcome
}

/// The append itself, inside the writer's transaction.
async fn append_request(
    conn: &mut SqliteConnection,
    errors: &Errors,
    request: &Request,
) -> Result<Appended, StoreError> {
    append::append_on(
        conn,
        errors,
        &request.stream,
        request.expected,
        &request.events,
        &request.batch,
    )
    .await
}

fn answer_all(group: &mut Vec<Request>, error: StoreError) {
    let first = same_kind(&error);
    let mut error = Some(error);
    for (i, request) in group.drain(..).enumerate() {
        let outcome = if i == 0 {
            error.take().unwrap_or_else(|| same_kind(&first))
        } else {
            same_kind(&first)
        };
        let _ = request.reply.send(Err(outcome));
    }
}

/// A copy of a group-wide failure for one more caller (errors are not `Clone`): the same
/// variant, so each caller can tell "nothing was written" from "unknown"; the same
/// [`SqliteError`] inside it (a full disk, a lock held too long), so each caller can match on it;
/// any other source as its message.
fn same_kind(error: &StoreError) -> StoreError {
    fn copy(source: &BoxError) -> BoxError {
        match source.downcast_ref::<SqliteError>() {
            Some(typed) => Box::new(typed.clone()),
            None => source.to_string().into(),
        }
    }
    match error {
        StoreError::Connection(source) => StoreError::Connection(copy(source)),
        StoreError::OutcomeUnknown(source) => StoreError::OutcomeUnknown(copy(source)),
        StoreError::Backend(source) => StoreError::Backend(copy(source)),
        other => StoreError::Backend(other.to_string().into()),
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
