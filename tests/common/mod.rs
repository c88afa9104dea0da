//! Shared integration-test support: real servers on free ports.
#![allow(dead_code)]

pub mod bin;
pub mod keys;
pub mod kg;
pub mod redis;
pub mod upstream;
pub mod verify;
