//! Kubernetes resource quantities (`1500m`, `2Gi`, `1e3`) as exact integers.
//!
//! The engine accounts CPU in millicores and memory and storage in bytes. A
//! quantity that does not parse, is negative, or does not fit is an error, never
//! a silent zero.

/// Why a quantity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// Not the Kubernetes quantity grammar.
    #[error("`{0}` is not a Kubernetes quantity (expected e.g. `500m`, `4`, `16Gi`)")]
    Unparsable(String),
    /// Below zero.
    #[error("`{0}` is negative")]
    Negative(String),
    /// Larger than the engine can account.
    #[error("`{0}` is too large")]
    Overflow(String),
}

/// Parses a quantity and returns it scaled by `10^scale_exp`, rounded up
/// (so a request is never under-counted). `scale_exp = 3` gives millis.
fn parse_scaled(text: &str, scale_exp: i32) -> Result<u64, QuantityError> {
    let unparsable = || QuantityError::Unparsable(text.to_owned());
    let trimmed = text.trim();
    if trimmed.starts_with('-') {
        return Err(QuantityError::Negative(text.to_owned()));
    }
    let body = trimmed.strip_prefix('+').unwrap_or(trimmed);
    let number_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(number_end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(unparsable());
    }
    // (binary multiplier, decimal exponent)
    let (binary, mut exponent): (u128, i32) = match suffix {
        "" => (1, 0),
        "n" => (1, -9),
        "u" => (1, -6),
        "m" => (1, -3),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        other => {
            let exp = other
                .strip_prefix('e')
                .or_else(|| other.strip_prefix('E'))
                .ok_or_else(unparsable)?;
            (1, exp.parse::<i32>().map_err(|_| unparsable())?)
        }
    };
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    let digits = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    exponent = exponent
        .checked_sub(i32::try_from(frac_part.len()).map_err(|_| unparsable())?)
        .ok_or_else(unparsable)?;
    exponent = exponent.checked_add(scale_exp).ok_or_else(unparsable)?;
    let overflow = || QuantityError::Overflow(text.to_owned());
    if digits.is_empty() {
        return Ok(0);
    }
    if digits.len() > 30 {
        return Err(overflow());
    }
    let mantissa: u128 = digits.parse().map_err(|_| unparsable())?;
    let value = mantissa.checked_mul(binary).ok_or_else(overflow)?;
    let scaled = if exponent >= 0 {
        let factor = 10u128
            .checked_pow(u32::try_from(exponent).map_err(|_| overflow())?)
            .ok_or_else(overflow)?;
        value.checked_mul(factor).ok_or_else(overflow)?
    } else {
        let divisor_exp = u32::try_from(-exponent).map_err(|_| overflow())?;
        match 10u128.checked_pow(divisor_exp) {
            Some(divisor) => value.div_ceil(divisor),
            // Smaller than one unit but not zero: round up to one.
            None => 1,
        }
    };
    u64::try_from(scaled).map_err(|_| overflow())
}

/// CPU in millicores (`"1.5"` → 1500, `"250m"` → 250).
///
/// # Errors
/// Unparsable, negative or overflowing quantities.
pub fn cpu_millis(text: &str) -> Result<u64, QuantityError> {
    parse_scaled(text, 3)
}

/// Memory or storage in bytes (`"1Gi"` → 1073741824, `"1G"` → 10^9).
///
/// # Errors
/// Unparsable, negative or overflowing quantities.
pub fn bytes(text: &str) -> Result<u64, QuantityError> {
    parse_scaled(text, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_forms() {
        assert_eq!(cpu_millis("2"), Ok(2000));
        assert_eq!(cpu_millis("1.5"), Ok(1500));
        assert_eq!(cpu_millis("250m"), Ok(250));
        assert_eq!(cpu_millis("0.1"), Ok(100));
        assert_eq!(cpu_millis("100000u"), Ok(100));
        assert_eq!(cpu_millis("1e3"), Ok(1_000_000));
        assert_eq!(
            cpu_millis("1n"),
            Ok(1),
            "a tiny request rounds up, not to zero"
        );
        assert_eq!(cpu_millis("0"), Ok(0));
    }

    #[test]
    fn parses_memory_forms() {
        assert_eq!(bytes("1Gi"), Ok(1 << 30));
        assert_eq!(bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(bytes("2G"), Ok(2_000_000_000));
        assert_eq!(bytes("128974848"), Ok(128_974_848));
        assert_eq!(bytes("129e6"), Ok(129_000_000));
        assert_eq!(bytes("123Mi"), Ok(123 << 20));
    }

    #[test]
    fn rejects_bad_quantities_with_the_text() {
        assert_eq!(cpu_millis("-1"), Err(QuantityError::Negative("-1".into())));
        assert_eq!(bytes("lots"), Err(QuantityError::Unparsable("lots".into())));
        assert_eq!(
            bytes("1.2.3"),
            Err(QuantityError::Unparsable("1.2.3".into()))
        );
        assert_eq!(bytes("5Zi"), Err(QuantityError::Unparsable("5Zi".into())));
        assert_eq!(bytes(""), Err(QuantityError::Unparsable(String::new())));
        assert_eq!(
            bytes("99999Ei"),
            Err(QuantityError::Overflow("99999Ei".into()))
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(text in ".{0,24}") {
            let _ = cpu_millis(&text);
            let _ = bytes(&text);
        }

        #[test]
        fn integers_round_trip(n in 0u64..1_000_000_000) {
            proptest::prop_assert_eq!(bytes(&n.to_string()), Ok(n));
            proptest::prop_assert_eq!(cpu_millis(&format!("{n}m")), Ok(n));
        }
    }
}
