//! A stored row that cannot be read, skipped through `bank-admin skip` on an SQLite file and on
//! PostgreSQL: the runner stops right before it with a `corrupt_event` failure that
//! `projections` shows from another process; the skip is recorded with the row's id and type;
//! the runner then moves past it and applies what follows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use cqrs_core::subscription::{ProjectionRunner, ProjectionState};
use cqrs_core::{EventStore, ExpectedVersion, NewEvent, Position, Projection, StreamId};
use examples::bank::{AccountOpened, MoneyDeposited, PgBalances, SqlBalances};
use serde_json::Value;

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

fn bank_admin(db: &[String], args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_bank-admin"))
        .args(db)
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(output.status.success(), "{args:?}: {stdout}\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or(Value::Null)
}

fn status(db: &[String]) -> Value {
    let listed = bank_admin(db, &["projections", "--json"]);
    listed["projections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "bank_balances")
        .cloned()
        .unwrap()
}

fn deposit(amount: i64) -> NewEvent {
    NewEvent::from_event(&MoneyDeposited {
        amount,
        memo: String::new(),
    })
    .unwrap()
}

/// Opens `acc-1` with a deposit of 100; returns the deposit's position.
async fn seed(events: &dyn EventStore) -> Position {
    let opened = NewEvent::from_event(&AccountOpened {
        owner: "Ada".to_owned(),
    })
    .unwrap();
    events
        .append(
            &StreamId::new("account", "acc-1"),
            ExpectedVersion::NoStream,
            vec![opened, deposit(100)],
        )
        .await
        .unwrap()
        .position
}

/// The test on one database, with `acc-1` opened and holding 100, caught up: `corrupt` has
/// inserted an unreadable `MoneyDeposited` row of `acc-1` at `position` with event id `id`;
/// `balance` reads `acc-1`'s balance, `skipped_id` the event id the skip recorded.
#[allow(clippy::too_many_arguments)]
async fn skip_corrupt_row<P, B>(
    db: &[String],
    events: &dyn EventStore,
    backend: impl Fn() -> B,
    projection: impl Fn() -> P,
    position: Position,
    id: uuid::Uuid,
    balance: impl Fn() -> BoxFuture<Option<i64>>,
    skipped_id: BoxFuture<uuid::Uuid>,
) where
    P: Projection,
    B: cqrs_core::backend::ProjectionBackend<P>,
{
    let after = events
        .append(
            &StreamId::new("account", "acc-1"),
            ExpectedVersion::Any,
            vec![deposit(5)],
        )
        .await
        .unwrap()
        .position;

    // The runner stops right before the row, and says why where another process sees it.
    let runner = ProjectionRunner::new(projection(), backend()).spawn();
    let mut watched = runner.watch_status();
    let failed = tokio::time::timeout(
        Duration::from_secs(30),
        watched.wait_for(|s| s.state == ProjectionState::Failed),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    let failure = failed.last_error.unwrap();
    assert_eq!(failure.position, Some(position), "{failure:?}");
    runner.stop().await;
    let shown = status(db);
    assert_eq!(shown["state"], "stopped, failed", "{shown}");
    assert_eq!(shown["last_error"]["cause"], "corrupt_event", "{shown}");
    assert_eq!(
        shown["last_error"]["position"],
        position.to_string(),
        "{shown}"
    );
    assert_eq!(balance().await, Some(100));

    bank_admin(
        db,
        &[
            "skip",
            "bank_balances",
            "--position",
            &position.to_string(),
            "--reason",
            "unreadable row",
            "--json",
        ],
    );
    let shown = status(db);
    assert_eq!(shown["checkpoint"], position.to_string(), "{shown}");
    assert_eq!(shown["last_error"], Value::Null, "{shown}");
    let skip = &shown["skipped"][0];
    assert_eq!(skip["position"]["tx"], position.tx, "{shown}");
    assert_eq!(skip["position"]["sequence"], position.sequence, "{shown}");
    assert_eq!(
        skip["event_type"], "MoneyDeposited",
        "from the row: {shown}"
    );
    assert_eq!(skip["reason"], "unreadable row");
    assert_eq!(skipped_id.await, id, "the row's own id is recorded");

    // The runner moves past it.
    let runner = ProjectionRunner::new(projection(), backend()).spawn();
    runner
        .wait_for(after, Duration::from_secs(30))
        .await
        .unwrap();
    runner.stop().await;
    assert_eq!(balance().await, Some(105));
    assert_eq!(status(db)["lag"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_corrupt_row_skipped_through_the_cli() {
    let dir = std::env::temp_dir().join(format!("cqrs-corrupt-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bank.db");
    let store = cqrs_sqlite::SqliteStore::open(&path).await.unwrap();
    SqlBalances::create(&store).await.unwrap();
    let projections = || cqrs_sqlite::SqliteProjections::new(store.clone());
    let seeded = seed(&store).await;
    let runner = ProjectionRunner::new(SqlBalances::live(), projections()).spawn();
    runner
        .wait_for(seeded, Duration::from_secs(30))
        .await
        .unwrap();
    runner.stop().await;

    // A schema version SQLite stores but no reader accepts.
    let id = uuid::Uuid::now_v7();
    let key: i64 = sqlx::query_scalar(
        "INSERT INTO events (stream_type, stream_id, stream_version, event_id, event_type, \
         schema_version, payload, metadata, recorded_at) \
         VALUES ('account', 'acc-1', 3, ?1, 'MoneyDeposited', -3, '{\"amount\": 7, \"memo\": \"\"}', '{}', 0) \
         RETURNING position",
    )
    .bind(&id.as_bytes()[..])
    .fetch_one(store.pool())
    .await
    .unwrap();
    let position = Position::new(u64::try_from(key).unwrap(), u64::try_from(key).unwrap());
    let db = vec!["--url".to_owned(), format!("sqlite:{}", path.display())];
    skip_corrupt_row(
        &db,
        &store,
        projections,
        SqlBalances::live,
        position,
        id,
        || {
            let store = store.clone();
            Box::pin(async move { SqlBalances::balance(&store, "acc-1").await.unwrap() })
        },
        {
            let store = store.clone();
            Box::pin(async move {
                let bytes: Vec<u8> = sqlx::query_scalar("SELECT event_id FROM projection_skips")
                    .fetch_one(store.pool())
                    .await
                    .unwrap();
                uuid::Uuid::from_slice(&bytes).unwrap()
            })
        },
    )
    .await;
    store.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_corrupt_row_skipped_through_the_cli() {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!("pgt_{}", uuid::Uuid::now_v7().simple());
    let store = cqrs_postgres::PostgresStore::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("this test needs PostgreSQL at {url}: {e}"))
        .with_schema(&schema)
        .unwrap();
    store.migrate().await.unwrap();
    let live = PgBalances::live(&store);
    live.create(&store).await.unwrap();
    let projections = || cqrs_postgres::PostgresProjections::new(store.clone());
    let seeded = seed(&store).await;
    let runner = ProjectionRunner::new(live.clone(), projections()).spawn();
    runner
        .wait_for(seeded, Duration::from_secs(30))
        .await
        .unwrap();
    runner.stop().await;

    // A schema version PostgreSQL stores but no reader accepts.
    let id = uuid::Uuid::now_v7();
    let (tx, sequence): (String, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO \"{schema}\".events
            (stream_type, stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
         VALUES ('account', 'acc-1', 3, $1, 'MoneyDeposited', -3, '{{\"amount\": 7, \"memo\": \"\"}}', '{{}}')
         RETURNING tx::text, position"
    )))
    .bind(id)
    .fetch_one(store.pool())
    .await
    .unwrap();
    let position = Position::new(tx.parse().unwrap(), u64::try_from(sequence).unwrap());
    let db = vec![
        "--url".to_owned(),
        url.clone(),
        "--schema".to_owned(),
        schema.clone(),
    ];
    let balance_of = || {
        let (store, live) = (store.clone(), live.clone());
        async move {
            live.rows(&store)
                .await
                .unwrap()
                .into_iter()
                .find(|(account, _, _)| account == "acc-1")
                .map(|(_, balance, _)| balance)
        }
    };
    skip_corrupt_row(
        &db,
        &store,
        projections,
        || live.clone(),
        position,
        id,
        || Box::pin(balance_of()),
        {
            let (store, schema) = (store.clone(), schema.clone());
            Box::pin(async move {
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT event_id FROM \"{schema}\".projection_skips"
                )))
                .fetch_one(store.pool())
                .await
                .unwrap()
            })
        },
    )
    .await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(store.pool())
    .await;
}
