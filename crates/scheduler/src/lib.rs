//! nimbus scheduler
