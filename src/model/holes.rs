//! When a file counts as sparse, and when a copy of it counts as dense: pure judgements on
//! sizes and block counts, shared by the scan, the plan and verify.

/// Whether a file of `size` bytes using `blocks` 512-byte blocks has holes worth keeping:
/// fewer blocks than its size needs, and larger than a small file (which goes whole).
pub fn sparse(size: u64, blocks: u64) -> bool {
    size > crate::model::manifest::SMALL_FILE && blocks.saturating_mul(512) < size
}

/// What two filesystems may allocate differently for the same data, `allocated` bytes of
/// it: block sizes, extent alignment and preallocation differ by a few blocks per extent.
/// The larger of 64 KiB and 1% of the allocation.
pub fn slack(allocated: u64) -> u64 {
    (allocated / 100).max(64 << 10)
}

/// Whether a standby copy using `standby_blocks` (512-byte blocks; 0 when the standby did
/// not say) is a dense copy of a sparse primary file of `size` bytes using `primary_blocks`:
/// it takes more than the primary's beyond the [`slack`] filesystems differ by.
pub fn denser(size: u64, primary_blocks: u64, standby_blocks: u64) -> bool {
    let ours = primary_blocks.saturating_mul(512);
    let theirs = standby_blocks.saturating_mul(512);
    sparse(size, primary_blocks) && theirs > ours.saturating_add(slack(ours))
}
