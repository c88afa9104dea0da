//! Value syntaxes shared by the config and the CLI: durations.

use std::time::Duration;

const MINUTE: u128 = 60;
const HOUR: u128 = 60 * MINUTE;
const DAY: u128 = 24 * HOUR;
const WEEK: u128 = 7 * DAY;

/// A duration as keygate spells it everywhere (config and command line): a
/// whole non-negative number directly followed by one unit, `ms`, `s`, `m`,
/// `h`, `d` (24 h) or `w` (7 d): `"250ms"`, `"5s"`, `"1m"`, `"1h"`, `"1d"`,
/// `"2w"`. No sign, fraction, space or upper case. The error names the value
/// and the expected syntax (it never holds a secret: durations are not).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{} is not a duration (expected a whole number and a unit: ms, s, m, h, d or w; \
             e.g. \"250ms\", \"5s\", \"1m\", \"1h\", \"1d\", \"2w\")",
            super::table::quote(s)
        )
    };
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = s.split_at(digits_end);
    if num.is_empty() {
        return Err(bad());
    }
    let ms_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 604_800_000,
        _ => return Err(bad()),
    };
    let too_large = || format!("{} is too large a duration", super::table::quote(s));
    if num.len() > 12 {
        return Err(too_large());
    }
    let n: u64 = num.parse().map_err(|_| too_large())?;
    let ms = n.checked_mul(ms_per_unit).ok_or_else(too_large)?;
    Ok(Duration::from_millis(ms))
}

/// The shortest exact spelling, except that one of a unit stays in the next
/// smaller one: `"250ms"`, `"60s"`, `"90s"`, `"2m"`, `"1h"`, `"24h"`, `"2d"`,
/// `"7d"`, `"30d"`, `"2w"`. Always accepted by [`parse_duration`].
pub(super) fn format_duration(d: Duration) -> String {
    // sub-millisecond remainders (never produced by the parser) round up
    let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 != 0);
    if ms % 1_000 != 0 {
        return format!("{ms}ms");
    }
    let secs = ms / 1_000;
    if secs > WEEK && secs % WEEK == 0 {
        format!("{}w", secs / WEEK)
    } else if secs > DAY && secs % DAY == 0 {
        format!("{}d", secs / DAY)
    } else if secs != 0 && secs % HOUR == 0 {
        format!("{}h", secs / HOUR)
    } else if secs > MINUTE && secs % MINUTE == 0 {
        format!("{}m", secs / MINUTE)
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
            ("5d", Some(5 * 86_400_000)),
            ("1d", Some(86_400_000)),
            ("2w", Some(14 * 86_400_000)),
            ("0w", Some(0)),
            ("5y", None),
            ("5D", None),
            ("1w2d", None),
            ("1e3s", None),
            ("+5s", None),
            ("5s ", None),
            ("ms", None),
            ("999999999999w", None),
            ("99999999999999999999999ms", None),
            ("", None),
            ("99999999999999h", None),
        ];
        for (s, ms) in cases {
            assert_eq!(
                parse_duration(s).ok(),
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
            0u64,
            1,
            250,
            1_000,
            1_500,
            60_000,
            90_000,
            3_600_000,
            7_200_000,
            86_400_000,
            172_800_000,
            604_800_000,
            1_209_600_000,
            30 * 86_400_000,
            90_000_000,
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{ms}ms");
        }
    }

    #[test]
    fn duration_spellings() {
        let cases: &[(u64, &str)] = &[
            (0, "0s"),
            (250, "250ms"),
            (1_500, "1500ms"),
            (60, "60s"),
            (90, "90s"),
            (120, "2m"),
            (3_600, "1h"),
            (86_400, "24h"),
            (90_000, "25h"),
            (172_800, "2d"),
            (604_800, "7d"),
            (1_209_600, "2w"),
            (2_592_000, "30d"),
        ];
        for (n, shown) in cases {
            let d = if shown.ends_with("ms") {
                Duration::from_millis(*n)
            } else {
                Duration::from_secs(*n)
            };
            assert_eq!(format_duration(d), *shown);
        }
    }

    #[test]
    fn duration_errors_name_the_value_and_the_syntax() {
        let m = parse_duration("5x").unwrap_err();
        assert_eq!(
            m,
            "\"5x\" is not a duration (expected a whole number and a unit: ms, s, m, h, d or w; \
             e.g. \"250ms\", \"5s\", \"1m\", \"1h\", \"1d\", \"2w\")"
        );
        let m = parse_duration("999999999999w").unwrap_err();
        assert_eq!(m, "\"999999999999w\" is too large a duration");
        // the public path is the same function
        assert_eq!(
            crate::config::parse_duration("2w"),
            Ok(Duration::from_secs(14 * 86_400))
        );
    }
}
