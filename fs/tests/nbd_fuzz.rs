//! Random client input never panics the NBD server, never wedges it, and leaves nothing behind.
//! Its own test binary: the panic hook below counts every panic in the process.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::raw::*;
use common::{image, MemCatalog, MemView, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

static PANICS: AtomicUsize = AtomicUsize::new(0);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Offsets and lengths that like boundaries.
    fn interesting(&mut self, size: u64) -> u64 {
        match self.below(8) {
            0 => 0,
            1 => size,
            2 => size - 1,
            3 => u64::MAX - self.below(4096),
            4 => self.below(size),
            5 => self.below(1 << 32),
            6 => 1 << 25,
            _ => self.below(4096) * 512,
        }
    }
}

const SIZE: u64 = (4 << 20) + 512;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_input_never_panics_or_wedges_the_server() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));

    let holes = [(1 << 20, 2 << 20)];
    let data = image(SIZE as usize, 5, &holes);
    let mut catalog = MemCatalog::default();
    catalog.add("ro", "", Arc::new(MemView::read_only(data.clone(), &holes)));
    catalog.add("rw", "", Arc::new(MemView::writable(SIZE)));
    let server = TestServer::start(catalog).await;

    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    for round in 0..400 {
        let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).await.unwrap();
        let mut out = Vec::new();
        let flags = if rng.below(10) == 0 {
            rng.next() as u32
        } else {
            rng.below(4) as u32
        };
        out.extend_from_slice(&flags.to_be_bytes());
        let transmission = round % 2 == 1;
        if transmission {
            // A valid way in, then random requests.
            let export = if rng.below(2) == 0 { "ro" } else { "rw" };
            if rng.below(2) == 0 {
                put_opt(&mut out, OPT_STRUCTURED_REPLY, &[]);
                put_opt(
                    &mut out,
                    OPT_SET_META_CONTEXT,
                    &meta_request(export, &["base:allocation"]),
                );
            }
            let mut go = Vec::new();
            go.extend_from_slice(&(export.len() as u32).to_be_bytes());
            go.extend_from_slice(export.as_bytes());
            go.extend_from_slice(&0u16.to_be_bytes());
            put_opt(&mut out, OPT_GO, &go);
            for h in 0..rng.below(40) {
                if rng.below(30) == 0 {
                    let n = rng.below(64) as usize;
                    out.extend(rng.bytes(n));
                    continue;
                }
                let ty = rng.below(10) as u16;
                let flags = if rng.below(3) == 0 { rng.next() as u16 } else { 0 };
                let offset = rng.interesting(SIZE);
                let len = match rng.below(4) {
                    0 => rng.interesting(SIZE) as u32,
                    _ => rng.below(70_000) as u32,
                };
                out.extend_from_slice(&0x2560_9513u32.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&ty.to_be_bytes());
                out.extend_from_slice(&h.to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
                if ty == CMD_WRITE && len < 70_000 {
                    out.extend(rng.bytes(len as usize));
                }
            }
        } else {
            for _ in 0..rng.below(12) {
                let option = if rng.below(4) == 0 {
                    rng.next() as u32
                } else {
                    rng.below(12) as u32
                };
                let mut data = match rng.below(3) {
                    0 => {
                        let n = rng.below(40) as usize;
                        rng.bytes(n)
                    }
                    1 => meta_request(["ro", "rw", "x"][rng.below(3) as usize], &["base:allocation", "base:"]),
                    _ => {
                        let mut d = Vec::new();
                        d.extend_from_slice(&(rng.below(8) as u32).to_be_bytes());
                        d.extend(b"ro");
                        d.extend_from_slice(&(rng.below(4) as u16).to_be_bytes());
                        let n = rng.below(6) as usize;
                        d.extend(rng.bytes(n));
                        d
                    }
                };
                if rng.below(10) == 0 {
                    data.truncate(rng.below(data.len() as u64 + 1) as usize);
                }
                if rng.below(20) == 0 {
                    out.extend(rng.bytes(16));
                } else {
                    put_opt(&mut out, option, &data);
                }
            }
        }
        // Everything at once, then half-close and read until the server closes.
        let _ = s.write_all(&out).await;
        let _ = s.shutdown().await;
        let drained = tokio::time::timeout(Duration::from_secs(10), async {
            let mut sink = vec![0u8; 1 << 16];
            loop {
                match s.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(drained.is_ok(), "round {round}: the server neither answered nor closed");
    }

    let stats = server.stats.clone();
    for _ in 0..200 {
        let s = stats.snapshot();
        if s.connections_active == 0 && s.requests_in_flight == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let s = stats.snapshot();
    assert_eq!((s.connections_active, s.requests_in_flight), (0, 0), "{s:?}");
    assert!(s.requests > 1000 && s.errors > 100 && s.protocol_errors > 10, "{s:?}");

    let mut c = Raw::connect(server.addr).await;
    c.go("ro").await;
    assert_eq!(c.read(1, 4096, 4096).await.unwrap(), data[4096..8192]);
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "the server panicked");
    server.stop().await;
}

fn put_opt(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}
