//! Aligned, pooled I/O buffers.
//!
//! Every buffer handed to the device engine is an [`IoBuf`]: a heap allocation aligned to
//! [`BUF_ALIGN`] (so it is valid for `O_DIRECT`), whose capacity is a power-of-two size
//! class between 4 KiB and [`MAX_POOLED_BYTES`]. Dropped buffers go back to a per-class free
//! list, so the hot path (a 4 KiB read, a 1 MiB write) does not touch the allocator and large
//! buffers are not re-faulted page by page on every request.
//!
//! Invariants:
//! - all `cap` bytes of an allocation are initialised (allocations are zeroed; reused buffers
//!   keep old bytes), so handing out `&mut [u8]` over `len <= cap` is sound;
//! - a buffer is owned by exactly one holder; while an operation is in flight that holder is
//!   the engine's in-flight table, never the caller.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::Mutex;

/// Alignment of every buffer: the largest logical block size O_DIRECT asks for in practice.
pub const BUF_ALIGN: usize = 4096;
const MIN_CLASS_SHIFT: u32 = 12;
const MAX_CLASS_SHIFT: u32 = 25;
/// Largest size class kept in the pool: the NBD maximum payload (32 MiB).
pub const MAX_POOLED_BYTES: usize = 1 << MAX_CLASS_SHIFT;
const CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;
/// Bytes each size class may keep cached: bounded so an idle daemon does not pin memory that a
/// burst of 32 MiB writes once needed, yet a steady QD32 of any one size never allocates.
const POOL_BYTES_PER_CLASS: usize = 64 << 20;
/// Buffers kept per class at minimum, so even the 32 MiB class caches a couple.
const POOL_MIN_PER_CLASS: usize = 2;

struct Raw {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: a `Raw` is a unique owner of its allocation; nothing else aliases it.
unsafe impl Send for Raw {}

static POOL: [Mutex<Vec<Raw>>; CLASSES] = [const { Mutex::new(Vec::new()) }; CLASSES];

fn class_of(cap: usize) -> Option<usize> {
    if !cap.is_power_of_two() {
        return None;
    }
    let shift = cap.trailing_zeros();
    (MIN_CLASS_SHIFT..=MAX_CLASS_SHIFT)
        .contains(&shift)
        .then(|| (shift - MIN_CLASS_SHIFT) as usize)
}

fn class_limit(class: usize) -> usize {
    (POOL_BYTES_PER_CLASS >> (class as u32 + MIN_CLASS_SHIFT)).max(POOL_MIN_PER_CLASS)
}

/// An aligned I/O buffer with a length (`len`) inside a larger capacity.
pub struct IoBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: `IoBuf` uniquely owns its allocation; shared access only hands out `&[u8]`.
unsafe impl Send for IoBuf {}
// SAFETY: as above; `&IoBuf` only permits reads.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A buffer of `len` bytes (contents unspecified: callers overwrite all of it).
    pub fn with_len(len: usize) -> IoBuf {
        let cap = len.max(1 << MIN_CLASS_SHIFT).next_power_of_two();
        let raw = class_of(cap)
            .and_then(|class| POOL[class].lock().ok().and_then(|mut list| list.pop()))
            .unwrap_or_else(|| Self::alloc(cap));
        IoBuf {
            ptr: raw.ptr,
            cap: raw.cap,
            len,
        }
    }

    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> IoBuf {
        let mut buf = Self::with_len(len);
        buf.as_mut_slice().fill(0);
        buf
    }

    fn alloc(cap: usize) -> Raw {
        let layout = match Layout::from_size_align(cap, BUF_ALIGN) {
            Ok(layout) => layout,
            Err(_) => std::alloc::handle_alloc_error(Layout::new::<u8>()),
        };
        // SAFETY: `layout` has non-zero size (cap >= 4096).
        let ptr = unsafe { alloc_zeroed(layout) };
        match NonNull::new(ptr) {
            Some(ptr) => Raw { ptr, cap },
            None => std::alloc::handle_alloc_error(layout),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length; panics if it exceeds the capacity (a caller bug, never input-driven:
    /// callers check lengths against limits before asking for a buffer).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "IoBuf::set_len {len} > capacity {}",
            self.cap
        );
        self.len = len;
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `cap >= len` initialised bytes, owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as `as_slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer for the engine; valid while the buffer is alive and not moved out of.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let raw = Raw {
            ptr: self.ptr,
            cap: self.cap,
        };
        if let Some(class) = class_of(self.cap) {
            if let Ok(mut list) = POOL[class].lock() {
                if list.len() < class_limit(class) {
                    list.push(raw);
                    return;
                }
            }
        }
        // SAFETY: allocated in `alloc` with exactly this size and alignment, and not pooled.
        unsafe {
            dealloc(
                raw.ptr.as_ptr(),
                Layout::from_size_align_unchecked(raw.cap, BUF_ALIGN),
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_sized() {
        for len in [0, 1, 4096, 4097, 1 << 20, (32 << 20) + 1] {
            let mut buf = IoBuf::with_len(len);
            assert_eq!(buf.len(), len);
            assert!(buf.capacity() >= len.max(4096));
            assert_eq!(buf.as_mut_ptr() as usize % BUF_ALIGN, 0);
            buf.as_mut_slice().fill(0xa5);
        }
    }

    #[test]
    fn reuse_keeps_capacity_class() {
        let a = IoBuf::with_len(5000);
        assert_eq!(a.capacity(), 8192);
        drop(a);
        let b = IoBuf::zeroed(8192);
        assert!(b.as_slice().iter().all(|&x| x == 0));
    }
}
