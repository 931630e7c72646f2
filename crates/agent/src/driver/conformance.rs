//! The driver conformance suite (filled in with the first driver).
