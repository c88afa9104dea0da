//! The public listener, in the order a connection meets it:
//!
//! - [`accept`]: the accept loop (never dies on an accept error), the
//!   connection limit, TLS (and the answer to plain HTTP on the TLS port);
//! - [`conn`]: the protocol decided once per connection, from the full
//!   HTTP/2 preface or ALPN, then HTTP/2 or HTTP/1 through hyper;
//! - [`io`]: the connection's bytes with their bounds (header timeout on
//!   every head, idle timeout) and the head scan's verdicts;
//! - [`scan`]: the byte-level judge of every HTTP/1 head (pure);
//! - [`park`]: idle HTTP/1 connections parked without buffers.

pub mod accept;
pub mod conn;
pub mod io;
pub mod park;
pub mod scan;

pub use accept::serve;
pub use park::PARK_AFTER;
