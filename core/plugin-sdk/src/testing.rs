//! Run a policy in a unit test, without a gateway: build it from JSON config as the gateway
//! would, then call its hooks on a [`TestHead`] and a [`TestContext`].
//!
//! ```
//! use outpost_plugin_sdk::testing::{policy, TestContext, TestHead};
//! # use outpost_plugin_sdk::{Context, Flow, Head, Policy};
//! # pub struct Tag;
//! # impl Policy for Tag {
//! #     type Config = ();
//! #     fn new(_: ()) -> Result<Self, String> { Ok(Tag) }
//! #     fn on_request(&self, req: &mut Head<'_, '_>, _: &mut Context<'_, '_>) -> Flow {
//! #         req.set_header("x-tag", b"1");
//! #         Flow::CONTINUE
//! #     }
//! # }
//! let p = policy::<Tag>("null").expect("config accepted");
//! let mut req = TestHead::request("GET", "/orders");
//! let mut ctx = TestContext::default();
//! assert_eq!(outpost_plugin_sdk::testing::on_request(&p, &mut req, &mut ctx), outpost_plugin_sdk::Flow::CONTINUE);
//! assert_eq!(req.header_str("x-tag"), Some("1"));
//! ```

use std::collections::HashMap;

use crate::api::abi_stable::sabi_trait::TD_Opaque;
use crate::api::abi_stable::sabi_types::RMut;
use crate::api::abi_stable::std_types::{ROption, RSlice, RStr};
use crate::api::{self, HttpHead_TO, PluginError, PolicyBox, RequestContext_TO};
use crate::{Flow, Policy};

/// Builds a policy from its JSON configuration, exactly as the gateway does.
pub fn policy<P: Policy>(config_json: &str) -> Result<PolicyBox, PluginError> {
    crate::new_policy::<P>(config_json)
}

/// Runs the request hook.
pub fn on_request(p: &PolicyBox, head: &mut TestHead, ctx: &mut TestContext) -> Flow {
    let mut h = HttpHead_TO::from_ptr(RMut::new(head), TD_Opaque);
    let mut c = RequestContext_TO::from_ptr(RMut::new(ctx), TD_Opaque);
    p.on_request(&mut h, &mut c)
}

/// Runs the response hook.
pub fn on_response(p: &PolicyBox, head: &mut TestHead, ctx: &mut TestContext) -> Flow {
    let mut h = HttpHead_TO::from_ptr(RMut::new(head), TD_Opaque);
    let mut c = RequestContext_TO::from_ptr(RMut::new(ctx), TD_Opaque);
    p.on_response(&mut h, &mut c)
}

/// A request or response head for tests. Header names are kept lower-case.
#[derive(Debug, Default, Clone)]
pub struct TestHead {
    /// Method (requests).
    pub method: String,
    /// Path (requests).
    pub path: String,
    /// Query without `?`.
    pub query: String,
    /// Status (responses).
    pub status: u16,
    /// Headers in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl TestHead {
    /// A request head.
    pub fn request(method: &str, path: &str) -> Self {
        Self {
            method: method.into(),
            path: path.into(),
            ..Self::default()
        }
    }

    /// A response head.
    pub fn response(status: u16) -> Self {
        Self {
            status,
            ..Self::default()
        }
    }

    /// Adds a header (builder style).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.as_bytes().to_vec()));
        self
    }

    /// First value of a header as text.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

impl api::HttpHead for TestHead {
    fn method(&self) -> RStr<'_> {
        self.method.as_str().into()
    }
    fn path(&self) -> RStr<'_> {
        self.path.as_str().into()
    }
    fn query(&self) -> RStr<'_> {
        self.query.as_str().into()
    }
    fn status(&self) -> u16 {
        self.status
    }
    fn header(&self, name: RStr<'_>) -> ROption<RSlice<'_, u8>> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_str()))
            .map(|(_, v)| RSlice::from_slice(v))
            .into()
    }
    fn set_header(&mut self, name: RStr<'_>, value: RSlice<'_, u8>) -> bool {
        self.remove_header(name);
        self.append_header(name, value)
    }
    fn append_header(&mut self, name: RStr<'_>, value: RSlice<'_, u8>) -> bool {
        self.headers
            .push((name.as_str().to_ascii_lowercase(), value.to_vec()));
        true
    }
    fn remove_header(&mut self, name: RStr<'_>) -> bool {
        let before = self.headers.len();
        self.headers
            .retain(|(n, _)| !n.eq_ignore_ascii_case(name.as_str()));
        before != self.headers.len()
    }
}

/// Headers as name (lower-case) and value.
pub type Headers = Vec<(String, Vec<u8>)>;

/// A response a policy set: status, headers, body.
pub type LocalResponse = (u16, Headers, Vec<u8>);

/// A request context for tests; after a hook, `response` holds what the policy answered.
#[derive(Debug, Default, Clone)]
pub struct TestContext {
    /// API id.
    pub api_id: String,
    /// Operation id.
    pub operation_id: String,
    /// Product id.
    pub product_id: String,
    /// Subscription id.
    pub subscription_id: String,
    /// Client IP.
    pub client_ip: String,
    /// Request id.
    pub request_id: String,
    /// Variables.
    pub variables: HashMap<String, String>,
    /// The last error.
    pub error: String,
    /// The local response: status, headers, body.
    pub response: Option<LocalResponse>,
}

impl api::RequestContext for TestContext {
    fn api_id(&self) -> RStr<'_> {
        self.api_id.as_str().into()
    }
    fn operation_id(&self) -> RStr<'_> {
        self.operation_id.as_str().into()
    }
    fn product_id(&self) -> RStr<'_> {
        self.product_id.as_str().into()
    }
    fn subscription_id(&self) -> RStr<'_> {
        self.subscription_id.as_str().into()
    }
    fn client_ip(&self) -> RStr<'_> {
        self.client_ip.as_str().into()
    }
    fn request_id(&self) -> RStr<'_> {
        self.request_id.as_str().into()
    }
    fn variable(&self, name: RStr<'_>) -> ROption<RStr<'_>> {
        self.variables
            .get(name.as_str())
            .map(|v| RStr::from(v.as_str()))
            .into()
    }
    fn set_variable(&mut self, name: RStr<'_>, value: RStr<'_>) {
        self.variables.insert(name.into(), value.into());
    }
    fn last_error(&self) -> RStr<'_> {
        self.error.as_str().into()
    }
    fn set_error(&mut self, message: RStr<'_>) {
        self.error = message.into();
    }
    fn respond(&mut self, status: u16, body: RSlice<'_, u8>) {
        self.response = Some((status, Vec::new(), body.to_vec()));
    }
    fn respond_header(&mut self, name: RStr<'_>, value: RSlice<'_, u8>) -> bool {
        match &mut self.response {
            Some((_, headers, _)) => {
                headers.push((name.as_str().to_ascii_lowercase(), value.to_vec()));
                true
            }
            None => false,
        }
    }
}
