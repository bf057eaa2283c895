//! Caching policies (`plugins/policy-caching`) on the memory and Redis caches.
