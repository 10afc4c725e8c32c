//! The process's limits: open files (one socket each) for thousands of meters in one process.

use anyhow::{Result, bail};

/// Raises the soft limit of open files to the hard limit; returns (soft, hard) afterwards, or
/// `None` if the limits cannot be read.
pub(crate) fn raise_nofile() -> Option<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some((hard, hard));
    }
    Some((soft, hard))
}

/// Raises the limit as far as allowed, then checks that `connections` sockets (plus slack for
/// files, the database and the runtime) fit under it; the error says how to raise it.
pub(crate) fn check_nofile(nofile: Option<(u64, u64)>, connections: usize) -> Result<()> {
    let need = connections as u64 + 256;
    if let Some((soft, hard)) = nofile
        && soft < need
    {
        bail!(
            "{connections} connections need about {need} open files per process, but the limit is \
             {soft} (hard limit {hard}); raise it (e.g. `ulimit -Hn {need}` as root, or \
             LimitNOFILE= in a systemd unit) or use fewer meters"
        );
    }
    Ok(())
}
