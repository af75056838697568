//! Sparse files: where a file's data is, found with `SEEK_DATA`/`SEEK_HOLE`, so holes are
//! neither read, hashed nor sent, and are made again on the standby.
//!
//! A hole reads as zeros, so content digests do not change: a chunk that lies in a hole
//! has the digest of a chunk of zeros, which is computed once, not read.

use crate::model::holes::sparse;
use rustix::fs::SeekFrom;
use rustix::io::Errno;
use std::io;
use std::os::fd::AsFd;

/// Whether a file has holes worth keeping: fewer blocks than its size needs, and larger
/// than a small file (which goes whole, inline).
pub(crate) fn has_holes(st: &rustix::fs::Stat) -> bool {
    sparse(st.st_size as u64, st.st_blocks as u64)
}

/// A file read with its holes known: hashing skips them.
pub(crate) struct Holey<'a>(pub &'a std::fs::File);

impl crate::model::delta::ReadAt for Holey<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn data_from(&self, offset: u64) -> io::Result<Option<u64>> {
        next_data(self.0, offset)
    }
    fn knows_holes(&self) -> bool {
        true
    }
}

/// The first byte of data at or after `offset`, `None` when only a hole follows.
pub(crate) fn next_data(fd: impl AsFd, offset: u64) -> io::Result<Option<u64>> {
    match rustix::fs::seek(fd, SeekFrom::Data(offset)) {
        Ok(at) => Ok(Some(at)),
        Err(Errno::NXIO) => Ok(None),
        // A filesystem that does not say: all of it is data.
        Err(Errno::INVAL | Errno::OPNOTSUPP) => Ok(Some(offset)),
        Err(e) => Err(e.into()),
    }
}

/// The end of the data that starts at `offset` (the next hole, or the end of the file).
pub(crate) fn next_hole(fd: impl AsFd, offset: u64, size: u64) -> io::Result<u64> {
    match rustix::fs::seek(fd, SeekFrom::Hole(offset)) {
        Ok(at) => Ok(at.min(size)),
        Err(Errno::NXIO | Errno::INVAL | Errno::OPNOTSUPP) => Ok(size),
        Err(e) => Err(e.into()),
    }
}

/// The data extents of the first `size` bytes of `fd`, in order: `(start, end)`.
pub(crate) struct Extents<F: AsFd> {
    fd: F,
    at: u64,
    size: u64,
}

impl<F: AsFd> Extents<F> {
    pub(crate) fn new(fd: F, size: u64) -> Self {
        Extents { fd, at: 0, size }
    }
}

impl<F: AsFd> Iterator for Extents<F> {
    type Item = io::Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.size {
            return None;
        }
        let start = match next_data(&self.fd, self.at) {
            Ok(Some(s)) if s < self.size => s,
            Ok(_) => {
                self.at = self.size;
                return None;
            }
            Err(e) => return Some(Err(e)),
        };
        let end = match next_hole(&self.fd, start, self.size) {
            Ok(e) => e,
            Err(e) => return Some(Err(e)),
        };
        // Never stand still, whatever the filesystem answers.
        let end = end.max(start + 1).min(self.size);
        self.at = end;
        Some(Ok((start, end)))
    }
}

/// Files for unit tests.
#[cfg(test)]
pub(crate) mod testing {
    /// `name` in `dir`, made empty, open to read and write.
    pub fn rw(dir: &std::path::Path, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(name))
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn extents_are_the_data_and_holes_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let f = std::fs::File::create(&path).unwrap();
        let mib = 1u64 << 20;
        f.write_all_at(&[1; 4096], 3 * mib).unwrap();
        f.write_all_at(&[2; 4096], 9 * mib).unwrap();
        f.set_len(16 * mib).unwrap();
        let st = rustix::fs::fstat(&f).unwrap();
        if !has_holes(&st) {
            eprintln!("this filesystem keeps no holes; skipped");
            return;
        }
        let got: Vec<(u64, u64)> = Extents::new(&f, 16 * mib).map(Result::unwrap).collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].0 <= 3 * mib && got[0].1 >= 3 * mib + 4096 && got[0].1 < 9 * mib);
        assert!(got[1].0 <= 9 * mib && got[1].1 >= 9 * mib + 4096);
        assert_eq!(next_data(&f, 10 * mib).unwrap(), None);
        // A dense file is one extent.
        let dense = std::fs::File::create(dir.path().join("dense")).unwrap();
        dense.write_all_at(&vec![0; 200_000], 0).unwrap();
        assert!(!has_holes(&rustix::fs::fstat(&dense).unwrap()));
        let got: Vec<_> = Extents::new(&dense, 200_000).map(Result::unwrap).collect();
        assert_eq!(got, [(0, 200_000)]);
    }

    #[test]
    fn a_hole_hashes_as_the_zeros_it_reads_as_without_being_read() {
        use super::Holey;
        use crate::model::delta::{chunk_size, hash_chunks};
        let dir = tempfile::tempdir().unwrap();
        let rw = |name: &str| testing::rw(dir.path(), name);
        let f = rw("sparse");
        let size = 40u64 << 20;
        f.write_all_at(&[7; 10_000], (5 << 20) + 123).unwrap();
        f.write_all_at(&[9; 3], size - 3).unwrap();
        f.set_len(size).unwrap();
        let mut dense = vec![0u8; size as usize];
        dense[(5 << 20) + 123..(5 << 20) + 10_123].fill(7);
        dense[size as usize - 3..].fill(9);
        let chunk = chunk_size(size);
        let plain = hash_chunks(&dense[..], size, chunk).unwrap();
        assert_eq!(hash_chunks(&Holey(&f), size, chunk).unwrap(), plain);
        assert_eq!(hash_chunks(&f, size, chunk).unwrap(), plain);
        // Ending in a hole, and all hole.
        f.set_len(size + 1_000_000).unwrap();
        dense.resize(size as usize + 1_000_000, 0);
        let n = dense.len() as u64;
        let plain = hash_chunks(&dense[..], n, chunk_size(n)).unwrap();
        assert_eq!(hash_chunks(&Holey(&f), n, chunk_size(n)).unwrap(), plain);
        let empty = rw("hole");
        empty.set_len(size).unwrap();
        let zeros = vec![0u8; size as usize];
        assert_eq!(
            hash_chunks(&Holey(&empty), size, chunk).unwrap(),
            hash_chunks(&zeros[..], size, chunk).unwrap()
        );
    }
}
