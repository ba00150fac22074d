//! What a macro emits next to its errors (thiserror's `fallback.rs`): the user's item and a minimal
//! impl of the trait, so that code using the type does not add "trait not implemented" noise to
//! the real message. The bodies are never run: the crate does not compile.

use proc_macro2::TokenStream;
use quote::{quote, ToTokens};

use crate::ast::{Aggregate, Projection};
use crate::expand::{event_enum_def, from_impls};

/// The errors, then the item unchanged.
pub fn with_errors(item: impl ToTokens, error: &syn::Error) -> TokenStream {
    let mut tokens = error.to_compile_error();
    item.to_tokens(&mut tokens);
    tokens
}

/// `#[event]`: the item and `impl Event` with the name and version the user asked for. If the
/// item lacks `Serialize` or `Deserialize`, it gets them (through the re-exported serde), so
/// that every use of the type as an event does not repeat the error.
pub fn event(
    input: &syn::DeriveInput,
    model: &crate::ast::Event,
    error: &syn::Error,
) -> TokenStream {
    let crate::ast::Event {
        krate,
        name,
        version,
        missing_serde,
        ..
    } = model;
    let mut item = input.clone();
    if !missing_serde.is_empty() {
        let serde = quote!(#krate::__private::serde);
        let derives = missing_serde.iter().map(|t| {
            let t = syn::Ident::new(t, proc_macro2::Span::call_site());
            quote!(#serde::#t)
        });
        item.attrs.push(syn::parse_quote!(#[derive(#(#derives),*)]));
        let serde_path =
            syn::LitStr::new(&crate::ctxt::text(&serde), proc_macro2::Span::call_site());
        item.attrs
            .push(syn::parse_quote!(#[serde(crate = #serde_path)]));
    }
    let mut tokens = with_errors(&item, error);
    if matches!(input.data, syn::Data::Union(_)) {
        return tokens;
    }
    let ident = &input.ident;
    let generics = crate::expand::event_generics(krate, input);
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    let version = proc_macro2::Literal::u32_unsuffixed(*version);
    let not_recommended = crate::expand::not_recommended(input);
    tokens.extend(quote! {
        #[automatically_derived]
        #not_recommended
        impl #impl_generics #krate::Event for #ident #ty_generics #where_clause {
            const NAME: &'static str = #name;
            const VERSION: u32 = #version;
        }
    });
    tokens
}

/// `#[derive(Aggregate)]`: the event enum with the variants that were valid, their `From` impls
/// (so that every handler's `Opened { .. }.into()` does not add an error naming an event that is
/// fine), and impls whose bodies are unreachable.
pub fn aggregate(input: &syn::DeriveInput, model: &Aggregate, error: &syn::Error) -> TokenStream {
    let mut tokens = error.to_compile_error();
    if !matches!(input.data, syn::Data::Struct(_)) {
        return tokens;
    }
    let Aggregate {
        krate,
        name,
        event_enum,
        ..
    } = model;
    let p = quote!(#krate::__private);
    let ident = &input.ident;
    let types: Vec<_> = model.events.iter().map(|e| &e.ty).collect();
    let generics = crate::expand::aggregate_generics(krate, &types, input);
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    tokens.extend(event_enum_def(model, input));
    tokens.extend(from_impls(model));
    tokens.extend(quote! {
        #[automatically_derived]
        impl #krate::EventSet for #event_enum {
            const NAMES: &'static [&'static str] = &[];
            fn event_type(&self) -> &'static str {
                #p::core::unreachable!()
            }
            fn schema_version(&self) -> u32 {
                #p::core::unreachable!()
            }
            fn encode(&self) -> #p::Result<#p::serde_json::Value, #krate::EncodeError> {
                #p::core::unreachable!()
            }
            fn decode(
                event_type: &str,
                _: u32,
                _: &#p::RawJson,
            ) -> #p::Result<Self, #krate::DecodeError> {
                #p::Err(#p::unknown_event_type(event_type))
            }
        }
        #[automatically_derived]
        impl #impl_generics #krate::Aggregate for #ident #ty_generics #where_clause {
            const TYPE: &'static str = #name;
            type Event = #event_enum;
            fn apply_event(&mut self, _: &#event_enum) {}
        }
    });
    tokens
}

/// `#[projection]`: the impl block (without `#[helper]` markers) and an `impl Projection` that
/// handles nothing.
pub fn projection(item: &syn::ItemImpl, model: &Projection, error: &syn::Error) -> TokenStream {
    let mut tokens = with_errors(item, error);
    if item.trait_.is_some() {
        return tokens;
    }
    let Projection {
        krate,
        name,
        context,
        ..
    } = model;
    let p = quote!(#krate::__private);
    let self_ty = &item.self_ty;
    let (impl_generics, _, where_clause) = item.generics.split_for_impl();
    let context = context.as_ref().map_or_else(|| quote!(()), |c| quote!(#c));
    tokens.extend(quote! {
        #[automatically_derived]
        impl #impl_generics #krate::Projection for #self_ty #where_clause {
            const NAME: &'static str = #name;
            const EVENT_TYPES: &'static [&'static str] = &[];
            type Context = #context;
            fn handle<'__cqrs>(
                &'__cqrs mut self,
                _: &'__cqrs #krate::RecordedEvent,
                _: &'__cqrs mut Self::Context,
            ) -> impl #p::core::future::Future<
                Output = #p::Result<(), #krate::ProjectionError>,
            > + #p::core::marker::Send + '__cqrs {
                async { #p::Ok(()) }
            }
        }
    });
    tokens
}

#[cfg(test)]
mod tests {
    /// Every impl a macro emits beside its errors is `#[automatically_derived]`, like the impls of
    /// a successful expansion, so lints and coverage treat both alike.
    #[test]
    fn every_fallback_impl_is_automatically_derived() {
        let expansions = [
            crate::expand_event(
                quote::quote!(verison = 2),
                quote::quote!(
                    #[derive(Serialize)]
                    struct Opened {}
                ),
            ),
            crate::expand_aggregate(quote::quote!(
                #[aggregate(evnets(Opened, Closed))]
                struct Account {}
            )),
            crate::expand_projection(
                quote::quote!(nmae = "x"),
                quote::quote!(
                    impl Model {
                        fn on(&mut self, _: &Opened) {}
                    }
                ),
            ),
        ];
        for tokens in expansions {
            let file: syn::File = syn::parse2(tokens).unwrap();
            let impls: Vec<_> = file
                .items
                .iter()
                .filter_map(|item| match item {
                    // The user's own impl block is re-emitted as written.
                    syn::Item::Impl(i) if i.trait_.is_some() => Some(i),
                    _ => None,
                })
                .collect();
            assert!(!impls.is_empty());
            for i in impls {
                assert!(
                    i.attrs
                        .iter()
                        .any(|a| a.path().is_ident("automatically_derived")),
                    "{}",
                    quote::ToTokens::to_token_stream(i)
                );
            }
        }
    }
}
