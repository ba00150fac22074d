//! Appends whose reply is lost after the server committed them: a TCP proxy between the store and
//! PostgreSQL forwards the write, lets the server finish it, then cuts the connection without
//! relaying the reply.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_core::conformance::{Added, Counter, Negative};
use cqrs_core::{
    projection, EventStore, ExpectedVersion, Handle, RecordedEvent, Repository, StoreError,
    StreamId, StreamVersion,
};
use cqrs_postgres::PostgresStore;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{drop_schema, event, fresh_store, url};

/// A proxy to the test database that, once armed with a byte pattern, forwards the first client
/// message containing it, swallows the server's reply up to its `ReadyForQuery` (the statement
/// has run and, outside a transaction block, committed), and then closes the connection.
struct CuttingProxy {
    addr: SocketAddr,
    trap: Arc<Mutex<Option<Vec<u8>>>>,
    cuts: Arc<Mutex<usize>>,
}

impl CuttingProxy {
    async fn start() -> Self {
        let options = PgConnectOptions::from_str(&url()).unwrap();
        let target = format!("{}:{}", options.get_host(), options.get_port());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let trap: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let cuts: Arc<Mutex<usize>> = Arc::default();
        let (trap_, cuts_) = (trap.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&target).await else {
                    continue;
                };
                tokio::spawn(relay(client, server, trap_.clone(), cuts_.clone()));
            }
        });
        Self { addr, trap, cuts }
    }

    /// Cuts the reply of the next message that contains `pattern`.
    fn cut_reply_to(&self, pattern: &[u8]) {
        *self.trap.lock().unwrap() = Some(pattern.to_vec());
    }

    fn cuts(&self) -> usize {
        *self.cuts.lock().unwrap()
    }

    /// A store on `schema` whose connections go through the proxy.
    async fn store(&self, schema: &str) -> PostgresStore {
        let options = PgConnectOptions::from_str(&url())
            .unwrap()
            .host("127.0.0.1")
            .port(self.addr.port());
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .unwrap();
        PostgresStore::new(pool).with_schema(schema).unwrap()
    }
}

/// `ReadyForQuery` (`Z`, length 5, then the transaction status): the server has finished.
const READY: &[u8] = b"Z\0\0\0\x05";

async fn relay(
    client: TcpStream,
    server: TcpStream,
    trap: Arc<Mutex<Option<Vec<u8>>>>,
    cuts: Arc<Mutex<usize>>,
) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (finished, mut server_done) = tokio::sync::mpsc::channel::<()>(1);
    let cutting = cut.clone();
    let replies = tokio::spawn(async move {
        let mut buf = vec![0; 64 * 1024];
        let mut swallowed = Vec::new();
        loop {
            let n = match from_server.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if cutting.load(std::sync::atomic::Ordering::SeqCst) {
                swallowed.extend_from_slice(&buf[..n]);
                let len = swallowed.len();
                if len >= 6 && &swallowed[len - 6..len - 1] == READY {
                    let _ = finished.send(()).await;
                    return;
                }
                continue;
            }
            if to_client.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0; 64 * 1024];
    // The end of the previous chunk, so that a pattern split across two reads is found.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = match from_client.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let hit = {
            let mut trap = trap.lock().unwrap();
            let mut window = std::mem::take(&mut tail);
            window.extend_from_slice(&buf[..n]);
            let hit = trap
                .as_ref()
                .is_some_and(|p| window.windows(p.len()).any(|w| w == &p[..]));
            if hit {
                *trap = None;
            }
            tail = window[window.len().saturating_sub(64)..].to_vec();
            hit
        };
        if hit {
            // Before forwarding: not one byte of the reply may reach the client.
            cut.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        if to_server.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if hit {
            let finished = tokio::time::timeout(Duration::from_secs(20), server_done.recv()).await;
            assert!(
                matches!(finished, Ok(Some(()))),
                "the server did not finish the trapped statement"
            );
            *cuts.lock().unwrap() += 1;
            break;
        }
    }
    // Dropping every half closes both connections.
    replies.abort();
}

/// Two events per command, so that a second write of the command shows as four.
struct AddTwice(i64);

impl Handle<AddTwice> for Counter {
    type Error = Negative;
    fn handle(&self, command: &AddTwice) -> Result<Vec<Added>, Negative> {
        Ok(vec![Added { n: command.0 }, Added { n: command.0 }])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_whose_reply_is_lost_after_it_committed_is_outcome_unknown() {
    let direct = fresh_store().await;
    let proxy = CuttingProxy::start().await;
    let store = proxy.store(direct.schema()).await;
    let stream = StreamId::new("ledger", "lost");
    // Warm up (and prepare the statements) through the proxy.
    store
        .append(&stream, ExpectedVersion::NoStream, vec![event("Added", 1)])
        .await
        .unwrap();

    for (label, events) in [
        ("one event", vec![event("Added", 424_242_001)]),
        (
            "a batch",
            vec![event("Added", 424_242_002), event("Added", 424_242_003)],
        ),
    ] {
        let marker = events[0].payload.to_string();
        proxy.cut_reply_to(marker.as_bytes());
        let cuts = proxy.cuts();
        let before = direct.stream_version(&stream).await.unwrap();
        let error = store
            .append(&stream, ExpectedVersion::Exact(before), events.clone())
            .await
            .expect_err("the reply was cut");
        assert_eq!(proxy.cuts(), cuts + 1, "{label}: the proxy cut the append");
        assert!(
            matches!(error, StoreError::OutcomeUnknown(_)),
            "{label}: a lost reply must not claim that nothing was written: {error:?}"
        );
        assert!(!error.is_transient());
        let after = direct.stream_version(&stream).await.unwrap();
        assert_eq!(
            after.get(),
            before.get() + events.len() as u64,
            "{label}: the events committed"
        );
        // Re-sending the same batch settles it: the original result, nothing written twice.
        let resent = store
            .append(&stream, ExpectedVersion::Exact(before), events)
            .await
            .unwrap();
        assert_eq!(resent.stream_version, after);
        assert_eq!(direct.stream_version(&stream).await.unwrap(), after);
    }
    store.pool().close().await;
    drop_schema(&direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_reply_is_lost_is_stored_once() {
    let direct = fresh_store().await;
    let proxy = CuttingProxy::start().await;
    let store = proxy.store(direct.schema()).await;
    let repo = Repository::<Counter>::new(store.clone());
    repo.execute("c", &AddTwice(1)).await.unwrap();

    proxy.cut_reply_to(b"{\"n\":424242777}");
    let outcome = repo
        .execute("c", &AddTwice(424_242_777))
        .await
        .expect("the repository re-sends the same events and learns they are stored");
    assert_eq!(proxy.cuts(), 1, "the proxy cut the command's append");
    assert_eq!(outcome.stream_version, StreamVersion::new(4));
    assert_eq!(outcome.attempts, 1, "the command was not decided again");
    let stream = StreamId::new("counter", "c");
    assert_eq!(
        direct.stream_version(&stream).await.unwrap(),
        StreamVersion::new(4),
        "the command's 2 events are stored once, not twice"
    );
    assert_eq!(
        repo.load("c").await.unwrap().state.total,
        2 + 2 * 424_242_777
    );
    store.pool().close().await;
    drop_schema(&direct).await;
}

/// An inline projection: one row per event, in the append's transaction.
#[derive(Clone)]
struct Seen {
    table: String,
}

#[projection(name = "seen")]
impl Seen {
    async fn added(
        &mut self,
        _event: &Added,
        meta: &RecordedEvent,
        db: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {} (event_id) VALUES ($1)",
            self.table
        )))
        .bind(*meta.event_id.as_uuid())
        .execute(db)
        .await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reply_to_commit_is_outcome_unknown() {
    let direct = fresh_store().await;
    let table = format!("\"{}\".seen", direct.schema());
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (event_id uuid PRIMARY KEY)"
    )))
    .execute(direct.pool())
    .await
    .unwrap();
    let proxy = CuttingProxy::start().await;
    // With an inline projection, an append runs in a transaction the store commits.
    let store = proxy.store(direct.schema()).await.with_inline(Seen {
        table: table.clone(),
    });
    let stream = StreamId::new("counter", "inline");
    let events = vec![event("Added", 1), event("Added", 2)];

    proxy.cut_reply_to(b"COMMIT");
    let error = store
        .append(&stream, ExpectedVersion::NoStream, events.clone())
        .await
        .expect_err("the reply to COMMIT was cut");
    assert_eq!(proxy.cuts(), 1, "the proxy cut the commit");
    assert!(
        matches!(error, StoreError::OutcomeUnknown(_)),
        "a lost reply to COMMIT must not claim that nothing was written: {error:?}"
    );
    assert_eq!(
        direct.stream_version(&stream).await.unwrap(),
        StreamVersion::new(2),
        "the transaction committed"
    );
    let resent = store
        .append(&stream, ExpectedVersion::NoStream, events)
        .await
        .unwrap();
    assert_eq!(resent.stream_version, StreamVersion::new(2));
    let seen: i64 =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(direct.pool())
            .await
            .unwrap();
    assert_eq!(seen, 2, "projected once");
    store.pool().close().await;
    drop_schema(&direct).await;
}
