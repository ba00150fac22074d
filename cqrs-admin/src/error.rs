//! What can go wrong, what the process exits with, and what the operator should do about it.

use cqrs_core::StoreError;

/// The exit codes of `cqrs-admin`, documented in the crate docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Exit {
    /// 0: done.
    Ok = 0,
    /// 1: the store failed (a lost connection, a query error): try again, or look at the cause.
    Failed = 1,
    /// 2: the command line is wrong (clap's usage errors).
    Usage = 2,
    /// 3: what was named does not exist (a projection or aggregate not registered, an empty
    /// stream).
    NotFound = 3,
    /// 4: the database cannot be reached (an unsupported URL, no such file, a refused
    /// connection).
    Unreachable = 4,
    /// 5: the database has no event store tables yet (or other ones): run `migrate`.
    NotMigrated = 5,
    /// 6: refused to change anything: a runner holds the projection, or the checkpoint is not
    /// where the command expected it.
    Refused = 6,
    /// 130: interrupted (Ctrl-C); what was committed before stays.
    Interrupted = 130,
}

/// A failed admin command: the message tells the operator what to do, the [`Exit`] tells a
/// script what happened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The URL names no backend this tool opens.
    #[error("unsupported database URL `{url}`: cqrs-admin opens event stores on PostgreSQL (`postgres://user@host/database`) and SQLite (`sqlite:path/to/file.db`, or a file path)")]
    UnsupportedUrl {
        /// The URL as given (a password in it is masked).
        url: String,
    },
    /// No database URL was given.
    #[error("no database: pass `--url postgres://…` or `--url sqlite:path`, or set DATABASE_URL")]
    NoUrl,
    /// The SQLite file does not exist (only `migrate` creates one).
    #[error(
        "no SQLite database at `{path}`: check the path, or create it with `cqrs-admin migrate`"
    )]
    NoSuchFile {
        /// The path.
        path: String,
    },
    /// The database refused or lost the connection.
    #[error("cannot reach the database: {0}")]
    Unreachable(#[source] StoreError),
    /// The schema has no (or other) event store tables.
    #[error("{message}: run `cqrs-admin migrate` with the same --url and --schema")]
    NotMigrated {
        /// What the store reported.
        message: String,
    },
    /// A projection name that is not registered.
    #[error("unknown projection `{name}`; registered: {known}")]
    UnknownProjection {
        /// The name given.
        name: String,
        /// The registered names, or a hint when there are none.
        known: String,
    },
    /// An aggregate (stream type) that is not registered.
    #[error("no aggregate registered for stream type `{stream_type}`; registered: {known}")]
    UnknownAggregate {
        /// The stream type given.
        stream_type: String,
        /// The registered types, or a hint when there are none.
        known: String,
    },
    /// The stream has no events (at the versions asked for).
    #[error("stream `{stream}` has no events{detail}")]
    EmptyStream {
        /// The stream.
        stream: String,
        /// Which part was asked for.
        detail: String,
    },
    /// A runner holds the projection's lease.
    #[error("projection `{name}` is being run by another process{holder}: stop that runner first")]
    LeaseHeld {
        /// The projection.
        name: String,
        /// Who holds it, where known.
        holder: String,
    },
    /// The command refused to act (for example a skip of an event that is not the next one).
    #[error("{0}")]
    Refused(String),
    /// Interrupted by Ctrl-C.
    #[error("interrupted: {0}")]
    Interrupted(String),
    /// A projection failed on an event during a rebuild; everything before it is committed.
    #[error("{0}; fix the projection, or skip the event with `cqrs-admin skip <projection> --position <position>`")]
    Run(#[source] cqrs_core::subscription::RunError),
    /// A storage error.
    #[error(transparent)]
    Store(StoreError),
    /// Writing the output failed.
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

impl AdminError {
    /// The exit code for this error.
    pub fn exit(&self) -> Exit {
        match self {
            Self::UnsupportedUrl { .. } | Self::NoUrl | Self::NoSuchFile { .. } => {
                Exit::Unreachable
            }
            Self::Unreachable(_) => Exit::Unreachable,
            Self::NotMigrated { .. } => Exit::NotMigrated,
            Self::UnknownProjection { .. }
            | Self::UnknownAggregate { .. }
            | Self::EmptyStream { .. } => Exit::NotFound,
            Self::LeaseHeld { .. } | Self::Refused(_) => Exit::Refused,
            Self::Interrupted(_) => Exit::Interrupted,
            Self::Run(_) | Self::Store(_) | Self::Output(_) => Exit::Failed,
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(error: StoreError) -> Self {
        if let StoreError::Backend(source) = &error {
            if source.is::<cqrs_postgres::SchemaMismatch>() {
                return Self::NotMigrated {
                    message: source.to_string(),
                };
            }
        }
        match error {
            StoreError::Connection(_) => Self::Unreachable(error),
            StoreError::CheckpointConflict { name, .. } => Self::Refused(format!(
                "the checkpoint of `{name}` moved meanwhile (a runner is active): try again"
            )),
            other => Self::Store(other),
        }
    }
}

impl From<cqrs_core::subscription::RunError> for AdminError {
    fn from(error: cqrs_core::subscription::RunError) -> Self {
        use cqrs_core::subscription::RunError;
        match error {
            RunError::LeaseHeld { name } => Self::LeaseHeld {
                name,
                holder: String::new(),
            },
            RunError::Store(store) => store.into(),
            other => Self::Run(other),
        }
    }
}
