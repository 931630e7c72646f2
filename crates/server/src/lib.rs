//! nimbus server
