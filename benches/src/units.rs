//! Rates and durations as people write them: `100Mbit`, `1Gbit`, `4MB`,
//! `4MiB`, `512k` (bytes per second unless it says bit); `40ms`, `1.5s`.

/// Parses a rate into bytes per second: a number, then an optional
/// decimal (`k`, `M`, `G`) or binary (`Ki`, `Mi`, `Gi`) prefix, then
/// `bit`/`bps` (bits) or `B`/nothing (bytes), case-insensitive except
/// that `b` alone means bits and `B` bytes.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let bad = || format!("not a rate: {s:?} (write e.g. 100Mbit, 1Gbit, 4MB, 4MiB)");
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim();
    let (bits, prefix) = if let Some(p) = unit
        .strip_suffix("bit")
        .or_else(|| unit.strip_suffix("bps"))
        .or_else(|| unit.strip_suffix("Bit"))
        .or_else(|| unit.strip_suffix('b'))
    {
        (true, p)
    } else {
        (false, unit.strip_suffix('B').unwrap_or(unit))
    };
    let scale = match prefix.to_ascii_lowercase().as_str() {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "ki" => 1024.0,
        "mi" => 1024.0 * 1024.0,
        "gi" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let bytes = value * scale / if bits { 8.0 } else { 1.0 };
    if !bytes.is_finite() || bytes < 1.0 {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}

/// Parses a duration: a number of `ms`, `s` or `us` (milliseconds when no
/// unit is given).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("not a duration: {s:?} (write e.g. 40ms, 0.5s)");
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        (t, 1e-3)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v < 0.0 {
        return Err(bad());
    }
    Ok(std::time::Duration::from_secs_f64(v * scale))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100Mbit"), Ok(12_500_000));
        assert_eq!(parse_rate("1Gbit"), Ok(125_000_000));
        assert_eq!(parse_rate("10mbps"), Ok(1_250_000));
        assert_eq!(parse_rate("4MB"), Ok(4_000_000));
        assert_eq!(parse_rate("4MiB"), Ok(4 << 20));
        assert_eq!(parse_rate("512k"), Ok(512_000));
        assert_eq!(parse_rate("1000"), Ok(1000));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10Xbit").is_err());
        assert!(parse_rate("0").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("40ms"), Ok(Duration::from_millis(40)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("20"), Ok(Duration::from_millis(20)));
        assert!(parse_duration("-1ms").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
