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

mod conformance {
    async fn fresh_store() -> cqrs_sqlite::SqliteStore {
        super::open_fast(&super::leaked_dir().db()).await
    }
    cqrs_core::backend_conformance_tests!(fresh_store);

    async fn fresh_projections() -> super::SqliteProjections {
        super::SqliteProjections::new(fresh_store().await)
    }
    cqrs_core::projection_conformance_tests!(fresh_projections, context = sqlx::SqliteConnection);
}
