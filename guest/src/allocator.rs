//! The component's memory allocator: free lists of power-of-two size classes.
//!
//! A plug-in call allocates a few dozen small blocks (header fields, address
//! strings, the lifted arguments and the result) and frees them all before it
//! returns. The system allocator of `wasm32-wasip2` (wasi-libc's dlmalloc)
//! spent a sixth of a 4 KB parse in `malloc` and `free`, about twice what
//! glibc takes natively. Here a small block is a pop or a push on the list of
//! its class, and a block that grows within its class is not moved.
//!
//! Blocks up to [`LARGEST`] bytes come from chunks taken from the system
//! allocator and stay in their class once freed, so the memory held is what
//! the busiest moment needed in each class. Larger blocks (message bodies,
//! queue files) and alignments above 16 go to the system allocator.
//!
//! A component instance runs on one thread (`wasm32-wasip2` has no threads),
//! which is what makes the unsynchronised state sound.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::ptr;

/// The smallest block: room for the free-list link, and the alignment every
/// block has.
const MIN_BLOCK: usize = 16;
/// The number of size classes: 16 bytes to 1 KiB. Messages (a 4 KB message
/// would take an 8 KiB block) stay with the system allocator, which fits
/// them exactly: a `deliver` call holds thousands of them, and rounding
/// them up raised the relay's peak RSS by a third.
const CLASSES: usize = 7;
/// The largest block served from the size classes.
pub const LARGEST: usize = MIN_BLOCK << (CLASSES - 1);
/// What is taken from the system allocator at a time for small blocks.
const CHUNK: usize = 64 << 10;

/// Free lists of power-of-two size classes over chunks of the system
/// allocator. Install it with `#[global_allocator]`.
pub struct SizeClasses {
    state: UnsafeCell<State>,
}

struct State {
    /// The head of each class's free list; a free block holds the next link.
    free: [*mut u8; CLASSES],
    /// The unused rest of the current chunk.
    next: *mut u8,
    end: *mut u8,
}

// SAFETY: a component instance is single-threaded (see the module comment),
// so the state is never reached from two threads.
unsafe impl Sync for SizeClasses {}

impl SizeClasses {
    /// An allocator that holds no memory yet.
    pub const fn new() -> Self {
        SizeClasses {
            state: UnsafeCell::new(State {
                free: [ptr::null_mut(); CLASSES],
                next: ptr::null_mut(),
                end: ptr::null_mut(),
            }),
        }
    }
}

impl Default for SizeClasses {
    fn default() -> Self {
        Self::new()
    }
}

/// The class of a block for `layout`, or `None` when the system allocator
/// serves it.
fn class_of(layout: Layout) -> Option<usize> {
    if layout.align() > MIN_BLOCK || layout.size() > LARGEST {
        return None;
    }
    let size = layout.size().max(MIN_BLOCK);
    // The smallest power of two that holds `size`, as a shift above 16.
    let bits = usize::BITS - (size - 1).leading_zeros();
    Some((bits - MIN_BLOCK.trailing_zeros()) as usize)
}

/// The size of the blocks of `class`.
const fn block_size(class: usize) -> usize {
    MIN_BLOCK << class
}

impl State {
    /// A block of `class`: the head of its free list, else carved from the
    /// current chunk.
    ///
    /// # Safety
    /// `class` is below [`CLASSES`].
    unsafe fn take(&mut self, class: usize) -> *mut u8 {
        let Some(head) = self.free.get_mut(class) else {
            return ptr::null_mut();
        };
        if !head.is_null() {
            let block = *head;
            // SAFETY: a block on a free list holds the link to the next one.
            *head = unsafe { block.cast::<*mut u8>().read() };
            return block;
        }
        let size = block_size(class);
        if (self.end as usize) - (self.next as usize) < size && !self.refill() {
            return ptr::null_mut();
        }
        let block = self.next;
        // SAFETY: the chunk has at least `size` bytes left (checked above).
        self.next = unsafe { block.add(size) };
        block
    }

    /// Put `block` on the free list of `class`.
    ///
    /// # Safety
    /// `block` was taken for `class` and is no longer used.
    unsafe fn give(&mut self, block: *mut u8, class: usize) {
        if let Some(head) = self.free.get_mut(class) {
            // SAFETY: the block is at least 16 bytes and 16-aligned.
            unsafe { block.cast::<*mut u8>().write(*head) };
            *head = block;
        }
    }

    /// Start a new chunk; the rest of the old one goes to the free lists.
    fn refill(&mut self) -> bool {
        let Ok(layout) = Layout::from_size_align(CHUNK, MIN_BLOCK) else {
            return false;
        };
        // SAFETY: the layout has a non-zero size.
        let chunk = unsafe { System.alloc(layout) };
        if chunk.is_null() {
            return false;
        }
        // The rest is a multiple of 16 bytes: carve it into the largest
        // blocks that fit, so that nothing is lost.
        let mut rest = (self.end as usize) - (self.next as usize);
        for class in (0..CLASSES).rev() {
            while rest >= block_size(class) {
                // SAFETY: the block lies within the old chunk's unused rest.
                unsafe { self.give(self.next, class) };
                self.next = unsafe { self.next.add(block_size(class)) };
                rest -= block_size(class);
            }
        }
        self.next = chunk;
        // SAFETY: the chunk is CHUNK bytes long.
        self.end = unsafe { chunk.add(CHUNK) };
        true
    }
}

unsafe impl GlobalAlloc for SizeClasses {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            // SAFETY: single-threaded (see the module comment), and the
            // class is in range.
            Some(class) => unsafe { (*self.state.get()).take(class) },
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            Some(_) => {
                // SAFETY: as `alloc`; a reused block holds old bytes, so it
                // is cleared.
                unsafe {
                    let block = self.alloc(layout);
                    if !block.is_null() {
                        ptr::write_bytes(block, 0, layout.size());
                    }
                    block
                }
            }
            // SAFETY: forwarded with the caller's guarantees; fresh memory
            // from the system allocator may need no clearing.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        match class_of(layout) {
            // SAFETY: `layout` is the one the block was allocated with, so
            // it maps to the same class.
            Some(class) => unsafe { (*self.state.get()).give(block, class) },
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { System.dealloc(block, layout) },
        }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return ptr::null_mut();
        };
        match (class_of(layout), class_of(new_layout)) {
            // Growing or shrinking within its class: the block already fits.
            (Some(old), Some(new)) if old == new => block,
            // SAFETY: both sizes belong to the system allocator.
            (None, None) => unsafe { System.realloc(block, layout, new_size) },
            _ => {
                // SAFETY: the caller's guarantees for `block` and `layout`;
                // the copy covers the smaller of the two sizes.
                unsafe {
                    let moved = self.alloc(new_layout);
                    if !moved.is_null() {
                        ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                        self.dealloc(block, layout);
                    }
                    moved
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_the_smallest_power_of_two_that_fits() {
        let class = |size, align| class_of(Layout::from_size_align(size, align).unwrap());
        assert_eq!(class(1, 1), Some(0));
        assert_eq!(class(16, 8), Some(0));
        assert_eq!(class(17, 1), Some(1));
        assert_eq!(class(32, 16), Some(1));
        assert_eq!(class(LARGEST, 1), Some(CLASSES - 1));
        assert_eq!(class(LARGEST + 1, 1), None);
        assert_eq!(class(8, 32), None);
    }

    #[test]
    fn blocks_are_reused_kept_in_place_and_never_overlap() {
        let heap = SizeClasses::new();
        let layout = |size| Layout::from_size_align(size, 8).unwrap();
        unsafe {
            // Fill blocks of every class with a pattern, past one chunk.
            let mut blocks = Vec::new();
            for round in 0..100u8 {
                for size in [1, 16, 17, 100, 500, 1000, LARGEST] {
                    let block = heap.alloc(layout(size));
                    assert!(!block.is_null());
                    assert_eq!(block as usize % MIN_BLOCK, 0);
                    ptr::write_bytes(block, round, size);
                    blocks.push((block, size, round));
                }
            }
            for &(block, size, round) in &blocks {
                let bytes = std::slice::from_raw_parts(block, size);
                assert!(bytes.iter().all(|&b| b == round), "a block was overwritten");
            }
            // Zeroed blocks are zero, also when reused.
            let (block, size, _) = blocks.pop().unwrap();
            heap.dealloc(block, layout(size));
            let zeroed = heap.alloc_zeroed(layout(size));
            assert_eq!(zeroed, block);
            assert!(
                std::slice::from_raw_parts(zeroed, size)
                    .iter()
                    .all(|&b| b == 0)
            );
            let large = heap.alloc_zeroed(layout(LARGEST * 2));
            assert!(
                std::slice::from_raw_parts(large, LARGEST * 2)
                    .iter()
                    .all(|&b| b == 0)
            );
            heap.dealloc(large, layout(LARGEST * 2));
            // A freed block is the next one of its class.
            let (block, size, _) = blocks.pop().unwrap();
            heap.dealloc(block, layout(size));
            assert_eq!(heap.alloc(layout(size)), block);
            // Growing within the class keeps the block; past it moves the
            // contents.
            let small = heap.alloc(layout(20));
            ptr::write_bytes(small, 7, 20);
            assert_eq!(heap.realloc(small, layout(20), 32), small);
            let moved = heap.realloc(small, layout(32), 33);
            assert_ne!(moved, small);
            assert!(
                std::slice::from_raw_parts(moved, 20)
                    .iter()
                    .all(|&b| b == 7)
            );
            // Large blocks go to the system allocator, both ways.
            let large = heap.alloc(layout(LARGEST * 4));
            ptr::write_bytes(large, 1, LARGEST * 4);
            let large = heap.realloc(large, layout(LARGEST * 4), 100);
            assert!(
                std::slice::from_raw_parts(large, 100)
                    .iter()
                    .all(|&b| b == 1)
            );
            heap.dealloc(large, layout(100));
        }
    }
}
