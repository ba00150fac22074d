//! The command line's grammar.

use clap::{Parser, Subcommand};

/// Look inside a cqrs event store and steer its projections.
#[derive(Debug, Parser)]
#[command(name = "cqrs-admin", version)]
pub(crate) struct Cli {
    /// The event store: `postgres://user@host/database`, `sqlite:path/to/file.db`, or a path.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub(crate) url: Option<String>,
    /// The PostgreSQL schema of the store.
    #[arg(long, default_value = "public", global = true)]
    pub(crate) schema: String,
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Stream types with their stream and event counts.
    Types,
    /// Streams of one type, paged by id.
    Streams {
        /// The stream type.
        stream_type: String,
        /// List the streams after this id (the last id of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// How many streams to list.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One stream's events (envelope and payload), or its state for a registered aggregate.
    Show {
        /// The stream type.
        stream_type: String,
        /// The stream id.
        id: String,
        /// The first version to show.
        #[arg(long, default_value_t = 1)]
        from_version: u64,
        /// How many events to show.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Show the aggregate's state instead of the events (registered aggregates only).
        #[arg(long)]
        state: bool,
        /// The state as of this version.
        #[arg(long, requires = "state", conflicts_with = "as_of")]
        at_version: Option<u64>,
        /// The state as of this instant (RFC 3339, e.g. 2026-12-07T09:00:00Z).
        #[arg(long, requires = "state")]
        as_of: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Follow the log live, like `tail -f`.
    Follow {
        /// Only this stream (`type/id`).
        #[arg(long)]
        stream: Option<String>,
        /// Only streams of this type.
        #[arg(long, conflicts_with = "stream")]
        stream_type: Option<String>,
        /// Only events of these types (repeatable).
        #[arg(long = "event-type")]
        event_types: Vec<String>,
        /// Start at the beginning of the log instead of its end.
        #[arg(long)]
        from_start: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// The projections' status: checkpoint, lag, skips, the active runner.
    Projections,
    /// Rebuild a registered projection from the start of the log, with a progress bar (blue/green
    /// where it is set up so: beside the live version, then a switch).
    Rebuild {
        /// The projection's name.
        name: String,
        /// Blue/green: start the new version afresh instead of resuming a build that was
        /// interrupted or stopped at an event.
        #[arg(long)]
        fresh: bool,
    },
    /// Clear a registered projection's read model and checkpoint: it replays on its next run.
    Reset {
        /// The projection's name.
        name: String,
    },
    /// Skip the event a registered projection is stuck on (recorded with the reason).
    Skip {
        /// The projection's name (`<name>.next` for the build of a blue/green rebuild).
        name: String,
        /// The event's position (`tx.sequence`, as `projections` and `show` print it).
        #[arg(long)]
        position: cqrs_core::Position,
        /// Why, for the record.
        #[arg(long, default_value = "skipped with cqrs-admin")]
        reason: String,
    },
    /// What holds readers back: the oldest running transaction and the events waiting on it.
    Horizon,
    /// Apply the store's migrations (creating an SQLite file or a PostgreSQL schema).
    Migrate,
}
