//! Cache value encoding. (Stub.)
