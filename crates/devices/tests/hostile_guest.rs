//! A hostile guest hammering every device with random port and MMIO accesses of every size:
//! nothing may panic, and the buses keep answering.

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use devices::{AcpiPm, Cmos, EmuIrqchip, GsiLine, IrqLine, MmioBus, PioBus, Serial, I8042};

struct Sink;
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn random_accesses_never_panic() {
    let t = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tc = t.clone();
    let clock: devices::Clock = Arc::new(move || tc.load(std::sync::atomic::Ordering::Relaxed));
    let chip = Arc::new(Mutex::new(EmuIrqchip::new(clock, 1_000_000_000)));
    let mut pio = PioBus::new();
    let mut mmio = MmioBus::new();
    EmuIrqchip::attach(&chip, &mut pio, &mut mmio).unwrap();
    let line: Arc<dyn IrqLine> = Arc::new(GsiLine::new(&chip, 4));
    let serial = Arc::new(Mutex::new(Serial::new(line, Box::new(Sink))));
    pio.insert(0x3f8, 8, serial.clone()).unwrap();
    let i8042 = Arc::new(Mutex::new(I8042::with_reset_flag(Arc::new(AtomicBool::new(false)))));
    pio.insert(0x60, 1, i8042.clone()).unwrap();
    pio.insert(0x64, 1, i8042).unwrap();
    pio.insert(0x70, 2, Arc::new(Mutex::new(Cmos::new(512 << 20, 0)))).unwrap();
    pio.insert(0x600, 6, Arc::new(Mutex::new(AcpiPm::new(Box::new(|| {}))))).unwrap();

    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let ports: [u16; 14] = [0x20, 0x21, 0xa0, 0xa1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x3f8, 0x3fd, 0x64, 0x71, 0x604];
    for i in 0..200_000u64 {
        t.store(i * 10_000, std::sync::atomic::Ordering::Relaxed);
        let size = [1usize, 2, 4, 8][(next() % 4) as usize];
        let mut buf = vec![0u8; size];
        let v = next().to_le_bytes();
        buf.copy_from_slice(&v[..size]);
        match next() % 4 {
            0 => {
                let p = ports[(next() % ports.len() as u64) as usize].wrapping_add((next() % 3) as u16);
                let _ = pio.write(p, &buf[..size.min(4)]);
            }
            1 => {
                let p = ports[(next() % ports.len() as u64) as usize];
                let _ = pio.read(p, &mut buf[..size.min(4)]);
            }
            2 => {
                let base = if next() % 2 == 0 { 0xfee0_0000 } else { 0xfec0_0000 };
                let _ = mmio.write(base + (next() % 0x1000), &buf);
            }
            _ => {
                let base = if next() % 2 == 0 { 0xfee0_0000 } else { 0xfec0_0000 };
                let _ = mmio.read(base + (next() % 0x1000), &mut buf);
            }
        }
        if i % 64 == 0 {
            let mut c = chip.lock().unwrap();
            let _ = c.poll(i * 10_000);
            if c.interrupt_pending() {
                let _ = c.acknowledge();
            }
            drop(c);
            serial.lock().unwrap().enqueue_input(b"x");
        }
    }
    // Still answering: the LAPIC version register reads back as documented.
    let mut ver = [0u8; 4];
    assert!(mmio.read(0xfee0_0030, &mut ver));
    assert_eq!(u32::from_le_bytes(ver) & 0xff, 0x14);
}
