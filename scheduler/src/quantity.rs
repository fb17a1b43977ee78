//! Exact parsing of Kubernetes resource quantities (`100m`, `1.5`, `512Mi`, `1G`, `2e3`).
//!
//! Hand-written because k8s-openapi's `Quantity` is only a string wrapper and the Rust crates that
//! parse it go through `f64` (so `0.1` cpu or `1.1Gi` round wrongly) or accept a different
//! grammar. The grammar and rounding here are those of `k8s.io/apimachinery/pkg/api/resource`:
//!
//! ```text
//! quantity ::= signedNumber suffix
//! signedNumber ::= ("+" | "-")? (digits | digits "." digits? | "." digits)
//! suffix ::= binarySI (Ki Mi Gi Ti Pi Ei) | decimalSI (n u m "" k M G T P E)
//!          | ("e" | "E") signedInteger
//! ```
//!
//! A value is kept exactly as `mantissa * 10^exp10 * 2^exp2`; `milli_value` and `value` round up
//! (towards +inf) as Kubernetes' `MilliValue()` and `Value()` do, and saturate at the `i64` range.

use std::fmt;

/// A quantity string that does not follow the Kubernetes grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid quantity {input:?}: {reason} (write quantities like \"100m\", \"1.5\", \"512Mi\", \"1G\" or \"2e3\")"
)]
pub struct QuantityError {
    pub input: String,
    pub reason: String,
}

/// A parsed quantity, exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedQuantity {
    /// Signed digits of the number with the decimal point removed.
    mantissa: i128,
    exp10: i32,
    exp2: u32,
}

/// More digits than this cannot be represented exactly in `i128`; Kubernetes itself caps
/// quantities far below (int64 with a scale), so such inputs are refused rather than rounded.
const MAX_DIGITS: usize = 36;

impl ParsedQuantity {
    /// Parses a quantity string.
    pub fn parse(input: &str) -> Result<ParsedQuantity, QuantityError> {
        let err = |reason: &str| QuantityError {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        // No trimming: Kubernetes refuses surrounding blanks too.
        let s = input;
        if s.is_empty() {
            return Err(err("it is empty"));
        }
        let bytes = s.as_bytes();
        let mut i = 0;
        let negative = match bytes[0] {
            b'-' => {
                i = 1;
                true
            }
            b'+' => {
                i = 1;
                false
            }
            _ => false,
        };
        let mut mantissa: i128 = 0;
        let mut digits = 0usize;
        let mut frac_digits = 0i32;
        let mut seen_point = false;
        let mut any_digit = false;
        while i < bytes.len() {
            match bytes[i] {
                c @ b'0'..=b'9' => {
                    any_digit = true;
                    // Leading zeros carry no information and must not count against MAX_DIGITS.
                    if mantissa != 0 || c != b'0' {
                        digits += 1;
                    }
                    if digits > MAX_DIGITS {
                        return Err(err("it has too many digits"));
                    }
                    mantissa = mantissa * 10 + i128::from(c - b'0');
                    if seen_point {
                        frac_digits += 1;
                    }
                }
                b'.' if !seen_point => seen_point = true,
                b'.' => return Err(err("it has two decimal points")),
                _ => break,
            }
            i += 1;
        }
        if !any_digit {
            return Err(err("it does not start with a number"));
        }
        let suffix = &s[i..];
        let (exp10, exp2) = match suffix {
            "" => (0, 0),
            "n" => (-9, 0),
            "u" => (-6, 0),
            "m" => (-3, 0),
            "k" => (3, 0),
            "M" => (6, 0),
            "G" => (9, 0),
            "T" => (12, 0),
            "P" => (15, 0),
            "E" => (18, 0),
            "Ki" => (0, 10),
            "Mi" => (0, 20),
            "Gi" => (0, 30),
            "Ti" => (0, 40),
            "Pi" => (0, 50),
            "Ei" => (0, 60),
            _ if suffix.len() > 1 && (suffix.starts_with('e') || suffix.starts_with('E')) => {
                let exp = &suffix[1..];
                let unsigned = exp.strip_prefix(['+', '-']).unwrap_or(exp);
                if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(err("its exponent is not an integer"));
                }
                let value: i32 = exp
                    .parse()
                    .map_err(|_| err("its exponent is out of range"))?;
                if !(-1000..=1000).contains(&value) {
                    return Err(err("its exponent is out of range"));
                }
                (value, 0)
            }
            _ => return Err(err(&format!("unknown suffix {suffix:?}"))),
        };
        Ok(ParsedQuantity {
            mantissa: if negative { -mantissa } else { mantissa },
            exp10: exp10 - frac_digits,
            exp2,
        })
    }

    /// `ceil(self * 10^scale)`, saturating at the `i64` range.
    fn scaled_ceil(&self, scale: i32) -> i64 {
        if self.mantissa == 0 {
            return 0;
        }
        let saturate = |negative: bool| if negative { i64::MIN } else { i64::MAX };
        let negative = self.mantissa < 0;
        // mantissa * 2^exp2, checked.
        let Some(mut numerator) = 1i128
            .checked_shl(self.exp2)
            .filter(|_| self.exp2 < 127)
            .and_then(|p| self.mantissa.checked_mul(p))
        else {
            return saturate(negative);
        };
        let exp = self.exp10 + scale;
        if exp >= 0 {
            for _ in 0..exp {
                match numerator.checked_mul(10) {
                    Some(n) if n.abs() <= i128::from(i64::MAX) * 10 => numerator = n,
                    _ => return saturate(negative),
                }
            }
            return i64::try_from(numerator).unwrap_or(saturate(negative));
        }
        // Divide by 10^-exp rounding up; past 10^38 the quotient is 0 with a remainder.
        let mut denominator: i128 = 1;
        for _ in 0..(-exp) {
            match denominator.checked_mul(10) {
                Some(d) => denominator = d,
                None => return if negative { 0 } else { 1 },
            }
        }
        let quotient = numerator.div_euclid(denominator);
        let rounded = if numerator.rem_euclid(denominator) != 0 {
            quotient + 1
        } else {
            quotient
        };
        i64::try_from(rounded).unwrap_or(saturate(negative))
    }

    /// The value in thousandths, rounded up (Kubernetes' `MilliValue()`): cpu in millicores.
    pub fn milli_value(&self) -> i64 {
        self.scaled_ceil(3)
    }

    /// The value in units, rounded up (Kubernetes' `Value()`): bytes, counts.
    pub fn value(&self) -> i64 {
        self.scaled_ceil(0)
    }
}

impl fmt::Display for ParsedQuantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}e{}*2^{}", self.mantissa, self.exp10, self.exp2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn milli(s: &str) -> i64 {
        ParsedQuantity::parse(s)
            .unwrap_or_else(|e| panic!("{e}"))
            .milli_value()
    }
    fn value(s: &str) -> i64 {
        ParsedQuantity::parse(s)
            .unwrap_or_else(|e| panic!("{e}"))
            .value()
    }

    #[test]
    fn cpu_forms_in_millicores() {
        assert_eq!(milli("100m"), 100);
        assert_eq!(milli("1"), 1000);
        assert_eq!(milli("1.5"), 1500);
        assert_eq!(milli("0.1"), 100);
        assert_eq!(milli(".5"), 500);
        assert_eq!(milli("5."), 5000);
        assert_eq!(milli("2e3"), 2_000_000);
        assert_eq!(milli("2E-3"), 2);
        assert_eq!(milli("+3"), 3000);
        assert_eq!(milli("0"), 0);
        assert_eq!(milli("250000u"), 250);
    }

    #[test]
    fn rounds_up_like_kubernetes() {
        // 1n cpu is a thousandth of a millicore: MilliValue() rounds it up to 1.
        assert_eq!(milli("1n"), 1);
        assert_eq!(milli("1500u"), 2);
        assert_eq!(value("0.1"), 1);
        assert_eq!(value("1m"), 1);
        assert_eq!(value("-1.5"), -1);
        assert_eq!(value("1e-40"), 1);
    }

    #[test]
    fn memory_forms_in_bytes() {
        assert_eq!(value("512Mi"), 512 * 1024 * 1024);
        assert_eq!(value("1G"), 1_000_000_000);
        assert_eq!(value("1Gi"), 1 << 30);
        assert_eq!(value("1.5Gi"), 3 << 29);
        assert_eq!(value("1.1Gi"), 1_181_116_007); // ceil(1.1 * 2^30) = ceil(1181116006.4)
        assert_eq!(value("128974848"), 128_974_848);
        assert_eq!(value("129e6"), 129_000_000);
        assert_eq!(value("123Mi"), 128_974_848);
        assert_eq!(value("1k"), 1000);
        assert_eq!(value("1Ki"), 1024);
        assert_eq!(value("1E"), 1_000_000_000_000_000_000);
        assert_eq!(value("1Ei"), 1 << 60);
        assert_eq!(value("000000000000000000000000000000000000000001"), 1);
    }

    #[test]
    fn saturates_instead_of_overflowing() {
        assert_eq!(value("100Ei"), i64::MAX);
        assert_eq!(value("1e300"), i64::MAX);
        assert_eq!(value("-1e300"), i64::MIN);
    }

    #[test]
    fn rejects_what_kubernetes_rejects() {
        for bad in [
            "", " ", "m", "1.2.3", "1x", "1KiB", "1 Ki", "1e", "1e1.5", "--1", "1ki", "Mi", ".",
            "1e+", "0x10", "1mm",
        ] {
            let e = ParsedQuantity::parse(bad).expect_err(bad);
            assert!(e.to_string().contains("invalid quantity"), "{e}");
        }
        assert!(ParsedQuantity::parse("1234567890123456789012345678901234567").is_err());
    }
}
