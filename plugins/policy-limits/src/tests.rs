//! The policies through the SDK's test harness: a fake shared cache answers their counter
//! requests (or fails, or is not configured), and the clock is set by hand.

use std::collections::HashMap;

use outpost_plugin_sdk::api::PolicyBox;
use outpost_plugin_sdk::serde_json::{self, Value};
use outpost_plugin_sdk::testing::{
    on_request, on_response, on_resume, policy, TestAnswer, TestContext, TestHead, TestRequest,
};
use outpost_plugin_sdk::{phase, Flow, HostStatus, Policy, Token};

use super::*;
use crate::clock::fixed;
use crate::local::{fnv1a, Counters, Permits, SHARDS};

/// A time on a whole hour (every test period divides it).
const T0: u64 = 1_800_000_000_000;

fn build<P: Policy>(json: Value) -> PolicyBox {
    policy::<P>(&json.to_string()).unwrap_or_else(|e| panic!("{json}: {}", e.message))
}

fn refused<P: Policy>(json: Value) -> String {
    match policy::<P>(&json.to_string()) {
        Ok(_) => panic!("accepted: {json}"),
        Err(e) => e.message.into_string(),
    }
}

fn request(sub: &str) -> TestContext {
    TestContext {
        api_id: "orders".into(),
        operation_id: "list".into(),
        subscription_id: sub.into(),
        client_ip: "192.0.2.1".into(),
        request_id: "req-1".into(),
        ..TestContext::default()
    }
}

fn not_configured() -> TestAnswer {
    TestAnswer {
        status: HostStatus::NOT_CONFIGURED.0,
        ..TestAnswer::default()
    }
}

fn timeout() -> TestAnswer {
    TestAnswer {
        status: HostStatus::TIMEOUT.0,
        error: "no answer within 50ms".into(),
        ..TestAnswer::default()
    }
}

/// A shared cache's counters, as the gateway would keep them in a cache plugin.
#[derive(Default)]
struct FakeCache {
    counters: HashMap<Vec<u8>, i64>,
    asked: Vec<TestRequest>,
}

impl FakeCache {
    fn answer(&mut self, r: &TestRequest) -> TestAnswer {
        self.asked.push(r.clone());
        match r {
            TestRequest::CounterAdd { key, delta, .. } => {
                let v = self.counters.entry(key.clone()).or_default();
                *v += delta;
                TestAnswer::number(*v)
            }
            other => panic!("unexpected host work {other:?}"),
        }
    }
}

/// Answers every request not answered yet.
fn answer_pending(ctx: &mut TestContext, cache: &mut dyn FnMut(&TestRequest) -> TestAnswer) {
    for (i, r) in ctx.requests.clone().iter().enumerate() {
        let token = i as u32 + 1;
        if !ctx.answers.contains_key(&token) {
            ctx.answer(Token(token), cache(r));
        }
    }
}

/// A request through the step: `on_request`, and while it pauses, the cache's answers and
/// `on_resume`.
fn send(
    p: &PolicyBox,
    req: &mut TestHead,
    ctx: &mut TestContext,
    cache: &mut dyn FnMut(&TestRequest) -> TestAnswer,
) -> Flow {
    let mut flow = on_request(p, req, ctx);
    while flow == Flow::PAUSE {
        answer_pending(ctx, cache);
        flow = on_resume(p, req, ctx);
    }
    flow
}

/// The response through the step, as the gateway calls it when the step set
/// `outpost.on-response` (the slot starts at 0 again).
fn receive(
    p: &PolicyBox,
    resp: &mut TestHead,
    ctx: &mut TestContext,
    cache: &mut dyn FnMut(&TestRequest) -> TestAnswer,
) -> Flow {
    ctx.slot = 0;
    let mut flow = on_response(p, resp, ctx);
    while flow == Flow::PAUSE {
        answer_pending(ctx, cache);
        flow = on_resume(p, resp, ctx);
    }
    flow
}

/// A request to a step whose (named) cache is not configured: local counters.
fn local(p: &PolicyBox, req: &mut TestHead, ctx: &mut TestContext) -> Flow {
    send(p, req, ctx, &mut |_| not_configured())
}

fn never(r: &TestRequest) -> TestAnswer {
    panic!("the step asked the host for {r:?} though counting locally")
}

fn var<'c>(ctx: &'c TestContext, name: &str) -> Option<&'c str> {
    ctx.variables.get(name).map(String::as_str)
}

fn response(ctx: &TestContext) -> (u16, Value, &[(String, Vec<u8>)]) {
    let (status, headers, body) = ctx.response.as_ref().expect("an answer");
    let body: Value = serde_json::from_slice(body).expect("a JSON body");
    (*status, body, headers)
}

fn header<'h>(headers: &'h [(String, Vec<u8>)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| std::str::from_utf8(v).unwrap())
}

fn client(id: &str) -> TestHead {
    TestHead::request("GET", "/orders").with_header("x-client", id)
}

#[test]
fn rate_limit_by_key_holds_per_key_and_renews_with_the_window() {
    let p = build::<RateLimitByKey>(serde_json::json!({
        "calls": 3, "renewal_period": 10, "counter_key": "{header.x-client}",
        "remaining_calls_header_name": "x-remaining", "total_calls_header_name": "x-total",
        "remaining_calls_variable_name": "remaining", "retry_after_variable_name": "retry",
        "counter_cache": "absent-1",
    }));
    fixed::set(T0 + 4_000);
    for left in ["2", "1", "0"] {
        let mut ctx = request("");
        assert_eq!(local(&p, &mut client("rbk-a"), &mut ctx), Flow::CONTINUE);
        assert_eq!(var(&ctx, "outpost.response-header.x-remaining"), Some(left));
        assert_eq!(var(&ctx, "outpost.response-header.x-total"), Some("3"));
        assert_eq!(var(&ctx, "remaining"), Some(left));
        assert_eq!(
            var(&ctx, "outpost.on-response"),
            None,
            "nothing to count later"
        );
    }
    let mut ctx = request("");
    assert_eq!(local(&p, &mut client("rbk-a"), &mut ctx), Flow::RESPOND);
    let (status, body, headers) = response(&ctx);
    assert_eq!(status, 429);
    assert_eq!(body["error"], "rate_limit_exceeded");
    assert_eq!(body["statusCode"], 429);
    assert_eq!(body["requestId"], "req-1");
    assert!(
        body["message"].as_str().unwrap().contains("6 seconds"),
        "{body}"
    );
    assert_eq!(header(headers, "content-type"), Some("application/json"));
    assert_eq!(header(headers, "retry-after"), Some("6"));
    assert_eq!(header(headers, "x-remaining"), Some("0"));
    assert_eq!(header(headers, "x-total"), Some("3"));
    assert_eq!(var(&ctx, "retry"), Some("6"));
    assert_eq!(var(&ctx, "remaining"), Some("0"));

    // Another key has its own count.
    let mut ctx = request("");
    assert_eq!(local(&p, &mut client("rbk-b"), &mut ctx), Flow::CONTINUE);
    assert_eq!(var(&ctx, "remaining"), Some("2"));

    // The next window starts afresh.
    fixed::set(T0 + 10_000);
    let mut ctx = request("");
    assert_eq!(local(&p, &mut client("rbk-a"), &mut ctx), Flow::CONTINUE);
    assert_eq!(var(&ctx, "remaining"), Some("2"));
}

#[test]
fn a_custom_retry_after_header_replaces_the_default() {
    let p = build::<RateLimitByKey>(serde_json::json!({
        "calls": 1, "renewal_period": 60, "counter_key": "retry-{client.ip}",
        "retry_after_header_name": "x-retry-in", "counter_cache": "absent-2",
    }));
    fixed::set(T0 + 59_500);
    assert_eq!(
        local(&p, &mut client("x"), &mut request("")),
        Flow::CONTINUE
    );
    let mut ctx = request("");
    assert_eq!(local(&p, &mut client("x"), &mut ctx), Flow::RESPOND);
    let (_, _, headers) = response(&ctx);
    assert_eq!(header(headers, "x-retry-in"), Some("1"), "rounded up");
    assert_eq!(header(headers, "retry-after"), None);
}

#[test]
fn rate_limit_counts_per_subscription_and_scope_and_skips_requests_without_one() {
    let json = |scope: &str| {
        serde_json::json!({
            "calls": 2, "renewal_period": 60, "counter_scope": scope,
            "remaining_calls_variable_name": "left", "counter_cache": "absent-3",
        })
    };
    fixed::set(T0);
    let p = build::<RateLimit>(json("api"));
    let get = |p: &PolicyBox, sub: &str, api: &str| {
        let mut ctx = request(sub);
        ctx.api_id = api.into();
        let flow = local(p, &mut TestHead::request("GET", "/"), &mut ctx);
        (flow, ctx)
    };
    assert_eq!(get(&p, "rl-s1", "a").0, Flow::CONTINUE);
    assert_eq!(get(&p, "rl-s1", "a").0, Flow::CONTINUE);
    let (flow, ctx) = get(&p, "rl-s1", "a");
    assert_eq!(flow, Flow::RESPOND);
    assert_eq!(response(&ctx).0, 429);
    assert_eq!(
        get(&p, "rl-s2", "a").0,
        Flow::CONTINUE,
        "another subscription"
    );
    assert_eq!(get(&p, "rl-s1", "b").0, Flow::CONTINUE, "another API");

    // Without a subscription the policy does not apply: no counting, nothing reported.
    for _ in 0..5 {
        let mut ctx = request("");
        assert_eq!(
            send(&p, &mut TestHead::request("GET", "/"), &mut ctx, &mut never),
            Flow::CONTINUE
        );
        assert!(ctx.variables.is_empty());
    }

    // Scope "subscription": one count across APIs.
    let p = build::<RateLimit>(json("subscription"));
    assert_eq!(get(&p, "rl-s3", "a").0, Flow::CONTINUE);
    assert_eq!(get(&p, "rl-s3", "b").0, Flow::CONTINUE);
    assert_eq!(get(&p, "rl-s3", "c").0, Flow::RESPOND);

    // Scope "operation": one count per operation.
    let p = build::<RateLimit>(json("operation"));
    let op = |op: &str| {
        let mut ctx = request("rl-s4");
        ctx.operation_id = op.into();
        local(&p, &mut TestHead::request("GET", "/"), &mut ctx)
    };
    assert_eq!(op("x"), Flow::CONTINUE);
    assert_eq!(op("x"), Flow::CONTINUE);
    assert_eq!(op("x"), Flow::RESPOND);
    assert_eq!(op("y"), Flow::CONTINUE);
}

#[test]
fn shared_counters_use_the_cache_with_stable_keys_and_ttls() {
    let p = build::<RateLimitByKey>(serde_json::json!({
        "calls": 5, "renewal_period": 60, "counter_key": "k-{header.x-client}",
        "increment_count": 2, "counter_cache": "shared",
        "remaining_calls_header_name": "x-remaining",
    }));
    fixed::set(T0 + 1_000);
    let mut cache = FakeCache::default();
    let mut ctx = request("");
    assert_eq!(on_request(&p, &mut client("one"), &mut ctx), Flow::PAUSE);
    let window = T0 / 60_000;
    assert_eq!(
        ctx.requests,
        vec![TestRequest::CounterAdd {
            cache: "shared".into(),
            key: format!("outpost:limit:rate-limit-by-key:calls:60:k-one:{window}").into_bytes(),
            delta: 2,
            ttl_ms: 65_000,
        }]
    );
    answer_pending(&mut ctx, &mut |r| cache.answer(r));
    assert_eq!(on_resume(&p, &mut client("one"), &mut ctx), Flow::CONTINUE);
    assert_eq!(var(&ctx, "outpost.response-header.x-remaining"), Some("3"));

    // The cache's count decides, whatever this process counted.
    let mut ctx = request("");
    send(&p, &mut client("one"), &mut ctx, &mut |r| cache.answer(r));
    assert_eq!(var(&ctx, "outpost.response-header.x-remaining"), Some("1"));
    let mut ctx = request("");
    assert_eq!(
        send(&p, &mut client("one"), &mut ctx, &mut |r| cache.answer(r)),
        Flow::RESPOND
    );
    assert_eq!(response(&ctx).0, 429);
    assert_eq!(cache.asked.len(), 3, "every request asked the cache");
}

#[test]
fn different_steps_keep_apart_and_a_shared_key_is_shared_on_purpose() {
    fixed::set(T0);
    let mut cache = FakeCache::default();
    let mut key_of = |p: &PolicyBox, sub: &str| {
        let mut ctx = request(sub);
        send(p, &mut client("same"), &mut ctx, &mut |r| cache.answer(r));
        match &ctx.requests[0] {
            TestRequest::CounterAdd { key, .. } => String::from_utf8(key.clone()).unwrap(),
            other => panic!("{other:?}"),
        }
    };
    let a = build::<RateLimit>(
        serde_json::json!({"calls": 10, "renewal_period": 60, "counter_cache": "shared"}),
    );
    let b = build::<RateLimit>(
        serde_json::json!({"calls": 20, "renewal_period": 60, "counter_cache": "shared"}),
    );
    let (ka, kb) = (key_of(&a, "sub"), key_of(&b, "sub"));
    assert_ne!(ka, kb, "two different rate limits keep their own counters");
    assert!(ka.starts_with("outpost:limit:rate-limit:") && ka.contains(":calls:sub:orders:"));

    let by_key = |calls: u64| {
        build::<RateLimitByKey>(serde_json::json!({
            "calls": calls, "renewal_period": 60, "counter_key": "{header.x-client}",
            "counter_cache": "shared",
        }))
    };
    assert_eq!(
        key_of(&by_key(10), ""),
        key_of(&by_key(20), ""),
        "the same counter key is the same counter, as in APIM"
    );
    let quota = build::<QuotaByKey>(serde_json::json!({
        "calls": 10, "renewal_period": 60, "counter_key": "{header.x-client}",
        "counter_cache": "shared",
    }));
    assert_ne!(
        key_of(&quota, ""),
        key_of(&by_key(10), ""),
        "kinds never mix"
    );
}

#[test]
fn a_failing_cache_falls_back_to_the_local_counter_for_that_request() {
    let p = build::<RateLimitByKey>(serde_json::json!({
        "calls": 2, "renewal_period": 60, "counter_key": "fallback-{header.x-client}",
        "counter_cache": "flaky",
    }));
    fixed::set(T0);
    let mut cache = FakeCache::default();
    // Two failures (an error, a timeout): counted here, and let through.
    for answer in [TestAnswer::error("connection refused"), timeout()] {
        let mut ctx = request("");
        let flow = send(&p, &mut client("f"), &mut ctx, &mut |_| answer.clone());
        assert_eq!(flow, Flow::CONTINUE);
        assert_eq!(ctx.requests.len(), 1);
    }
    // The cache is asked again (a failure is per request), and answers.
    let mut ctx = request("");
    assert_eq!(
        send(&p, &mut client("f"), &mut ctx, &mut |r| cache.answer(r)),
        Flow::CONTINUE
    );
    assert_eq!(cache.asked.len(), 1);
    // Failing again: the local counter holds 3 now, past the limit.
    let mut ctx = request("");
    assert_eq!(
        send(&p, &mut client("f"), &mut ctx, &mut |_| timeout()),
        Flow::RESPOND
    );
    assert_eq!(response(&ctx).0, 429);
}

#[test]
fn fail_closed_refuses_when_the_cache_fails() {
    let p = build::<Quota>(serde_json::json!({
        "calls": 100, "renewal_period": 3600, "counter_cache": "flaky",
        "on_cache_failure": "fail-closed",
    }));
    fixed::set(T0);
    let mut ctx = request("fc-sub");
    let flow = send(
        &p,
        &mut TestHead::request("GET", "/"),
        &mut ctx,
        &mut |_| TestAnswer::error("down"),
    );
    assert_eq!(flow, Flow::RESPOND);
    let (status, body, headers) = response(&ctx);
    assert_eq!(status, 503);
    assert_eq!(body["error"], "limit_unavailable");
    assert_eq!(header(headers, "content-type"), Some("application/json"));
    // The cache back: counted there.
    let mut cache = FakeCache::default();
    let mut ctx = request("fc-sub");
    assert_eq!(
        send(&p, &mut TestHead::request("GET", "/"), &mut ctx, &mut |r| {
            cache.answer(r)
        }),
        Flow::CONTINUE
    );
}

#[test]
fn without_a_default_cache_every_step_counts_locally_from_then_on() {
    // The only test that uses the default cache (its absence is remembered library-wide).
    let json = serde_json::json!({
        "calls": 1, "renewal_period": 60, "counter_key": "nocache-{header.x-client}",
    });
    let p = build::<RateLimitByKey>(json.clone());
    fixed::set(T0);
    let mut ctx = request("");
    assert_eq!(on_request(&p, &mut client("n"), &mut ctx), Flow::PAUSE);
    assert!(matches!(&ctx.requests[0], TestRequest::CounterAdd { cache, .. } if cache.is_empty()));
    ctx.answer(Token(1), not_configured());
    assert_eq!(on_resume(&p, &mut client("n"), &mut ctx), Flow::CONTINUE);
    // No more cache requests, from this step or any other; the count went on locally.
    let mut ctx = request("");
    assert_eq!(
        send(&p, &mut client("n"), &mut ctx, &mut never),
        Flow::RESPOND
    );
    let other = build::<RateLimitByKey>(json);
    let mut ctx = request("");
    assert_eq!(
        send(&other, &mut client("n2"), &mut ctx, &mut never),
        Flow::CONTINUE
    );
}

#[test]
fn an_increment_condition_counts_only_matching_responses() {
    let p = build::<RateLimitByKey>(serde_json::json!({
        "calls": 2, "renewal_period": 60, "counter_key": "cond-{header.x-client}",
        "increment_condition": {"statuses": [[200, 299]]}, "counter_cache": "shared",
        "remaining_calls_variable_name": "left",
    }));
    fixed::set(T0);
    let mut cache = FakeCache::default();
    let mut round = |status: u16| {
        let mut ctx = request("");
        let flow = send(&p, &mut client("c"), &mut ctx, &mut |r| cache.answer(r));
        if flow != Flow::CONTINUE {
            return (flow, ctx);
        }
        assert_eq!(var(&ctx, "outpost.on-response"), Some("1"));
        let mut resp = TestHead::response(status);
        assert_eq!(
            receive(&p, &mut resp, &mut ctx, &mut |r| cache.answer(r)),
            Flow::CONTINUE
        );
        (flow, ctx)
    };
    // Failures do not count; the request only reads the counter (delta 0).
    for _ in 0..3 {
        let (flow, ctx) = round(500);
        assert_eq!(flow, Flow::CONTINUE);
        assert!(matches!(
            &ctx.requests[0],
            TestRequest::CounterAdd { delta: 0, .. }
        ));
        assert_eq!(ctx.requests.len(), 1, "nothing counted at the response");
    }
    let (_, ctx) = round(200);
    assert_eq!(var(&ctx, "left"), Some("1"));
    assert!(matches!(
        &ctx.requests[1],
        TestRequest::CounterAdd { delta: 1, .. }
    ));
    let (_, ctx) = round(201);
    assert_eq!(var(&ctx, "left"), Some("0"));
    let (flow, ctx) = round(200);
    assert_eq!(flow, Flow::RESPOND);
    assert_eq!(response(&ctx).0, 429);
}

#[test]
fn quota_refuses_with_403_and_retry_after_and_renews() {
    let p = build::<Quota>(serde_json::json!({
        "calls": 2, "renewal_period": 3600, "counter_cache": "absent-4",
    }));
    fixed::set(T0 + 600_000);
    let get = || {
        let mut ctx = request("q-sub");
        (local(&p, &mut TestHead::request("GET", "/"), &mut ctx), ctx)
    };
    assert_eq!(get().0, Flow::CONTINUE);
    assert_eq!(get().0, Flow::CONTINUE);
    let (flow, ctx) = get();
    assert_eq!(flow, Flow::RESPOND);
    let (status, body, headers) = response(&ctx);
    assert_eq!(status, 403);
    assert_eq!(body["error"], "quota_exceeded");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("call volume quota. Quota will be replenished in 00:50:00"),
        "{body}"
    );
    assert_eq!(header(headers, "retry-after"), Some("3000"));
    // Requests without a subscription are not subject to it.
    let mut ctx = request("");
    assert_eq!(
        send(&p, &mut TestHead::request("GET", "/"), &mut ctx, &mut never),
        Flow::CONTINUE
    );
    fixed::set(T0 + 3_600_000);
    assert_eq!(get().0, Flow::CONTINUE, "a new period");
}

#[test]
fn a_lifetime_quota_never_renews() {
    let p = build::<QuotaByKey>(serde_json::json!({
        "calls": 1, "renewal_period": 0, "counter_key": "life-{header.x-client}",
        "counter_cache": "absent-5",
    }));
    fixed::set(T0);
    assert_eq!(
        local(&p, &mut client("l"), &mut request("")),
        Flow::CONTINUE
    );
    fixed::set(T0 + 400 * 24 * 3_600_000);
    let mut ctx = request("");
    assert_eq!(local(&p, &mut client("l"), &mut ctx), Flow::RESPOND);
    let (status, body, headers) = response(&ctx);
    assert_eq!(status, 403);
    assert_eq!(body["message"], "Out of call volume quota.");
    assert_eq!(header(headers, "retry-after"), None);
}

#[test]
fn bandwidth_counts_request_and_response_bytes() {
    let p = build::<Quota>(serde_json::json!({
        "bandwidth": 1, "renewal_period": 60, "counter_cache": "absent-6",
    }));
    fixed::set(T0);
    let upload = || TestHead::request("POST", "/").with_header("content-length", "300");
    let mut ctx = request("bw-sub");
    assert_eq!(local(&p, &mut upload(), &mut ctx), Flow::CONTINUE);
    assert_eq!(var(&ctx, "outpost.on-response"), Some("1"));
    let mut resp = TestHead::response(200).with_header("content-length", "700");
    assert_eq!(receive(&p, &mut resp, &mut ctx, &mut never), Flow::CONTINUE);
    // 1000 bytes used of 1024: one more request passes (and brings 300 more).
    let mut ctx = request("bw-sub");
    assert_eq!(local(&p, &mut upload(), &mut ctx), Flow::CONTINUE);
    let mut ctx = request("bw-sub");
    assert_eq!(local(&p, &mut upload(), &mut ctx), Flow::RESPOND);
    let (status, body, _) = response(&ctx);
    assert_eq!(status, 403);
    assert!(body["message"].as_str().unwrap().contains("bandwidth"));
}

#[test]
fn calls_and_bandwidth_each_refuse_and_go_through_the_cache_together() {
    let p = build::<QuotaByKey>(serde_json::json!({
        "calls": 3, "bandwidth": 2, "renewal_period": 60,
        "counter_key": "both-{header.x-client}", "counter_cache": "shared",
    }));
    fixed::set(T0);
    let mut cache = FakeCache::default();
    let body = |n: &str| client("b").with_header("content-length", n);
    let mut ctx = request("");
    assert_eq!(on_request(&p, &mut body("100"), &mut ctx), Flow::PAUSE);
    assert_eq!(ctx.requests.len(), 2, "both counters in one pause");
    let deltas: Vec<i64> = ctx
        .requests
        .iter()
        .map(|r| match r {
            TestRequest::CounterAdd { delta, .. } => *delta,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(deltas, [1, 100]);
    answer_pending(&mut ctx, &mut |r| cache.answer(r));
    assert_eq!(on_resume(&p, &mut body("100"), &mut ctx), Flow::CONTINUE);
    // The response's bytes go through the cache too; a failure there counts locally.
    let mut resp = TestHead::response(200).with_header("content-length", "2000");
    let mut asked = 0;
    assert_eq!(
        receive(&p, &mut resp, &mut ctx, &mut |r| {
            asked += 1;
            cache.answer(r)
        }),
        Flow::CONTINUE
    );
    assert_eq!(asked, 1, "only the bytes counter changes at the response");
    // 2100 bytes of 2048: refused on bandwidth though calls remain.
    let mut ctx = request("");
    assert_eq!(
        send(&p, &mut body("0"), &mut ctx, &mut |r| cache.answer(r)),
        Flow::RESPOND
    );
    assert!(response(&ctx).1["message"]
        .as_str()
        .unwrap()
        .contains("bandwidth"));

    // Calls alone run out too.
    let p = build::<QuotaByKey>(serde_json::json!({
        "calls": 1, "bandwidth": 1000, "renewal_period": 60,
        "counter_key": "calls-{header.x-client}", "counter_cache": "absent-7",
    }));
    assert_eq!(
        local(&p, &mut client("c"), &mut request("")),
        Flow::CONTINUE
    );
    let mut ctx = request("");
    assert_eq!(local(&p, &mut client("c"), &mut ctx), Flow::RESPOND);
    assert!(response(&ctx).1["message"]
        .as_str()
        .unwrap()
        .contains("call volume"));
}

#[test]
fn response_bytes_fall_back_locally_when_the_cache_fails() {
    let p = build::<Quota>(serde_json::json!({
        "bandwidth": 1, "renewal_period": 60, "counter_cache": "flaky",
    }));
    fixed::set(T0);
    let mut ctx = request("rb-sub");
    assert_eq!(
        send(
            &p,
            &mut TestHead::request("GET", "/"),
            &mut ctx,
            &mut |_| timeout()
        ),
        Flow::CONTINUE
    );
    let mut resp = TestHead::response(200).with_header("content-length", "5000");
    assert_eq!(
        receive(&p, &mut resp, &mut ctx, &mut |_| TestAnswer::error("down")),
        Flow::CONTINUE
    );
    let mut ctx = request("rb-sub");
    assert_eq!(
        send(
            &p,
            &mut TestHead::request("GET", "/"),
            &mut ctx,
            &mut |_| timeout()
        ),
        Flow::RESPOND,
        "the response's bytes were counted locally"
    );
}

#[test]
fn on_response_without_the_request_hook_does_nothing() {
    // A limit placed in the outbound section: its on_response is called for every response.
    let p = build::<Quota>(serde_json::json!({
        "bandwidth": 1, "renewal_period": 60, "counter_cache": "shared",
    }));
    let mut ctx = request("sub");
    let mut resp = TestHead::response(200).with_header("content-length", "5000");
    assert_eq!(on_response(&p, &mut resp, &mut ctx), Flow::CONTINUE);
    assert!(ctx.requests.is_empty());
}

#[test]
fn concurrency_permits_are_held_until_the_request_ends() {
    let p = build::<LimitConcurrency>(serde_json::json!({
        "key": "conc-{header.x-client}", "max_count": 2,
    }));
    let start = |id: &str| {
        let mut ctx = request("");
        let flow = on_request(&p, &mut client(id), &mut ctx);
        (flow, ctx)
    };
    let (f1, c1) = start("a");
    let (f2, c2) = start("a");
    assert_eq!((f1, f2), (Flow::CONTINUE, Flow::CONTINUE));
    assert_eq!(var(&c1, "outpost.notify-end"), Some("1"));
    assert!(c1.slot != 0 && c2.slot != 0);
    assert_eq!(local::permits().held("conc-a"), 2);
    let (f3, c3) = start("a");
    assert_eq!(f3, Flow::RESPOND);
    let (status, body, _) = response(&c3);
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("concurrency_limit_exceeded"))
    );
    assert_eq!(start("b").0, Flow::CONTINUE, "another key");

    // The first request ends (as the gateway calls it: phase END, empty head, its slot).
    let mut end = TestContext {
        phase: phase::END,
        slot: c1.slot,
        ..TestContext::default()
    };
    assert_eq!(
        on_resume(&p, &mut TestHead::default(), &mut end),
        Flow::CONTINUE
    );
    assert_eq!(local::permits().held("conc-a"), 1);
    let (f4, c4) = start("a");
    assert_eq!(f4, Flow::CONTINUE);
    for slot in [c2.slot, c4.slot] {
        let mut end = TestContext {
            phase: phase::END,
            slot,
            ..TestContext::default()
        };
        on_resume(&p, &mut TestHead::default(), &mut end);
    }
    assert_eq!(local::permits().held("conc-a"), 0);
}

#[test]
fn permits_are_reused_and_released_once() {
    let permits = Permits::new();
    let a = permits.acquire("k", 1).unwrap();
    assert_eq!(permits.acquire("k", 1), None);
    permits.release(a);
    permits.release(a); // a second release of the same permit changes nothing
    let b = permits.acquire("k", 1).unwrap();
    assert_eq!(b, a, "the freed entry is reused");
    let c = permits.acquire("other", 5).unwrap();
    permits.release(0);
    permits.release(u64::MAX);
    assert_eq!((permits.held("k"), permits.held("other")), (1, 1));
    permits.release(b);
    permits.release(c);
    assert_eq!((permits.held("k"), permits.held("other")), (0, 0));
}

#[test]
fn local_counters_drop_ended_windows_and_stay_bounded() {
    let shard = |k: &str| fnv1a(k.as_bytes()) as usize % SHARDS;
    // A key of the same shard as "w:1" (sweeping is per shard).
    let neighbour = (2..)
        .map(|i| format!("w:{i}"))
        .find(|k| shard(k) == shard("w:1"))
        .unwrap();
    let c = Counters::new();
    assert_eq!(c.add("w:1", 1, 1_000, 0), 1);
    assert_eq!(c.add("w:1", 2, 1_000, 10), 3);
    assert_eq!(c.add("other", 1, 2_000, 10), 1);
    assert_eq!(c.len(), 2);
    // Past the first one's end, the next new key of its shard sweeps it away.
    assert_eq!(c.add(&neighbour, 1, 3_000, 1_500), 1);
    assert_eq!(c.len(), 2);
    // An ended key that comes back starts again.
    assert_eq!(c.add("other", 5, 9_000, 2_500), 5);

    // A flood of keys stays within the bound, and every new key is still counted (an older
    // counter makes room).
    let c = Counters::bounded(4);
    for i in 0..(4 * SHARDS * 3) {
        assert_eq!(c.add(&format!("flood:{i}"), 1, u64::MAX, 0), 1);
    }
    assert_eq!(c.len(), 4 * SHARDS);
    let last = format!("flood:{}", 4 * SHARDS * 3 - 1);
    assert_eq!(c.add(&last, 1, u64::MAX, 0), 2, "the newest key was kept");
}

#[test]
fn bad_configs_are_refused_with_the_field_named() {
    use serde_json::json;
    let rate = |extra: Value| {
        let mut j = json!({"calls": 5, "renewal_period": 60, "counter_key": "{client.ip}"});
        j.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        refused::<RateLimitByKey>(j)
    };
    for (extra, needle) in [
        (json!({"calls": 0}), "calls must be at least 1"),
        (
            json!({"renewal_period": 0}),
            "renewal_period must be at least 1",
        ),
        (json!({"renewal_period": 400_000_000}), "renewal_period"),
        (
            json!({"counter_key": "{client.port}"}),
            "counter_key: unknown expression '{client.port}'",
        ),
        (json!({"counter_key": "{header.x"}), "counter_key"),
        (json!({"colour": "red"}), "unknown field `colour`"),
        (json!({"calls": "ten"}), "calls: invalid type"),
        (
            json!({"increment_count": 0}),
            "increment_count must be at least 1",
        ),
        (
            json!({"increment_count": 6}),
            "increment_count 6 is larger than calls 5",
        ),
        (
            json!({"remaining_calls_header_name": "bad header"}),
            "remaining_calls_header_name",
        ),
        (
            json!({"retry_after_variable_name": "outpost.status"}),
            "reserved",
        ),
        (
            json!({"on_cache_failure": "open"}),
            "on_cache_failure: unknown variant `open`",
        ),
        (
            json!({"increment_condition": {"statuses": []}}),
            "increment_condition.statuses",
        ),
        (
            json!({"increment_condition": {"statuses": [[300, 200]]}}),
            "[300, 200]",
        ),
    ] {
        let e = rate(extra.clone());
        assert!(e.contains(needle), "{extra}: {e}");
    }
    let e = refused::<RateLimitByKey>(json!({"calls": 5, "renewal_period": 60}));
    assert!(e.contains("missing field `counter_key`"), "{e}");
    let e = refused::<RateLimit>(json!({"calls": 5, "renewal_period": 0}));
    assert!(e.contains("renewal_period"), "{e}");
    let e =
        refused::<RateLimit>(json!({"calls": 5, "renewal_period": 1, "counter_scope": "product"}));
    assert!(e.contains("counter_scope"), "{e}");
    let e = refused::<Quota>(json!({"renewal_period": 60}));
    assert!(e.contains("give calls, bandwidth"), "{e}");
    let e = refused::<Quota>(json!({"bandwidth": 0, "renewal_period": 60}));
    assert!(e.contains("bandwidth must be at least 1"), "{e}");
    let e = refused::<Quota>(json!({"calls": 0, "renewal_period": 60}));
    assert!(e.contains("calls must be at least 1"), "{e}");
    let e = refused::<QuotaByKey>(json!({
        "bandwidth": 5, "renewal_period": 60, "counter_key": "k",
        "increment_condition": {"statuses": [[200, 299]]},
    }));
    assert!(e.contains("give calls too"), "{e}");
    let e = refused::<LimitConcurrency>(json!({"key": "k", "max_count": 0}));
    assert!(e.contains("max_count must be at least 1"), "{e}");
    let e = refused::<LimitConcurrency>(json!({"key": "{nope}", "max_count": 1}));
    assert!(e.contains("key: unknown expression '{nope}'"), "{e}");
    let e = refused::<LimitConcurrency>(json!({"key": "k", "max_count": 1, "timeout": 5}));
    assert!(e.contains("unknown field `timeout`"), "{e}");
}

#[test]
fn every_readme_example_is_a_valid_step() {
    let readme = include_str!("../README.md");
    let mut seen = Vec::new();
    let mut rest = readme;
    while let Some(start) = rest.find("```json\n") {
        let block = &rest[start + 8..];
        let end = block.find("```").expect("closed block");
        let step: Value = serde_json::from_str(&block[..end])
            .unwrap_or_else(|e| panic!("README block is not JSON: {e}\n{}", &block[..end]));
        let obj = step.as_object().expect("an object");
        assert_eq!(obj.len(), 2, "{step}");
        let name = step["policy"].as_str().expect("policy");
        let config = step["config"].clone();
        match name {
            "rate-limit" => _ = build::<RateLimit>(config),
            "rate-limit-by-key" => _ = build::<RateLimitByKey>(config),
            "quota" => _ = build::<Quota>(config),
            "quota-by-key" => _ = build::<QuotaByKey>(config),
            "limit-concurrency" => _ = build::<LimitConcurrency>(config),
            other => panic!("README names an unknown policy '{other}'"),
        }
        seen.push(name.to_owned());
        rest = &block[end + 3..];
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "limit-concurrency",
            "quota",
            "quota-by-key",
            "rate-limit",
            "rate-limit-by-key"
        ]
    );
}
