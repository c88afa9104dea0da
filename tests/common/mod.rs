//! Shared integration-test support: real servers on free ports.
#![allow(dead_code)]

pub mod kg;
pub mod redis;
pub mod upstream;
