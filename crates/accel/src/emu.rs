//! emu accelerator (x86emu).
