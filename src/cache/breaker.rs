//! Circuit breaker. (Stub.)
