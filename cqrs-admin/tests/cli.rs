//! The ready `cqrs-admin` binary run as a process against an SQLite file and the real
//! PostgreSQL at `DATABASE_URL` (each test on a schema of its own).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use cqrs_core::admin::StoreAdmin;
use cqrs_core::{
    CheckpointStore, EventId, EventStore, ExpectedVersion, Metadata, NewEvent, Position, StreamId,
};
use serde_json::{json, Value};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

/// The database arguments every call of one test passes (`--url`, and `--schema` on PostgreSQL).
#[derive(Clone)]
struct Db(Vec<String>);

impl Db {
    fn sqlite(path: &std::path::Path) -> Self {
        Self(vec!["--url".into(), format!("sqlite:{}", path.display())])
    }

    fn postgres(url: &str, schema: &str) -> Self {
        Self(vec![
            "--url".into(),
            url.into(),
            "--schema".into(),
            schema.into(),
        ])
    }

    fn url(url: &str) -> Self {
        Self(vec!["--url".into(), url.into()])
    }

    fn run(&self, args: &[&str]) -> Run {
        admin(&self.0, args)
    }
}

fn admin(db: &[String], args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_cqrs-admin"))
        .args(db)
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

fn ok(run: Run) -> Run {
    assert_eq!(
        run.code, 0,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    run
}

fn event(event_type: &str, payload: Value) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: event_type.to_owned(),
        schema_version: 1,
        payload,
        metadata: Metadata::default(),
    }
}

/// Two accounts (3 and 1 events) and one order (2 events).
async fn seed(store: &impl EventStore) {
    let batches = [
        (
            "account",
            "acc-1",
            vec![
                event("Opened", json!({ "owner": "Ada" })),
                event("Deposited", json!({ "amount": 100 })),
                event("Deposited", json!({ "amount": 50 })),
            ],
        ),
        (
            "account",
            "acc-2",
            vec![event("Opened", json!({ "owner": "Bob" }))],
        ),
        (
            "order",
            "o-1",
            vec![
                event("Placed", json!({ "lines": [1, 2] })),
                event("Shipped", json!({})),
            ],
        ),
    ];
    for (stream_type, id, events) in batches {
        store
            .append(
                &StreamId::new(stream_type, id),
                ExpectedVersion::NoStream,
                events,
            )
            .await
            .unwrap();
    }
}

/// The inspecting commands, the same on every backend.
async fn inspect(db: &Db, store: &(impl CheckpointStore + StoreAdmin)) {
    let types = ok(db.run(&["types", "--json"])).json();
    assert_eq!(
        types,
        json!([
            { "stream_type": "account", "streams": 2, "events": 4 },
            { "stream_type": "order", "streams": 1, "events": 2 },
        ])
    );
    let table = ok(db.run(&["types"])).stdout;
    assert!(table.starts_with("STREAM TYPE"), "{table}");

    let first = ok(db.run(&["streams", "account", "--limit", "1", "--json"])).json();
    assert_eq!(first["streams"][0]["stream_id"], "acc-1");
    assert_eq!(first["streams"][0]["version"], 3);
    assert_eq!(first["next_after"], "acc-1");
    let second = ok(db.run(&[
        "streams", "account", "--limit", "1", "--after", "acc-1", "--json",
    ]))
    .json();
    assert_eq!(second["streams"][0]["stream_id"], "acc-2");

    let shown = ok(db.run(&["show", "account", "acc-1", "--from-version", "2", "--json"])).json();
    let events = shown["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["stream_version"], 2);
    assert_eq!(events[0]["event_type"], "Deposited");
    assert_eq!(events[0]["payload"], json!({ "amount": 100 }));
    let pretty = ok(db.run(&["show", "account", "acc-1"])).stdout;
    assert!(pretty.contains("account/acc-1 v1 Opened"), "{pretty}");
    assert!(pretty.contains("\"owner\": \"Ada\""), "{pretty}");
    let missing = db.run(&["show", "account", "nobody"]);
    assert_eq!(missing.code, 3, "{}", missing.stderr);
    assert!(
        missing.stderr.contains("has no events"),
        "{}",
        missing.stderr
    );
    let unregistered = db.run(&["show", "account", "acc-1", "--state"]);
    assert_eq!(unregistered.code, 3);
    assert!(
        unregistered.stderr.contains("Admin::aggregate"),
        "{}",
        unregistered.stderr
    );

    // A checkpoint two events into the log: 4 events of every type behind.
    let log = store
        .read_all(Position::START, cqrs_core::EventTypes::All, 2)
        .await
        .unwrap();
    store
        .save_checkpoint("balances", None, log[1].position)
        .await
        .unwrap();
    let status = ok(db.run(&["projections", "--json"])).json();
    let row = &status["projections"][0];
    assert_eq!(row["name"], "balances");
    assert_eq!(row["checkpoint"], log[1].position.to_string());
    assert_eq!(row["lag"], 4);
    assert_eq!(row["lag_counts"], "all events");
    assert_eq!(row["state"], "idle, behind");
    assert_eq!(row["runner"], Value::Null);

    let unknown = db.run(&["rebuild", "balances"]);
    assert_eq!(unknown.code, 3);
    assert!(
        unknown.stderr.contains("unknown projection `balances`")
            && unknown.stderr.contains("register"),
        "{}",
        unknown.stderr
    );

    let followed = ok(db.run(&[
        "follow",
        "--from-start",
        "--event-type",
        "Deposited",
        "--count",
        "2",
        "--json",
    ]));
    let lines: Vec<Value> = followed
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|e| e["event_type"] == "Deposited"));
}

/// `follow` from the end of the log shows an event appended while it runs, and only the
/// stream asked for.
async fn follow_live(db: &Db, store: &impl EventStore) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cqrs-admin"))
        .args(&db.0)
        .args(["follow", "--stream", "order/o-2", "--count", "1", "--json"])
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It says where it starts once it has read the head: appends after this line are shown.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.starts_with("following the log after"), "{line}");
    store
        .append(
            &StreamId::new("order", "o-3"),
            ExpectedVersion::NoStream,
            vec![event("Placed", json!({}))],
        )
        .await
        .unwrap();
    store
        .append(
            &StreamId::new("order", "o-2"),
            ExpectedVersion::NoStream,
            vec![event("Placed", json!({ "n": 2 }))],
        )
        .await
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let shown: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shown["stream_id"], "o-2");
    assert_eq!(shown["payload"], json!({ "n": 2 }));
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cqrs-admin-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_end_to_end() {
    let dir = temp_dir();
    let path = dir.join("store.db");
    let db = Db::sqlite(&path);

    let absent = db.run(&["types"]);
    assert_eq!(absent.code, 4);
    assert!(
        absent.stderr.contains("no SQLite database at") && absent.stderr.contains("migrate"),
        "{}",
        absent.stderr
    );
    assert!(!path.exists(), "only migrate creates a file");
    ok(db.run(&["migrate"]));
    assert!(path.is_file());

    let store = cqrs_sqlite::SqliteStore::open(&path).await.unwrap();
    seed(&store).await;
    inspect(&db, &store).await;
    follow_live(&db, &store).await;
    let horizon = ok(db.run(&["horizon", "--json"])).json();
    assert_eq!(horizon["waiting_events"], 0);
    assert_eq!(horizon["held_by"], Value::Null);
    store.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

fn postgres_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_schema_end_to_end() {
    let url = postgres_url();
    // `pgt_<uuid v7>`, the prefix the backend's test janitor removes when old.
    let schema = format!("pgt_{}", uuid::Uuid::now_v7().simple());
    let db = Db::postgres(&url, &schema);
    let not_migrated = db.run(&["types"]);
    assert_eq!(not_migrated.code, 5, "{}", not_migrated.stderr);
    assert!(
        not_migrated.stderr.contains("cqrs-admin migrate"),
        "{}",
        not_migrated.stderr
    );
    ok(db.run(&["migrate", "--json"]));

    let store = cqrs_postgres::PostgresStore::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("these tests need PostgreSQL at {url}: {e}"))
        .with_schema(&schema)
        .unwrap();
    seed(&store).await;
    inspect(&db, &store).await;
    follow_live(&db, &store).await;

    // A transaction that has taken an id and keeps running holds the horizon: an event appended
    // after it waits, and the report names a holder (the oldest running transaction of the
    // cluster: this one, or an older one of a concurrent test).
    let mut holder = store.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *holder)
        .await
        .unwrap();
    store
        .append(
            &StreamId::new("order", "o-9"),
            ExpectedVersion::NoStream,
            vec![event("Placed", json!({}))],
        )
        .await
        .unwrap();
    let horizon = ok(db.run(&["horizon", "--json"])).json();
    assert!(
        horizon["waiting_events"].as_u64().unwrap() >= 1,
        "{horizon}"
    );
    assert!(horizon["held_by"]["transaction"].is_string(), "{horizon}");
    let text = ok(db.run(&["horizon"])).stdout;
    assert!(text.contains("held back by transaction"), "{text}");
    holder.rollback().await.unwrap();
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(store.pool())
    .await;
}

/// A projection that applies `Deposited` and refuses `Poison` with a handler error; it writes
/// nothing, so it runs on any backend.
struct Poisoned<C>(std::marker::PhantomData<fn() -> C>);

impl<C: Send + 'static> cqrs_core::Projection for Poisoned<C> {
    const NAME: &'static str = "poisoned";
    const EVENT_TYPES: &'static [&'static str] = &["Deposited", "Poison"];
    type Context = C;

    async fn handle<'a>(
        &'a mut self,
        event: &'a cqrs_core::RecordedEvent,
        _context: &'a mut C,
    ) -> Result<(), cqrs_core::ProjectionError> {
        if event.event_type == "Poison" {
            return Err(cqrs_core::ProjectionError::Handler {
                projection: Self::NAME,
                event_type: event.event_type.clone(),
                position: event.position,
                source: "cannot apply this one\nsecond line".into(),
            });
        }
        Ok(())
    }
}

/// Runs `Poisoned` live on `backend` over a log ending in a poison event: `projections` in
/// another process shows the runner and the failure the runner recorded (where, what, since
/// when); once the runner stops, the failure still. Returns the status row while it runs.
async fn failing_projection_shown<C, B>(db: &Db, backend: B) -> Value
where
    C: Send + 'static,
    B: cqrs_core::backend::ProjectionBackend<Poisoned<C>>,
{
    use cqrs_core::subscription::{ProjectionRunner, ProjectionState};
    let store = backend.events();
    store
        .append(
            &StreamId::new("account", "poisoned"),
            ExpectedVersion::NoStream,
            vec![event("Deposited", json!({ "amount": 1 }))],
        )
        .await
        .unwrap();
    let poison = store
        .append(
            &StreamId::new("account", "poisoned"),
            ExpectedVersion::Any,
            vec![event("Poison", json!({}))],
        )
        .await
        .unwrap()
        .position;
    let before = chrono::Utc::now() - chrono::Duration::seconds(60);
    let handle = ProjectionRunner::new(Poisoned(std::marker::PhantomData), backend).spawn();
    let mut status = handle.watch_status();
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        status.wait_for(|s| s.state == ProjectionState::Failed),
    )
    .await
    .unwrap()
    .unwrap();
    // The runner records the failure right after publishing it: poll the other process.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let row = loop {
        let row = poisoned_row(db);
        if !row["last_error"].is_null() || std::time::Instant::now() > deadline {
            break row;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let error = &row["last_error"];
    assert_eq!(error["position"], poison.to_string(), "{row}");
    assert_eq!(error["event_type"], "Poison", "{row}");
    assert_eq!(error["cause"], "handler", "{row}");
    assert_eq!(error["skippable"], true, "{row}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("cannot apply this one"),
        "{row}"
    );
    let failed_at: chrono::DateTime<chrono::Utc> =
        error["failed_at"].as_str().unwrap().parse().unwrap();
    assert!(failed_at > before, "{row}");
    assert_eq!(row["state"], "failing", "{row}");
    assert!(!row["runner"].is_null(), "{row}");
    let table = ok(db.run(&["projections"])).stdout;
    assert!(table.contains("LAST ERROR"), "{table}");
    let line = table.lines().find(|l| l.starts_with("poisoned")).unwrap();
    assert!(
        line.contains(&format!("at {poison} (Poison, handler): ")),
        "{table}"
    );
    assert!(!line.contains("second line"), "one line per row: {table}");

    handle.stop().await;
    // A stopped runner's failure stays recorded until a run moves past it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let stopped = poisoned_row(db);
        if stopped["runner"].is_null() {
            assert_eq!(stopped["state"], "stopped, failed", "{stopped}");
            assert_eq!(stopped["last_error"]["position"], poison.to_string());
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{stopped}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    row
}

/// The `poisoned` row of `projections --json`.
fn poisoned_row(db: &Db) -> Value {
    let status = ok(db.run(&["projections", "--json"])).json();
    status["projections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "poisoned")
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_status_shows_the_recorded_failure() {
    let dir = temp_dir();
    let path = dir.join("store.db");
    let db = Db::sqlite(&path);
    ok(db.run(&["migrate"]));
    let store = cqrs_sqlite::SqliteStore::open(&path).await.unwrap();
    let row = failing_projection_shown::<sqlx::SqliteConnection, _>(
        &db,
        cqrs_sqlite::SqliteProjections::new(store.clone()),
    )
    .await;
    assert!(
        row["runner"]["description"]
            .as_str()
            .unwrap()
            .contains("holds the lock"),
        "{row}"
    );
    store.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// The lease holder of a PostgreSQL projection is looked up in `pg_locks`: the session holding
/// the advisory lock, its application and since when; beside the failure the runner recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_status_shows_the_lease_holder_and_the_recorded_failure() {
    let schema = format!("pgt_{}", uuid::Uuid::now_v7().simple());
    let application = format!("lease_{}", uuid::Uuid::now_v7().simple());
    let base = postgres_url();
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}application_name={application}");
    let db = Db::postgres(&base, &schema);
    ok(db.run(&["migrate"]));
    let store = cqrs_postgres::PostgresStore::connect(&url)
        .await
        .unwrap()
        .with_schema(&schema)
        .unwrap();
    let started = chrono::Utc::now();
    let row = failing_projection_shown::<sqlx::PgConnection, _>(
        &db,
        cqrs_postgres::PostgresProjections::new(store.clone()),
    )
    .await;
    let runner = &row["runner"];
    let pid = runner["pid"].as_i64().unwrap();
    let description = runner["description"].as_str().unwrap();
    assert!(
        description.contains(&format!("PostgreSQL session {pid}"))
            && description.contains(&format!("application {application}")),
        "{runner}"
    );
    let since: chrono::DateTime<chrono::Utc> = runner["since"].as_str().unwrap().parse().unwrap();
    assert!(
        since >= started - chrono::Duration::seconds(5) && since <= chrono::Utc::now(),
        "the lease's session started with the runner: {runner}"
    );
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(store.pool())
    .await;
}

#[test]
fn unsupported_urls_say_what_is_supported() {
    let run = Db::url("redis://127.0.0.1:6379/").run(&["types"]);
    assert_eq!(run.code, 4);
    assert!(
        run.stderr.contains("PostgreSQL") && run.stderr.contains("SQLite"),
        "{}",
        run.stderr
    );
    let run = Db::url("mysql://ada:secret@host/db").run(&["types"]);
    assert_eq!(run.code, 4);
    assert!(!run.stderr.contains("secret"), "{}", run.stderr);
    let usage = Db::url("sqlite:x.db").run(&["no-such-command"]);
    assert_eq!(usage.code, 2);
}

/// Every public future of the crate can be spawned (`Send`): a compile-time check.
#[allow(dead_code, clippy::let_underscore_future)]
fn public_futures_are_send(admin: cqrs_admin::Admin, connection: cqrs_admin::Connection) {
    fn send<T: Send>(_: T) {}
    send(cqrs_admin::connect("sqlite:x.db", "public", false));
    send(async move {
        let _ = connection.migrate().await;
        let _ = admin.rebuild(&connection, "p", |_| {}).await;
        let _ = admin.execute(["cqrs-admin", "types"]).await;
    });
}
