//! Transformation and routing policies (`plugins/policy-transform`) against the real gateway.
