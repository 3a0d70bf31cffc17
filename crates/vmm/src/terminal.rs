//! The host terminal of an interactive console (`rustvisor run --serial stdio`,
//! `rustvisor vm console`).

/// Puts the terminal on standard input in raw mode while alive (so keys, Ctrl-C included,
/// reach the guest unprocessed); output keeps its newline translation. Restores the previous
/// mode when dropped. Does nothing when standard input is not a terminal.
pub struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    /// Switches standard input to raw mode if it is a terminal.
    pub fn enable() -> RawTerminal {
        // SAFETY: isatty only inspects the file descriptor.
        if unsafe { libc::isatty(0) } != 1 {
            return RawTerminal(None);
        }
        // SAFETY: termios is plain old data; tcgetattr fills it for fd 0, a terminal.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal and `t` is a valid termios.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return RawTerminal(None);
        }
        let saved = t;
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut t) };
        t.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: applies a valid termios to fd 0.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        RawTerminal(Some(saved))
    }

    /// Whether standard input is a terminal now in raw mode.
    pub fn is_raw(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            // SAFETY: restores the termios saved from fd 0.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}
