//! Which records of a run have arrived, by partition and offset, so that a record handed to the
//! consumers twice (a consumer group redelivering after a lost session, or a bug) is counted
//! once as received and once as a duplicate, and a missing one is noticed at the end.
//!
//! One bit per offset, per partition, grown as offsets arrive. The bench topic is fresh, so its
//! offsets start at 0, and no partition can hold more records than the run sent: an offset at or
//! past that count is refused, which also bounds the memory to `records` bits per partition
//! (in practice about `records` bits in all, as the records are spread over the partitions).
//!
//! Not thread-safe by itself: the consumers share it behind a mutex.

/// The offsets received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Per partition, bit `offset % 64` of word `offset / 64` is set once that record arrived.
    partitions: Vec<Vec<u64>>,
    /// Records the run sent: every offset is below it.
    records: u64,
    /// Records that arrived at least once.
    unique_count: u64,
    /// Arrivals of a record that had arrived before.
    duplicate_count: u64,
}

/// Whether a record is new to the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The record had not arrived before.
    First,
    /// The record had arrived before: a duplicate.
    Again,
}

impl Received {
    /// Nothing received yet, for a topic of `partitions` partitions holding `records` records.
    pub fn new(partitions: u32, records: u64) -> Received {
        Received {
            partitions: vec![Vec::new(); partitions as usize],
            records,
            unique_count: 0,
            duplicate_count: 0,
        }
    }

    /// Notes that the record at `offset` of `partition` arrived.
    ///
    /// # Errors
    ///
    /// A message when the partition does not exist, or the offset is at or past the number of
    /// records sent, or more distinct records arrived than were sent (the topic holds records
    /// this run did not send).
    pub fn mark(&mut self, partition: u32, offset: u64) -> Result<Arrival, String> {
        let records = self.records;
        let partition_count = self.partitions.len();
        let Some(words) = self.partitions.get_mut(partition as usize) else {
            return Err(format!(
                "partition {partition} does not exist (the topic has {partition_count})"
            ));
        };
        if offset >= records {
            return Err(format!(
                "offset {offset} is past the {records} records sent: the topic holds records this run did not send"
            ));
        }
        let word = (offset / 64) as usize;
        let bit = 1u64 << (offset % 64);
        if words.len() <= word {
            words.resize(word + 1, 0);
        }
        if words[word] & bit != 0 {
            self.duplicate_count += 1;
            return Ok(Arrival::Again);
        }
        if self.unique_count == records {
            return Err(format!(
                "more than the {records} records sent arrived: the topic holds records this run did not send"
            ));
        }
        words[word] |= bit;
        self.unique_count += 1;
        Ok(Arrival::First)
    }

    /// Records that arrived at least once.
    pub fn unique_count(&self) -> u64 {
        self.unique_count
    }

    /// Arrivals of records that had arrived before.
    pub fn duplicate_count(&self) -> u64 {
        self.duplicate_count
    }

    /// Records sent that have not arrived.
    pub fn missing_count(&self) -> u64 {
        self.records - self.unique_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_and_missing_records_are_counted() {
        let mut received = Received::new(2, 200);
        let check = |received: &mut Received, partition: u32, offset: u64, expected| {
            assert_eq!(
                received.mark(partition, offset),
                Ok(expected),
                "{partition}/{offset}"
            );
        };
        check(&mut received, 0, 0, Arrival::First);
        check(&mut received, 1, 0, Arrival::First);
        check(&mut received, 0, 0, Arrival::Again);
        check(&mut received, 0, 63, Arrival::First);
        check(&mut received, 0, 64, Arrival::First);
        check(&mut received, 1, 199, Arrival::First);
        check(&mut received, 1, 199, Arrival::Again);
        assert_eq!(received.unique_count(), 5);
        assert_eq!(received.duplicate_count(), 2);
        assert_eq!(received.missing_count(), 195);
    }

    #[test]
    fn records_the_run_did_not_send_are_refused() {
        let mut received = Received::new(2, 200);
        assert!(received.mark(2, 0).is_err());
        assert!(received.mark(0, 200).is_err());
        assert!(received.mark(0, u64::MAX).is_err());
        assert_eq!(received.unique_count(), 0);
        let mut received = Received::new(2, 2);
        assert_eq!(received.mark(0, 0), Ok(Arrival::First));
        assert_eq!(received.mark(1, 0), Ok(Arrival::First));
        assert!(received.mark(0, 1).is_err());
        assert_eq!(received.unique_count(), 2);
        assert_eq!(received.duplicate_count(), 0);
    }

    #[test]
    fn every_record_once_leaves_nothing_missing() {
        let mut received = Received::new(3, 300);
        for offset in 0..100 {
            for partition in 0..3 {
                assert_eq!(received.mark(partition, offset), Ok(Arrival::First));
            }
        }
        assert_eq!(received.missing_count(), 0);
        assert_eq!(received.duplicate_count(), 0);
    }
}
