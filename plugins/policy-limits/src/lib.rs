//! Limit policies.
