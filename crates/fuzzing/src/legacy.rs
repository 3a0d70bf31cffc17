//! The `legacy_devices` target: the PC devices the VMM puts on the port and MMIO buses,
//! wired as the `emu` accelerator wires them: 16550 serial port (COM1), i8042, CMOS/RTC,
//! ACPI PM1 (event and control blocks), PCI conf1 with the host bridge, and the userspace
//! interrupt controllers (8259A pair and ELCR, 8254 PIT and port 0x61, IOAPIC, one xAPIC per
//! vCPU, two vCPUs) on a clock the input moves forward.
//!
//! Input: a list of 8-byte operations (kind, size, `u16` address, `u32` value); sizes are
//! `1 << (size % 3)` bytes for ports and `1 << (size % 4)` for MMIO. A port is
//! `address & 0x7fff` when bit 15 is set, else an entry of a table of the devices' ports.
//!
//! Kinds (`kind % 12`): 0 port read, 1 port write, 2/3 LAPIC page read/write (vCPU 0, offset
//! `address & 0xfff`), 4/5 IOAPIC window read/write (offset `address & 0xff`), 6 time
//! passes by `value` ns and the timers are polled, 7 GSI `address % 24` set to level
//! `value & 1`, 8 an MSI (address `0xfee0_0000 | (address << 4)`, data `value`), 9 interrupt
//! acknowledge cycles on both vCPUs, NMIs and start-up IPIs taken, 10 serial input bytes
//! (`value`'s low `size` bytes), 11 every device's state saved and restored (a restore of a
//! state the device saved must succeed), 12/13 LAPIC read/write on vCPU 1.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use devices::{AcpiPm, Cmos, EmuIrqchip, MmioBus, NoIrq, PciBus, PioBus, Serial, I8042};

use crate::Input;

/// The ports the table part of an address picks from.
const PORTS: &[u16] = &[
    0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x60, 0x64, 0x70, 0x71, 0x3f8, 0x3f9, 0x3fa,
    0x3fb, 0x3fc, 0x3fd, 0x3fe, 0x3ff, 0x600, 0x601, 0x602, 0x603, 0x604, 0x605, 0xcf8, 0xcf9, 0xcfa, 0xcfb, 0xcfc,
    0xcfd, 0xcfe, 0xcff,
];
const LAPIC_BASE: u64 = 0xfee0_0000;
const IOAPIC_BASE: u64 = 0xfec0_0000;

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs one input (see the module documentation).
pub fn run(data: &[u8]) {
    let now = Arc::new(AtomicU64::new(1_000_000));
    let t = now.clone();
    let clock: devices::Clock = Arc::new(move || t.load(Ordering::Relaxed));
    let chip = Arc::new(Mutex::new(EmuIrqchip::with_cpus(clock, 1_000_000_000, 2)));
    let (mut pio, mut mmio) = (PioBus::new(), MmioBus::new());
    if EmuIrqchip::attach(&chip, &mut pio, &mut mmio).is_err() {
        return;
    }
    let serial = Arc::new(Mutex::new(Serial::new(Arc::new(NoIrq), Box::new(std::io::sink()))));
    let i8042 = Arc::new(Mutex::new(I8042::new(Box::new(|| {}))));
    let pm = Arc::new(Mutex::new(AcpiPm::new(Box::new(|| {}))));
    let cmos = Arc::new(Mutex::new(Cmos::new(0xc000_0000, 1 << 32)));
    let pci = Arc::new(Mutex::new(PciBus::new()));
    let wired = [
        pio.insert(0x3f8, 8, serial.clone()),
        pio.insert(0x60, 1, i8042.clone()),
        pio.insert(0x64, 1, i8042.clone()),
        pio.insert(devices::acpi_pm::PM1A_EVT_BLK, 6, pm.clone()),
        pio.insert(0x70, 2, cmos.clone()),
        pio.insert(devices::pci::CONF1_PORT, devices::pci::CONF1_LEN, pci),
    ];
    if wired.iter().any(Result::is_err) {
        return;
    }
    let mut i = Input::new(data);
    while !i.is_empty() {
        let kind = i.u8() % 14;
        let size_byte = i.u8();
        let addr = i.u16();
        let value = i.u32();
        let port = if addr & 0x8000 != 0 {
            addr & 0x7fff
        } else {
            PORTS.get(usize::from(addr) % PORTS.len()).copied().unwrap_or(0x80)
        };
        let pio_size = 1usize << (size_byte % 3);
        let mmio_size = 1usize << (size_byte % 4);
        let bytes = u64::from(value).to_le_bytes();
        let mut buf = [0u8; 8];
        match kind {
            0 => {
                pio.read(port, buf.get_mut(..pio_size).unwrap_or_default());
            }
            1 => {
                pio.write(port, bytes.get(..pio_size).unwrap_or_default());
            }
            2 => {
                mmio.read(LAPIC_BASE + u64::from(addr & 0xfff), buf.get_mut(..mmio_size).unwrap_or_default());
            }
            3 => {
                mmio.write(LAPIC_BASE + u64::from(addr & 0xfff), bytes.get(..mmio_size).unwrap_or_default());
            }
            4 => {
                mmio.read(IOAPIC_BASE + u64::from(addr & 0xff), buf.get_mut(..mmio_size).unwrap_or_default());
            }
            5 => {
                mmio.write(IOAPIC_BASE + u64::from(addr & 0xff), bytes.get(..mmio_size).unwrap_or_default());
            }
            6 => {
                let t = now.fetch_add(u64::from(value), Ordering::Relaxed) + u64::from(value);
                let mut c = lock(&chip);
                let _ = c.poll(t);
                let _ = c.poll_cpu(1, t);
            }
            7 => lock(&chip).set_irq(u32::from(addr) % 24, value & 1 != 0),
            8 => {
                let _ = lock(&chip).deliver_msi(LAPIC_BASE | (u64::from(addr) << 4), value);
            }
            9 => {
                let mut c = lock(&chip);
                let _ = c.interrupt_pending();
                let _ = c.acknowledge();
                let _ = c.acknowledge_for(1);
                let _ = c.take_nmi();
                let _ = c.take_nmi_for(1);
                let _ = c.take_startup(0);
                let _ = c.take_startup(1);
                let _ = c.take_kicks();
            }
            10 => {
                let _ = lock(&serial).enqueue_input(bytes.get(..pio_size).unwrap_or_default());
            }
            11 => round_trip(&chip, &serial, &i8042, &pm, &cmos),
            12 => {
                lock(&chip).lapic_read(1, u64::from(addr & 0xfff), buf.get_mut(..mmio_size.min(4)).unwrap_or_default())
            }
            _ => lock(&chip).lapic_write(1, u64::from(addr & 0xfff), bytes.get(..mmio_size.min(4)).unwrap_or_default()),
        }
    }
}

/// Saves every device's state and restores it: the devices must accept what they saved.
fn round_trip(
    chip: &Mutex<EmuIrqchip>,
    serial: &Mutex<Serial>,
    i8042: &Mutex<I8042>,
    pm: &Mutex<AcpiPm>,
    cmos: &Mutex<Cmos>,
) {
    let s = lock(chip).state();
    if let Err(e) = lock(chip).restore(&s) {
        panic!("the irqchip refused its own state: {e}");
    }
    let s = lock(serial).state();
    if let Err(e) = lock(serial).restore(&s) {
        panic!("the serial port refused its own state: {e}");
    }
    let s = lock(i8042).state();
    if let Err(e) = lock(i8042).restore(&s) {
        panic!("the i8042 refused its own state: {e}");
    }
    let s = lock(pm).state();
    if let Err(e) = lock(pm).restore(&s) {
        panic!("ACPI PM refused its own state: {e}");
    }
    let s = lock(cmos).state();
    if let Err(e) = lock(cmos).restore(&s) {
        panic!("the CMOS refused its own state: {e}");
    }
}
