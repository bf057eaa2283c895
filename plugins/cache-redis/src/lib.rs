//! A cache on Redis.
