//! The OpenAPI description of the plane's API (served at `/admin/v1/openapi.json`).

use serde_json::{json, Value};

fn crud(kind: &str, what: &str) -> (String, Value, String, Value) {
    let list = json!({
        "get": { "summary": format!("List {what}"), "responses": { "200": { "description": "The list" } } }
    });
    let one = json!({
        "get": { "summary": format!("Read one of the {what}"), "responses": { "200": { "description": "The resource" }, "404": { "$ref": "#/components/responses/Error" } } },
        "put": { "summary": format!("Create or replace one of the {what} (validated with the whole configuration; bumps the version)"),
                 "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object" } } } },
                 "responses": { "200": { "$ref": "#/components/responses/Version" }, "400": { "$ref": "#/components/responses/Error" } } },
        "delete": { "summary": format!("Delete one of the {what}"), "responses": { "200": { "$ref": "#/components/responses/Version" }, "400": { "$ref": "#/components/responses/Error" }, "404": { "$ref": "#/components/responses/Error" } } }
    });
    (
        format!("/admin/v1/{kind}"),
        list,
        format!("/admin/v1/{kind}/{{id}}"),
        one,
    )
}

/// The document.
pub(crate) fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for (kind, what) in [
        ("apis", "APIs"),
        ("products", "products"),
        (
            "subscriptions",
            "subscriptions (keys are generated when absent)",
        ),
        ("backends", "backends"),
        (
            "named-values",
            "named values (secret values are listed as ***)",
        ),
        ("policies", "global policy documents (id: global)"),
    ] {
        let (a, av, b, bv) = crud(kind, what);
        paths.insert(a, av);
        paths.insert(b, bv);
    }
    paths.insert("/admin/v1/subscriptions/{id}/regenerate".into(), json!({
        "post": { "summary": "Regenerate a key (?key=primary|secondary)", "responses": { "200": { "description": "The new subscription" } } }
    }));
    paths.insert("/admin/v1/gateways".into(), json!({
        "get": { "summary": "Gateways with their last heartbeat (applied version, source, instance, last error)", "responses": { "200": { "description": "The list" } } }
    }));
    paths.insert("/admin/v1/gateways/{id}".into(), json!({
        "put": { "summary": "Create or replace a gateway: {\"apis\": [ids]}", "responses": { "200": { "$ref": "#/components/responses/Version" } } }
    }));
    paths.insert("/admin/v1/gateways/{id}/tokens".into(), json!({
        "post": { "summary": "Issue a gateway token (shown once; stored hashed)", "responses": { "201": { "description": "{token, expires_at, public_key}" } } },
        "delete": { "summary": "Revoke every token of the gateway", "responses": { "200": { "description": "{revoked}" } } }
    }));
    paths.insert("/admin/v1/configuration".into(), json!({ "get": { "summary": "The whole configuration document (secrets masked)", "responses": { "200": { "description": "The document" } } } }));
    paths.insert("/admin/v1/version".into(), json!({ "get": { "summary": "Configuration version and the snapshot signing public key", "responses": { "200": { "description": "{version, public_key}" } } } }));
    paths.insert("/gateway/v1/config".into(), json!({
        "get": { "summary": "The gateway's signed snapshot; If-None-Match + ?wait=seconds long-polls", "security": [{ "gateway": [] }],
                 "responses": { "200": { "description": "{version, digest, config, signature}" }, "304": { "description": "Unchanged" }, "401": { "$ref": "#/components/responses/Error" } } }
    }));
    paths.insert("/gateway/v1/heartbeat".into(), json!({ "post": { "summary": "Report status", "security": [{ "gateway": [] }], "responses": { "200": { "description": "Recorded" } } } }));
    paths.insert("/gateway/v1/token".into(), json!({ "post": { "summary": "Renew the calling gateway's token", "security": [{ "gateway": [] }], "responses": { "201": { "description": "{token, expires_at}" } } } }));
    json!({
        "openapi": "3.0.3",
        "info": { "title": "Outpost management plane", "version": env!("CARGO_PKG_VERSION") },
        "security": [{ "admin": [] }],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "admin": { "type": "http", "scheme": "bearer" },
                "gateway": { "type": "http", "scheme": "bearer" }
            },
            "responses": {
                "Version": { "description": "The new configuration version: {version}" },
                "Error": { "description": "{error, message, problems?}" }
            }
        }
    })
}
