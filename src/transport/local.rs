//! The in-process transport of a local DEST: streams are bounded in-memory pipes, so the
//! receiver runs on its own threads behind exactly the protocol QUIC carries.

use super::{Connection, Counted, SendHalf, Stream};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};

/// Bytes a pipe holds before its writer waits.
const PIPE_CAPACITY: usize = 4 << 20;

#[derive(Default)]
struct PipeState {
    chunks: VecDeque<Vec<u8>>,
    buffered: usize,
    writer_done: bool,
    reader_gone: bool,
    aborted: bool,
}

#[derive(Default)]
struct Pipe {
    state: Mutex<PipeState>,
    cond: Condvar,
}

impl Pipe {
    fn abort(&self) {
        self.state.lock().unwrap().aborted = true;
        self.cond.notify_all();
    }
}

fn aborted() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "connection closed")
}

struct PipeWriter(Arc<Pipe>);

impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = self.0.state.lock().unwrap();
        loop {
            if s.aborted {
                return Err(aborted());
            }
            if s.reader_gone {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "peer closed the stream",
                ));
            }
            if s.writer_done {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream finished"));
            }
            if s.buffered < PIPE_CAPACITY {
                break;
            }
            s = self.0.cond.wait(s).unwrap();
        }
        s.chunks.push_back(buf.to_vec());
        s.buffered += buf.len();
        self.0.cond.notify_all();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SendHalf for PipeWriter {
    fn finish(&mut self) -> io::Result<()> {
        self.0.state.lock().unwrap().writer_done = true;
        self.0.cond.notify_all();
        Ok(())
    }
}

impl Drop for PipeWriter {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

struct PipeReader {
    pipe: Arc<Pipe>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.chunk.len() {
            let mut s = self.pipe.state.lock().unwrap();
            loop {
                // Bytes written before a close are still delivered (a peer's last words,
                // such as an error message, must not be lost); then the close shows.
                if let Some(c) = s.chunks.pop_front() {
                    s.buffered -= c.len();
                    self.pipe.cond.notify_all();
                    self.chunk = c;
                    self.pos = 0;
                    break;
                }
                if s.aborted {
                    return Err(aborted());
                }
                if s.writer_done {
                    return Ok(0);
                }
                s = self.pipe.cond.wait(s).unwrap();
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for PipeReader {
    fn drop(&mut self) {
        self.pipe.state.lock().unwrap().reader_gone = true;
        self.pipe.cond.notify_all();
    }
}

#[derive(Default)]
struct Shared {
    /// Streams opened by the first end, waiting for the second end's accept.
    pending: Mutex<VecDeque<Stream>>,
    cond: Condvar,
    closed: Mutex<bool>,
    pipes: Mutex<Vec<Weak<Pipe>>>,
    /// Which end aborted (true: the opening end, the primary), and why.
    aborted: Mutex<Option<(bool, String)>>,
    /// An end that gave the other up (it fell silent), and why.
    gave_up: Mutex<Option<(bool, String)>>,
    /// Why the standby end fenced the primary end.
    fenced: Mutex<Option<String>>,
}

/// One end of an in-memory connection.
pub(crate) struct LocalConnection {
    shared: Arc<Shared>,
    counter: Arc<AtomicU64>,
    /// The end that opens streams (the primary's).
    opener: bool,
}

/// A connected pair: the first end opens streams, the second accepts them.
pub(crate) fn pair() -> (LocalConnection, LocalConnection) {
    let shared = Arc::new(Shared::default());
    let counter = Arc::new(AtomicU64::new(0));
    (
        LocalConnection {
            shared: shared.clone(),
            counter: counter.clone(),
            opener: true,
        },
        LocalConnection {
            shared,
            counter,
            opener: false,
        },
    )
}

impl LocalConnection {
    fn pipe(&self) -> (PipeWriter, PipeReader) {
        let p = Arc::new(Pipe::default());
        let mut pipes = self.shared.pipes.lock().unwrap();
        pipes.retain(|w| w.strong_count() > 0);
        pipes.push(Arc::downgrade(&p));
        (
            PipeWriter(p.clone()),
            PipeReader {
                pipe: p,
                chunk: Vec::new(),
                pos: 0,
            },
        )
    }
}

impl Connection for LocalConnection {
    fn open(&self) -> io::Result<Stream> {
        if *self.shared.closed.lock().unwrap() {
            return Err(aborted());
        }
        let (w1, r1) = self.pipe();
        let (w2, r2) = self.pipe();
        let theirs = Stream {
            recv: Box::new(r1),
            send: Box::new(Counted::new(w2, self.counter.clone())),
        };
        self.shared.pending.lock().unwrap().push_back(theirs);
        self.shared.cond.notify_all();
        Ok(Stream {
            recv: Box::new(r2),
            send: Box::new(Counted::new(w1, self.counter.clone())),
        })
    }

    fn accept(&self) -> io::Result<Option<Stream>> {
        let mut pending = self.shared.pending.lock().unwrap();
        loop {
            if let Some(s) = pending.pop_front() {
                return Ok(Some(s));
            }
            if *self.shared.closed.lock().unwrap() {
                return Ok(None);
            }
            pending = self.shared.cond.wait(pending).unwrap();
        }
    }

    fn wire_bytes(&self) -> u64 {
        self.counter.load(Ordering::Relaxed)
    }

    fn abort(&self, reason: &str) {
        self.shared
            .aborted
            .lock()
            .unwrap()
            .get_or_insert((self.opener, reason.to_string()));
        self.close(reason);
    }

    /// The other end's reason, when it aborted: the in-process standby's failure explains
    /// a broken stream on the primary.
    fn fence(&self, reason: &str) {
        self.shared
            .fenced
            .lock()
            .unwrap()
            .get_or_insert_with(|| reason.to_string());
        self.abort(reason);
    }

    fn give_up(&self, reason: &str) {
        self.shared
            .gave_up
            .lock()
            .unwrap()
            .get_or_insert((self.opener, reason.to_string()));
        self.abort(reason);
    }

    fn failure(&self) -> Option<crate::error::Error> {
        if self.opener
            && let Some(why) = &*self.shared.fenced.lock().unwrap()
        {
            return Some(crate::error::Error::Fenced(why.clone()));
        }
        if let Some((by, why)) = &*self.shared.gave_up.lock().unwrap()
            && *by == self.opener
        {
            return Some(crate::error::Error::Unreachable(why.clone()));
        }
        let aborted = self.shared.aborted.lock().unwrap();
        let (by_opener, reason) = aborted.as_ref()?;
        if *by_opener == self.opener {
            return None;
        }
        Some(if self.opener {
            crate::error::Error::Standby(reason.clone())
        } else {
            crate::error::Error::Unreachable(format!("the primary failed: {reason}"))
        })
    }

    fn close(&self, _reason: &str) {
        *self.shared.closed.lock().unwrap() = true;
        let pending = self.shared.pending.lock().unwrap();
        self.shared.cond.notify_all();
        drop(pending);
        for p in self.shared.pipes.lock().unwrap().iter() {
            if let Some(p) = p.upgrade() {
                p.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_carry_bytes_both_ways_and_count_them() {
        let (a, b) = pair();
        let t = std::thread::spawn(move || {
            let mut s = b.accept().unwrap().unwrap();
            let mut buf = Vec::new();
            s.recv.read_to_end(&mut buf).unwrap();
            s.send.write_all(&buf).unwrap();
            buf.len()
        });
        let mut s = a.open().unwrap();
        s.send.write_all(b"hello").unwrap();
        s.send.finish().unwrap();
        let mut back = Vec::new();
        s.recv.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"hello");
        assert_eq!(t.join().unwrap(), 5);
        assert_eq!(a.wire_bytes(), 10);
    }

    #[test]
    fn close_wakes_blocked_readers_and_acceptors() {
        let (a, b) = pair();
        let b = Arc::new(b);
        let mut s = a.open().unwrap();
        let _peer = b.accept().unwrap().unwrap();
        let b2 = b.clone();
        let acceptor = std::thread::spawn(move || b2.accept().unwrap().is_none());
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 1];
            s.recv.read(&mut buf).is_err()
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        a.close("test");
        assert!(reader.join().unwrap());
        assert!(acceptor.join().unwrap());
    }

    #[test]
    fn a_full_pipe_blocks_the_writer_until_read() {
        let (a, b) = pair();
        let mut s = a.open().unwrap();
        let mut peer = b.accept().unwrap().unwrap();
        let t = std::thread::spawn(move || {
            let chunk = vec![7u8; 1 << 20];
            for _ in 0..16 {
                s.send.write_all(&chunk).unwrap();
            }
        });
        let mut total = 0;
        let mut buf = vec![0u8; 1 << 16];
        while total < 16 << 20 {
            total += peer.recv.read(&mut buf).unwrap();
        }
        t.join().unwrap();
    }
}
