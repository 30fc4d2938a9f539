//! Lingering close (RFC 9112 §9.6): when a connection ends, half-close it and read (and
//! discard) what the client is still sending before the socket is closed.
//!
//! A server that answers early, before reading the request body (a refused signature, a
//! missing key), and then closes the socket with unread bytes in its receive buffer makes the
//! kernel send a TCP reset; a client still uploading then gets the reset instead of the
//! response, and retries a request that can only fail again, or reports a broken connection.
//! hyper closes the connection through `poll_shutdown`; this wrapper finishes that shutdown
//! (TLS `close_notify`, then FIN) and drains the read side until the client closes too, for at
//! most [`LINGER_TIME`] and [`LINGER_BYTES`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// How long a closing connection is drained at most.
pub const LINGER_TIME: Duration = Duration::from_secs(5);
/// How many bytes a closing connection reads and discards at most.
pub const LINGER_BYTES: usize = 16 << 20;

pub struct Lingering<S> {
    inner: S,
    state: State,
}

enum State {
    Open,
    /// Sending TLS `close_notify` and FIN; a client that never reads could stall this, so it
    /// counts against the same deadline as the drain.
    ShuttingDown {
        deadline: Pin<Box<Sleep>>,
    },
    Draining {
        deadline: Pin<Box<Sleep>>,
        discarded: usize,
    },
    Closed,
}

impl<S> Lingering<S> {
    pub fn new(inner: S) -> Self {
        Lingering {
            inner,
            state: State::Open,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Lingering<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Open => {
                    this.state = State::ShuttingDown {
                        deadline: Box::pin(tokio::time::sleep(LINGER_TIME)),
                    };
                }
                State::ShuttingDown { deadline } => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        this.state = State::Closed;
                        continue;
                    }
                    let shut = ready!(Pin::new(&mut this.inner).poll_shutdown(cx));
                    let State::ShuttingDown { deadline } =
                        std::mem::replace(&mut this.state, State::Closed)
                    else {
                        continue;
                    };
                    // A peer that already reset the connection: nothing left to drain.
                    if shut.is_ok() {
                        this.state = State::Draining {
                            deadline,
                            discarded: 0,
                        };
                    }
                }
                State::Draining {
                    deadline,
                    discarded,
                } => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        this.state = State::Closed;
                        continue;
                    }
                    let mut scratch = [0u8; 8192];
                    let mut buf = ReadBuf::new(&mut scratch);
                    match ready!(Pin::new(&mut this.inner).poll_read(cx, &mut buf)) {
                        Ok(()) if !buf.filled().is_empty() => {
                            *discarded += buf.filled().len();
                            if *discarded >= LINGER_BYTES {
                                this.state = State::Closed;
                            }
                        }
                        // The client closed its side (or broke off): done.
                        Ok(()) | Err(_) => this.state = State::Closed,
                    }
                }
                State::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An early answer to a request whose body is still coming reaches the client whole,
    /// because the closing side drains instead of resetting.
    #[tokio::test]
    async fn early_answer_survives_an_unread_upload() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut s = Lingering::new(stream);
            let mut head = [0u8; 16];
            s.read_exact(&mut head).await.unwrap();
            s.write_all(b"refused").await.unwrap();
            s.shutdown().await.unwrap();
        });
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        // A client that sends its whole body before it reads the answer, as HTTP clients
        // without `Expect: 100-continue` do. Far more than the socket buffers hold: the server
        // reads only 16 bytes of it. Without draining, the close resets the connection and the
        // answer waiting in the client's receive buffer is lost.
        let upload = vec![7u8; 8 << 20];
        let exchange = async {
            client.write_all(&upload).await?;
            client.shutdown().await?;
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.map(|_| answer)
        };
        let answer = tokio::time::timeout(Duration::from_secs(20), exchange)
            .await
            .expect("the exchange finishes");
        assert_eq!(answer.expect("no reset"), b"refused");
        server.await.unwrap();
    }

    /// A client that keeps a closing connection busy (trickling bytes) holds it for at most
    /// `LINGER_TIME`.
    #[tokio::test]
    async fn draining_is_bounded_in_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            for _ in 0..400 {
                if s.write_all(b"x").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let (stream, _) = listener.accept().await.unwrap();
        let mut s = Lingering::new(stream);
        let started = tokio::time::Instant::now();
        s.shutdown().await.unwrap();
        let took = started.elapsed();
        assert!(
            took >= LINGER_TIME - Duration::from_millis(100)
                && took < LINGER_TIME + Duration::from_secs(2),
            "{took:?}"
        );
        client.abort();
    }
}
