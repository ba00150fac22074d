//! Attribute grammar: tokens → raw attribute values. Reports malformed input, never expands.
//!
//! Every value is a type, an ident, a path or a literal: never a string holding code. After a
//! malformed or unknown key parsing goes on with the next key, so one build reports every mistake.

use proc_macro2::{TokenStream, TokenTree};
use quote::ToTokens;
use syn::ext::IdentExt;
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

/// One key of an attribute (`key = value` or `key(...)`), with the input right after it.
pub struct Key<'a> {
    pub path: Path,
    pub input: ParseStream<'a>,
}

impl<'a> Key<'a> {
    /// The input after `key =`.
    fn value(&self) -> syn::Result<ParseStream<'a>> {
        if self.input.peek(Token![=]) {
            self.input.parse::<Token![=]>()?;
            Ok(self.input)
        } else {
            Err(self.error(format!("expected `{} = ...`", text(&self.path))))
        }
    }

    fn error(&self, message: impl std::fmt::Display) -> syn::Error {
        syn::Error::new_spanned(&self.path, message)
    }
}

/// Parses `key = value, key(...), ...`, handing each key to `each`. A malformed value, a token
/// where a key belongs or a missing comma is reported, and parsing goes on after it, so one
/// build reports every mistake and the keys after a mistake still count (a broken `name` must
/// not lose the `events` list after it). Returns whether anything was malformed.
fn keys(
    cx: &mut Ctxt,
    input: ParseStream,
    mut each: impl FnMut(&mut Ctxt, &Key) -> syn::Result<()>,
) -> syn::Result<bool> {
    let mut malformed = false;
    while !input.is_empty() {
        if input.peek(Ident::peek_any) {
            let key = Key {
                path: Path::from(input.call(Ident::parse_any)?),
                input,
            };
            if let Err(e) = each(cx, &key) {
                cx.push(e);
                malformed = true;
                skip_to_comma(input)?;
            }
        } else {
            let token: TokenTree = input.parse()?;
            // `#[event("Deposited")]`: most likely a name without its key.
            let example = match syn::parse2::<LitStr>(token.to_token_stream()) {
                Ok(lit) => format!("{NAME} = {}", lit.to_token_stream()),
                Err(_) => format!("{NAME} = \"...\""),
            };
            cx.error_spanned_by(
                &token,
                format!("expected a key, found `{token}`: write `key = value`, e.g. `{example}`"),
            );
            malformed = true;
            skip_to_comma(input)?;
        }
        if input.is_empty() {
            break;
        }
        if input.peek(Token![,]) {
            input.parse::<Token![,]>()?;
        } else {
            let next: TokenTree = input.fork().parse()?;
            cx.error_spanned_by(
                &next,
                format!(
                    "missing `,` before `{}`; separate the keys with commas",
                    text(&next)
                ),
            );
            malformed = true;
        }
    }
    Ok(malformed)
}

/// Parses `#[event(...)]` arguments.
pub fn event(cx: &mut Ctxt, args: TokenStream) -> EventAttr {
    let mut attr = EventAttr::default();
    let parser = |input: ParseStream| {
        keys(cx, input, |cx, key| {
            let path = &key.path;
            if is(path, NAME) {
                let v = name_value(key)?;
                set(cx, &mut attr.name, v, path);
            } else if is(path, VERSION) {
                let lit = int_value(key, VERSION)?;
                let v = version_literal(&lit, VERSION)?;
                set(cx, &mut attr.version, (v, lit), path);
            } else if is(path, UPCAST_FROM) {
                let ty = code_value::<Type>(key, UPCAST_FROM, "a type", "DepositedV1")?;
                set(cx, &mut attr.upcast_from, ty, path);
            } else if is(path, UPCAST_JSON) {
                let f =
                    code_value::<Path>(key, UPCAST_JSON, "a function path", "upcast::deposited")?;
                set(cx, &mut attr.upcast_json, f, path);
            } else if is(path, CRATE) {
                let p = code_value::<Path>(key, CRATE, "a path", "::my_framework::cqrs")?;
                set(cx, &mut attr.krate, p, path);
            } else {
                cx.push(unknown_key(path, EVENT_KEYS));
                skip_value(key.input)?;
            }
            Ok(())
        })
    };
    if let Err(e) = syn::parse::Parser::parse2(parser, args) {
        cx.push(e);
    }
    attr
}

/// Parses the `#[aggregate(...)]` attributes of a derive input (several are merged).
pub fn aggregate(cx: &mut Ctxt, attrs: &[syn::Attribute]) -> AggregateAttr {
    let mut attr = AggregateAttr::default();
    for a in attrs.iter().filter(|a| a.path().is_ident(AGGREGATE)) {
        let result = a.parse_args_with(|input: ParseStream| {
            keys(cx, input, |cx, key| {
                let path = &key.path;
                if is(path, NAME) {
                    let v = name_value(key)?;
                    set(cx, &mut attr.name, v, path);
                } else if is(path, EVENTS) {
                    let events = event_list(cx, key)?;
                    set(cx, &mut attr.events, (path.clone(), events), path);
                } else if is(path, EVENT_ENUM) {
                    let ident =
                        code_value::<Ident>(key, EVENT_ENUM, "an identifier", "AccountEvent")?;
                    set(cx, &mut attr.event_enum, ident, path);
                } else if is(path, SNAPSHOT_VERSION) {
                    let lit = int_value(key, SNAPSHOT_VERSION)?;
                    let v = version_literal(&lit, SNAPSHOT_VERSION)?;
                    set(cx, &mut attr.snapshot_version, v, path);
                } else if is(path, CRATE) {
                    let p = code_value::<Path>(key, CRATE, "a path", "::my_framework::cqrs")?;
                    set(cx, &mut attr.krate, p, path);
                } else {
                    cx.push(unknown_key(path, AGGREGATE_KEYS));
                    attr.malformed = true;
                    // `evnets(A, B)`: keep the list, so that the fallback's event enum still
                    // has its variants and the handlers' `.into()` calls add no errors of
                    // their own.
                    if suggestion(&text(path), AGGREGATE_KEYS) == Some(EVENTS)
                        && key.input.peek(syn::token::Paren)
                        && attr.events.is_none()
                    {
                        let mut muted = Ctxt::default();
                        let events = event_list(&mut muted, key);
                        let _ = muted.check();
                        attr.events = events.ok().map(|events| (path.clone(), events));
                    } else {
                        skip_value(key.input)?;
                    }
                }
                Ok(())
            })
        });
        match result {
            Ok(malformed) => attr.malformed |= malformed,
            Err(e) => {
                attr.malformed = true;
                cx.push(e);
            }
        }
    }
    attr
}

/// Parses `#[projection(...)]` arguments.
pub fn projection(cx: &mut Ctxt, args: TokenStream) -> ProjectionAttr {
    let mut attr = ProjectionAttr::default();
    let parser = |input: ParseStream| {
        keys(cx, input, |cx, key| {
            let path = &key.path;
            if is(path, NAME) {
                let v = name_value(key)?;
                set(cx, &mut attr.name, v, path);
            } else if is(path, CONTEXT) {
                let ty = code_value::<Type>(key, CONTEXT, "a type", "sqlx::PgConnection")?;
                set(cx, &mut attr.context, ty, path);
            } else if is(path, STREAMS) {
                let streams = stream_list(key)?;
                set(cx, &mut attr.streams, streams, path);
            } else if is(path, CRATE) {
                let p = code_value::<Path>(key, CRATE, "a path", "::my_framework::cqrs")?;
                set(cx, &mut attr.krate, p, path);
            } else {
                cx.push(unknown_key(path, PROJECTION_KEYS));
                skip_value(key.input)?;
            }
            Ok(())
        })
    };
    if let Err(e) = syn::parse::Parser::parse2(parser, args) {
        cx.push(e);
    }
    attr
}

/// `events(A, b::B as Bee, ...)`, or `events = [...]` / `events = (...)` (reported, and read
/// the same). A malformed entry or separator is reported and parsing goes on, so that every
/// entry that names a type still gets its variant: the fallback's `From` impls keep the
/// handlers' `.into()` calls from adding errors of their own.
fn event_list(cx: &mut Ctxt, key: &Key) -> syn::Result<Vec<ListedEvent>> {
    const SHAPE: &str = "expected a list of event types: `events(Opened, Deposited)`";
    let content;
    if key.input.peek(syn::token::Paren) {
        syn::parenthesized!(content in key.input);
    } else if key.input.peek(Token![=])
        && (key.input.peek2(syn::token::Bracket) || key.input.peek2(syn::token::Paren))
    {
        let eq: Token![=] = key.input.parse()?;
        let group: proc_macro2::Group = key.input.parse()?;
        cx.error_spanned_by(
            quote::quote!(#eq #group),
            "write the list without `=`: `events(Opened, Deposited)`",
        );
        return syn::parse::Parser::parse2(|input: ParseStream| entries(cx, input), group.stream());
    } else {
        return Err(key.error(SHAPE));
    }
    entries(cx, &content)
}

/// The entries of an `events` list.
fn entries(cx: &mut Ctxt, input: ParseStream) -> syn::Result<Vec<ListedEvent>> {
    let mut events = Vec::new();
    while !input.is_empty() {
        match entry(cx, input) {
            Ok(event) => events.push(event),
            Err(e) => {
                cx.push(e);
                skip_to_comma(input)?;
            }
        }
        if input.is_empty() {
            break;
        }
        let previous = events.last().map(|e: &ListedEvent| text(&e.ty));
        let after = previous.map_or_else(String::new, |p| format!(" after `{p}`"));
        if input.peek(Token![,]) {
            input.parse::<Token![,]>()?;
        } else if input.peek(Ident::peek_any) || input.peek(Token![::]) {
            cx.push(input.error(format!(
                "missing `,`{after}; separate the events with commas"
            )));
        } else {
            // `A; B`, `A | B`: a separator that is not a comma.
            let separator: TokenTree = input.parse()?;
            cx.error_spanned_by(
                &separator,
                format!("separate the events with commas: `,` instead of `{separator}`"),
            );
        }
    }
    Ok(events)
}

/// `Type` or `Type as Variant`. A string is reported and, if it names a type, read as that
/// type, so that its variant still exists.
fn entry(cx: &mut Ctxt, input: ParseStream) -> syn::Result<ListedEvent> {
    let ty: Type = if input.peek(LitStr) {
        let lit: LitStr = input.parse()?;
        let ty = lit.parse::<Type>().map_err(|_| {
            syn::Error::new_spanned(
                &lit,
                "list event types, not strings: `events(Opened, Deposited)`",
            )
        })?;
        cx.error_spanned_by(
            &lit,
            format!("list event types, not strings: `events({})`", lit.value()),
        );
        ty
    } else {
        input.parse()?
    };
    let rename = if input.peek(Token![as]) {
        input.parse::<Token![as]>()?;
        Some(input.parse::<Ident>()?)
    } else {
        None
    };
    Ok(ListedEvent { ty, rename })
}

/// `streams(Account, "ledger", ...)`: aggregate types or stream type names, at least one.
fn stream_list(key: &Key) -> syn::Result<Vec<StreamType>> {
    const SHAPE: &str =
        "expected a list of aggregate types or stream type names: `streams(Account, \"ledger\")`";
    if !key.input.peek(syn::token::Paren) {
        return Err(key.error(SHAPE));
    }
    let group: proc_macro2::Group = key.input.parse()?;
    let parse = |input: ParseStream| {
        input.parse_terminated(
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
        )
    };
    let entries = syn::parse::Parser::parse2(parse, group.stream())?;
    if entries.is_empty() {
        let path = &key.path;
        return Err(syn::Error::new_spanned(quote::quote!(#path #group), SHAPE));
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

fn int_value(key: &Key, what: &str) -> syn::Result<LitInt> {
    key.value()?.parse::<LitInt>().map_err(|e| {
        syn::Error::new(
            e.span(),
            format!("{what} must be a positive integer, e.g. `{what} = 2`"),
        )
    })
}

fn name_value(key: &Key) -> syn::Result<LitStr> {
    let lit: LitStr = key.value()?.parse().map_err(|e| {
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
fn code_value<T: Parse>(meta: &Key, key: &str, what: &str, example: &str) -> syn::Result<T> {
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
        skip_to_comma(input)
    } else if input.peek(syn::token::Paren) {
        input.parse::<proc_macro2::Group>().map(drop)
    } else {
        Ok(())
    }
}

/// After a mistake, consume the rest of the key or entry, up to the next comma at this level (a
/// comma inside a group belongs to the group).
fn skip_to_comma(input: ParseStream) -> syn::Result<()> {
    while !input.is_empty() && !input.peek(Token![,]) {
        input.parse::<TokenTree>()?;
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
