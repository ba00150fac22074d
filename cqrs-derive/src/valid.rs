//! Semantic checks: raw attributes + the annotated item → validated models ([`crate::ast`]).
//!
//! Every check reports into the [`Ctxt`] and goes on, so all mistakes surface in one build. Facts
//! the macro cannot see (another type's version or name, whether an impl exists) are checked by
//! the generated code instead, spanned at the user's tokens (see `expand`).

use proc_macro2::{TokenStream, TokenTree};
use quote::ToTokens;
use syn::punctuated::Punctuated;
use syn::{FnArg, Ident, ImplItem, ItemImpl, LitStr, Path, ReceiverKind, Token, Type};

use crate::ast::{Aggregate, AggregateEvent, Event, Flush, Handler, Projection, Upcast};
use crate::attr::{last_ident, AggregateAttr, EventAttr, ProjectionAttr};
use crate::ctxt::{text, Ctxt};
use crate::symbol::{DERIVE, DESERIALIZE, DISCARD, FLUSH, HELPER, RECORDED_EVENT, SERIALIZE};

pub fn default_crate() -> Path {
    syn::parse_quote!(::cqrs_core)
}

pub fn event(cx: &mut Ctxt, attr: EventAttr, input: &syn::DeriveInput) -> Event {
    if let syn::Data::Union(u) = &input.data {
        cx.error_spanned_by(
            u.union_token,
            "#[event] supports structs and enums, not unions",
        );
    }
    let version = attr.version.as_ref().map_or(1, |(v, _)| *v);
    let upcast = match (attr.upcast_from, attr.upcast_json) {
        (Some(from), Some(json)) => {
            cx.error_spanned_by(
                json,
                "use either `upcast_from` (typed chain) or `upcast_json` (JSON rewrite), not both",
            );
            Upcast::From(from)
        }
        (Some(from), None) => Upcast::From(from),
        (None, Some(json)) => Upcast::Json(json),
        (None, None) => Upcast::None,
    };
    if version == 1 && !matches!(upcast, Upcast::None) {
        let span = attr.version.as_ref().map_or_else(
            || input.ident.to_token_stream(),
            |(_, lit)| lit.to_token_stream(),
        );
        cx.error_spanned_by(
            span,
            "version 1 has nothing to upcast from; set `version = 2` or higher on this event",
        );
    }
    let missing_serde = missing_serde(input);
    if !missing_serde.is_empty() {
        cx.error_spanned_by(
            &input.ident,
            format!(
                "an event is stored as JSON, so `{}` must derive `Serialize` and `Deserialize`: add `#[derive({})]` (from `serde`)",
                input.ident,
                missing_serde.join(", ")
            ),
        );
    }
    Event {
        krate: attr.krate.unwrap_or_else(default_crate),
        name: attr.name.unwrap_or_else(|| ident_name(&input.ident)),
        version,
        upcast,
        missing_serde,
    }
}

/// Which of `Serialize` and `Deserialize` the item's derives lack. Only judged when the item has
/// a `#[derive(...)]` below `#[event]`: derives above it are not visible to the macro, and a
/// type without any derive may implement both by hand.
fn missing_serde(input: &syn::DeriveInput) -> Vec<&'static str> {
    let derives: Vec<syn::Path> = input
        .attrs
        .iter()
        .filter(|a| a.path().is_ident(DERIVE))
        .filter_map(|a| {
            a.parse_args_with(Punctuated::<syn::Path, Token![,]>::parse_terminated)
                .ok()
        })
        .flatten()
        .collect();
    if derives.is_empty() {
        return Vec::new();
    }
    [SERIALIZE, DESERIALIZE]
        .into_iter()
        .filter(|t| {
            !derives
                .iter()
                .any(|d| d.segments.last().is_some_and(|s| s.ident == t))
        })
        .collect()
}

/// The stored name when none is given: the type's ident, verbatim.
fn ident_name(ident: &syn::Ident) -> LitStr {
    LitStr::new(&ident.to_string(), ident.span())
}

pub fn aggregate(cx: &mut Ctxt, attr: AggregateAttr, input: &syn::DeriveInput) -> Aggregate {
    match &input.data {
        syn::Data::Struct(_) => {}
        syn::Data::Enum(e) => cx.error_spanned_by(
            e.enum_token,
            "#[derive(Aggregate)] supports structs only; keep the state in a struct (an enum can be one of its fields)",
        ),
        syn::Data::Union(u) => cx.error_spanned_by(
            u.union_token,
            "#[derive(Aggregate)] supports structs only, not unions",
        ),
    }
    let listed = match attr.events {
        Some((key, events)) if events.is_empty() => {
            cx.error_spanned_by(
                key,
                "`events()` is empty; list the events this aggregate applies, e.g. `events(Opened, Deposited)`",
            );
            Vec::new()
        }
        Some((_, events)) => events,
        // A misspelled or unparsable key was reported already: it may well be `events`.
        None if attr.malformed => Vec::new(),
        None => {
            cx.error_spanned_by(
                &input.ident,
                "missing `#[aggregate(events(...))]`: list the events this aggregate applies, e.g. `#[aggregate(events(Opened, Deposited))]`",
            );
            Vec::new()
        }
    };
    let params: Vec<String> = input
        .generics
        .type_params()
        .map(|p| p.ident.to_string())
        .collect();
    let mut events: Vec<AggregateEvent> = Vec::new();
    for listed in listed {
        let ty = listed.ty;
        let Some(variant) = listed.rename.or_else(|| last_ident(&ty)) else {
            cx.error_spanned_by(
                &ty,
                format!(
                    "cannot name an enum variant after `{}`; rename it with `{} as VariantName`",
                    text(&ty),
                    text(&ty)
                ),
            );
            continue;
        };
        if let Some(param) = mentions(&ty, &params) {
            cx.error_spanned_by(
                &ty,
                format!(
                    "an event type cannot use the aggregate's type parameter `{param}`: the event enum is not generic; list concrete event types"
                ),
            );
            continue;
        }
        if let Some(earlier) = events.iter().find(|e| text(&e.ty) == text(&ty)) {
            cx.error_spanned_by(
                &ty,
                format!(
                    "event `{}` is listed twice; remove this one",
                    text(&earlier.ty)
                ),
            );
            continue;
        }
        if let Some(earlier) = events.iter().find(|e| e.variant == variant) {
            cx.error_spanned_by(
                &ty,
                format!(
                    "`{}` and `{}` would both be variant `{variant}` of the event enum; rename one: `{} as OtherName`",
                    text(&earlier.ty),
                    text(&ty),
                    text(&ty)
                ),
            );
            continue;
        }
        events.push(AggregateEvent { ty, variant });
    }
    let event_enum = attr
        .event_enum
        .unwrap_or_else(|| syn::Ident::new(&format!("{}Event", input.ident), input.ident.span()));
    if event_enum == input.ident {
        cx.error_spanned_by(
            &event_enum,
            "the event enum needs a name of its own; pick another `event_enum`",
        );
    }
    Aggregate {
        krate: attr.krate.unwrap_or_else(default_crate),
        name: attr.name.unwrap_or_else(|| ident_name(&input.ident)),
        events,
        event_enum,
        snapshot_version: attr.snapshot_version,
    }
}

/// The first of `params` that `ty` mentions as an identifier.
fn mentions(ty: &Type, params: &[String]) -> Option<String> {
    fn walk(tokens: TokenStream, params: &[String]) -> Option<String> {
        tokens.into_iter().find_map(|tt| match tt {
            TokenTree::Ident(i) => params.iter().find(|p| i == p.as_str()).cloned(),
            TokenTree::Group(g) => walk(g.stream(), params),
            _ => None,
        })
    }
    walk(ty.to_token_stream(), params)
}

/// Validates the impl block and strips its `#[helper]` markers (always, so that the block can be
/// re-emitted as is on error).
pub fn projection(cx: &mut Ctxt, attr: ProjectionAttr, item: &mut ItemImpl) -> Projection {
    let markers = strip_markers(item);
    let name = attr.name.unwrap_or_else(|| {
        let ident =
            last_ident(&item.self_ty).map_or_else(|| "projection".to_owned(), |i| i.to_string());
        LitStr::new(&ident, proc_macro2::Span::call_site())
    });
    let mut model = Projection {
        krate: attr.krate.unwrap_or_else(default_crate),
        name,
        context: attr.context,
        handlers: Vec::new(),
        streams: attr.streams.unwrap_or_default(),
        flush: None,
        discard: None,
    };
    if let Some((path, _)) = &item.trait_ {
        cx.error_spanned_by(
            path,
            "#[projection] goes on an inherent impl block (`impl MyReadModel { ... }`), not on a trait impl",
        );
        // Its methods belong to the trait: judging them as handlers would only add noise.
        return model;
    }
    let mut candidates = 0;
    for impl_item in &item.items {
        let ImplItem::Fn(method) = impl_item else {
            continue;
        };
        if markers.marks(&method.sig.ident) {
            continue;
        }
        candidates += 1;
        if let Some(handler) = handler(cx, &method.sig) {
            model.handlers.push(handler);
        }
    }
    if candidates == 0 {
        cx.error_spanned_by(
            &item.self_ty,
            "a projection needs at least one handler: `fn on_deposited(&mut self, event: &Deposited)`",
        );
    }
    for (i, h) in model.handlers.iter().enumerate() {
        if h.catch_all {
            if let Some(earlier) = model.handlers[..i].iter().find(|e| e.catch_all) {
                cx.error_spanned_by(
                    &h.event,
                    format!(
                        "`{}` and `{}` both take every event (`&RecordedEvent`); a projection has at most one catch-all handler: merge them",
                        earlier.method, h.method
                    ),
                );
            }
            continue;
        }
        if let Some(earlier) = model.handlers[..i]
            .iter()
            .find(|e| text(&e.event) == text(&h.event))
        {
            cx.error_spanned_by(
                &h.event,
                format!(
                    "`{}` and `{}` both handle `{}`; one handler per event type: merge them",
                    earlier.method,
                    h.method,
                    text(&h.event)
                ),
            );
        }
    }
    // Every handler's `&mut C` must agree on `C` (or with `context = C`).
    let mut context = model.context.clone();
    for h in &model.handlers {
        let Some(ty) = &h.context else { continue };
        match &context {
            None => context = Some(ty.clone()),
            Some(c) if text(c) == text(ty) => {}
            Some(c) => cx.error_spanned_by(
                ty,
                format!(
                    "every handler shares one context type, and this projection's is `{}`; take `&mut {}` here",
                    text(c),
                    text(c)
                ),
            ),
        }
    }
    model.flush = flush(cx, &markers, &mut context);
    model.discard = discard(cx, &markers);
    model.context = context;
    model
}

/// The methods of a `#[projection]` block that are not handlers, by marker.
#[derive(Default)]
struct Markers {
    helpers: Vec<Ident>,
    flush: Vec<(syn::Attribute, syn::Signature)>,
    discard: Vec<(syn::Attribute, syn::Signature)>,
}

impl Markers {
    fn marks(&self, method: &Ident) -> bool {
        self.helpers.contains(method)
            || self.flush.iter().any(|(_, sig)| &sig.ident == method)
            || self.discard.iter().any(|(_, sig)| &sig.ident == method)
    }
}

/// Removes `#[helper]`, `#[flush]` and `#[discard]` from the block's methods (always, so that the
/// block can be re-emitted as is), and returns what each marked.
fn strip_markers(item: &mut ItemImpl) -> Markers {
    let mut markers = Markers::default();
    for impl_item in &mut item.items {
        let ImplItem::Fn(method) = impl_item else {
            continue;
        };
        let mut kept = Vec::with_capacity(method.attrs.len());
        for attr in std::mem::take(&mut method.attrs) {
            if attr.path().is_ident(HELPER) {
                markers.helpers.push(method.sig.ident.clone());
            } else if attr.path().is_ident(FLUSH) {
                markers.flush.push((attr, method.sig.clone()));
            } else if attr.path().is_ident(DISCARD) {
                markers.discard.push((attr, method.sig.clone()));
            } else {
                kept.push(attr);
            }
        }
        method.attrs = kept;
    }
    markers
}

/// A `#[flush]` method: `fn name(&mut self [, context: &mut C])`, sync or async.
fn flush(cx: &mut Ctxt, markers: &Markers, context: &mut Option<Type>) -> Option<Flush> {
    const SHAPE: &str = "a `#[flush]` method is `fn name(&mut self)` or `fn name(&mut self, context: &mut Context)`, sync or async";
    for (attr, _) in markers.flush.iter().skip(1) {
        cx.error_spanned_by(attr, "a projection has at most one `#[flush]` method");
    }
    let (attr, sig) = markers.flush.first()?;
    if markers.discard.is_empty() {
        cx.error_spanned_by(
            attr,
            "a `#[flush]` method needs a `#[discard]` method, `fn name(&mut self)`, that drops what the handlers buffered: after a failed batch the backend calls it, or the retry would write the buffered rows twice",
        );
    }
    let mut inputs = sig.inputs.iter();
    if !matches!(inputs.next(), Some(FnArg::Receiver(r)) if matches!(r.kind, ReceiverKind::Reference(_, _, Some(_))))
        || !sig.generics.params.is_empty()
    {
        cx.error_spanned_by(&sig.ident, SHAPE);
        return None;
    }
    let takes_context = match (inputs.next(), inputs.next()) {
        (None, _) => false,
        (Some(FnArg::Typed(t)), None) => match &*t.ty {
            Type::Reference(r) if r.mutability.is_some() => {
                let ty = (*r.elem).clone();
                match context.as_ref() {
                    None => *context = Some(ty),
                    Some(c) if text(c) == text(&ty) => {}
                    Some(c) => {
                        cx.error_spanned_by(
                            &t.ty,
                            format!(
                                "this projection's context is `{}`; take `&mut {}` here",
                                text(c),
                                text(c)
                            ),
                        );
                        return None;
                    }
                }
                true
            }
            _ => {
                cx.error_spanned_by(&t.ty, SHAPE);
                return None;
            }
        },
        (Some(arg), _) => {
            cx.error_spanned_by(arg, SHAPE);
            return None;
        }
    };
    Some(Flush {
        method: sig.ident.clone(),
        is_async: sig.asyncness.is_some(),
        takes_context,
    })
}

/// A `#[discard]` method: `fn name(&mut self)`, not async.
fn discard(cx: &mut Ctxt, markers: &Markers) -> Option<Ident> {
    for (attr, _) in markers.discard.iter().skip(1) {
        cx.error_spanned_by(attr, "a projection has at most one `#[discard]` method");
    }
    let (_, sig) = markers.discard.first()?;
    let receiver_only = sig.inputs.len() == 1
        && matches!(sig.inputs.first(), Some(FnArg::Receiver(r)) if matches!(r.kind, ReceiverKind::Reference(_, _, Some(_))));
    if !receiver_only || sig.asyncness.is_some() || !sig.generics.params.is_empty() {
        cx.error_spanned_by(
            &sig.ident,
            "a `#[discard]` method is `fn name(&mut self)`, not async: it only drops buffered state",
        );
        return None;
    }
    Some(sig.ident.clone())
}

const HANDLER_SHAPE: &str = "a handler is `fn name(&mut self, event: &SomeEvent)`, optionally followed by `meta: &RecordedEvent` and then `context: &mut Context`; mark other methods `#[helper]`";

/// Whether a method that is not a valid handler was meant as one: it takes a reference (the
/// event) and returns nothing or a `Result`. Queries (`fn balance(&self) -> i64`) and
/// constructors (`fn new() -> Self`) were not, and get other advice than "take `&mut self`".
fn meant_as_handler(sig: &syn::Signature) -> bool {
    let takes_reference = sig
        .inputs
        .iter()
        .any(|a| matches!(a, FnArg::Typed(t) if matches!(&*t.ty, Type::Reference(_))));
    let returns_unit_or_result = match &sig.output {
        syn::ReturnType::Default => true,
        syn::ReturnType::Type(_, ty) => match &**ty {
            Type::Tuple(t) => t.elems.is_empty(),
            other => last_ident(other).is_some_and(|id| id == "Result"),
        },
    };
    takes_reference && returns_unit_or_result
}

fn handler(cx: &mut Ctxt, sig: &syn::Signature) -> Option<Handler> {
    let ident = &sig.ident;
    let is_mut_ref = |a: &FnArg| matches!(a, FnArg::Receiver(r) if matches!(r.kind, ReceiverKind::Reference(_, _, Some(_))));
    if !sig.inputs.first().is_some_and(is_mut_ref) && !meant_as_handler(sig) {
        cx.error_spanned_by(
            ident,
            format!(
                "`{ident}` is not an event handler, and every method of a `#[projection]` block is one unless marked: mark it `#[helper]`, or move it to another `impl` block"
            ),
        );
        return None;
    }
    let mut inputs = sig.inputs.iter();
    match inputs.next() {
        Some(FnArg::Receiver(r)) if matches!(r.kind, ReceiverKind::Reference(_, _, Some(_))) => {}
        Some(FnArg::Receiver(r)) => {
            let how = match r.kind {
                ReceiverKind::Value => "takes `self` by value",
                ReceiverKind::Reference(..) => "takes `&self`",
                _ => "takes a typed `self`",
            };
            cx.error_spanned_by(
                r,
                format!(
                    "handler `{ident}` {how}; handlers update the read model: take `&mut self`"
                ),
            );
            return None;
        }
        _ => {
            cx.error_spanned_by(
                ident,
                format!("handler `{ident}` has no `self`; take `&mut self` first, or mark it `#[helper]` if it is not a handler"),
            );
            return None;
        }
    }
    if let Some(param) = sig.generics.params.first() {
        cx.error_spanned_by(
            param,
            format!("handler `{ident}` cannot be generic: routing needs one concrete event type"),
        );
        return None;
    }
    let typed: Vec<&syn::PatType> = inputs
        .filter_map(|a| match a {
            FnArg::Typed(t) => Some(t),
            FnArg::Receiver(_) => None,
        })
        .collect();
    let Some(first) = typed.first() else {
        cx.error_spanned_by(
            ident,
            format!("handler `{ident}` has no event parameter; {HANDLER_SHAPE}"),
        );
        return None;
    };
    let event = match &*first.ty {
        Type::Reference(r) if r.mutability.is_none() => (*r.elem).clone(),
        Type::Reference(r) if last_ident(&r.elem).is_some_and(|id| id == RECORDED_EVENT) => {
            cx.error_spanned_by(
                &first.ty,
                "take the envelope by shared reference (`&RecordedEvent`): events are immutable facts",
            );
            return None;
        }
        Type::Reference(_) => {
            cx.error_spanned_by(
                &first.ty,
                "take the event by shared reference (`&Event`): events are immutable facts",
            );
            return None;
        }
        other => {
            cx.error_spanned_by(
                other,
                format!("take the event by reference: `&{}`", text(other)),
            );
            return None;
        }
    };
    // `event: &RecordedEvent`: every event no typed handler takes, undecoded.
    let catch_all = last_ident(&event).is_some_and(|id| id == RECORDED_EVENT);
    let mut meta = None;
    let mut context = None;
    for (i, arg) in typed.iter().enumerate().skip(1) {
        match &*arg.ty {
            Type::Reference(r) if r.mutability.is_none() && i == 1 && catch_all => {
                cx.error_spanned_by(
                    &arg.ty,
                    format!("handler `{ident}` already takes the envelope as its event; drop this parameter"),
                );
                return None;
            }
            Type::Reference(r) if r.mutability.is_none() && i == 1 => {
                if last_ident(&r.elem).is_some_and(|id| id != RECORDED_EVENT) {
                    cx.error_spanned_by(
                        &arg.ty,
                        "a handler takes exactly one event; a shared second parameter is the envelope `&RecordedEvent`. Split this into one handler per event type",
                    );
                    return None;
                }
                meta = Some((*arg.ty).clone());
            }
            Type::Reference(r) if r.mutability.is_some() && i + 1 == typed.len() => {
                context = Some((*r.elem).clone());
            }
            _ => {
                cx.error_spanned_by(&arg.ty, format!("unexpected parameter; {HANDLER_SHAPE}"));
                return None;
            }
        }
    }
    Some(Handler {
        method: ident.clone(),
        is_async: sig.asyncness.is_some(),
        event,
        catch_all,
        meta,
        context,
    })
}
