//! A TCP relay between two appliances on loopback: it counts the bytes each way, can be cut
//! (an outage: connections dropped and refused) and pointed at another address (a restarted
//! peer), and can flip one byte of the answers once (a damaged link).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct State {
    target: Mutex<String>,
    down: AtomicBool,
    /// Bytes from the client to the target, and back.
    up_bytes: AtomicU64,
    down_bytes: AtomicU64,
    /// Answers' byte (counted over all connections) to flip once; 0: none.
    flip_at: AtomicU64,
    /// Bytes per second each way of each connection; 0: no limit.
    rate: AtomicU64,
    stop: AtomicBool,
    open: Mutex<Vec<TcpStream>>,
}

pub struct Proxy {
    pub addr: String,
    state: Arc<State>,
}

impl Proxy {
    /// Relays 127.0.0.1:0 to `target` (`127.0.0.1:PORT`).
    pub fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let state = Arc::new(State::default());
        *state.target.lock().unwrap() = target.to_string();
        let s = Arc::clone(&state);
        std::thread::spawn(move || accept(listener, s));
        Proxy { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Bytes relayed toward the target and back, so far.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.state.up_bytes.load(Ordering::SeqCst),
            self.state.down_bytes.load(Ordering::SeqCst),
        )
    }

    /// Cuts the link: open connections are dropped, new ones refused (closed at once).
    pub fn cut(&self) {
        self.state.down.store(true, Ordering::SeqCst);
        for stream in self.state.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.state.down.store(false, Ordering::SeqCst);
    }

    pub fn retarget(&self, target: &str) {
        *self.state.target.lock().unwrap() = target.to_string();
    }

    /// Relays at most `bytes_per_second` each way of each connection (a thin link).
    pub fn limit(&self, bytes_per_second: u64) {
        self.state.rate.store(bytes_per_second, Ordering::SeqCst);
    }

    /// Flips the answers' byte `after` bytes from now, once.
    pub fn flip_once_after(&self, after: u64) {
        let at = self.state.down_bytes.load(Ordering::SeqCst) + after.max(1);
        self.state.flip_at.store(at, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.cut();
    }
}

fn accept(listener: TcpListener, state: Arc<State>) {
    while !state.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        if state.down.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let _ = client.set_nonblocking(false);
        let target = state.target.lock().unwrap().clone();
        let Ok(server) = TcpStream::connect(&target) else {
            drop(client);
            continue;
        };
        {
            let mut open = state.open.lock().unwrap();
            open.push(client.try_clone().expect("clone"));
            open.push(server.try_clone().expect("clone"));
        }
        let (c2, s2) = (
            client.try_clone().expect("clone"),
            server.try_clone().expect("clone"),
        );
        let (up, down) = (Arc::clone(&state), Arc::clone(&state));
        std::thread::spawn(move || relay(client, server, &up, false));
        std::thread::spawn(move || relay(s2, c2, &down, true));
    }
}

fn relay(mut from: TcpStream, mut to: TcpStream, state: &State, answers: bool) {
    let mut buf = vec![0u8; 64 * 1024];
    let started = std::time::Instant::now();
    let mut relayed = 0u64;
    loop {
        // Under a limit, reads are small and paced so that this direction keeps to it.
        let rate = state.rate.load(Ordering::SeqCst);
        if rate > 0 {
            let due = Duration::from_secs_f64(relayed as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let want = if rate > 0 { 16 * 1024 } else { buf.len() };
        let buf = &mut buf[..want];
        let n = match from.read(buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if state.down.load(Ordering::SeqCst) {
            break;
        }
        let counter = if answers {
            &state.down_bytes
        } else {
            &state.up_bytes
        };
        let before = counter.fetch_add(n as u64, Ordering::SeqCst);
        if answers {
            let flip = state.flip_at.load(Ordering::SeqCst);
            if flip > before && flip <= before + n as u64 {
                buf[(flip - before - 1) as usize] ^= 0x5a;
                state.flip_at.store(0, Ordering::SeqCst);
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        relayed += n as u64;
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
