//! The projection backend: batches and their checkpoint in one `MULTI`/`EXEC`, guarded by a
//! `WATCH` on the checkpoint key.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cqrs_core::backend::{apply_batch, BatchError, Lease, ProjectionBackend, SkipTarget};
use cqrs_core::subscription::{FailureCause, ProjectionFailure, RecordedFailure, SkippedEvent};
use cqrs_core::{EventStore, Position, Projection, RecordedEvent, StoreError};
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

use crate::error::{is_connection_error, store_error};
use crate::keys::{self, Keys};
use crate::{lease, RedisBatch};

/// Default for [`RedisProjections::with_lease_ttl`].
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

/// How long one command (an `EXEC` included) may take before its connection counts as lost.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`ProjectionBackend`] for read models in Redis (`type Context = RedisBatch`), fed from any
/// [`EventStore`]: see the [crate documentation](crate) for what it guarantees.
///
/// ```no_run
/// use std::sync::Arc;
/// use cqrs_core::prelude::*;
/// use cqrs_core::projection;
/// use cqrs_core::subscription::ProjectionRunner;
/// use cqrs_redis::{RedisBatch, RedisProjections};
/// use serde::{Deserialize, Serialize};
///
/// #[event(name = "MoneyDeposited")]
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// pub struct MoneyDeposited { pub amount: i64 }
///
/// /// Balance per account, in hash `<prefix>balances`.
/// #[derive(Default)]
/// pub struct Balances;
///
/// #[projection(name = "balances")]
/// impl Balances {
///     async fn deposited(
///         &mut self,
///         event: &MoneyDeposited,
///         meta: &RecordedEvent,
///         batch: &mut RedisBatch,
///     ) -> Result<(), std::convert::Infallible> {
///         let key = batch.key("balances");
///         batch.pipeline().hincr(key, meta.stream.id(), event.amount).ignore();
///         Ok(())
///     }
/// }
///
/// # async fn demo(events: Arc<dyn cqrs_core::EventStore>) -> Result<(), cqrs_core::StoreError> {
/// let redis = RedisProjections::connect(events, "redis://127.0.0.1:6379/")
///     .await?
///     .with_key_prefix("bank:");
/// let handle = ProjectionRunner::new(Balances, redis).spawn();
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisProjections {
    events: Arc<dyn EventStore>,
    connections: Arc<Connections>,
    keys: Keys,
    lease_ttl: Duration,
}

impl std::fmt::Debug for RedisProjections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisProjections")
            .field("prefix", &self.keys.prefix)
            .field("lease_ttl", &self.lease_ttl)
            .finish_non_exhaustive()
    }
}

/// The backend's connections: one shared (checkpoint reads, leases, skips), reconnected after it
/// is lost, and one for batches alone, because a `WATCH` belongs to its connection: a command of
/// anyone else on it would run inside the watched transaction.
struct Connections {
    client: redis::Client,
    shared: Mutex<Option<MultiplexedConnection>>,
    batch: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl Connections {
    async fn connect(&self) -> Result<MultiplexedConnection, StoreError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(store_error)
    }

    async fn shared(&self) -> Result<MultiplexedConnection, StoreError> {
        let kept = self
            .shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(conn) = kept {
            return Ok(conn);
        }
        let conn = self.connect().await?;
        *self.shared.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
        Ok(conn)
    }

    /// Maps an error of the shared connection; a lost connection is replaced on next use.
    fn shared_failed(&self, error: redis::RedisError) -> StoreError {
        if is_connection_error(&error) {
            *self.shared.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
        store_error(error)
    }
}

impl RedisProjections {
    /// Projections reading `events` (only read) with their read models, checkpoints, skips and
    /// leases in the Redis at `url` (`redis://host:port/db`). Connects once to check the URL.
    pub async fn connect(events: Arc<dyn EventStore>, url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(store_error)?;
        let connections = Arc::new(Connections {
            client,
            shared: Mutex::new(None),
            batch: tokio::sync::Mutex::new(None),
        });
        connections.shared().await?;
        Ok(Self {
            events,
            connections,
            keys: Keys {
                prefix: String::new(),
            },
            lease_ttl: DEFAULT_LEASE_TTL,
        })
    }

    /// Puts every key of this backend (checkpoints, leases, skips) under `prefix`, e.g.
    /// `"shop:"`; handlers get it from [`RedisBatch::prefix`]. Default: none.
    pub fn with_key_prefix(mut self, prefix: &str) -> Self {
        self.keys.prefix = prefix.to_owned();
        self
    }

    /// How long a lease outlives its holder (default [`DEFAULT_LEASE_TTL`]): a standby takes
    /// over at most this long after the active runner's process dies. A holder renews it every
    /// third of it, and gives it up when it could not renew for a whole time to live.
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl.max(Duration::from_millis(30));
        self
    }

    /// The key prefix.
    pub fn key_prefix(&self) -> &str {
        &self.keys.prefix
    }

    /// The key holding projection `name`'s checkpoint.
    pub fn checkpoint_key(&self, name: &str) -> String {
        self.keys.checkpoint(name)
    }

    /// The event store the projections read.
    pub fn event_source(&self) -> &Arc<dyn EventStore> {
        &self.events
    }

    /// A connection to the Redis holding the read models, for queries (shared with the backend's
    /// own reads; do not `WATCH` on it).
    pub async fn connection(&self) -> Result<MultiplexedConnection, StoreError> {
        self.connections.shared().await
    }

    /// Projection `name`'s checkpoint.
    pub async fn checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        cqrs_core::backend::validate_checkpoint_name(name)?;
        let mut conn = self.connections.shared().await?;
        let key = self.keys.checkpoint(name);
        let value: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.connections.shared_failed(e))?;
        value.map(|v| keys::decode(&key, &v)).transpose()
    }

    /// Every event projection `name` skipped on request, oldest first.
    pub async fn skipped_events(&self, name: &str) -> Result<Vec<SkippedEvent>, StoreError> {
        cqrs_core::backend::validate_checkpoint_name(name)?;
        let mut conn = self.connections.shared().await?;
        let key = self.keys.skips(name);
        let entries: Vec<String> = redis::cmd("LRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.connections.shared_failed(e))?;
        entries
            .iter()
            .map(|entry| decode_skip(name, &key, entry))
            .collect()
    }

    /// Projection `name`'s last recorded failure (a JSON document at `<prefix>failure:<name>`),
    /// if it has one.
    pub async fn last_failure(&self, name: &str) -> Result<Option<RecordedFailure>, StoreError> {
        cqrs_core::backend::validate_checkpoint_name(name)?;
        let mut conn = self.connections.shared().await?;
        let key = self.keys.failure(name);
        let value: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.connections.shared_failed(e))?;
        value
            .map(|value| decode_failure(name, &key, &value))
            .transpose()
    }

    /// Records `failure` as projection `name`'s last failure, or clears it (`None`).
    pub async fn record_failure(
        &self,
        name: &str,
        failure: Option<&ProjectionFailure>,
    ) -> Result<(), StoreError> {
        cqrs_core::backend::validate_checkpoint_name(name)?;
        let mut conn = self.connections.shared().await?;
        let key = self.keys.failure(name);
        let command = match failure {
            Some(failure) => {
                let value = serde_json::json!({
                    "cause": failure.cause.name(),
                    "tx": failure.position.map(|p| p.tx),
                    "sequence": failure.position.map(|p| p.sequence),
                    "event_type": failure.event_type,
                    "message": failure.message,
                    "failed_at": chrono::Utc::now().timestamp_micros(),
                });
                let mut command = redis::cmd("SET");
                command.arg(&key).arg(value.to_string());
                command
            }
            None => {
                let mut command = redis::cmd("DEL");
                command.arg(&key);
                command
            }
        };
        command
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.connections.shared_failed(e))
    }

    /// Runs `queue` on a `MULTI`/`EXEC` that also moves checkpoint `name` from `expected` to
    /// `to`, on the batch connection with the checkpoint key watched.
    async fn transact<F, Fut, E>(
        &self,
        name: &str,
        expected: Option<Position>,
        to: Position,
        queue: F,
    ) -> Result<Result<(), E>, StoreError>
    where
        F: FnOnce(RedisBatch) -> Fut,
        Fut: std::future::Future<Output = (RedisBatch, Result<(), E>)>,
    {
        cqrs_core::backend::validate_checkpoint_name(name)?;
        let mut slot = self.connections.batch.lock().await;
        // Taken out while in use: a batch cancelled mid-way drops the connection with its
        // `WATCH`, instead of leaving it armed for the next batch.
        let mut conn = match slot.take() {
            Some(conn) => conn,
            None => self.connections.connect().await?,
        };
        let outcome = self.watched(&mut conn, name, expected, to, queue).await;
        // Kept only where no `WATCH` can be left armed on it: after an `EXEC` or an `UNWATCH`.
        // Any other failure drops it, and the next batch connects afresh.
        if matches!(outcome, Ok(_) | Err(StoreError::CheckpointConflict { .. })) {
            *slot = Some(conn);
        }
        outcome
    }

    async fn watched<F, Fut, E>(
        &self,
        conn: &mut MultiplexedConnection,
        name: &str,
        expected: Option<Position>,
        to: Position,
        queue: F,
    ) -> Result<Result<(), E>, StoreError>
    where
        F: FnOnce(RedisBatch) -> Fut,
        Fut: std::future::Future<Output = (RedisBatch, Result<(), E>)>,
    {
        let key = self.keys.checkpoint(name);
        redis::cmd("WATCH")
            .arg(&key)
            .exec_async(conn)
            .await
            .map_err(store_error)?;
        let actual = self.read_watched(conn, &key).await?;
        if actual != expected {
            unwatch(conn).await?;
            return Err(StoreError::CheckpointConflict {
                name: name.to_owned(),
                expected,
                actual,
            });
        }
        let mut batch = RedisBatch::new(&self.keys.prefix);
        batch
            .pipeline()
            .cmd("SET")
            .arg(&key)
            .arg(keys::encode(to))
            .ignore();
        let (batch, queued) = queue(batch).await;
        if queued.is_err() {
            unwatch(conn).await?;
            return Ok(queued);
        }
        let executed: Option<redis::Value> = batch
            .into_pipeline()
            .query_async(conn)
            .await
            .map_err(store_error)?;
        if executed.is_none() {
            // The watched checkpoint changed before EXEC: nothing was applied.
            let actual = self.read_watched(conn, &key).await?;
            return Err(StoreError::CheckpointConflict {
                name: name.to_owned(),
                expected,
                actual,
            });
        }
        Ok(Ok(()))
    }

    async fn read_watched(
        &self,
        conn: &mut MultiplexedConnection,
        key: &str,
    ) -> Result<Option<Position>, StoreError> {
        let value: Option<String> = redis::cmd("GET")
            .arg(key)
            .query_async(conn)
            .await
            .map_err(store_error)?;
        value.map(|v| keys::decode(key, &v)).transpose()
    }
}

async fn unwatch(conn: &mut MultiplexedConnection) -> Result<(), StoreError> {
    redis::cmd("UNWATCH")
        .exec_async(conn)
        .await
        .map_err(store_error)
}

fn decode_failure(name: &str, key: &str, value: &str) -> Result<RecordedFailure, StoreError> {
    let bad = || StoreError::Backend(format!("key `{key}` holds `{value}`, not a failure").into());
    let json: serde_json::Value = serde_json::from_str(value).map_err(|_| bad())?;
    let text = |field: &str| json.get(field).and_then(serde_json::Value::as_str);
    let number = |field: &str| json.get(field).and_then(serde_json::Value::as_u64);
    let cause = text("cause")
        .and_then(FailureCause::from_name)
        .ok_or_else(bad)?;
    let position = match (number("tx"), number("sequence")) {
        (Some(tx), Some(sequence)) => Some(Position::new(tx, sequence)),
        _ => None,
    };
    let failed_at = json
        .get("failed_at")
        .and_then(serde_json::Value::as_i64)
        .and_then(chrono::DateTime::<chrono::Utc>::from_timestamp_micros)
        .ok_or_else(bad)?;
    let failure = ProjectionFailure::new(
        cause,
        position,
        text("event_type").map(str::to_owned),
        text("message").ok_or_else(bad)?.to_owned(),
    );
    Ok(RecordedFailure::new(name.to_owned(), failure, failed_at))
}

fn decode_skip(name: &str, key: &str, entry: &str) -> Result<SkippedEvent, StoreError> {
    let bad = || StoreError::Backend(format!("list `{key}` holds `{entry}`, not a skip").into());
    let value: serde_json::Value = serde_json::from_str(entry).map_err(|_| bad())?;
    let number = |field: &str| value.get(field).and_then(serde_json::Value::as_u64);
    let position = Position::new(
        number("tx").ok_or_else(bad)?,
        number("sequence").ok_or_else(bad)?,
    );
    Ok(SkippedEvent {
        projection: name.to_owned(),
        position,
        event_type: value
            .get("event_type")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned),
        reason: value
            .get("reason")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(bad)?
            .to_owned(),
    })
}

impl<P> ProjectionBackend<P> for RedisProjections
where
    P: Projection<Context = RedisBatch>,
{
    fn events(&self) -> &dyn EventStore {
        &*self.events
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        self.checkpoint(name).await
    }

    async fn commit_batch(
        &self,
        projection: &mut P,
        name: &str,
        expected: Option<Position>,
        events: &[RecordedEvent],
        to: Position,
    ) -> Result<(), BatchError> {
        let outcome = self
            .transact(name, expected, to, |mut batch| async {
                let applied = apply_batch(projection, events, &mut batch).await;
                (batch, applied)
            })
            .await;
        match outcome {
            Ok(Ok(())) => Ok(()),
            // Nothing was sent: the whole batch is undone (and `apply_batch` discarded).
            Ok(Err((index, error))) => Err(BatchError::Projection {
                index,
                committed: 0,
                error,
            }),
            Err(error) => {
                projection.discard();
                Err(BatchError::Store(error))
            }
        }
    }

    async fn reset_checkpoint(&self, name: &str) -> Result<(), StoreError> {
        cqrs_core::backend::validate_checkpoint_name(name)?;
        let mut conn = self.connections.shared().await?;
        redis::cmd("DEL")
            .arg(self.keys.checkpoint(name))
            .exec_async(&mut conn)
            .await
            .map_err(|e| self.connections.shared_failed(e))
    }

    async fn record_skip(
        &self,
        name: &str,
        expected: Option<Position>,
        event: &SkipTarget,
        reason: &str,
    ) -> Result<(), StoreError> {
        let entry = serde_json::json!({
            "tx": event.position.tx,
            "sequence": event.position.sequence,
            "event_id": event.event_id.map(|id| id.to_string()),
            "event_type": event.event_type,
            "reason": reason,
        })
        .to_string();
        let skips = self.keys.skips(name);
        self.transact(name, expected, event.position, |mut batch| async move {
            batch.pipeline().rpush(skips, entry).ignore();
            (batch, Ok::<(), std::convert::Infallible>(()))
        })
        .await
        .map(|_| ())
    }

    async fn skipped_events(&self, name: &str) -> Result<Vec<SkippedEvent>, StoreError> {
        RedisProjections::skipped_events(self, name).await
    }

    async fn record_failure(
        &self,
        name: &str,
        failure: Option<&ProjectionFailure>,
    ) -> Result<(), StoreError> {
        RedisProjections::record_failure(self, name, failure).await
    }

    async fn last_failure(&self, name: &str) -> Result<Option<RecordedFailure>, StoreError> {
        RedisProjections::last_failure(self, name).await
    }

    async fn acquire_lease(&self, name: &str) -> Result<Option<Box<dyn Lease>>, StoreError> {
        cqrs_core::backend::validate_checkpoint_name(name)?;
        let conn = self.connections.shared().await?;
        lease::acquire(conn, self.keys.lease(name), self.lease_ttl)
            .await
            .map_err(|e| self.connections.shared_failed(e))
    }

    async fn wait_for_append(&self, after: Position, timeout: Duration) {
        self.events.wait_for_append(after, timeout).await;
    }
}
