//! The metrics move: commands by outcome, retries, appends, projection batches, lag and state
//! changes, recorded through the `metrics` facade into a debugging recorder (this test binary's
//! global recorder, so it holds one test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use cqrs_core::conformance::{Add, Added, Counter};
use cqrs_core::metrics as names;
use cqrs_core::subscription::{InProcess, ProjectionRunner};
use cqrs_core::{projection, InMemoryStore, RecordedEvent, Repository};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;

#[derive(Debug, Default)]
struct Totals {
    sum: i64,
}

#[projection(name = "totals")]
impl Totals {
    fn on_added(&mut self, event: &Added, _: &RecordedEvent) {
        self.sum += event.n;
    }
}

/// Every metric at one instant (a snapshot takes the histograms' values, so take one and look
/// at it).
struct Snapshot(
    Vec<(
        metrics_util::CompositeKey,
        Option<metrics::Unit>,
        Option<metrics::SharedString>,
        DebugValue,
    )>,
);

fn snapshot(snapshotter: &Snapshotter) -> Snapshot {
    Snapshot(snapshotter.snapshot().into_vec())
}

/// The value of the metric `name` whose labels include every pair of `labels`.
fn value<'s>(
    snapshot: &'s Snapshot,
    kind: MetricKind,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<&'s DebugValue> {
    snapshot
        .0
        .iter()
        .find(|(key, _, _, _)| {
            key.kind() == kind
                && key.key().name() == name
                && labels
                    .iter()
                    .all(|(k, v)| key.key().labels().any(|l| l.key() == *k && l.value() == *v))
        })
        .map(|(_, _, _, value)| value)
}

fn counter(snapshotter: &Snapshot, name: &str, labels: &[(&str, &str)]) -> u64 {
    match value(snapshotter, MetricKind::Counter, name, labels) {
        Some(DebugValue::Counter(n)) => *n,
        None => 0,
        other => panic!("{name} is not a counter: {other:?}"),
    }
}

fn histogram_count(snapshotter: &Snapshot, name: &str, labels: &[(&str, &str)]) -> usize {
    match value(snapshotter, MetricKind::Histogram, name, labels) {
        Some(DebugValue::Histogram(values)) => values.len(),
        None => 0,
        other => panic!("{name} is not a histogram: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_appends_and_projections_are_counted() {
    let recorder = DebuggingRecorder::new();
    let recorded = recorder.snapshotter();
    recorder.install().unwrap();

    let store = InMemoryStore::new();
    let counters = Repository::<Counter>::new(store.clone());
    counters.execute("c-1", &Add(2)).await.unwrap();
    counters.execute("c-1", &Add(3)).await.unwrap();
    counters.execute("c-1", &Add(-1)).await.unwrap_err();
    let taken = snapshot(&recorded);
    let snapshotter = &taken;
    let ok = [("aggregate", "counter"), ("outcome", "ok")];
    let rejected = [("aggregate", "counter"), ("outcome", "rejected")];
    assert_eq!(counter(snapshotter, names::COMMANDS, &ok), 2);
    assert_eq!(counter(snapshotter, names::COMMANDS, &rejected), 1);
    assert_eq!(
        histogram_count(
            snapshotter,
            names::COMMAND_DURATION,
            &[("aggregate", "counter")]
        ),
        3
    );
    assert_eq!(
        counter(
            snapshotter,
            names::EVENTS_APPENDED,
            &[("aggregate", "counter")]
        ),
        2
    );
    assert_eq!(
        histogram_count(
            snapshotter,
            names::APPEND_DURATION,
            &[("aggregate", "counter")]
        ),
        2
    );

    let backend = Arc::new(InProcess::new(store.clone()));
    let head = cqrs_core::EventStore::head(&store).await.unwrap().unwrap();
    let runner = ProjectionRunner::shared(Totals::default(), backend).spawn();
    runner
        .wait_for(head, Duration::from_secs(10))
        .await
        .unwrap();
    let totals = runner.stop().await.unwrap();
    assert_eq!(totals.sum, 5);
    let taken = snapshot(&recorded);
    let snapshotter = &taken;
    let projection = [("projection", "totals")];
    assert_eq!(
        counter(snapshotter, names::PROJECTION_EVENTS_APPLIED, &projection),
        2
    );
    assert!(histogram_count(snapshotter, names::PROJECTION_BATCH_COMMIT, &projection) >= 1);
    assert!(matches!(
        value(snapshotter, MetricKind::Gauge, names::PROJECTION_LAG, &projection),
        Some(DebugValue::Gauge(lag)) if lag.into_inner() == 0.0
    ));
    for state in ["running", "stopped"] {
        let labels = [("projection", "totals"), ("state", state)];
        assert_eq!(
            counter(snapshotter, names::PROJECTION_STATE_CHANGES, &labels),
            1,
            "{state}"
        );
    }
}
