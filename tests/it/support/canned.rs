//! A tiny in-process HTTP/1.1 server with canned answers, for what no real registry does
//! (the distribution registry refuses to store or serve a manifest over 4 MiB).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// One canned answer.
#[derive(Clone)]
pub struct Canned {
    pub path: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Send `Content-Length` (else the body ends when the connection closes).
    pub content_length: bool,
}

/// Serves `routes` on 127.0.0.1 until dropped; unknown paths get 404.
pub struct CannedServer {
    addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CannedServer {
    pub fn start(routes: Vec<Canned>) -> CannedServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind canned server");
        let addr = listener.local_addr().expect("addr").to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().expect("clone stream"));
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                loop {
                    let mut line = String::new();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) if line == "\r\n" => break,
                        Ok(_) => {}
                    }
                }
                let path = request_line.split(' ').nth(1).unwrap_or("").to_string();
                let route = routes.iter().find(|r| r.path == path);
                let (status, headers, body, with_len) = match route {
                    Some(r) => (
                        r.status,
                        r.headers.clone(),
                        r.body.clone(),
                        r.content_length,
                    ),
                    None => (404, vec![], b"{\"errors\":[]}".to_vec(), true),
                };
                let mut head = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                if with_len {
                    head.push_str(&format!("Content-Length: {}\r\n", body.len()));
                }
                head.push_str("\r\n");
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(&body);
            }
        });
        CannedServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for CannedServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
