//! The JSON Canonicalization Scheme (RFC 8785) and the `hash128` of a schema (SPEC §2.1, §8).
//!
//! The canonical form has no whitespace, object members sorted by their names compared as
//! UTF-16 code units, numbers written as ECMAScript's `Number.prototype.toString` writes
//! them (every number is an IEEE 754 double), and strings with the minimal escaping of
//! RFC 8785 §3.2.2.2.
//!
//! ```
//! use serde_json::json;
//! use xcp::schema::canonical::canonicalize;
//!
//! let v = json!({"b": [1.50, 1e30, true], "a": "é\n"});
//! assert_eq!(canonicalize(&v), r#"{"a":"é\n","b":[1.5,1e+30,true]}"#);
//! ```

use std::fmt::Write as _;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The RFC 8785 canonical form of `v`.
///
/// A number that is not finite cannot occur in a `serde_json::Value`; integers beyond 2^53
/// are written as the nearest double, as RFC 8785 requires.
pub fn canonicalize(v: &Value) -> String {
    let mut out = String::new();
    write_value(v, &mut out);
    out
}

/// The first 16 bytes of SHA-256 over the canonical form of `v`: the `hash128` of a schema.
pub fn hash128(v: &Value) -> [u8; 16] {
    let digest = Sha256::digest(canonicalize(v).as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

fn write_value(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let f = n
                .as_f64()
                .or_else(|| n.as_i64().map(|i| i as f64))
                .unwrap_or(0.0);
            write_number(f, out);
        }
        Value::String(s) => write_string(s, out),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_value(&m[k], out);
            }
            out.push('}');
        }
    }
}

/// RFC 8785 §3.2.2.2: `"` and `\` escaped, the short escapes `\b \t \n \f \r`, other
/// control characters as `\u00xx` in lower-case hex, everything else as it is.
fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// ECMAScript `Number.prototype.toString` (ECMA-262 §6.1.6.1.20) for a finite double: the
/// shortest digits that round-trip, in plain notation for exponents in `-7 < n <= 21`, else
/// in exponent notation (`1e+30`, `5e-324`).
pub fn write_number(f: f64, out: &mut String) {
    if f == 0.0 || !f.is_finite() {
        // -0 is written "0"; NaN and infinities do not occur in JSON.
        out.push('0');
        return;
    }
    if f < 0.0 {
        out.push('-');
    }
    // Rust's `{:e}` gives the shortest round-tripping digits: "d.ddde-x".
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp = exp.parse::<i32>().unwrap_or(0);
    let digits = tie_to_even(
        mantissa.chars().filter(|c| *c != '.').collect(),
        exp,
        f.abs(),
    );
    let k = digits.len() as i32;
    // The decimal point sits after `n` digits: value = 0.digits × 10^n.
    let n = exp + 1;
    if k <= n && n <= 21 {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        out.push_str(&digits[..n as usize]);
        out.push('.');
        out.push_str(&digits[n as usize..]);
    } else if -6 < n && n <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-n) as usize));
        out.push_str(&digits);
    } else {
        out.push_str(&digits[..1]);
        if k > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let e = n - 1;
        let _ = write!(out, "e{}{}", if e < 0 { '-' } else { '+' }, e.abs());
    }
}

/// Rust's shortest digits round a tie up; ECMAScript takes the even one (ECMA-262: "if
/// there are two such possible values of n, choose the one that is even"). A tie is a value
/// whose exact decimal expansion is the shortest digits' neighbourhood midpoint: the digit
/// after them a 5 followed by zeros only. `a` is positive; `digits` its shortest digits
/// with exponent `exp` (value = d.ddd × 10^exp).
fn tie_to_even(digits: String, exp: i32, a: f64) -> String {
    let k = digits.len();
    if digits.as_bytes()[k - 1].is_multiple_of(2) {
        return digits;
    }
    // Every double's exact decimal expansion has at most 767 significant digits.
    let exact = format!("{a:.800e}");
    let Some((m, e)) = exact.split_once('e') else {
        return digits;
    };
    if e.parse::<i32>() != Ok(exp) {
        return digits;
    }
    let ed: Vec<u8> = m.bytes().filter(|c| *c != b'.').collect();
    if ed.len() <= k + 1 || ed[k] != b'5' || ed[k + 1..].iter().any(|&c| c != b'0') {
        return digits;
    }
    let lo = &ed[..k];
    let alt: Vec<u8> = if lo != digits.as_bytes() {
        lo.to_vec()
    } else {
        // lo + 1 in the last digit; a carry out of the first digit changes the exponent:
        // keep Rust's choice then.
        let mut up = lo.to_vec();
        let mut i = k;
        loop {
            if i == 0 {
                return digits;
            }
            i -= 1;
            if up[i] == b'9' {
                up[i] = b'0';
            } else {
                up[i] += 1;
                break;
            }
        }
        up
    };
    let alt = String::from_utf8(alt).unwrap_or_default();
    let text = format!("{}.{}e{exp}", &alt[..1], &alt[1..]);
    match text.parse::<f64>() {
        Ok(v) if v.to_bits() == a.to_bits() => alt.trim_end_matches('0').to_string(),
        _ => digits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn num(bits: u64) -> String {
        let mut s = String::new();
        write_number(f64::from_bits(bits), &mut s);
        s
    }

    /// RFC 8785 Appendix B: IEEE 754 doubles and their canonical text.
    #[test]
    fn rfc8785_number_examples() {
        for (bits, want) in [
            (0x0000_0000_0000_0000u64, "0"),
            (0x8000_0000_0000_0000, "0"),
            (0x0000_0000_0000_0001, "5e-324"),
            (0x8000_0000_0000_0001, "-5e-324"),
            (0x7fef_ffff_ffff_ffff, "1.7976931348623157e+308"),
            (0xffef_ffff_ffff_ffff, "-1.7976931348623157e+308"),
            (0x4340_0000_0000_0000, "9007199254740992"),
            (0xc340_0000_0000_0000, "-9007199254740992"),
            (0x4430_0000_0000_0000, "295147905179352830000"),
            (0x44b5_2d02_c7e1_4af5, "9.999999999999997e+22"),
            (0x44b5_2d02_c7e1_4af6, "1e+23"),
            (0x44b5_2d02_c7e1_4af7, "1.0000000000000001e+23"),
            (0x444b_1ae4_d6e2_ef4e, "999999999999999700000"),
            (0x444b_1ae4_d6e2_ef4f, "999999999999999900000"),
            (0x444b_1ae4_d6e2_ef50, "1e+21"),
            (0x3eb0_c6f7_a0b5_ed8c, "9.999999999999997e-7"),
            (0x3eb0_c6f7_a0b5_ed8d, "0.000001"),
            (0x41b3_de43_5555_5553, "333333333.3333332"),
            (0x41b3_de43_5555_5554, "333333333.33333325"),
            (0x41b3_de43_5555_5555, "333333333.3333333"),
            (0x41b3_de43_5555_5556, "333333333.3333334"),
            (0x41b3_de43_5555_5557, "333333333.33333343"),
            (0xbecb_f647_612f_3696, "-0.0000033333333333333333"),
            (0x4314_3ff3_c1cb_0959, "1424953923781206.2"),
        ] {
            assert_eq!(num(bits), want, "{bits:#018x}");
        }
    }

    /// RFC 8785 §3.2.2: the example of whitespace, numbers, strings and literals.
    #[test]
    fn rfc8785_serialization_example() {
        let input = r#"{
          "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
          "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
          "literals": [null, true, false]
        }"#;
        let v: Value = serde_json::from_str(input).unwrap();
        assert_eq!(
            canonicalize(&v),
            r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#
        );
    }

    /// RFC 8785 §3.2.3: members sorted by UTF-16 code units (the emoji's surrogates sort
    /// before U+FB33, though its code point is higher).
    #[test]
    fn rfc8785_sorting_example() {
        let input = r#"{
          "\u20ac": "Euro Sign",
          "\r": "Carriage Return",
          "\ufb33": "Hebrew Letter Dalet With Dagesh",
          "1": "One",
          "\ud83d\ude00": "Emoji: Grinning Face",
          "\u0080": "Control",
          "\u00f6": "Latin Small Letter O With Diaeresis"
        }"#;
        let v: Value = serde_json::from_str(input).unwrap();
        let want = [
            "Carriage Return",
            "One",
            "Control",
            "Latin Small Letter O With Diaeresis",
            "Euro Sign",
            "Emoji: Grinning Face",
            "Hebrew Letter Dalet With Dagesh",
        ];
        let text = canonicalize(&v);
        let got: Vec<&str> = text
            .trim_matches(|c| c == '{' || c == '}')
            .split(',')
            .map(|m| m.split_once("\":").unwrap().1.trim_matches('"'))
            .collect();
        assert_eq!(got, want);
        assert!(canonicalize(&v).starts_with(r#"{"\r":"Carriage Return","1":"One""#));
    }

    proptest::proptest! {
        /// Every finite double is written so that it parses back to itself, in the
        /// ECMAScript shape (no `.0`, `e+`/`e-` exponents only outside 1e-6..1e21).
        #[test]
        fn numbers_round_trip(bits in proptest::prelude::any::<u64>()) {
            let f = f64::from_bits(bits);
            if f.is_finite() {
                let mut s = String::new();
                write_number(f, &mut s);
                let back: f64 = s.parse().unwrap();
                proptest::prop_assert!(back == f, "{f:e} written as {s}");
                proptest::prop_assert!(!s.ends_with(".0") && !s.contains("e0"), "{s}");
                let a = f.abs();
                if a != 0.0 && (1e-6..1e21).contains(&a) {
                    proptest::prop_assert!(!s.contains('e'), "{s}");
                }
            }
        }
    }

    #[test]
    fn nested_and_escapes() {
        let v = json!({"z": {"b": 1, "a": [0.1, -0.0, 100]}, "\u{1}": "\u{1f}\t"});
        assert_eq!(
            canonicalize(&v),
            "{\"\\u0001\":\"\\u001f\\t\",\"z\":{\"a\":[0.1,0,100],\"b\":1}}"
        );
        assert_eq!(
            hash128(&json!({})),
            // SHA-256("{}") = 44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a
            [
                0x44, 0x13, 0x6f, 0xa3, 0x55, 0xb3, 0x67, 0x8a, 0x11, 0x46, 0xad, 0x16, 0xf7, 0xe8,
                0x64, 0x9e
            ]
        );
    }
}
