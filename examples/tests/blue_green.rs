//! `bank-admin rebuild bank_balances` blue/green, on an SQLite file and on PostgreSQL: the live
//! table keeps answering its old, complete data while the new version builds beside it (with its
//! live runner running); an interrupted rebuild leaves the live version serving and a rerun
//! resumes and completes; after the switch readers see the new version and the live runner
//! continues from it, every event applied once, also those appended during the rebuild.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use cqrs_admin::Connection;
use cqrs_core::subscription::{ProjectionHandle, ProjectionRunner};
use cqrs_core::{
    EventStore, EventTypes, ExpectedVersion, NewEvent, Position, Projection, StreamId,
};
use examples::bank::{
    self, AccountOpened, MoneyDeposited, MoneyWithdrawn, PgBalances, SqlBalances,
};

/// An account's row: (account, balance, movements).
type Row = (String, i64, i64);

/// What the test needs of one database.
trait Side: Sync {
    /// The live table's rows, by account.
    async fn live_rows(&self) -> Vec<Row>;
    /// Marks the live table as the old version: its movements counted 1,000 higher.
    async fn mark_old(&self);
    /// Whether the table a rebuild fills exists.
    async fn building_exists(&self) -> bool;
}

struct Sqlite(cqrs_sqlite::SqliteStore);

impl Side for Sqlite {
    async fn live_rows(&self) -> Vec<Row> {
        sqlx::query_as("SELECT account, balance, movements FROM bank_balances ORDER BY account")
            .fetch_all(self.0.pool())
            .await
            .unwrap()
    }

    async fn mark_old(&self) {
        sqlx::query("UPDATE bank_balances SET movements = movements + 1000")
            .execute(self.0.pool())
            .await
            .unwrap();
    }

    async fn building_exists(&self) -> bool {
        let found: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        )
        .bind(SqlBalances::BUILDING)
        .fetch_one(self.0.pool())
        .await
        .unwrap();
        found == 1
    }
}

struct Postgres(cqrs_postgres::PostgresStore);

impl Side for Postgres {
    async fn live_rows(&self) -> Vec<Row> {
        PgBalances::live(&self.0).rows(&self.0).await.unwrap()
    }

    async fn mark_old(&self) {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE \"{}\".bank_balances SET movements = movements + 1000",
            self.0.schema()
        )))
        .execute(self.0.pool())
        .await
        .unwrap();
    }

    async fn building_exists(&self) -> bool {
        sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!("\"{}\".{}", self.0.schema(), SqlBalances::BUILDING))
            .fetch_one(self.0.pool())
            .await
            .unwrap()
    }
}

const ACCOUNTS: usize = 6;

/// Opens the accounts and deposits into them: `per_account` events each, more than two of the
/// rebuild's batches (500 events) in all. Returns the last event's position.
async fn seed(events: &dyn EventStore, per_account: usize) -> Position {
    let mut last = Position::START;
    for n in 0..ACCOUNTS {
        let stream = StreamId::new("account", format!("acc-{n}"));
        let mut batch = vec![NewEvent::from_event(&AccountOpened {
            owner: format!("owner {n}"),
        })
        .unwrap()];
        for i in 1..per_account {
            batch.push(if i % 5 == 0 {
                NewEvent::from_event(&MoneyWithdrawn { amount: 3 }).unwrap()
            } else {
                NewEvent::from_event(&MoneyDeposited {
                    amount: i as i64,
                    memo: String::new(),
                })
                .unwrap()
            });
        }
        for chunk in batch.chunks(100) {
            last = events
                .append(&stream, ExpectedVersion::Any, chunk.to_vec())
                .await
                .unwrap()
                .position;
        }
    }
    last
}

async fn deposit(events: &dyn EventStore, account: &str, amount: i64) -> Position {
    let event = NewEvent::from_event(&MoneyDeposited {
        amount,
        memo: "during the rebuild".to_owned(),
    })
    .unwrap();
    events
        .append(
            &StreamId::new("account", account),
            ExpectedVersion::Any,
            vec![event],
        )
        .await
        .unwrap()
        .position
}

/// The rows the log makes: what a correct read model holds once caught up.
async fn expected_rows(events: &dyn EventStore) -> Vec<Row> {
    let mut rows = std::collections::BTreeMap::<String, (i64, i64)>::new();
    let mut after = Position::START;
    loop {
        let page = events.read_all(after, EventTypes::All, 1000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.position;
        for event in &page {
            let account = event.stream.id().to_owned();
            match event.event_type.as_str() {
                "AccountOpened" => {
                    rows.entry(account).or_default();
                }
                "MoneyDeposited" => {
                    let deposited: MoneyDeposited = event.payload.decode().unwrap();
                    let row = rows.entry(account).or_default();
                    row.0 += deposited.amount;
                    row.1 += 1;
                }
                "MoneyWithdrawn" => {
                    let withdrawn: MoneyWithdrawn = event.payload.decode().unwrap();
                    let row = rows.entry(account).or_default();
                    row.0 -= withdrawn.amount;
                    row.1 += 1;
                }
                _ => {}
            }
        }
    }
    rows.into_iter()
        .map(|(account, (balance, movements))| (account, balance, movements))
        .collect()
}

async fn checkpoint(connection: &Connection, name: &str) -> Option<Position> {
    connection
        .admin()
        .checkpoints()
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.name == name)
        .map(|c| c.position)
}

async fn blue_green<P: Projection>(
    side: &impl Side,
    connection: Connection,
    live: ProjectionHandle<P>,
) {
    let events: Arc<dyn EventStore> = connection.events();
    // The last append's position, not `head()`: on PostgreSQL that is the readable head, which
    // another session's open transaction may hold back.
    let head = seed(&*events, 220).await;
    live.wait_for(head, Duration::from_secs(60)).await.unwrap();
    assert_eq!(side.live_rows().await, expected_rows(&*events).await);
    side.mark_old().await;
    let old = side.live_rows().await;
    assert!(old.iter().all(|(_, _, movements)| *movements >= 1000));

    // Interrupted after its first batch: the future is dropped mid-rebuild.
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let admin = bank::admin();
    tokio::select! {
        finished = admin.rebuild(&connection, "bank_balances", move |progress| {
            let _ = sender.send(progress);
        }) => panic!("the rebuild finished before it was interrupted: {finished:?}"),
        Some(first) = receiver.recv() => assert!(first.done < first.total, "{first:?}"),
    }
    assert_eq!(
        side.live_rows().await,
        old,
        "the live version keeps serving"
    );
    assert_eq!(checkpoint(&connection, "bank_balances").await, Some(head));
    let partial = checkpoint(&connection, "bank_balances.next").await;
    assert!(
        partial.is_some_and(|p| p < head),
        "a partial build: {partial:?}"
    );
    assert!(side.building_exists().await);

    // The rerun resumes the partial build. After its first batch the live table still holds
    // the old, complete data; deposits appended then are applied by the live runner meanwhile.
    let mut seen = Vec::new();
    let mut appended = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rebuilt = admin
            .rebuild(&connection, "bank_balances", |progress| {
                if seen.is_empty() {
                    tokio::task::block_in_place(|| {
                        tokio::runtime::Handle::current().block_on(async {
                            assert_eq!(side.live_rows().await, old, "during the rebuild");
                            for account in ["acc-0", "acc-3"] {
                                appended.push(deposit(&*events, account, 1_000_000).await);
                            }
                        });
                    });
                }
                seen.push(progress);
            })
            .await;
        match rebuilt {
            // The interrupted rebuild's lease goes with its connection, which the server may
            // notice a moment later.
            Err(cqrs_admin::AdminError::LeaseHeld { .. })
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => break other.unwrap(),
        }
    }
    let total = u64::try_from(ACCOUNTS * 220).unwrap();
    assert!(
        seen[0].total < total,
        "resumed after the partial build: {seen:?}"
    );

    // Switched: the new version (movements as the log says), with the deposits appended during
    // the rebuild applied once, and the live runner continuing into it.
    let last = *appended.last().unwrap();
    live.wait_for(last, Duration::from_secs(60)).await.unwrap();
    // Nothing appended since: the switched-to version holds everything at once, with no new
    // event needed to make the live runner notice.
    assert_eq!(
        side.live_rows().await,
        expected_rows(&*events).await,
        "the new version holds every event at the switch"
    );
    let after_switch = deposit(&*events, "acc-5", 7).await;
    live.wait_for(after_switch, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(side.live_rows().await, expected_rows(&*events).await);
    assert_eq!(
        checkpoint(&connection, "bank_balances").await,
        Some(after_switch)
    );
    assert_eq!(checkpoint(&connection, "bank_balances.next").await, None);
    assert!(!side.building_exists().await, "renamed into the live table");
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_blue_green_rebuild() {
    let dir =
        std::env::temp_dir().join(format!("cqrs-blue-green-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = cqrs_sqlite::SqliteStore::open(dir.join("bank.db"))
        .await
        .unwrap();
    SqlBalances::create(&store).await.unwrap();
    let live = ProjectionRunner::new(
        SqlBalances::live(),
        cqrs_sqlite::SqliteProjections::new(store.clone()),
    )
    .spawn();
    blue_green(
        &Sqlite(store.clone()),
        Connection::Sqlite(store.clone()),
        live,
    )
    .await;
    store.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_blue_green_rebuild() {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!("pgt_{}", uuid::Uuid::now_v7().simple());
    let store = cqrs_postgres::PostgresStore::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("this test needs PostgreSQL at {url}: {e}"))
        .with_schema(&schema)
        .unwrap();
    store.migrate().await.unwrap();
    let projection = PgBalances::live(&store);
    projection.create(&store).await.unwrap();
    let live = ProjectionRunner::new(
        projection,
        cqrs_postgres::PostgresProjections::new(store.clone()),
    )
    .spawn();
    blue_green(
        &Postgres(store.clone()),
        Connection::Postgres(store.clone()),
        live,
    )
    .await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(store.pool())
    .await;
}
