//! Zigzag LEB128 variable-length integers, as in protobuf's `sint32`/`sint64` and Kafka's
//! `ByteUtils.writeVarint`/`writeVarlong`.
//!
//! Format: the value is zigzag-mapped (`0, -1, 1, -2, ...` to `0, 1, 2, 3, ...`) so that small
//! negative numbers stay short, then written 7 bits at a time, least significant group first, with
//! the high bit of each byte set when another byte follows. A varint takes at most 5 bytes, a
//! varlong at most 10.
//!
//! Decoding accepts non-minimal encodings (as Kafka does) but rejects encodings that are too long
//! or whose last byte carries bits beyond 32 (varint) or 64 (varlong), rather than silently
//! dropping them. Pure functions, thread-safe.

use bytes::BufMut;

/// Longest encoding of a 32-bit varint.
pub(crate) const VARINT_BYTES_MAX: usize = 5;
/// Longest encoding of a 64-bit varlong.
pub(crate) const VARLONG_BYTES_MAX: usize = 10;

const _: () = assert!(VARINT_BYTES_MAX * 7 >= 32);
const _: () = assert!((VARINT_BYTES_MAX - 1) * 7 < 32);
const _: () = assert!(VARLONG_BYTES_MAX * 7 >= 64);
const _: () = assert!((VARLONG_BYTES_MAX - 1) * 7 < 64);

fn zigzag32(value: i32) -> u32 {
    ((value << 1) ^ (value >> 31)) as u32
}

fn zigzag64(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag32(raw: u32) -> i32 {
    ((raw >> 1) as i32) ^ -((raw & 1) as i32)
}

fn unzigzag64(raw: u64) -> i64 {
    ((raw >> 1) as i64) ^ -((raw & 1) as i64)
}

fn unsigned_size(mut raw: u64) -> usize {
    let mut size = 1;
    while raw >= 0x80 {
        raw >>= 7;
        size += 1;
    }
    size
}

fn put_unsigned(buf: &mut impl BufMut, mut raw: u64) {
    while raw >= 0x80 {
        buf.put_u8((raw as u8) | 0x80);
        raw >>= 7;
    }
    buf.put_u8(raw as u8);
}

/// Encoded size of `value` as a varint, in bytes (1..=5).
pub(crate) fn varint_size(value: i32) -> usize {
    unsigned_size(u64::from(zigzag32(value)))
}

/// Encoded size of `value` as a varlong, in bytes (1..=10).
pub(crate) fn varlong_size(value: i64) -> usize {
    unsigned_size(zigzag64(value))
}

/// Appends `value` as a zigzag varint.
pub(crate) fn put_varint(buf: &mut impl BufMut, value: i32) {
    put_unsigned(buf, u64::from(zigzag32(value)));
}

/// Appends `value` as a zigzag varlong.
pub(crate) fn put_varlong(buf: &mut impl BufMut, value: i64) {
    put_unsigned(buf, zigzag64(value));
}

/// Reads an unsigned LEB128 value of at most `bits` bits from `buf[*position..]` and advances
/// `position` past it.
fn read_unsigned(
    buf: &[u8],
    position: &mut usize,
    bytes_max: usize,
    bits: u32,
) -> Result<u64, &'static str> {
    let mut raw: u64 = 0;
    for index in 0..bytes_max {
        let Some(&byte) = buf.get(*position + index) else {
            return Err("varint truncated");
        };
        let shift = 7 * index as u32;
        let payload = u64::from(byte & 0x7f);
        if index + 1 == bytes_max {
            // The last possible byte may only carry the bits that are left, and cannot continue.
            if byte & 0x80 != 0 {
                return Err("varint too long");
            }
            if payload >> (bits - shift) != 0 {
                return Err("varint overflows its type");
            }
        }
        raw |= payload << shift;
        if byte & 0x80 == 0 {
            *position += index + 1;
            return Ok(raw);
        }
    }
    unreachable!("the last byte either ends the varint or returns an error");
}

/// Reads a zigzag varint from `buf[*position..]` and advances `position` past it.
///
/// # Errors
///
/// A short reason if the varint is truncated, longer than 5 bytes or wider than 32 bits;
/// `position` is left unchanged then.
pub(crate) fn read_varint(buf: &[u8], position: &mut usize) -> Result<i32, &'static str> {
    let raw = read_unsigned(buf, position, VARINT_BYTES_MAX, 32)?;
    let raw = u32::try_from(raw).expect("read_unsigned checked the width");
    Ok(unzigzag32(raw))
}

/// Reads a zigzag varlong from `buf[*position..]` and advances `position` past it.
///
/// # Errors
///
/// A short reason if the varlong is truncated, longer than 10 bytes or wider than 64 bits;
/// `position` is left unchanged then.
pub(crate) fn read_varlong(buf: &[u8], position: &mut usize) -> Result<i64, &'static str> {
    let raw = read_unsigned(buf, position, VARLONG_BYTES_MAX, 64)?;
    Ok(unzigzag64(raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Encodes with both encoders, checks the size functions, and decodes back.
    fn check_varint(value: i32, expected: &[u8]) {
        let mut buf = Vec::new();
        put_varint(&mut buf, value);
        assert_eq!(buf, expected, "varint {value}");
        assert_eq!(varint_size(value), expected.len(), "varint {value}");
        let mut position = 0;
        assert_eq!(read_varint(&buf, &mut position), Ok(value));
        assert_eq!(position, expected.len());
        // Every 32-bit varint is also a valid varlong with the same value.
        let mut position = 0;
        assert_eq!(read_varlong(&buf, &mut position), Ok(i64::from(value)));
        assert_eq!(position, expected.len());
    }

    fn check_varlong(value: i64, expected: &[u8]) {
        let mut buf = Vec::new();
        put_varlong(&mut buf, value);
        assert_eq!(buf, expected, "varlong {value}");
        assert_eq!(varlong_size(value), expected.len(), "varlong {value}");
        let mut position = 0;
        assert_eq!(read_varlong(&buf, &mut position), Ok(value));
        assert_eq!(position, expected.len());
    }

    #[test]
    fn known_varint_encodings() {
        check_varint(0, &[0x00]);
        check_varint(-1, &[0x01]);
        check_varint(1, &[0x02]);
        check_varint(-64, &[0x7f]);
        check_varint(63, &[0x7e]);
        check_varint(64, &[0x80, 0x01]);
        check_varint(150, &[0xac, 0x02]);
        check_varint(i32::MAX, &[0xfe, 0xff, 0xff, 0xff, 0x0f]);
        check_varint(i32::MIN, &[0xff, 0xff, 0xff, 0xff, 0x0f]);
    }

    #[test]
    fn known_varlong_encodings() {
        check_varlong(0, &[0x00]);
        check_varlong(-1, &[0x01]);
        check_varlong(1, &[0x02]);
        check_varlong(i64::from(i32::MIN), &[0xff, 0xff, 0xff, 0xff, 0x0f]);
        check_varlong(
            i64::MAX,
            &[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
        );
        check_varlong(
            i64::MIN,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
        );
    }

    fn check_rejected_varint(buf: &[u8], reason: &str) {
        let mut position = 0;
        assert_eq!(read_varint(buf, &mut position), Err(reason), "{buf:02x?}");
        assert_eq!(position, 0, "position must not move on error");
    }

    fn check_rejected_varlong(buf: &[u8], reason: &str) {
        let mut position = 0;
        assert_eq!(read_varlong(buf, &mut position), Err(reason), "{buf:02x?}");
        assert_eq!(position, 0, "position must not move on error");
    }

    #[test]
    fn malformed_varints_are_rejected() {
        check_rejected_varint(&[], "varint truncated");
        check_rejected_varint(&[0x80], "varint truncated");
        check_rejected_varint(&[0xff, 0xff, 0xff, 0xff], "varint truncated");
        check_rejected_varint(&[0xff, 0xff, 0xff, 0xff, 0x80, 0x00], "varint too long");
        check_rejected_varint(&[0xff, 0xff, 0xff, 0xff, 0x1f], "varint overflows its type");
        check_rejected_varlong(&[], "varint truncated");
        check_rejected_varlong(&[0xff; 9], "varint truncated");
        check_rejected_varlong(&[0xff; 11], "varint too long");
        let mut overflow = [0xff; 10];
        overflow[9] = 0x02;
        check_rejected_varlong(&overflow, "varint overflows its type");
    }

    #[test]
    fn every_proper_prefix_is_truncated() {
        for value in [i32::MIN, -65, 64, 1 << 20, i32::MAX] {
            let mut buf = Vec::new();
            put_varint(&mut buf, value);
            for len in 0..buf.len() {
                check_rejected_varint(&buf[..len], "varint truncated");
            }
        }
        for value in [i64::MIN, -(1 << 40), 1 << 50, i64::MAX] {
            let mut buf = Vec::new();
            put_varlong(&mut buf, value);
            for len in 0..buf.len() {
                check_rejected_varlong(&buf[..len], "varint truncated");
            }
        }
    }

    #[test]
    fn non_minimal_encodings_are_accepted_like_kafka() {
        let mut position = 0;
        assert_eq!(read_varint(&[0x82, 0x80, 0x00], &mut position), Ok(1));
        assert_eq!(position, 3);
    }

    #[test]
    fn reading_starts_at_position() {
        let buf = [0xaa, 0xac, 0x02, 0x03];
        let mut position = 1;
        assert_eq!(read_varint(&buf, &mut position), Ok(150));
        assert_eq!(position, 3);
        assert_eq!(read_varint(&buf, &mut position), Ok(-2));
        assert_eq!(position, 4);
        assert_eq!(read_varint(&buf, &mut position), Err("varint truncated"));
    }

    proptest! {
        #[test]
        fn varint_round_trip(value: i32, prefix in 0usize..3) {
            let mut buf = vec![0u8; prefix];
            put_varint(&mut buf, value);
            prop_assert_eq!(buf.len() - prefix, varint_size(value));
            let mut position = prefix;
            prop_assert_eq!(read_varint(&buf, &mut position), Ok(value));
            prop_assert_eq!(position, buf.len());
        }

        #[test]
        fn varlong_round_trip(value: i64) {
            let mut buf = Vec::new();
            put_varlong(&mut buf, value);
            prop_assert_eq!(buf.len(), varlong_size(value));
            let mut position = 0;
            prop_assert_eq!(read_varlong(&buf, &mut position), Ok(value));
            prop_assert_eq!(position, buf.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..12)) {
            let mut position = 0;
            if read_varint(&buf, &mut position).is_ok() {
                prop_assert!(position <= VARINT_BYTES_MAX);
            }
            let mut position = 0;
            if read_varlong(&buf, &mut position).is_ok() {
                prop_assert!(position <= VARLONG_BYTES_MAX);
            }
        }
    }
}
