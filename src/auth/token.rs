//! Token format (contract §4): `key_prefix` + 43 base62 random characters
//! (≥ 256 bits) + a 6-character base62 checksum. Pure.
//!
//! ```text
//! mok_ 7fK2…(43 random)… 0a9ZqX
//! |--| |----------------| |----|
//! prefix   RANDOM_LEN      CHECKSUM_LEN = base62(CRC32(prefix + random)), zero-padded
//! ```
//!
//! The checksum lets a mistyped or truncated token be refused before any store
//! look-up ([`check_format`]) and gives secret scanners a fixed shape to match.
//! Letters and digits only, so a double-click selects the whole token.

use rand::distr::Alphanumeric;
use rand::Rng;
use sha2::{Digest, Sha256};

use super::refusal::Refusal;

/// Random characters after the prefix: 43 × log2(62) ≈ 256.03 bits.
pub const RANDOM_LEN: usize = 43;
/// Checksum characters: 62^6 ≈ 5.7e10 > 2^32, so every CRC32 value fits.
pub const CHECKSUM_LEN: usize = 6;
/// Characters of a token shown and stored as its `prefix` (contract §4).
pub const DISPLAY_PREFIX_LEN: usize = 12;
/// Length of a key id ([`new_key_id`]): 20 × log2(62) ≈ 119 bits.
pub const KEY_ID_LEN: usize = 20;

/// The checksum alphabet, in digit order.
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A plaintext token. Never printed: `Debug` and `Display` show only its
/// 12-character display prefix (the part that is stored and listed anyway).
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Wrap a token string (e.g. one read back from a test or the CLI).
    pub fn from_string(token: String) -> Token {
        Token(token)
    }

    /// The plaintext: for the one response that shows it, and for hashing.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The first 12 characters (stored as the key's `prefix`).
    pub fn display_prefix(&self) -> &str {
        display_prefix(&self.0)
    }

    /// SHA-256 of the token.
    pub fn hash(&self) -> KeyHash {
        hash(&self.0)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({}…)", self.display_prefix())
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}…", self.display_prefix())
    }
}

/// SHA-256 of a token: the only form in which a token is stored or cached.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 0x0f) as usize] as char);
        }
        s
    }

    /// Parse 64 hex digits (either case); anything else is `None`.
    pub fn from_hex(s: &str) -> Option<KeyHash> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            out[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
        }
        Some(KeyHash(out))
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyHash(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// A new token: `prefix` + [`RANDOM_LEN`] characters from the thread-local
/// CSPRNG (ChaCha, seeded from the OS) + the checksum.
pub fn mint(prefix: &str) -> Token {
    let mut s = String::with_capacity(prefix.len() + RANDOM_LEN + CHECKSUM_LEN);
    s.push_str(prefix);
    s.extend(
        rand::rng()
            .sample_iter(Alphanumeric)
            .take(RANDOM_LEN)
            .map(char::from),
    );
    let sum = checksum(s.as_bytes());
    // The checksum is ASCII by construction.
    s.extend(sum.iter().map(|&b| b as char));
    Token(s)
}

/// `base62(CRC32(body))`, most significant digit first, zero-padded.
fn checksum(body: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32fast::hash(body) as u64;
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Whether `token` has the shape of a key minted with `prefix`: the prefix,
/// exactly [`RANDOM_LEN`] + [`CHECKSUM_LEN`] letters and digits after it, and
/// a matching checksum. A `false` needs no store look-up: the key cannot exist.
pub fn check_format(token: &str, prefix: &str) -> bool {
    check(token, prefix).is_ok()
}

/// [`check_format`] with the reason for a `false`: the wrong prefix, length
/// or characters is [`Refusal::Malformed`], a checksum that does not match
/// is [`Refusal::BadChecksum`].
pub fn check(token: &str, prefix: &str) -> Result<(), Refusal> {
    let b = token.as_bytes();
    if b.len() != prefix.len() + RANDOM_LEN + CHECKSUM_LEN || !b.starts_with(prefix.as_bytes()) {
        return Err(Refusal::Malformed);
    }
    let (body, sum) = b.split_at(prefix.len() + RANDOM_LEN);
    if !b[prefix.len()..].iter().all(u8::is_ascii_alphanumeric) {
        return Err(Refusal::Malformed);
    }
    if checksum(body) == *sum {
        Ok(())
    } else {
        Err(Refusal::BadChecksum)
    }
}

/// SHA-256 of the token (what the store and the cache key on).
pub fn hash(token: &str) -> KeyHash {
    KeyHash(Sha256::digest(token.as_bytes()).into())
}

/// The first 12 characters of a token (its stored, listed `prefix`); the whole
/// string when shorter.
pub fn display_prefix(token: &str) -> &str {
    let mut end = token.len().min(DISPLAY_PREFIX_LEN);
    while !token.is_char_boundary(end) {
        end -= 1;
    }
    &token[..end]
}

/// A new key id: [`KEY_ID_LEN`] random base62 characters. Opaque, URL-safe,
/// and independent of the token (knowing an id reveals nothing about a secret).
pub fn new_key_id() -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(KEY_ID_LEN)
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: &str = "mok_";

    #[test]
    fn minted_token_shape() {
        for _ in 0..200 {
            let t = mint(P);
            let s = t.expose();
            assert_eq!(s.len(), P.len() + RANDOM_LEN + CHECKSUM_LEN);
            assert!(s.starts_with(P));
            assert!(s[P.len()..].bytes().all(|b| b.is_ascii_alphanumeric()));
            assert!(check_format(s, P), "{s}");
        }
    }

    #[test]
    fn check_names_the_reason() {
        let good = mint(P);
        let g = good.expose();
        assert_eq!(check(g, P), Ok(()));
        assert_eq!(check(&g[..g.len() - 1], P), Err(Refusal::Malformed));
        assert_eq!(check(&format!("{g}x"), P), Err(Refusal::Malformed));
        assert_eq!(
            check(&g.replacen("mok_", "mak_", 1), P),
            Err(Refusal::Malformed)
        );
        assert_eq!(
            check(&format!("{}-{}", &g[..10], &g[11..]), P),
            Err(Refusal::Malformed)
        );
        // One character of the random part changed: same shape, wrong sum.
        let mut typo = g.as_bytes().to_vec();
        typo[P.len() + 3] = if typo[P.len() + 3] == b'a' {
            b'b'
        } else {
            b'a'
        };
        let typo = String::from_utf8(typo).unwrap();
        assert_eq!(check(&typo, P), Err(Refusal::BadChecksum));
    }

    #[test]
    fn minted_tokens_differ() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            assert!(seen.insert(mint(P).expose().to_string()));
        }
    }

    #[test]
    fn random_part_uses_whole_alphabet() {
        // 43 × 500 draws over 62 symbols: every symbol appears (fails with
        // negligible probability if the sampler were uniform).
        let mut seen = [false; 128];
        for _ in 0..500 {
            for b in mint(P).expose()[P.len()..P.len() + RANDOM_LEN].bytes() {
                seen[b as usize] = true;
            }
        }
        for &c in BASE62 {
            assert!(seen[c as usize], "{} never drawn", c as char);
        }
    }

    #[test]
    fn checksum_is_zero_padded_base62() {
        assert_eq!(checksum(b""), *b"000000"); // CRC32("") = 0
                                               // CRC32("123456789") = 0xCBF43926 = 3421780262
        let mut n: u64 = 3_421_780_262;
        let mut want = [b'0'; 6];
        for slot in want.iter_mut().rev() {
            *slot = BASE62[(n % 62) as usize];
            n /= 62;
        }
        assert_eq!(checksum(b"123456789"), want);
        assert_eq!(&checksum(b"123456789"), b"3jZRME");
        // The largest CRC fits in six digits.
        assert!(62u64.pow(6) > u32::MAX as u64);
    }

    fn with_checksum(body: &str) -> String {
        let sum = checksum(body.as_bytes());
        format!("{body}{}", std::str::from_utf8(&sum).unwrap())
    }

    #[test]
    fn check_format_table() {
        let good = mint(P);
        let g = good.expose();
        let body = &g[..P.len() + RANDOM_LEN];
        let a43 = "a".repeat(RANDOM_LEN);
        macro_rules! t {
            ($tok:expr, $prefix:expr, $want:expr) => {
                let tok: &str = &$tok;
                assert_eq!(check_format(tok, $prefix), $want, "token {:?}", tok);
            };
        }
        t!(g, P, true);
        t!(with_checksum(&format!("{P}{a43}")), P, true);
        t!(with_checksum(&format!("xyz_{a43}")), "xyz_", true);
        t!(with_checksum(&a43), "", true);
        // Wrong prefix.
        t!(g, "mok-", false);
        t!(g, "MOK_", false);
        t!(with_checksum(&format!("xyz_{a43}")), P, false);
        t!(g.to_uppercase(), P, false);
        // Lengths.
        t!("", P, false);
        t!(P, P, false);
        t!(g[..g.len() - 1], P, false);
        t!(format!("{g}0"), P, false);
        t!(format!("{g}\n"), P, false);
        t!(format!(" {g}"), P, false);
        t!(body, P, false);
        // Alphabet: a checksum-valid body with a non-base62 character.
        for bad in ["-", "_", ".", "~", "+", "/", "=", " ", "é", "\0"] {
            let mut b = format!("{P}{}", "a".repeat(RANDOM_LEN - 1));
            b.push_str(bad);
            let tok = with_checksum(&b);
            t!(tok, P, false);
        }
        // Wrong checksum of the right shape.
        let mut wrong = body.to_string();
        wrong.push_str(if g.ends_with("000000") {
            "000001"
        } else {
            "000000"
        });
        t!(wrong, P, false);
        // Lower/upper-case flip in the checksum is a different digit.
        let flipped: String = g
            .char_indices()
            .map(|(i, c)| {
                if i == g.len() - 1 && c.is_ascii_alphabetic() {
                    if c.is_ascii_lowercase() {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    }
                } else {
                    c
                }
            })
            .collect();
        t!(flipped.clone(), P, flipped == g);
    }

    #[test]
    fn hash_is_sha256() {
        // SHA-256("abc")
        assert_eq!(
            hash("abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hash("").to_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let t = mint(P);
        assert_eq!(t.hash(), hash(t.expose()));
        assert_ne!(hash("a"), hash("b"));
    }

    #[test]
    fn hex_round_trip_and_refusals() {
        let h = hash("x");
        assert_eq!(KeyHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(KeyHash::from_hex(&h.to_hex().to_uppercase()), Some(h));
        let hex = h.to_hex();
        for bad in [
            String::new(),
            hex[..63].to_string(),
            format!("{hex}0"),
            format!("g{}", &hex[1..]),
            format!(" {}", &hex[1..]),
            format!("{}é", &hex[..62]),
            "+".repeat(64),
        ] {
            assert_eq!(KeyHash::from_hex(&bad), None, "{bad:?}");
        }
        assert_eq!(KeyHash([0; 32]).to_hex(), "0".repeat(64));
        assert_eq!(KeyHash([0xff; 32]).to_hex(), "f".repeat(64));
    }

    #[test]
    fn display_prefix_table() {
        assert_eq!(display_prefix("mok_abcdefgh12345"), "mok_abcdefgh");
        assert_eq!(display_prefix("short"), "short");
        assert_eq!(display_prefix(""), "");
        assert_eq!(display_prefix("éééééééé"), "éééééé"); // 12 bytes, boundary
        assert_eq!(display_prefix("aéééééééé"), "aééééé"); // 11 bytes
        let t = mint(P);
        assert_eq!(t.display_prefix(), &t.expose()[..12]);
    }

    #[test]
    fn debug_and_display_hide_the_secret() {
        let t = mint(P);
        let secret = &t.expose()[12..];
        for shown in [format!("{t:?}"), format!("{t}"), format!("{:#?}", t)] {
            assert!(!shown.contains(secret), "{shown}");
            assert!(!shown.contains(&t.expose()[12..20]), "{shown}");
            assert!(shown.contains(t.display_prefix()), "{shown}");
        }
        let h = t.hash();
        assert!(!format!("{h:?}").contains(&h.to_hex()));
    }

    #[test]
    fn key_ids() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..500 {
            let id = new_key_id();
            assert_eq!(id.len(), KEY_ID_LEN);
            assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
            assert!(seen.insert(id));
        }
    }

    #[test]
    fn from_string_round_trip() {
        let t = mint(P);
        assert_eq!(Token::from_string(t.expose().to_string()), t);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_substitution_fails(pos in 0usize..(4 + RANDOM_LEN + CHECKSUM_LEN), c in any::<char>()) {
            let t = mint(P);
            let s = t.expose();
            let orig = s[pos..].chars().next().unwrap();
            prop_assume!(c != orig);
            let mut m = String::with_capacity(s.len() + 4);
            m.push_str(&s[..pos]);
            m.push(c);
            m.push_str(&s[pos + 1..]);
            prop_assert!(!check_format(&m, P), "{m}");
        }

        #[test]
        fn any_base62_substitution_fails(pos in 0usize..(RANDOM_LEN + CHECKSUM_LEN), i in 0usize..62) {
            // The hard case for a checksum: the result is still all base62.
            let t = mint(P);
            let s = t.expose();
            let at = P.len() + pos;
            let c = BASE62[i];
            prop_assume!(c != s.as_bytes()[at]);
            let mut m = s.as_bytes().to_vec();
            m[at] = c;
            let m = String::from_utf8(m).unwrap();
            prop_assert!(!check_format(&m, P), "{m}");
        }

        #[test]
        fn any_truncation_fails(len in 0usize..(4 + RANDOM_LEN + CHECKSUM_LEN)) {
            let t = mint(P);
            prop_assert!(!check_format(&t.expose()[..len], P));
        }

        #[test]
        fn any_adjacent_swap_fails(pos in 0usize..(RANDOM_LEN + CHECKSUM_LEN - 1)) {
            let t = mint(P);
            let mut m = t.expose().as_bytes().to_vec();
            let at = P.len() + pos;
            prop_assume!(m[at] != m[at + 1]);
            m.swap(at, at + 1);
            let m = String::from_utf8(m).unwrap();
            prop_assert!(!check_format(&m, P), "{m}");
        }

        #[test]
        fn check_format_never_panics(s in ".{0,80}") {
            let _ = check_format(&s, P);
            let _ = display_prefix(&s);
        }
    }
}
