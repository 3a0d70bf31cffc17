//! Code memory of the translation tier: one region of shared anonymous memory mapped
//! twice, read-write where Cranelift writes code and read-execute where it runs (QEMU's
//! split-wx code buffer), so that no page is ever writable and executable at once and
//! finishing code needs no system call.
//!
//! Cranelift's own providers map the new code read-write and `mprotect` it to
//! read-execute when it is finalized: a system call and a TLB shootdown (an IPI to every
//! core running a thread of the process: the vCPU's) per finalization, and a fresh
//! mapping for the next function after each one. Here finalization is free, so the
//! compiler thread hands every block over as soon as it is compiled.

use cranelift_jit::{BranchProtection, JITMemoryKind, JITMemoryProvider};
use cranelift_module::ModuleResult;
use std::io;
use std::ptr::NonNull;

/// A region of `size` bytes mapped read-write at `rw` and read-execute at `rx`, filled
/// from the start up to `pos`.
pub(crate) struct DualMapped {
    rw: NonNull<u8>,
    rx: NonNull<u8>,
    size: usize,
    pos: usize,
}

// SAFETY: the region is owned by this value alone (the module that holds it); the raw
// pointers are addresses of mappings, not references into another thread's data.
unsafe impl Send for DualMapped {}

impl DualMapped {
    /// Maps `size` bytes (rounded up to 4 KiB pages), reserved but not committed: pages are
    /// allocated as code is written. Errors: the `mmap`, `mremap` or `mprotect` failure.
    pub(crate) fn new(size: usize) -> io::Result<DualMapped> {
        let size = size.checked_next_multiple_of(4096).ok_or_else(|| io::Error::other("code memory size"))?;
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses; no existing
        // memory is affected.
        let rw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if rw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // mremap(2): an old size of 0 on a shared mapping creates a second mapping of the
        // same pages.
        // SAFETY: `rw` is the shared mapping of `size` bytes made above; MREMAP_MAYMOVE lets
        // the kernel place the new mapping anywhere free.
        let rx = unsafe { libc::mremap(rw, 0, size, libc::MREMAP_MAYMOVE) };
        let unmap = |p: *mut libc::c_void| {
            // SAFETY: `p` is one of the mappings of `size` bytes made here, not used since.
            unsafe { libc::munmap(p, size) };
        };
        if rx == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            unmap(rw);
            return Err(e);
        }
        // SAFETY: `rx` is the second mapping made above, `size` bytes long.
        if unsafe { libc::mprotect(rx, size, libc::PROT_READ | libc::PROT_EXEC) } != 0 {
            let e = io::Error::last_os_error();
            unmap(rx);
            unmap(rw);
            return Err(e);
        }
        match (NonNull::new(rw.cast::<u8>()), NonNull::new(rx.cast::<u8>())) {
            (Some(rw), Some(rx)) => Ok(DualMapped { rw, rx, size, pos: 0 }),
            _ => Err(io::Error::other("mmap returned a null mapping")),
        }
    }

    /// What to add to the address of code written (as Cranelift reports it) to get the
    /// address it runs at.
    pub(crate) fn exec_offset(&self) -> isize {
        // Exposed: code addresses are made from this offset (`super::CodeModule::entry`).
        let rx = self.rx.as_ptr().expose_provenance();
        rx.wrapping_sub(self.rw.as_ptr().expose_provenance()).cast_signed()
    }
}

impl DualMapped {
    /// The read-write address of `len` bytes of allocated code at `exec` (an address in the
    /// read-execute view), if they lie in what was allocated.
    pub(crate) fn writable(&self, exec: u64, len: usize) -> Option<*mut u8> {
        let rx = self.rx.as_ptr().expose_provenance() as u64;
        let off = usize::try_from(exec.checked_sub(rx)?).ok()?;
        if off.checked_add(len)? > self.pos {
            return None;
        }
        // SAFETY: off + len <= pos <= size: inside the read-write mapping.
        Some(unsafe { self.rw.as_ptr().add(off) })
    }
}

impl JITMemoryProvider for DualMapped {
    /// Room for `size` bytes of code aligned to `align` in the read-write view. Errors:
    /// `Unsupported` for data (the translation tier defines none), `InvalidInput` for an
    /// alignment that is not a power of two, `OutOfMemory` when the region is full (the
    /// block is then not compiled).
    fn allocate(&mut self, size: usize, align: u64, kind: JITMemoryKind) -> io::Result<*mut u8> {
        if !matches!(kind, JITMemoryKind::Executable) {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "data objects in code memory"));
        }
        let Some(align) = usize::try_from(align).ok().filter(|a| a.is_power_of_two()) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "code alignment not a power of two"));
        };
        let start = self.pos.checked_next_multiple_of(align);
        let end = start.and_then(|s| s.checked_add(size)).filter(|&e| e <= self.size);
        let (Some(start), Some(end)) = (start, end) else {
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, "translation-tier code memory full"));
        };
        self.pos = end;
        // SAFETY: start + size <= self.size: inside the read-write mapping.
        Ok(unsafe { self.rw.as_ptr().add(start) })
    }

    /// Forgets every allocation: the memory is returned when the module (and with it this
    /// region) is dropped right after (`JITModule::free_memory` consumes the module).
    unsafe fn free_memory(&mut self) {
        self.pos = 0;
    }

    /// Nothing to do: the code is already mapped executable at `rx` (x86 keeps instruction
    /// fetches coherent with stores, and the code reaches the vCPU through a channel or the
    /// vCPU's own thread, after it is written).
    fn finalize(&mut self, _: BranchProtection) -> ModuleResult<()> {
        Ok(())
    }
}

impl Drop for DualMapped {
    fn drop(&mut self) {
        for p in [self.rw, self.rx] {
            // SAFETY: both mappings were made in `new` with `size` bytes and are unmapped
            // once, here; the module that owned this region runs no code any more (its
            // owner freed it: see `super::Jit::free_module` and the compiler thread).
            unsafe { libc::munmap(p.as_ptr().cast(), self.size) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_written_read_write_is_seen_read_execute_and_space_is_bounded() {
        let mut m = DualMapped::new(8192).expect("map");
        let a = m.allocate(100, 16, JITMemoryKind::Executable).expect("first");
        let b = m.allocate(100, 64, JITMemoryKind::Executable).expect("second");
        assert_eq!(b as usize % 64, 0);
        assert!(b as usize >= a as usize + 100);
        // SAFETY: `a` has room for 100 bytes in the read-write view.
        unsafe { a.write(0xc3) };
        let x = (a as isize + m.exec_offset()) as *const u8;
        // SAFETY: `x` is the same byte through the read-execute view (readable).
        assert_eq!(unsafe { x.read_volatile() }, 0xc3);
        assert!(m.allocate(8000, 16, JITMemoryKind::Executable).is_err(), "past the end");
        assert!(m.allocate(16, 16, JITMemoryKind::Writable).is_err(), "data");
        // SAFETY: nothing allocated is used after this.
        unsafe { m.free_memory() };
        assert_eq!(m.allocate(8000, 16, JITMemoryKind::Executable).ok(), Some(m.rw.as_ptr()));
    }
}
