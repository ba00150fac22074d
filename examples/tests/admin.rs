//! `bank-admin` (the `cqrs-admin` command line with the bank registered) run as a process on
//! the bank's SQLite file: state as of a version, rebuild, a poison event skipped, reset, and
//! the refusals while a runner holds the projection; the rebuild's progress through the
//! library's callback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cqrs_core::subscription::ProjectionRunner;
use cqrs_core::{EventId, EventStore, ExpectedVersion, Metadata, NewEvent, StreamId};
use cqrs_sqlite::{SqliteProjections, SqliteStore};
use examples::bank::{self, ReadModel, SqlBalances};
use serde_json::{json, Value};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

fn bank_admin(path: &Path, args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_bank-admin"))
        .arg("--url")
        .arg(format!("sqlite:{}", path.display()))
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

/// A file with the bank story's events and its `bank_balances` table, caught up.
async fn bank_file() -> (PathBuf, SqliteStore) {
    let dir =
        std::env::temp_dir().join(format!("cqrs-bank-admin-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bank.db");
    let store = SqliteStore::open(&path).await.unwrap();
    bank::demo_with(
        store.clone(),
        ReadModel::Sqlite(store.clone()),
        "acc-1",
        &mut Vec::new(),
    )
    .await
    .unwrap();
    (path, store)
}

fn status(path: &Path) -> Value {
    named_status(path, "bank_balances")
}

fn named_status(path: &Path, name: &str) -> Value {
    let status = bank_admin(path, &["projections", "--json"]).ok().json();
    status["projections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no `{name}` in {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_admin_state_rebuild_skip_reset() {
    let (path, store) = bank_file().await;
    let state = bank_admin(
        &path,
        &[
            "show",
            "account",
            "acc-1",
            "--state",
            "--at-version",
            "3",
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(state["version"], 3);
    assert_eq!(state["state"]["balance"], 200);
    let before = SqlBalances::balance(&store, "acc-1").await.unwrap();

    let rebuilt = bank_admin(&path, &["rebuild", "bank_balances", "--json"])
        .ok()
        .json();
    assert_eq!(rebuilt["rebuilt"], "bank_balances");
    assert_eq!(rebuilt["blue_green"], true);
    assert_eq!(rebuilt["events"], 10, "every event of the story is handled");
    assert_eq!(SqlBalances::balance(&store, "acc-1").await.unwrap(), before);
    assert_eq!(status(&path)["lag"], 0);

    // A deposit whose payload the projection cannot decode stops a rebuild right before it.
    let poison = NewEvent {
        event_id: EventId::new(),
        event_type: "MoneyDeposited".to_owned(),
        schema_version: 1,
        payload: json!({ "amount": "lots" }),
        metadata: Metadata::default(),
    };
    let appended = store
        .append(
            &StreamId::new("account", "acc-1"),
            ExpectedVersion::Any,
            vec![poison],
        )
        .await
        .unwrap();
    let failed = bank_admin(&path, &["rebuild", "bank_balances"]);
    assert_eq!(failed.code, 1, "{}", failed.stderr);
    assert!(failed.stderr.contains("skip"), "{}", failed.stderr);
    // The live version is untouched; the build stopped right before the poison, its failure
    // recorded under the build's name.
    let live = status(&path);
    assert_eq!(live["lag"], 1);
    assert_eq!(live["state"], "idle, behind");
    assert_eq!(live["last_error"], Value::Null);
    let building = named_status(&path, "bank_balances.next");
    assert_eq!(building["state"], "stopped, failed", "{building}");
    let position = appended.position.to_string();
    assert_eq!(building["last_error"]["position"], position, "{building}");
    assert_eq!(building["last_error"]["cause"], "decode", "{building}");

    let wrong = bank_admin(&path, &["skip", "bank_balances.next", "--position", "1.1"]);
    assert_eq!(wrong.code, 6, "{}", wrong.stderr);
    assert!(wrong.stderr.contains(&position), "{}", wrong.stderr);
    bank_admin(
        &path,
        &[
            "skip",
            "bank_balances.next",
            "--position",
            &position,
            "--reason",
            "bad amount",
        ],
    )
    .ok();
    let skipped = named_status(&path, "bank_balances.next");
    assert_eq!(skipped["checkpoint"], position);
    assert_eq!(skipped["last_error"], Value::Null, "cleared by the skip");
    assert_eq!(skipped["skipped"][0]["reason"], "bad amount");

    // The rerun resumes past the skipped event and switches.
    let resumed = bank_admin(&path, &["rebuild", "bank_balances", "--json"])
        .ok()
        .json();
    assert_eq!(resumed["blue_green"], true);
    assert_eq!(resumed["checkpoint"], position);
    let switched = status(&path);
    assert_eq!(switched["lag"], 0);
    assert_eq!(switched["checkpoint"], position);
    assert_eq!(SqlBalances::balance(&store, "acc-1").await.unwrap(), before);
    let listed = bank_admin(&path, &["projections", "--json"]).ok().json();
    assert!(
        listed["projections"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["name"] != "bank_balances.next"),
        "the build's checkpoint goes with the switch: {listed}"
    );

    bank_admin(&path, &["reset", "bank_balances"]).ok();
    assert_eq!(SqlBalances::accounts(&store).await.unwrap(), 0);
    assert_eq!(status(&path)["state"], "not started");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_runner_is_shown_and_not_overrun() {
    let (path, store) = bank_file().await;
    let head = store.head().await.unwrap().unwrap();
    let runner =
        ProjectionRunner::new(SqlBalances::live(), SqliteProjections::new(store.clone())).spawn();
    runner
        .wait_for(head, Duration::from_secs(30))
        .await
        .unwrap();
    let running = status(&path);
    assert_eq!(running["state"], "running");
    assert!(running["runner"]["description"]
        .as_str()
        .unwrap()
        .contains("lock"));
    let refused = bank_admin(&path, &["reset", "bank_balances"]);
    assert_eq!(refused.code, 6, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("stop that runner"),
        "{}",
        refused.stderr
    );
    // A blue/green rebuild builds beside the live runner instead.
    let rebuilt = bank_admin(&path, &["rebuild", "bank_balances", "--json"])
        .ok()
        .json();
    assert_eq!(rebuilt["blue_green"], true);
    assert_eq!(status(&path)["state"], "running");
    runner.stop().await;
    assert_eq!(status(&path)["state"], "idle, caught up");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_reports_progress_through_the_callback() {
    let (_path, store) = bank_file().await;
    let connection = cqrs_admin::Connection::Sqlite(store.clone());
    let mut seen = Vec::new();
    bank::admin()
        .rebuild(&connection, "bank_balances", |progress| seen.push(progress))
        .await
        .unwrap();
    let last = seen.last().unwrap();
    assert_eq!((last.done, last.total), (10, 10), "the story's 10 events");
    assert!(seen.windows(2).all(|w| w[0].done <= w[1].done));
    let unknown = bank::admin().rebuild(&connection, "nope", |_| {}).await;
    assert!(matches!(
        unknown,
        Err(cqrs_admin::AdminError::UnknownProjection { .. })
    ));
    store.close().await;
}
