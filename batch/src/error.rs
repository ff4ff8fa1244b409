//! `BatchError`: everything that can be wrong with a record batch that came from outside.
//!
//! All variants describe bad input (a produce request, a file on disk, a fetch response): callers
//! answer with the error and keep serving. Bugs in the caller (e.g. finishing an empty
//! `BatchBuilder`) panic instead and never show up here.

/// Why a record batch was rejected.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The buffer ends before the batch header or before the end of the batch.
    #[error("record batch truncated: needed {needed} bytes, {available} available")]
    Truncated {
        /// Bytes the batch needs: its full size when `batch_length` could be read, else the
        /// minimum that had to be there.
        needed: usize,
        /// Bytes that were actually in the buffer.
        available: usize,
    },

    /// `batch_length` is too small to hold the fixed v2 header (it is below 49).
    #[error("record batch length {batch_length} is below the minimum of 49 bytes")]
    BatchLengthInvalid {
        /// The `batch_length` field as read.
        batch_length: i32,
    },

    /// The batch is not a v2 batch (magic 2).
    #[error("record batch magic {magic} is not supported: only v2 batches (magic 2) are accepted, upgrade the producer")]
    WrongMagic {
        /// The magic byte as read.
        magic: i8,
    },

    /// The CRC-32C stored in the header does not match the batch's bytes: they were corrupted.
    #[error("record batch crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch {
        /// The `crc` field as read.
        stored: u32,
        /// The CRC-32C of the bytes after the `crc` field.
        computed: u32,
    },

    /// The batch holds no records, or its offsets are not dense (`last_offset_delta` is not
    /// `record_count - 1`).
    #[error("record batch has record count {record_count} and last offset delta {last_offset_delta}: a batch needs at least one record and dense offsets")]
    RecordCountMismatch {
        /// The `record_count` field as read.
        record_count: i32,
        /// The `last_offset_delta` field as read.
        last_offset_delta: i32,
    },

    /// The compression codec is unknown (5..=7), or known but its records cannot be decoded here.
    #[error("compression codec {codec} is not supported: produce uncompressed batches")]
    UnsupportedCompression {
        /// The codec bits (0..=2) of the batch attributes.
        codec: u8,
    },

    /// A record inside an otherwise well-formed batch cannot be decoded.
    #[error("record {index} of the batch is malformed: {reason}")]
    RecordMalformed {
        /// 0-based index of the record within its batch.
        index: usize,
        /// What was wrong with it.
        reason: &'static str,
    },

    /// A batch or request exceeds a configured size limit.
    #[error(
        "{size} bytes exceed the limit of {max} bytes: send smaller batches or raise the limit"
    )]
    TooLarge {
        /// The size that was offered.
        size: usize,
        /// The configured limit.
        max: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::BatchError;

    #[test]
    fn messages_are_lowercase_without_trailing_punctuation() {
        let errors = [
            BatchError::Truncated {
                needed: 61,
                available: 3,
            },
            BatchError::BatchLengthInvalid { batch_length: 0 },
            BatchError::WrongMagic { magic: 1 },
            BatchError::CrcMismatch {
                stored: 1,
                computed: 2,
            },
            BatchError::RecordCountMismatch {
                record_count: 0,
                last_offset_delta: 0,
            },
            BatchError::UnsupportedCompression { codec: 7 },
            BatchError::RecordMalformed {
                index: 3,
                reason: "key length beyond the record",
            },
            BatchError::TooLarge { size: 2, max: 1 },
        ];
        for error in errors {
            let message = error.to_string();
            let first = message.chars().next().expect("message is not empty");
            assert!(!first.is_uppercase(), "{message}");
            assert!(!message.ends_with('.'), "{message}");
        }
        assert_eq!(
            BatchError::CrcMismatch {
                stored: 0xdead_beef,
                computed: 1
            }
            .to_string(),
            "record batch crc mismatch: stored 0xdeadbeef, computed 0x00000001"
        );
    }
}
