//! The projection part of the suite: what a [`ProjectionRunner`] on every [`ProjectionBackend`]
//! promises (failures at their position, skips, the lease around catch-ups and rebuilds,
//! read-your-own-writes from a standby).
//!
//! A backend's test crate calls [`crate::projection_conformance_tests!`] with an async factory
//! returning a fresh backend over an empty store, and the backend's projection context type.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::backend::ProjectionBackend;
use crate::event::{EventId, Metadata, NewEvent, RecordedEvent};
use crate::projection::{Projection, ProjectionError};
use crate::store::{EventStore, StoreError};
use crate::stream::{ExpectedVersion, Position, StreamId};
use crate::subscription::{
    FailureCause, ProjectionFailure, ProjectionHandle, ProjectionRunner, ProjectionState,
    ProjectionStatus, RecordedFailure, RunError, RunnerConfig,
};

/// Generates one `#[tokio::test]` per projection conformance case, each with a fresh backend
/// from `$factory` (an `async fn() -> B` where `B: ProjectionBackend<Recorder<$context>>`).
/// With `inline = $inline` (an `async fn() -> (S, Recorder<$context>)`: a fresh store running
/// that recorder as an inline projection), the inline case runs too.
#[macro_export]
macro_rules! projection_conformance_tests {
    ($factory:path, context = $context:ty) => {
        $crate::projection_conformance_tests!(@cases $factory; $context;
            failures_stop_at_their_event_and_skips_move_past_them,
            catch_up_and_rebuild_hold_the_lease,
            a_standby_waits_on_the_shared_checkpoint,
            catch_up_applies_everything_committed_before_it,
            one_lease_holder_at_a_time,
            an_empty_batch_moves_the_checkpoint_without_a_flush,
            failures_are_recorded_replaced_and_cleared,
        );
    };
    ($factory:path, context = $context:ty, inline = $inline:path) => {
        $crate::projection_conformance_tests!($factory, context = $context);

        #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn inline_projections_commit_with_their_append_or_not_at_all() {
            let (store, recorder) = $inline().await;
            $crate::conformance::projections::inline_projections_commit_with_their_append_or_not_at_all::<$context, _>(
                store, recorder,
            )
            .await;
        }
    };
    (@cases $factory:path; $context:ty; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                $crate::conformance::projections::$case::<$context, _>($factory().await).await;
            }
        )*
    };
}

/// A projection for any backend: it records the positions it applied in memory, committing them
/// in [`Projection::flush`] and dropping them in [`Projection::discard`], so `applied` holds each
/// committed event once, whatever the backend rolls back. It applies `Recorded`, refuses
/// `Refused` with a handler error and panics on `Panicking`.
pub struct Recorder<C> {
    applied: Arc<Mutex<Vec<Position>>>,
    flushes: Arc<AtomicUsize>,
    pending: Vec<Position>,
    _context: PhantomData<fn() -> C>,
}

impl<C> std::fmt::Debug for Recorder<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("applied", &self.applied())
            .field("pending", &self.pending)
            .finish()
    }
}

impl<C> Clone for Recorder<C> {
    fn clone(&self) -> Self {
        Self {
            applied: Arc::clone(&self.applied),
            flushes: Arc::clone(&self.flushes),
            pending: Vec::new(),
            _context: PhantomData,
        }
    }
}

impl<C> Default for Recorder<C> {
    fn default() -> Self {
        Self {
            applied: Arc::default(),
            flushes: Arc::default(),
            pending: Vec::new(),
            _context: PhantomData,
        }
    }
}

impl<C> Recorder<C> {
    /// How many times [`Projection::flush`] ran.
    pub fn flushes(&self) -> usize {
        self.flushes.load(Ordering::SeqCst)
    }

    /// The positions applied and committed so far, in order.
    pub fn applied(&self) -> Vec<Position> {
        self.applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl<C: Send + 'static> Projection for Recorder<C> {
    const NAME: &'static str = "conformance_recorder";
    const EVENT_TYPES: &'static [&'static str] = &["Recorded", "Refused", "Panicking"];
    type Context = C;

    async fn handle<'a>(
        &'a mut self,
        event: &'a RecordedEvent,
        _context: &'a mut C,
    ) -> Result<(), ProjectionError> {
        match event.event_type.as_str() {
            "Refused" => Err(ProjectionError::Handler {
                projection: Self::NAME,
                event_type: event.event_type.clone(),
                position: event.position,
                source: "refused on purpose".into(),
            }),
            "Panicking" => panic!("panicking on purpose at {}", event.position),
            _ => {
                self.pending.push(event.position);
                Ok(())
            }
        }
    }

    async fn flush<'a>(&'a mut self, _context: &'a mut C) -> Result<(), ProjectionError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        let pending = std::mem::take(&mut self.pending);
        self.applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(pending);
        Ok(())
    }

    fn discard(&mut self) {
        self.pending.clear();
    }
}

fn config() -> RunnerConfig {
    RunnerConfig::builder()
        .batch_size(3)
        .poll_interval(Duration::from_millis(50))
        .initial_backoff(Duration::from_millis(10))
        .max_backoff(Duration::from_millis(50))
        .standby_interval(Duration::from_millis(20))
        .build()
        .expect("a valid configuration")
}

/// Appends one event of each type in `types` (each its own append) and returns their positions.
async fn append_each(store: &dyn EventStore, types: &[&str]) -> Vec<Position> {
    let stream = StreamId::new("conformance", EventId::new().to_string());
    let mut positions = Vec::new();
    for (n, event_type) in types.iter().enumerate() {
        let event = NewEvent {
            event_id: EventId::new(),
            event_type: (*event_type).to_owned(),
            schema_version: 1,
            payload: json!({ "n": n }),
            metadata: Metadata::default(),
        };
        let written = store
            .append(&stream, ExpectedVersion::Any, vec![event])
            .await
            .expect("append");
        positions.push(written.position);
    }
    positions
}

async fn wait_status<P: Projection>(
    handle: &ProjectionHandle<P>,
    what: &str,
    done: impl FnMut(&ProjectionStatus) -> bool,
) -> ProjectionStatus {
    let mut status = handle.watch_status();
    let seen = tokio::time::timeout(Duration::from_secs(20), status.wait_for(done)).await;
    match seen {
        Ok(Ok(status)) => status.clone(),
        _ => panic!("{what}; the status is {:?}", handle.status()),
    }
}

/// Takes the lease for a catch-up or rebuild, retrying while a runner that just stopped still
/// holds it (a backend may release it asynchronously, e.g. when its connection closes).
async fn until_lease_is_free<T>(
    mut attempt: impl FnMut() -> futures_util::future::BoxFuture<'static, Result<T, RunError>>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match attempt().await {
            Err(RunError::LeaseHeld { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other.expect("catch-up after the live runner stopped"),
        }
    }
}

/// A handler error and a handler panic each stop the runner right after the event before them,
/// with a typed, skippable failure at their position; skipping moves past exactly that event, and
/// the events after it are applied once.
pub async fn failures_stop_at_their_event_and_skips_move_past_them<C, B>(backend: B)
where
    C: Send + 'static,
    B: ProjectionBackend<Recorder<C>>,
{
    let positions = append_each(
        backend.events(),
        &["Recorded", "Refused", "Recorded", "Panicking", "Recorded"],
    )
    .await;
    let backend = Arc::new(backend);
    let recorder = Recorder::<C>::default();
    let handle = ProjectionRunner::shared(recorder.clone(), Arc::clone(&backend))
        .with_config(config())
        .spawn();
    for (failing, cause) in [(1, FailureCause::Handler), (3, FailureCause::Panic)] {
        let failed = wait_status(&handle, "the runner reports the failure", |s| {
            s.state == ProjectionState::Failed
                && s.last_error
                    .as_ref()
                    .is_some_and(|e| e.position == Some(positions[failing]))
        })
        .await;
        let failure = failed.last_error.expect("a failure");
        assert_eq!(failure.cause, cause, "{failure:?}");
        let recorded = wait_recorded(&*backend, "the runner records the failure", |r| {
            r.is_some_and(|r| r.failure.position == Some(positions[failing]))
        })
        .await
        .expect("recorded");
        assert_eq!(
            recorded.failure, failure,
            "the backend keeps the failure as shown"
        );
        assert_eq!(recorded.projection, Recorder::<C>::NAME);
        assert!(failure.skippable(), "{failure:?}");
        assert_eq!(
            failure.event_type.as_deref(),
            Some(["Refused", "Panicking"][usize::from(failing == 3)])
        );
        assert_eq!(
            failed.checkpoint,
            Some(positions[failing - 1]),
            "stopped right before the failing event"
        );
        handle.skip(positions[failing]).await;
    }
    handle
        .wait_for(positions[4], Duration::from_secs(20))
        .await
        .expect("the runner moves on after the skips");
    assert_eq!(
        recorder.applied(),
        vec![positions[0], positions[2], positions[4]],
        "each good event applied once, the skipped ones not at all"
    );
    skips_are_recorded::<C, B>(
        &backend,
        &[(positions[1], "Refused"), (positions[3], "Panicking")],
    )
    .await;
    let status = handle.status();
    assert_eq!(status.state, ProjectionState::Running, "{status:?}");
    assert_eq!(status.last_error, None);
    wait_recorded(
        &*backend,
        "the runner clears the failure it moved past",
        |r| r.is_none(),
    )
    .await;
    handle.stop().await;
}

/// Polls the backend's recorded failure of [`Recorder`] until `done` holds (the runner records
/// it right after publishing its status).
async fn wait_recorded<C, B>(
    backend: &B,
    what: &str,
    mut done: impl FnMut(Option<&RecordedFailure>) -> bool,
) -> Option<RecordedFailure>
where
    C: Send + 'static,
    B: ProjectionBackend<Recorder<C>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let recorded = backend
            .last_failure(Recorder::<C>::NAME)
            .await
            .expect("the recorded failure");
        if done(recorded.as_ref()) {
            return recorded;
        }
        assert!(Instant::now() < deadline, "{what}; recorded: {recorded:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A backend keeps one last failure per projection: recorded with every field, replaced by the
/// next, cleared on request, independent of other projections' and of the checkpoint (a
/// projection failing at its first event has none).
pub async fn failures_are_recorded_replaced_and_cleared<C, B>(backend: B)
where
    C: Send + 'static,
    B: ProjectionBackend<Recorder<C>>,
{
    let name = Recorder::<C>::NAME;
    assert_eq!(backend.last_failure(name).await.expect("read"), None);
    let first = ProjectionFailure::new(
        FailureCause::Handler,
        Some(Position::new(i64::MAX as u64, 7)),
        Some("Refused".to_owned()),
        "refused: \"quoted\", ünïcödé\nand a second line".to_owned(),
    );
    let before = chrono::Utc::now() - chrono::Duration::seconds(60);
    backend
        .record_failure(name, Some(&first))
        .await
        .expect("record");
    let recorded = backend
        .last_failure(name)
        .await
        .expect("read")
        .expect("a recorded failure");
    assert_eq!(recorded.failure, first);
    assert_eq!(recorded.projection, name);
    assert!(recorded.failed_at > before, "{recorded:?}");

    let second = ProjectionFailure::new(
        FailureCause::Store,
        None,
        None,
        "connection lost".to_owned(),
    );
    backend
        .record_failure(name, Some(&second))
        .await
        .expect("record");
    backend
        .record_failure("another_projection", Some(&first))
        .await
        .expect("record");
    let recorded = backend.last_failure(name).await.expect("read");
    assert_eq!(recorded.map(|r| r.failure), Some(second), "replaced");
    backend.record_failure(name, None).await.expect("clear");
    assert_eq!(backend.last_failure(name).await.expect("read"), None);
    backend
        .record_failure(name, None)
        .await
        .expect("clearing twice");
    let other = backend
        .last_failure("another_projection")
        .await
        .expect("read");
    assert_eq!(other.map(|r| r.failure), Some(first), "independent");
    assert!(matches!(
        backend.record_failure("", None).await,
        Err(StoreError::InvalidId(_))
    ));
}

/// Skips are recorded with the event's position and type, in order, under the projection's name.
pub async fn skips_are_recorded<C, B>(backend: &B, skipped: &[(Position, &str)])
where
    C: Send + 'static,
    B: ProjectionBackend<Recorder<C>>,
{
    let recorded = backend
        .skipped_events(Recorder::<C>::NAME)
        .await
        .expect("skipped events");
    let recorded: Vec<(Position, Option<&str>)> = recorded
        .iter()
        .map(|s| (s.position, s.event_type.as_deref()))
        .collect();
    let expected: Vec<(Position, Option<&str>)> =
        skipped.iter().map(|(p, t)| (*p, Some(*t))).collect();
    assert_eq!(recorded, expected);
}

/// A catch-up or rebuild beside a live runner of the same projection is refused (it would apply
/// events twice); once the live runner stops, a rebuild replays every event exactly once.
pub async fn catch_up_and_rebuild_hold_the_lease<C, B>(backend: B)
where
    C: Send + 'static,
    B: ProjectionBackend<Recorder<C>>,
{
    let backend = Arc::new(backend);
    let positions = append_each(backend.events(), &["Recorded", "Recorded", "Recorded"]).await;
    let live = Recorder::<C>::default();
    let handle = ProjectionRunner::shared(live.clone(), Arc::clone(&backend))
        .with_config(config())
        .spawn();
    handle
        .wait_for(positions[2], Duration::from_secs(20))
        .await
        .expect("the live runner catches up");
    let rebuilt = Recorder::<C>::default();
    let refused = ProjectionRunner::shared(rebuilt.clone(), Arc::clone(&backend))
        .rebuild(rebuilt.clone(), || async { Ok(()) }, |_| {})
        .await;
    assert!(
        matches!(refused, Err(RunError::LeaseHeld { .. })),
        "a rebuild beside a live runner: {refused:?}"
    );
    let refused = ProjectionRunner::shared(rebuilt.clone(), Arc::clone(&backend))
        .catch_up()
        .await;
    assert!(
        matches!(refused, Err(RunError::LeaseHeld { .. })),
        "a catch-up beside a live runner: {refused:?}"
    );
    assert!(rebuilt.applied().is_empty(), "refused runs apply nothing");
    handle.stop().await;
    assert_eq!(
        live.applied(),
        positions,
        "the live runner applied each once"
    );

    until_lease_is_free(|| {
        let runner = ProjectionRunner::shared(rebuilt.clone(), Arc::clone(&backend));
        let fresh = rebuilt.clone();
        Box::pin(async move { runner.rebuild(fresh, || async { Ok(()) }, |_| {}).await })
    })
    .await;
    assert_eq!(
        rebuilt.applied(),
        positions,
        "the rebuild replays every event once"
    );
}

/// A runner that waits as standby answers `wait_for` from the checkpoint the active runner moves
/// (which may be in another process), instead of timing out.
pub async fn a_standby_waits_on_the_shared_checkpoint<C, B>(backend: B)
where
    C: Send + 'static,
    B: ProjectionBackend<Recorder<C>>,
{
    let backend = Arc::new(backend);
    let active = ProjectionRunner::shared(Recorder::<C>::default(), Arc::clone(&backend))
        .with_config(config())
        .spawn();
    wait_status(&active, "the first runner takes the lease", |s| {
        s.state == ProjectionState::Running
    })
    .await;
    let standby = ProjectionRunner::shared(Recorder::<C>::default(), Arc::clone(&backend))
        .with_config(config())
        .spawn();
    wait_status(&standby, "the second runner waits as standby", |s| {
        s.state == ProjectionState::Standby
    })
    .await;
    let positions = append_each(backend.events(), &["Recorded", "Recorded"]).await;
    standby
        .wait_for(positions[1], Duration::from_secs(20))
        .await
        .expect("the standby sees the active runner's checkpoint");
    assert_eq!(standby.status().state, ProjectionState::Standby);
    active.stop().await;
    standby.stop().await;
}

/// `catch_up` returns only once every event committed before the call is applied, in order.
pub async fn catch_up_applies_everything_committed_before_it<C, B>(backend: B)
where
    C: Send + 'static,
    B: ProjectionBackend<Recorder<C>>,
{
    let backend = Arc::new(backend);
    let mut positions = Vec::new();
    for _ in 0..4 {
        positions.extend(append_each(backend.events(), &["Recorded", "Unhandled"]).await);
    }
    let recorder = Recorder::<C>::default();
    ProjectionRunner::shared(recorder.clone(), Arc::clone(&backend))
        .with_config(config())
        .catch_up()
        .await
        .expect("catch-up");
    let handled: Vec<Position> = positions.iter().copied().step_by(2).collect();
    assert_eq!(recorder.applied(), handled);
    let checkpoint = backend
        .load_checkpoint(Recorder::<C>::NAME)
        .await
        .expect("checkpoint");
    assert_eq!(
        checkpoint,
        positions.last().copied(),
        "the checkpoint reaches the last event committed before the call"
    );
}

/// At most one lease holder per projection name; a released lease can be taken again.
pub async fn one_lease_holder_at_a_time<C, B>(backend: B)
where
    C: Send + 'static,
    B: ProjectionBackend<Recorder<C>>,
{
    let name = Recorder::<C>::NAME;
    let first = backend.acquire_lease(name).await.expect("lease");
    let mut first = first.expect("a free lease is granted");
    assert!(first.is_held().await);
    for _ in 0..3 {
        let second = backend.acquire_lease(name).await.expect("lease");
        assert!(second.is_none(), "a second holder while the first holds it");
    }
    let other = backend
        .acquire_lease("another_projection")
        .await
        .expect("lease");
    assert!(
        other.is_some(),
        "leases of other projections are independent"
    );
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match backend.acquire_lease(name).await.expect("lease") {
            Some(_) => break,
            None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None => panic!("a released lease is never granted again"),
        }
    }
}

/// A batch without events moves the checkpoint (past events the projection does not handle) and
/// calls no handler and no flush; a batch whose flush would run commits its events once.
pub async fn an_empty_batch_moves_the_checkpoint_without_a_flush<C, B>(backend: B)
where
    C: Send + 'static,
    B: ProjectionBackend<Recorder<C>>,
{
    let positions = append_each(backend.events(), &["Unhandled", "Recorded"]).await;
    let mut recorder = Recorder::<C>::default();
    let name = Recorder::<C>::NAME;
    backend
        .commit_batch(&mut recorder, name, None, &[], positions[0])
        .await
        .expect("an empty batch commits");
    assert_eq!(
        backend.load_checkpoint(name).await.expect("checkpoint"),
        Some(positions[0])
    );
    assert_eq!(recorder.flushes(), 0, "no flush for an empty batch");
    let events = backend
        .events()
        .read_all(positions[0], crate::store::EventTypes::All, 10)
        .await
        .expect("read");
    backend
        .commit_batch(
            &mut recorder,
            name,
            Some(positions[0]),
            &events,
            positions[1],
        )
        .await
        .expect("a batch commits");
    assert_eq!(recorder.flushes(), 1, "one flush per batch");
    assert_eq!(recorder.applied(), vec![positions[1]]);
    let stale = backend
        .commit_batch(
            &mut recorder,
            name,
            Some(positions[0]),
            &events,
            positions[1],
        )
        .await;
    assert!(
        matches!(
            stale,
            Err(crate::backend::BatchError::Store(
                StoreError::CheckpointConflict { .. }
            ))
        ),
        "a batch from a stale checkpoint commits nothing: {stale:?}"
    );
    assert_eq!(recorder.applied(), vec![positions[1]], "applied once");
}

/// An inline projection commits with its append or not at all: a handler failure fails the
/// append (nothing stored, nothing applied), and a good append is applied once, visible when the
/// append returns.
pub async fn inline_projections_commit_with_their_append_or_not_at_all<C, S>(
    store: S,
    recorder: Recorder<C>,
) where
    C: Send + 'static,
    S: EventStore,
{
    let stream = StreamId::new("conformance", EventId::new().to_string());
    let event = |event_type: &str| NewEvent {
        event_id: EventId::new(),
        event_type: event_type.to_owned(),
        schema_version: 1,
        payload: json!({}),
        metadata: Metadata::default(),
    };
    let refused = store
        .append(
            &stream,
            ExpectedVersion::Any,
            vec![event("Recorded"), event("Refused")],
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::InlineProjection(_))),
        "a failing inline handler fails the append: {refused:?}"
    );
    assert_eq!(
        store.stream_version(&stream).await.expect("version"),
        crate::stream::StreamVersion::INITIAL,
        "nothing of the failed append is stored"
    );
    assert!(recorder.applied().is_empty(), "nothing applied");
    let written = store
        .append(&stream, ExpectedVersion::Any, vec![event("Recorded")])
        .await
        .expect("a good append");
    assert_eq!(recorder.applied(), vec![written.position]);
}
