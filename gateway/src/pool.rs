//! Recycled buffers for the data path's large, short-lived allocations: batch bodies, payload
//! log read-backs, sealed segments and the aligned staging of local puts. A buffer handed out as [`Bytes`] comes back when its last slice is dropped,
//! so the next batch reuses memory that is already mapped; a freshly faulted page costs this
//! kind of VM about 4 s of kernel time per GiB to zero, more than compressing it.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Idle buffers kept for reuse, at most `max_idle` of them; the rest go back to the allocator.
pub struct Pool<T> {
    idle: Mutex<Vec<T>>,
    max_idle: usize,
}

impl<T: AsRef<[u8]> + Send + 'static> Pool<T> {
    pub fn new(max_idle: usize) -> Arc<Self> {
        Arc::new(Self {
            idle: Mutex::new(Vec::new()),
            max_idle,
        })
    }

    /// An idle buffer, if there is one (its contents are stale: the caller overwrites them).
    pub fn take(&self) -> Option<T> {
        self.idle.lock().expect("pool lock").pop()
    }

    /// Keeps `item` for reuse, unless enough are idle already.
    pub fn give(&self, item: T) {
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() < self.max_idle {
            idle.push(item);
        }
    }

    /// Idle buffers now.
    pub fn idle(&self) -> usize {
        self.idle.lock().expect("pool lock").len()
    }

    /// `item` as [`Bytes`] that gives it back to this pool once every slice of it is dropped.
    pub fn share(self: &Arc<Self>, item: T) -> Bytes {
        Bytes::from_owner(Returning {
            item: Some(item),
            pool: self.clone(),
        })
    }
}

/// The owner behind pooled [`Bytes`]: returns its buffer when dropped.
struct Returning<T: AsRef<[u8]> + Send + 'static> {
    item: Option<T>,
    pool: Arc<Pool<T>>,
}

impl<T: AsRef<[u8]> + Send + 'static> AsRef<[u8]> for Returning<T> {
    fn as_ref(&self) -> &[u8] {
        self.item.as_ref().map_or(&[], |i| i.as_ref())
    }
}

impl<T: AsRef<[u8]> + Send + 'static> Drop for Returning<T> {
    fn drop(&mut self) {
        if let Some(item) = self.item.take() {
            self.pool.give(item);
        }
    }
}

/// A cleared byte vector with room for `min` bytes, from `pool` when it has one that fits and is
/// not much larger: a small batch kept in the hot tail must not pin a buffer many times its size.
/// New vectors are rounded up to 1 MiB, so that buffers of about one size fit each other's
/// contents; a pooled vector is never grown (growth would double it and copy).
pub fn vec_with_room(pool: &Pool<Vec<u8>>, min: usize) -> Vec<u8> {
    match pool.take() {
        Some(mut v) if v.capacity() >= min && v.capacity() <= min.saturating_mul(4).max(1 << 20) => {
            v.clear();
            v
        }
        Some(v) => {
            pool.give(v);
            Vec::with_capacity(min.div_ceil(1 << 20).max(1) << 20)
        }
        None => Vec::with_capacity(min.div_ceil(1 << 20).max(1) << 20),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_returns_when_its_last_slice_is_dropped_and_is_reused() {
        let pool: Arc<Pool<Vec<u8>>> = Pool::new(2);
        let mut v = vec_with_room(&pool, 1 << 20);
        v.extend_from_slice(b"hello world");
        let at = v.as_ptr();
        let bytes = pool.share(v);
        let hello = bytes.slice(..5);
        drop(bytes);
        assert_eq!(pool.idle(), 0, "a slice still holds it");
        assert_eq!(&hello[..], b"hello");
        drop(hello);
        assert_eq!(pool.idle(), 1);
        let again = vec_with_room(&pool, 1000);
        assert_eq!(again.as_ptr(), at, "the same memory, not a new allocation");
        assert!(again.is_empty() && again.capacity() >= 1 << 20);
    }

    #[test]
    fn a_small_request_does_not_take_a_large_buffer() {
        let pool: Arc<Pool<Vec<u8>>> = Pool::new(2);
        pool.give(Vec::with_capacity(8 << 20));
        let small = vec_with_room(&pool, 4096);
        assert!(small.capacity() < 8 << 20);
        assert_eq!(pool.idle(), 1, "the large one stays for a large request");
        assert!(vec_with_room(&pool, 6 << 20).capacity() >= 8 << 20);
        assert_eq!(pool.idle(), 0);
    }

    #[test]
    fn a_pooled_buffer_too_small_is_not_grown() {
        let pool: Arc<Pool<Vec<u8>>> = Pool::new(2);
        pool.give(Vec::with_capacity(8 << 20));
        // Growing would double it to 16 MiB; a new buffer is rounded up to 1 MiB instead.
        let v = vec_with_room(&pool, (8 << 20) + 100);
        assert_eq!(v.capacity(), 9 << 20);
        assert_eq!(pool.idle(), 1, "the smaller one stays for a request it fits");
    }

    #[test]
    fn idle_buffers_are_bounded() {
        let pool: Arc<Pool<Vec<u8>>> = Pool::new(2);
        let shared: Vec<Bytes> = (0..5).map(|i| pool.share(vec![i as u8; 10])).collect();
        drop(shared);
        assert_eq!(pool.idle(), 2);
    }
}
