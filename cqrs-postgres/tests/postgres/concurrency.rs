//! Concurrency torture: 16 writers, shared and separate streams, 20,000 events, with a gap-free
//! reader following the log while they write.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use cqrs_core::{
    AppendResult, EventId, EventStore, EventTypes, ExpectedVersion, Position, StoreError, StreamId,
};

use crate::{batch, drop_schema, fresh_store_with};

const WRITERS: usize = 16;
const BATCHES: usize = 125;
const EVENTS: usize = 10;
const TOTAL: usize = WRITERS * BATCHES * EVENTS;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_writers_twenty_thousand_events_nothing_lost_duplicated_or_skipped() {
    let store = fresh_store_with(10).await;
    let started = Instant::now();
    // A global reader following the log throughout, as a subscription would.
    let reader = {
        let store = store.clone().with_horizon_wait(Duration::from_millis(20));
        tokio::spawn(async move {
            let mut seen = Vec::with_capacity(TOTAL);
            let mut cursor = Position::START;
            let deadline = Instant::now() + Duration::from_secs(90);
            while seen.len() < TOTAL && Instant::now() < deadline {
                let page = store.read_all(cursor, EventTypes::All, 500).await.unwrap();
                match page.last() {
                    Some(last) => cursor = last.position,
                    None => tokio::time::sleep(Duration::from_millis(5)).await,
                }
                seen.extend(page.into_iter().map(|e| (e.position, e.event_id)));
            }
            seen
        })
    };
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        // Even writers race on four hot streams (two each, one with `Exact` + retry, one with
        // `Any`); odd writers own a stream.
        let (stream, any) = if w % 2 == 0 {
            (StreamId::new("t", format!("hot-{}", w / 2 % 4)), w % 4 == 2)
        } else {
            (StreamId::new("t", format!("own-{w}")), false)
        };
        writers.push(tokio::spawn(async move {
            let mut sent: Vec<(Vec<EventId>, AppendResult)> = Vec::new();
            for _ in 0..BATCHES {
                let events = batch(EVENTS);
                let ids = events.iter().map(|e| e.event_id).collect();
                let result = loop {
                    let expected = if any {
                        ExpectedVersion::Any
                    } else {
                        ExpectedVersion::Exact(store.stream_version(&stream).await.unwrap())
                    };
                    match store.append(&stream, expected, events.clone()).await {
                        Ok(result) => break result,
                        Err(StoreError::Concurrency(_)) if !any => {}
                        Err(e) => panic!("writer {w}: {e}"),
                    }
                };
                sent.push((ids, result));
            }
            (stream, sent)
        }));
    }
    let mut sent = Vec::new();
    for writer in writers {
        sent.push(writer.await.unwrap());
    }
    let written_in = started.elapsed();
    let seen = reader.await.unwrap();
    eprintln!(
        "torture: {TOTAL} events by {WRITERS} writers in {written_in:?}; the reader followed {} events",
        seen.len()
    );

    let all: Vec<_> = futures_util::TryStreamExt::try_collect::<Vec<_>>(
        cqrs_core::store::read_all_batched(&store, Position::START, EventTypes::All, 1000),
    )
    .await
    .unwrap();
    assert_eq!(all.len(), TOTAL, "nothing lost, nothing duplicated");
    assert!(
        all.windows(2).all(|w| w[0].position < w[1].position),
        "read_all is in log order"
    );
    let sequences: HashSet<u64> = all.iter().map(|e| e.position.sequence).collect();
    assert_eq!(sequences.len(), TOTAL, "positions unique");
    let by_id: HashMap<EventId, &cqrs_core::RecordedEvent> =
        all.iter().map(|e| (e.event_id, e)).collect();
    assert_eq!(by_id.len(), TOTAL, "event ids unique");

    // Every append's result names exactly where its batch landed: consecutive versions in its
    // stream, the last event's position.
    for (stream, appends) in &sent {
        for (ids, result) in appends {
            let stored: Vec<_> = ids
                .iter()
                .map(|id| by_id.get(id).expect("a sent event is stored"))
                .collect();
            let last = stored.last().unwrap();
            assert_eq!(&last.stream, stream);
            assert_eq!(last.stream_version, result.stream_version);
            assert_eq!(last.position, result.position);
            for pair in stored.windows(2) {
                assert_eq!(pair[1].stream_version, pair[0].stream_version.next());
                assert_eq!(
                    pair[1].position.tx, pair[0].position.tx,
                    "one batch, one transaction"
                );
            }
        }
    }
    let mut versions: HashMap<&StreamId, Vec<u64>> = HashMap::new();
    for e in &all {
        versions
            .entry(&e.stream)
            .or_default()
            .push(e.stream_version.get());
    }
    assert_eq!(versions.len(), 4 + WRITERS / 2);
    for (stream, v) in versions {
        let expected: Vec<u64> = (1..=v.len() as u64).collect();
        assert_eq!(v, expected, "{stream}: versions dense and in log order");
        assert_eq!(
            store.stream_version(stream).await.unwrap().get(),
            v.len() as u64
        );
    }

    // The concurrent reader delivered every event exactly once, in log order.
    let expected: Vec<_> = all.iter().map(|e| (e.position, e.event_id)).collect();
    assert_eq!(
        seen.len(),
        TOTAL,
        "the live reader missed or repeated events"
    );
    assert!(
        seen == expected,
        "the live reader saw another order than the log"
    );
    drop_schema(&store).await;
}
