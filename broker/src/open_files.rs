//! The process's limit of open file descriptors (`RLIMIT_NOFILE`).
//!
//! Every partition keeps one descriptor per segment open (its `.log`; the index files are
//! mapped and keep none), so a broker with thousands of partitions needs thousands of
//! descriptors, well past the soft limit many systems start processes with (often 1,024). As Kafka's documentation advises operators, `octolog serve` raises its soft limit to
//! the hard limit when it starts; raising the hard limit is the operator's business
//! (`ulimit -Hn`, `LimitNOFILE=` in a systemd unit).
//!
//! Thread-safety: the limit is process-wide; call this once, before the broker opens files.

use std::io;

/// The soft and hard limits of open file descriptors, as `getrlimit` reports them
/// (`u64::MAX` for no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFilesLimit {
    /// The limit in force: opening a descriptor past it fails with `EMFILE`.
    pub soft: u64,
    /// The ceiling an unprivileged process may raise `soft` to.
    pub hard: u64,
}

/// The current limits.
///
/// # Errors
///
/// What `getrlimit` says (it does not fail on Linux for this resource).
pub fn open_files_limit() -> io::Result<OpenFilesLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable `rlimit` for the duration of the call, and
    // `RLIMIT_NOFILE` is a valid resource.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OpenFilesLimit {
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// Raises the soft limit of open file descriptors to the hard limit, if it is lower. Returns
/// the limits before and after.
///
/// # Errors
///
/// What `getrlimit` or `setrlimit` says; the limits are then unchanged.
pub fn raise_open_files_limit() -> io::Result<(OpenFilesLimit, OpenFilesLimit)> {
    let before = open_files_limit()?;
    if before.soft >= before.hard {
        return Ok((before, before));
    }
    let limit = libc::rlimit {
        rlim_cur: before.hard,
        rlim_max: before.hard,
    };
    // SAFETY: `limit` is a valid `rlimit` for the duration of the call; the soft limit asked
    // for equals the hard limit, which any process may set.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((before, open_files_limit()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards that a soft limit below the hard one is raised to it, and that raising again
    /// changes nothing.
    #[test]
    fn raising_reaches_the_hard_limit() {
        let start = open_files_limit().unwrap();
        assert!(start.soft <= start.hard);
        // One below the hard limit: low enough to need raising, high enough not to starve the
        // other tests of this process meanwhile.
        let lowered = libc::rlimit {
            rlim_cur: start.hard - 1,
            rlim_max: start.hard,
        };
        // SAFETY: a valid `rlimit`, lowering only the soft limit.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
        let (before, after) = raise_open_files_limit().unwrap();
        assert_eq!(before.soft, start.hard - 1);
        assert_eq!(after.hard, start.hard);
        assert_eq!(after.soft, start.hard);
        let (again, unchanged) = raise_open_files_limit().unwrap();
        assert_eq!(again, after);
        assert_eq!(unchanged, after);
    }
}
