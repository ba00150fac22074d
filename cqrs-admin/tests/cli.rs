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
