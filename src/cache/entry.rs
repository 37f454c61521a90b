//! entry: one cached key and its value in a single reference-counted
//! allocation, addressed by a thin (8-byte) pointer.
//!
//! Why by hand: with `Arc<[u8]>` for the key and another for the value, an
//! entry of an 11-byte key and a 100-byte value costs two allocations, two
//! 16-byte headers and two rounds of malloc's 16-byte rounding (65 bytes
//! beyond the payload), and every map bucket holds two fat pointers. Here it
//! is one allocation with a 24-byte header (33 bytes beyond the payload at
//! that size), and the map's bucket is this one pointer. `triomphe::ThinArc`
//! gives the same shape with a 40-byte header (a `usize` count and a `usize`
//! length), 16 bytes more per entry at the measured size.
//!
//! The header also carries the two fields the cache's hit path needs
//! without its order lock: the entry's slab node and its insertion time.
//! Both are written by the cache under its order lock before the entry is
//! published in the map, and read by hits under the map's shard lock.
//!
//! The unsafe code here and its use by the cache run under Miri with
//! `make miri` (nightly; the cache's unit tests, threads included).

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::{self, AtomicU32, AtomicU64, Ordering};

/// The largest value an entry can hold: its length is kept in 32 bits (and,
/// on 32-bit targets, key + value must stay under `isize::MAX`).
pub const MAX_VALUE_BYTES: usize = if usize::BITS >= 64 {
    u32::MAX as usize
} else {
    isize::MAX as usize / 2
};

/// Clones beyond this abort the process instead of wrapping the count to
/// zero (a use after free), as `std::sync::Arc` does at `isize::MAX`.
/// Reaching it would take 2^31 live handles, 16 GiB of pointers.
const MAX_REFS: u32 = i32::MAX as u32;

/// Written once at allocation, except `node` and `born` (see the module doc).
#[repr(C)]
struct Header {
    refs: AtomicU32,
    key_len: u32,
    value_len: u32,
    node: AtomicU32,
    born: AtomicU64,
}

const HEADER_BYTES: usize = std::mem::size_of::<Header>();

/// A cached value together with its key: derefs to the value bytes; cloning
/// it copies a pointer, never the bytes.
pub struct Value {
    ptr: NonNull<Header>,
}

// SAFETY: a `Value` is a shared handle to immutable bytes plus atomics, the
// same contract as `Arc<[u8]>`: the count is atomic and the bytes are never
// written after `new` returns.
unsafe impl Send for Value {}
// SAFETY: as above; `&Value` gives out only `&[u8]` and atomic loads.
unsafe impl Sync for Value {}

impl Value {
    /// Copies `key` and `value` into one new allocation.
    ///
    /// # Panics
    /// If `value` is longer than [`MAX_VALUE_BYTES`] (callers check first) or
    /// `key` is 4 GiB or longer (both front ends bound keys far below that).
    pub fn new(key: &[u8], value: &[u8]) -> Value {
        let key_len = u32::try_from(key.len()).expect("key of 4 GiB or more");
        let value_len = u32::try_from(value.len()).expect("value longer than MAX_VALUE_BYTES");
        let layout = layout(key.len(), value.len());
        // SAFETY: `layout` has a non-zero size (it includes the header) and
        // the header's alignment. The header is written before any read, and
        // the two copies fill exactly the `key_len + value_len` bytes after
        // it, which the layout reserves; the sources cannot overlap a fresh
        // allocation.
        unsafe {
            let raw = alloc::alloc(layout).cast::<Header>();
            let Some(ptr) = NonNull::new(raw) else {
                alloc::handle_alloc_error(layout)
            };
            raw.write(Header {
                refs: AtomicU32::new(1),
                key_len,
                value_len,
                node: AtomicU32::new(u32::MAX),
                born: AtomicU64::new(0),
            });
            let data = raw.cast::<u8>().add(HEADER_BYTES);
            std::ptr::copy_nonoverlapping(key.as_ptr(), data, key.len());
            std::ptr::copy_nonoverlapping(value.as_ptr(), data.add(key.len()), value.len());
            Value { ptr }
        }
    }

    fn header(&self) -> &Header {
        // SAFETY: the allocation lives while any handle does (this one).
        unsafe { self.ptr.as_ref() }
    }

    fn data(&self) -> *const u8 {
        // SAFETY: the bytes start right after the header, inside the allocation.
        unsafe { self.ptr.as_ptr().cast::<u8>().add(HEADER_BYTES) }
    }

    /// The key bytes.
    pub fn key(&self) -> &[u8] {
        let len = self.header().key_len as usize;
        // SAFETY: `new` wrote `key_len` key bytes at `data()`; they are never
        // written again and live as long as `self`.
        unsafe { std::slice::from_raw_parts(self.data(), len) }
    }

    /// The value bytes.
    pub fn value(&self) -> &[u8] {
        let header = self.header();
        // SAFETY: `new` wrote `value_len` value bytes right after the key;
        // they are never written again and live as long as `self`.
        unsafe {
            std::slice::from_raw_parts(
                self.data().add(header.key_len as usize),
                header.value_len as usize,
            )
        }
    }

    /// Key plus value bytes, from the header's lengths: what the cache's
    /// byte bound counts (the header and malloc's rounding are not counted).
    pub fn size(&self) -> usize {
        let header = self.header();
        header.key_len as usize + header.value_len as usize
    }

    /// Identity of the allocation: equal for clones, and never shared by two
    /// live entries.
    pub(crate) fn addr(&self) -> usize {
        self.ptr.as_ptr().addr()
    }

    /// Slab node of the cache holding this entry.
    pub(crate) fn node(&self) -> u32 {
        self.header().node.load(Ordering::Relaxed)
    }

    /// Insertion time, in the cache's clock.
    pub(crate) fn born(&self) -> u64 {
        self.header().born.load(Ordering::Relaxed)
    }

    /// Records where and when the cache stored the entry. Called under the
    /// cache's order lock, before the entry is published in the map (whose
    /// shard lock orders these stores before any hit's loads).
    pub(crate) fn place(&self, node: u32, born: u64) {
        let header = self.header();
        header.node.store(node, Ordering::Relaxed);
        header.born.store(born, Ordering::Relaxed);
    }

    #[cfg(test)]
    fn refs(&self) -> u32 {
        self.header().refs.load(Ordering::SeqCst)
    }
}

/// The allocation of an entry holding `key_len + value_len` bytes.
fn layout(key_len: usize, value_len: usize) -> Layout {
    // Both lengths fit in u32, so on 64-bit targets this cannot overflow;
    // on 32-bit ones it can, and `expect` is the right answer there.
    let size = HEADER_BYTES
        .checked_add(key_len)
        .and_then(|n| n.checked_add(value_len))
        .expect("entry size overflows usize");
    Layout::from_size_align(size, std::mem::align_of::<Header>()).expect("entry layout")
}

impl Clone for Value {
    fn clone(&self) -> Value {
        // Relaxed, as in `Arc`: a new handle is made from an existing one,
        // which already keeps the allocation alive.
        let old = self.header().refs.fetch_add(1, Ordering::Relaxed);
        if old > MAX_REFS {
            std::process::abort();
        }
        Value { ptr: self.ptr }
    }
}

impl Drop for Value {
    fn drop(&mut self) {
        let header = self.header();
        // Release so this handle's reads happen before the free; the Acquire
        // fence makes the last dropper see every other handle's reads done.
        if header.refs.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        atomic::fence(Ordering::Acquire);
        let layout = layout(header.key_len as usize, header.value_len as usize);
        // SAFETY: this was the last handle, so nothing else can reach the
        // allocation; it was made by `alloc` with this same layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr().cast::<u8>(), layout) }
    }
}

impl Deref for Value {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.value()
    }
}

impl AsRef<[u8]> for Value {
    fn as_ref(&self) -> &[u8] {
        self.value()
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Value")
            .field("key", &String::from_utf8_lossy(self.key()))
            .field("value_len", &self.value().len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Key and value read back exactly as given, including empty ones.
    #[test]
    fn holds_key_and_value() {
        let v = Value::new(b"key:1", b"hello");
        assert_eq!(v.key(), b"key:1");
        assert_eq!(v.value(), b"hello");
        assert_eq!(&*v, b"hello");
        let empty = Value::new(b"", b"");
        assert_eq!(empty.key(), b"");
        assert_eq!(empty.value(), b"");
        let binary: Vec<u8> = (0..=255).collect();
        let big = vec![7u8; 1 << 20];
        let v = Value::new(&binary, &big);
        assert_eq!(v.key(), &binary[..]);
        assert_eq!(v.value(), &big[..]);
    }

    /// Clones share one allocation; the count follows clones and drops.
    #[test]
    fn clones_share_and_count() {
        let a = Value::new(b"k", b"v");
        let b = a.clone();
        assert_eq!(a.addr(), b.addr());
        assert_eq!(a.refs(), 2);
        drop(b);
        assert_eq!(a.refs(), 1);
        assert_ne!(a.addr(), Value::new(b"k", b"v").addr());
    }

    /// The header is the 24 bytes the memory figures assume, and a handle
    /// (and `Option` of one) is one pointer.
    #[test]
    fn sizes() {
        assert_eq!(HEADER_BYTES, 24);
        assert_eq!(std::mem::size_of::<Value>(), 8);
        assert_eq!(std::mem::size_of::<Option<Value>>(), 8);
    }

    /// `place` is visible through `node` and `born`.
    #[test]
    fn place_records_node_and_birth() {
        let v = Value::new(b"k", b"v");
        v.place(7, 42);
        assert_eq!((v.node(), v.born()), (7, 42));
    }

    /// Handles cloned and dropped from many threads free the entry exactly
    /// once, after the last drop, with the bytes intact until then.
    #[test]
    fn shared_across_threads() {
        let v = Value::new(b"shared", &[9u8; 1000]);
        std::thread::scope(|s| {
            for _ in 0..4 {
                let v = &v;
                s.spawn(move || {
                    for _ in 0..10_000 {
                        let c = v.clone();
                        assert_eq!(c.value()[999], 9);
                    }
                });
            }
        });
        assert_eq!(v.refs(), 1);
    }
}
