//! The two RFC 3339 forms keygate writes: seconds for everything a person or
//! client reads (key objects, tables, headers), nanoseconds for what the
//! store keeps (fixed width, so string order is time order — the `touch`
//! script relies on it).

use chrono::{DateTime, SecondsFormat, Utc};

/// `2026-12-03T15:00:00Z`: API answers, CLI output, response headers.
pub fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// `2026-12-03T15:00:00.000000000Z`: the stored form.
pub fn rfc3339_nanos(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms() {
        let t = DateTime::parse_from_rfc3339("2026-12-03T15:04:05.5+01:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(rfc3339(&t), "2026-12-03T14:04:05Z");
        assert_eq!(rfc3339_nanos(&t), "2026-12-03T14:04:05.500000000Z");
    }
}
