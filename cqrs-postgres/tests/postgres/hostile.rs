//! Hostile ids, type names and payloads: stored and read back verbatim, or rejected with a clear
//! error that writes nothing. (The conformance suite covers quotes, semicolons and unicode in ids.)

use cqrs_core::{
    EventStore, EventTypes, ExpectedVersion, NewEvent, Position, Snapshot, SnapshotStore,
    StoreError, StreamId, StreamVersion,
};
use serde_json::json;

use crate::{drop_schema, event, fresh_store};

#[tokio::test]
async fn ten_kilobyte_strings_and_odd_text_round_trip_or_are_rejected_clearly() {
    let store = fresh_store().await;
    let unit = "'\";\\ 🦀 $1 %s\u{202e}";
    let ten_kb = unit.repeat(10 * 1024 / unit.len() + 1);
    assert!(ten_kb.len() > 10 * 1024);

    // Verbatim: 10 KB in payload, metadata keys and values; odd but storable text everywhere.
    let stream = StreamId::new("it's; a \"type\" 🦀", "日本".repeat(170)); // 1020 bytes
    let mut e = event("Ev'ent\"; DROP TABLE events; --", 1);
    e.payload = json!({ "big": ten_kb, ten_kb.clone(): [ten_kb, "\\u0000 is just text here"] });
    e.metadata
        .custom
        .insert(ten_kb.clone(), json!({ "nested": ten_kb }));
    let written = store
        .append(&stream, ExpectedVersion::NoStream, vec![e.clone()])
        .await
        .unwrap();
    let read = store
        .read_stream(&stream, StreamVersion::new(1), 10)
        .await
        .unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].stream, stream);
    assert_eq!(read[0].event_type, e.event_type);
    assert_eq!(read[0].payload.to_value().unwrap(), e.payload);
    assert_eq!(read[0].metadata().unwrap(), e.metadata);
    assert_eq!(read[0].position, written.position);
    let types = [e.event_type.as_str()];
    assert_eq!(
        store
            .read_all(Position::START, EventTypes::Only(&types), 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // Rejected before reaching the database, with a message that says why.
    let rejected: Vec<(&str, StreamId, NewEvent)> = vec![
        (
            "10 KB stream id",
            StreamId::new("t", ten_kb.clone()),
            event("E", 1),
        ),
        (
            "10 KB stream type",
            StreamId::new(ten_kb.clone(), "x"),
            event("E", 1),
        ),
        (
            "10 KB event type",
            StreamId::new("t", "x"),
            event(&ten_kb, 1),
        ),
        ("NUL in payload", StreamId::new("t", "x"), {
            let mut e = event("E", 1);
            e.payload = json!({ "s": "a\u{0}b" });
            e
        }),
        ("NUL in a payload key", StreamId::new("t", "x"), {
            let mut e = event("E", 1);
            e.payload = json!({ "a\u{0}": [1, {"deep": true}] });
            e
        }),
        ("NUL in metadata", StreamId::new("t", "x"), {
            let mut e = event("E", 1);
            e.metadata.custom.insert("k".into(), json!(["\u{0}"]));
            e
        }),
    ];
    for (what, stream, e) in rejected {
        match store.append(&stream, ExpectedVersion::Any, vec![e]).await {
            Err(invalid @ (StoreError::InvalidId(_) | StoreError::InvalidPayload { .. })) => {
                let message = invalid.to_string();
                let clear = message.contains("limit") || message.contains("NUL");
                assert!(clear, "{what}: unclear message: {message}");
            }
            other => panic!("{what}: expected a clear rejection, got {other:?}"),
        }
    }
    // NUL in a snapshot, too.
    let snapshot = Snapshot {
        stream: stream.clone(),
        stream_version: StreamVersion::new(1),
        snapshot_version: 1,
        payload: json!("\u{0}"),
    };
    assert!(matches!(
        store.save_snapshot(snapshot).await,
        Err(StoreError::InvalidPayload { .. })
    ));
    assert_eq!(
        store
            .count_after(Position::START, EventTypes::All)
            .await
            .unwrap(),
        1,
        "rejected appends wrote nothing"
    );
    drop_schema(&store).await;
}

#[tokio::test]
async fn hostile_checkpoint_names_and_snapshot_payloads_round_trip() {
    use cqrs_core::CheckpointStore;
    let store = fresh_store().await;
    let name = "proj'; DELETE FROM checkpoints; -- 🦀".repeat(26); // 1014 bytes
    let p = Position::new(u64::from(u32::MAX) * 7, 42);
    store.save_checkpoint(&name, None, p).await.unwrap();
    assert_eq!(store.load_checkpoint(&name).await.unwrap(), Some(p));
    assert_eq!(store.load_checkpoint("proj").await.unwrap(), None);
    for bad in ["x".repeat(1025), String::new(), "nul\0byte".to_owned()] {
        match store.save_checkpoint(&bad, None, p).await {
            Err(StoreError::InvalidId(e)) => assert_eq!(e.what, "checkpoint name"),
            other => panic!("{other:?}"),
        }
    }
    let stream = StreamId::new("a'b", "c\"d");
    let snapshot = Snapshot {
        stream: stream.clone(),
        stream_version: StreamVersion::new(3),
        snapshot_version: u32::MAX,
        payload: json!({ "x": "'); DROP TABLE snapshots; --" }),
    };
    store.save_snapshot(snapshot.clone()).await.unwrap();
    assert_eq!(store.load_snapshot(&stream).await.unwrap(), Some(snapshot));
    drop_schema(&store).await;
}
