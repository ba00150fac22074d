//! Semantic checks and the validated models expansion works on.

use quote::ToTokens;
use syn::{FnArg, ImplItem, ItemImpl, LitStr, Path, ReceiverKind, Type};

use crate::attr::{AggregateAttr, EventAttr, ListedEvent, ProjectionAttr};
use crate::ctxt::Ctxt;
use crate::symbol::HELPER;

fn default_crate() -> Path {
    syn::parse_quote!(::cqrs_core)
}

pub struct Event {
    pub krate: Path,
    pub name: LitStr,
    pub version: u32,
    pub upcast: Upcast,
}

pub enum Upcast {
    None,
    From(Type),
    Json(Path),
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
            cx.error_spanned_by(json, "use either `upcast_from` or `upcast_json`, not both");
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
            "version 1 has nothing to upcast from; set `version = 2` or higher",
        );
    }
    let name = attr
        .name
        .unwrap_or_else(|| LitStr::new(&input.ident.to_string(), input.ident.span()));
    Event {
        krate: attr.krate.unwrap_or_else(default_crate),
        name,
        version,
        upcast,
    }
}

pub struct Aggregate {
    pub krate: Path,
    pub name: LitStr,
    pub events: Vec<ListedEvent>,
    pub event_enum: syn::Ident,
    pub snapshot_version: Option<u32>,
}

pub fn aggregate(cx: &mut Ctxt, attr: AggregateAttr, input: &syn::DeriveInput) -> Aggregate {
    match &input.data {
        syn::Data::Struct(_) => {}
        syn::Data::Enum(e) => cx.error_spanned_by(
            e.enum_token,
            "#[derive(Aggregate)] supports structs only; keep the state in a struct",
        ),
        syn::Data::Union(u) => cx.error_spanned_by(
            u.union_token,
            "#[derive(Aggregate)] supports structs only, not unions",
        ),
    }
    let events = match attr.events {
        Some(events) if events.is_empty() => {
            cx.error_spanned_by(
                &input.ident,
                "`events(...)` is empty; list the events this aggregate applies",
            );
            events
        }
        Some(events) => events,
        None => {
            cx.error_spanned_by(&input.ident, "missing `#[aggregate(events(...))]`: list the events this aggregate applies, e.g. `#[aggregate(events(Opened, Deposited))]`");
            Vec::new()
        }
    };
    for (i, event) in events.iter().enumerate() {
        for earlier in &events[..i] {
            let same_type =
                earlier.ty.to_token_stream().to_string() == event.ty.to_token_stream().to_string();
            if same_type {
                cx.error_spanned_by(
                    &event.ty,
                    format!("event `{}` is listed twice", event.ty.to_token_stream()),
                );
            } else if earlier.variant == event.variant {
                cx.error_spanned_by(
                    &event.ty,
                    format!(
                        "two listed events are both named `{}`; rename one with `{} as OtherName`",
                        event.variant,
                        event.ty.to_token_stream().to_string().replace(' ', "")
                    ),
                );
            }
        }
    }
    let event_enum = attr
        .event_enum
        .unwrap_or_else(|| syn::Ident::new(&format!("{}Event", input.ident), input.ident.span()));
    Aggregate {
        krate: attr.krate.unwrap_or_else(default_crate),
        name: attr
            .name
            .unwrap_or_else(|| LitStr::new(&input.ident.to_string(), input.ident.span())),
        events,
        event_enum,
        snapshot_version: attr.snapshot_version,
    }
}

pub struct Handler {
    pub method: syn::Ident,
    pub is_async: bool,
    pub event: Type,
    pub takes_meta: bool,
    pub context: Option<Type>,
}

pub struct ProjectionModel {
    pub krate: Path,
    pub name: LitStr,
    pub context: Option<Type>,
    pub handlers: Vec<Handler>,
}

/// Validates the impl block and strips `#[helper]` markers from it.
pub fn projection(cx: &mut Ctxt, attr: ProjectionAttr, item: &mut ItemImpl) -> ProjectionModel {
    if let Some((path, _)) = &item.trait_ {
        cx.error_spanned_by(path, "#[projection] goes on an inherent impl block (`impl MyProjection { ... }`), not a trait impl");
        // Its methods belong to the trait: judging them as handlers would only add noise.
        return ProjectionModel {
            krate: default_crate(),
            name: LitStr::new("", proc_macro2::Span::call_site()),
            context: None,
            handlers: Vec::new(),
        };
    }
    let mut handlers = Vec::new();
    for impl_item in &mut item.items {
        let ImplItem::Fn(method) = impl_item else {
            continue;
        };
        let before = method.attrs.len();
        method.attrs.retain(|a| !a.path().is_ident(HELPER));
        if method.attrs.len() != before {
            continue;
        }
        if let Some(handler) = handler(cx, &method.sig) {
            handlers.push(handler);
        }
    }
    if handlers.is_empty() {
        cx.error_spanned_by(
            &item.self_ty,
            "a projection needs at least one handler: `fn on_x(&mut self, event: &SomeEvent)`",
        );
    }
    let name = attr.name.unwrap_or_else(|| {
        let ident = crate::attr::last_ident(&item.self_ty)
            .map_or_else(|| "projection".to_owned(), |i| i.to_string());
        LitStr::new(&ident, proc_macro2::Span::call_site())
    });
    let context = attr
        .context
        .or_else(|| handlers.iter().find_map(|h| h.context.clone()));
    ProjectionModel {
        krate: attr.krate.unwrap_or_else(default_crate),
        name,
        context,
        handlers,
    }
}

const HANDLER_SHAPE: &str = "expected `fn name(&mut self, event: &Event)`, optionally followed by `meta: &RecordedEvent` and `context: &mut Context`; mark other methods with `#[helper]`";

fn handler(cx: &mut Ctxt, sig: &syn::Signature) -> Option<Handler> {
    let mut inputs = sig.inputs.iter();
    match inputs.next() {
        Some(FnArg::Receiver(r)) if matches!(r.kind, ReceiverKind::Reference(_, _, Some(_))) => {}
        Some(FnArg::Receiver(r)) => {
            cx.error_spanned_by(r, format!("handler `{}` must take `&mut self`", sig.ident));
            return None;
        }
        _ => {
            cx.error_spanned_by(
                &sig.ident,
                format!(
                    "handler `{}` must take `&mut self` first; {HANDLER_SHAPE}",
                    sig.ident
                ),
            );
            return None;
        }
    }
    let typed: Vec<&syn::PatType> = inputs
        .filter_map(|a| match a {
            FnArg::Typed(t) => Some(t),
            FnArg::Receiver(_) => None,
        })
        .collect();
    let Some(first) = typed.first() else {
        cx.error_spanned_by(
            &sig.ident,
            format!(
                "handler `{}` has no event parameter; {HANDLER_SHAPE}",
                sig.ident
            ),
        );
        return None;
    };
    let Type::Reference(event_ref) = &*first.ty else {
        cx.error_spanned_by(
            &first.ty,
            "the event parameter must be a shared reference, e.g. `event: &Deposited`",
        );
        return None;
    };
    if event_ref.mutability.is_some() {
        cx.error_spanned_by(
            &first.ty,
            "the event parameter must be a shared reference (`&Event`): events are immutable",
        );
        return None;
    }
    let mut takes_meta = false;
    let mut context = None;
    for (i, arg) in typed.iter().enumerate().skip(1) {
        match &*arg.ty {
            Type::Reference(r) if r.mutability.is_none() && i == 1 => {
                if crate::attr::last_ident(&r.elem).is_some_and(|id| id != "RecordedEvent") {
                    cx.error_spanned_by(&arg.ty, "a handler takes one event; the second parameter, if shared, is the envelope `&RecordedEvent`");
                    return None;
                }
                takes_meta = true;
            }
            Type::Reference(r)
                if r.mutability.is_some() && context.is_none() && i + 1 == typed.len() =>
            {
                context = Some((*r.elem).clone());
            }
            _ => {
                cx.error_spanned_by(&arg.ty, format!("unexpected parameter; {HANDLER_SHAPE}"));
                return None;
            }
        }
    }
    Some(Handler {
        method: sig.ident.clone(),
        is_async: sig.asyncness.is_some(),
        event: (*event_ref.elem).clone(),
        takes_meta,
        context,
    })
}
