//! Shared integration-test support: real servers on free ports.
#![allow(dead_code)]

pub mod bin;
pub mod h1_client;
pub mod keys;
pub mod kg;
pub mod paths;
pub mod redis;
pub mod scripted_upstream;
pub mod strict_upstream;
pub mod upstream;
pub mod verify;
pub mod wire;
