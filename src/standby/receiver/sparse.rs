//! Writing a temp that keeps its holes: aligned blocks of zeros, in the data or in a hole
//! of the delta's base, are skipped (left as holes) rather than written, so a sparse file
//! stays sparse on the standby.

use crate::model::delta::ReadAt;
use std::fs::File;
use std::io::{self, BufWriter, Write};

/// Where a sparse temp is being written: the block being filled (blocks are aligned), and
/// the zeros not written yet (a hole to leave).
#[derive(Default)]
pub(super) struct Holes {
    skip: u64,
    block: Vec<u8>,
}

/// Blocks of zeros this large, aligned, become holes in a sparse file.
const HOLE_BLOCK: usize = 4096;

impl Holes {
    /// Leaves the zeros skipped so far as a hole, before data is written after them.
    fn leave(&mut self, w: &mut BufWriter<File>) -> io::Result<()> {
        if self.skip > 0 {
            io::Seek::seek(w, io::SeekFrom::Current(self.skip as i64))?;
            self.skip = 0;
        }
        Ok(())
    }

    /// One whole block, or the last part of the file: a hole if it is all zeros.
    fn put(&mut self, w: &mut BufWriter<File>, block: &[u8]) -> io::Result<()> {
        if block.iter().all(|&b| b == 0) {
            self.skip += block.len() as u64;
            Ok(())
        } else {
            self.leave(w)?;
            w.write_all(block)
        }
    }

    /// Writes `buf`, leaving its aligned blocks of zeros as holes.
    pub(super) fn write(&mut self, w: &mut BufWriter<File>, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            if self.block.is_empty() && buf.len() >= HOLE_BLOCK {
                let (piece, rest) = buf.split_at(HOLE_BLOCK);
                self.put(w, piece)?;
                buf = rest;
                continue;
            }
            let take = (HOLE_BLOCK - self.block.len()).min(buf.len());
            self.block.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            if self.block.len() == HOLE_BLOCK {
                let block = std::mem::take(&mut self.block);
                self.put(w, &block)?;
                self.block = block;
                self.block.clear();
            }
        }
        Ok(())
    }

    /// `n` zeros (a hole of the base): whole blocks of them are skipped, not written.
    fn zeros(&mut self, w: &mut BufWriter<File>, mut n: u64) -> io::Result<()> {
        const Z: [u8; HOLE_BLOCK] = [0; HOLE_BLOCK];
        if !self.block.is_empty() {
            let take = ((HOLE_BLOCK - self.block.len()) as u64).min(n);
            self.write(w, &Z[..take as usize])?;
            n -= take;
        }
        let whole = n - n % HOLE_BLOCK as u64;
        self.skip += whole;
        self.write(w, &Z[..(n - whole) as usize])
    }

    /// The end of the file: the last part of a block is written, unless it is zeros.
    pub(super) fn finish(&mut self, w: &mut BufWriter<File>) -> io::Result<()> {
        let block = std::mem::take(&mut self.block);
        self.put(w, &block)
    }

    /// Copies `len` bytes of `base` at `offset`: its holes stay holes, its data is read.
    pub(super) fn copy(
        &mut self,
        w: &mut BufWriter<File>,
        base: &File,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let end = offset + len;
        let mut off = offset;
        let mut buf = Vec::new();
        while off < end {
            let data = crate::tree::sparse::next_data(base, off)?
                .unwrap_or(end)
                .min(end);
            if data > off {
                self.zeros(w, data - off)?;
                off = data;
                continue;
            }
            let stop = crate::tree::sparse::next_hole(base, off, end)?.clamp(off + 1, end);
            buf.resize(((stop - off) as usize).min(1 << 20), 0);
            ReadAt::read_exact_at(base, &mut buf, off)?;
            self.write(w, &buf)?;
            off += buf.len() as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_temp_leaves_aligned_zeros_and_base_holes_as_holes() {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| crate::tree::sparse::testing::rw(dir.path(), name);
        // A base: data in its first block, a hole of 1 MiB, data again.
        let base = open("base");
        std::os::unix::fs::FileExt::write_all_at(&base, &[5; 4096], 0).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&base, &[6; 4096], (1 << 20) + 4096).unwrap();
        let mut w = BufWriter::new(open("out"));
        let mut h = Holes::default();
        let mut want = Vec::new();
        // Data and zeros in small pieces that straddle block boundaries.
        for piece in [
            &[1u8; 100][..],
            &[0; 3996],
            &[0; 4096 * 3],
            &[2; 10],
            &[0; 8182],
        ] {
            h.write(&mut w, piece).unwrap();
            want.extend_from_slice(piece);
        }
        h.zeros(&mut w, 10_000).unwrap();
        want.resize(want.len() + 10_000, 0);
        h.copy(&mut w, &base, 0, (1 << 20) + 8192).unwrap();
        want.extend_from_slice(&[5; 4096]);
        want.resize(want.len() + (1 << 20), 0);
        want.extend_from_slice(&[6; 4096]);
        h.write(&mut w, &[0; 300]).unwrap();
        want.resize(want.len() + 300, 0);
        h.finish(&mut w).unwrap();
        w.flush().unwrap();
        let f = w.into_inner().unwrap();
        f.set_len(want.len() as u64).unwrap();
        assert_eq!(std::fs::read(dir.path().join("out")).unwrap(), want);
        let st = rustix::fs::fstat(&f).unwrap();
        if crate::tree::sparse::has_holes(&rustix::fs::fstat(&base).unwrap()) {
            // Blocks with data: the one of 1s, the one of 2s, and two each for the copied
            // 5s and 6s (they straddle blocks of the output). Of 1 MiB + 45 KiB.
            assert!(
                st.st_blocks as u64 * 512 <= 6 * 4096,
                "{} bytes of blocks for 6 of data",
                st.st_blocks * 512
            );
        }
    }
}
