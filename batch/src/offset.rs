//! The `Offset` newtype: a record's logical number within a partition.
//!
//! An offset is never a byte location; those are called positions. The wire format stores offsets
//! as signed `i64` (`base_offset`) plus `i32` deltas, so conversions to and from the wire happen
//! where a batch is parsed or written, not here. Plain data, thread-safe.

use std::fmt;

/// A record's logical number within a partition, assigned densely from `log_start_offset` on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset(
    /// The offset itself; the first record ever written to a partition has offset 0.
    pub u64,
);

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::Offset;

    #[test]
    fn display_and_order() {
        assert_eq!(Offset(42).to_string(), "42");
        assert_eq!(format!("{:>5}", Offset(7)), "    7");
        assert!(Offset(1) < Offset(2));
        assert_eq!(Offset::default(), Offset(0));
    }
}
