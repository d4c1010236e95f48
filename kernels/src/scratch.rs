//! Per-thread scratch buffers that grow once and are reused, so that kernels called every
//! training step allocate nothing after the first steps.
//!
//! A buffer is taken out of its thread-local slot for the duration of a call and put back
//! afterwards; a nested call on the same thread (a rayon worker that steals another kernel's
//! task while it waits) finds the slot empty and uses a fresh buffer instead of aliasing.

use crate::simd::{F32s, LANES};
use std::cell::Cell;
use std::thread::LocalKey;

pub(crate) type Slot = Cell<Vec<F32s>>;

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
    let vectors = len.div_ceil(LANES);
    if buf.len() < vectors {
        buf.resize(vectors, F32s::splat(0.0));
    }
    // SAFETY: F32s is LANES contiguous f32 values with no padding, so `vectors` of them are
    // `vectors * LANES >= len` valid, initialised floats, exclusively borrowed through `buf`.
    let floats = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<f32>(), len) };
    let r = f(floats);
    slot.set(buf);
    r
}
