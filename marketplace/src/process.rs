//! Settings for the whole server process, made before it serves.

/// Turns transparent huge pages off for this process (a no-op off Linux).
///
/// mimalloc, the binaries' allocator, asks the kernel for huge pages for its
/// arenas. A query's host side allocates and frees blocks of a few MiB (the
/// sandbox's instance context, batches), so the kernel kept zeroing whole
/// 2 MiB pages on fresh faults, and with the usual `defrag = madvise`
/// setting compacted memory to find them, inside the fault, in whichever
/// request touched the page. In `--bench queries` (32 closed-loop clients
/// on 2 cores) p99 was 175–396 ms in eight runs with them and 88–119 ms in
/// four without (2026-12-04). This is what `MIMALLOC_ALLOW_THP=0` does,
/// without relying on the environment; the kernel checks the flag on every
/// fault, so pages the allocator already advised get no more huge pages
/// either.
///
/// # Errors
/// When the kernel refuses the request (older than 3.15).
pub fn disable_transparent_huge_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::thread::disable_transparent_huge_pages(true)?;
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_reports_huge_pages_off_for_the_process() {
        disable_transparent_huge_pages().unwrap();
        // The kernel's own view, from another thread than the one that
        // asked: the flag belongs to the process, not the thread.
        let status = std::thread::spawn(|| std::fs::read_to_string("/proc/self/status"))
            .join()
            .unwrap()
            .unwrap();
        let line = status
            .lines()
            .find(|line| line.starts_with("THP_enabled:"))
            .unwrap_or_else(|| panic!("no THP_enabled line in {status}"));
        assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
    }
}
