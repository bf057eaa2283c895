//! Response and value caching policies.
