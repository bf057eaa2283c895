//! Several gateway replicas sharing one real redis-server: limits and response caching.
