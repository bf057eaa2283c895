//! Limit policies (`plugins/policy-limits`) against the real gateway.
