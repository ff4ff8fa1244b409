//! The memory of this process, sampled from `/proc/self/status` (Linux): resident anonymous
//! memory (heap, buffers: what must stay flat in a long run) and resident file-backed memory
//! (mostly the in-process broker's mapped segments, which the kernel can reclaim).

/// One sample, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sample {
    /// `RssAnon`.
    pub anon_bytes: u64,
    /// `RssFile`.
    pub file_bytes: u64,
}

/// The current sample, `None` where `/proc/self/status` is absent or unreadable.
pub fn sample() -> Option<Sample> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status(&status)
}

/// The `RssAnon` and `RssFile` lines of a `/proc/PID/status` text (values in kB).
pub fn parse_status(status: &str) -> Option<Sample> {
    let field = |name: &str| {
        status.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
            Some(kb * 1024)
        })
    };
    Some(Sample {
        anon_bytes: field("RssAnon")?,
        file_bytes: field("RssFile")?,
    })
}

/// Samples taken over a run: the first, the largest of each kind, and the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub start: Sample,
    pub anon_peak_bytes: u64,
    pub file_peak_bytes: u64,
    pub end: Sample,
}

impl Summary {
    pub fn new(start: Sample) -> Summary {
        Summary {
            start,
            anon_peak_bytes: start.anon_bytes,
            file_peak_bytes: start.file_bytes,
            end: start,
        }
    }

    /// Takes `sample` as the latest.
    pub fn note(&mut self, sample: Sample) {
        self.anon_peak_bytes = self.anon_peak_bytes.max(sample.anon_bytes);
        self.file_peak_bytes = self.file_peak_bytes.max(sample.file_bytes);
        self.end = sample;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_status_fields() {
        let status = "Name:\tbench\nVmRSS:\t  5000 kB\nRssAnon:\t    1200 kB\nRssFile:\t   3000 kB\nRssShmem:\t0 kB\n";
        assert_eq!(
            parse_status(status),
            Some(Sample {
                anon_bytes: 1200 * 1024,
                file_bytes: 3000 * 1024
            })
        );
        assert_eq!(parse_status("RssAnon:\t12 kB\n"), None);
        assert_eq!(parse_status("RssAnon:\tx kB\nRssFile:\t1 kB\n"), None);
    }

    #[test]
    fn summary_keeps_start_peaks_and_end() {
        let s = |anon, file| Sample {
            anon_bytes: anon,
            file_bytes: file,
        };
        let mut summary = Summary::new(s(10, 5));
        summary.note(s(30, 2));
        summary.note(s(20, 9));
        assert_eq!(summary.start, s(10, 5));
        assert_eq!(summary.anon_peak_bytes, 30);
        assert_eq!(summary.file_peak_bytes, 9);
        assert_eq!(summary.end, s(20, 9));
    }

    #[test]
    fn this_process_has_a_sample_on_linux() {
        if cfg!(target_os = "linux") {
            let sample = sample().expect("/proc/self/status on Linux");
            assert!(sample.anon_bytes > 0);
        }
    }
}
