//! Weight storage on 2 MiB pages. A decode step streams every quantized matrix (~110 MB on the
//! default model): on 4 KiB pages that is ~27k TLB misses a step, whose page walks hold up the
//! prefetches the kernels depend on. Linux backs memory with transparent huge pages when it asks for them
//! (`madvise`, THP's default mode). One layer's matrices are far smaller than a page, so
//! matrices are packed into shared regions; a region is freed with the last slice in it.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::ops::Deref;
use std::sync::{Arc, Mutex};

const PAGE: usize = 2 << 20;
/// Region size: whole pages, and room for a layer's worth of matrices.
const REGION: usize = 16 * PAGE;
/// Slices start on a cache line.
const ALIGN: usize = 64;

struct Region {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: a region is plain memory; its bytes are written once, before any slice of it is shared.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    fn new(bytes: usize) -> Arc<Self> {
        let layout = Layout::from_size_align(bytes.max(1).next_multiple_of(PAGE), PAGE)
            .expect("weight region size");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc(layout) };
        if ptr.is_null() {
            handle_alloc_error(layout);
        }
        // Advice only: without THP the region simply stays on small pages.
        #[cfg(target_os = "linux")]
        // SAFETY: the range is this allocation, page-aligned.
        unsafe {
            libc::madvise(ptr.cast(), layout.size(), libc::MADV_HUGEPAGE);
        }
        Arc::new(Self { ptr, layout })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// The region being filled, and its first free byte.
static FILLING: Mutex<Option<(Arc<Region>, usize)>> = Mutex::new(None);

/// An immutable copy of a slice, in a huge-page region.
pub struct HugeSlice<T> {
    /// Keeps the memory alive.
    _region: Arc<Region>,
    ptr: *const T,
    len: usize,
}

// SAFETY: the slice is immutable and owns (a share of) its memory, like `Arc<[T]>`.
unsafe impl<T: Sync> Send for HugeSlice<T> {}
unsafe impl<T: Sync> Sync for HugeSlice<T> {}

impl<T: Copy> HugeSlice<T> {
    pub fn copy_of(values: &[T]) -> Self {
        assert!(std::mem::align_of::<T>() <= ALIGN);
        let bytes = std::mem::size_of_val(values);
        let (region, at) = if bytes > REGION / 2 {
            // A large matrix (the output layer) gets a region of its own.
            (Region::new(bytes), 0)
        } else {
            let mut filling = FILLING.lock().unwrap_or_else(|e| e.into_inner());
            let fits = |(_, free): &(Arc<Region>, usize)| free + bytes <= REGION;
            if !filling.as_ref().is_some_and(fits) {
                *filling = Some((Region::new(REGION), 0));
            }
            let (region, free) = filling.as_mut().expect("a region is filling");
            let at = *free;
            *free = (at + bytes).next_multiple_of(ALIGN);
            (region.clone(), at)
        };
        // SAFETY: bytes at..at+bytes of the region are in bounds, aligned for T, and handed out
        // to this slice alone.
        let ptr = unsafe {
            let ptr = region.ptr.add(at).cast::<T>();
            std::ptr::copy_nonoverlapping(values.as_ptr(), ptr, values.len());
            ptr
        };
        Self {
            _region: region,
            ptr,
            len: values.len(),
        }
    }
}

impl<T> Deref for HugeSlice<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: `ptr..ptr+len` was initialised in `copy_of` and lives as long as `region`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_keep_their_values_and_alignment() {
        let small: Vec<u32> = (0..1000).collect();
        // Just over half a region: a region of its own.
        let large: Vec<u16> = (0..REGION / 4 + 1).map(|i| i as u16).collect();
        let copies = [
            HugeSlice::copy_of(&small),
            HugeSlice::copy_of(&small[..3]),
            HugeSlice::copy_of(&small[..0]),
        ];
        let big = HugeSlice::copy_of(&large);
        assert_eq!(&copies[0][..], &small[..]);
        assert_eq!(&copies[1][..], &small[..3]);
        assert!(copies[2].is_empty());
        assert_eq!(&big[..], &large[..]);
        for c in &copies {
            assert_eq!(c.as_ptr() as usize % ALIGN, 0);
        }
        // The large copy starts a region of its own.
        assert_eq!(big.as_ptr() as usize % PAGE, 0);
    }
}
