//! Access policies (`plugins/policy-access`) against the real gateway.
