//! `Authorization` parsing (contract §3 step 4): pure.
//!
//! OWNER: gate helper.
