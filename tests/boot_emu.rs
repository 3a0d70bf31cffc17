//! Boots the stock Debian kernel (fetched by scripts/setup-guest.sh) on the `emu`
//! accelerator, through both entry paths, and checks what the guest's userspace prints.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guest")
}

fn guest_file(name: &str) -> PathBuf {
    let p = guest_dir().join(name);
    assert!(p.exists(), "{} is missing: run scripts/setup-guest.sh first (scripts/test.sh does)", p.display());
    p
}

/// Runs `rustvisor run` on emu with the serial console going to a file; returns
/// (exit status, console text, stderr).
fn boot(kernel: &str, cmdline: &str, tag: &str) -> (i32, String, String) {
    let log = std::env::temp_dir().join(format!("rv-boot-{}-{tag}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_rustvisor"))
        .args(["run", "--kernel"])
        .arg(guest_file(kernel))
        .arg("--initrd")
        .arg(guest_file("initrd.img"))
        .args(["--cmdline", cmdline, "--memory", "512M", "--accel", "emu", "--serial"])
        .arg(format!("file={}", log.display()))
        .output()
        .expect("spawn rustvisor");
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    eprintln!("{tag}: {:.1} s wall", start.elapsed().as_secs_f64());
    (out.status.code().unwrap_or(-1), console, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs `rustvisor run` on emu with `cpus` vCPUs and `script` as the guest's shell script
/// (`rv.cmd`); returns (exit status, console text, stderr).
fn boot_smp(cpus: u8, script: &str, tag: &str) -> (i32, String, String) {
    use base64_script as b64;
    let cmdline = format!("console=ttyS0 panic=-1 rv.cmd={}", b64::encode(script.as_bytes()));
    let log = std::env::temp_dir().join(format!("rv-boot-{}-{tag}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_rustvisor"))
        .args(["run", "--kernel"])
        .arg(guest_file("vmlinuz"))
        .arg("--initrd")
        .arg(guest_file("initrd.img"))
        .args(["--cmdline", &cmdline, "--memory", "512M", "--accel", "emu", "--cpus", &cpus.to_string(), "--serial"])
        .arg(format!("file={}", log.display()))
        .output()
        .expect("spawn rustvisor");
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    eprintln!("{tag}: {:.1} s wall", start.elapsed().as_secs_f64());
    (out.status.code().unwrap_or(-1), console, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Base64 for `rv.cmd` (the guest's init decodes it with busybox `base64 -d`).
mod base64_script {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(data: &[u8]) -> String {
        let mut out = String::new();
        for c in data.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

/// The SMP workload: reports `nproc`, the online CPUs and /proc/cpuinfo's count, then runs
/// one busy loop pinned to each CPU (`taskset`) and reports each CPU's busy ticks from
/// /proc/stat over that time; then `rv-atomic` (scripts/guest/rv-atomic.c) counts with
/// locked instructions from one thread per vCPU, `rv-xmodify` (scripts/guest/rv-xmodify.c)
/// patches a function on CPU 0 that CPU 1 keeps calling, and SysRq l sends NMIs.
const SMP_WORKLOAD: &str = r#"N=$(nproc)
echo "RV-NPROC $N"
echo "RV-ONLINE $(cat /sys/devices/system/cpu/online)"
echo "RV-CPUINFO $(grep -c ^processor /proc/cpuinfo)"
echo "RV-FLAGS $(grep -m1 ^flags /proc/cpuinfo | cut -d: -f2) "
grep '^cpu[0-9]' /proc/stat > /tmp/s0
i=0
while [ $i -lt $N ]; do
  taskset -c $i sh -c 'n=0; while [ $n -lt 20000 ]; do n=$((n+1)); done; echo RV-LOOP-DONE' &
  i=$((i+1))
done
wait
grep '^cpu[0-9]' /proc/stat > /tmp/s1
awk 'NR==FNR{u[$1]=$2+$3+$4;next}{print "RV-STAT",$1,$2+$3+$4-u[$1]}' /tmp/s0 /tmp/s1
rv-atomic $N 1000000
rv-xmodify 1000
taskset -c 0 sh -c 'echo l > /proc/sysrq-trigger'
grep '^ *NMI:' /proc/interrupts | sed 's/^ */RV-NMI /'
echo RV-SMP-DONE
"#;

fn check_smp(cpus: u8) {
    let (code, console, stderr) = boot_smp(cpus, SMP_WORKLOAD, &format!("smp{cpus}"));
    let console = console.replace('\r', "");
    let tail: String =
        console.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    assert!(console.contains("RV-SMP-DONE"), "workload did not finish; stderr: {stderr}\n{tail}");
    assert!(console.contains(&format!("smp: Brought up 1 node, {cpus} CPUs")), "{tail}");
    assert!(console.contains(&format!("RV-NPROC {cpus}\n")), "nproc; {tail}");
    assert!(console.contains(&format!("RV-ONLINE 0-{}\n", cpus - 1)), "online CPUs; {tail}");
    assert!(console.contains(&format!("RV-CPUINFO {cpus}\n")), "/proc/cpuinfo; {tail}");
    assert_eq!(console.matches("RV-LOOP-DONE").count(), usize::from(cpus), "{tail}");
    // Every CPU was busy (user + nice + system ticks at USER_HZ 100) while the loops ran.
    for cpu in 0..cpus {
        let line = console
            .lines()
            .find(|l| l.starts_with(&format!("RV-STAT cpu{cpu} ")))
            .unwrap_or_else(|| panic!("no /proc/stat line for cpu{cpu}; {tail}"));
        let ticks: u64 = line.rsplit(' ').next().and_then(|t| t.trim().parse().ok()).unwrap_or(0);
        assert!(ticks >= 20, "cpu{cpu} did not run the workload ({line}); {tail}");
    }
    // The x86-64-v2 CPU model with AES-NI, PCLMULQDQ, RDRAND, RDSEED and MOVBE: every one
    // of these flags the host has, the guest's /proc/cpuinfo lists.
    let host = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let host_flags = host.lines().find(|l| l.starts_with("flags")).unwrap_or("").to_string() + " ";
    let guest_flags = console.lines().find(|l| l.starts_with("RV-FLAGS ")).unwrap_or_else(|| panic!("{tail}"));
    for f in ["pni", "ssse3", "sse4_1", "sse4_2", "popcnt", "cx16", "aes", "pclmulqdq", "rdrand", "rdseed", "movbe"] {
        if host_flags.contains(&format!(" {f} ")) {
            assert!(guest_flags.contains(&format!(" {f} ")), "guest flags lack {f}: {guest_flags}");
        }
    }
    // With RDRAND the kernel's CRNG is seeded during early boot (it took ~43 s of jitter
    // entropy without): before init runs.
    let crng = console.find("random: crng init done");
    let init = console.find("Run /init as init process");
    assert!(crng.is_some() && crng < init, "crng init done before /init; {tail}");
    // N threads, one per vCPU, each 1,000,000 locked increments of four shared counters
    // (lock xadd aligned, lock cmpxchg across a cache line, lock xadd across a page, lock
    // inc): exactly N × 1,000,000 each.
    let n = u64::from(cpus) * 1_000_000;
    let want = format!("RV-ATOMIC expected={n} xadd={n} cmpxchg={n} split={n} inc={n}");
    assert!(console.contains(&want), "atomic counters: want {want}; {tail}");
    // Cross-modifying code: CPU 0 rewrites a function 1000 times (one aligned 8-byte store
    // each, changing its opcode and immediate) while CPU 1 keeps calling it: CPU 1 sees
    // each patch (within 2 s, else a timeout), never a torn instruction, never old code
    // after newer code.
    let xmodify = console.lines().find(|l| l.starts_with("RV-XMODIFY ")).unwrap_or_else(|| panic!("{tail}"));
    eprintln!("smp{cpus}: {xmodify}");
    assert!(
        xmodify.starts_with("RV-XMODIFY patches=1000 torn=0 stale=0 timeouts=0 "),
        "cross-modifying code: {xmodify}; {tail}"
    );
    // SysRq l (trigger_all_cpu_backtrace) on CPU 0 sends an NMI IPI to every other CPU;
    // each takes it and prints its backtrace (or "skipped: idling") from its NMI handler
    // (the sender waits up to 10 s and gives up otherwise), and /proc/interrupts counts the
    // NMIs per CPU.
    for cpu in 1..cpus {
        assert!(console.contains(&format!("NMI backtrace for cpu {cpu}")), "no NMI backtrace from cpu {cpu}; {tail}");
    }
    let nmi = console.lines().find(|l| l.starts_with("RV-NMI NMI:")).unwrap_or_else(|| panic!("{tail}"));
    let per_cpu: Vec<u64> =
        nmi.split_whitespace().skip(2).take(usize::from(cpus)).filter_map(|n| n.parse().ok()).collect();
    assert_eq!(per_cpu.len(), usize::from(cpus), "{nmi}");
    assert!(per_cpu.iter().skip(1).all(|&n| n >= 1), "every other CPU took an NMI: {nmi}");
    eprintln!("smp{cpus}: {nmi}");
    assert_eq!(code, 0, "the guest powered off; stderr: {stderr}\n{tail}");
}

#[test]
fn debian_boots_with_2_vcpus_and_runs_on_both() {
    check_smp(2);
}

#[test]
fn debian_boots_with_4_vcpus_and_runs_on_all() {
    check_smp(4);
}

fn check_test_workload(code: i32, console: &str, stderr: &str) {
    let tail: String =
        console.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    let version = std::fs::read_to_string(guest_file("kernel-version")).unwrap();
    let digest = std::fs::read_to_string(guest_file("rv-test-data.sha256")).unwrap();
    assert!(console.contains("Linux version"), "no boot banner; stderr: {stderr}\n{tail}");
    assert!(console.contains("RUSTVISOR-INIT-OK"), "init marker missing; stderr: {stderr}\n{tail}");
    assert!(console.contains(&format!("RV-UNAME {}", version.trim())), "uname -r differs; stderr: {stderr}\n{tail}");
    assert!(console.contains(&format!("RV-SHA256 {}", digest.trim())), "sha256sum differs; stderr: {stderr}\n{tail}");
    assert!(console.contains("RV-DONE"), "workload did not finish; stderr: {stderr}\n{tail}");
    assert!(
        console.contains("ACPI: PM: Preparing to enter system sleep state S5"),
        "power-off did not go through ACPI S5:\n{tail}"
    );
    assert_eq!(code, 0, "guest powered off, so the exit status must be 0; stderr: {stderr}\n{tail}");
}

#[test]
fn bzimage_boots_to_userspace_on_emu() {
    let (code, console, stderr) = boot("vmlinuz", "console=ttyS0 panic=-1 rv.test=1", "bzimage");
    check_test_workload(code, &console, &stderr);
}

#[test]
fn pvh_vmlinux_boots_to_userspace_on_emu() {
    let (code, console, stderr) = boot("vmlinux", "console=ttyS0 panic=-1 rv.test=1", "pvh");
    check_test_workload(code, &console, &stderr);
}

#[test]
fn kernel_panic_ends_with_nonzero_status() {
    // No init in the initramfs and no root device: the kernel panics, and panic=-1 resets.
    let (code, console, stderr) =
        boot("vmlinuz", "console=ttyS0 panic=-1 rdinit=/nonexistent root=/dev/nonexistent", "panic");
    assert!(console.contains("Kernel panic"), "expected a panic:\n{console}");
    assert_eq!(code, 1, "a crash must end with status 1; stderr: {stderr}");
    assert_eq!(stderr.trim().lines().filter(|l| l.starts_with("rustvisor:")).count(), 1, "one-line reason: {stderr}");
    assert!(stderr.contains("reset"), "{stderr}");
}

/// What the idle test's guest runs: the clocksource and clockevent mode, then local timer
/// interrupts counted over a 5 s `sleep` between two console markers.
const IDLE_SCRIPT: &str = r#"echo "RV-CLOCKSOURCE $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
echo "RV-NOHZ $(grep -m1 nohz_mode /proc/timer_list | awk '{print $3}')"
a=$(awk '/LOC:/ {print $2}' /proc/interrupts)
echo RV-IDLE-START
sleep 5
echo RV-IDLE-END
b=$(awk '/LOC:/ {print $2}' /proc/interrupts)
echo "RV-LOC $((b - a))"
"#;

/// Voluntary context switches (each one a wake-up from a blocking wait) of all threads of
/// process `pid`, and its CPU time in clock ticks.
fn wakeups_and_ticks(pid: u32) -> (u64, u64) {
    let mut switches = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            switches += status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the first, utime and
    // stime the 12th and 13th.
    let after = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<u64> = after.split(' ').skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
    (switches, f.iter().sum())
}

/// Issue 13's idle bullet: a guest sitting idle runs tickless on the emulated LAPIC timer
/// (TSC clocksource, NOHZ high-res), and the VMM sleeps with it: while the guest's `sleep 5`
/// runs, the whole process wakes a few times a second (the guest's own timers), not at a
/// tick rate, uses little CPU, and the sleep takes its 5 s of host time.
#[test]
fn an_idle_guest_runs_tickless_and_the_vmm_sleeps_with_it() {
    use std::time::Duration;
    let cmdline = format!("console=ttyS0 panic=-1 rv.cmd={}", base64_script::encode(IDLE_SCRIPT.as_bytes()));
    let log = std::env::temp_dir().join(format!("rv-boot-{}-idle.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let mut child = Command::new(env!("CARGO_BIN_EXE_rustvisor"))
        .args(["run", "--kernel"])
        .arg(guest_file("vmlinuz"))
        .arg("--initrd")
        .arg(guest_file("initrd.img"))
        .args(["--cmdline", &cmdline, "--memory", "512M", "--accel", "emu", "--serial"])
        .arg(format!("file={}", log.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn rustvisor");
    let pid = child.id();
    let console = || std::fs::read_to_string(&log).unwrap_or_default();
    // Waits for `marker` on the console, then samples the process.
    let sample_at = |marker: &str| {
        let end = Instant::now() + Duration::from_secs(600);
        while !console().contains(marker) {
            assert!(Instant::now() < end, "no {marker} on the console:\n{}", console());
            std::thread::sleep(Duration::from_millis(5));
        }
        (Instant::now(), wakeups_and_ticks(pid))
    };
    let (t0, (w0, c0)) = sample_at("RV-IDLE-START");
    let (t1, (w1, c1)) = sample_at("RV-IDLE-END");
    let status = child.wait().unwrap();
    let text = console();
    let _ = std::fs::remove_file(&log);
    assert_eq!(status.code(), Some(0), "{text}");
    let field = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_else(|| panic!("no {name}:\n{text}"))
    };
    let secs = (t1 - t0).as_secs_f64();
    let loc: u64 = field("RV-LOC ").parse().unwrap();
    let hz = 100.0; // USER_HZ, the unit of /proc/PID/stat's CPU times on Linux
    let cpu = (c1 - c0) as f64 / hz / secs * 100.0;
    let wakeups = (w1 - w0) as f64 / secs;
    eprintln!(
        "idle guest: clocksource {}, nohz_mode {}, {loc} local timer interrupts in its 5 s sleep; \
         VMM over {secs:.2} s: {wakeups:.1} wake-ups/s, {cpu:.2} % of a core",
        field("RV-CLOCKSOURCE "),
        field("RV-NOHZ ")
    );
    assert_eq!(field("RV-CLOCKSOURCE "), "tsc");
    assert_eq!(field("RV-NOHZ "), "2", "NOHZ_MODE_HIGHRES");
    // Tickless: a few per second (a periodic tick would be 250 a second, 1,250 here).
    assert!(loc < 100, "{loc} local timer interrupts in 5 s");
    assert!(wakeups < 50.0, "the VMM woke {wakeups:.1} times a second while the guest slept");
    assert!(secs >= 4.9, "the guest's 5 s sleep took {secs:.2} s of host time");
    // ~0.5 % in a release build; generous for debug builds on a loaded host.
    assert!(cpu < 10.0, "the VMM used {cpu:.2} % of a core while the guest slept");
}
