//! The example stories, asserted on, in memory and on PostgreSQL (`DATABASE_URL`, own schema).
// Tests: failing assertions panic by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cqrs_core::InMemoryStore;
use cqrs_postgres::PostgresStore;
use examples::bank::{self, BankError};
use examples::catalogue::{self, CatalogueError};
use examples::orders::{self, OrderError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_story() {
    let report = bank::demo(InMemoryStore::new(), "acc-1", &mut Vec::new())
        .await
        .unwrap();
    assert_bank(&report);
}

fn assert_bank(report: &bank::BankReport) {
    assert_eq!(
        report.rejected,
        BankError::InsufficientFunds {
            balance: 600,
            requested: 10_000
        }
    );
    assert_eq!(
        report.race_attempts,
        vec![1, 2],
        "one withdrawal conflicted and was retried"
    );
    assert_eq!(report.balance, 600 - 200 - 150 + 1);
    assert_eq!(report.balance_at_version_3, 200, "open + two deposits");
    assert_eq!(report.balance_after_first_deposit, 100);
    assert_eq!(report.projected_balance, report.balance);
    assert_eq!(
        report.snapshot_version,
        Some(10),
        "snapshots every 5 events; 10 events written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_story() {
    let report = orders::demo(InMemoryStore::new(), "run", &mut Vec::new())
        .await
        .unwrap();
    assert_orders(&report);
}

fn assert_orders(report: &orders::OrdersReport) {
    assert_eq!(report.not_editable, OrderError::OrderNotEditable);
    assert_eq!(report.empty, OrderError::EmptyOrder);
    assert_eq!(report.upcast_price, (999, "EUR".to_owned()));
    assert_eq!(report.first_order.status, "submitted");
    assert_eq!(report.first_order.total_cents, 4_500 + 3 * 700);
    assert_eq!(report.first_order.lines["cable"], 3);
    assert_eq!(report.search_hits.len(), 1);
    assert!(report.search_hits.iter().all(|id| id.ends_with("-o1")));
    assert_eq!(report.revenue_today, (4_500 + 3 * 700 + 999, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue_story() {
    let report = catalogue::demo(InMemoryStore::new(), "mug", &mut Vec::new())
        .await
        .unwrap();
    assert_catalogue(&report);
}

fn assert_catalogue(report: &catalogue::CatalogueReport) {
    assert_eq!(report.bad_price, CatalogueError::NonPositivePrice(-5));
    assert!(
        report.discontinued,
        "the process manager discontinued the sold-out product"
    );
    let (depleted_id, depleted_correlation) = report.depleted;
    assert_eq!(
        report.discontinued_metadata.0,
        Some(depleted_id),
        "caused by StockDepleted"
    );
    assert!(depleted_correlation.is_some());
    assert_eq!(
        report.discontinued_metadata.1, depleted_correlation,
        "same conversation"
    );
}

#[test]
fn bank_fixture_given_when_then() {
    use bank::{Account, AccountOpened, Deposit, MoneyDeposited, MoneyWithdrawn, Withdraw};
    use cqrs_core::testing::AggregateFixture;
    let opened = AccountOpened {
        owner: "Ada".into(),
    };
    AggregateFixture::<Account>::given([opened.clone().into()])
        .when(&Deposit {
            amount: 10,
            memo: "m".into(),
        })
        .expect_events([MoneyDeposited {
            amount: 10,
            memo: "m".into(),
        }
        .into()]);
    AggregateFixture::<Account>::given([
        opened.clone().into(),
        MoneyDeposited {
            amount: 10,
            memo: String::new(),
        }
        .into(),
    ])
    .when(&Withdraw { amount: 10 })
    .expect_events([MoneyWithdrawn { amount: 10 }.into()]);
    AggregateFixture::<Account>::given([opened.into()])
        .when(&Withdraw { amount: 1 })
        .expect_error(BankError::InsufficientFunds {
            balance: 0,
            requested: 1,
        });
    AggregateFixture::<Account>::given_no_previous_events()
        .when(&Deposit {
            amount: 1,
            memo: String::new(),
        })
        .expect_error(BankError::NotOpen);
}

#[tokio::test]
async fn balances_projection_fixture() {
    use bank::{AccountEvent, AccountOpened, Balances, MoneyDeposited, MoneyWithdrawn};
    use cqrs_core::testing::ProjectionFixture;
    use cqrs_core::StreamId;
    let account = |id: &str| StreamId::new("account", id);
    let events: Vec<AccountEvent> = vec![
        AccountOpened {
            owner: "Ada".into(),
        }
        .into(),
        MoneyDeposited {
            amount: 70,
            memo: String::new(),
        }
        .into(),
        MoneyWithdrawn { amount: 20 }.into(),
    ];
    let model = ProjectionFixture::new(Balances::default())
        .given(account("a"), events)
        .given(
            account("b"),
            [AccountEvent::from(AccountOpened { owner: "Bo".into() })],
        )
        .run()
        .await
        .unwrap();
    assert_eq!(model.balances["a"], 50);
    assert_eq!(model.balances["b"], 0);
    assert_eq!(model.movements["a"], 2);
    assert!(!model.movements.contains_key("b"));
}

async fn postgres() -> PostgresStore {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let store = PostgresStore::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL is required at {url} (set DATABASE_URL): {e}"))
        .with_schema(&format!("ex_{}", uuid::Uuid::now_v7().simple()))
        .unwrap();
    store.migrate().await.unwrap();
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stories_on_postgres() {
    let store = postgres().await;
    assert_bank(
        &bank::demo(store.clone(), "acc-1", &mut Vec::new())
            .await
            .unwrap(),
    );
    assert_orders(
        &orders::demo(store.clone(), "run", &mut Vec::new())
            .await
            .unwrap(),
    );
    let manager = cqrs_postgres::PostgresProjections::new(store.clone());
    assert_catalogue(
        &catalogue::demo_on(store, manager, "mug", &mut Vec::new())
            .await
            .unwrap(),
    );
}

/// The headline guarantee: a PostgreSQL read model whose runner dies part-way through ends up,
/// after a restart, with every event applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_restarted_mid_way_applies_every_event_once() {
    let store = postgres().await;
    let report = examples::restart::demo(store, 600, &mut Vec::new())
        .await
        .unwrap();
    assert!(report.died_at.is_some(), "{report:?}");
    assert_eq!(report.applied, report.appended, "{report:?}");
    assert_eq!(report.total, report.expected_total, "{report:?}");
}

/// The orders' read models in their own stores, fed from one PostgreSQL event store: a lookup
/// and a full-text search in a read database (another schema standing in for one), a dashboard
/// in Redis; each read model applies every order event once, from its own checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_read_models_in_their_own_stores() {
    let store = postgres().await;
    orders::demo(store.clone(), "run", &mut Vec::new())
        .await
        .unwrap();
    let read = PostgresStore::new(store.pool().clone())
        .with_schema(&format!("ex_read_{}", uuid::Uuid::now_v7().simple()))
        .unwrap();
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned());
    let prefix = format!("cqrs-examples-test:{}:", uuid::Uuid::now_v7().simple());
    let report = examples::orders_read_models::demo(
        store.clone(),
        read.clone(),
        &redis,
        &prefix,
        "run",
        &mut Vec::new(),
    )
    .await
    .unwrap();
    // Grace's order: a keyboard and three cables, submitted.
    assert_eq!(
        report.lookup,
        Some((
            "cust-Grace Hopper".to_owned(),
            4,
            6_600,
            "submitted".to_owned()
        ))
    );
    assert_eq!(report.search_hits, vec!["run-o1".to_owned()]);
    let expected: std::collections::BTreeMap<String, i64> = [
        ("orders".to_owned(), 1),
        ("submitted".to_owned(), 1),
        ("revenue_cents".to_owned(), 6_600),
    ]
    .into();
    assert_eq!(report.dashboard, expected);
    // The event store holds none of their checkpoints.
    use cqrs_core::CheckpointStore;
    assert_eq!(
        store.load_checkpoint("customer_dashboard").await.unwrap(),
        None
    );
    assert_eq!(
        store.load_checkpoint("order_lookup_table").await.unwrap(),
        None
    );
    let client = redis::Client::open(redis.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(keys)
        .query_async(&mut conn)
        .await
        .unwrap();
    for schema in [read.schema(), store.schema()] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA \"{schema}\" CASCADE"
        )))
        .execute(store.pool())
        .await
        .unwrap();
    }
}

/// The bank on an SQLite file with its read model in the same file, run twice as the binary does:
/// the second run continues the first one's log, and its projection resumes from its checkpoint
/// (the table keeps the first run's account).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_story_on_sqlite_twice() {
    use examples::bank::{ReadModel, SqlBalances};
    let dir = std::env::temp_dir().join(format!("cqrs-examples-test-{}", examples::run_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bank.db");
    for (run, account) in ["acc-1", "acc-2"].into_iter().enumerate() {
        let store = cqrs_sqlite::SqliteStore::open(&path).await.unwrap();
        let report = bank::demo_with(
            store.clone(),
            ReadModel::Sqlite(store.clone()),
            account,
            &mut Vec::new(),
        )
        .await
        .unwrap();
        assert_bank(&report);
        assert_eq!(SqlBalances::accounts(&store).await.unwrap(), run as i64 + 1);
        store.close().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The catalogue on an SQLite file with its process manager on a durable SQLite backend,
/// run twice as the binary does: the first run starts the manager without a checkpoint, the
/// second continues after the checkpoint the first one left, and both stories hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue_story_on_sqlite_twice() {
    let dir = std::env::temp_dir().join(format!("cqrs-examples-test-{}", examples::run_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("catalogue.db");
    let mut first_head = None;
    for product in ["mug-1", "mug-2"] {
        let store = cqrs_sqlite::SqliteStore::open(&path).await.unwrap();
        let manager = catalogue::sqlite_manager_backend(&store).await.unwrap();
        let mut out = Vec::new();
        let report = catalogue::demo_on(store.clone(), manager, product, &mut out)
            .await
            .unwrap();
        assert_catalogue(&report);
        let out = String::from_utf8(out).unwrap();
        match first_head {
            None => {
                assert_eq!(report.manager_resumed_from, None, "a fresh file");
                first_head = cqrs_core::EventStore::head(&store).await.unwrap();
            }
            Some(head) => {
                let resumed = report
                    .manager_resumed_from
                    .expect("the first run's checkpoint");
                assert!(resumed <= head, "{resumed} is within the first run's log");
                assert!(out.contains("continues after its checkpoint"), "{out}");
            }
        }
        store.close().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
