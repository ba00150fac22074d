//! `#[event]`: `impl Event` with `decode` as one `match` over the stored schema version.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;

use super::{const_assert, int, private, respan};
use crate::ast::{Event, Upcast};
use crate::ctxt::text;

pub fn event(model: &Event, input: &syn::DeriveInput) -> TokenStream {
    let Event {
        krate,
        name,
        version,
        upcast,
        missing_serde: _,
    } = model;
    let p = private(krate);
    let ident = &input.ident;
    let generics = super::event_generics(krate, input);
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    let current = int(*version);
    let older = int(version.saturating_sub(1));
    let (older_arm, doc) = match upcast {
        Upcast::None => (
            quote!(),
            format!(" Decodes version {version}; any other version is `DecodeError::UnsupportedVersion`."),
        ),
        Upcast::From(prev) => (
            {
                // Spanned at `prev`, so that a missing `From` impl is reported there, once.
                let decode = respan(
                    quote! {
                        #p::decode_older::<Self, #prev>(schema_version, payload)
                            .map(<Self as #p::core::convert::From<#prev>>::from)
                    },
                    prev.span(),
                );
                quote!(1..=#older => #decode,)
            },
            format!(
                " Decodes version {version} directly, and versions 1 to {} as `{}` converted with `From`.",
                version - 1,
                text(prev)
            ),
        ),
        Upcast::Json(f) => (
            quote_spanned! {f.span()=>
                1..=#older => #p::upcast_json::<Self>(schema_version, payload, #f),
            },
            format!(
                " Decodes version {version} directly, and versions 1 to {} after rewriting their JSON with `{}`.",
                version - 1,
                text(f)
            ),
        ),
    };
    let checks = match upcast {
        Upcast::From(prev) => {
            let (span, prev_text) = (prev.span(), text(prev));
            // Exactly the previous version: a gap (3 upcasting from 1) would compile and then
            // fail on every stored row of the skipped version.
            let previous = const_assert(
                span,
                krate,
                quote!(<#prev as #krate::Event>::VERSION == #older),
                &format!(
                    "`upcast_from = {prev_text}` must name version {older} of this event, the one just before {version}, but `{prev_text}` has another version; upcast from the version-{older} type (its own `upcast_from` reaches older ones)",
                    older = version - 1,
                ),
            );
            let same_name = const_assert(
                span,
                krate,
                quote!(#p::str_eq(<#prev as #krate::Event>::NAME, #name)),
                &format!(
                    "`upcast_from = {prev_text}` must name an earlier version of the same event, but `{prev_text}` is stored under another name than {:?}",
                    name.value()
                ),
            );
            quote!(#previous #same_name)
        }
        Upcast::None | Upcast::Json(_) => quote!(),
    };
    let not_recommended = super::not_recommended(input);
    quote! {
        #[automatically_derived]
        #not_recommended
        impl #impl_generics #krate::Event for #ident #ty_generics #where_clause {
            const NAME: &'static str = #name;
            const VERSION: u32 = #current;

            #[doc = #doc]
            fn decode(
                schema_version: u32,
                payload: &#p::RawJson,
            ) -> #p::Result<Self, #krate::DecodeError> {
                match schema_version {
                    #current => #p::deserialize(#name, schema_version, payload),
                    #older_arm
                    _ => #p::Err(#p::unsupported_version::<Self>(schema_version)),
                }
            }
        }
        #checks
    }
}
