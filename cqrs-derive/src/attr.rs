//! Attribute grammar: syn input → the macros' own models. Reports, never expands.

use syn::parse::ParseStream;
use syn::{Ident, LitInt, LitStr, Path, Token, Type};

use crate::ctxt::{unknown_key, Ctxt};
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
    pub variant: Ident,
}

/// `#[aggregate(name = "...", events(A, b::B as Bee), event_enum = Name, snapshot_version = N, crate = path)]`
#[derive(Default)]
pub struct AggregateAttr {
    pub name: Option<LitStr>,
    pub events: Option<Vec<ListedEvent>>,
    pub event_enum: Option<Ident>,
    pub snapshot_version: Option<u32>,
    pub krate: Option<Path>,
}

/// `#[projection(name = "...", context = Type, crate = path)]`
#[derive(Default)]
pub struct ProjectionAttr {
    pub name: Option<LitStr>,
    pub context: Option<Type>,
    pub krate: Option<Path>,
}

fn set<T>(cx: &mut Ctxt, slot: &mut Option<T>, value: T, path: &Path) {
    if slot.is_some() {
        cx.error_spanned_by(path, format!("duplicate key `{}`", key(path)));
    } else {
        *slot = Some(value);
    }
}

fn key(path: &Path) -> String {
    path.get_ident()
        .map_or_else(|| "?".to_owned(), ToString::to_string)
}

fn version_literal(lit: &LitInt) -> syn::Result<u32> {
    match lit.base10_parse::<u32>() {
        Ok(0) => Err(syn::Error::new_spanned(lit, "version must be at least 1")),
        Ok(v) => Ok(v),
        Err(_) => Err(syn::Error::new_spanned(
            lit,
            "version must be a positive integer, e.g. `version = 2`",
        )),
    }
}

fn int_value(input: ParseStream, what: &str) -> syn::Result<LitInt> {
    input.parse::<LitInt>().map_err(|e| {
        syn::Error::new(
            e.span(),
            format!("{what} must be a positive integer, e.g. `{what} = 2`"),
        )
    })
}

fn name_value(input: ParseStream) -> syn::Result<LitStr> {
    let lit: LitStr = input.parse().map_err(|e| {
        syn::Error::new(
            e.span(),
            "name must be a string literal, e.g. `name = \"MoneyDeposited\"`",
        )
    })?;
    if lit.value().is_empty() {
        return Err(syn::Error::new_spanned(&lit, "name must not be empty"));
    }
    Ok(lit)
}

fn is(path: &Path, symbol: &str) -> bool {
    path.is_ident(symbol) || (symbol == CRATE && path.is_ident("crate"))
}

/// Parses `#[event(...)]` arguments.
pub fn event(cx: &mut Ctxt, args: proc_macro2::TokenStream) -> EventAttr {
    let mut attr = EventAttr::default();
    let parser = syn::meta::parser(|meta| {
        let path = meta.path.clone();
        if is(&path, NAME) {
            let v = name_value(meta.value()?)?;
            set(cx, &mut attr.name, v, &path);
        } else if is(&path, VERSION) {
            let lit = int_value(meta.value()?, VERSION)?;
            match version_literal(&lit) {
                Ok(v) => set(cx, &mut attr.version, (v, lit), &path),
                Err(e) => cx.push(e),
            }
        } else if is(&path, UPCAST_FROM) {
            let ty: Type = meta.value()?.parse()?;
            set(cx, &mut attr.upcast_from, ty, &path);
        } else if is(&path, UPCAST_JSON) {
            let f: Path = meta.value()?.parse()?;
            set(cx, &mut attr.upcast_json, f, &path);
        } else if is(&path, CRATE) {
            let p: Path = meta.value()?.parse()?;
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

/// Parses the `#[aggregate(...)]` attributes of a derive input.
pub fn aggregate(cx: &mut Ctxt, attrs: &[syn::Attribute]) -> AggregateAttr {
    let mut attr = AggregateAttr::default();
    for a in attrs.iter().filter(|a| a.path().is_ident(AGGREGATE)) {
        let result = a.parse_nested_meta(|meta| {
            let path = meta.path.clone();
            if is(&path, NAME) {
                let v = name_value(meta.value()?)?;
                set(cx, &mut attr.name, v, &path);
            } else if is(&path, EVENTS) {
                let content;
                syn::parenthesized!(content in meta.input);
                let mut events = Vec::new();
                while !content.is_empty() {
                    let ty: Type = content.parse()?;
                    let variant = if content.peek(Token![as]) {
                        content.parse::<Token![as]>()?;
                        content.parse::<Ident>()?
                    } else {
                        match last_ident(&ty) {
                            Some(ident) => ident,
                            None => {
                                cx.error_spanned_by(&ty, "expected an event type path; rename other types with `Type as Variant`");
                                Ident::new("Invalid", proc_macro2::Span::call_site())
                            }
                        }
                    };
                    events.push(ListedEvent { ty, variant });
                    if !content.is_empty() {
                        content.parse::<Token![,]>()?;
                    }
                }
                set(cx, &mut attr.events, events, &path);
            } else if is(&path, EVENT_ENUM) {
                let ident: Ident = meta.value()?.parse()?;
                set(cx, &mut attr.event_enum, ident, &path);
            } else if is(&path, SNAPSHOT_VERSION) {
                let lit = int_value(meta.value()?, SNAPSHOT_VERSION)?;
                match version_literal(&lit) {
                    Ok(v) => set(cx, &mut attr.snapshot_version, v, &path),
                    Err(e) => cx.push(e),
                }
            } else if is(&path, CRATE) {
                let p: Path = meta.value()?.parse()?;
                set(cx, &mut attr.krate, p, &path);
            } else {
                cx.push(unknown_key(&path, AGGREGATE_KEYS));
                skip_value(meta.input)?;
            }
            Ok(())
        });
        if let Err(e) = result {
            cx.push(e);
        }
    }
    attr
}

/// Parses `#[projection(...)]` arguments.
pub fn projection(cx: &mut Ctxt, args: proc_macro2::TokenStream) -> ProjectionAttr {
    let mut attr = ProjectionAttr::default();
    let parser = syn::meta::parser(|meta| {
        let path = meta.path.clone();
        if is(&path, NAME) {
            let v = name_value(meta.value()?)?;
            set(cx, &mut attr.name, v, &path);
        } else if is(&path, CONTEXT) {
            let ty: Type = meta.value()?.parse()?;
            set(cx, &mut attr.context, ty, &path);
        } else if is(&path, CRATE) {
            let p: Path = meta.value()?.parse()?;
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

pub fn last_ident(ty: &Type) -> Option<Ident> {
    match ty {
        Type::Path(p) if p.qself.is_none() => p.path.segments.last().map(|s| s.ident.clone()),
        _ => None,
    }
}
