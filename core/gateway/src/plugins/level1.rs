//! Level-1 libraries: their info converted to the current shape, and the host's views
//! offered through the frozen level-1 traits (the same behaviour, fewer methods).

use abi_stable::std_types::{ROption, RSlice, RStr, RVec};
use outpost_plugin_api::{self as api, level1};

use super::policy::{HostContext, Msg};
use super::services::Host;

/// A level-1 library's info in the current shape (it provides policies only).
pub(super) fn info(i: level1::PluginInfo) -> api::PluginInfo {
    api::PluginInfo {
        name: i.name,
        version: i.version,
        api_level: i.api_level,
        kinds: i.kinds & api::kinds::POLICY,
        panic_unwind: i.panic_unwind,
        policies: i.policies,
        sinks: RVec::new(),
        caches: RVec::new(),
        stores: RVec::new(),
    }
}

impl level1::HttpHead for Msg<'_> {
    fn method(&self) -> RStr<'_> {
        api::HttpHead::method(self)
    }
    fn path(&self) -> RStr<'_> {
        api::HttpHead::path(self)
    }
    fn query(&self) -> RStr<'_> {
        api::HttpHead::query(self)
    }
    fn status(&self) -> u16 {
        api::HttpHead::status(self)
    }
    fn header(&self, name: RStr<'_>) -> ROption<RSlice<'_, u8>> {
        api::HttpHead::header(self, name)
    }
    fn set_header(&mut self, name: RStr<'_>, value: RSlice<'_, u8>) -> bool {
        api::HttpHead::set_header(self, name, value)
    }
    fn append_header(&mut self, name: RStr<'_>, value: RSlice<'_, u8>) -> bool {
        api::HttpHead::append_header(self, name, value)
    }
    fn remove_header(&mut self, name: RStr<'_>) -> bool {
        api::HttpHead::remove_header(self, name)
    }
}

impl level1::RequestContext for HostContext<'_> {
    fn api_id(&self) -> RStr<'_> {
        api::RequestContext::api_id(self)
    }
    fn operation_id(&self) -> RStr<'_> {
        api::RequestContext::operation_id(self)
    }
    fn product_id(&self) -> RStr<'_> {
        api::RequestContext::product_id(self)
    }
    fn subscription_id(&self) -> RStr<'_> {
        api::RequestContext::subscription_id(self)
    }
    fn client_ip(&self) -> RStr<'_> {
        api::RequestContext::client_ip(self)
    }
    fn request_id(&self) -> RStr<'_> {
        api::RequestContext::request_id(self)
    }
    fn variable(&self, name: RStr<'_>) -> ROption<RStr<'_>> {
        api::RequestContext::variable(self, name)
    }
    fn set_variable(&mut self, name: RStr<'_>, value: RStr<'_>) {
        api::RequestContext::set_variable(self, name, value)
    }
    fn last_error(&self) -> RStr<'_> {
        api::RequestContext::last_error(self)
    }
    fn set_error(&mut self, message: RStr<'_>) {
        api::RequestContext::set_error(self, message)
    }
    fn respond(&mut self, status: u16, body: RSlice<'_, u8>) {
        api::RequestContext::respond(self, status, body)
    }
    fn respond_header(&mut self, name: RStr<'_>, value: RSlice<'_, u8>) -> bool {
        api::RequestContext::respond_header(self, name, value)
    }
}

impl level1::HostServices for Host {
    fn log(&self, level: u8, message: RStr<'_>) {
        api::HostServices::log(self, level, message)
    }
    fn log_enabled(&self, level: u8) -> bool {
        api::HostServices::log_enabled(self, level)
    }
}
