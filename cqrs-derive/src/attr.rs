//! Attribute grammar: tokens → raw attribute values. Reports malformed input, never expands.
//!
//! Every value is a type, an ident, a path or a literal: never a string holding code. After a
//! malformed or unknown key parsing goes on with the next key, so one build reports every mistake.

use proc_macro2::TokenStream;
use syn::meta::ParseNestedMeta;
use syn::parse::{Parse, ParseStream};
use syn::{Ident, LitInt, LitStr, Path, Token, Type};

use crate::ctxt::{suggestion, text, unknown_key, Ctxt};
use crate::symbol::*;

/// `#[event(name = "...", version = N, upcast_from = Type, upcast_json = path, crate = path)]`
#[derive(Default)]
pub struct EventAttr {
    pub name: Option<LitStr>,
    pub version: Option<(u32, LitInt)>,
    pub upcast_from: Option<Type>,
    pub upcast_json: Option<Path>,
    pub krate: Option<Path>,
}

/// One entry of `events(...)`: a type, optionally renamed with `as Variant`.
pub struct ListedEvent {
    pub ty: Type,
    /// The explicit `as Variant`, if any.
    pub rename: Option<Ident>,
}

/// `#[aggregate(name = "...", events(A, b::B as Bee), event_enum = Name, snapshot_version = N, crate = path)]`
#[derive(Default)]
pub struct AggregateAttr {
    pub name: Option<LitStr>,
    /// The `events` key itself (for spans) and its entries.
    pub events: Option<(Path, Vec<ListedEvent>)>,
    pub event_enum: Option<Ident>,
    pub snapshot_version: Option<u32>,
    pub krate: Option<Path>,
    /// A key was unknown or a value unparsable: already reported, so `valid` must not add a
    /// second error (such as a missing `events`) for the same mistake.
    pub malformed: bool,
}

/// One entry of `streams(...)`: an aggregate type (its `Aggregate::TYPE`) or a stream type name.
pub enum StreamType {
    Aggregate(Box<Type>),
    Name(LitStr),
}

/// `#[projection(name = "...", context = Type, streams(Account, "ledger"), crate = path)]`
#[derive(Default)]
pub struct ProjectionAttr {
    pub name: Option<LitStr>,
    pub context: Option<Type>,
    pub streams: Option<Vec<StreamType>>,
    pub krate: Option<Path>,
}

/// Parses `#[event(...)]` arguments.
pub fn event(cx: &mut Ctxt, args: TokenStream) -> EventAttr {
    let mut attr = EventAttr::default();
    let parser = syn::meta::parser(|meta| {
        let path = meta.path.clone();
        if is(&path, NAME) {
            let v = name_value(&meta)?;
            set(cx, &mut attr.name, v, &path);
        } else if is(&path, VERSION) {
            let lit = int_value(&meta, VERSION)?;
            match version_literal(&lit, VERSION) {
                Ok(v) => set(cx, &mut attr.version, (v, lit), &path),
                Err(e) => cx.push(e),
            }
        } else if is(&path, UPCAST_FROM) {
            let ty = code_value::<Type>(&meta, UPCAST_FROM, "a type", "DepositedV1")?;
            set(cx, &mut attr.upcast_from, ty, &path);
        } else if is(&path, UPCAST_JSON) {
            let f = code_value::<Path>(&meta, UPCAST_JSON, "a function path", "upcast::deposited")?;
            set(cx, &mut attr.upcast_json, f, &path);
        } else if is(&path, CRATE) {
            let p = code_value::<Path>(&meta, CRATE, "a path", "::my_framework::cqrs")?;
            set(cx, &mut attr.krate, p, &path);
        } else {
            cx.push(unknown_key(&path, EVENT_KEYS));
            skip_value(meta.input)?;
        }
        Ok(())
    });
    if let Err(e) = syn::parse::Parser::parse2(parser, args) {
        cx.push(e);
    }
    attr
}

/// Parses the `#[aggregate(...)]` attributes of a derive input (several are merged).
pub fn aggregate(cx: &mut Ctxt, attrs: &[syn::Attribute]) -> AggregateAttr {
    let mut attr = AggregateAttr::default();
    for a in attrs.iter().filter(|a| a.path().is_ident(AGGREGATE)) {
        let result = a.parse_nested_meta(|meta| {
            let path = meta.path.clone();
            if is(&path, NAME) {
                let v = name_value(&meta)?;
                set(cx, &mut attr.name, v, &path);
            } else if is(&path, EVENTS) {
                let events = event_list(cx, &meta)?;
                set(cx, &mut attr.events, (path.clone(), events), &path);
            } else if is(&path, EVENT_ENUM) {
                let ident =
                    code_value::<Ident>(&meta, EVENT_ENUM, "an identifier", "AccountEvent")?;
                set(cx, &mut attr.event_enum, ident, &path);
            } else if is(&path, SNAPSHOT_VERSION) {
                let lit = int_value(&meta, SNAPSHOT_VERSION)?;
                match version_literal(&lit, SNAPSHOT_VERSION) {
                    Ok(v) => set(cx, &mut attr.snapshot_version, v, &path),
                    Err(e) => cx.push(e),
                }
            } else if is(&path, CRATE) {
                let p = code_value::<Path>(&meta, CRATE, "a path", "::my_framework::cqrs")?;
                set(cx, &mut attr.krate, p, &path);
            } else {
                cx.push(unknown_key(&path, AGGREGATE_KEYS));
                attr.malformed = true;
                // `evnets(A, B)`: keep the list, so that the fallback's event enum still has
                // its variants and the handlers' `.into()` calls add no errors of their own.
                if suggestion(&text(&path), AGGREGATE_KEYS) == Some(EVENTS)
                    && meta.input.peek(syn::token::Paren)
                    && attr.events.is_none()
                {
                    let mut muted = Ctxt::default();
                    let events = event_list(&mut muted, &meta);
                    let _ = muted.check();
                    attr.events = events.ok().map(|events| (path, events));
                } else {
                    skip_value(meta.input)?;
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            attr.malformed = true;
            cx.push(e);
        }
    }
    attr
}

/// Parses `#[projection(...)]` arguments.
pub fn projection(cx: &mut Ctxt, args: TokenStream) -> ProjectionAttr {
    let mut attr = ProjectionAttr::default();
    let parser = syn::meta::parser(|meta| {
        let path = meta.path.clone();
        if is(&path, NAME) {
            let v = name_value(&meta)?;
            set(cx, &mut attr.name, v, &path);
        } else if is(&path, CONTEXT) {
            let ty = code_value::<Type>(&meta, CONTEXT, "a type", "sqlx::PgConnection")?;
            set(cx, &mut attr.context, ty, &path);
        } else if is(&path, STREAMS) {
            let streams = stream_list(&meta)?;
            set(cx, &mut attr.streams, streams, &path);
        } else if is(&path, CRATE) {
            let p = code_value::<Path>(&meta, CRATE, "a path", "::my_framework::cqrs")?;
            set(cx, &mut attr.krate, p, &path);
        } else {
            cx.push(unknown_key(&path, PROJECTION_KEYS));
            skip_value(meta.input)?;
        }
        Ok(())
    });
    if let Err(e) = syn::parse::Parser::parse2(parser, args) {
        cx.push(e);
    }
    attr
}

/// `events(A, b::B as Bee, ...)`. A missing comma is reported and parsing goes on, so that the
/// entries after it still get their variants.
fn event_list(cx: &mut Ctxt, meta: &ParseNestedMeta) -> syn::Result<Vec<ListedEvent>> {
    if !meta.input.peek(syn::token::Paren) {
        return Err(meta.error("expected a list of event types: `events(Opened, Deposited)`"));
    }
    let content;
    syn::parenthesized!(content in meta.input);
    let mut events = Vec::new();
    while !content.is_empty() {
        if content.peek(LitStr) {
            let lit: LitStr = content.parse()?;
            return Err(syn::Error::new_spanned(
                &lit,
                format!("list event types, not strings: `events({})`", lit.value()),
            ));
        }
        let ty: Type = content.parse()?;
        let rename = if content.peek(Token![as]) {
            content.parse::<Token![as]>()?;
            Some(content.parse::<Ident>()?)
        } else {
            None
        };
        let previous = text(&ty);
        events.push(ListedEvent { ty, rename });
        if content.is_empty() {
            break;
        }
        if content.parse::<Option<Token![,]>>()?.is_none() {
            cx.push(content.error(format!(
                "missing `,` after `{previous}`; separate the events with commas"
            )));
        }
    }
    Ok(events)
}

/// `streams(Account, "ledger", ...)`: aggregate types or stream type names, at least one.
fn stream_list(meta: &ParseNestedMeta) -> syn::Result<Vec<StreamType>> {
    const SHAPE: &str =
        "expected a list of aggregate types or stream type names: `streams(Account, \"ledger\")`";
    if !meta.input.peek(syn::token::Paren) {
        return Err(meta.error(SHAPE));
    }
    let content;
    syn::parenthesized!(content in meta.input);
    let entries = content.parse_terminated(
        |input: ParseStream| {
            if input.peek(LitStr) {
                let lit: LitStr = input.parse()?;
                if lit.value().is_empty() {
                    return Err(syn::Error::new_spanned(
                        &lit,
                        "a stream type name cannot be empty: name one, e.g. `\"ledger\"`",
                    ));
                }
                Ok(StreamType::Name(lit))
            } else {
                input.parse().map(|ty| StreamType::Aggregate(Box::new(ty)))
            }
        },
        Token![,],
    )?;
    if entries.is_empty() {
        return Err(meta.error(SHAPE));
    }
    Ok(entries.into_iter().collect())
}

fn set<T>(cx: &mut Ctxt, slot: &mut Option<T>, value: T, path: &Path) {
    if slot.is_some() {
        cx.error_spanned_by(
            path,
            format!("duplicate key `{}`; give it once", text(path)),
        );
    } else {
        *slot = Some(value);
    }
}

fn is(path: &Path, symbol: &str) -> bool {
    path.is_ident(symbol) || (symbol == CRATE && path.is_ident("crate"))
}

fn version_literal(lit: &LitInt, what: &str) -> syn::Result<u32> {
    match lit.base10_parse::<u32>() {
        Ok(0) => Err(syn::Error::new_spanned(
            lit,
            format!("{what} starts at 1: write `{what} = 1` or higher"),
        )),
        Ok(v) => Ok(v),
        Err(_) => Err(syn::Error::new_spanned(
            lit,
            format!("{what} must be a positive integer that fits in u32, e.g. `{what} = 2`"),
        )),
    }
}

fn int_value(meta: &ParseNestedMeta, what: &str) -> syn::Result<LitInt> {
    meta.value()?.parse::<LitInt>().map_err(|e| {
        syn::Error::new(
            e.span(),
            format!("{what} must be a positive integer, e.g. `{what} = 2`"),
        )
    })
}

fn name_value(meta: &ParseNestedMeta) -> syn::Result<LitStr> {
    let lit: LitStr = meta.value()?.parse().map_err(|e| {
        syn::Error::new(
            e.span(),
            "name must be a string literal, e.g. `name = \"MoneyDeposited\"`",
        )
    })?;
    if lit.value().is_empty() {
        return Err(syn::Error::new_spanned(
            &lit,
            "name must not be empty; it is stored with every event",
        ));
    }
    Ok(lit)
}

/// A value that is code (a type, a path, an ident), rejecting the string-holding-code mistake.
fn code_value<T: Parse>(
    meta: &ParseNestedMeta,
    key: &str,
    what: &str,
    example: &str,
) -> syn::Result<T> {
    let input = meta.value()?;
    if input.peek(LitStr) {
        let lit: LitStr = input.parse()?;
        return Err(syn::Error::new_spanned(
            &lit,
            format!(
                "`{key}` takes {what}, not a string: write `{key} = {}`",
                if lit.value().is_empty() {
                    example.to_owned()
                } else {
                    lit.value()
                }
            ),
        ));
    }
    input.parse().map_err(|e| {
        syn::Error::new(
            e.span(),
            format!("`{key}` takes {what}, e.g. `{key} = {example}`"),
        )
    })
}

/// After an unknown key, consume `= value` or `(...)` so parsing can report the next mistake too.
fn skip_value(input: ParseStream) -> syn::Result<()> {
    if input.peek(Token![=]) {
        input.parse::<Token![=]>()?;
        while !input.is_empty() && !input.peek(Token![,]) {
            input.parse::<proc_macro2::TokenTree>()?;
        }
    } else if input.peek(syn::token::Paren) {
        input.parse::<proc_macro2::Group>()?;
    }
    Ok(())
}

/// The last segment of a plain type path (`a::b::Created` → `Created`).
pub fn last_ident(ty: &Type) -> Option<Ident> {
    match ty {
        Type::Path(p) if p.qself.is_none() => p.path.segments.last().map(|s| s.ident.clone()),
        _ => None,
    }
}
