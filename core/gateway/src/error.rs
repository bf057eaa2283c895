//! Every failure the data plane can answer with, and the one place that maps it to an HTTP
//! response: status, a stable machine-readable code, and a JSON body with the request id.

use std::fmt;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::ResponseBody;

/// Who caused a failure. Decides the log level and lets telemetry tell client mistakes from
/// backend outages from gateway faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The client sent something we refuse.
    Client,
    /// The backend could not be reached or misbehaved.
    Backend,
    /// The gateway itself.
    Gateway,
}

impl ErrorSource {
    /// The name telemetry uses.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorSource::Client => "client",
            ErrorSource::Backend => "backend",
            ErrorSource::Gateway => "gateway",
        }
    }
}

/// A request that the gateway answers itself instead of proxying.
#[derive(Debug)]
pub enum ProxyError {
    /// No API matches the host and path.
    ApiNotFound {
        /// Host the request named.
        host: String,
        /// Request path.
        path: String,
    },
    /// The API has no operation for this method and path.
    OperationNotFound {
        /// The API that matched.
        api: String,
        /// Request method.
        method: String,
        /// Path relative to the API.
        path: String,
    },
    /// The API requires a subscription key and none was sent.
    MissingSubscriptionKey,
    /// The key is unknown or does not cover this API.
    InvalidSubscriptionKey,
    /// The key belongs to a suspended subscription.
    SubscriptionSuspended,
    /// The request head is larger than `limits.max_header_bytes`.
    HeadersTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The body is larger than `limits.max_body_bytes`.
    BodyTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The client's request could not be read (aborted upload, malformed body).
    BadRequest(String),
    /// The client stopped sending its body before it was complete.
    RequestTimeout,
    /// A policy failed (panicked, disabled, or reported an error that on-error did not answer).
    PolicyFailed(String),
    /// No configuration is loaded yet.
    NotReady,
    /// The backend refused the connection or could not be resolved.
    BackendUnreachable {
        /// Backend id.
        backend: String,
        /// Why.
        reason: String,
    },
    /// The backend did not connect or answer within the configured time.
    BackendTimeout {
        /// Backend id.
        backend: String,
        /// Which phase timed out.
        phase: &'static str,
    },
    /// The backend broke the protocol or closed the connection mid-answer.
    BackendFailed {
        /// Backend id.
        backend: String,
        /// Why.
        reason: String,
    },
}

impl ProxyError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::ApiNotFound { .. } | Self::OperationNotFound { .. } => StatusCode::NOT_FOUND,
            Self::MissingSubscriptionKey | Self::InvalidSubscriptionKey => StatusCode::UNAUTHORIZED,
            Self::SubscriptionSuspended => StatusCode::FORBIDDEN,
            Self::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            Self::PolicyFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::BackendUnreachable { .. } | Self::BackendFailed { .. } => StatusCode::BAD_GATEWAY,
            Self::BackendTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A stable code for clients and dashboards.
    pub fn code(&self) -> &'static str {
        match self {
            Self::ApiNotFound { .. } => "api_not_found",
            Self::OperationNotFound { .. } => "operation_not_found",
            Self::MissingSubscriptionKey => "subscription_key_missing",
            Self::InvalidSubscriptionKey => "subscription_key_invalid",
            Self::SubscriptionSuspended => "subscription_suspended",
            Self::HeadersTooLarge { .. } => "headers_too_large",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::BadRequest(_) => "bad_request",
            Self::RequestTimeout => "request_timeout",
            Self::NotReady => "not_ready",
            Self::PolicyFailed(_) => "policy_failed",
            Self::BackendUnreachable { .. } => "backend_unreachable",
            Self::BackendTimeout { .. } => "backend_timeout",
            Self::BackendFailed { .. } => "backend_failed",
        }
    }

    /// Who caused it.
    pub fn source(&self) -> ErrorSource {
        match self {
            Self::ApiNotFound { .. }
            | Self::OperationNotFound { .. }
            | Self::MissingSubscriptionKey
            | Self::InvalidSubscriptionKey
            | Self::SubscriptionSuspended
            | Self::HeadersTooLarge { .. }
            | Self::BodyTooLarge { .. }
            | Self::BadRequest(_)
            | Self::RequestTimeout => ErrorSource::Client,
            Self::BackendUnreachable { .. }
            | Self::BackendTimeout { .. }
            | Self::BackendFailed { .. } => ErrorSource::Backend,
            Self::NotReady | Self::PolicyFailed(_) => ErrorSource::Gateway,
        }
    }

    /// The response sent to the client.
    pub fn to_response(&self, request_id: &HeaderValue) -> Response<ResponseBody> {
        let body = serde_json::json!({
            "statusCode": self.status().as_u16(),
            "error": self.code(),
            "message": self.to_string(),
            "requestId": request_id.to_str().unwrap_or_default(),
        });
        let mut resp = Response::new(ResponseBody::full(Bytes::from(body.to_string())));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if matches!(self, Self::NotReady) {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ApiNotFound { host, path } => {
                write!(f, "No API matches host '{host}' and path '{path}'.")
            }
            Self::OperationNotFound { api, method, path } => write!(
                f,
                "API '{api}' has no operation matching {method} '{path}'."
            ),
            Self::MissingSubscriptionKey => f.write_str(
                "Access denied due to missing subscription key. Make sure to include the subscription key when making requests to an API.",
            ),
            Self::InvalidSubscriptionKey => f.write_str(
                "Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription.",
            ),
            Self::SubscriptionSuspended => f.write_str(
                "Access denied: the subscription is suspended.",
            ),
            Self::HeadersTooLarge { limit } => {
                write!(f, "The request headers exceed the limit of {limit} bytes.")
            }
            Self::BodyTooLarge { limit } => {
                write!(f, "The request body exceeds the limit of {limit} bytes.")
            }
            Self::BadRequest(why) => write!(f, "The request could not be read: {why}."),
            Self::RequestTimeout => f.write_str(
                "The request body stopped arriving before it was complete.",
            ),
            Self::NotReady => f.write_str("The gateway is not ready to serve requests."),
            Self::PolicyFailed(why) => write!(f, "A policy failed: {why}."),
            Self::BackendUnreachable { backend, reason } => {
                write!(f, "Backend '{backend}' is unreachable: {reason}.")
            }
            Self::BackendTimeout { backend, phase } => {
                write!(f, "Backend '{backend}' timed out ({phase}).")
            }
            Self::BackendFailed { backend, reason } => {
                write!(f, "Backend '{backend}' failed: {reason}.")
            }
        }
    }
}

impl std::error::Error for ProxyError {}
