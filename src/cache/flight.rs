//! Single flight. (Stub.)
