//! Outpost's two configuration documents and their validation.
//!
//! * The **manifest** ([`Manifest`], TOML, one per site) is static for the life of a process:
//!   listeners, TLS, limits, timeouts and where the API configuration comes from.
//! * The **API configuration** ([`ApiConfig`], JSON) is dynamic: APIs, operations, products,
//!   subscriptions, backends, named values and policy documents. It is swapped while traffic flows.
//!
//! Both are parsed strictly (unknown keys are errors) and validated without touching files or
//! the network; every problem found is collected into one [`Report`] so an operator fixes them
//! all in one pass.

mod api;
mod error;
mod manifest;
pub mod template;

pub use api::*;
pub use error::{Issue, Report};
pub use manifest::*;
