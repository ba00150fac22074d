//! Damaged, foreign and read-only files; a lock held by another connection; the immutability
//! triggers; conflicts inside one commit group.

use std::time::{Duration, Instant};

use cqrs_core::subscription::{ProjectionRunner, RunError, RunnerConfig};
use cqrs_core::{
    CheckpointStore, EventId, EventStore, ExpectedVersion, NewEvent, Position, StoreError, StreamId,
};
use cqrs_core::{Projection, ProjectionError};
use cqrs_sqlite::{SqliteConfig, SqliteError, SqliteProjections, SqliteStore};
use futures_util::TryStreamExt;
use serde_json::json;
use sqlx::{ConnectOptions, Connection};

use crate::TempDir;

fn events(n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| NewEvent {
            event_id: EventId::new(),
            event_type: "Numbered".into(),
            schema_version: 1,
            payload: json!({ "i": i, "pad": "p".repeat(500) }),
            metadata: Default::default(),
        })
        .collect()
}

fn sqlite_error(error: &StoreError) -> Option<&SqliteError> {
    let source = match error {
        StoreError::Backend(source) | StoreError::Connection(source) => source,
        _ => return None,
    };
    source.downcast_ref::<SqliteError>()
}

async fn raw(path: &std::path::Path) -> sqlx::SqliteConnection {
    sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_refused_untouched() {
    let dir = TempDir::new();
    let path = dir.db();
    let text = b"these are my notes, not a database\n".repeat(200);
    std::fs::write(&path, &text).unwrap();
    let error = SqliteStore::open(&path).await.unwrap_err();
    assert!(
        matches!(sqlite_error(&error), Some(SqliteError::NotADatabase { .. })),
        "{error:?}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), text, "the file was changed");
    let created: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(created.len(), 1, "files were created next to it");
}

#[tokio::test]
async fn a_truncated_database_is_refused_untouched() {
    let dir = TempDir::new();
    let path = dir.db();
    let store = SqliteStore::open(&path).await.unwrap();
    let stream = StreamId::new("s", "1");
    store
        .append(&stream, ExpectedVersion::NoStream, events(200))
        .await
        .unwrap();
    store.close().await;
    drop(store);
    // Move everything from the log into the file, so the file alone holds the data.
    let mut conn = raw(&path).await;
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let full = std::fs::read(&path).unwrap();
    assert!(full.len() > 64 * 1024, "{} bytes", full.len());
    for keep in [full.len() / 2, 4096 + 10, 60] {
        std::fs::write(&path, &full[..keep]).unwrap();
        let error = SqliteStore::open(&path).await.unwrap_err();
        assert!(
            matches!(sqlite_error(&error), Some(SqliteError::NotADatabase { .. })),
            "truncated to {keep}: {error:?}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), &full[..keep], "changed");
    }
}

#[tokio::test]
async fn a_read_only_store_reads_and_refuses_every_write() {
    let dir = TempDir::new();
    let path = dir.db();
    let writable = SqliteStore::open(&path).await.unwrap();
    let stream = StreamId::new("s", "1");
    let written = writable
        .append(&stream, ExpectedVersion::NoStream, events(3))
        .await
        .unwrap();
    let config = SqliteConfig::builder(&path)
        .read_only(true)
        .build()
        .unwrap();
    let reader = SqliteStore::open_with(config).await.unwrap();
    assert_eq!(reader.head().await.unwrap(), Some(written.position));
    let refused = reader
        .append(&stream, ExpectedVersion::Any, events(1))
        .await
        .unwrap_err();
    assert!(
        matches!(sqlite_error(&refused), Some(SqliteError::ReadOnly { .. })),
        "{refused:?}"
    );
    let refused = reader
        .save_checkpoint("c", None, Position::new(1, 1))
        .await
        .unwrap_err();
    assert!(
        matches!(sqlite_error(&refused), Some(SqliteError::ReadOnly { .. })),
        "{refused:?}"
    );
    assert_eq!(writable.head().await.unwrap(), Some(written.position));

    // A read-only store on a file without an event store is refused, and creates nothing.
    let empty = dir.path().join("empty.db");
    let config = SqliteConfig::builder(&empty)
        .read_only(true)
        .build()
        .unwrap();
    assert!(SqliteStore::open_with(config).await.is_err());
    assert!(!empty.exists());
}

/// A file the process may not write (permissions). Root writes anyway, so under root this
/// checks nothing and says so.
#[tokio::test]
async fn a_write_protected_file_fails_writes_with_a_typed_error() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new();
    let path = dir.db();
    let store = SqliteStore::open(&path).await.unwrap();
    store
        .append(
            &StreamId::new("s", "1"),
            ExpectedVersion::NoStream,
            events(1),
        )
        .await
        .unwrap();
    store.close().await;
    drop(store);
    tokio::time::sleep(Duration::from_millis(50)).await;
    for file in std::fs::read_dir(dir.path()).unwrap() {
        let file = file.unwrap().path();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o444)).unwrap();
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
    let privileged = std::fs::OpenOptions::new().append(true).open(&path).is_ok();
    let outcome = async {
        if privileged {
            eprintln!("skipped: this process writes read-only files anyway (root)");
            return;
        }
        match SqliteStore::open(&path).await {
            Err(error) => assert!(
                sqlite_error(&error).is_some() || matches!(error, StoreError::Connection(_)),
                "{error:?}"
            ),
            Ok(store) => {
                let error = store
                    .append(&StreamId::new("s", "2"), ExpectedVersion::Any, events(1))
                    .await
                    .unwrap_err();
                assert!(
                    sqlite_error(&error).is_some() || matches!(error, StoreError::Connection(_)),
                    "{error:?}"
                );
            }
        }
    }
    .await;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    outcome
}

/// Another connection holds the write lock: an append waits for it up to the busy timeout, then
/// fails with a typed error and writes nothing; once the lock is gone, appends work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_past_the_busy_timeout_is_a_typed_error() {
    let dir = TempDir::new();
    let config = SqliteConfig::builder(dir.db())
        .busy_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let store = SqliteStore::open_with(config).await.unwrap();
    let stream = StreamId::new("s", "1");
    let mut other = raw(&dir.db()).await;
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();
    let started = Instant::now();
    let error = store
        .append(&stream, ExpectedVersion::NoStream, events(1))
        .await
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert!(
        matches!(
            (&error, sqlite_error(&error)),
            (StoreError::Connection(_), Some(SqliteError::Busy { .. }))
        ),
        "{error:?}"
    );
    assert!(error.is_transient());
    // Concurrent appends, which the writer takes as one group: every caller gets the typed error.
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let stream = StreamId::new("s", format!("concurrent-{i}"));
                store
                    .append(&stream, ExpectedVersion::NoStream, events(2))
                    .await
            })
        })
        .collect();
    for task in tasks {
        let error = task.await.unwrap().unwrap_err();
        assert!(
            matches!(
                (&error, sqlite_error(&error)),
                (StoreError::Connection(_), Some(SqliteError::Busy { .. }))
            ),
            "{error:?}"
        );
    }
    // A lock released within the timeout is waited out.
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        sqlx::query("COMMIT").execute(&mut other).await.unwrap();
        other
    });
    store
        .append(&stream, ExpectedVersion::NoStream, events(1))
        .await
        .unwrap();
    drop(release.await.unwrap());
    assert_eq!(store.stream_version(&stream).await.unwrap().get(), 1);
}

#[tokio::test]
async fn stored_events_cannot_be_changed_or_deleted() {
    let dir = TempDir::new();
    let store = SqliteStore::open(dir.db()).await.unwrap();
    store
        .append(
            &StreamId::new("s", "1"),
            ExpectedVersion::NoStream,
            events(2),
        )
        .await
        .unwrap();
    for statement in [
        "UPDATE events SET payload = '{}'",
        "DELETE FROM events",
        "UPDATE events SET position = position + 100",
    ] {
        let error = sqlx::query(statement)
            .execute(store.pool())
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("immutable"),
            "{statement}: {error}"
        );
    }
    assert_eq!(store.head().await.unwrap(), Some(Position::new(2, 2)));
}

/// Appends queued together share one transaction, yet a conflict or an idempotency error undoes
/// only its own append.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_conflict_in_a_group_undoes_only_its_own_append() {
    let dir = TempDir::new();
    let store = SqliteStore::open(dir.db()).await.unwrap();
    let contested = StreamId::new("s", "contested");
    let mut tasks = Vec::new();
    for i in 0..40 {
        let store = store.clone();
        let contested = contested.clone();
        tasks.push(tokio::spawn(async move {
            let stream = if i % 4 == 0 {
                contested
            } else {
                StreamId::new("s", format!("own-{i}"))
            };
            store
                .append(&stream, ExpectedVersion::NoStream, events(3))
                .await
        }));
    }
    let (mut won, mut lost) = (0, 0);
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(_) => won += 1,
            Err(StoreError::Concurrency(c)) if i % 4 == 0 => {
                assert_eq!(c.actual.get(), 3);
                lost += 1;
            }
            Err(other) => panic!("append {i}: {other}"),
        }
    }
    assert_eq!((won, lost), (31, 9));
    assert_eq!(store.stream_version(&contested).await.unwrap().get(), 3);
    let head = store.head().await.unwrap().unwrap();
    assert_eq!(
        head.sequence,
        31 * 3,
        "positions of undone appends were not reused"
    );
}

/// A batch longer than one INSERT statement takes (500 rows) is stored whole, in order, under
/// every kind of expectation; one whose later rows fail (an id stored already) stores none of
/// its earlier rows.
#[tokio::test]
async fn a_batch_of_several_statements_is_stored_whole_or_not_at_all() {
    let dir = TempDir::new();
    let store = SqliteStore::open(dir.db()).await.unwrap();
    let first = StreamId::new("s", "first");
    let written = store
        .append(&first, ExpectedVersion::NoStream, events(1_200))
        .await
        .unwrap();
    assert_eq!(written.stream_version.get(), 1_200);
    assert_eq!(written.position, Position::new(1_200, 1_200));
    let stored = store
        .read_stream(&first, cqrs_core::StreamVersion::INITIAL, 2_000)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1_200);
    for (i, event) in stored.iter().enumerate() {
        assert_eq!(event.stream_version.get(), i as u64 + 1);
        assert_eq!(
            event.position.sequence,
            i as u64 + 1,
            "positions follow versions"
        );
    }

    // `Any` and `StreamExists` do not pin the version: the store learns it from the insert.
    let any = StreamId::new("s", "any");
    let written = store
        .append(&any, ExpectedVersion::Any, events(700))
        .await
        .unwrap();
    assert_eq!(written.stream_version.get(), 700);
    assert_eq!(written.position.sequence, 1_900);
    let written = store
        .append(&any, ExpectedVersion::StreamExists, events(600))
        .await
        .unwrap();
    assert_eq!(written.stream_version.get(), 1_300);
    assert_eq!(written.position.sequence, 2_500);

    // Row 701 of this batch (in its second statement) has an id the first stream holds.
    let mut batch = events(1_200);
    batch[700].event_id = stored[3].event_id;
    let failed = StreamId::new("s", "failed");
    let error = store
        .append(&failed, ExpectedVersion::NoStream, batch)
        .await
        .unwrap_err();
    assert!(
        matches!(error, StoreError::IdempotencyConflict { .. }),
        "{error}"
    );
    assert_eq!(store.stream_version(&failed).await.unwrap().get(), 0);
    assert_eq!(
        store.head().await.unwrap(),
        Some(Position::new(2_500, 2_500))
    );
}

/// A batch of several events is checked against its expectation before any row is inserted: an
/// expectation ahead of the stream (which an insert at the versions that follow it would turn
/// into a gap), a stale one, `NoStream` on a stream and `StreamExists` on none store nothing, and
/// an accepted batch continues the stream without a gap, positions following versions.
#[tokio::test]
async fn a_batch_is_checked_before_it_is_inserted_and_leaves_no_gap() {
    let dir = TempDir::new();
    let store = SqliteStore::open(dir.db()).await.unwrap();
    let s = StreamId::new("s", "checked");
    store
        .append(&s, ExpectedVersion::NoStream, events(2))
        .await
        .unwrap();
    for expected in [
        ExpectedVersion::Exact(cqrs_core::StreamVersion::new(5)),
        ExpectedVersion::Exact(cqrs_core::StreamVersion::new(1)),
        ExpectedVersion::NoStream,
    ] {
        match store.append(&s, expected, events(3)).await {
            Err(StoreError::Concurrency(c)) => assert_eq!(c.actual.get(), 2, "{expected:?}"),
            other => panic!("{expected:?}: expected a conflict, got {other:?}"),
        }
    }
    let none = StreamId::new("s", "none");
    match store
        .append(&none, ExpectedVersion::StreamExists, events(3))
        .await
    {
        Err(StoreError::Concurrency(c)) => assert_eq!(c.actual.get(), 0),
        other => panic!("StreamExists on no stream: expected a conflict, got {other:?}"),
    }
    assert_eq!(store.head().await.unwrap(), Some(Position::new(2, 2)));

    let written = store
        .append(
            &s,
            ExpectedVersion::Exact(cqrs_core::StreamVersion::new(2)),
            events(3),
        )
        .await
        .unwrap();
    assert_eq!(written.stream_version.get(), 5);
    assert_eq!(written.position, Position::new(5, 5));
    let stored = store
        .read_stream(&s, cqrs_core::StreamVersion::INITIAL, 100)
        .await
        .unwrap();
    let versions: Vec<(u64, u64)> = stored
        .iter()
        .map(|e| (e.stream_version.get(), e.position.sequence))
        .collect();
    assert_eq!(versions, [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]);
}

/// Yields to the runtime `n` times.
async fn yields(n: usize) {
    for _ in 0..n {
        tokio::task::yield_now().await;
    }
}

/// Appends dropped at every stage of their write (waiting for the connection, mid-statement,
/// after it) leave the writer usable and the stream whole: an append written on its caller's
/// task is one autocommit statement, so a dropped caller leaves no transaction open, and the
/// next appends (alone or queued) go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_dropped_mid_write_leave_the_writer_usable() {
    let dir = TempDir::new();
    let store = crate::open_fast(&dir.db()).await;
    let stream = StreamId::new("numbers", "n");
    let (mut kept, mut dropped) = (0_u64, 0);
    for i in 0..300 {
        let append = store.append(&stream, ExpectedVersion::Any, events(1));
        tokio::select! {
            biased;
            _ = yields(i % 12) => dropped += 1,
            written = append => {
                written.unwrap();
            }
        }
        store
            .append(&stream, ExpectedVersion::Any, events(1))
            .await
            .unwrap();
        kept += 1;
    }
    let stored = store
        .read_stream(&stream, Default::default(), usize::MAX)
        .await
        .unwrap();
    let versions: Vec<u64> = stored.iter().map(|e| e.stream_version.get()).collect();
    assert_eq!(versions, (1..=versions.len() as u64).collect::<Vec<_>>());
    assert!(stored.len() as u64 >= kept);
    assert!(
        dropped > 100,
        "only {dropped} of 300 appends were dropped before they finished"
    );
    // No write transaction was left open: another connection takes the write lock at once.
    let mut other = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.db())
        .busy_timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE; ROLLBACK")
        .execute(&mut other)
        .await
        .unwrap();
}

/// The size of the file system `a_full_disk_…` mounts for its child, and how much of it the
/// child's filler file takes before the appends start (then frees for the read model, then
/// removes).
const TMPFS_SIZE: &str = "2m";
const FILLER_BYTES: usize = 1024 * 1024;
/// What the child frees for the read model's catch-up: room for part of its rows.
const ROOM_FOR_THE_READ_MODEL: usize = 128 * 1024;

/// Not a test: the process of
/// `a_full_disk_fails_appends_with_a_typed_error_and_keeps_every_acknowledged_one`, with its
/// database on a small tmpfs of its own. Appends until the disk is full, on every write path,
/// checks what failed and what is stored, runs a read model's catch-up into the full disk, frees
/// the space, and appends and catches up again. Panics on anything wrong; prints `FULL after <n>
/// events` once the disk is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "entry point of a child process"]
async fn full_disk_child() {
    let db = crate::child_db();
    let store = SqliteStore::open(&db).await.unwrap();
    Copies::create(&store).await;
    let filler = db.with_file_name("filler");
    std::fs::write(&filler, vec![0u8; FILLER_BYTES]).unwrap();
    let mut acked = Acked::default();

    // Batches of ten (a transaction of the writer's) until one fails.
    let batches = StreamId::new("full", "batches");
    let error = acked.until_failure(&store, &batches, 10).await;
    println!("FULL after {} events", acked.total());
    assert!(matches!(error, StoreError::Connection(_)), "{error:?}");

    // Every byte taken. A smaller write may still fit where the failed transaction had grown the
    // log, so each write path appends until it fails too: a lone one-event append (one
    // autocommit statement) ...
    let squeeze = db.with_file_name("squeeze");
    fill_up(&squeeze);
    acked
        .until_failure(&store, &StreamId::new("full", "lone"), 1)
        .await;
    // ... and concurrent appends, which the writer commits in shared transactions: each gets
    // its own result, stored or `DiskFull`.
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < 10_000, "concurrent appends never failed");
        let tasks: Vec<_> = (0..4)
            .map(|i| {
                let store = store.clone();
                let stream = StreamId::new("full", format!("concurrent-{i}"));
                let expected = expected_at(acked.version(&stream));
                tokio::spawn(async move {
                    let outcome = store.append(&stream, expected, events(1)).await;
                    (stream, outcome)
                })
            })
            .collect();
        let mut failed = false;
        for task in tasks {
            let (stream, outcome) = task.await.unwrap();
            failed |= acked.record(&stream, outcome).is_some();
        }
        if failed {
            break;
        }
    }

    // Nothing partial: exactly the acknowledged appends, whole, positions without a gap.
    acked.check(&store).await;

    // A read model in the same file, given room for part of its rows: the catch-up stops with
    // the storage's error, and what it committed is exactly what its checkpoint says.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len((FILLER_BYTES - ROOM_FOR_THE_READ_MODEL) as u64)
        .unwrap();
    let error = Copies::catch_up(&store).await.unwrap_err();
    assert!(Copies::is_full_disk(&error), "{error:?}");
    let checkpoint = store.load_checkpoint(Copies::NAME).await.unwrap();
    let copied = Copies::count(&store).await;
    assert_eq!(
        copied,
        checkpoint.map_or(0, |p| p.sequence),
        "rows beside the checkpoint"
    );
    println!("the read model stopped at {copied} events: {error}");
    assert!(
        copied > 0 && copied < acked.total(),
        "the catch-up should stop part of the way: {copied} of {}",
        acked.total()
    );

    // Room again: the same store appends where it stopped, without a restart.
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&squeeze).unwrap();
    for (stream, size) in [(&batches, 10), (&StreamId::new("full", "lone"), 1)] {
        let failed = acked.append(&store, stream, size).await;
        assert!(
            failed.is_none(),
            "no room after freeing the disk: {failed:?}"
        );
    }
    acked.check(&store).await;
    // The read model resumes at its checkpoint, and holds every event once.
    Copies::catch_up(&store).await.unwrap();
    assert_eq!(Copies::count(&store).await, acked.total());

    // And a reopened file holds all of it.
    store.close().await;
    acked.check(&SqliteStore::open(&db).await.unwrap()).await;
}

/// A read model in the store's file with one large row per event, so that a full disk refuses
/// its writes.
#[derive(Debug, Default)]
struct Copies;

impl Copies {
    async fn create(store: &SqliteStore) {
        sqlx::query("CREATE TABLE copies (position INTEGER PRIMARY KEY, pad TEXT NOT NULL)")
            .execute(store.pool())
            .await
            .unwrap();
    }

    async fn count(store: &SqliteStore) -> u64 {
        let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM copies")
            .fetch_one(store.pool())
            .await
            .unwrap();
        count as u64
    }

    async fn catch_up(store: &SqliteStore) -> Result<Self, RunError> {
        let config = RunnerConfig::builder().batch_size(20).build().unwrap();
        ProjectionRunner::new(Self, SqliteProjections::new(store.clone()))
            .with_config(config)
            .catch_up()
            .await
    }

    /// Whether a catch-up failed because the disk is full (reported by SQLite to the handler or
    /// to the batch's commit).
    fn is_full_disk(error: &RunError) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(error) = cause {
            let full = matches!(
                error.downcast_ref::<SqliteError>(),
                Some(SqliteError::DiskFull)
            ) || error
                .downcast_ref::<sqlx::Error>()
                .and_then(|e| e.as_database_error())
                .and_then(|e| e.code())
                .is_some_and(|code| code == "13");
            if full {
                return true;
            }
            cause = error.source();
        }
        false
    }
}

impl Projection for Copies {
    const NAME: &'static str = "copies";
    const EVENT_TYPES: &'static [&'static str] = &["Numbered"];
    type Context = sqlx::SqliteConnection;

    async fn handle<'a>(
        &'a mut self,
        event: &'a cqrs_core::RecordedEvent,
        db: &'a mut sqlx::SqliteConnection,
    ) -> Result<(), ProjectionError> {
        sqlx::query("INSERT INTO copies (position, pad) VALUES (?1, ?2)")
            .bind(event.position.sequence as i64)
            .bind("c".repeat(1000))
            .execute(db)
            .await
            .map_err(|source| ProjectionError::Handler {
                projection: Self::NAME,
                event_type: event.event_type.clone(),
                position: event.position,
                source: source.into(),
            })?;
        Ok(())
    }
}

/// What the full-disk child's appends were told, per stream: the version each acknowledged.
#[derive(Debug, Default)]
struct Acked(std::collections::BTreeMap<String, u64>);

impl Acked {
    fn version(&self, stream: &StreamId) -> u64 {
        self.0.get(stream.id()).copied().unwrap_or(0)
    }

    fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// Records an append's outcome: `None` if it was stored; its error if it failed, which must
    /// be the full disk.
    fn record(
        &mut self,
        stream: &StreamId,
        outcome: Result<cqrs_core::AppendResult, StoreError>,
    ) -> Option<StoreError> {
        match outcome {
            Ok(written) => {
                self.0
                    .insert(stream.id().to_owned(), written.stream_version.get());
                None
            }
            Err(error) => {
                assert!(
                    matches!(sqlite_error(&error), Some(SqliteError::DiskFull)),
                    "{error:?}"
                );
                Some(error)
            }
        }
    }

    /// Appends `size` events to `stream` after those acknowledged and records the outcome: `None`
    /// if they were stored, the error if not (which must be the full disk).
    async fn append(
        &mut self,
        store: &SqliteStore,
        stream: &StreamId,
        size: usize,
    ) -> Option<StoreError> {
        let expected = expected_at(self.version(stream));
        let outcome = store.append(stream, expected, events(size)).await;
        self.record(stream, outcome)
    }

    /// Appends `size` events at a time to `stream` until one append fails; returns its error.
    async fn until_failure(
        &mut self,
        store: &SqliteStore,
        stream: &StreamId,
        size: usize,
    ) -> StoreError {
        for _ in 0..100_000 {
            if let Some(error) = self.append(store, stream, size).await {
                return error;
            }
        }
        panic!("appends to {stream} never failed");
    }

    /// The store holds exactly the acknowledged events: every stream's versions dense up to
    /// what was acknowledged, and the global positions dense.
    async fn check(&self, store: &SqliteStore) {
        let all: Vec<cqrs_core::RecordedEvent> = cqrs_core::store::read_all_batched(
            store,
            Position::START,
            cqrs_core::EventTypes::All,
            500,
        )
        .try_collect()
        .await
        .unwrap();
        let positions: Vec<u64> = all.iter().map(|e| e.position.sequence).collect();
        assert_eq!(
            positions,
            (1..=self.total()).collect::<Vec<_>>(),
            "positions"
        );
        let mut versions = std::collections::BTreeMap::<String, Vec<u64>>::new();
        for event in &all {
            versions
                .entry(event.stream.id().to_owned())
                .or_default()
                .push(event.stream_version.get());
        }
        for (stream, acked) in &self.0 {
            let stored = versions.remove(stream).unwrap_or_default();
            assert_eq!(stored, (1..=*acked).collect::<Vec<_>>(), "{stream}");
        }
        assert!(versions.is_empty(), "unacknowledged streams: {versions:?}");
    }
}

/// Writes `path` until the file system has no room left for another byte.
fn fill_up(path: &std::path::Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    for size in [4096, 1] {
        loop {
            match file.write(&[0u8; 4096][..size]) {
                Ok(0) => break,
                Ok(_) => {}
                Err(error) if error.kind() == std::io::ErrorKind::StorageFull => break,
                Err(error) => panic!("filling up the disk: {error}"),
            }
        }
    }
}

fn expected_at(version: u64) -> ExpectedVersion {
    match version {
        0 => ExpectedVersion::NoStream,
        v => ExpectedVersion::Exact(cqrs_core::StreamVersion::new(v)),
    }
}

/// A disk that fills up under the store: every append fails with `SqliteError::DiskFull` (a
/// connection-class error: nothing was written), batches are stored whole or not at all, every
/// acknowledged append stays, a read model's catch-up stops with its rows and checkpoint in step,
/// and once there is room again the same store appends on, without a gap, and the read model
/// resumes. The child process runs in a user and mount namespace of its own (`unshare`), on a tmpfs
/// of `TMPFS_SIZE`, so nothing outside it fills up.
#[tokio::test]
async fn a_full_disk_fails_appends_with_a_typed_error_and_keeps_every_acknowledged_one() {
    let dir = TempDir::new();
    let mount = dir.path().join("tmpfs");
    std::fs::create_dir(&mount).unwrap();
    let script = format!("mount -t tmpfs -o size={TMPFS_SIZE} tmpfs \"$0\" && exec \"$@\"");
    let mut child = crate::start_child_under(
        &[
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            &script,
            mount.to_str().unwrap(),
        ],
        "faults::full_disk_child",
        &mount.join("events.db"),
        &[],
    );
    child.wait_success();
    let full = child.lines("FULL after ");
    assert_eq!(full.len(), 1, "the child never filled its disk: {full:?}");
    eprintln!("{}; {:?}", full[0], child.lines("the read model stopped"));
}
