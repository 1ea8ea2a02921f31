//! Signed 128-bit multiplication with overflow, built with the guest's own
//! wide-arithmetic instructions.
//!
//! Arrow multiplies Decimal128 values with `i128::checked_mul`, which LLVM
//! turns into a call to compiler-rt's `__muloti4`. Rust's standard library
//! ships that function precompiled for plain wasm32, where every 64×64-bit
//! product inside it is one more call (`__multi3`). The guest is built with
//! `i64.mul_wide_u` (see .cargo/config.toml), so it defines the symbol itself
//! and the linker takes this definition over the library's weak one.

/// `a * b` wrapped to 128 bits, and whether the exact product overflows
/// `i128`: what `i128::overflowing_mul` returns, without asking LLVM for an
/// overflowing multiply (which would call `__muloti4`, this very function).
pub fn overflowing_mul(a: i128, b: i128) -> (i128, bool) {
    // Decimals of up to 18 digits, nearly every operand Arrow multiplies,
    // fit in 64 bits. The product of two such values always fits in i128
    // and is one signed widening multiply (`i64.mul_wide_s`).
    if let (Ok(a), Ok(b)) = (i64::try_from(a), i64::try_from(b)) {
        return (i128::from(a).wrapping_mul(i128::from(b)), false);
    }
    let wrapped = a.wrapping_mul(b);
    let negative = (a < 0) != (b < 0);
    let (x, y) = (a.unsigned_abs(), b.unsigned_abs());
    let (x_high, x_low) = ((x >> 64) as u64, x as u64);
    let (y_high, y_low) = ((y >> 64) as u64, y as u64);
    // |a| * |b| < 2^128 needs one high half to be zero; then the cross term
    // is a single 64×64 product and must fit in 64 bits.
    let magnitude = if x_high != 0 && y_high != 0 {
        None
    } else {
        let cross = u128::from(x_high) * u128::from(y_low) + u128::from(x_low) * u128::from(y_high);
        u64::try_from(cross).ok().and_then(|cross| {
            (u128::from(x_low) * u128::from(y_low)).checked_add(u128::from(cross) << 64)
        })
    };
    let fits = match magnitude {
        None => false,
        // -2^127 is the one magnitude only a negative product may have.
        Some(m) if negative => m <= 1u128 << 127,
        Some(m) => m < 1u128 << 127,
    };
    (wrapped, !fits)
}

/// compiler-rt's signature: the wrapped product, `*overflow` set to 1 if the
/// exact product does not fit.
#[cfg(target_family = "wasm")]
#[allow(unsafe_code)]
// SAFETY: replaces compiler-rt's (weak) definition with one of the same
// signature and meaning; nothing else in the guest defines this symbol.
#[unsafe(no_mangle)]
pub extern "C" fn __muloti4(a: i128, b: i128, overflow: &mut i32) -> i128 {
    let (product, overflowed) = overflowing_mul(a, b);
    *overflow = i32::from(overflowed);
    product
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::overflowing_mul;

    /// Values at every boundary the halves and the sign can cross.
    fn edges() -> Vec<i128> {
        let mut values = vec![
            0,
            1,
            2,
            3,
            10,
            i128::MAX,
            i128::MIN,
            i128::MAX - 1,
            i128::MIN + 1,
        ];
        for shift in [31, 32, 62, 63, 64, 65, 96, 126] {
            let p = 1i128 << shift;
            values.extend([p - 1, p, p + 1]);
        }
        for power in [9, 18, 19, 20, 38] {
            values.push(10i128.pow(power));
            values.push(10i128.pow(power) - 1);
        }
        values.push(u64::MAX as i128);
        values.push((1i128 << 127) / 3);
        let negated: Vec<i128> = values.iter().map(|v| v.wrapping_neg()).collect();
        values.extend(negated);
        values
    }

    #[test]
    fn agrees_with_the_standard_library_on_every_pair_of_edges() {
        let values = edges();
        let mut overflows = 0;
        for &a in &values {
            for &b in &values {
                let expected = a.overflowing_mul(b);
                assert_eq!(overflowing_mul(a, b), expected, "{a} * {b}");
                overflows += usize::from(expected.1);
            }
        }
        // Both outcomes must be exercised, or the comparison proves little.
        assert!(overflows > 100 && overflows < values.len() * values.len() - 100);
    }

    proptest! {
        #[test]
        fn agrees_with_the_standard_library(a: i128, b: i128, shift_a in 0u32..127, shift_b in 0u32..127) {
            // Shifted down, the operands cover every magnitude, not only the
            // huge ones uniform i128s almost always are.
            let (a, b) = (a >> shift_a, b >> shift_b);
            prop_assert_eq!(overflowing_mul(a, b), a.overflowing_mul(b));
        }
    }
}
