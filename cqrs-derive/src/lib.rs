//! Macros for `cqrs-core`: `#[event]`, `#[derive(Aggregate)]` and `#[projection]`.
//!
//! Use them through `cqrs_core` (it re-exports them); the generated code names everything through
//! `::cqrs_core::__private`, or through the path given with `crate = path` when the framework is
//! re-exported or renamed.
//!
//! Each macro parses its attribute into a model (`attr`), checks it (`valid`) collecting every
//! mistake, and only then generates code (`expand`). On error the item is emitted unchanged next to
//! the errors, so one mistake does not cascade into unrelated ones.
//!
//! To read the generated code, run `cargo expand` on the crate that uses the macros.
#![forbid(unsafe_code)]

use proc_macro::TokenStream;

mod attr;
mod ctxt;
mod expand;
mod symbol;
mod valid;

use ctxt::{with_errors, Ctxt};

/// Implements `cqrs_core::Event` for a struct or enum that also derives `Serialize` and
/// `Deserialize`: `#[event(name = "MoneyDeposited", version = 2, upcast_from = DepositedV1)]`.
///
/// - `name`: the stored name; defaults to the type's name verbatim (never a module path).
/// - `version`: the schema version, default 1.
/// - `upcast_from = Type`: the previous version, an `#[event]` with the same name and a lower
///   version, converted with `From<Type>`; chains walk `V1 -> V2 -> ... -> current`.
/// - `upcast_json = path::to::fn`: `fn(u32, serde_json::Value) -> cqrs_core::upcast::JsonUpcastResult`
///   rewriting any older payload into the current shape.
/// - `crate = path`: where `cqrs_core` is, if renamed.
#[proc_macro_attribute]
pub fn event(args: TokenStream, input: TokenStream) -> TokenStream {
    let item: syn::DeriveInput = match syn::parse(input) {
        Ok(item) => item,
        Err(e) => return e.to_compile_error().into(),
    };
    let mut cx = Ctxt::default();
    let attr = attr::event(&mut cx, args.into());
    let model = valid::event(&mut cx, attr, &item);
    match cx.check() {
        Ok(()) => {
            let generated = expand::event(&model, &item);
            quote::quote!(#item #generated).into()
        }
        Err(e) => with_errors(&item, &e).into(),
    }
}

/// Implements `cqrs_core::Aggregate` and generates its event enum.
///
/// `#[aggregate(name = "account", events(Opened, Deposited, other::Deposited as OtherDeposited))]`
/// generates `enum AccountEvent { Opened(Opened), ... }` (rename with `event_enum = Name`) deriving
/// `Debug`, `Clone` and `PartialEq` (so events derive them too), `From` for each event, its
/// `EventSet` impl (serialization by stored name) and `apply_event` as one `match` calling your
/// `Apply<E>` impls. `snapshot_version = N` sets `Aggregate::SNAPSHOT_VERSION`.
#[proc_macro_derive(Aggregate, attributes(aggregate))]
pub fn derive_aggregate(input: TokenStream) -> TokenStream {
    let item: syn::DeriveInput = match syn::parse(input) {
        Ok(item) => item,
        Err(e) => return e.to_compile_error().into(),
    };
    let mut cx = Ctxt::default();
    let attr = attr::aggregate(&mut cx, &item.attrs);
    let model = valid::aggregate(&mut cx, attr, &item);
    match cx.check() {
        Ok(()) => expand::aggregate(&model, &item).into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// Implements `cqrs_core::Projection` for the type of an inherent impl block: each method is a
/// handler routed by the type of its event parameter.
///
/// A handler is `fn name(&mut self, event: &E)` (sync or `async`), optionally followed by
/// `meta: &RecordedEvent` and then `context: &mut C` (which sets `Projection::Context`; default
/// `()`, or `context = Type`). It returns `()` or `Result<(), E>`. Methods marked `#[helper]` are
/// left alone. `name = "..."` sets the checkpoint name (default: the type's name).
#[proc_macro_attribute]
pub fn projection(args: TokenStream, input: TokenStream) -> TokenStream {
    let mut item: syn::ItemImpl = match syn::parse(input.clone()) {
        Ok(item) => item,
        Err(_) => {
            let input = proc_macro2::TokenStream::from(input);
            let error = syn::Error::new_spanned(
                &input,
                "#[projection] goes on an inherent impl block: `#[projection] impl MyReadModel { ... }`",
            );
            return with_errors(input, &error).into();
        }
    };
    let mut cx = Ctxt::default();
    let attr = attr::projection(&mut cx, args.into());
    let model = valid::projection(&mut cx, attr, &mut item);
    match cx.check() {
        Ok(()) => expand::projection(&model, &item).into(),
        Err(e) => with_errors(&item, &e).into(),
    }
}
