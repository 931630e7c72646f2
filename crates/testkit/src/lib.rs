//! nimbus testkit
