//! Value syntaxes shared by the config and (later) the CLI: durations.

use std::time::Duration;

/// `"250ms"`, `"5s"`, `"1m"`, `"1h"`: a non-negative integer and a unit.
pub(super) fn parse_duration(s: &str) -> Option<Duration> {
    let digits_end = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(digits_end);
    if num.is_empty() || num.len() > 12 {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }?;
    Some(Duration::from_millis(ms))
}

/// The shortest exact spelling, except that a minute or less stays in
/// seconds (`"60s"`, `"90s"`, `"2m"`, `"1h"`, `"250ms"`).
pub(super) fn format_duration(d: Duration) -> String {
    // sub-millisecond remainders (never produced by the parser) round up
    let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 != 0);
    if ms % 1_000 != 0 {
        return format!("{ms}ms");
    }
    let secs = ms / 1_000;
    if secs != 0 && secs % 3_600 == 0 {
        format!("{}h", secs / 3_600)
    } else if secs > 60 && secs % 60 == 0 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn durations() {
        let cases: &[(&str, Option<u64>)] = &[
            ("250ms", Some(250)),
            ("5s", Some(5_000)),
            ("1m", Some(60_000)),
            ("1h", Some(3_600_000)),
            ("0s", Some(0)),
            ("5", None),
            ("s", None),
            ("-5s", None),
            (" 5s", None),
            ("5 s", None),
            ("5S", None),
            ("1.5s", None),
            ("5d", None),
            ("", None),
            ("99999999999999h", None),
        ];
        for (s, ms) in cases {
            assert_eq!(
                parse_duration(s),
                ms.map(Duration::from_millis),
                "parse_duration({s:?})"
            );
        }
        let c = ok(&in_section("store", "timeout = \"1h\""));
        assert_eq!(c.store.timeout, Duration::from_secs(3600));
        let m = one_problem(&in_section("store", "timeout = \"5x\""), "store.timeout");
        assert!(m.contains("\"5x\" is not a duration"), "{m}");
        // zero: refused for timeouts, allowed where it means "none"
        let m = one_problem(
            &in_section("upstream", "timeout = \"0s\""),
            "upstream.timeout",
        );
        assert_eq!(m, "must be greater than zero");
        one_problem(
            &with("[listen]\nheader_timeout = \"0ms\""),
            "listen.header_timeout",
        );
        let c = ok(&with(
            "[listen]\nshutdown_grace = \"0s\"\n[auth]\nnegative_ttl = \"0s\"\ncache_ttl = \"0s\"",
        ));
        assert_eq!(c.listen.shutdown_grace, Duration::ZERO);
        assert_eq!(c.auth.negative_ttl, Duration::ZERO);
    }

    #[test]
    fn duration_rendering_round_trips() {
        for ms in [
            0u64, 1, 250, 1_000, 1_500, 60_000, 90_000, 3_600_000, 7_200_000,
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse_duration(&format_duration(d)), Some(d), "{ms}ms");
        }
    }
}
