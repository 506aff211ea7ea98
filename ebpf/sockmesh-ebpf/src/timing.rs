//! Section timing (see `sockmesh_common::timing`): on only when the agent sets
//! `SOCKMESH_TIMING` (`--section-timing`). Off, every call here is a branch on a constant that
//! the verifier removes with the code behind it.

use aya_ebpf::{helpers::generated::bpf_ktime_get_ns, macros::map, maps::PerCpuArray};
pub use sockmesh_common::timing::Section;
use sockmesh_common::timing::SECTIONS;

/// The node's timing switch, set by the agent when it loads the programs (1: on).
#[no_mangle]
pub static SOCKMESH_TIMING: u8 = 0;

/// Nanoseconds of each section at its index, its runs at index + `SECTIONS`.
#[map(name = "SM_TIMING")]
static TIMING: PerCpuArray<u64> = PerCpuArray::with_max_entries(2 * SECTIONS, 0);

/// A point in time to measure a section from (0 when timing is off).
#[derive(Clone, Copy)]
pub struct Stamp(u64);

/// Whether timing is on: a constant to the verifier, so a branch on it is removed when off.
#[inline(always)]
pub fn on() -> bool {
    (unsafe { core::ptr::read_volatile(&SOCKMESH_TIMING) }) != 0
}

/// Now, if timing is on.
#[inline(always)]
pub fn start() -> Stamp {
    if !on() {
        return Stamp(0);
    }
    Stamp(unsafe { bpf_ktime_get_ns() })
}

/// Add the time since `since` to `section` and count a run of it; returns now, the start of
/// the next section.
#[inline(always)]
pub fn lap(section: Section, since: Stamp) -> Stamp {
    if !on() {
        return since;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let i = section as u32;
    if let Some(ns) = TIMING.get_ptr_mut(i) {
        unsafe { *ns += now.wrapping_sub(since.0) };
    }
    if let Some(runs) = TIMING.get_ptr_mut(i + SECTIONS) {
        unsafe { *runs += 1 };
    }
    Stamp(now)
}
