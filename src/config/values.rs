//! Value syntaxes shared by the config, the key API and the CLI: durations
//! and rate limits.

use std::num::NonZeroU32;
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

/// The unit of a [`RateLimit`]: its window, aligned to UTC seconds, minutes
/// or hours (contract §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateUnit {
    Second,
    Minute,
    Hour,
}

impl RateUnit {
    /// The window's length in seconds (1, 60, 3600).
    pub fn seconds(self) -> u64 {
        match self {
            RateUnit::Second => 1,
            RateUnit::Minute => 60,
            RateUnit::Hour => 3_600,
        }
    }

    /// The unit as written after the `/`: `s`, `min`, `h`.
    pub fn as_str(self) -> &'static str {
        match self {
            RateUnit::Second => "s",
            RateUnit::Minute => "min",
            RateUnit::Hour => "h",
        }
    }
}

/// A per-key rate limit (contract §11): at most `limit` requests per window
/// of one `per`. Written `"N/s"`, `"N/min"` or `"N/h"`; [`RateLimit::parse`]
/// and `Display` (and serde, as that string) use exactly that form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateLimit {
    pub limit: NonZeroU32,
    pub per: RateUnit,
}

impl RateLimit {
    /// `"N/s"`, `"N/min"` or `"N/h"`: N is 1 to 4294967295 in decimal digits
    /// only (no sign, space or leading zero, so that parsing and `Display`
    /// agree on one spelling per value).
    pub fn parse(s: &str) -> Result<RateLimit, String> {
        // The value may come from a request body: echo only a short one.
        let shown = if s.len() <= 32 {
            super::table::quote(s)
        } else {
            "the value".to_string()
        };
        let bad = || {
            format!(
                "{shown} is not a rate limit (expected N/s, N/min or N/h with N a whole number \
                 of at least 1, e.g. \"600/min\")"
            )
        };
        let (num, unit) = s.split_once('/').ok_or_else(bad)?;
        let per = match unit {
            "s" => RateUnit::Second,
            "min" => RateUnit::Minute,
            "h" => RateUnit::Hour,
            _ => return Err(bad()),
        };
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        if num.bytes().all(|b| b == b'0') {
            return Err(format!("{shown}: N must be at least 1"));
        }
        if num.starts_with('0') {
            return Err(bad());
        }
        let n: u32 = num
            .parse()
            .map_err(|_| format!("{shown}: N must be at most {}", u32::MAX))?;
        let limit = NonZeroU32::new(n).ok_or_else(bad)?;
        Ok(RateLimit { limit, per })
    }
}

impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.limit, self.per.as_str())
    }
}

impl std::str::FromStr for RateLimit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RateLimit::parse(s)
    }
}

impl serde::Serialize for RateLimit {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for RateLimit {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        RateLimit::parse(&s).map_err(serde::de::Error::custom)
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

    #[test]
    fn rate_limits_parse_only_the_canonical_form() {
        let good: &[(&str, u32, RateUnit)] = &[
            ("1/s", 1, RateUnit::Second),
            ("600/min", 600, RateUnit::Minute),
            ("10/h", 10, RateUnit::Hour),
            ("4294967295/s", u32::MAX, RateUnit::Second),
        ];
        for (s, n, per) in good {
            let r = RateLimit::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!((r.limit.get(), r.per), (*n, *per), "{s}");
            assert_eq!(r.to_string(), *s, "Display round trip");
            assert_eq!(RateLimit::parse(&r.to_string()), Ok(r));
            assert_eq!(s.parse::<RateLimit>(), Ok(r));
        }
        for bad in [
            "0/s",
            "00/min",
            "5/sec",
            "5/m",
            "5/S",
            "5/Min",
            "5/hour",
            "-1/min",
            "+5/s",
            "5 /s",
            "5/ s",
            " 5/s",
            "5/s ",
            "5",
            "/s",
            "5/",
            "5//s",
            "5/s/s",
            "1.5/s",
            "05/s",
            "1e3/s",
            "٣/s",
            "4294967296/s",
            "99999999999999999999999/h",
            "",
        ] {
            assert!(RateLimit::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(
            RateLimit::parse("0/s").unwrap_err(),
            "\"0/s\": N must be at least 1"
        );
        assert_eq!(
            RateLimit::parse("4294967296/s").unwrap_err(),
            "\"4294967296/s\": N must be at most 4294967295"
        );
        assert!(RateLimit::parse("5/sec")
            .unwrap_err()
            .starts_with("\"5/sec\" is not a rate limit"));
        let long = "9".repeat(100) + "/x";
        assert!(!RateLimit::parse(&long).unwrap_err().contains(&long));
    }

    #[test]
    fn rate_units_and_serde() {
        assert_eq!(RateUnit::Second.seconds(), 1);
        assert_eq!(RateUnit::Minute.seconds(), 60);
        assert_eq!(RateUnit::Hour.seconds(), 3_600);
        let r = RateLimit::parse("600/min").unwrap();
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"600/min\"");
        assert_eq!(serde_json::from_str::<RateLimit>("\"600/min\"").unwrap(), r);
        assert!(serde_json::from_str::<RateLimit>("\"0/min\"").is_err());
        assert!(serde_json::from_str::<RateLimit>("600").is_err());
        assert_eq!(
            serde_json::to_string(&Some(r)).unwrap(),
            serde_json::to_string(&"600/min").unwrap()
        );
    }
}
