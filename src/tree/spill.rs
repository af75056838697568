//! A list that moves to an unnamed temporary file once it grows past a bound, so work
//! kept for the end of a reconcile (deletions, directory attributes) costs memory only up
//! to that bound, however large the tree.

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::marker::PhantomData;

/// Items held in memory before the rest go to disk.
pub(crate) const IN_MEMORY: usize = 16 * 1024;

/// An append-only list of `T`, read back once, in order.
pub(crate) struct Spill<T> {
    mem: Vec<T>,
    file: Option<BufWriter<File>>,
    on_disk: u64,
    limit: usize,
}

impl<T: Serialize + DeserializeOwned> Spill<T> {
    pub(crate) fn new() -> Self {
        Spill::with_limit(IN_MEMORY)
    }

    /// A list keeping at most `limit` items in memory.
    pub(crate) fn with_limit(limit: usize) -> Self {
        Spill {
            mem: Vec::new(),
            file: None,
            on_disk: 0,
            limit,
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> u64 {
        self.mem.len() as u64 + self.on_disk
    }

    /// Appends `item`.
    ///
    /// # Errors
    /// The temporary file cannot be made or written (a full disk).
    pub(crate) fn push(&mut self, item: T) -> io::Result<()> {
        if self.file.is_none() && self.mem.len() < self.limit {
            self.mem.push(item);
            return Ok(());
        }
        let f = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(BufWriter::new(temp_file()?)),
        };
        let bytes = postcard::to_stdvec(&item).map_err(io::Error::other)?;
        f.write_all(&(bytes.len() as u32).to_le_bytes())?;
        f.write_all(&bytes)?;
        self.on_disk += 1;
        Ok(())
    }

    /// Everything pushed, in order: the items in memory, then those on disk.
    ///
    /// # Errors
    /// Reading the temporary file back failed.
    pub(crate) fn drain(self) -> io::Result<Drain<T>> {
        let file = match self.file {
            Some(f) => {
                let mut f = f.into_inner().map_err(|e| e.into_error())?;
                f.rewind()?;
                Some(BufReader::new(f))
            }
            None => None,
        };
        Ok(Drain {
            mem: self.mem.into_iter(),
            file,
            left: self.on_disk,
            _t: PhantomData,
        })
    }
}

impl<T: Serialize + DeserializeOwned> Default for Spill<T> {
    fn default() -> Self {
        Spill::new()
    }
}

/// The items of a [`Spill`], in order.
pub(crate) struct Drain<T> {
    mem: std::vec::IntoIter<T>,
    file: Option<BufReader<File>>,
    left: u64,
    _t: PhantomData<T>,
}

impl<T: DeserializeOwned> Iterator for Drain<T> {
    type Item = io::Result<T>;

    fn next(&mut self) -> Option<io::Result<T>> {
        if let Some(item) = self.mem.next() {
            return Some(Ok(item));
        }
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let f = self.file.as_mut()?;
        let mut read = || -> io::Result<T> {
            let mut len = [0u8; 4];
            f.read_exact(&mut len)?;
            let mut buf = vec![0; u32::from_le_bytes(len) as usize];
            f.read_exact(&mut buf)?;
            postcard::from_bytes(&buf).map_err(io::Error::other)
        };
        Some(read())
    }
}

/// An unnamed file in the temporary directory, gone when closed.
fn temp_file() -> io::Result<File> {
    use rustix::fs::{Mode, OFlags};
    let dir = std::env::temp_dir();
    let flags = OFlags::RDWR | OFlags::CLOEXEC;
    match rustix::fs::open(&dir, flags | OFlags::TMPFILE, Mode::from_raw_mode(0o600)) {
        Ok(fd) => Ok(File::from(fd)),
        // A filesystem without O_TMPFILE: a private name, unlinked at once.
        Err(_) => {
            let name = dir.join(format!(
                ".hotsync-spill-{}-{}",
                std::process::id(),
                String::from_utf8_lossy(&crate::tree::fsroot::temp_name())
            ));
            let fd = rustix::fs::open(
                &name,
                flags | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW,
                Mode::from_raw_mode(0o600),
            )?;
            let _ = std::fs::remove_file(&name);
            Ok(File::from(fd))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_come_back_in_order_from_memory_and_disk() {
        let mut s: Spill<(String, u64)> = Spill::with_limit(3);
        for i in 0..10u64 {
            s.push((format!("p{i}"), i)).unwrap();
        }
        assert_eq!(s.len(), 10);
        assert!(s.file.is_some());
        let back: Vec<(String, u64)> = s.drain().unwrap().map(Result::unwrap).collect();
        assert_eq!(
            back,
            (0..10).map(|i| (format!("p{i}"), i)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_small_list_stays_in_memory() {
        let mut s: Spill<u8> = Spill::new();
        s.push(1).unwrap();
        assert!(s.file.is_none());
        assert_eq!(
            s.drain().unwrap().map(Result::unwrap).collect::<Vec<_>>(),
            [1]
        );
    }
}
