//! Unit tests of the nftables planner.

use super::*;

#[test]
fn placeholder() {}

#[test]
fn print_skeleton() {
    println!("{}", INET.skeleton("ntry"));
    println!("{}", BRIDGE.skeleton("ntry"));
}
