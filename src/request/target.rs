//! OWNER: gate helper.
