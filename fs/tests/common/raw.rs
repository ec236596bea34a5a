//! A deliberately minimal NBD client written from the spec, for sending what real clients never
//! send (bad ranges, unknown commands, garbage) and checking the bytes that come back.
#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const FLAG_FUA: u16 = 1;
pub const FLAG_DF: u16 = 4;
pub const FLAG_REQ_ONE: u16 = 8;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_NONE: u16 = 0;
pub const REPLY_OFFSET_DATA: u16 = 1;
pub const REPLY_OFFSET_HOLE: u16 = 2;
pub const REPLY_BLOCK_STATUS: u16 = 5;
pub const REPLY_ERROR: u16 = (1 << 15) + 1;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

pub const FLAG_HAS_FLAGS: u16 = 1;
pub const FLAG_READ_ONLY: u16 = 2;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

pub struct Raw {
    pub s: TcpStream,
}

#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub ty: u16,
    pub handle: u64,
    pub payload: Vec<u8>,
}

impl Raw {
    /// Connects and completes the greeting (fixed newstyle, no zeroes).
    pub async fn connect(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut c = Self { s };
        assert_eq!(c.s.read_u64().await.unwrap(), 0x4e42_444d_4147_4943, "NBDMAGIC");
        assert_eq!(c.s.read_u64().await.unwrap(), IHAVEOPT);
        let flags = c.s.read_u16().await.unwrap();
        assert_eq!(flags, 3, "FIXED_NEWSTYLE | NO_ZEROES");
        c.s.write_u32(3).await.unwrap();
        c
    }

    pub async fn send_opt(&mut self, option: u32, data: &[u8]) {
        let mut msg = Vec::new();
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.s.write_all(&msg).await.unwrap();
    }

    /// One option reply: (option, type, data).
    pub async fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(
            self.s.read_u64().await.unwrap(),
            0x0003_e889_0455_65a9,
            "option reply magic"
        );
        let option = self.s.read_u32().await.unwrap();
        let ty = self.s.read_u32().await.unwrap();
        let len = self.s.read_u32().await.unwrap();
        let mut data = vec![0; len as usize];
        self.s.read_exact(&mut data).await.unwrap();
        (option, ty, data)
    }

    pub async fn structured(&mut self) {
        self.send_opt(OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(self.opt_reply().await.1, REP_ACK);
    }

    /// `NBD_OPT_SET_META_CONTEXT` for `base:allocation`; returns the context replies' names.
    pub async fn set_meta(&mut self, export: &str, queries: &[&str]) -> Vec<(u32, String)> {
        self.send_opt(OPT_SET_META_CONTEXT, &meta_request(export, queries))
            .await;
        self.meta_replies().await
    }

    pub async fn meta_replies(&mut self) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        loop {
            let (_, ty, data) = self.opt_reply().await;
            match ty {
                REP_META_CONTEXT => out.push((
                    u32::from_be_bytes(data[..4].try_into().unwrap()),
                    String::from_utf8(data[4..].to_vec()).unwrap(),
                )),
                REP_ACK => return out,
                other => panic!("unexpected meta context reply {other:#x}"),
            }
        }
    }

    /// Sends INFO/GO and collects the replies up to the final one: (infos, final type).
    pub async fn info_or_go(&mut self, option: u32, name: &str, requests: &[u16]) -> (Vec<Vec<u8>>, u32) {
        let mut data = Vec::new();
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            data.extend_from_slice(&r.to_be_bytes());
        }
        self.send_opt(option, &data).await;
        let mut infos = Vec::new();
        loop {
            let (opt, ty, data) = self.opt_reply().await;
            assert_eq!(opt, option);
            if ty == REP_INFO {
                infos.push(data);
            } else {
                return (infos, ty);
            }
        }
    }

    /// NBD_OPT_GO that must succeed: returns (size, transmission flags).
    pub async fn go(&mut self, name: &str) -> (u64, u16) {
        let (infos, ty) = self.info_or_go(OPT_GO, name, &[INFO_BLOCK_SIZE]).await;
        assert_eq!(ty, REP_ACK, "GO {name}");
        let export = infos
            .iter()
            .find(|i| u16::from_be_bytes([i[0], i[1]]) == INFO_EXPORT)
            .expect("NBD_INFO_EXPORT");
        (
            u64::from_be_bytes(export[2..10].try_into().unwrap()),
            u16::from_be_bytes(export[10..12].try_into().unwrap()),
        )
    }

    pub async fn request(&mut self, flags: u16, ty: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut msg = Vec::with_capacity(28 + payload.len());
        msg.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        msg.extend_from_slice(&flags.to_be_bytes());
        msg.extend_from_slice(&ty.to_be_bytes());
        msg.extend_from_slice(&handle.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(payload);
        self.s.write_all(&msg).await.unwrap();
    }

    /// A simple reply header: (error, handle).
    pub async fn simple_reply(&mut self) -> (u32, u64) {
        assert_eq!(self.s.read_u32().await.unwrap(), 0x6744_6698, "simple reply magic");
        let err = self.s.read_u32().await.unwrap();
        let handle = self.s.read_u64().await.unwrap();
        (err, handle)
    }

    pub async fn read_bytes(&mut self, len: usize) -> Vec<u8> {
        let mut data = vec![0; len];
        self.s.read_exact(&mut data).await.unwrap();
        data
    }

    pub async fn chunk(&mut self) -> Chunk {
        assert_eq!(self.s.read_u32().await.unwrap(), 0x668e_33ef, "structured reply magic");
        let flags = self.s.read_u16().await.unwrap();
        let ty = self.s.read_u16().await.unwrap();
        let handle = self.s.read_u64().await.unwrap();
        let len = self.s.read_u32().await.unwrap();
        let payload = self.read_bytes(len as usize).await;
        Chunk {
            flags,
            ty,
            handle,
            payload,
        }
    }

    /// All chunks of one structured reply (the stream carries no other replies meanwhile).
    pub async fn chunks(&mut self) -> Vec<Chunk> {
        let mut out = Vec::new();
        loop {
            let chunk = self.chunk().await;
            let done = chunk.flags & REPLY_FLAG_DONE != 0;
            out.push(chunk);
            if done {
                return out;
            }
        }
    }

    /// Reads `len` at `offset` with structured replies; Err(errno) on an error chunk.
    pub async fn sread(&mut self, handle: u64, flags: u16, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(flags, CMD_READ, handle, offset, len, &[]).await;
        let chunks = self.chunks().await;
        assemble(&chunks, offset, len)
    }

    /// Reads with a simple reply; Err(errno) on error.
    pub async fn read(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(0, CMD_READ, handle, offset, len, &[]).await;
        let (err, h) = self.simple_reply().await;
        assert_eq!(h, handle);
        if err != 0 {
            return Err(err);
        }
        Ok(self.read_bytes(len as usize).await)
    }

    /// Expects the peer to close the connection (EOF or reset) within 5 s.
    pub async fn expect_closed(&mut self) {
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                match self.s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(r.is_ok(), "the server did not close the connection");
    }
}

/// Reassembles a structured read reply; checks chunk bounds, overlaps and coverage.
pub fn assemble(chunks: &[Chunk], offset: u64, len: u32) -> Result<Vec<u8>, u32> {
    let mut out = vec![0u8; len as usize];
    let mut covered = vec![false; len as usize];
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(
            c.flags & REPLY_FLAG_DONE != 0,
            i + 1 == chunks.len(),
            "DONE only on the last chunk"
        );
        let at = |o: u64| (o - offset) as usize;
        match c.ty {
            REPLY_ERROR => return Err(u32::from_be_bytes(c.payload[..4].try_into().unwrap())),
            REPLY_NONE => assert!(c.payload.is_empty()),
            REPLY_OFFSET_DATA => {
                let o = u64::from_be_bytes(c.payload[..8].try_into().unwrap());
                let data = &c.payload[8..];
                assert!(!data.is_empty());
                let s = at(o);
                out[s..s + data.len()].copy_from_slice(data);
                for f in &mut covered[s..s + data.len()] {
                    assert!(!*f, "overlapping chunks");
                    *f = true;
                }
            }
            REPLY_OFFSET_HOLE => {
                assert_eq!(c.payload.len(), 12);
                let o = u64::from_be_bytes(c.payload[..8].try_into().unwrap());
                let n = u32::from_be_bytes(c.payload[8..12].try_into().unwrap()) as usize;
                assert!(n > 0);
                let s = at(o);
                for f in &mut covered[s..s + n] {
                    assert!(!*f, "overlapping chunks");
                    *f = true;
                }
            }
            other => panic!("unexpected chunk type {other}"),
        }
    }
    assert!(covered.iter().all(|c| *c), "read reply does not cover the request");
    Ok(out)
}

pub fn meta_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        data.extend_from_slice(&(q.len() as u32).to_be_bytes());
        data.extend_from_slice(q.as_bytes());
    }
    data
}

/// The block status descriptors of a reply: (length, flags).
pub fn descriptors(chunk: &Chunk) -> Vec<(u32, u32)> {
    assert_eq!(chunk.ty, REPLY_BLOCK_STATUS);
    chunk.payload[4..]
        .chunks(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..].try_into().unwrap()),
            )
        })
        .collect()
}

pub fn io_err(msg: &str) -> io::Error {
    io::Error::other(msg.to_owned())
}
