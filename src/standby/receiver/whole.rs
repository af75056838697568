//! Receiving a whole file on a stream of its own: `BigFile` (its bytes follow, then
//! `FileEnd`) or `SparseFile` (its data extents follow, each where it belongs; what none
//! covers stays a hole). Whole files carry no digest: QUIC's AEAD already proves the bytes
//! on the wire, and `verify` proves the copies.

use super::ops::{Ops, Then, check_writable};
use super::session::Dirs;
use super::stage::{EntryResult, Incoming, TempSink};
use crate::error::ProtocolError;
use crate::model::manifest::{Hash, Meta};
use crate::model::path::RelPath;
use crate::transport::SendHalf;
use crate::wire::protocol::{FrameReader, Message};
use std::io::Read;

impl<R: Read, W: SendHalf> Ops<'_, R, W> {
    /// `BigFile`: `size` bytes follow; the file is staged when the primary completed it.
    pub(super) fn big_file(
        &mut self,
        id: u64,
        path: RelPath,
        meta: Meta,
        size: u64,
    ) -> Result<Then, ProtocolError> {
        let file = self.incoming(id, path, meta, size);
        self.whole(file, receive_big)
    }

    /// `SparseFile`: its extents follow; the file is staged with its holes.
    pub(super) fn sparse_file(
        &mut self,
        id: u64,
        path: RelPath,
        meta: Meta,
        size: u64,
    ) -> Result<Then, ProtocolError> {
        let file = self.incoming(id, path, meta, size);
        self.whole(file, receive_sparse)
    }

    /// A file sent whole, its bytes read by `receive`, then staged.
    fn whole(
        &mut self,
        file: Incoming,
        receive: impl FnOnce(
            &mut Dirs,
            &mut FrameReader<R>,
            &Incoming,
        ) -> Result<EntryResult, ProtocolError>,
    ) -> Result<Then, ProtocolError> {
        check_writable(&file.path)?;
        let res = receive(&mut self.dirs, self.r, &file)?;
        self.stage(file.id, res);
        Ok(Then::Commit)
    }
}

/// Reads the `FileEnd` that closes a file's bytes: whether the primary completed the file,
/// and its digest.
pub(super) fn file_end<R: Read>(
    r: &mut FrameReader<R>,
) -> Result<(bool, Option<Hash>), ProtocolError> {
    match r.recv()? {
        Message::FileEnd { complete, digest } => Ok((complete, digest)),
        other => Err(ProtocolError::unexpected(&other, "FileEnd")),
    }
}

/// Receives a whole file into a temp. The outer error is fatal (the stream is unusable);
/// the inner one concerns this file only.
fn receive_big<R: Read>(
    dirs: &mut Dirs,
    r: &mut FrameReader<R>,
    file: &Incoming,
) -> Result<EntryResult, ProtocolError> {
    let mut sink = TempSink::create(dirs, &file.path);
    sink.take_raw(r, file.size, &mut Vec::new())?;
    let (complete, digest) = file_end(r)?;
    if digest.is_some() {
        return Err(ProtocolError::Invalid(
            "a whole file carries no digest".into(),
        ));
    }
    Ok(sink.finish(dirs.session(), file, complete, None))
}

/// Receives a file with holes: its data extents, in order, written where they belong;
/// what none covers stays a hole in the temp, whose size is then set.
fn receive_sparse<R: Read>(
    dirs: &mut Dirs,
    r: &mut FrameReader<R>,
    file: &Incoming,
) -> Result<EntryResult, ProtocolError> {
    let size = file.size;
    let mut sink = TempSink::create(dirs, &file.path);
    let mut buf = Vec::new();
    let mut at = 0u64;
    loop {
        match r.recv()? {
            Message::Extent { offset, len } => {
                if offset < at || offset.checked_add(len).is_none_or(|end| end > size) {
                    return Err(ProtocolError::Invalid(format!(
                        "an extent of {len} bytes at {offset} in a sparse file of {size} \
                         bytes, after {at}"
                    )));
                }
                sink.seek_to(offset);
                sink.take_raw(r, len, &mut buf)?;
                at = offset + len;
            }
            Message::FileEnd { complete, digest } => {
                if digest.is_some() {
                    return Err(ProtocolError::Invalid(
                        "a sparse file carries no digest".into(),
                    ));
                }
                sink.set_len(size);
                return Ok(sink.finish(dirs.session(), file, complete, None));
            }
            other => return Err(ProtocolError::unexpected(&other, "Extent")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{Primary, end_stream, keeps_holes, meta, path};
    use crate::wire::protocol::{Message, SessionMode};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_big_file_is_received_on_its_own_stream() {
        let p = Primary::start(SessionMode::Write);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut s = p.stream();
        s.send(&Message::BigFile {
            id: 3,
            path: path("big"),
            meta: meta(0o600, 1_500_000_000),
            size: data.len() as u64,
        })
        .unwrap();
        s.w.write_raw(&data).unwrap();
        s.send(&Message::FileEnd {
            complete: true,
            digest: None,
        })
        .unwrap();
        assert_eq!(end_stream(s), (3, None));
        assert_eq!(std::fs::read(p.tree().join("big")).unwrap(), data);
        p.close().unwrap();
    }

    #[test]
    fn a_sparse_file_keeps_its_holes() {
        const MIB: u64 = 1 << 20;
        let p = Primary::start(SessionMode::Write);
        let mut s = p.stream();
        s.send(&Message::SparseFile {
            id: 4,
            path: path("sparse"),
            meta: meta(0o644, 1_500_000_000),
            size: 8 * MIB,
        })
        .unwrap();
        // Data at the start and in the middle; a hole between and to the end.
        for (offset, byte) in [(0, 1u8), (4 * MIB, 2)] {
            s.send(&Message::Extent { offset, len: 4096 }).unwrap();
            s.w.write_raw(&[byte; 4096]).unwrap();
        }
        s.send(&Message::FileEnd {
            complete: true,
            digest: None,
        })
        .unwrap();
        assert_eq!(end_stream(s), (4, None));
        let file = p.tree().join("sparse");
        let got = std::fs::read(&file).unwrap();
        let mut want = vec![0u8; 8 * MIB as usize];
        want[..4096].fill(1);
        want[4 * MIB as usize..4 * MIB as usize + 4096].fill(2);
        assert!(got == want, "the content differs");
        if keeps_holes(p.tree()) {
            let blocks = std::fs::metadata(&file).unwrap().blocks() * 512;
            assert!(
                blocks <= 64 * 1024,
                "{blocks} bytes of blocks for 8 KiB of data"
            );
        }
        p.close().unwrap();
    }

    #[test]
    fn an_extent_out_of_order_ends_the_session() {
        let mut p = Primary::start(SessionMode::Write);
        let mut s = p.stream();
        s.send(&Message::SparseFile {
            id: 5,
            path: path("sparse"),
            meta: meta(0o644, 1_500_000_000),
            size: 1 << 20,
        })
        .unwrap();
        s.send(&Message::Extent {
            offset: 8192,
            len: 10,
        })
        .unwrap();
        s.w.write_raw(&[1; 10]).unwrap();
        s.send(&Message::Extent { offset: 0, len: 10 }).unwrap();
        s.w.write_raw(&[1; 10]).unwrap();
        s.flush().unwrap();
        let e = p.ended().unwrap_err();
        assert!(
            matches!(
                e,
                crate::error::Error::Protocol(crate::error::ProtocolError::Invalid(_))
            ),
            "{e}"
        );
    }
}
