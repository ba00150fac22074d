//! `cqrs-redis` against the Redis at `REDIS_URL` (default `redis://127.0.0.1:6379/`), and for the
//! SIGKILL test an event store in the PostgreSQL at `DATABASE_URL`.
//!
//! Every test keeps its keys under its own prefix, `cqrs-redis-test:<uuid v7>:`, deletes them at
//! the end when it owns its backend, and a janitor deletes prefixes older than an hour (the
//! conformance macro gives no hook to clean up). Nothing flushes a whole database.

// Tests: failing assertions panic by design.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod kill;
mod race;
mod rebuild;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cqrs_core::prelude::*;
use cqrs_core::{event, projection, EventStore, EventTypes, InMemoryStore, NewEvent};
use cqrs_redis::{RedisBatch, RedisProjections};
use serde::{Deserialize, Serialize};

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

const PREFIX: &str = "cqrs-redis-test:";

/// A key prefix no other test uses.
pub fn fresh_prefix() -> String {
    format!("{PREFIX}{}:", uuid::Uuid::now_v7().simple())
}

/// A backend over `events` under a fresh prefix, with a short lease.
pub async fn backend_over(events: Arc<dyn EventStore>) -> RedisProjections {
    let backend = RedisProjections::connect(events, &redis_url())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "these tests need Redis at {} (set REDIS_URL): {e}",
                redis_url()
            )
        })
        .with_key_prefix(&fresh_prefix())
        .with_lease_ttl(Duration::from_millis(600));
    janitor(&backend).await;
    backend
}

/// Deletes every key under `prefix` in one script, so no reader (the runner included) ever sees
/// some of them gone and others not: what a `FLUSHDB` does to a database.
pub async fn delete_prefix(backend: &RedisProjections, prefix: &str) {
    let mut conn = backend.connection().await.unwrap();
    let _: i64 = redis::Script::new(
        r"local keys = redis.call('KEYS', ARGV[1] .. '*')
        for i = 1, #keys, 1000 do
            redis.call('DEL', unpack(keys, i, math.min(i + 999, #keys)))
        end
        return #keys",
    )
    .arg(prefix)
    .invoke_async(&mut conn)
    .await
    .unwrap();
}

/// Deletes test prefixes older than an hour, once per test binary.
async fn janitor(backend: &RedisProjections) {
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let mut conn = backend.connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{PREFIX}*"))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let old: std::collections::BTreeSet<String> = keys
            .iter()
            .filter_map(|key| {
                let id = key.strip_prefix(PREFIX)?.split(':').next()?;
                let (secs, _) = uuid::Uuid::parse_str(id).ok()?.get_timestamp()?.to_unix();
                (now.as_secs().saturating_sub(secs) > 3600).then(|| format!("{PREFIX}{id}:"))
            })
            .collect();
        for prefix in old {
            delete_prefix(backend, &prefix).await;
        }
    })
    .await;
}

#[event(name = "Deposited")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deposited {
    pub amount: i64,
}

/// Balance and event count per account, in hashes `<prefix>balances` and `<prefix>counts`.
#[derive(Debug, Clone, Default)]
pub struct Balances;

#[projection(name = "balances")]
impl Balances {
    async fn deposited(
        &mut self,
        event: &Deposited,
        meta: &RecordedEvent,
        batch: &mut RedisBatch,
    ) -> Result<(), std::convert::Infallible> {
        let (balances, counts) = (batch.key("balances"), batch.key("counts"));
        let account = meta.stream.id();
        batch
            .pipeline()
            .hincr(balances, account, event.amount)
            .ignore();
        batch.pipeline().hincr(counts, account, 1).ignore();
        Ok(())
    }
}

pub type Rows = BTreeMap<String, (i64, i64)>;

/// The read model in Redis: account -> (balance, events).
pub async fn read_model(backend: &RedisProjections) -> Rows {
    let mut conn = backend.connection().await.unwrap();
    let prefix = backend.key_prefix();
    let balances: BTreeMap<String, i64> = redis::cmd("HGETALL")
        .arg(format!("{prefix}balances"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let counts: BTreeMap<String, i64> = redis::cmd("HGETALL")
        .arg(format!("{prefix}counts"))
        .query_async(&mut conn)
        .await
        .unwrap();
    balances
        .into_iter()
        .map(|(account, balance)| {
            let count = counts.get(&account).copied().unwrap_or_default();
            (account, (balance, count))
        })
        .collect()
}

/// What a replay of the whole log gives, and the last position replayed.
pub async fn replay(events: &dyn EventStore) -> (Rows, Position) {
    let mut rows = Rows::new();
    let mut after = Position::START;
    loop {
        let batch = events
            .read_all(after, EventTypes::Only(&["Deposited"]), 1000)
            .await
            .unwrap();
        let Some(last) = batch.last() else {
            return (rows, after);
        };
        after = last.position;
        for e in &batch {
            let d = Deposited::decode(e.schema_version, &e.payload).unwrap();
            let row = rows.entry(e.stream.id().to_owned()).or_default();
            row.0 += d.amount;
            row.1 += 1;
        }
    }
}

/// Polls `name`'s checkpoint in Redis until it reaches `last`.
pub async fn wait_checkpoint(backend: &RedisProjections, name: &str, last: Position) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let at = backend.checkpoint(name).await.unwrap();
        if at >= Some(last) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "checkpoint stuck at {at:?}, not {last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A small xorshift generator; tests print its seed so a failure can be replayed.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn seeded(what: &str) -> Self {
        let seed = std::env::var("CQRS_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos() as u64
            })
            | 1;
        eprintln!("{what}: seed {seed} (CQRS_TEST_SEED={seed} replays it)");
        Self(seed)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Every public future of the crate can be spawned on a multi-threaded runtime.
#[allow(dead_code)]
fn public_futures_are_send(projections: RedisProjections, events: Arc<dyn EventStore>) {
    use cqrs_core::backend::ProjectionBackend;
    fn send<T: Send>(_: T) {}
    send(RedisProjections::connect(events, "redis://x/"));
    send(projections.checkpoint("p"));
    send(projections.skipped_events("p"));
    send(projections.connection());
    send(projections.record_failure("p", None));
    send(projections.last_failure("p"));
    let mut balances = Balances;
    send(ProjectionBackend::<Balances>::commit_batch(
        &projections,
        &mut balances,
        "p",
        None,
        &[],
        Position::START,
    ));
    send(ProjectionBackend::<Balances>::acquire_lease(
        &projections,
        "p",
    ));
}

mod conformance {
    use std::sync::Arc;

    use cqrs_core::InMemoryStore;
    use cqrs_redis::{RedisBatch, RedisProjections};

    /// A read store in Redis and an independent, in-memory event store.
    async fn fresh_backend() -> RedisProjections {
        super::backend_over(Arc::new(InMemoryStore::new())).await
    }

    cqrs_core::projection_conformance_tests!(fresh_backend, context = RedisBatch);
}

/// An in-memory event store with `n` deposits on `accounts` accounts.
pub async fn store_with_deposits(n: usize, accounts: usize) -> Arc<InMemoryStore> {
    let store = Arc::new(InMemoryStore::new());
    for i in 0..n {
        let account = StreamId::new("account", format!("a{}", i % accounts));
        store
            .append(
                &account,
                ExpectedVersion::Any,
                vec![NewEvent::from_event(&Deposited {
                    amount: 1 + i as i64,
                })
                .unwrap()],
            )
            .await
            .unwrap();
    }
    store
}
