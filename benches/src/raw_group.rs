//! The least code that commits concurrent commands in groups: W1's raw limit for group commit.
//! The state is in memory (as for the raw one-INSERT contenders), every client queues its event,
//! and one writer task on a connection of its own takes what is queued, inserts it as one
//! multi-row statement into the raw table, and answers. Before taking a group it yields to the
//! runtime while the queue keeps growing (as our group committer's leader does), so that the
//! clients it just answered can queue their next commands. No version guard beyond the unique
//! index, no idempotency, no notification, no reads: what group commit costs with nothing else.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cqrs_core::EventSet;
use sqlx::postgres::PgPool;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::domain::Cmd;
use crate::w1::{Accounts, Contender, Place};
use crate::{db, BenchError};

/// The most yields before the writer takes its group (the bound our group committer uses).
const JOIN_YIELDS: usize = 4;

/// One queued command's event, and where its client waits.
struct Queued {
    id: String,
    version: i64,
    event_id: Uuid,
    event_type: &'static str,
    schema_version: i32,
    payload: String,
    reply: oneshot::Sender<Result<(), String>>,
}

#[derive(Default)]
struct Queue {
    queued: Mutex<Vec<Queued>>,
    /// Wakes the writer when it waits on an empty queue.
    more: Notify,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Vec<Queued>> {
        self.queued.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Raw group commit: see the module docs.
pub struct RawGroup {
    place: Place,
    state: Accounts,
    queue: Arc<Queue>,
    writer: JoinHandle<()>,
}

impl RawGroup {
    /// A fresh schema with the raw table, and the writer task.
    pub async fn new(url: &str, name: &str) -> Result<Self, BenchError> {
        let schema = db::schema_name(name);
        let pool = db::pool(url).await?;
        let table = db::raw_table(&pool, &schema).await?;
        let insert = format!(
            "INSERT INTO {table} (stream_type, stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
             SELECT 'account', u.sid, u.v, u.id, u.t, u.sv, u.p::json, '{{}}'::json
             FROM UNNEST($1::text[], $2::bigint[], $3::uuid[], $4::text[], $5::int[], $6::text[])
                 AS u(sid, v, id, t, sv, p)"
        );
        let queue = Arc::new(Queue::default());
        let writer = tokio::spawn(write(pool.clone(), insert, Arc::clone(&queue)));
        Ok(Self {
            place: Place::new(pool, schema),
            state: Accounts::default(),
            queue,
            writer,
        })
    }
}

/// The writer: takes what is queued, inserts it in one statement, answers every command of the
/// group (all with the statement's outcome); waits while nothing is queued.
async fn write(pool: PgPool, insert: String, queue: Arc<Queue>) {
    let mut conn = None;
    let mut last_group = 0;
    loop {
        if last_group > 1 {
            let mut queued = queue.lock().len();
            for _ in 0..JOIN_YIELDS {
                tokio::task::yield_now().await;
                let now = queue.lock().len();
                if now <= queued {
                    break;
                }
                queued = now;
            }
        }
        let group = std::mem::take(&mut *queue.lock());
        if group.is_empty() {
            last_group = 0;
            queue.more.notified().await;
            continue;
        }
        let column = |f: fn(&Queued) -> String| group.iter().map(f).collect::<Vec<_>>();
        if conn.is_none() {
            conn = pool.acquire().await.ok();
        }
        let Some(conn) = conn.as_mut() else {
            for q in group {
                let _ = q
                    .reply
                    .send(Err("the raw group writer has no connection".to_owned()));
            }
            continue;
        };
        let result = sqlx::query(sqlx::AssertSqlSafe(&*insert))
            .bind(column(|q| q.id.clone()))
            .bind(group.iter().map(|q| q.version).collect::<Vec<_>>())
            .bind(group.iter().map(|q| q.event_id).collect::<Vec<_>>())
            .bind(column(|q| q.event_type.to_owned()))
            .bind(group.iter().map(|q| q.schema_version).collect::<Vec<_>>())
            .bind(column(|q| q.payload.clone()))
            .execute(&mut **conn)
            .await
            .map(drop)
            .map_err(|e| e.to_string());
        last_group = group.len();
        for q in group {
            let _ = q.reply.send(result.clone());
        }
    }
}

impl Drop for RawGroup {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

impl Contender for RawGroup {
    async fn execute(&self, id: &str, cmd: &Cmd) -> Result<(), BenchError> {
        let version = self.state.decide(id, cmd)?;
        let event = cmd.event();
        let (reply, result) = oneshot::channel();
        self.queue.lock().push(Queued {
            id: id.to_owned(),
            version,
            event_id: Uuid::now_v7(),
            event_type: event.event_type(),
            schema_version: i32::try_from(event.schema_version())?,
            payload: event.encode()?.to_string(),
            reply,
        });
        self.queue.more.notify_one();
        result.await.map_err(|_| "the raw group writer stopped")??;
        self.state.stored(id, version)
    }

    async fn stored_events(&self) -> Result<i64, BenchError> {
        self.place.stored_events().await
    }

    async fn finish(mut self) -> Result<(), BenchError> {
        // The writer first: closing the pool waits for its connection.
        self.writer.abort();
        let _ = (&mut self.writer).await;
        let place = Place::new(self.place.pool.clone(), self.place.schema.clone());
        drop(self);
        place.finish().await
    }
}
