//! Redis store. OWNER: store helper.
pub struct RedisStore;
