//! A device worker thread: an epoll loop over the queues' kick eventfds, a stop eventfd and
//! whatever host file descriptors the device adds (TAP, Unix sockets).
//!
//! Tokens: queue `i`'s kick is token `i`; the device picks its own tokens from
//! [`FIRST_DEVICE_TOKEN`] up.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// First epoll token a device may use for its own file descriptors.
pub const FIRST_DEVICE_TOKEN: u64 = 1 << 32;
const STOP_TOKEN: u64 = u64::MAX;

/// Adds and removes a device's own file descriptors on the worker's epoll set.
pub struct EpollCtl<'a> {
    epoll: &'a Epoll,
}

impl EpollCtl<'_> {
    /// Watches `fd` for `events`, reporting them with `token` (≥ [`FIRST_DEVICE_TOKEN`]).
    pub fn add(&self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }
    /// Changes the events watched on `fd`.
    pub fn modify(&self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }
    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// The device side of a worker.
pub trait Handler: Send + 'static {
    /// Called once on the worker thread before the loop: register host fds here.
    fn init(&mut self, _ctl: &EpollCtl) -> io::Result<()> {
        Ok(())
    }
    /// The driver kicked queue `queue` (its eventfd is already drained).
    fn queue_event(&mut self, queue: usize, ctl: &EpollCtl);
    /// A device fd registered with `token` is ready with `events`.
    fn fd_event(&mut self, _token: u64, _events: EventSet, _ctl: &EpollCtl) {}
}

/// A running worker thread; stopping (or dropping) it joins the thread.
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts thread `name` serving `handler`, with `queue_evts[i]` as queue `i`'s kick.
    ///
    /// Errors: the epoll set, eventfd or thread could not be created.
    pub fn spawn<H: Handler>(name: &str, queue_evts: Vec<EventFd>, mut handler: H) -> io::Result<Worker> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_in = stop.try_clone()?;
        let epoll = Epoll::new()?;
        for (i, e) in queue_evts.iter().enumerate() {
            epoll.ctl(ControlOperation::Add, e.as_raw_fd(), EpollEvent::new(EventSet::IN, i as u64))?;
        }
        epoll.ctl(ControlOperation::Add, stop_in.as_raw_fd(), EpollEvent::new(EventSet::IN, STOP_TOKEN))?;
        let thread = std::thread::Builder::new().name(name.to_string()).spawn(move || {
            let ctl = EpollCtl { epoll: &epoll };
            if let Err(e) = handler.init(&ctl) {
                tracing::error!("virtio worker: setting up host fds failed: {e}");
                return;
            }
            let mut events = vec![EpollEvent::default(); 32];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!("virtio worker: epoll_wait: {e}");
                        return;
                    }
                };
                for ev in &events[..n] {
                    match ev.data() {
                        STOP_TOKEN => return,
                        q if q < FIRST_DEVICE_TOKEN => {
                            if let Some(e) = queue_evts.get(q as usize) {
                                let _ = e.read();
                                handler.queue_event(q as usize, &ctl);
                            }
                        }
                        t => handler.fd_event(t, ev.event_set(), &ctl),
                    }
                }
            }
        })?;
        Ok(Worker { stop, thread: Some(thread) })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}
