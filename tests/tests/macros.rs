//! What the macros generate, exercised at run time.

use cqrs_core::prelude::*;
use cqrs_core::{event, projection, DecodeError, EventSet, ProjectionError, RawJson};
use serde::{Deserialize, Serialize};
use serde_json::json;

mod v {
    use super::*;

    #[event(name = "MoneyDeposited", version = 1)]
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct DepositedV1 {
        pub amount: i64,
    }

    #[event(name = "MoneyDeposited", version = 2, upcast_from = DepositedV1)]
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct DepositedV2 {
        pub amount: i64,
        pub memo: String,
    }

    impl From<DepositedV1> for DepositedV2 {
        fn from(v1: DepositedV1) -> Self {
            DepositedV2 {
                amount: v1.amount,
                memo: "(none)".into(),
            }
        }
    }

    /// Version 3 stores cents.
    #[event(name = "MoneyDeposited", version = 3, upcast_from = DepositedV2)]
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Deposited {
        pub cents: i64,
        pub memo: String,
    }

    impl From<DepositedV2> for Deposited {
        fn from(v2: DepositedV2) -> Self {
            Deposited {
                cents: v2.amount * 100,
                memo: v2.memo,
            }
        }
    }
}
use v::Deposited;

#[test]
fn three_version_chain_decodes_every_stored_version() {
    assert_eq!(Deposited::NAME, "MoneyDeposited");
    assert_eq!(Deposited::VERSION, 3);
    let v1 = Deposited::decode(1, &RawJson::from(json!({ "amount": 5 }))).unwrap();
    assert_eq!(
        v1,
        Deposited {
            cents: 500,
            memo: "(none)".into()
        }
    );
    let v2 = Deposited::decode(2, &RawJson::from(json!({ "amount": 7, "memo": "rent" }))).unwrap();
    assert_eq!(
        v2,
        Deposited {
            cents: 700,
            memo: "rent".into()
        }
    );
    let v3 = Deposited::decode(3, &RawJson::from(json!({ "cents": 9, "memo": "x" }))).unwrap();
    assert_eq!(v3.cents, 9);
}

#[test]
fn versions_without_a_path_and_bad_payloads_are_typed_errors() {
    match Deposited::decode(4, &RawJson::from(json!({}))) {
        Err(DecodeError::UnsupportedVersion {
            version: 4,
            current: 3,
            event_type,
        }) => assert_eq!(event_type, "MoneyDeposited"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        Deposited::decode(0, &RawJson::from(json!({ "amount": 1 }))),
        Err(DecodeError::UnsupportedVersion { version: 0, .. })
    ));
    match Deposited::decode(1, &RawJson::from(json!({ "amount": "five" }))) {
        Err(DecodeError::Payload { version: 1, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        Deposited::decode(3, &RawJson::from(json!(null))),
        Err(DecodeError::Payload { version: 3, .. })
    ));
}

#[test]
fn stored_text_that_is_not_json_is_a_payload_error_on_every_decode_path() {
    let garbage = RawJson::from_stored("{\"amount\": 5");
    // The current version, an older one through `upcast_from` (decoded as that version's type
    // straight from the text), and an older one through `upcast_json` (parsed for the upcaster).
    for decoded in [
        Deposited::decode(3, &garbage).map(|_| ()),
        Deposited::decode(1, &garbage).map(|_| ()),
        Withdrawn::decode(1, &garbage).map(|_| ()),
    ] {
        assert!(
            matches!(decoded, Err(DecodeError::Payload { .. })),
            "{decoded:?}"
        );
    }
    match Deposited::decode(1, &garbage) {
        Err(DecodeError::Payload {
            event_type,
            version,
            ..
        }) => assert_eq!((event_type.as_str(), version), ("MoneyDeposited", 1)),
        other => panic!("{other:?}"),
    }
}

mod short_chain {
    use super::*;

    /// Version 2 never learned to read version 1.
    #[event(name = "Renamed", version = 2)]
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct RenamedV2 {
        pub to: String,
    }

    #[event(name = "Renamed", version = 3, upcast_from = RenamedV2)]
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Renamed {
        pub to: String,
    }

    impl From<RenamedV2> for Renamed {
        fn from(v2: RenamedV2) -> Self {
            Renamed { to: v2.to }
        }
    }
}

#[test]
fn a_version_the_chain_cannot_reach_names_the_current_version() {
    use short_chain::Renamed;
    assert_eq!(
        Renamed::decode(2, &RawJson::from(json!({ "to": "x" }))).unwrap(),
        Renamed { to: "x".into() }
    );
    match Renamed::decode(1, &RawJson::from(json!({ "to": "x" }))) {
        Err(DecodeError::UnsupportedVersion {
            version: 1,
            current: 3,
            event_type,
        }) => assert_eq!(event_type, "Renamed"),
        other => panic!("{other:?}"),
    }
}

/// Renamed field handled by a JSON upcaster.
fn rename_amt(
    from_version: u32,
    mut payload: serde_json::Value,
) -> cqrs_core::upcast::JsonUpcastResult {
    match from_version {
        1 => {
            let amount = payload
                .get_mut("amt")
                .map(serde_json::Value::take)
                .ok_or("v1 payload has no `amt`")?;
            Ok(json!({ "amount": amount }))
        }
        other => Err(format!("no upcaster from version {other}").into()),
    }
}

#[event(version = 2, upcast_json = rename_amt)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Withdrawn {
    amount: i64,
}

#[test]
fn json_escape_hatch_upcasts_and_reports_failures() {
    assert_eq!(
        Withdrawn::NAME,
        "Withdrawn",
        "default name is the type name verbatim"
    );
    assert_eq!(
        Withdrawn::decode(1, &RawJson::from(json!({ "amt": 3 }))).unwrap(),
        Withdrawn { amount: 3 }
    );
    match Withdrawn::decode(1, &RawJson::from(json!({ "wrong": 3 }))) {
        Err(DecodeError::Upcast {
            from_version: 1,
            source,
            ..
        }) => assert!(source.to_string().contains("no `amt`")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        Withdrawn::decode(3, &RawJson::from(json!({}))),
        Err(DecodeError::UnsupportedVersion { .. })
    ));
}

mod first {
    #[cqrs_core::event(name = "first.Created")]
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    pub struct Created {
        pub id: u32,
    }
}

mod second {
    #[cqrs_core::event(name = "second.Created")]
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Created {
        pub display_name: String,
        #[serde(default)]
        pub tags: Vec<String>,
    }
}

#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "thing", events(first::Created, second::Created as NamedCreated, Deposited), event_enum = ThingEvents, snapshot_version = 4)]
struct Thing {
    ids: Vec<u32>,
    names: Vec<String>,
    cents: i64,
}

impl Apply<first::Created> for Thing {
    fn apply(&mut self, e: &first::Created) {
        self.ids.push(e.id);
    }
}
impl Apply<second::Created> for Thing {
    fn apply(&mut self, e: &second::Created) {
        self.names.push(e.display_name.clone());
    }
}
impl Apply<Deposited> for Thing {
    fn apply(&mut self, e: &Deposited) {
        self.cents += e.cents;
    }
}

#[test]
fn aggregate_dispatch_names_and_serialization() {
    assert_eq!(Thing::TYPE, "thing");
    assert_eq!(Thing::SNAPSHOT_VERSION, 4);
    assert_eq!(
        ThingEvents::NAMES,
        &["first.Created", "second.Created", "MoneyDeposited"]
    );
    let events: Vec<ThingEvents> = vec![
        first::Created { id: 7 }.into(),
        second::Created {
            display_name: "Ada".into(),
            tags: vec![],
        }
        .into(),
        Deposited {
            cents: 5,
            memo: String::new(),
        }
        .into(),
    ];
    let mut thing = Thing::default();
    for e in &events {
        thing.apply_event(e);
        let payload = RawJson::from(EventSet::encode(e).unwrap());
        let back = ThingEvents::decode(e.event_type(), e.schema_version(), &payload).unwrap();
        assert_eq!(&back, e);
    }
    assert_eq!(
        (thing.ids, thing.names, thing.cents),
        (vec![7], vec!["Ada".to_owned()], 5)
    );
    let camel = ThingEvents::decode(
        "second.Created",
        1,
        &RawJson::from(json!({ "displayName": "Bo" })),
    )
    .unwrap();
    assert_eq!(
        camel,
        ThingEvents::NamedCreated(second::Created {
            display_name: "Bo".into(),
            tags: vec![]
        })
    );
    let old =
        ThingEvents::decode("MoneyDeposited", 1, &RawJson::from(json!({ "amount": 2 }))).unwrap();
    assert_eq!(
        old,
        ThingEvents::Deposited(Deposited {
            cents: 200,
            memo: "(none)".into()
        })
    );
    assert!(matches!(
        ThingEvents::decode("Nope", 1, &RawJson::from(json!({}))),
        Err(DecodeError::UnknownEventType { .. })
    ));
}

/// A generic aggregate with a where-clause.
#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "tally", events(first::Created))]
struct Tally<T>
where
    T: Default + Send + Sync + 'static + From<u32> + std::ops::AddAssign,
{
    total: T,
}

impl<T> Apply<first::Created> for Tally<T>
where
    T: Default + Send + Sync + 'static + From<u32> + std::ops::AddAssign,
{
    fn apply(&mut self, e: &first::Created) {
        self.total += T::from(e.id);
    }
}

#[test]
fn generic_aggregates_work() {
    let mut tally = Tally::<u64>::default();
    tally.apply_event(&TallyEvent::Created(first::Created { id: 4 }));
    assert_eq!(tally.total, 4);
}

#[derive(Default)]
struct Mixed {
    cents: i64,
    names: Vec<String>,
    positions: Vec<u64>,
    writes: u32,
}

/// A stand-in for a database connection handlers write through.
#[derive(Default)]
struct Connection {
    statements: Vec<String>,
}

#[projection(name = "mixed")]
impl Mixed {
    async fn on_deposited(
        &mut self,
        e: &Deposited,
        meta: &RecordedEvent,
        db: &mut Connection,
    ) -> Result<(), std::io::Error> {
        tokio::task::yield_now().await;
        self.cents += e.cents;
        self.positions.push(meta.position.sequence);
        db.statements.push(format!("deposit {}", e.cents));
        self.bump();
        Ok(())
    }

    fn on_named(&mut self, e: &second::Created) {
        self.names.push(e.display_name.clone());
    }

    fn on_withdrawn(
        &mut self,
        e: &Withdrawn,
        _: &RecordedEvent,
        _: &mut Connection,
    ) -> Result<(), String> {
        if e.amount < 0 {
            return Err(format!("negative withdrawal {}", e.amount));
        }
        self.cents -= e.amount * 100;
        Ok(())
    }

    #[helper]
    fn bump(&mut self) {
        self.writes += 1;
    }

    #[helper]
    fn total(&self) -> i64 {
        self.cents
    }
}

fn recorded(
    event_type: &str,
    schema_version: u32,
    payload: serde_json::Value,
    sequence: u64,
) -> RecordedEvent {
    RecordedEvent {
        event_id: cqrs_core::EventId::new(),
        stream: StreamId::new("s", "1"),
        stream_version: StreamVersion::new(sequence),
        position: Position::new(sequence, sequence),
        event_type: event_type.to_owned(),
        schema_version,
        recorded_at: chrono::Utc::now(),
        payload: RawJson::from(payload),
        raw_metadata: cqrs_core::Metadata::default().to_json(),
    }
}

#[tokio::test]
async fn projection_routes_by_type_and_skips_the_rest_undecoded() {
    assert_eq!(Mixed::NAME, "mixed");
    assert_eq!(
        Mixed::EVENT_TYPES,
        &["MoneyDeposited", "second.Created", "Withdrawn"]
    );
    let mut model = Mixed::default();
    let mut db = Connection::default();
    let events = [
        recorded("MoneyDeposited", 1, json!({ "amount": 3 }), 1),
        recorded("second.Created", 1, json!({ "displayName": "Cy" }), 2),
        recorded(
            "first.Created",
            1,
            json!("garbage that is never decoded"),
            3,
        ),
        recorded("Withdrawn", 1, json!({ "amt": 1 }), 4),
    ];
    for e in &events {
        model.handle(e, &mut db).await.unwrap();
    }
    assert_eq!(model.total(), 300 - 100);
    assert_eq!(model.names, vec!["Cy".to_owned()]);
    assert_eq!(model.positions, vec![1]);
    assert_eq!(model.writes, 1);
    assert_eq!(db.statements, vec!["deposit 300".to_owned()]);

    let bad = recorded("MoneyDeposited", 9, json!({}), 5);
    match model.handle(&bad, &mut db).await {
        Err(ProjectionError::Decode {
            projection: "mixed",
            position,
            source: DecodeError::UnsupportedVersion { .. },
        }) => {
            assert_eq!(position.sequence, 5);
        }
        other => panic!("{other:?}"),
    }
    let failing = recorded("Withdrawn", 2, json!({ "amount": -1 }), 6);
    match model.handle(&failing, &mut db).await {
        Err(ProjectionError::Handler { source, .. }) => {
            assert!(source.to_string().contains("negative withdrawal"))
        }
        other => panic!("{other:?}"),
    }
}

/// The framework through a path of the user's choosing (`crate = path`), as when it is re-exported.
mod renamed {
    pub mod framework {
        pub use cqrs_core::*;
    }

    #[framework::event(crate = crate::renamed::framework, name = "Pinged")]
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    pub struct Pinged {}

    #[derive(Debug, Default, framework::Aggregate)]
    #[aggregate(crate = crate::renamed::framework, events(Pinged))]
    pub struct Pinger {
        pub pings: u32,
    }

    impl framework::Apply<Pinged> for Pinger {
        fn apply(&mut self, _: &Pinged) {
            self.pings += 1;
        }
    }
}

#[test]
fn crate_override() {
    let mut p = renamed::Pinger::default();
    cqrs_core::Aggregate::apply_event(&mut p, &renamed::PingerEvent::Pinged(renamed::Pinged {}));
    assert_eq!(
        (p.pings, <renamed::Pinger as cqrs_core::Aggregate>::TYPE),
        (1, "Pinger")
    );
}

/// Buffers rows in handlers and writes them once per batch.
#[derive(Default)]
struct Batched {
    pending: Vec<String>,
}

#[projection(name = "batched")]
impl Batched {
    fn on_deposited(&mut self, e: &Deposited, _: &mut Connection) {
        self.pending.push(format!("row {}", e.cents));
    }

    #[flush]
    async fn write(&mut self, db: &mut Connection) -> Result<(), std::io::Error> {
        if self.pending.iter().any(|row| row == "row 13") {
            return Err(std::io::Error::other("unlucky batch"));
        }
        db.statements.push(format!(
            "INSERT {}",
            std::mem::take(&mut self.pending).join(", ")
        ));
        Ok(())
    }

    #[discard]
    fn forget(&mut self) {
        self.pending.clear();
    }
}

#[tokio::test]
async fn flush_writes_a_batch_once_and_discard_drops_an_abandoned_one() {
    let mut model = Batched::default();
    let mut db = Connection::default();
    for (i, amount) in [1, 2].into_iter().enumerate() {
        let e = recorded(
            "MoneyDeposited",
            1,
            json!({ "amount": amount }),
            i as u64 + 1,
        );
        model.handle(&e, &mut db).await.unwrap();
    }
    model.flush(&mut db).await.unwrap();
    assert_eq!(db.statements, vec!["INSERT row 100, row 200".to_owned()]);

    let unlucky = recorded("MoneyDeposited", 3, json!({ "cents": 13, "memo": "" }), 3);
    model.handle(&unlucky, &mut db).await.unwrap();
    match model.flush(&mut db).await {
        Err(ProjectionError::Flush {
            projection: "batched",
            source,
        }) => {
            assert_eq!(source.to_string(), "unlucky batch");
        }
        other => panic!("{other:?}"),
    }
    model.discard();
    let e = recorded("MoneyDeposited", 1, json!({ "amount": 4 }), 4);
    model.handle(&e, &mut db).await.unwrap();
    model.flush(&mut db).await.unwrap();
    assert_eq!(
        db.statements[1], "INSERT row 400",
        "the abandoned row is not written"
    );
}
