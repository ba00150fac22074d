//! Integration tests of the SQLite backend: the conformance suite, then what only an embedded
//! file can get wrong (several processes, crashes, damaged files).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod faults;
mod processes;
mod projections;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use cqrs_sqlite::{SqliteConfig, SqliteProjections, SqliteStore};

/// A fresh directory for one test's files, under the OS temp dir; removed on drop unless the
/// test failed (then it is kept to look at, and its path printed).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl TempDir {
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "cqrs-sqlite-test-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn db(&self) -> PathBuf {
        self.0.join("events.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept the test's files in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The test's directories, kept alive until the process ends (the conformance factories cannot
/// hand them to the test).
fn leaked_dir() -> &'static TempDir {
    Box::leak(Box::new(TempDir::new()))
}

/// Synchronous=NORMAL keeps the suite fast on slow disks; durability has its own tests.
pub async fn open_fast(path: &Path) -> SqliteStore {
    let config = SqliteConfig::builder(path)
        .synchronous(cqrs_sqlite::Synchronous::Normal)
        .build()
        .unwrap();
    SqliteStore::open_with(config).await.unwrap()
}

/// Every public future can be spawned (compile-time check).
#[allow(dead_code)]
fn public_futures_are_send(store: SqliteStore, projections: SqliteProjections) {
    use cqrs_core::{CheckpointStore, EventStore, SnapshotStore};
    fn send<T: Send>(_: T) {}
    let stream = cqrs_core::StreamId::new("a", "b");
    send(SqliteStore::open("x.db"));
    send(store.append(&stream, cqrs_core::ExpectedVersion::Any, Vec::new()));
    send(store.read_all(cqrs_core::Position::START, cqrs_core::EventTypes::All, 1));
    send(store.load_snapshot(&stream));
    send(store.save_checkpoint("c", None, cqrs_core::Position::START));
    send(store.wait_for_append(cqrs_core::Position::START, std::time::Duration::ZERO));
    send(store.close());
    send(projections.skipped_events("p"));
    send(projections.promote("p", "p.next", &[("v", "t")]));
    send(projections.record_failure("p", None));
    send(projections.last_failure("p"));
    {
        use cqrs_core::admin::StoreAdmin;
        send(store.stream_types());
        send(store.list_streams("t", None, 1));
        send(store.checkpoints());
        send(store.lease_holder("n"));
        send(store.skipped("n"));
        send(store.last_failure("n"));
        send(store.horizon_report());
    }
}

mod conformance {
    async fn fresh_store() -> cqrs_sqlite::SqliteStore {
        super::open_fast(&super::leaked_dir().db()).await
    }
    cqrs_core::backend_conformance_tests!(fresh_store);
    cqrs_core::admin_conformance_tests!(fresh_store);

    async fn fresh_projections() -> super::SqliteProjections {
        super::SqliteProjections::new(fresh_store().await)
    }
    async fn fresh_inline() -> (
        super::SqliteStore,
        cqrs_core::conformance::projections::Recorder<sqlx::SqliteConnection>,
    ) {
        let recorder = cqrs_core::conformance::projections::Recorder::default();
        (fresh_store().await.with_inline(recorder.clone()), recorder)
    }
    /// A read file fed from an independent event store (in memory).
    mod other_event_source {
        use std::sync::Arc;

        async fn fresh_projections() -> super::super::SqliteProjections {
            super::super::SqliteProjections::with_event_source(
                Arc::new(cqrs_core::InMemoryStore::new()),
                super::fresh_store().await,
            )
        }
        cqrs_core::projection_conformance_tests!(
            fresh_projections,
            context = sqlx::SqliteConnection
        );
    }

    cqrs_core::projection_conformance_tests!(
        fresh_projections,
        context = sqlx::SqliteConnection,
        inline = fresh_inline
    );
}

/// A seeded xorshift generator: tests print their seed, and `CQRS_TEST_SEED=<seed>` replays it.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn seeded(test: &str) -> Self {
        let seed = std::env::var("CQRS_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{test}: seed {seed} (replay with CQRS_TEST_SEED={seed})");
        Self(seed | 1)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// The environment variable naming a child process's database file.
const CHILD_DB: &str = "CQRS_SQLITE_CHILD_DB";

/// For child entry points: the database file their parent chose.
pub fn child_db() -> PathBuf {
    PathBuf::from(std::env::var(CHILD_DB).expect("started by a test"))
}

/// Starts this test binary again as a child process running only the ignored test `entry`
/// (a child entry point), with its database at `db`. Its stdout lines are collected.
pub fn start_child(entry: &str, db: &Path, env: &[(&str, String)]) -> Child {
    start_child_under(&[], entry, db, env)
}

/// [`start_child`], run by the command `wrapper` (a program and its first arguments; the test
/// binary and its arguments follow them), e.g. in namespaces of its own.
pub fn start_child_under(
    wrapper: &[&str],
    entry: &str,
    db: &Path,
    env: &[(&str, String)],
) -> Child {
    let exe = std::env::current_exe().unwrap();
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = std::process::Command::new(program);
            command.args(args).arg(&exe);
            command
        }
        None => std::process::Command::new(&exe),
    };
    command
        .args(["--ignored", "--exact", entry, "--nocapture", "--quiet"])
        .env(CHILD_DB, db)
        .stdout(std::process::Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut process = command.spawn().unwrap();
    let stdout = process.stdout.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let collected = std::sync::Arc::clone(&lines);
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            collected.lock().unwrap().push(line);
        }
    });
    Child {
        process,
        lines,
        reader: Some(reader),
    }
}

/// A child process and what it printed so far.
#[derive(Debug)]
pub struct Child {
    process: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Child {
    /// The lines printed so far that start with `prefix`.
    pub fn lines(&self, prefix: &str) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// SIGKILL, then waits for it (and for its output to be read to the end).
    pub fn kill(&mut self) {
        let _ = self.process.kill();
        self.process.wait().unwrap();
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
    }

    /// Waits for a normal exit and asserts it succeeded.
    pub fn wait_success(&mut self) {
        let status = self.process.wait().unwrap();
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        assert!(status.success(), "child failed: {status}");
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// For child entry points: true while the parent lives, for two minutes at most, so a child
/// never outlives a test that died.
pub fn parent_alive(parent: u32, started: std::time::Instant) -> bool {
    std::os::unix::process::parent_id() == parent
        && started.elapsed() < std::time::Duration::from_secs(120)
}
