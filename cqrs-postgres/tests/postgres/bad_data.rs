//! Rows no reader expects: typed errors naming the position, never a panic.

use cqrs_core::command::{LoadError, UndecodableEvent};
use cqrs_core::conformance::Counter;
use cqrs_core::{
    DecodeError, EventStore, EventTypes, ExpectedVersion, Position, Repository, StoreError,
    StreamId, StreamVersion,
};

use crate::{batch, drop_schema, fresh_store, insert_raw};

/// Stream id, event type, schema version, payload, and a check of the error it must give.
type Case = (
    &'static str,
    &'static str,
    i32,
    &'static str,
    fn(&DecodeError) -> bool,
);

#[tokio::test]
async fn undecodable_events_are_typed_errors_naming_their_position() {
    let store = fresh_store().await;
    let repo = Repository::<Counter>::new(store.clone());
    // Each case: a counter whose one stored event cannot be decoded, and the error it must give.
    let cases: [Case; 4] = [
        ("malformed", "Added", 1, r#"{"n": "not a number"}"#, |e| {
            matches!(e, DecodeError::Payload { .. })
        }),
        ("missing-field", "Added", 1, r#"{}"#, |e| {
            matches!(e, DecodeError::Payload { .. })
        }),
        (
            "unknown-type",
            "Renamed",
            1,
            r#"{"n": 1}"#,
            |e| matches!(e, DecodeError::UnknownEventType { event_type } if event_type == "Renamed"),
        ),
        ("future-version", "Added", 7, r#"{"n": 1}"#, |e| {
            matches!(e, DecodeError::UnsupportedVersion { version: 7, .. })
        }),
    ];
    for (id, event_type, version, payload, expected) in cases {
        let position =
            insert_raw(&store, "counter", id, 1, event_type, version, payload, "{}").await;
        match repo.load(id).await {
            Err(LoadError::Decode(UndecodableEvent {
                position: at,
                stream_version,
                source,
                ..
            })) => {
                assert_eq!(at.sequence, position as u64, "{id}: names the position");
                assert_eq!(stream_version, StreamVersion::new(1));
                assert!(expected(&source), "{id}: {source}");
            }
            other => panic!("{id}: expected a decode error, got {other:?}"),
        }
        let message = repo.load(id).await.unwrap_err().to_string();
        assert!(
            message.contains(&format!(".{position})")),
            "{id}: {message}"
        );
    }
    // The raw rows do not disturb good streams.
    repo.execute("good", &cqrs_core::conformance::Add(5))
        .await
        .unwrap();
    assert_eq!(repo.load("good").await.unwrap().state.total, 5);
    drop_schema(&store).await;
}

#[tokio::test]
async fn unreadable_envelopes_are_corrupt_event_errors_and_readers_can_step_past_them() {
    // Metadata is parsed only when asked for: a row whose metadata is not metadata reads (its
    // payload decodes), and `metadata()` is the typed error. An envelope column that cannot be
    // read (a negative schema version) is a `CorruptEvent` on every read.
    let store = fresh_store().await;
    store
        .append(
            &StreamId::new("s", "ok"),
            ExpectedVersion::NoStream,
            batch(1),
        )
        .await
        .unwrap();
    let bad_metadata = insert_raw(
        &store,
        "s",
        "bad-metadata",
        1,
        "Added",
        1,
        r#"{"n": 1}"#,
        r#"{"correlation_id": "not a uuid"}"#,
    )
    .await;
    let negative_version = insert_raw(
        &store,
        "s",
        "negative-version",
        1,
        "Added",
        -3,
        r#"{"n": 1}"#,
        "{}",
    )
    .await;
    store
        .append(&StreamId::new("s", "ok"), ExpectedVersion::Any, batch(1))
        .await
        .unwrap();

    // A global reader gets the bad row's position, and can resume right after it.
    let mut cursor = Position::START;
    let mut good = 0;
    let mut bad = Vec::new();
    loop {
        match store.read_all(cursor, EventTypes::All, 1).await {
            Ok(page) if page.is_empty() => break,
            Ok(page) => {
                good += 1;
                cursor = page[0].position;
            }
            Err(StoreError::CorruptEvent { position, reason }) => {
                bad.push((position.sequence as i64, reason));
                cursor = position;
            }
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!(
        good, 3,
        "the bad metadata row reads; its metadata is parsed only when asked"
    );
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].0, negative_version);
    assert!(bad[0].1.contains("schema version"), "{}", bad[0].1);
    // A replay read (no position in its rows) names the row's position too.
    match store
        .read_stream_for_replay(
            &StreamId::new("s", "negative-version"),
            StreamVersion::new(1),
            10,
        )
        .await
    {
        Err(StoreError::CorruptEvent { position, reason }) => {
            assert_eq!(position.sequence as i64, negative_version);
            assert!(reason.contains("schema version"), "{reason}");
        }
        other => panic!("expected the corrupt row's error, got {other:?}"),
    }
    let read = store
        .read_stream(
            &StreamId::new("s", "bad-metadata"),
            StreamVersion::new(1),
            10,
        )
        .await
        .unwrap();
    assert_eq!(read[0].position.sequence as i64, bad_metadata);
    assert_eq!(read[0].payload.to_value().unwrap()["n"], 1);
    match read[0].metadata() {
        Err(DecodeError::Metadata { event_type, source }) => {
            assert_eq!(event_type, "Added");
            assert!(source.to_string().contains("UUID"), "{source}");
        }
        other => panic!("{other:?}"),
    }
    // A reaction to it cannot continue a conversation it cannot read.
    assert!(matches!(
        cqrs_core::CommandContext::caused_by(&read[0], "audit"),
        Err(DecodeError::Metadata { .. })
    ));
    // A stream read reports the corrupt envelope with its position.
    match store
        .read_stream(
            &StreamId::new("s", "negative-version"),
            StreamVersion::new(1),
            10,
        )
        .await
    {
        Err(StoreError::CorruptEvent { position, .. }) => {
            assert_eq!(position.sequence as i64, negative_version)
        }
        other => panic!("{other:?}"),
    }
    drop_schema(&store).await;
}

#[tokio::test]
async fn a_column_lost_to_a_bad_migration_is_a_typed_error() {
    let store = fresh_store().await;
    let stream = StreamId::new("s", "1");
    store
        .append(&stream, ExpectedVersion::NoStream, batch(2))
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE \"{}\".events DROP COLUMN metadata",
        store.schema()
    )))
    .execute(store.pool())
    .await
    .unwrap();
    let is_schema_mismatch = |error: StoreError| match &error {
        StoreError::Backend(inner) => {
            assert!(
                inner
                    .downcast_ref::<cqrs_postgres::SchemaMismatch>()
                    .is_some(),
                "{error}"
            );
            let message = crate::chain(&error);
            assert!(message.contains("metadata"), "{message}");
        }
        other => panic!("{other:?}"),
    };
    is_schema_mismatch(
        store
            .read_all(Position::START, EventTypes::All, 10)
            .await
            .unwrap_err(),
    );
    is_schema_mismatch(
        store
            .read_stream(&stream, StreamVersion::new(1), 10)
            .await
            .unwrap_err(),
    );
    is_schema_mismatch(
        store
            .append(&stream, ExpectedVersion::Any, batch(1))
            .await
            .unwrap_err(),
    );
    // A column of the wrong type after a bad migration.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE \"{0}\".events ADD COLUMN metadata text NOT NULL DEFAULT 'not json'",
        store.schema()
    )))
    .execute(store.pool())
    .await
    .unwrap();
    // Its text is handed over as stored; parsing it, when asked for, is the typed error.
    let read = store
        .read_all(Position::START, EventTypes::All, 10)
        .await
        .unwrap();
    assert_eq!(read[0].position.sequence, 1);
    assert!(matches!(
        read[0].metadata(),
        Err(DecodeError::Metadata { .. })
    ));
    drop_schema(&store).await;
}
