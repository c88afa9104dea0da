//! Token format (contract §4): `key_prefix` + 43 base62 random characters
//! (≥ 256 bits) + a 6-character base62 checksum. Pure.
//!
//! OWNER: gate helper.

/// A plaintext token. Never printed: `Debug` shows only its 12-character prefix.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p: String = self.0.chars().take(12).collect();
        write!(f, "Token({p}…)")
    }
}

/// SHA-256 of a token: the only form in which a token is stored or cached.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash(pub [u8; 32]);

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyHash(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}
