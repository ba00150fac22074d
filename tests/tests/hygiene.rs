//! The macros' output compiles where the user's scope shadows prelude names (serde's `test_gen`).
#![allow(dead_code, non_camel_case_types)]

mod shadowed {
    struct Result;
    struct Ok;
    struct Err;
    struct Some;
    struct None;
    struct Option;
    struct Box;
    struct String;
    struct Vec;
    struct From;
    struct Into;
    struct Clone;
    struct Send;
    struct Future;
    trait Event {}
    trait Aggregate {}
    trait Projection {}
    mod serde_json {}
    mod core {}
    mod std {}

    #[cqrs_core::event(name = "H1")]
    #[derive(Debug, ::core::clone::Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    pub struct H1 {
        pub n: i64,
    }

    #[cqrs_core::event(name = "H1", version = 2, upcast_from = H1)]
    #[derive(Debug, ::core::clone::Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    pub struct H2 {
        pub n: i64,
    }

    impl ::core::convert::From<H1> for H2 {
        fn from(h: H1) -> Self {
            H2 { n: h.n }
        }
    }

    #[cqrs_core::event(version = 2, upcast_json = up)]
    #[derive(Debug, ::core::clone::Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    pub struct J {}

    fn up(_: u32, v: ::serde_json::Value) -> cqrs_core::upcast::JsonUpcastResult {
        ::core::result::Result::Ok(v)
    }

    #[derive(Default, cqrs_core::Aggregate)]
    #[aggregate(events(H2, J))]
    pub struct Agg {
        n: i64,
    }

    impl cqrs_core::Apply<H2> for Agg {
        fn apply(&mut self, e: &H2) {
            self.n += e.n;
        }
    }

    impl cqrs_core::Apply<J> for Agg {
        fn apply(&mut self, _: &J) {}
    }

    #[derive(Default)]
    pub struct Proj {
        n: i64,
    }

    #[cqrs_core::projection]
    impl Proj {
        async fn on_h2(&mut self, e: &H2, _: &cqrs_core::RecordedEvent) {
            self.n += e.n;
        }
        fn on_j(&mut self, _: &J) -> ::core::result::Result<(), ::std::string::String> {
            ::core::result::Result::Ok(())
        }
        #[flush]
        async fn write(&mut self) -> ::core::result::Result<(), ::std::string::String> {
            ::core::result::Result::Ok(())
        }
        #[discard]
        fn forget(&mut self) {
            self.n = 0;
        }
    }
}

#[test]
fn shadowed_names_do_not_break_generated_code() {
    use cqrs_core::{Aggregate, Event, Projection};
    assert_eq!(shadowed::H2::VERSION, 2);
    assert_eq!(<shadowed::Agg as Aggregate>::TYPE, "Agg");
    assert_eq!(<shadowed::Proj as Projection>::NAME, "Proj");
}
