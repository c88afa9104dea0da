//! Local key cache. OWNER: store helper.
