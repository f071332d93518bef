//! A small HTTP/1.1 server on loopback for the tests and benchmarks of
//! steps' outbound HTTP: real sockets, keep-alive, a count of accepted
//! connections.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// A keep-alive HTTP/1.1 server on a thread per connection:
/// - `/json`: `{"n": 1}`;
/// - `/once`: the same, then the connection closed;
/// - `/stall`: never answers;
/// - `/huge`: a chunked body that never ends;
/// - `/gate`: `{"open": true}` once [`HttpServer::open_gate`] is called;
/// - `/orders.json`: `examples/data/orders.json`.
pub struct HttpServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    accepted: Arc<AtomicUsize>,
    gate: Arc<Gate>,
}

/// Requests to `/gate` wait here until it opens.
#[derive(Default)]
struct Gate {
    /// (open, requests waiting)
    state: Mutex<(bool, usize)>,
    changed: Condvar,
}

impl HttpServer {
    /// Starts it on a free port.
    pub fn start() -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("cannot listen on loopback: {e}"));
        let port = listener.local_addr().map_or(0, |a| a.port());
        let accepted = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Gate::default());
        let (count, served_gate) = (accepted.clone(), gate.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                count.fetch_add(1, Ordering::SeqCst);
                let gate = served_gate.clone();
                std::thread::spawn(move || serve(stream, &gate));
            }
        });
        HttpServer { port, accepted, gate }
    }

    /// Waits (at most a minute) until a request is waiting at `/gate`.
    pub fn wait_at_gate(&self) {
        let state = self.gate.state.lock().unwrap_or_else(|e| e.into_inner());
        let waited =
            self.gate
                .changed
                .wait_timeout_while(state, Duration::from_secs(60), |(_, waiting)| *waiting == 0);
        let (_state, timeout) = waited.unwrap_or_else(|e| e.into_inner());
        assert!(!timeout.timed_out(), "no request came to /gate within a minute");
    }

    /// Lets every request at `/gate`, and every later one, through.
    pub fn open_gate(&self) {
        self.gate.state.lock().unwrap_or_else(|e| e.into_inner()).0 = true;
        self.gate.changed.notify_all();
    }

    /// The TCP connections it accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn serve(stream: TcpStream, gate: &Gate) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut out = stream;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request).unwrap_or(0) == 0 {
            return;
        }
        // The headers, to the blank line (GET requests: no body).
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
        }
        let path = request.split_whitespace().nth(1).unwrap_or("/");
        match path {
            "/json" | "/gate" | "/orders.json" => {
                let orders;
                let body = match path {
                    "/gate" => {
                        let mut state = gate.state.lock().unwrap_or_else(|e| e.into_inner());
                        state.1 += 1;
                        gate.changed.notify_all();
                        while !state.0 {
                            state = gate.changed.wait(state).unwrap_or_else(|e| e.into_inner());
                        }
                        r#"{"open": true}"#
                    }
                    "/orders.json" => {
                        let file = crate::repo().join("examples/data/orders.json");
                        orders = std::fs::read_to_string(&file)
                            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
                        &orders
                    }
                    _ => r#"{"n": 1}"#,
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                // One write: headers and body in one segment, as servers do
                // (two small writes would wait for a delayed ACK).
                if out.write_all(format!("{head}{body}").as_bytes()).is_err() {
                    return;
                }
            }
            "/once" => {
                // Answers, then closes without saying so (as a server whose
                // keep-alive timeout ran out does): the client finds out only
                // when it sends on this connection again.
                let body = r#"{"n": 1}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                let _ = out.write_all(format!("{head}{body}").as_bytes());
                return;
            }
            "/stall" => {
                // Until the client gives up and closes.
                let mut rest = String::new();
                let _ = reader.read_line(&mut rest);
                return;
            }
            "/huge" => {
                let _ = out.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
                let chunk = vec![b'x'; 64 << 10];
                loop {
                    let head = format!("{:x}\r\n", chunk.len());
                    let sent = out
                        .write_all(head.as_bytes())
                        .and_then(|()| out.write_all(&chunk))
                        .and_then(|()| out.write_all(b"\r\n"));
                    if sent.is_err() {
                        return;
                    }
                }
            }
            _ => {
                let _ = out.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
            }
        }
    }
}
