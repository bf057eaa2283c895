//! The policies driven through the SDK's harness, the cache's answers scripted.

use outpost_plugin_sdk::api::PolicyBox;
use outpost_plugin_sdk::serde_json::{self, json, Value};
use outpost_plugin_sdk::testing::{
    on_request, on_response, on_resume, policy, TestAnswer, TestContext, TestHead, TestRequest,
};
use outpost_plugin_sdk::{Flow, HostStatus, Token};

use super::*;
use crate::response::PENDING;

/// The cache key for this key material.
fn key_of(material: &str) -> String {
    let mut s = material.to_owned();
    crate::response::digest_key(&mut s);
    s
}

fn build<P: outpost_plugin_sdk::Policy>(config: Value) -> PolicyBox {
    policy::<P>(&config.to_string()).unwrap_or_else(|e| panic!("{config} refused: {}", e.message))
}

fn refused<P: outpost_plugin_sdk::Policy>(config: Value) -> String {
    match policy::<P>(&config.to_string()) {
        Ok(_) => panic!("{config} accepted"),
        Err(e) => e.message.into_string(),
    }
}

fn ctx() -> TestContext {
    TestContext {
        api_id: "svc".into(),
        operation_id: "items".into(),
        subscription_id: "sub-1".into(),
        request_id: "req-1".into(),
        ..TestContext::default()
    }
}

fn get(path_and_query: &str) -> TestHead {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let mut h = TestHead::request("GET", path);
    h.query = query.into();
    h
}

/// The last piece of host work asked for, and its token.
fn last(ctx: &TestContext) -> (Token, TestRequest) {
    let r = ctx.requests.last().expect("asked for work").clone();
    (Token(ctx.requests.len() as u32), r)
}

fn answer_last(ctx: &mut TestContext, a: TestAnswer) {
    let (t, _) = last(ctx);
    ctx.answer(t, a);
}

/// Runs `cache-lookup` on a request, answering its lookup with `answer`. Returns the flow and
/// the key it looked up (`None` when it did not look up).
fn lookup(
    p: &PolicyBox,
    req: &mut TestHead,
    ctx: &mut TestContext,
    answer: TestAnswer,
) -> (Flow, Option<Vec<u8>>) {
    let before = ctx.requests.len();
    let flow = on_request(p, req, ctx);
    if flow != Flow::PAUSE {
        assert_eq!(ctx.requests.len(), before, "no work without a pause");
        return (flow, None);
    }
    let (_, work) = last(ctx);
    let TestRequest::CacheGet { key, .. } = work else {
        panic!("asked for {work:?}")
    };
    answer_last(ctx, answer);
    (on_resume(p, req, ctx), Some(key))
}

/// A stored entry: cache, key, value, TTL in ms.
type Set = (String, Vec<u8>, Vec<u8>, u64);

/// What `cache-store` did with a response: the entry it stored (cache, key, value, TTL), if
/// any. `body` answers its body read (`None`: the body was larger than its limit).
fn store(
    p: &PolicyBox,
    resp: &mut TestHead,
    ctx: &mut TestContext,
    body: Option<&[u8]>,
    set_answer: TestAnswer,
) -> Option<Set> {
    let flow = on_response(p, resp, ctx);
    if flow == Flow::CONTINUE {
        return None;
    }
    assert_eq!(flow, Flow::PAUSE);
    let (_, work) = last(ctx);
    assert!(matches!(work, TestRequest::Body { .. }), "{work:?}");
    match body {
        Some(b) => {
            ctx.body = Some(b.to_vec());
            answer_last(ctx, TestAnswer::value(b""));
        }
        None => answer_last(
            ctx,
            TestAnswer {
                status: HostStatus::TOO_LARGE.0,
                ..TestAnswer::default()
            },
        ),
    }
    let flow = on_resume(p, resp, ctx);
    if flow == Flow::CONTINUE {
        return None;
    }
    assert_eq!(flow, Flow::PAUSE);
    let (_, work) = last(ctx);
    let TestRequest::CacheSet {
        cache,
        key,
        value,
        ttl_ms,
    } = work
    else {
        panic!("asked for {work:?}")
    };
    answer_last(ctx, set_answer);
    assert_eq!(on_resume(p, resp, ctx), Flow::CONTINUE);
    Some((cache, key, value, ttl_ms))
}

fn ok() -> TestAnswer {
    TestAnswer::value(b"")
}

fn ok_response() -> TestHead {
    TestHead::response(200)
        .with_header("content-type", "application/json")
        .with_header("x-many", "1")
        .with_header("x-many", "2")
        .with_header("content-length", "7")
        .with_header("date", "Mon, 01 Jan 2024 00:00:00 GMT")
        .with_header("connection", "keep-alive")
}

/// A request through lookup (miss) and store; answers the stored entry.
fn miss_and_store(
    lookup_p: &PolicyBox,
    store_p: &PolicyBox,
    req: &mut TestHead,
    resp: &mut TestHead,
    body: &[u8],
) -> (TestContext, Option<Set>) {
    let mut c = ctx();
    let (flow, key) = lookup(lookup_p, req, &mut c, TestAnswer::miss());
    assert_eq!(flow, Flow::CONTINUE);
    assert_eq!(c.cache_status, "miss");
    let stored = store(store_p, resp, &mut c, Some(body), ok());
    if let Some((_, k, _, _)) = &stored {
        assert_eq!(Some(k), key.as_ref(), "stored under the key looked up");
    }
    (c, stored)
}

#[test]
fn a_miss_is_stored_and_the_next_request_is_answered_from_the_entry() {
    let l = build::<CacheLookup>(json!({}));
    let s = build::<CacheStore>(json!({ "duration": 60 }));
    let (c, stored) = miss_and_store(
        &l,
        &s,
        &mut get("/svc/items?page=2"),
        &mut ok_response(),
        b"[1,2,3]",
    );
    let (cache, key, entry, ttl_ms) = stored.expect("stored");
    assert_eq!(cache, "", "the default cache");
    assert_eq!(ttl_ms, 60_000);
    assert_eq!(
        String::from_utf8(key.clone()).unwrap(),
        key_of("svc\nitems\nGET\n/svc/items"),
        "the query is not part of the key unless asked"
    );
    assert!(
        c.variables[PENDING].ends_with(&format!("\n\n{}", key_of("svc\nitems\nGET\n/svc/items")))
    );

    // Hit: answered from the entry, without the backend.
    let mut c = ctx();
    let (flow, key2) = lookup(
        &l,
        &mut get("/svc/items?page=3"),
        &mut c,
        TestAnswer::value(&entry),
    );
    assert_eq!(flow, Flow::RESPOND);
    assert_eq!(key2, Some(key));
    assert_eq!(c.cache_status, "hit");
    let (status, headers, body) = c.response.expect("answered");
    assert_eq!(status, 200);
    assert_eq!(body, b"[1,2,3]");
    let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["content-type", "x-many", "x-many", "age"]);
    assert_eq!(headers[1].1, b"1");
    assert_eq!(headers[2].1, b"2");
    assert_eq!(headers[3].1, b"0");
}

#[test]
fn a_lookup_without_config_takes_the_defaults() {
    let l = policy::<CacheLookup>("null").expect("no config");
    let mut c = ctx();
    let (flow, key) = lookup(&l, &mut get("/svc/items?a=1"), &mut c, TestAnswer::miss());
    assert_eq!(flow, Flow::CONTINUE);
    assert_eq!(
        key.as_deref(),
        Some(key_of("svc\nitems\nGET\n/svc/items").as_bytes())
    );
    assert!(
        c.variables[PENDING].starts_with("n100\n"),
        "{:?}",
        c.variables
    );
}

#[test]
fn keys_vary_by_the_listed_query_parameters_headers_and_subscription() {
    let key = |config: Value, req: &mut TestHead, c: &mut TestContext| -> String {
        let p = build::<CacheLookup>(config);
        let (_, key) = lookup(&p, req, c, TestAnswer::miss());
        String::from_utf8(key.expect("looked up")).unwrap()
    };
    let listed = json!({ "vary_by_query_parameter": ["page", "size", "page"] });
    let k = key(
        listed.clone(),
        &mut get("/svc/items?size=10&x=1&page=2&page=3"),
        &mut ctx(),
    );
    assert_eq!(
        k,
        key_of("svc\nitems\nGET\n/svc/items\nq:page=2\nq:page=3\nq:size=10")
    );
    let k2 = key(
        listed,
        &mut get("/svc/items?page=2&x=9&page=3&size=10"),
        &mut ctx(),
    );
    assert_eq!(
        k, k2,
        "other parameters and the order of the listed ones do not matter"
    );

    let all = json!({ "vary_by_query_parameter": ["*"] });
    let a = key(all.clone(), &mut get("/svc/items?b=2&a=1&flag"), &mut ctx());
    assert_eq!(
        a,
        key_of("svc\nitems\nGET\n/svc/items\nq:a=1\nq:b=2\nq:flag=")
    );
    assert_eq!(
        a,
        key(all.clone(), &mut get("/svc/items?flag&a=1&b=2"), &mut ctx())
    );
    assert_ne!(
        a,
        key(all.clone(), &mut get("/svc/items?flag&a=1&b=3"), &mut ctx())
    );
    assert_ne!(
        key(all.clone(), &mut get("/svc/items?a=1&a=2"), &mut ctx()),
        key(all, &mut get("/svc/items?a=2&a=1"), &mut ctx()),
        "a repeated parameter's values keep their order"
    );

    let headers = json!({ "vary_by_header": ["Accept", "X-Tenant"] });
    let h = key(
        headers.clone(),
        &mut get("/svc/items")
            .with_header("accept", "text/plain")
            .with_header("accept", "application/json"),
        &mut ctx(),
    );
    assert_eq!(
        h,
        key_of("svc\nitems\nGET\n/svc/items\nh:accept=text/plain,application/json\nh:x-tenant")
    );
    let mut raw = get("/svc/items");
    raw.headers.push(("x-tenant".into(), b"a\xffb%".to_vec()));
    let r = key(headers.clone(), &mut raw, &mut ctx());
    assert_eq!(
        r,
        key_of("svc\nitems\nGET\n/svc/items\nh:accept\nh:x-tenant=a%FFb%25")
    );
    assert_ne!(
        key(
            headers.clone(),
            &mut get("/svc/items").with_header("x-tenant", ""),
            &mut ctx()
        ),
        key(headers, &mut get("/svc/items"), &mut ctx()),
        "an empty header is not a missing one"
    );

    let dev = json!({ "vary_by_developer": true });
    let d1 = key(dev.clone(), &mut get("/svc/items"), &mut ctx());
    let mut other = ctx();
    other.subscription_id = "sub-2".into();
    let d2 = key(dev, &mut get("/svc/items"), &mut other);
    assert_eq!(d1, key_of("svc\nitems\nGET\n/svc/items\nd:sub-1"));
    assert_eq!(d2, key_of("svc\nitems\nGET\n/svc/items\nd:sub-2"));
}

#[test]
fn only_get_requests_are_looked_up_and_clients_can_bypass() {
    let l = build::<CacheLookup>(json!({}));
    let s = build::<CacheStore>(json!({ "duration": 60 }));
    for method in ["POST", "HEAD", "PUT", "DELETE"] {
        let mut c = ctx();
        let (flow, key) = lookup(
            &l,
            &mut TestHead::request(method, "/svc/items"),
            &mut c,
            ok(),
        );
        assert_eq!((flow, key), (Flow::CONTINUE, None), "{method}");
        assert!(c.variables.is_empty() && c.cache_status.is_empty());
        assert!(store(&s, &mut ok_response(), &mut c, Some(b"x"), ok()).is_none());
    }

    // no-store: neither looked up nor stored.
    let mut c = ctx();
    let mut req = get("/svc/items").with_header("cache-control", "No-Store");
    assert_eq!(lookup(&l, &mut req, &mut c, ok()), (Flow::CONTINUE, None));
    assert_eq!(c.cache_status, "bypass");
    assert!(store(&s, &mut ok_response(), &mut c, Some(b"x"), ok()).is_none());

    // no-cache (or Pragma: no-cache): not looked up, but the fresh answer is stored.
    for (name, value) in [
        ("cache-control", "max-age=0, no-cache"),
        ("pragma", "no-cache"),
    ] {
        let mut c = ctx();
        let mut req = get("/svc/items").with_header(name, value);
        assert_eq!(lookup(&l, &mut req, &mut c, ok()), (Flow::CONTINUE, None));
        assert_eq!(c.cache_status, "bypass");
        let (_, key, _, _) =
            store(&s, &mut ok_response(), &mut c, Some(b"x"), ok()).expect("stored");
        assert_eq!(key, key_of("svc\nitems\nGET\n/svc/items").as_bytes());
    }

    // Authorization: private unless allowed.
    let mut c = ctx();
    let mut req = get("/svc/items").with_header("authorization", "Bearer x");
    assert_eq!(lookup(&l, &mut req, &mut c, ok()), (Flow::CONTINUE, None));
    assert_eq!(c.cache_status, "bypass");
    let allowed = build::<CacheLookup>(json!({ "allow_private_response_caching": true }));
    let (flow, key) = lookup(&allowed, &mut req, &mut ctx(), TestAnswer::miss());
    assert_eq!(flow, Flow::CONTINUE);
    assert!(key.is_some());
}

#[test]
fn responses_that_must_not_be_shared_are_not_stored() {
    let l = build::<CacheLookup>(json!({}));
    let s = build::<CacheStore>(json!({ "duration": 60 }));
    let not_stored = |resp: TestHead| {
        let (_, stored) = miss_and_store(&l, &s, &mut get("/svc/items"), &mut resp.clone(), b"x");
        assert!(stored.is_none(), "{resp:?} was stored");
    };
    for cc in [
        "no-store",
        "no-cache",
        "private",
        "public, max-age=0",
        "s-maxage=0, max-age=60",
    ] {
        not_stored(ok_response().with_header("cache-control", cc));
    }
    not_stored(ok_response().with_header("set-cookie", "session=1"));
    not_stored(ok_response().with_header("vary", "Accept, *"));
    // Only 200, unless cache_response.
    for status in [201, 204, 301, 404, 500] {
        not_stored(TestHead::response(status));
    }
    let any = build::<CacheStore>(json!({ "duration": 60, "cache_response": true }));
    let (_, stored) = miss_and_store(
        &l,
        &any,
        &mut get("/svc/x"),
        &mut TestHead::response(404),
        b"",
    );
    let (_, _, entry, _) = stored.expect("a 404 is stored with cache_response");
    assert_eq!(crate::entry::Entry::decode(&entry).unwrap().status, 404);

    // `private` is stored when the lookup allows private caching.
    let private = build::<CacheLookup>(json!({ "allow_private_response_caching": true }));
    let (_, stored) = miss_and_store(
        &private,
        &s,
        &mut get("/svc/items"),
        &mut ok_response().with_header("cache-control", "private, max-age=30"),
        b"x",
    );
    assert_eq!(stored.expect("stored").3, 30_000);

    // Larger than max_body_bytes: not stored.
    let small = build::<CacheStore>(json!({ "duration": 60, "max_body_bytes": 4 }));
    let mut c = ctx();
    lookup(&l, &mut get("/svc/items"), &mut c, TestAnswer::miss());
    assert!(store(&small, &mut ok_response(), &mut c, None, ok()).is_none());
    assert!(matches!(
        c.requests.last(),
        Some(TestRequest::Body { limit: 4 })
    ));
}

#[test]
fn max_age_and_s_maxage_cap_the_duration() {
    let l = build::<CacheLookup>(json!({}));
    let s = build::<CacheStore>(json!({ "duration": 60 }));
    for (cc, ttl_ms) in [
        ("max-age=10", 10_000),
        ("public, max-age=600", 60_000),
        ("max-age=10, s-maxage=5", 5_000),
        ("s-maxage=30, max-age=5", 30_000),
    ] {
        let (_, stored) = miss_and_store(
            &l,
            &s,
            &mut get("/svc/items"),
            &mut ok_response().with_header("cache-control", cc),
            b"x",
        );
        assert_eq!(stored.expect(cc).3, ttl_ms, "{cc}");
    }
}

#[test]
fn downstream_caching_sets_cache_control_for_clients() {
    let l = build::<CacheLookup>(json!({ "downstream_caching_type": "public" }));
    let s = build::<CacheStore>(json!({ "duration": 60 }));
    let mut resp = ok_response().with_header("cache-control", "max-age=20");
    let (_, stored) = miss_and_store(&l, &s, &mut get("/svc/items"), &mut resp, b"x");
    assert_eq!(
        resp.header_str("cache-control"),
        Some("public, max-age=20, must-revalidate"),
        "the miss's response"
    );
    let entry = stored.expect("stored").2;
    let mut c = ctx();
    let (flow, _) = lookup(
        &l,
        &mut get("/svc/items"),
        &mut c,
        TestAnswer::value(&entry),
    );
    assert_eq!(flow, Flow::RESPOND);
    let headers = c.response.unwrap().1;
    let cc: Vec<&[u8]> = headers
        .iter()
        .filter(|(n, _)| n == "cache-control")
        .map(|(_, v)| v.as_slice())
        .collect();
    assert_eq!(
        cc,
        [b"public, max-age=20, must-revalidate".as_slice()],
        "the stored one is replaced"
    );

    let p = build::<CacheLookup>(
        json!({ "downstream_caching_type": "private", "must_revalidate": false }),
    );
    let mut c = ctx();
    lookup(
        &p,
        &mut get("/svc/items"),
        &mut c,
        TestAnswer::value(&entry),
    );
    let headers = c.response.unwrap().1;
    assert!(headers
        .iter()
        .any(|(n, v)| n == "cache-control" && v.as_slice() == b"private, max-age=20"));

    // Without downstream caching the backend's header is what clients get.
    let n = build::<CacheLookup>(json!({}));
    let mut resp = ok_response().with_header("cache-control", "max-age=20");
    let (_, stored) = miss_and_store(&n, &s, &mut get("/svc/items"), &mut resp, b"x");
    assert_eq!(resp.header_str("cache-control"), Some("max-age=20"));
    let mut c = ctx();
    lookup(
        &n,
        &mut get("/svc/items"),
        &mut c,
        TestAnswer::value(&stored.unwrap().2),
    );
    let headers = c.response.unwrap().1;
    assert!(headers
        .iter()
        .any(|(n, v)| n == "cache-control" && v.as_slice() == b"max-age=20"));
}

#[test]
fn a_failing_cache_is_a_miss_or_fails_closed() {
    let l = build::<CacheLookup>(json!({ "cache": "shared" }));
    let s = build::<CacheStore>(json!({ "duration": 60 }));
    for failure in [
        TestAnswer::error("redis: Connection refused"),
        TestAnswer {
            status: HostStatus::TIMEOUT.0,
            error: "cache 'shared' did not answer within 100ms".into(),
            ..TestAnswer::default()
        },
    ] {
        let mut c = ctx();
        let (flow, _) = lookup(&l, &mut get("/svc/items"), &mut c, failure.clone());
        assert_eq!(flow, Flow::CONTINUE, "served by the backend");
        assert_eq!(c.cache_status, "miss");
        assert!(matches!(&c.requests[0], TestRequest::CacheGet { cache, .. } if cache == "shared"));
        // Not stored: that would cost the client a second deadline on a failing cache.
        assert!(store(&s, &mut ok_response(), &mut c, Some(b"x"), ok()).is_none());
    }

    // A damaged entry is a miss too (and stored over).
    let mut c = ctx();
    let (flow, _) = lookup(
        &l,
        &mut get("/svc/items"),
        &mut c,
        TestAnswer::value(b"garbage"),
    );
    assert_eq!(flow, Flow::CONTINUE);
    assert_eq!(c.cache_status, "miss");
    assert!(store(&s, &mut ok_response(), &mut c, Some(b"x"), ok()).is_some());

    // A failing store does not fail the response.
    let mut c = ctx();
    lookup(&l, &mut get("/svc/items"), &mut c, TestAnswer::miss());
    assert!(store(
        &s,
        &mut ok_response(),
        &mut c,
        Some(b"x"),
        TestAnswer::error("down")
    )
    .is_some());
    assert!(c.response.is_none());

    let closed = build::<CacheLookup>(json!({ "fail_closed": true }));
    let mut c = ctx();
    let (flow, _) = lookup(
        &closed,
        &mut get("/svc/items"),
        &mut c,
        TestAnswer::error("down"),
    );
    assert_eq!(flow, Flow::RESPOND);
    let (status, headers, body) = c.response.expect("answered");
    assert_eq!(status, 503);
    assert!(headers
        .iter()
        .any(|(n, v)| n == "content-type" && v.as_slice() == b"application/json"));
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"], "cache_unavailable");
    assert_eq!(body["statusCode"], 503);
    assert_eq!(body["requestId"], "req-1");
    assert!(body["message"].as_str().unwrap().contains("(default)"));
}

#[test]
fn caching_type_picks_the_cache_and_whether_its_absence_counts() {
    let not_configured = || TestAnswer {
        status: HostStatus::NOT_CONFIGURED.0,
        error: "no cache".into(),
        ..TestAnswer::default()
    };
    let cache_of = |config: Value| {
        let p = build::<CacheLookup>(config);
        let mut c = ctx();
        on_request(&p, &mut get("/svc/items"), &mut c);
        match &c.requests[0] {
            TestRequest::CacheGet { cache, .. } => cache.clone(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(cache_of(json!({})), "");
    assert_eq!(cache_of(json!({ "caching_type": "external" })), "");
    assert_eq!(cache_of(json!({ "caching_type": "internal" })), "internal");
    assert_eq!(
        cache_of(json!({ "caching_type": "internal", "cache": "mem" })),
        "mem"
    );

    // prefer-external: no cache on this gateway, no caching, quietly.
    let p = build::<CacheLookup>(json!({ "fail_closed": true }));
    let s = build::<CacheStore>(json!({ "duration": 60 }));
    let mut c = ctx();
    assert_eq!(
        lookup(&p, &mut get("/svc/items"), &mut c, not_configured()).0,
        Flow::CONTINUE
    );
    assert!(c.cache_status.is_empty());
    assert!(store(&s, &mut ok_response(), &mut c, Some(b"x"), ok()).is_none());
    // external: it is a failure.
    let p = build::<CacheLookup>(json!({ "caching_type": "external", "fail_closed": true }));
    let mut c = ctx();
    assert_eq!(
        lookup(&p, &mut get("/svc/items"), &mut c, not_configured()).0,
        Flow::RESPOND
    );
    assert_eq!(c.response.unwrap().0, 503);
}

#[test]
fn entries_past_their_expiry_are_misses() {
    let entry = crate::entry::Stored {
        status: 200,
        stored_ms: 1,
        expires_ms: 2,
    }
    .encode(std::iter::empty, b"old")
    .unwrap();
    let l = build::<CacheLookup>(json!({}));
    let mut c = ctx();
    let (flow, _) = lookup(
        &l,
        &mut get("/svc/items"),
        &mut c,
        TestAnswer::value(&entry),
    );
    assert_eq!(flow, Flow::CONTINUE);
    assert_eq!(c.cache_status, "miss");
    assert!(c.response.is_none());
}

#[test]
fn value_policies_read_store_and_remove_under_templated_keys() {
    let lv = build::<CacheLookupValue>(json!({
        "key": "colour:{header.x-user}", "variable_name": "colour", "default_value": "none"
    }));
    let req = || get("/svc/x").with_header("x-user", "ann");

    // Found.
    let mut c = ctx();
    assert_eq!(on_request(&lv, &mut req(), &mut c), Flow::PAUSE);
    assert_eq!(
        c.requests[0],
        TestRequest::CacheGet {
            cache: String::new(),
            key: b"value:colour:ann".to_vec()
        }
    );
    answer_last(&mut c, TestAnswer::value(b"teal"));
    assert_eq!(on_resume(&lv, &mut req(), &mut c), Flow::CONTINUE);
    assert_eq!(c.variables["colour"], "teal");

    // Missing, or a failing cache: the default (counted as a failure in the second case).
    for answer in [TestAnswer::miss(), TestAnswer::error("down")] {
        let mut c = ctx();
        on_request(&lv, &mut req(), &mut c);
        answer_last(&mut c, answer);
        assert_eq!(on_resume(&lv, &mut req(), &mut c), Flow::CONTINUE);
        assert_eq!(c.variables["colour"], "none");
    }
    // No default: left unset.
    let bare = build::<CacheLookupValue>(json!({ "key": "k", "variable_name": "v" }));
    let mut c = ctx();
    on_request(&bare, &mut req(), &mut c);
    answer_last(&mut c, TestAnswer::miss());
    on_resume(&bare, &mut req(), &mut c);
    assert!(!c.variables.contains_key("v"));
    // In the outbound section too.
    let mut c = ctx();
    assert_eq!(
        on_response(&bare, &mut TestHead::response(200), &mut c),
        Flow::PAUSE
    );

    // Store: key and value rendered, TTL from duration.
    let sv = build::<CacheStoreValue>(json!({
        "key": "colour:{header.x-user}", "value": "{query.c}", "duration": 30, "cache": "shared"
    }));
    let mut c = ctx();
    let mut r = get("/svc/x?c=red%20dish").with_header("x-user", "ann");
    assert_eq!(on_request(&sv, &mut r, &mut c), Flow::PAUSE);
    assert_eq!(
        c.requests[0],
        TestRequest::CacheSet {
            cache: "shared".into(),
            key: b"value:colour:ann".to_vec(),
            value: b"red dish".to_vec(),
            ttl_ms: 30_000
        }
    );
    answer_last(&mut c, ok());
    assert_eq!(on_resume(&sv, &mut r, &mut c), Flow::CONTINUE);

    // Remove.
    let rv = build::<CacheRemoveValue>(json!({ "key": "colour:{header.x-user}" }));
    let mut c = ctx();
    assert_eq!(on_request(&rv, &mut req(), &mut c), Flow::PAUSE);
    assert_eq!(
        c.requests[0],
        TestRequest::CacheDelete {
            cache: String::new(),
            key: b"value:colour:ann".to_vec()
        }
    );
    answer_last(&mut c, TestAnswer::number(1));
    assert_eq!(on_resume(&rv, &mut req(), &mut c), Flow::CONTINUE);

    // fail_closed: 503 for each of them.
    for p in [
        build::<CacheLookupValue>(json!({ "key": "k", "variable_name": "v", "fail_closed": true })),
        build::<CacheStoreValue>(
            json!({ "key": "k", "value": "x", "duration": 5, "fail_closed": true }),
        ),
        build::<CacheRemoveValue>(json!({ "key": "k", "fail_closed": true })),
    ] {
        let mut c = ctx();
        assert_eq!(on_request(&p, &mut req(), &mut c), Flow::PAUSE);
        answer_last(
            &mut c,
            TestAnswer {
                status: HostStatus::TIMEOUT.0,
                ..TestAnswer::default()
            },
        );
        assert_eq!(on_resume(&p, &mut req(), &mut c), Flow::RESPOND);
        assert_eq!(c.response.unwrap().0, 503);
    }
    // Without it, a failing store or remove carries on.
    let mut c = ctx();
    on_request(&rv, &mut req(), &mut c);
    answer_last(&mut c, TestAnswer::error("down"));
    assert_eq!(on_resume(&rv, &mut req(), &mut c), Flow::CONTINUE);
    assert!(c.response.is_none());
}

#[test]
fn bad_configs_are_refused_naming_the_field() {
    let cases: Vec<(String, &str)> = vec![
        (
            refused::<CacheLookup>(json!({ "vary_by_header": ["bad name"] })),
            "vary_by_header",
        ),
        (
            refused::<CacheLookup>(json!({ "vary_by_query_parameter": ["*", "a"] })),
            "vary_by_query_parameter",
        ),
        (
            refused::<CacheLookup>(json!({ "vary_by_query_parameter": ["a=b"] })),
            "vary_by_query_parameter",
        ),
        (
            refused::<CacheLookup>(json!({ "caching_type": "remote" })),
            "caching_type",
        ),
        (
            refused::<CacheLookup>(json!({ "downstream_caching_type": "shared" })),
            "downstream_caching_type",
        ),
        (
            refused::<CacheLookup>(json!({ "vary_by_user": true })),
            "vary_by_user",
        ),
        (refused::<CacheStore>(json!({})), "duration"),
        (refused::<CacheStore>(json!({ "duration": 0 })), "duration"),
        (
            refused::<CacheStore>(json!({ "duration": "ten" })),
            "duration: invalid type",
        ),
        (
            refused::<CacheLookup>(json!({ "vary_by_header": "Accept" })),
            "vary_by_header: invalid type",
        ),
        (
            refused::<CacheStore>(json!({ "duration": 5, "max_body_bytes": 0 })),
            "max_body_bytes",
        ),
        (
            refused::<CacheLookupValue>(json!({ "key": "k" })),
            "variable_name",
        ),
        (
            refused::<CacheLookupValue>(json!({ "key": "k", "variable_name": "outpost.backend" })),
            "variable_name",
        ),
        (
            refused::<CacheLookupValue>(json!({ "key": "{nope}", "variable_name": "v" })),
            "key",
        ),
        (
            refused::<CacheStoreValue>(json!({ "key": "k", "value": "v" })),
            "duration",
        ),
        (
            refused::<CacheStoreValue>(json!({ "key": "k", "value": "{header.}", "duration": 1 })),
            "value",
        ),
        (refused::<CacheRemoveValue>(json!({ "key": "" })), "key"),
    ];
    for (message, field) in cases {
        assert!(message.contains(field), "{field}: {message}");
    }
}

#[test]
fn readme_examples_build() {
    let readme = include_str!("../README.md");
    let mut seen = Vec::new();
    for block in readme.split("```json").skip(1) {
        let json = block.split("```").next().expect("closed block");
        let step: Value = serde_json::from_str(json)
            .unwrap_or_else(|e| panic!("README block is not JSON ({e}):\n{json}"));
        let name = step["policy"].as_str().expect("policy name").to_owned();
        let config = serde_json::to_string(&step["config"]).expect("config");
        let built = match name.as_str() {
            "cache-lookup" => policy::<CacheLookup>(&config).map(drop),
            "cache-store" => policy::<CacheStore>(&config).map(drop),
            "cache-lookup-value" => policy::<CacheLookupValue>(&config).map(drop),
            "cache-store-value" => policy::<CacheStoreValue>(&config).map(drop),
            "cache-remove-value" => policy::<CacheRemoveValue>(&config).map(drop),
            other => panic!("README shows an unknown policy '{other}'"),
        };
        if let Err(e) = built {
            panic!("README example for {name} is refused: {}", e.message);
        }
        seen.push(name);
    }
    for p in [
        "cache-lookup",
        "cache-store",
        "cache-lookup-value",
        "cache-store-value",
        "cache-remove-value",
    ] {
        assert!(seen.iter().any(|s| s == p), "README has no example for {p}");
    }
}

#[test]
fn private_responses_are_keyed_per_caller() {
    let key = |config: Value, req: &mut TestHead, c: &mut TestContext| -> String {
        let p = build::<CacheLookup>(config);
        let (_, key) = lookup(&p, req, c, TestAnswer::miss());
        String::from_utf8(key.expect("looked up")).unwrap()
    };
    let private = json!({ "allow_private_response_caching": true });
    let alice = key(
        private.clone(),
        &mut get("/svc/items").with_header("authorization", "Bearer alice"),
        &mut ctx(),
    );
    let bob = key(
        private,
        &mut get("/svc/items").with_header("authorization", "Bearer bob"),
        &mut ctx(),
    );
    assert_ne!(alice, bob);
    // Key names carry no credentials.
    assert!(
        !alice.contains("alice") && alice.starts_with("resp:"),
        "{alice}"
    );
}

#[test]
fn responses_varying_by_headers_outside_the_key_are_not_stored() {
    let s = build::<CacheStore>(json!({ "duration": 60 }));
    for (config, stored) in [
        (json!({}), false),
        (json!({ "vary_by_header": ["Accept-Encoding"] }), true),
    ] {
        let l = build::<CacheLookup>(config.clone());
        let mut c = ctx();
        lookup(&l, &mut get("/svc/items"), &mut c, TestAnswer::miss());
        let mut resp = ok_response().with_header("vary", "Accept-Encoding");
        assert_eq!(
            store(&s, &mut resp, &mut c, Some(b"x"), ok()).is_some(),
            stored,
            "{config}"
        );
    }
}
