//! The proxy's allocator: mimalloc, asked through its plain calls for the usual alignments.
//!
//! mimalloc's Rust binding passes every allocation through `mi_malloc_aligned`, whose fast path
//! covers only small blocks that happen to be aligned: a larger one (hyper's read buffer, a
//! header map's growth) takes its generic path, and one whose size is not a power of two is
//! over-allocated and offset, even at alignment 1 (`cargo xtask profile`: about 1,600
//! instructions per new connection). Here a block aligned to at most 8 (every block mimalloc
//! hands out is), or to 16 with a size in multiples of 16 (mimalloc's size classes of such
//! sizes are multiples of 16), is a plain `mi_malloc`. A larger alignment (tokio's task cells,
//! 128) asks for a power-of-two size, up to mimalloc's small blocks, which mimalloc aligns
//! naturally.

use std::{
    alloc::{GlobalAlloc, Layout},
    ffi::c_void,
};

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc,
    mi_zalloc_aligned,
};

/// mimalloc's largest small block (128 words): blocks of a power-of-two size up to it are
/// aligned to their size.
const SMALL_MAX: usize = 128 * std::mem::size_of::<usize>();

pub struct MiMalloc;

/// Whether mimalloc's plain calls align a block of this size and alignment.
fn plain(size: usize, align: usize) -> bool {
    align <= 8 || (align <= 16 && size.is_multiple_of(16))
}

/// The size to ask for at an alignment above 16: the next power of two while it is a small
/// block (a task cell of 640 bytes at 128 becomes 1,024, taken from mimalloc's fast path).
fn aligned_size(size: usize, align: usize) -> usize {
    let pow2 = size.max(align).next_power_of_two();
    if pow2 <= SMALL_MAX {
        pow2
    } else {
        size
    }
}

unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: mimalloc's allocation calls take any size and a power-of-two alignment.
        unsafe {
            if plain(size, align) {
                mi_malloc(size).cast()
            } else {
                mi_malloc_aligned(aligned_size(size, align), align).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: as in `alloc`.
        unsafe {
            if plain(size, align) {
                mi_zalloc(size).cast()
            } else {
                mi_zalloc_aligned(aligned_size(size, align), align).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's promise); mimalloc frees any
        // of its blocks, aligned or not.
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's promise).
        unsafe {
            if plain(new_size, align) {
                mi_realloc(ptr.cast(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast(), aligned_size(new_size, align), align).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_has_its_alignment_and_keeps_its_bytes() {
        let a = MiMalloc;
        let sizes = [
            1, 7, 8, 16, 24, 40, 48, 100, 640, 1000, 1024, 4097, 8200, 70_000,
        ];
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in sizes {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a non-zero size; each block is freed once, with its layout.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xab, size);
                    let q = a.realloc(p, layout, size * 3);
                    assert_eq!(q as usize % align, 0, "grown: size {size} align {align}");
                    assert!(std::slice::from_raw_parts(q, size)
                        .iter()
                        .all(|&b| b == 0xab));
                    a.dealloc(q, Layout::from_size_align(size * 3, align).unwrap());
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "zeroed: size {size} align {align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }

    #[test]
    fn plain_blocks_of_sizes_in_sixteens_are_aligned_to_16() {
        let a = MiMalloc;
        for size in (16..=70_000).step_by(16) {
            let layout = Layout::from_size_align(size, 16).unwrap();
            // SAFETY: a non-zero size; each block is freed once, with its layout. Several
            // of a size are held at once, so that more than a page's first block is seen.
            unsafe {
                let blocks: Vec<*mut u8> = (0..3).map(|_| a.alloc(layout)).collect();
                for &p in &blocks {
                    assert_eq!(p as usize % 16, 0, "size {size}");
                }
                for p in blocks {
                    a.dealloc(p, layout);
                }
            }
        }
    }

    #[test]
    fn large_alignments_ask_for_a_small_power_of_two() {
        assert_eq!(aligned_size(640, 128), 1024);
        assert_eq!(aligned_size(8, 64), 64);
        assert_eq!(aligned_size(2000, 128), 2000);
        assert!(plain(24, 8) && plain(48, 16) && !plain(24, 16) && !plain(640, 128));
    }
}
