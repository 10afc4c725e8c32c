//! The committed `docs/openapi.json` is the document the code generates (and serves at
//! `/api/v1/openapi.json`). Regenerate it with
//! `GRIDWARD_WRITE_OPENAPI=1 cargo test -p gridward-api --test openapi`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[test]
fn committed_openapi_document_matches_the_code() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let generated = gridward_api::openapi_json();
    if std::env::var_os("GRIDWARD_WRITE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).expect("docs/openapi.json");
    assert!(
        committed == generated,
        "docs/openapi.json is stale: regenerate it with GRIDWARD_WRITE_OPENAPI=1 cargo test -p gridward-api --test openapi"
    );
    let doc: serde_json::Value = serde_json::from_str(&generated).unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "OpenAPI 3.1"
    );
    assert!(doc["paths"]["/api/v1/meters/{meter_id}/readings"]["get"].is_object());
}
