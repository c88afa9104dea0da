//! Shared integration-test support: real servers on free ports.
#![allow(dead_code)]

pub mod redis;
pub mod kg;
pub mod upstream;
