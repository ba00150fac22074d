//! Macros for `cqrs-core`: [`macro@event`], [`derive@Aggregate`] and [`macro@projection`].
//!
//! Use them through `cqrs_core` (it re-exports them). The generated code names everything through
//! `::cqrs_core::__private`, or through the path given with `crate = path` when the framework is
//! re-exported or renamed (serde's convention):
//!
//! ```text
//! #[event(crate = ::my_app::cqrs, name = "Pinged")]
//! ```
//!
//! # How it is built
//!
//! Each macro parses its attribute (`attr`), checks it against the annotated item (`valid`),
//! collecting every mistake with its span, and only then generates code (`expand`) from the
//! validated model (`ast`). On error it emits the errors next to the item unchanged and a minimal
//! impl (`fallback`), so one mistake does not cascade into unrelated ones. Facts a macro cannot
//! see, such as another type's version or whether an `Apply<E>` impl exists, are checked by the
//! generated code with const assertions and trait bounds spanned at the user's tokens.
//!
//! # Seeing the generated code
//!
//! The expansion is meant to read like code a careful person would write by hand: one `match`
//! per dispatch, absolute paths, doc comments and `#[automatically_derived]` on every generated
//! item. To see it for your own types, install [`cargo expand`](https://github.com/dtolnay/cargo-expand)
//! and run it on the module that uses the macros:
//!
//! ```text
//! cargo install cargo-expand
//! cargo expand -p my_app domain::account
//! ```
//!
//! The repository also keeps a reviewed snapshot of the expansion of a small bank domain:
//! `cqrs-derive/snapshots/bank.rs` (input) and `cqrs-derive/snapshots/bank.expanded.rs`
//! (output). `cargo test -p cqrs-derive` fails when the output changes; rerun it with
//! `UPDATE_SNAPSHOTS=1` and review the diff like any other code change.
#![forbid(unsafe_code)]

use proc_macro::TokenStream;

mod ast;
mod attr;
mod ctxt;
mod expand;
mod fallback;
mod symbol;
mod valid;

#[cfg(test)]
mod snapshot;

use ctxt::Ctxt;

/// Implements `cqrs_core::Event` for a struct or enum that also derives `Serialize` and
/// `Deserialize`: `#[event(name = "MoneyDeposited", version = 2, upcast_from = DepositedV1)]`.
///
/// - `name = "..."`: the stored name; defaults to the type's name verbatim (never a module path,
///   never a stripped suffix: moving or renaming the type must not rename stored data).
/// - `version = N`: the schema version, default 1.
/// - `upcast_from = Type`: the previous version, itself an `#[event]` with the same name and
///   exactly the version before this one (a gap would leave the skipped version's rows
///   unreadable, so it does not compile), converted with `From<Type>`; chains walk
///   `V1 -> V2 -> ... -> current`.
/// - `upcast_json = path::to::f`: `fn(from_version: u32, payload: serde_json::Value) ->
///   cqrs_core::upcast::JsonUpcastResult`, rewriting any older payload into the current shape.
/// - `crate = path`: where `cqrs_core` is, if renamed or re-exported.
///
/// A stored version with no decode path (0, older than the chain reaches, or newer than the code)
/// decodes to `DecodeError::UnsupportedVersion`, naming this type's version as the current one.
///
/// A `#[derive(...)]` written below `#[event]` must include `Serialize` and `Deserialize`: a
/// missing one is one error at the type, not one per use of it. (A type that implements them by
/// hand writes its derives above `#[event]`, where the macro does not read them.) A generic
/// event's impl is bounded by what `Event` needs: `Self: Serialize + DeserializeOwned + Send +
/// Sync + 'static`.
#[proc_macro_attribute]
pub fn event(args: TokenStream, input: TokenStream) -> TokenStream {
    expand_event(args.into(), input.into()).into()
}

/// Implements `cqrs_core::Aggregate` and generates its event enum.
///
/// `#[aggregate(name = "account", events(Opened, Deposited, other::Deposited as OtherDeposited))]`
/// on `struct Account` generates:
///
/// - `enum AccountEvent { Opened(Opened), Deposited(Deposited), OtherDeposited(other::Deposited) }`
///   with the struct's visibility, deriving `Debug`, `Clone` and `PartialEq` (so the events must
///   derive them too). Variants are named after the type's last path segment, or the name given
///   with `as`; rename the enum with `event_enum = Name`.
/// - `From<E>` for each event, and `EventSet` (serialization by each event's stored name).
/// - `impl Aggregate` whose `apply_event` is one `match` calling your `Apply<E>` impls.
///
/// Keys: `name = "..."` (the stream type, default: the struct's name verbatim), `events(...)`
/// (required), `event_enum = Ident`, `snapshot_version = N` (`Aggregate::SNAPSHOT_VERSION`),
/// `crate = path`. Generic aggregates work: their impl is bounded by their where-clauses and by
/// what it needs (`Self: Default + Send + Sync + 'static + Apply<E>` for each event); the event
/// types must be concrete. Two listed events stored under one name do not compile.
#[proc_macro_derive(Aggregate, attributes(aggregate))]
pub fn derive_aggregate(input: TokenStream) -> TokenStream {
    expand_aggregate(input.into()).into()
}

/// Implements `cqrs_core::Projection` for the type of an inherent impl block: each method is a
/// handler routed by the type of its event parameter.
///
/// A handler is `fn name(&mut self, event: &E)`, sync or `async`, optionally followed by
/// `meta: &RecordedEvent` (the envelope) and then `context: &mut C` (a backend context, e.g. a
/// database transaction; sets `Projection::Context`, default `()`, or set it with
/// `context = Type`). It returns `()` or `Result<(), Err>` with `Err: Into<HandlerError>`.
///
/// **Every method is a handler unless marked `#[helper]`**: the marker is removed and the method
/// left as written, so a typo in a handler's signature is an error, not a silently ignored route.
/// Queries (`fn balance(&self) -> i64`) and constructors belong in another impl block or get
/// `#[helper]`. Two handled events stored under one name do not compile.
///
/// To batch writes, handlers buffer (e.g. rows in a `Vec`) and a method marked `#[flush]`,
/// `fn name(&mut self [, context: &mut C])` (sync or async, returning `()` or `Result`), writes
/// the buffer once per batch, before the batch commits (`Projection::flush`). It requires a method
/// marked `#[discard]`, `fn name(&mut self)`, that drops the buffer when a batch is abandoned
/// (`Projection::discard`), so a retried batch is not written twice.
///
/// A handler whose event parameter is the envelope itself, `fn name(&mut self, event:
/// &RecordedEvent [, context: &mut C])`, is the **catch-all**: it gets every event no typed handler
/// routes, payload undecoded, and makes the projection subscribe to the whole log
/// (`Projection::SUBSCRIPTION`). At most one per projection.
///
/// Keys: `name = "..."` (the checkpoint name, default: the type's name verbatim), `context =
/// Type`, `streams(Account, "ledger")` (only events of these stream types, the categories: an
/// aggregate type stands for its `Aggregate::TYPE`, a string for itself), `crate = path`. The generated `EVENT_TYPES` lists each handler's `<E as Event>::NAME`,
/// so the store reads only those; `handle` decodes (upcasting) only events it has a handler for.
#[proc_macro_attribute]
pub fn projection(args: TokenStream, input: TokenStream) -> TokenStream {
    expand_projection(args.into(), input.into()).into()
}

type TokenStream2 = proc_macro2::TokenStream;

fn expand_event(args: TokenStream2, input: TokenStream2) -> TokenStream2 {
    let item: syn::DeriveInput = match syn::parse2(input.clone()) {
        Ok(item) => item,
        Err(_) => {
            let error = syn::Error::new_spanned(
                &input,
                "#[event] goes on a struct or enum that derives `Serialize` and `Deserialize`",
            );
            return fallback::with_errors(input, &error);
        }
    };
    let mut cx = Ctxt::default();
    let attr = attr::event(&mut cx, args);
    let model = valid::event(&mut cx, attr, &item);
    match cx.check() {
        Ok(()) => {
            let generated = expand::event(&model, &item);
            quote::quote!(#item #generated)
        }
        Err(e) => fallback::event(&item, &model, &e),
    }
}

fn expand_aggregate(input: TokenStream2) -> TokenStream2 {
    let item: syn::DeriveInput = match syn::parse2(input) {
        Ok(item) => item,
        Err(e) => return e.to_compile_error(),
    };
    let mut cx = Ctxt::default();
    let attr = attr::aggregate(&mut cx, &item.attrs);
    let model = valid::aggregate(&mut cx, attr, &item);
    match cx.check() {
        Ok(()) => expand::aggregate(&model, &item),
        Err(e) => fallback::aggregate(&item, &model, &e),
    }
}

fn expand_projection(args: TokenStream2, input: TokenStream2) -> TokenStream2 {
    let mut item: syn::ItemImpl = match syn::parse2(input.clone()) {
        Ok(item) => item,
        Err(_) => {
            let error = syn::Error::new_spanned(
                &input,
                "#[projection] goes on an inherent impl block: `#[projection] impl MyReadModel { ... }`",
            );
            return fallback::with_errors(input, &error);
        }
    };
    let mut cx = Ctxt::default();
    let attr = attr::projection(&mut cx, args);
    let model = valid::projection(&mut cx, attr, &mut item);
    match cx.check() {
        Ok(()) => expand::projection(&model, &item),
        Err(e) => fallback::projection(&item, &model, &e),
    }
}
