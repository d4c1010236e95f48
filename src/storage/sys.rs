//! System calls on files and memory: free space, space reservation, paging advice, NUMA
//! placement. Through `rustix` (and `memmap2` for `madvise`) wherever they offer the call, raw
//! `libc` only for `set_mempolicy`, which neither wraps.

use super::{TableError, io_error};
use memmap2::MmapMut;
use rustix::fs::FallocateFlags;
use rustix::io::Errno;
use std::fs::File;
use std::io;
use std::path::Path;

/// `dir`, or `.` for the empty path (the parent of a bare file name).
pub(crate) fn dir_or_cwd(dir: &Path) -> &Path {
    if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    }
}

/// Bytes available to this (unprivileged) process on the file system that holds `dir`
/// (`statvfs`: free blocks for non-root users times the fragment size).
pub fn available_space(dir: &Path) -> Result<u64, TableError> {
    let dir = dir_or_cwd(dir);
    let st = rustix::fs::statvfs(dir).map_err(|e| io_error(dir, "check free space")(e.into()))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Allocates blocks for the first `len` bytes of `file`, so writing them later through a map
/// cannot fail for lack of space (which a map reports as SIGBUS). File systems without
/// `fallocate(2)` (NFSv3, some FUSE mounts) get what glibc's `posix_fallocate` does there:
/// every block written once.
pub(crate) fn reserve(file: &File, len: u64) -> io::Result<()> {
    loop {
        match rustix::fs::fallocate(file, FallocateFlags::empty(), 0, len) {
            Ok(()) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(Errno::OPNOTSUPP) => return write_zeros(file, len),
            Err(errno) => return Err(errno.into()),
        }
    }
}

/// Writes zeros over the first `len` bytes of a fresh (empty) `file`, a megabyte at a time.
fn write_zeros(file: &File, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK as usize];
    let mut at = 0;
    while at < len {
        let n = CHUNK.min(len - at);
        file.write_all_at(&zeros[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

/// Advises the kernel that `map` is read and written at random: without this every page fault
/// reads ahead (and, in a fallocated extent, zero-fills) up to megabytes around the one page it
/// needs.
pub(crate) fn advise_random(map: &MmapMut) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    map.advise(memmap2::Advice::Random)?;
    #[cfg(not(target_os = "linux"))]
    let _ = map;
    Ok(())
}

/// Advises transparent huge pages for `len` bytes of `map` from `offset` (`MADV_HUGEPAGE`).
/// Advice only: without THP support in the kernel the map works with small pages.
pub(crate) fn advise_huge_pages(map: &MmapMut, offset: usize, len: usize) {
    #[cfg(target_os = "linux")]
    let _ = map.advise_range(memmap2::Advice::HugePage, offset, len);
    #[cfg(not(target_os = "linux"))]
    let _ = (map, offset, len);
}

/// Linux's `MPOL_INTERLEAVE` (linux/mempolicy.h): new pages go round-robin over a node set.
#[cfg(target_os = "linux")]
const MPOL_INTERLEAVE: libc::c_int = 3;

/// Interleaves every page the calling thread allocates from now on round-robin over the NUMA
/// `nodes` (`set_mempolicy(MPOL_INTERLEAVE)`, what `numactl --interleave` does); threads it
/// creates afterwards (a rayon pool built later) inherit the policy. On a multi-socket machine
/// the tables then sit evenly on all sockets whichever thread touches them first, so a scaling
/// study measures the code rather than the page placement. An empty or unknown node set is an
/// `Err` (`EINVAL`), and so is any other OS than Linux.
pub fn interleave_memory(nodes: &[usize]) -> io::Result<()> {
    if nodes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no NUMA node to interleave over",
        ));
    }
    let bits = u64::BITS as usize;
    let mut mask = vec![0u64; nodes.iter().max().expect("non-empty") / bits + 1];
    for &n in nodes {
        mask[n / bits] |= 1 << (n % bits);
    }
    set_interleave_policy(&mask)
}

#[cfg(target_os = "linux")]
fn set_interleave_policy(mask: &[u64]) -> io::Result<()> {
    // The kernel reads maxnode - 1 bits of the mask (a historical off-by-one of the ABI).
    let maxnode = (mask.len() * u64::BITS as usize + 1) as libc::c_ulong;
    // SAFETY: set_mempolicy reads `maxnode - 1` bits, i.e. exactly the `mask.len()` u64 words
    // that `mask` borrows for the duration of the call, and writes no memory of this process.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_set_mempolicy,
            MPOL_INTERLEAVE,
            mask.as_ptr(),
            maxnode,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_interleave_policy(_mask: &[u64]) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "NUMA interleaving needs Linux (set_mempolicy)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MappedMatrix;

    #[test]
    fn write_zeros_fills_the_requested_length() {
        let file = tempfile::tempfile().unwrap();
        let len = (1 << 20) * 2 + 12345;
        write_zeros(&file, len).unwrap();
        assert_eq!(file.metadata().unwrap().len(), len);
    }

    #[test]
    fn interleave_memory_accepts_only_existing_nodes() {
        // On a thread of its own: the policy is per thread and must not leak into other tests.
        std::thread::spawn(|| {
            assert!(interleave_memory(&[]).is_err());
            assert!(interleave_memory(&[4095]).is_err());
            #[cfg(target_os = "linux")]
            if Path::new("/sys/devices/system/node/node0").exists() {
                interleave_memory(&[0]).unwrap();
                // Pages allocated under the policy are usable as ever.
                let m = MappedMatrix::anon(1 << 10, 16).unwrap();
                assert!(m.as_slice().iter().all(|&v| v == 0.0));
            }
        })
        .join()
        .unwrap();
    }
}
