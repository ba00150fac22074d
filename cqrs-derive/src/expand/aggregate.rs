//! `#[derive(Aggregate)]`: the event enum, its `From` and `EventSet` impls, and `impl Aggregate`
//! whose `apply_event` is one `match` calling the user's `Apply<E>` impls.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;

use super::{distinct_names, event_item, int, private};
use crate::ast::Aggregate;
use crate::ctxt::text;

pub fn aggregate(model: &Aggregate, input: &syn::DeriveInput) -> TokenStream {
    let Aggregate {
        krate,
        name,
        events,
        event_enum,
        snapshot_version,
    } = model;
    let p = private(krate);
    let ident = &input.ident;
    let types: Vec<_> = events.iter().map(|e| &e.ty).collect();
    let generics = super::aggregate_generics(krate, &types, input);
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    let variants: Vec<_> = events.iter().map(|e| &e.variant).collect();

    let event_enum_def = event_enum_def(model, input);
    let from_impls = from_impls(model);
    let applies = events.iter().map(|e| {
        let (ty, variant) = (&e.ty, &e.variant);
        // Spanned at the listed event: a missing `Apply` impl is reported there, with the
        // message of `Apply`'s `#[diagnostic::on_unimplemented]`.
        let call = quote_spanned!(ty.span()=> <Self as #krate::Apply<#ty>>::apply(self, event));
        quote!(#event_enum::#variant(event) => #call,)
    });
    let snapshot = snapshot_version.map(|v| {
        let v = int(v);
        quote!(const SNAPSHOT_VERSION: u32 = #v;)
    });
    let listed: Vec<_> = types
        .iter()
        .map(|ty| {
            let message = format!(
                "this event is stored under the same name as `{}` (below), listed before it in aggregate `{ident}`, so the stored events could not tell them apart: give one of them its own `#[event(name = \"...\")]`; or, if they are two versions of one event, list only the current one (older versions are upcast to it)",
                text(ty)
            );
            (*ty, message)
        })
        .collect();
    let distinct_names = distinct_names(krate, &listed);
    let names: Vec<_> = types
        .iter()
        .map(|ty| event_item(krate, ty, quote!(NAME)))
        .collect();
    let versions = types
        .iter()
        .map(|ty| event_item(krate, ty, quote!(VERSION)));
    let encodes = types
        .iter()
        .map(|ty| event_item(krate, ty, quote!(encode(event))));
    let decodes = types
        .iter()
        .map(|ty| event_item(krate, ty, quote!(decode(schema_version, payload))));
    quote! {
        #event_enum_def

        const _: () = {
            #from_impls

            #[automatically_derived]
            impl #krate::EventSet for #event_enum {
                const NAMES: &'static [&'static str] = &[#(#names),*];

                fn event_type(&self) -> &'static str {
                    match self {
                        #(#event_enum::#variants(_) => #names,)*
                    }
                }

                fn schema_version(&self) -> u32 {
                    match self {
                        #(#event_enum::#variants(_) => #versions,)*
                    }
                }

                fn encode(&self) -> #p::Result<#p::serde_json::Value, #krate::EncodeError> {
                    match self {
                        #(#event_enum::#variants(event) => #encodes,)*
                    }
                }

                // Two arms for one stored name are reported by the name check below; rustc's
                // lint would point at the same tokens again.
                #[allow(unreachable_patterns)]
                fn decode(
                    event_type: &str,
                    schema_version: u32,
                    payload: &#p::RawJson,
                ) -> #p::Result<Self, #krate::DecodeError> {
                    match event_type {
                        #(
                            #names => {
                                #decodes.map(#event_enum::#variants)
                            }
                        )*
                        _ => #p::Err(#p::unknown_event_type(event_type)),
                    }
                }
            }

            #[automatically_derived]
            impl #impl_generics #krate::Aggregate for #ident #ty_generics #where_clause {
                const TYPE: &'static str = #name;
                #snapshot
                type Event = #event_enum;

                fn apply_event(&mut self, event: &#event_enum) {
                    match event {
                        #(#applies)*
                    }
                }
            }

            #distinct_names
        };
    }
}

/// `impl From<Opened> for AccountEvent`, one per listed event: what lets handlers write
/// `Opened { .. }.into()`.
pub fn from_impls(model: &Aggregate) -> TokenStream {
    let Aggregate {
        krate,
        events,
        event_enum,
        ..
    } = model;
    let p = private(krate);
    let impls = events.iter().map(|e| {
        let (ty, variant) = (&e.ty, &e.variant);
        quote! {
            #[automatically_derived]
            impl #p::core::convert::From<#ty> for #event_enum {
                fn from(event: #ty) -> Self {
                    #event_enum::#variant(event)
                }
            }
        }
    });
    quote!(#(#impls)*)
}

/// `pub enum AccountEvent { Opened(Opened), ... }`, with the aggregate's visibility.
pub fn event_enum_def(model: &Aggregate, input: &syn::DeriveInput) -> TokenStream {
    let Aggregate {
        krate,
        events,
        event_enum,
        ..
    } = model;
    let p = private(krate);
    let vis = &input.vis;
    let doc = format!(
        " The events of aggregate `{}`, generated by `#[derive(Aggregate)]`: one variant per listed event.",
        input.ident
    );
    let variants = events.iter().map(|e| {
        let (ty, variant) = (&e.ty, &e.variant);
        let doc = format!(" `{}`.", text(ty));
        quote! {
            #[doc = #doc]
            #variant(#ty),
        }
    });
    quote! {
        #[doc = #doc]
        #[derive(#p::core::fmt::Debug, #p::core::clone::Clone, #p::core::cmp::PartialEq)]
        #vis enum #event_enum {
            #(#variants)*
        }
    }
}
