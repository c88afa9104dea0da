//! In-memory store (unit tests and `keygate demo`). OWNER: store helper.
pub struct MemoryStore;
impl MemoryStore { pub fn new(_slug: &str) -> MemoryStore { MemoryStore } }
