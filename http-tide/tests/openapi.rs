//! The OpenAPI document against the route table: every route registered
//! must be documented (with its error answers), and nothing documented may
//! be missing from the table.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use p2pchat_http_tide::routes::{OTHER_ROUTES, ROUTES};
use p2pchat_http_tide::OPENAPI;

fn document() -> serde_json::Value {
    serde_json::from_str(OPENAPI).expect("openapi.json is JSON")
}

fn registered() -> Vec<(String, String)> {
    ROUTES
        .iter()
        .map(|r| (r.method.as_str().to_owned(), r.path.to_owned()))
        .chain(OTHER_ROUTES.iter().map(|(m, p)| (m.as_str().to_owned(), (*p).to_owned())))
        .collect()
}

#[test]
fn every_registered_route_is_documented_with_its_errors() {
    let doc = document();
    for (method, path) in registered() {
        let operation = doc["paths"][&path][&method]
            .as_object()
            .unwrap_or_else(|| panic!("{method} {path} is registered but not in openapi.json"));
        let responses = operation["responses"].as_object().expect("responses");
        // Every route can be refused for the Host (or the Origin); the API's
        // routes and the sign-in also for the token. The page's assets need
        // no token.
        let page_asset = !path.starts_with("/api/") && path != "/auth";
        let refusals: &[&str] = if page_asset { &["403"] } else { &["401", "403"] };
        for code in refusals {
            assert!(responses.contains_key(*code), "{method} {path} does not document {code}");
        }
        if page_asset {
            assert!(!responses.contains_key("401"), "{method} {path} needs no token, so it cannot answer 401");
        }
        assert!(
            responses.keys().any(|c| c.starts_with('2') || c.starts_with('1') || c.starts_with('3')),
            "{method} {path} documents no success"
        );
        for (code, response) in responses {
            if code.starts_with('4') || code.starts_with('5') {
                assert_eq!(
                    response["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/Error",
                    "{method} {path} {code} is not the error shape"
                );
            }
        }
    }
}

#[test]
fn nothing_is_documented_that_is_not_registered() {
    let doc = document();
    let registered = registered();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            assert!(
                registered.iter().any(|(m, p)| m == method && p == path),
                "{method} {path} is documented but not registered"
            );
        }
    }
}

#[test]
fn every_schema_reference_resolves() {
    let doc = document();
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    fn walk(v: &serde_json::Value, schemas: &serde_json::Map<String, serde_json::Value>) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::String(r)) = map.get("$ref") {
                    let name = r.strip_prefix("#/components/schemas/").expect("a local schema reference");
                    assert!(schemas.contains_key(name), "{r} does not resolve");
                }
                map.values().for_each(|v| walk(v, schemas));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, schemas)),
            _ => {}
        }
    }
    walk(&doc, schemas);
}
