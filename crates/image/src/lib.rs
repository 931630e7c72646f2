//! nimbus image
