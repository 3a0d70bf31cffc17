//! `rustvisor`: the command-line front end.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

mod jailed;

use clap::{Parser, Subcommand};
use vmm::config::parse_size;
use vmm::terminal::RawTerminal;
use vmm::{Accel, ConsoleOut, RunOutcome, Vm, VmConfig};

#[derive(Parser)]
#[command(name = "rustvisor", version, about = "A hypervisor: run VMs on KVM or on rustvisor's x86-64 emulator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot one VM in the foreground with its serial console on this terminal.
    ///
    /// The console escape is Ctrl-A then X (quits the VM). The process exits 0 when the guest
    /// powers off, 1 when it resets or crashes (triple fault, panic with panic=-1), and 2 on
    /// bad arguments.
    Run(Box<RunArgs>),
    /// Start an empty VMM driven over its REST API on a Unix socket (mode 0600): create,
    /// boot, pause, resume, snapshot, restore, ... (see crates/api-types/openapi.yaml).
    Vmm(VmmArgs),
    /// Talk to a VMM's REST API: ping, info, counters, pause, resume, snapshot DIR, ...
    Api(api::client::ApiArgs),
    /// The host manager: keeps VM definitions and an event log, runs one VMM per VM and
    /// supervises it, serves its API on a Unix socket (see "The host manager" in README.md).
    Daemon(manager::cli::DaemonArgs),
    /// Manage the daemon's VMs: create, list, start, stop, kill, pause, resume, delete, info,
    /// console, set, snapshot.
    Vm(manager::cli::VmArgs),
    /// The daemon's event and audit log.
    Events(manager::cli::EventsArgs),
    /// The daemon's storage pools: create, list, info, delete.
    Pool(manager::cli::PoolArgs),
    /// Disk images in the daemon's pools: create, import, resize, clone, list, info, delete.
    Volume(manager::cli::VolumeArgs),
    /// VM backups: create, list, restore, delete.
    Backup(manager::cli::BackupArgs),
    /// The daemon's virtual networks: create, list, info, delete, check.
    Net(manager::cli::NetArgs),
    /// The daemon's firewall groups (nftables rules on VMs' NICs): create, set, list, delete.
    Firewall(manager::cli::FirewallArgs),
    /// How many more VMs of a shape fit on this host under the overcommit policy, and which
    /// resource runs out first.
    Capacity(manager::cli::CapacityArgs),
    /// Failure drills on a private daemon: cpu-overcommit, memory-exhaustion,
    /// storage-saturation; each prints what it did and measured, and cleans up.
    Drill(manager::cli::DrillArgs),
    /// A live view of the daemon's VMs (like virt-top): %CPU, %RDY, memory, disk and network
    /// rates per VM; q quits, s changes the sort, p pauses; --batch for plain text.
    Top(manager::cli::TopArgs),
}

#[derive(Parser)]
struct VmmArgs {
    /// Unix socket to serve the API on.
    #[arg(long)]
    api_socket: PathBuf,
    /// Run in a jail (new mount, PID, IPC and UTS namespaces, a root holding only the API
    /// socket's folder, the --jail-ro/--jail-rw paths and /dev/kvm, /dev/net/tun; an
    /// unprivileged user without capabilities). The configuration's files must be among the
    /// given paths.
    #[arg(long)]
    jail: bool,
    /// The jail's user: UID or UID:GID (default 2099999999).
    #[arg(long, value_name = "UID[:GID]", requires = "jail")]
    jail_user: Option<String>,
    /// A file or folder the jailed VMM may read (repeatable).
    #[arg(long, value_name = "PATH", requires = "jail")]
    jail_ro: Vec<PathBuf>,
    /// A file or folder the jailed VMM may write (repeatable; given to the jail's user while
    /// it runs when it is a file).
    #[arg(long, value_name = "PATH", requires = "jail")]
    jail_rw: Vec<PathBuf>,
    /// Seccomp filters on the VMM's threads: on (a forbidden system call stops the VMM with
    /// "bad system call N (name) on thread T"), log (allowed, and logged by the kernel) or
    /// off.
    #[arg(long, default_value = "on", value_name = "on|log|off")]
    seccomp: seccomp::Mode,
}

#[derive(Parser)]
struct RunArgs {
    /// Kernel: a bzImage (64-bit boot protocol) or an ELF vmlinux with a PVH entry note.
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs (cpio, optionally compressed).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    cmdline: String,
    /// Guest RAM, e.g. 512M or 1G (at least 16M, at most the host's memory).
    #[arg(long, default_value = "512M")]
    memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Accelerator: auto (kvm where hardware virtualization can run the guest, else emu),
    /// kvm or emu.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Console: stdio, file=PATH, socket=PATH[,log=FILE] (a Unix socket several clients may
    /// attach to; the first one types) or null.
    #[arg(long, default_value = "stdio")]
    serial: String,
    /// A virtio-blk disk: path=IMG, then optionally ,format=raw|qcow2 ,readonly=on ,serial=ID
    /// ,backing=allow (trust qcow2 backing files outside the image's folder) ,data_file=allow
    /// (trust its external data file) ,on-error=report|pause (on a host I/O error such as a
    /// full disk: fail the guest's request, the default, or keep it and pause the VM until
    /// vm.resume; pause needs --api-socket); repeatable: the guest sees /dev/vda, /dev/vdb, ...
    #[arg(long, value_name = "OPTIONS")]
    disk: Vec<String>,
    /// A virtio-net NIC on a TAP device: tap=NAME[,mac=MAC] (repeatable; the TAP is created
    /// if absent).
    #[arg(long, value_name = "OPTIONS")]
    net: Vec<String>,
    /// A virtio-vsock device: cid=N,socket=PATH (host side on Unix sockets, Firecracker's
    /// convention).
    #[arg(long, value_name = "OPTIONS")]
    vsock: Option<String>,
    /// Add a virtio-rng device fed by the host's getrandom(2).
    #[arg(long)]
    rng: bool,
    /// A virtio-console (the guest's /dev/hvc0): stdio, file=PATH or null. Only one of
    /// --serial and --console may use stdio.
    #[arg(long)]
    console: Option<String>,
    /// A virtio-balloon device (its size is set through the API: vm.balloon); optionally
    /// deflate_on_oom=on|off (default on), stats_interval_s=N (default 5, 0 = no
    /// statistics), free_page_reporting=on|off (default off).
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, default_missing_value = "")]
    balloon: Option<String>,
    /// How guest RAM is backed: mergeable=on (KSM may share identical pages), thp=on
    /// (transparent huge pages) or hugepages=on (2 MiB hugetlbfs pages, reserved at boot).
    #[arg(long, value_name = "OPTIONS")]
    memory_options: Option<String>,
    /// Also serve the VMM's REST API on this Unix socket (pause, resume, snapshot, info, ...).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Run the VM in a jail: new mount, PID, IPC and UTS namespaces (and network, without
    /// --net), a root holding only the VM's files, an unprivileged user without capabilities
    /// (see "Isolation" in README.md). Writable disks are given to that user while it runs;
    /// TAPs must exist and belong to it.
    #[arg(long)]
    jail: bool,
    /// The jail's user: UID or UID:GID (default 2099999999).
    #[arg(long, value_name = "UID[:GID]", requires = "jail")]
    jail_user: Option<String>,
    /// Seccomp filters on the VMM's threads: on (a forbidden system call stops the VMM with
    /// "bad system call N (name) on thread T"), log (allowed, and logged by the kernel) or
    /// off.
    #[arg(long, default_value = "on", value_name = "on|log|off")]
    seccomp: seccomp::Mode,
}

/// Sets the process's seccomp mode (before any VMM thread starts).
fn init_seccomp(mode: seccomp::Mode) -> Result<(), (u8, String)> {
    if x86emu::jit::Tier::from_env() != x86emu::jit::Tier::Interp {
        seccomp::allow_exec_memory();
    }
    seccomp::init(mode).map_err(|e| (1, format!("--seccomp {mode}: {e}")))
}

fn parse_out(flag: &str, s: &str) -> Result<ConsoleOut, String> {
    s.parse().map_err(|e| format!("{flag}: {e}"))
}

/// A path flag as the configuration's UTF-8 string.
fn utf8_path(flag: &str, p: PathBuf) -> Result<String, String> {
    p.into_os_string().into_string().map_err(|p| format!("{flag}: {} is not UTF-8", p.to_string_lossy()))
}

fn run(a: RunArgs) -> Result<ExitCode, (u8, String)> {
    let bad = |m: String| (2u8, m);
    init_seccomp(a.seccomp)?;
    let mem_size = parse_size(&a.memory).map_err(|e| bad(format!("--memory: {e}")))?;
    let accel: Accel = a.accel.parse().map_err(|e: String| bad(format!("--accel: {e}")))?;
    if !mem_size.is_multiple_of(1 << 20) {
        return Err(bad(format!("--memory: {mem_size} bytes is not a whole number of MiB (e.g. 512M, 1G)")));
    }
    let serial = parse_out("--serial", &a.serial).map_err(bad)?;
    let console = a.console.as_deref().map(|c| parse_out("--console", c)).transpose().map_err(bad)?;
    let interactive = serial == ConsoleOut::Stdio;
    let disks = a.disk.iter().map(|d| d.parse()).collect::<Result<Vec<vmm::DiskConfig>, _>>().map_err(bad)?;
    if a.api_socket.is_none() {
        if let Some(d) = disks.iter().find(|d| d.on_error == vmm::DiskErrorPolicy::Pause) {
            return Err(bad(format!(
                "--disk: path={}: on-error=pause needs --api-socket (a VM paused on a disk error is resumed with \
                 vm.resume) (accepted without it: on-error=report)",
                d.path
            )));
        }
    }
    let nets = a.net.iter().map(|n| n.parse()).collect::<Result<Vec<vmm::NetConfig>, _>>().map_err(bad)?;
    let vsock = a.vsock.as_deref().map(str::parse::<vmm::VsockConfig>).transpose().map_err(bad)?;
    let balloon = a.balloon.as_deref().map(str::parse::<vmm::BalloonConfig>).transpose().map_err(bad)?;
    let memory_options =
        a.memory_options.as_deref().map(str::parse::<vmm::MemoryOptions>).transpose().map_err(bad)?.unwrap_or_default();
    let cfg = VmConfig {
        kernel: utf8_path("--kernel", a.kernel).map_err(bad)?,
        initrd: a.initrd.map(|p| utf8_path("--initrd", p)).transpose().map_err(bad)?,
        cmdline: a.cmdline,
        memory_mib: mem_size >> 20,
        cpus: a.cpus,
        accel,
        serial,
        disks,
        nets,
        vsock,
        rng: a.rng,
        console,
        balloon,
        memory_options,
    };
    if a.jail && !jailed::in_jail() {
        let user = jailed::parse_user(a.jail_user.as_deref()).map_err(bad)?;
        let f = vmm::config::host_files(&cfg).map_err(|e| bad(format!("--jail: {e}")))?;
        let mut create_in = f.create_in;
        if let Some(dir) = a.api_socket.as_deref().and_then(|s| std::path::absolute(s).ok()?.parent().map(Into::into)) {
            create_in.push(dir);
        }
        let needs =
            jailed::Needs { read: f.read, write: f.write, create_in, devices: f.devices, host_network: f.host_network };
        return jailed::rerun_in_jail(needs, user);
    }
    let mut vm = Vm::new(&cfg).map_err(|e| match e {
        vmm::Error::Config { .. }
        | vmm::Error::Kernel { .. }
        | vmm::Error::KernelImage { .. }
        | vmm::Error::Io { .. } => (2, e.to_string()),
        _ => (1, e.to_string()),
    })?;
    tracing::info!("accelerator {} (override with --accel)", vm.accel_note);
    if let Some(sock) = a.api_socket.clone() {
        return run_with_api(vm, cfg, &sock, interactive);
    }
    let _raw = if interactive { Some(RawTerminal::enable()) } else { None };
    if interactive {
        spawn_console_input(vm.serial(), vm.control());
    }
    vm.start().map_err(|e| (1, e.to_string()))?;
    // Set up: from here on this thread waits for the VM's end and tears it down.
    seccomp::apply(seccomp::Role::Main);
    match vm.run() {
        Ok(RunOutcome::PowerOff) => Ok(ExitCode::SUCCESS),
        Ok(RunOutcome::UserQuit) => {
            eprintln!("\r\nrustvisor: quit from the console");
            Ok(ExitCode::SUCCESS)
        }
        Ok(RunOutcome::Reset(why)) => Err((1, format!("guest reset: {why}"))),
        Err(e) => Err((1, format!("VM stopped: {e}"))),
    }
}

/// Feeds stdin to the 8250 console, handling the Ctrl-A X escape.
fn spawn_console_input(
    serial: std::sync::Arc<std::sync::Mutex<vmm::vm::SerialDev>>,
    ctl: std::sync::Arc<vmm::vm::RunControl>,
) {
    let spawned = std::thread::Builder::new().name("console-input".into()).spawn(move || {
        seccomp::apply(seccomp::Role::ConsoleInput);
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        let mut escape = false;
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut out = Vec::with_capacity(n);
            for &b in &buf[..n] {
                if escape {
                    escape = false;
                    match b {
                        b'x' | b'X' => {
                            ctl.quit();
                            return;
                        }
                        0x01 => out.push(0x01),
                        _ => out.push(b),
                    }
                } else if b == 0x01 {
                    escape = true;
                } else {
                    out.push(b);
                }
            }
            let mut rest = &out[..];
            while !rest.is_empty() {
                let took = serial.lock().map(|mut s| s.enqueue_input(rest)).unwrap_or(rest.len());
                rest = &rest[took..];
                if !rest.is_empty() {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start the console input thread: {e}; the console takes no input");
    }
}

/// `rustvisor run --api-socket`: the VM runs under a [`vmm::controller::VmmController`]; the
/// process ends when the guest does (same exit statuses as without the API) or on
/// `vmm.shutdown`.
fn run_with_api(
    mut vm: Vm,
    cfg: VmConfig,
    sock: &std::path::Path,
    interactive: bool,
) -> Result<ExitCode, (u8, String)> {
    vm.start().map_err(|e| (1, e.to_string()))?;
    let ctl = vm.control();
    let _raw = if interactive { Some(RawTerminal::enable()) } else { None };
    if interactive {
        spawn_console_input(vm.serial(), ctl.clone());
    }
    let controller = std::sync::Arc::new(vmm::controller::VmmController::with_running(vm, cfg));
    let _server = api::server::serve(sock, controller.clone())
        .map_err(|e| (2, format!("--api-socket: {}: {e}", sock.display())))?;
    seccomp::apply(seccomp::Role::Main);
    match controller.wait_exit_or_vm_end() {
        None | Some(Ok(RunOutcome::PowerOff)) => Ok(ExitCode::SUCCESS),
        Some(Ok(RunOutcome::UserQuit)) => {
            eprintln!("\r\nrustvisor: quit from the console");
            Ok(ExitCode::SUCCESS)
        }
        Some(Ok(RunOutcome::Reset(why))) => Err((1, format!("guest reset: {why}"))),
        Some(Err(e)) => Err((1, format!("VM stopped: {e}"))),
    }
}

/// `rustvisor vmm --api-socket PATH`.
fn vmm_main(a: VmmArgs) -> Result<ExitCode, (u8, String)> {
    init_seccomp(a.seccomp)?;
    if a.jail && !jailed::in_jail() {
        let bad = |m: String| (2u8, m);
        let user = jailed::parse_user(a.jail_user.as_deref()).map_err(bad)?;
        let abs = |p: &PathBuf| std::path::absolute(p).map_err(|e| bad(format!("--jail: {}: {e}", p.display())));
        let socket = abs(&a.api_socket)?;
        let mut create_in: Vec<PathBuf> = socket.parent().map(|d| vec![d.to_path_buf()]).unwrap_or_default();
        let mut write = Vec::new();
        for p in &a.jail_rw {
            let p = abs(p)?;
            if p.is_dir() {
                create_in.push(p);
            } else {
                write.push(p);
            }
        }
        let read = a.jail_ro.iter().map(abs).collect::<Result<Vec<_>, _>>()?;
        let devices = vec!["/dev/kvm".into(), "/dev/net/tun".into()];
        let needs = jailed::Needs { read, write, create_in, devices, host_network: true };
        return jailed::rerun_in_jail(needs, user);
    }
    let controller = std::sync::Arc::new(vmm::controller::VmmController::new());
    let _server = api::server::serve(&a.api_socket, controller.clone())
        .map_err(|e| (2, format!("--api-socket: {}: {e}", a.api_socket.display())))?;
    tracing::info!("API on {}", a.api_socket.display());
    seccomp::apply(seccomp::Role::Main);
    controller.wait_exit();
    Ok(ExitCode::SUCCESS)
}

/// Under `perf record` (which sets `PERF_BUILDID_DIR`): the emulator's compiled code is
/// described in `/tmp/perf-PID.map` through a file opened here, before any thread or seccomp
/// filter exists, and the variable is removed, so that Cranelift does not open the file
/// itself for each function (a seccomp-filtered vCPU thread may not open files: it
/// stopped the VMM). Child VMMs of the daemon inherit no map.
fn perf_map_from_env() {
    if std::env::var_os("PERF_BUILDID_DIR").is_none() {
        return;
    }
    // Edition 2021: safe to call, but it must not race with reads of the environment on
    // other threads; this runs first in `main`, before any thread exists.
    std::env::remove_var("PERF_BUILDID_DIR");
    let path = format!("/tmp/perf-{}.map", std::process::id());
    match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
        Ok(f) => x86emu::jit::set_perf_map(f),
        Err(e) => eprintln!("rustvisor: perf map {path}: {e}; compiled guest code has no symbols"),
    }
}

fn main() -> ExitCode {
    perf_map_from_env();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RUSTVISOR_LOG")
                // Cranelift logs every compiled function's IR at info: the translation tier
                // would flood the VMM's log.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("info,cranelift_jit=warn,cranelift_codegen=warn")
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    vmm::panic_policy::install();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run(*a),
        Cmd::Vmm(a) => vmm_main(a),
        Cmd::Api(a) => return api::client::run(a),
        Cmd::Daemon(a) => return manager::cli::daemon(a),
        Cmd::Vm(a) => return manager::cli::vm(a),
        Cmd::Events(a) => return manager::cli::events(a),
        Cmd::Net(a) => return manager::cli::net(a),
        Cmd::Pool(a) => return manager::cli::pool(a),
        Cmd::Volume(a) => return manager::cli::volume(a),
        Cmd::Backup(a) => return manager::cli::backup(a),
        Cmd::Firewall(a) => return manager::cli::firewall(a),
        Cmd::Capacity(a) => return manager::cli::capacity(a),
        Cmd::Drill(a) => return manager::cli::drill(a),
        Cmd::Top(a) => return manager::cli::top(a),
    };
    match r {
        Ok(c) => c,
        Err((code, msg)) => {
            eprintln!("rustvisor: {msg}");
            ExitCode::from(code)
        }
    }
}
