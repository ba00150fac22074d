//! Read models in Redis, fed from any [`EventStore`](cqrs_core::EventStore), exactly once.
//!
//! [`RedisProjections`] is a [`ProjectionBackend`](cqrs_core::backend::ProjectionBackend): a
//! projection's handlers get a [`RedisBatch`] (`type Context = cqrs_redis::RedisBatch`) and queue
//! commands on its [`redis::Pipeline`]; the backend sends them and the projection's checkpoint
//! in one `MULTI`/`EXEC`.
//!
//! # What is always true
//!
//! - **The checkpoint lives with the read model**, under `<prefix>checkpoint:<name>` in the same
//!   Redis database, and moves in the same `MULTI`/`EXEC` as the batch's commands. Redis runs a
//!   transaction's commands all together: no reader and no other client sees half of a batch.
//! - **Exactly once, whatever the lease does.** Before queuing, the backend `WATCH`es the
//!   checkpoint key on a connection of its own and compares it with the checkpoint the runner
//!   read; a different value is [`StoreError::CheckpointConflict`](cqrs_core::StoreError) and
//!   nothing is sent. If anything changes the key between the `WATCH` and the `EXEC` (another
//!   runner's batch, a `FLUSHDB`, a restart), Redis refuses the `EXEC` and nothing of the batch
//!   is applied. An `EXEC` whose reply is lost leaves the outcome unknown; the runner retries
//!   from the checkpoint it had, and the compare tells it what happened.
//! - **One active runner per projection**: a lease key `<prefix>lease:<name>` taken with
//!   `SET NX PX` and a random token, renewed by a background task every third of its time to
//!   live by a script that compares the token. A runner whose process dies holds the lease until
//!   it expires ([`RedisProjections::with_lease_ttl`]); a standby then takes over from the
//!   checkpoint. When a lease expires during a batch (a paused process, a slow network), a
//!   second runner may start while the first still runs: whichever `EXEC`s second finds the
//!   checkpoint moved and commits nothing.
//! - **Losing the data rebuilds.** A Redis that loses its data (a restart without persistence,
//!   `FLUSHDB`, a failover to an empty replica) loses the checkpoint with the read model: the
//!   lease's renewal finds its key gone, the runner takes the lease again, reads no checkpoint
//!   and replays the log from the start. Persistence restores both from the same point in time
//!   (`MULTI`/`EXEC` is atomic in RDB snapshots and the AOF). So keep a projection's keys and its
//!   checkpoint in one database, and never let Redis evict them one by one
//!   (`maxmemory-policy noeviction`): an evicted read-model key beside a surviving checkpoint is
//!   a half state nothing can detect.
//! - **Redis has no rollback.** A command that fails when `EXEC` runs it (a `WRONGTYPE`) fails
//!   alone; the rest of the batch and the checkpoint are applied. The backend reports it as a
//!   storage error ([`StoreError::Backend`](cqrs_core::StoreError)), and the runner moves on
//!   from the checkpoint. Queue only commands that cannot fail on the keys they touch. A
//!   command Redis rejects when it is queued (a wrong number of arguments) aborts the whole
//!   `EXEC`: nothing applied, the runner retries.
//!
//! The event store is only read; it never holds a checkpoint of a Redis read model.

mod batch;
mod error;
mod keys;
mod lease;
mod projections;

pub use batch::RedisBatch;
pub use projections::{RedisProjections, DEFAULT_LEASE_TTL};
