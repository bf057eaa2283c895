use outpost_plugin_sdk::api::abi_stable::sabi_trait::TD_Opaque;
use outpost_plugin_sdk::api::abi_stable::sabi_types::RMut;
use outpost_plugin_sdk::api::{HttpHead_TO, RequestContext_TO};
use outpost_plugin_sdk::serde_json::{self, json};
use outpost_plugin_sdk::testing::{on_request, on_response, policy, TestContext, TestHead};

use super::*;

fn build(config: Value) -> EmitMetric {
    let c: Config = serde_json::from_value(config).expect("config parses");
    EmitMetric::new(c).expect("config accepted")
}

/// What the policy adds for this request: (labels and values, amount).
fn measure(
    p: &EmitMetric,
    head: &mut TestHead,
    ctx: &mut TestContext,
) -> Option<(Vec<(String, String)>, f64)> {
    let mut h = HttpHead_TO::from_ptr(RMut::new(head), TD_Opaque);
    let mut c = RequestContext_TO::from_ptr(RMut::new(ctx), TD_Opaque);
    let (h, c) = (Head::new(&mut h), Context::new(&mut c));
    let mut values = Vec::new();
    let v = p.measure(&h, &c, &mut values)?;
    Some((p.labels().iter().cloned().zip(values).collect(), v))
}

fn context() -> TestContext {
    TestContext {
        api_id: "orders".into(),
        operation_id: "get-order".into(),
        product_id: "gold".into(),
        subscription_id: "sub-1".into(),
        client_ip: "192.0.2.7".into(),
        ..TestContext::default()
    }
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn dimensions_come_from_templates_and_apim_defaults() {
    let p = build(json!({
        "name": "orders",
        "dimensions": [
            { "name": "API ID" },
            { "name": "Operation ID" },
            { "name": "Product ID" },
            { "name": "Subscription ID" },
            { "name": "Client IP" },
            { "name": "tenant", "value": "{header.x-tenant}" },
            { "name": "user", "value": "{jwt.sub}" },
            { "name": "kind", "value": "order-{query.kind}" },
        ]
    }));
    assert_eq!(p.name(), "orders_total", "_total is appended");
    let mut head = TestHead::request("GET", "/orders/1").with_header("X-Tenant", "acme");
    head.query = "kind=rush".into();
    let mut ctx = context();
    ctx.variables.insert("jwt.sub".into(), "alice".into());
    let (labels, v) = measure(&p, &mut head, &mut ctx).expect("measured");
    assert_eq!(v, 1.0, "the value defaults to 1");
    assert_eq!(
        labels,
        pairs(&[
            ("api_id", "orders"),
            ("operation_id", "get-order"),
            ("product_id", "gold"),
            ("subscription_id", "sub-1"),
            ("client_ip", "192.0.2.7"),
            ("tenant", "acme"),
            ("user", "alice"),
            ("kind", "order-rush"),
        ])
    );
    // A missing header renders as the empty value.
    let (labels, _) = measure(&p, &mut TestHead::request("GET", "/"), &mut context()).unwrap();
    assert_eq!(labels[5], ("tenant".to_owned(), String::new()));
}

#[test]
fn the_value_is_a_number_or_a_template_rendering_one() {
    let p = build(json!({ "name": "bytes_total", "value": 2.5 }));
    let (labels, v) = measure(&p, &mut TestHead::request("GET", "/"), &mut context()).unwrap();
    assert!(labels.is_empty());
    assert_eq!(v, 2.5);
    let p = build(json!({ "name": "units_total", "value": "3" }));
    assert_eq!(
        measure(&p, &mut TestHead::request("GET", "/"), &mut context()).map(|m| m.1),
        Some(3.0)
    );

    let p = build(json!({ "name": "units_total", "value": "{header.x-units}" }));
    let mut head = TestHead::request("POST", "/").with_header("x-units", " 12 ");
    assert_eq!(
        measure(&p, &mut head, &mut context()).map(|m| m.1),
        Some(12.0)
    );
    for bad in ["lots", "-1", "NaN", "inf", ""] {
        let mut head = TestHead::request("POST", "/").with_header("x-units", bad);
        assert_eq!(
            measure(&p, &mut head, &mut context()),
            None,
            "'{bad}' adds nothing"
        );
    }
}

#[test]
fn namespace_prefixes_the_name_and_names_already_ending_in_total_stay() {
    let p = build(json!({ "name": "orders_total", "namespace": "shop" }));
    assert_eq!(p.name(), "shop_orders_total");
}

#[test]
fn hooks_continue_in_every_section() {
    let p = policy::<EmitMetric>(
        r#"{"name": "seen", "dimensions": [{"name": "API ID"}, {"name": "status", "value": "{var.s}"}]}"#,
    )
    .expect("built through the ABI");
    let mut ctx = context();
    assert_eq!(
        on_request(&p, &mut TestHead::request("GET", "/"), &mut ctx),
        Flow::CONTINUE
    );
    assert_eq!(
        on_response(&p, &mut TestHead::response(200), &mut ctx),
        Flow::CONTINUE
    );
    assert!(ctx.response.is_none());
}

#[test]
fn label_sets_past_max_series_are_folded() {
    let p = build(json!({
        "name": "folding_test",
        "dimensions": [{ "name": "tenant", "value": "{header.x-tenant}" }],
        "max_series": 2
    }));
    let values = |t: &str| vec![t.to_owned()];
    assert!(p.admit(&values("a")));
    assert!(p.admit(&values("b")));
    assert!(!p.admit(&values("c")), "a third label set is folded");
    assert!(p.admit(&values("a")), "admitted sets stay");
    // Another step emitting the same metric shares its label sets.
    let q = build(json!({
        "name": "folding_test",
        "dimensions": [{ "name": "tenant", "value": "{query.t}" }],
        "max_series": 2
    }));
    assert!(!q.admit(&values("d")));
    assert!(q.admit(&values("b")));
}

#[test]
fn bad_configs_are_refused_naming_the_field() {
    for (config, needle) in [
        (
            json!({ "name": "bad-name" }),
            "name: 'bad-name' is not a valid Prometheus metric name",
        ),
        (json!({ "name": "9lives" }), "name: '9lives'"),
        (
            json!({ "name": "outpost_requests" }),
            "reserved for the gateway",
        ),
        (
            json!({ "name": "requests", "namespace": "outpost" }),
            "reserved for the gateway",
        ),
        (
            json!({ "name": "requests", "namespace": "my shop" }),
            "namespace: 'my shop'",
        ),
        (json!({ "name": "r", "value": -1 }), "value: -1"),
        (json!({ "name": "r", "value": "many" }), "value: 'many'"),
        (json!({ "name": "r", "value": "{header.}" }), "value:"),
        (json!({ "name": "r", "value": true }), "value: true"),
        (
            json!({ "name": "r", "dimensions": [{ "name": "User ID" }] }),
            "dimensions[0].value: 'User ID' needs a value",
        ),
        (
            json!({ "name": "r", "dimensions": [{ "name": "x", "value": "{nope}" }] }),
            "dimensions[0].value: unknown expression",
        ),
        (
            json!({ "name": "r", "dimensions": [{ "name": "API ID" }, { "name": "api-id", "value": "x" }] }),
            "dimensions[1].name: 'api-id' makes label 'api_id', as dimensions[0] does",
        ),
        (
            json!({ "name": "r", "dimensions": [{ "name": "--", "value": "x" }] }),
            "dimensions[0].name: '--' makes no label name",
        ),
        (
            json!({ "name": "r", "dimensions": [{ "name": "1st", "value": "x" }] }),
            "starts with a digit",
        ),
        (json!({ "name": "r", "max_series": 0 }), "max_series"),
        (json!({ "name": "r", "colour": "red" }), "colour"),
        (json!({ "value": 1 }), "name"),
    ] {
        let e = policy::<EmitMetric>(&config.to_string())
            .err()
            .unwrap_or_else(|| panic!("{config} accepted"));
        assert!(e.message.contains(needle), "{config}: {}", e.message);
    }
    let nine: Vec<Value> = (0..9)
        .map(|i| json!({ "name": format!("d{i}"), "value": "x" }))
        .collect();
    let e = policy::<EmitMetric>(&json!({ "name": "r", "dimensions": nine }).to_string())
        .err()
        .unwrap();
    assert!(
        e.message.contains("dimensions: 9 given, at most 8"),
        "{}",
        e.message
    );
    // Every problem at once.
    let e = policy::<EmitMetric>(
        &json!({ "name": "bad-name", "value": "x", "dimensions": [{ "name": "Location" }] })
            .to_string(),
    )
    .err()
    .unwrap();
    for field in ["name:", "value:", "dimensions[0].value:"] {
        assert!(e.message.contains(field), "{}", e.message);
    }
}

#[test]
fn label_names_follow_the_dimension_names() {
    assert_eq!(label_name("API ID").unwrap(), "api_id");
    assert_eq!(label_name(" Client  IP ").unwrap(), "client_ip");
    assert_eq!(label_name("x-tenant").unwrap(), "x_tenant");
    assert_eq!(label_name("_private").unwrap(), "_private");
    assert!(label_name("").is_err());
}

/// Every ```json block of the README is one `emit-metric` step this library builds.
#[test]
fn the_readme_examples_build() {
    let readme = include_str!("../README.md");
    let mut seen = 0;
    for block in readme.split("```json\n").skip(1) {
        let block = &block[..block.find("```").expect("a closed block")];
        let step: Value = serde_json::from_str(block).unwrap_or_else(|e| panic!("{e}\n{block}"));
        assert_eq!(step["policy"], "emit-metric", "{block}");
        let object = step.as_object().expect("one step object");
        assert!(
            object.keys().all(|k| k == "policy" || k == "config"),
            "{block}"
        );
        policy::<EmitMetric>(&step["config"].to_string())
            .unwrap_or_else(|e| panic!("{}\n{block}", e.message));
        seen += 1;
    }
    assert_eq!(seen, 1, "one example per policy");
}
