//! Per-thread scratch buffers that grow once and are reused, so that kernels called every
//! training step allocate nothing after the first steps.
//!
//! A buffer is taken out of its thread-local slot for the duration of a call and put back
//! afterwards; a nested call on the same thread (a rayon worker that steals another kernel's
//! task while it waits) finds the slot empty and uses a fresh buffer instead of aliasing.

use crate::simd::MAX_LANES;
use std::cell::Cell;
use std::thread::LocalKey;

/// A cache line of floats: the unit of the buffers, so that they are aligned for any vector.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line([f32; MAX_LANES]);

pub(crate) type Slot = Cell<Vec<Line>>;

thread_local! {
    pub(crate) static PACK_A: Slot = const { Cell::new(Vec::new()) };
    pub(crate) static PACK_B: Slot = const { Cell::new(Vec::new()) };
    pub(crate) static PARTIALS: Slot = const { Cell::new(Vec::new()) };
    pub(crate) static EMB_ROW: Slot = const { Cell::new(Vec::new()) };
}

/// Runs `f` with a vector-aligned scratch slice of exactly `len` floats (contents unspecified).
pub(crate) fn with_scratch<R>(
    slot: &'static LocalKey<Slot>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    let mut buf = slot.take();
    let lines = len.div_ceil(MAX_LANES);
    if buf.len() < lines {
        buf.resize(lines, Line([0.0; MAX_LANES]));
    }
    // SAFETY: Line is MAX_LANES contiguous f32 values with no padding, so `lines` of them are
    // `lines * MAX_LANES >= len` valid, initialised floats, exclusively borrowed through `buf`.
    let floats = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<f32>(), len) };
    let r = f(floats);
    slot.set(buf);
    r
}
