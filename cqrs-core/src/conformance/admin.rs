//! The cases of [`crate::admin_conformance_tests!`]: every [`StoreAdmin`] lists the same streams,
//! in the same order, with the same counts, and rejects the same arguments.

use serde_json::json;

use super::{event, Backend};
use crate::admin::StoreAdmin;
use crate::event::NewEvent;
use crate::store::StoreError;
use crate::stream::{ExpectedVersion, Position, StreamId};

/// Generates one `#[tokio::test]` per [`StoreAdmin`] conformance case, each with a fresh store from
/// `$factory` (an `async fn() -> impl Backend + StoreAdmin`), like
/// [`crate::backend_conformance_tests!`].
#[macro_export]
macro_rules! admin_conformance_tests {
    ($factory:path) => {
        $crate::backend_conformance_tests!(@cases $factory;
            admin_lists_stream_types_and_pages_streams,
            admin_lists_checkpoints_skips_leases_and_horizon,
        );
    };
}

fn events(n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| event("Numbered", json!({ "i": i })))
        .collect()
}

/// Stream types with their counts; streams of one type paged by id in byte order, with their
/// versions; the cursor and the limit bounds; invalid arguments rejected as `InvalidId`.
pub async fn admin_lists_stream_types_and_pages_streams(store: impl Backend + StoreAdmin) {
    assert!(store.stream_types().await.expect("types").is_empty());
    // Ids whose byte order differs from a natural-language collation ("B" < "a" < "b"), and
    // LIKE wildcards that must not match anything.
    let ids = ["b", "B", "a%", "a_", "a"];
    for (i, id) in ids.iter().enumerate() {
        store
            .append(
                &StreamId::new("account", *id),
                ExpectedVersion::NoStream,
                events(i + 1),
            )
            .await
            .expect("append");
    }
    store
        .append(
            &StreamId::new("order", "o-1"),
            ExpectedVersion::NoStream,
            events(2),
        )
        .await
        .expect("append");

    let types = store.stream_types().await.expect("types");
    let summary: Vec<(&str, u64, u64)> = types
        .iter()
        .map(|t| (t.stream_type.as_str(), t.streams, t.events))
        .collect();
    assert_eq!(summary, [("account", 5, 15), ("order", 1, 2)]);

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .list_streams("account", after.as_deref(), 2)
            .await
            .expect("page");
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some(last.stream.id().to_owned());
        for stream in &page {
            assert_eq!(stream.stream.stream_type(), "account");
            seen.push((stream.stream.id().to_owned(), stream.version.get()));
        }
    }
    assert_eq!(
        seen,
        [
            ("B".to_owned(), 2),
            ("a".to_owned(), 5),
            ("a%".to_owned(), 3),
            ("a_".to_owned(), 4),
            ("b".to_owned(), 1),
        ]
    );
    let from_start = store
        .list_streams("account", Some(""), 0)
        .await
        .expect("list");
    assert_eq!(from_start.len(), 1, "a limit of 0 lists one stream");
    assert_eq!(from_start[0].stream.id(), "B");
    assert!(store
        .list_streams("nothing", None, 10)
        .await
        .expect("list")
        .is_empty());
    assert!(matches!(
        store.list_streams("", None, 10).await,
        Err(StoreError::InvalidId(_))
    ));
    assert!(matches!(
        store.list_streams("account", Some("nul\0"), 10).await,
        Err(StoreError::InvalidId(_))
    ));
}

/// Checkpoints listed by name with their positions; no lease holder and no skips where no
/// runner ran; nothing held back once appends returned.
pub async fn admin_lists_checkpoints_skips_leases_and_horizon(store: impl Backend + StoreAdmin) {
    assert!(store.checkpoints().await.expect("checkpoints").is_empty());
    let appended = store
        .append(
            &StreamId::new("account", "a"),
            ExpectedVersion::NoStream,
            events(3),
        )
        .await
        .expect("append");
    store
        .save_checkpoint("zeta", None, appended.position)
        .await
        .expect("save");
    store
        .save_checkpoint("alpha", None, Position::new(0, 0))
        .await
        .expect("save");
    let checkpoints = store.checkpoints().await.expect("checkpoints");
    let listed: Vec<(&str, Position)> = checkpoints
        .iter()
        .map(|c| (c.name.as_str(), c.position))
        .collect();
    assert_eq!(
        listed,
        [("alpha", Position::new(0, 0)), ("zeta", appended.position)]
    );
    assert_eq!(store.lease_holder("zeta").await.expect("lease"), None);
    assert!(store.skipped("zeta").await.expect("skips").is_empty());
    assert_eq!(store.last_failure("zeta").await.expect("failure"), None);
    assert!(matches!(
        store.last_failure("").await,
        Err(StoreError::InvalidId(_))
    ));
    assert!(matches!(
        store.lease_holder("").await,
        Err(StoreError::InvalidId(_))
    ));
    let horizon = store.horizon_report().await.expect("horizon");
    assert_eq!(horizon.waiting_events, 0);
    assert!(!horizon.description.is_empty());
}
