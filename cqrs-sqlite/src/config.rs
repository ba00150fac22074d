//! How a store opens its file: durability, waiting on other processes, group commit.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default [`SqliteConfigBuilder::busy_timeout`].
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Default [`SqliteConfigBuilder::queue_size`].
pub const DEFAULT_QUEUE_SIZE: usize = 1024;
/// Default [`SqliteConfigBuilder::max_group`].
pub const DEFAULT_MAX_GROUP: usize = 256;
/// Default [`SqliteConfigBuilder::read_connections`].
pub const DEFAULT_READ_CONNECTIONS: u32 = 4;
/// Default [`SqliteConfigBuilder::poll_interval`].
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(25);

/// When a commit is on disk (SQLite's `PRAGMA synchronous`, in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Synchronous {
    /// Every commit is flushed to disk (`fsync`) before the append returns: an acknowledged
    /// append survives a process crash, an OS crash and a power cut. The default, because the
    /// log is the source of truth; group commit shares one flush among every append queued.
    #[default]
    Full,
    /// The log is flushed only at checkpoints: an acknowledged append survives a process crash
    /// (`kill -9`), but an OS crash or a power cut may lose the last commits since the last
    /// checkpoint (the file stays consistent: it loses whole transactions, never part of one).
    Normal,
}

impl Synchronous {
    pub(crate) fn to_sqlx(self) -> sqlx::sqlite::SqliteSynchronous {
        match self {
            Synchronous::Full => sqlx::sqlite::SqliteSynchronous::Full,
            Synchronous::Normal => sqlx::sqlite::SqliteSynchronous::Normal,
        }
    }
}

/// A validated configuration for [`crate::SqliteStore::open_with`]; build it with
/// [`SqliteConfig::builder`].
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    pub(crate) path: PathBuf,
    pub(crate) busy_timeout: Duration,
    pub(crate) synchronous: Synchronous,
    pub(crate) queue_size: usize,
    pub(crate) max_group: usize,
    pub(crate) read_connections: u32,
    pub(crate) poll_interval: Duration,
    pub(crate) read_only: bool,
}

impl SqliteConfig {
    /// A builder for the database file at `path`, with the defaults.
    pub fn builder(path: impl AsRef<Path>) -> SqliteConfigBuilder {
        SqliteConfigBuilder {
            config: SqliteConfig {
                path: path.as_ref().to_path_buf(),
                busy_timeout: DEFAULT_BUSY_TIMEOUT,
                synchronous: Synchronous::default(),
                queue_size: DEFAULT_QUEUE_SIZE,
                max_group: DEFAULT_MAX_GROUP,
                read_connections: DEFAULT_READ_CONNECTIONS,
                poll_interval: DEFAULT_POLL_INTERVAL,
                read_only: false,
            },
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How long a write waits for another process's write lock.
    pub fn busy_timeout(&self) -> Duration {
        self.busy_timeout
    }

    /// The durability of a commit.
    pub fn synchronous(&self) -> Synchronous {
        self.synchronous
    }
}

/// Builds a [`SqliteConfig`]; [`SqliteConfigBuilder::build`] checks it.
#[derive(Debug, Clone)]
pub struct SqliteConfigBuilder {
    config: SqliteConfig,
}

/// A configuration value out of its range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SQLite store configuration: {0}")]
pub struct ConfigError(String);

impl SqliteConfigBuilder {
    /// How long a write waits while another process holds the write lock (default
    /// [`DEFAULT_BUSY_TIMEOUT`]). Past it the write fails with
    /// [`crate::SqliteError::Busy`] inside [`cqrs_core::StoreError::Connection`]: nothing was
    /// written. Writes of one process never wait on each other this way: they are queued.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.config.busy_timeout = timeout;
        self
    }

    /// The durability of a commit (default [`Synchronous::Full`]).
    pub fn synchronous(mut self, synchronous: Synchronous) -> Self {
        self.config.synchronous = synchronous;
        self
    }

    /// How many appends may wait for the writer before `append` itself waits (default
    /// [`DEFAULT_QUEUE_SIZE`], at least 1).
    pub fn queue_size(mut self, size: usize) -> Self {
        self.config.queue_size = size;
        self
    }

    /// The most appends the writer commits in one transaction (default [`DEFAULT_MAX_GROUP`],
    /// at least 1; 1 turns group commit off).
    pub fn max_group(mut self, size: usize) -> Self {
        self.config.max_group = size;
        self
    }

    /// Connections for reads, checkpoints, snapshots and projection batches (default
    /// [`DEFAULT_READ_CONNECTIONS`], at least 1). Appends have their own.
    pub fn read_connections(mut self, connections: u32) -> Self {
        self.config.read_connections = connections;
        self
    }

    /// How often a projection runner waiting for events checks whether another process
    /// committed (`PRAGMA data_version`; default [`DEFAULT_POLL_INTERVAL`]). Appends of this
    /// process wake it at once.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.config.poll_interval = interval;
        self
    }

    /// Opens the file for reading only (default `false`): no migration runs, nothing is ever
    /// written, and every write fails with [`crate::SqliteError::ReadOnly`].
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.config.read_only = read_only;
        self
    }

    /// Checks the values and returns the configuration.
    pub fn build(self) -> Result<SqliteConfig, ConfigError> {
        let config = self.config;
        if config.path.as_os_str().is_empty() {
            return Err(ConfigError("the database path is empty".into()));
        }
        if config.queue_size == 0 || config.max_group == 0 || config.read_connections == 0 {
            return Err(ConfigError(
                "queue_size, max_group and read_connections must be at least 1".into(),
            ));
        }
        if config.poll_interval.is_zero() {
            return Err(ConfigError("poll_interval must not be zero".into()));
        }
        if config.busy_timeout > Duration::from_secs(i32::MAX as u64 / 1000) {
            return Err(ConfigError("busy_timeout is too long".into()));
        }
        Ok(config)
    }
}
