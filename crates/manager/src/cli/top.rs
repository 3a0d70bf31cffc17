//! `rustvisor top`: a live view of the daemon's VMs, like `virt-top` or `esxtop`.
//!
//! It polls `GET /api/v1/stats` every `--interval` seconds and turns two consecutive samples
//! into rates ([`view`], a pure function of the previous and the current sample): an
//! interactive table (ratatui on crossterm; q/Esc quits, s cycles the sort column, p
//! pauses), or with `--batch` plain text blocks for scripts and logs, like `top -b`
//! ([`format_batch`]).
//!
//! Rates need two samples of the same run of a VM's VMM. Where there is no earlier sample of
//! that run (the first sample, a VM started or restarted since the last one, a counter that
//! went backwards), the rates are averages since the VMM started, as `top`'s first frame
//! is: counters over uptime. They are never negative.

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event as TermEvent, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Cell, Paragraph, Row, Table};

use super::{failure, finish, format_duration, format_time, Connect, DaemonClient, Failure};
use crate::types::{HostInfo, Stats, VmState, VmStats};

/// `rustvisor top`.
#[derive(clap::Args, Debug, Clone)]
pub struct TopArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: Connect,
    /// Seconds between samples, 0.1 to 3600 (e.g. 2 or 0.5).
    #[arg(long, value_name = "SECONDS", default_value = "2")]
    pub interval: String,
    /// The column to sort by, largest first: cpu (%CPU), ready (%RDY), mem (resident
    /// memory), io (disk bytes/s), net (NIC bytes/s), or name (A to Z).
    #[arg(long, value_name = "COLUMN", default_value = "cpu")]
    pub sort: String,
    /// Plain text to stdout, one block per sample (a timestamp line, the host, a table), for
    /// scripts and logs; needs no terminal.
    #[arg(long)]
    pub batch: bool,
    /// Stop after N samples (blocks in --batch, frames otherwise). Default: until q, Esc or
    /// Ctrl-C (--batch: until interrupted, or exit status 1 when the daemon goes away).
    #[arg(long, value_name = "N")]
    pub iterations: Option<String>,
}

/// The column the table is sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    /// %CPU, largest first.
    Cpu,
    /// %RDY, largest first.
    Ready,
    /// Resident memory of the VMM, largest first.
    Mem,
    /// Disk bytes read + written per second, largest first.
    Io,
    /// NIC bytes received + sent per second, largest first.
    Net,
    /// Name, A to Z.
    Name,
}

impl SortKey {
    const ALL: [SortKey; 6] = [SortKey::Cpu, SortKey::Ready, SortKey::Mem, SortKey::Io, SortKey::Net, SortKey::Name];

    /// Its `--sort` name.
    pub fn as_str(self) -> &'static str {
        match self {
            SortKey::Cpu => "cpu",
            SortKey::Ready => "ready",
            SortKey::Mem => "mem",
            SortKey::Io => "io",
            SortKey::Net => "net",
            SortKey::Name => "name",
        }
    }

    /// The next one (the `s` key): cpu → ready → mem → io → net → name → cpu.
    pub fn next(self) -> SortKey {
        let i = SortKey::ALL.iter().position(|k| *k == self).unwrap_or(0);
        SortKey::ALL[(i + 1) % SortKey::ALL.len()]
    }

    /// The table column it sorts (an index into [`COLUMNS`]).
    fn column(self) -> usize {
        match self {
            SortKey::Name => 0,
            SortKey::Cpu => 3,
            SortKey::Ready => 4,
            SortKey::Mem => 5,
            SortKey::Io => 10,
            SortKey::Net => 12,
        }
    }
}

impl std::str::FromStr for SortKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        SortKey::ALL
            .into_iter()
            .find(|k| k.as_str() == s.trim())
            .ok_or_else(|| format!("'{s}' (accepted: cpu, ready, mem, io, net, name)"))
    }
}

/// A VM's disk rates: the sums over its disks.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DiskRates {
    /// Read requests completed per second.
    pub read_ops: f64,
    /// Write requests completed per second.
    pub write_ops: f64,
    /// Bytes read per second.
    pub read_bytes: f64,
    /// Bytes written per second.
    pub write_bytes: f64,
}

/// A VM's network rates: the sums over its NICs (rx = host → guest).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct NetRates {
    /// Bytes delivered to the guest per second.
    pub rx_bytes: f64,
    /// Bytes sent by the guest per second.
    pub tx_bytes: f64,
    /// Frames dropped (both directions) per second.
    pub drops: f64,
}

/// One VM's line of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRow {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: VmState,
    /// vCPUs.
    pub cpus: u8,
    /// Seconds its VMM has run (while it is up).
    pub uptime_s: Option<f64>,
    /// Configured guest RAM, MiB.
    pub memory_mib: u64,
    /// Resident memory of the VMM process, bytes (while it is up).
    pub resident_bytes: Option<u64>,
    /// The balloon's size as the guest reports it, MiB (a VM with a balloon, while it is
    /// up).
    pub balloon_mib: Option<u64>,
    /// CPU time of the VMM process per wall time, percent of one host CPU (200 = two CPUs
    /// busy).
    pub cpu_pct: Option<f64>,
    /// vCPU ready time (runnable, waiting for a host CPU) per wall time per vCPU thread,
    /// percent: VMware's %RDY.
    pub ready_pct: Option<f64>,
    /// Its disks' rates (a VM with disks, while it is up).
    pub disk: Option<DiskRates>,
    /// Its NICs' rates (a VM with NICs, while it is up).
    pub net: Option<NetRates>,
    /// Whether the rates are averages since the VMM started (no earlier sample of this run
    /// of it) rather than over the last interval.
    pub since_start: bool,
}

/// What `top` shows of two samples: the host and one row per VM of the current sample.
#[derive(Debug, Clone, PartialEq)]
pub struct TopView {
    /// When the current sample was taken (Unix time, milliseconds).
    pub time_ms: i64,
    /// Seconds between the two samples; `None` for a first sample (the rates are then
    /// averages since each VM's start).
    pub interval_s: Option<f64>,
    /// The host.
    pub host: HostInfo,
    /// Memory KSM saves, bytes, and whether KSM is merging now; `None` where the daemon
    /// could not read KSM's figures.
    pub ksm: Option<(u64, bool)>,
    /// The VMs, in the daemon's order until [`sort_rows`].
    pub rows: Vec<VmRow>,
}

/// The counters of one VM's sample that rates are made of.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Totals {
    /// VMM CPU seconds.
    cpu_s: Option<f64>,
    /// Sum of the vCPU threads' ready seconds, and how many threads.
    ready: Option<(f64, usize)>,
    /// Disks: read ops, write ops, read bytes, write bytes.
    disk: Option<[u64; 4]>,
    /// NICs: rx bytes, tx bytes, drops.
    net: Option<[u64; 3]>,
}

fn totals(v: &VmStats) -> Totals {
    let mut t = Totals { cpu_s: v.cpu_seconds, ..Default::default() };
    if !v.vcpus.is_empty() {
        t.ready = Some((v.vcpus.iter().map(|c| c.ready_seconds).sum(), v.vcpus.len()));
    }
    for d in v.devices.values() {
        if let Some(b) = &d.block {
            let s = t.disk.get_or_insert([0; 4]);
            for (acc, x) in s.iter_mut().zip([b.read_ops, b.write_ops, b.read_bytes, b.write_bytes]) {
                *acc = acc.saturating_add(x);
            }
        }
        if let Some(n) = &d.net {
            let s = t.net.get_or_insert([0; 3]);
            for (acc, x) in s.iter_mut().zip([n.rx_bytes, n.tx_bytes, n.rx_dropped.saturating_add(n.tx_dropped)]) {
                *acc = acc.saturating_add(x);
            }
        }
    }
    t
}

/// The names of a sample's disks and NICs: rates over an interval need the same devices in
/// both samples.
fn device_names(v: &VmStats) -> (Vec<&str>, Vec<&str>) {
    let disks = v.devices.iter().filter(|(_, d)| d.block.is_some()).map(|(n, _)| n.as_str()).collect();
    let nics = v.devices.iter().filter(|(_, d)| d.net.is_some()).map(|(n, _)| n.as_str()).collect();
    (disks, nics)
}

/// The rates of `cur` over `secs` seconds since `base` (a zero `base`: since the VMM
/// started); `None` where `cur` lacks a counter, `base` lacks it (a one-sample gap), or a
/// counter went backwards (the caller then falls back to since-start rates).
fn rates(cur: &Totals, base: &Totals, secs: f64) -> Option<RowRates> {
    let f = |c: f64, b: f64| -> Option<f64> { (c >= b).then(|| (c - b) / secs) };
    let u = |c: u64, b: u64| -> Option<f64> { c.checked_sub(b).map(|d| d as f64 / secs) };
    let mut r = RowRates::default();
    if let (Some(c), Some(b)) = (cur.cpu_s, base.cpu_s) {
        r.cpu_pct = Some(f(c, b)? * 100.0);
    }
    if let (Some((c, n)), Some((b, _))) = (cur.ready, base.ready) {
        r.ready_pct = Some(f(c, b)? * 100.0 / n.max(1) as f64);
    }
    if let (Some(c), Some(b)) = (cur.disk, base.disk) {
        r.disk = Some(DiskRates {
            read_ops: u(c[0], b[0])?,
            write_ops: u(c[1], b[1])?,
            read_bytes: u(c[2], b[2])?,
            write_bytes: u(c[3], b[3])?,
        });
    }
    if let (Some(c), Some(b)) = (cur.net, base.net) {
        r.net = Some(NetRates { rx_bytes: u(c[0], b[0])?, tx_bytes: u(c[1], b[1])?, drops: u(c[2], b[2])? });
    }
    Some(r)
}

#[derive(Debug, Default)]
struct RowRates {
    cpu_pct: Option<f64>,
    ready_pct: Option<f64>,
    disk: Option<DiskRates>,
    net: Option<NetRates>,
}

/// Whether `prev` and `cur` are samples of the same run of a VM's VMM: both up, its uptime
/// did not go back, its restart count did not change.
fn same_run(prev: &VmStats, cur: &VmStats) -> bool {
    match (prev.uptime_s, cur.uptime_s) {
        (Some(p), Some(c)) => c >= p && prev.restarts == cur.restarts,
        _ => false,
    }
}

/// One VM's row from its current sample and, if there is one, its previous sample
/// `secs` seconds earlier.
fn row(prev: Option<&VmStats>, cur: &VmStats, secs: Option<f64>) -> VmRow {
    let c = totals(cur);
    let over_interval = match (prev, secs) {
        (Some(p), Some(s)) if s > 0.0 && same_run(p, cur) => {
            let mut b = totals(p);
            // A disk or NIC set that changed: those rates wait for the next sample.
            let (pd, pn) = device_names(p);
            let (cd, cn) = device_names(cur);
            if pd != cd {
                b.disk = None;
            }
            if pn != cn {
                b.net = None;
            }
            rates(&c, &b, s)
        }
        _ => None,
    };
    let since_start = over_interval.is_none();
    let r = over_interval
        .or_else(|| {
            let up = cur.uptime_s.filter(|u| *u > 0.0)?;
            let zero = Totals {
                cpu_s: c.cpu_s.map(|_| 0.0),
                ready: c.ready.map(|(_, n)| (0.0, n)),
                disk: c.disk.map(|_| [0; 4]),
                net: c.net.map(|_| [0; 3]),
            };
            rates(&c, &zero, up)
        })
        .unwrap_or_default();
    VmRow {
        name: cur.name.clone(),
        state: cur.state,
        cpus: cur.cpus,
        uptime_s: cur.uptime_s,
        memory_mib: cur.memory_mib,
        resident_bytes: cur.resident_bytes,
        balloon_mib: cur.balloon.as_ref().map(|b| b.actual_mib),
        cpu_pct: r.cpu_pct,
        ready_pct: r.ready_pct,
        disk: r.disk,
        net: r.net,
        since_start,
    }
}

/// What `top` shows of `cur`, with rates over the interval since `prev` (the sample before
/// it, if any) where both samples hold the same run of a VM, else averages since the VM's
/// VMM started. VMs only in `prev` are gone; rows are in `cur`'s order.
pub fn view(prev: Option<&Stats>, cur: &Stats) -> TopView {
    let secs = prev.map(|p| (cur.time_ms - p.time_ms) as f64 / 1000.0).filter(|s| *s > 0.0);
    let rows = cur
        .vms
        .iter()
        .map(|v| {
            let p = prev.and_then(|p| p.vms.iter().find(|x| x.name == v.name));
            row(p, v, secs)
        })
        .collect();
    TopView {
        time_ms: cur.time_ms,
        interval_s: secs,
        host: cur.host.clone(),
        ksm: cur.ksm.as_ref().map(|k| (k.saved_bytes(), k.running())),
        rows,
    }
}

/// Sorts rows by `key`: largest first (a VM without the figure, e.g. stopped, last), or by
/// name for [`SortKey::Name`]; ties by name.
pub fn sort_rows(rows: &mut [VmRow], key: SortKey) {
    let value = |r: &VmRow| -> Option<f64> {
        match key {
            SortKey::Cpu => r.cpu_pct,
            SortKey::Ready => r.ready_pct,
            SortKey::Mem => r.resident_bytes.map(|b| b as f64),
            SortKey::Io => r.disk.map(|d| d.read_bytes + d.write_bytes),
            SortKey::Net => r.net.map(|n| n.rx_bytes + n.tx_bytes),
            SortKey::Name => None,
        }
    };
    rows.sort_by(|a, b| {
        // Descending by value (None last), then by name.
        let by_value = match (value(a), value(b)) {
            (Some(x), Some(y)) => y.total_cmp(&x),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        };
        by_value.then_with(|| a.name.cmp(&b.name))
    });
}

/// The table's columns: header, minimum width (characters), right-aligned.
pub const COLUMNS: [(&str, usize, bool); 16] = [
    ("NAME", 12, false),
    ("STATE", 8, false),
    ("VCPU", 4, true),
    ("%CPU", 6, true),
    ("%RDY", 6, true),
    ("RES_MiB", 7, true),
    ("MEM_MiB", 7, true),
    ("BAL_MiB", 7, true),
    ("RD_OPS/s", 8, true),
    ("WR_OPS/s", 8, true),
    ("RD_MiB/s", 8, true),
    ("WR_MiB/s", 8, true),
    ("RX_KiB/s", 8, true),
    ("TX_KiB/s", 8, true),
    ("DROP/s", 6, true),
    ("UPTIME", 6, false),
];

const MIB: f64 = (1u64 << 20) as f64;

/// One row's cells, in [`COLUMNS`]' order ("-" where a figure is missing); the uptime of a
/// row whose rates are averages since the VM's start (not on a first sample) ends in "*".
pub fn cells(r: &VmRow, first_sample: bool) -> Vec<String> {
    let opt = |v: Option<f64>, decimals: usize| v.map_or("-".into(), |x| format!("{x:.decimals$}"));
    let disk = |f: fn(&DiskRates) -> f64, div: f64, d: usize| opt(r.disk.as_ref().map(|x| f(x) / div), d);
    let net = |f: fn(&NetRates) -> f64, div: f64, d: usize| opt(r.net.as_ref().map(|x| f(x) / div), d);
    let mut uptime = r.uptime_s.map_or("-".into(), format_duration);
    if r.since_start && !first_sample && r.uptime_s.is_some() && r.cpu_pct.is_some() {
        uptime.push('*');
    }
    vec![
        r.name.clone(),
        r.state.as_str().to_string(),
        r.cpus.to_string(),
        opt(r.cpu_pct, 1),
        opt(r.ready_pct, 1),
        r.resident_bytes.map_or("-".into(), |b| format!("{:.0}", b as f64 / MIB)),
        r.memory_mib.to_string(),
        r.balloon_mib.map_or("-".into(), |b| b.to_string()),
        disk(|d| d.read_ops, 1.0, 1),
        disk(|d| d.write_ops, 1.0, 1),
        disk(|d| d.read_bytes, MIB, 2),
        disk(|d| d.write_bytes, MIB, 2),
        net(|n| n.rx_bytes, 1024.0, 1),
        net(|n| n.tx_bytes, 1024.0, 1),
        net(|n| n.drops, 1.0, 1),
        uptime,
    ]
}

/// The header lines above the table: the time and what the rates are over, the host, the
/// VMs and what those that are up commit of the host.
pub fn header_lines(v: &TopView, sort: SortKey) -> Vec<String> {
    let h = &v.host;
    let over = match v.interval_s {
        Some(s) => format!("rates over the last {s:.1} s"),
        None => "first sample: rates are averages since each VM started".into(),
    };
    let ksm = match v.ksm {
        Some((saved, running)) => format!("KSM {}, {} MiB saved", if running { "on" } else { "off" }, saved >> 20),
        None => "KSM unknown".into(),
    };
    let count = |s: VmState| v.rows.iter().filter(|r| r.state == s).count();
    vec![
        format!("rustvisor top - {}  {over}  sort: {}", format_time(v.time_ms), sort.as_str()),
        format!(
            "host: {} CPUs, {} MiB for VMs, {} MiB available; {ksm}; cgroups: {}",
            h.cpus, h.memory_mib, h.memory_available_mib, h.cgroups
        ),
        format!(
            "VMs: {} ({} running, {} paused, {} stopped, {} crashed); {} up commit {} vCPUs ({:.2} per CPU, \
             policy {}) and {} MiB ({:.2}x, policy {})",
            v.rows.len(),
            count(VmState::Running),
            count(VmState::Paused),
            count(VmState::Stopped),
            count(VmState::Crashed),
            h.vms_up,
            h.committed_vcpus,
            h.committed_vcpus as f64 / h.cpus.max(1) as f64,
            h.overcommit.cpu,
            h.committed_memory_mib,
            h.committed_memory_mib as f64 / h.memory_mib.max(1) as f64,
            h.overcommit.memory,
        ),
    ]
}

/// The column widths for `rows`' cells: the NAME column fits the longest name, the others
/// are fixed (wider only for a figure that does not fit).
fn widths(rows: &[Vec<String>]) -> Vec<usize> {
    COLUMNS
        .iter()
        .enumerate()
        .map(|(i, (h, min, _))| rows.iter().map(|r| r[i].chars().count()).chain([h.len(), *min]).max().unwrap_or(*min))
        .collect()
}

/// One `--batch` block: the header lines, the table (columns separated by two spaces,
/// numbers right-aligned), a note when some rows' rates are since their start, and an
/// empty line. Plain text: no escape codes.
pub fn format_batch(v: &TopView, sort: SortKey) -> String {
    let first = v.interval_s.is_none();
    let mut rows = v.rows.clone();
    sort_rows(&mut rows, sort);
    let mut table: Vec<Vec<String>> = vec![COLUMNS.iter().map(|c| c.0.to_string()).collect()];
    table.extend(rows.iter().map(|r| cells(r, first)));
    let w = widths(&table);
    let mut s = header_lines(v, sort).join("\n") + "\n";
    for r in &table {
        let line: Vec<String> = r
            .iter()
            .zip(&w)
            .zip(COLUMNS)
            .map(|((c, &w), (_, _, right))| if right { format!("{c:>w$}") } else { format!("{c:<w$}") })
            .collect();
        s += line.join("  ").trim_end();
        s += "\n";
    }
    if table.iter().skip(1).any(|r| r[15].ends_with('*')) {
        s += "* rates averaged since the VM started (no earlier sample of this run)\n";
    }
    s + "\n"
}

fn parse_args(a: &TopArgs) -> Result<(Duration, SortKey, Option<u64>), Failure> {
    let interval = a
        .interval
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| (0.1..=3600.0).contains(s))
        .ok_or_else(|| failure(2, format!("--interval: '{}' (accepted: seconds from 0.1 to 3600)", a.interval)))?;
    let sort = a.sort.parse::<SortKey>().map_err(|e| failure(2, format!("--sort: {e}")))?;
    let iterations = match &a.iterations {
        None => None,
        Some(v) => Some(
            v.trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| failure(2, format!("--iterations: '{v}' (accepted: a whole number, 1 or more)")))?,
        ),
    };
    Ok((Duration::from_secs_f64(interval), sort, iterations))
}

/// How long the client waits for one sample: the daemon asks each VM's VMM (2 s each at
/// most).
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(60);

/// `rustvisor top`: exit status 0 when done (q, or `--iterations`), 1 when the daemon
/// cannot be reached or the output cannot be written, 2 for a bad flag or interactive
/// mode without a terminal.
pub fn top(a: TopArgs) -> ExitCode {
    let r = parse_args(&a).and_then(|(interval, sort, iterations)| {
        if a.batch {
            batch(&a.connect, interval, sort, iterations)
        } else {
            interactive(&a.connect, interval, sort, iterations)
        }
    });
    finish(r.map(|()| String::new()))
}

fn batch(connect: &Connect, interval: Duration, sort: SortKey, iterations: Option<u64>) -> Result<(), Failure> {
    let c = DaemonClient::new(&connect.connect, SAMPLE_TIMEOUT)?;
    let mut prev: Option<Stats> = None;
    let mut next = Instant::now();
    for n in 1.. {
        let cur: Stats = c.get("stats")?;
        let text = format_batch(&view(prev.as_ref(), &cur), sort);
        let mut out = io::stdout().lock();
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => {}
            // The reader went away (`| head`): done.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(failure(1, format!("cannot write the output: {e}"))),
        }
        drop(out);
        if iterations.is_some_and(|i| n >= i) {
            break;
        }
        prev = Some(cur);
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    Ok(())
}

/// The interactive screen's state: the last two samples, or the frozen pair while paused.
struct App {
    sort: SortKey,
    interval: Duration,
    prev: Option<Stats>,
    cur: Stats,
    frozen: Option<(Option<Stats>, Stats)>,
    /// The last sampling error (the daemon went away), shown until a sample arrives.
    error: Option<String>,
}

impl App {
    fn push(&mut self, s: Stats) {
        self.prev = Some(std::mem::replace(&mut self.cur, s));
        self.error = None;
    }

    fn toggle_pause(&mut self) {
        self.frozen = match self.frozen.take() {
            Some(_) => None,
            None => Some((self.prev.clone(), self.cur.clone())),
        };
    }

    fn view(&self) -> TopView {
        match &self.frozen {
            Some((p, c)) => view(p.as_ref(), c),
            None => view(self.prev.as_ref(), &self.cur),
        }
    }
}

/// Draws the screen: the header lines, the table (the sort column's header reversed), the
/// keys.
fn draw(f: &mut ratatui::Frame, app: &App) {
    let v = app.view();
    let mut header: Vec<Line> = header_lines(&v, app.sort).into_iter().map(Line::from).collect();
    let [top, table_area, keys] =
        Layout::vertical([Constraint::Length(header.len() as u16), Constraint::Min(1), Constraint::Length(1)])
            .areas(f.area());
    let first = v.interval_s.is_none();
    let mut rows = v.rows.clone();
    sort_rows(&mut rows, app.sort);
    let body: Vec<Vec<String>> = rows.iter().map(|r| cells(r, first)).collect();
    let w = widths(&body);
    let sorted = app.sort.column();
    let head = Row::new(COLUMNS.iter().enumerate().map(|(i, (h, _, _))| {
        let style = Style::new().add_modifier(Modifier::BOLD);
        Cell::from(*h).style(if i == sorted { style.add_modifier(Modifier::REVERSED) } else { style })
    }));
    let table_rows =
        body.iter().map(|r| {
            Row::new(r.iter().zip(&w).zip(COLUMNS).map(|((c, &w), (_, _, right))| {
                Cell::from(if right { format!("{c:>w$}") } else { format!("{c:<w$}") })
            }))
        });
    let table = Table::new(table_rows, w.iter().map(|w| Constraint::Length(*w as u16))).header(head).column_spacing(2);
    if let Some(e) = &app.error {
        header.truncate(2);
        header.push(Line::from(format!("error: {e} (retrying)")).style(Style::new().add_modifier(Modifier::BOLD)));
    }
    f.render_widget(Paragraph::new(header), top);
    f.render_widget(table, table_area);
    let state = if app.frozen.is_some() { "  PAUSED" } else { "" };
    let keys_line =
        format!("q quit  s sort ({})  p pause{state}  every {:.1} s", app.sort.as_str(), app.interval.as_secs_f64());
    f.render_widget(Paragraph::new(keys_line).style(Style::new().add_modifier(Modifier::REVERSED)), keys);
}

/// Puts the terminal back (raw mode off, the main screen) however the screen ends.
struct RestoreGuard;

impl Drop for RestoreGuard {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

fn interactive(connect: &Connect, interval: Duration, sort: SortKey, iterations: Option<u64>) -> Result<(), Failure> {
    if !io::stdout().is_terminal() {
        return Err(failure(
            2,
            "top: the output is not a terminal; use --batch for plain text (e.g. rustvisor top --batch --iterations 1)",
        ));
    }
    // The first sample before the screen changes, so a daemon that is not running is one
    // plain line.
    let c = DaemonClient::new(&connect.connect, SAMPLE_TIMEOUT)?;
    let first: Stats = c.get("stats")?;
    let (tx, rx) = mpsc::channel::<Result<Stats, Failure>>();
    std::thread::Builder::new()
        .name("top-sampler".into())
        .spawn(move || {
            let mut next = Instant::now();
            loop {
                next += interval;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
                if tx.send(c.get("stats")).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| failure(1, format!("cannot start the sampler: {e}")))?;
    let term_err = |e: io::Error| failure(1, format!("terminal: {e}"));
    let _guard = RestoreGuard;
    let mut terminal = ratatui::try_init().map_err(term_err)?;
    let mut app = App { sort, interval, prev: None, cur: first, frozen: None, error: None };
    // Frames shown so far (the first sample's is drawn at once).
    let mut shown = 1u64;
    let mut dirty = true;
    loop {
        if dirty {
            terminal.draw(|f| draw(f, &app)).map_err(term_err)?;
            dirty = false;
        }
        if event::poll(Duration::from_millis(100)).map_err(term_err)? {
            match event::read().map_err(term_err)? {
                TermEvent::Key(k) if k.kind == KeyEventKind::Press => match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => break,
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => break,
                    KeyCode::Char('s') => {
                        app.sort = app.sort.next();
                        dirty = true;
                    }
                    KeyCode::Char('p') => {
                        app.toggle_pause();
                        dirty = true;
                    }
                    _ => {}
                },
                TermEvent::Resize(..) => dirty = true,
                _ => {}
            }
        }
        while let Ok(sample) = rx.try_recv() {
            match sample {
                Ok(s) => {
                    // The last frame stays up for one interval, like the others.
                    if iterations.is_some_and(|i| shown >= i) {
                        return Ok(());
                    }
                    app.push(s);
                    shown += 1;
                }
                Err(e) => app.error = Some(e.message),
            }
            dirty = true;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use api::types::{BalloonInfo, BlockCounters, DeviceCounters, NetCounters};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    use super::*;
    use crate::types::{OvercommitPolicy, VcpuStats};

    fn host() -> HostInfo {
        HostInfo {
            cpus: 4,
            memory_mib: 8192,
            memory_available_mib: 6000,
            overcommit: OvercommitPolicy::default(),
            committed_vcpus: 6,
            committed_memory_mib: 2048,
            vms_up: 2,
            cgroups: "cgroup v2 at /sys/fs/cgroup/rustvisor.slice".into(),
        }
    }

    fn stopped(name: &str) -> VmStats {
        VmStats {
            name: name.into(),
            state: VmState::Stopped,
            cpus: 1,
            memory_mib: 256,
            accel: "emu".into(),
            restarts: 0,
            uptime_s: None,
            cpu_seconds: None,
            resident_bytes: None,
            ksm_merging_bytes: None,
            vcpus: vec![],
            cgroup_memory_bytes: None,
            cpu_throttled_seconds: None,
            devices: BTreeMap::new(),
            balloon: None,
        }
    }

    /// A running VM with 2 vCPUs, one disk and one NIC whose counters are all `k` times a
    /// base amount, up `uptime` seconds.
    fn running(name: &str, uptime: f64, k: u64) -> VmStats {
        let disk = DeviceCounters {
            block: Some(BlockCounters {
                read_ops: 10 * k,
                write_ops: 20 * k,
                read_bytes: k << 20,
                write_bytes: (2 * k) << 20,
                ..Default::default()
            }),
            ..Default::default()
        };
        let nic = DeviceCounters {
            net: Some(NetCounters {
                rx_bytes: 1024 * k,
                tx_bytes: 4096 * k,
                rx_dropped: k,
                tx_dropped: k,
                ..Default::default()
            }),
            ..Default::default()
        };
        VmStats {
            state: VmState::Running,
            cpus: 2,
            memory_mib: 1024,
            uptime_s: Some(uptime),
            cpu_seconds: Some(0.5 * k as f64),
            resident_bytes: Some(300 << 20),
            vcpus: vec![
                VcpuStats { vcpu: 0, cpu_seconds: 0.2 * k as f64, ready_seconds: 0.05 * k as f64 },
                VcpuStats { vcpu: 1, cpu_seconds: 0.2 * k as f64, ready_seconds: 0.15 * k as f64 },
            ],
            devices: [("disk0".to_string(), disk), ("net0".to_string(), nic)].into(),
            ..stopped(name)
        }
    }

    fn stats(time_ms: i64, vms: Vec<VmStats>) -> Stats {
        Stats { time_ms, host: host(), ksm: None, vms }
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn rates_over_the_interval() {
        // 2 s apart; counters from k=10 to k=14.
        let prev = stats(1_000_000, vec![running("a", 100.0, 10)]);
        let cur = stats(1_002_000, vec![running("a", 102.0, 14)]);
        let v = view(Some(&prev), &cur);
        assert_eq!(v.interval_s, Some(2.0));
        let r = &v.rows[0];
        assert!(!r.since_start);
        // CPU: 0.5 s × 4 = 2 s over 2 s = 100 %.
        assert!(close(r.cpu_pct, 100.0), "{:?}", r.cpu_pct);
        // Ready: (0.05 + 0.15) × 4 = 0.8 s over 2 s and 2 vCPUs = 20 %.
        assert!(close(r.ready_pct, 20.0), "{:?}", r.ready_pct);
        let d = r.disk.unwrap();
        assert_eq!((d.read_ops, d.write_ops), (20.0, 40.0));
        assert_eq!((d.read_bytes, d.write_bytes), (2.0 * MIB, 4.0 * MIB));
        let n = r.net.unwrap();
        assert_eq!((n.rx_bytes, n.tx_bytes, n.drops), (2048.0, 8192.0, 4.0));
        assert_eq!(r.resident_bytes, Some(300 << 20));
    }

    #[test]
    fn first_sample_averages_since_start() {
        // k=10 over 50 s of uptime.
        let v = view(None, &stats(1_000_000, vec![running("a", 50.0, 10), stopped("b")]));
        assert_eq!(v.interval_s, None);
        let a = &v.rows[0];
        assert!(a.since_start);
        assert!(close(a.cpu_pct, 10.0), "5 s of CPU over 50 s: {:?}", a.cpu_pct);
        assert!(close(a.ready_pct, 2.0), "2 s of ready over 50 s and 2 vCPUs: {:?}", a.ready_pct);
        assert_eq!(a.disk.unwrap().read_ops, 2.0);
        // A stopped VM has no figures at all.
        let b = &v.rows[1];
        assert_eq!((b.cpu_pct, b.ready_pct, b.disk, b.net, b.resident_bytes), (None, None, None, None, None));
    }

    #[test]
    fn appeared_disappeared_and_restarted_vms() {
        let prev = stats(1_000_000, vec![running("gone", 100.0, 10), running("restarted", 500.0, 100), stopped("new")]);
        // "restarted" crashed and came back 1 s ago with small counters; "new" started 4 s
        // ago; "late" was defined and started between the samples.
        let mut restarted = running("restarted", 1.0, 1);
        restarted.restarts = 1;
        let cur = stats(1_002_000, vec![restarted, running("new", 4.0, 2), running("late", 1.0, 1)]);
        let v = view(Some(&prev), &cur);
        assert_eq!(v.rows.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["restarted", "new", "late"]);
        for r in &v.rows {
            assert!(r.since_start, "{}", r.name);
            for x in [r.cpu_pct, r.ready_pct, r.disk.map(|d| d.read_bytes), r.net.map(|n| n.rx_bytes)] {
                let x = x.unwrap();
                assert!(x.is_finite() && x >= 0.0, "{}: {x}", r.name);
            }
        }
        // Since start: 0.5 s CPU over 1 s of uptime, not (0.5 − 50) / 2.
        assert!(close(v.rows[0].cpu_pct, 50.0), "{:?}", v.rows[0].cpu_pct);
        assert!(close(v.rows[1].cpu_pct, 25.0), "{:?}", v.rows[1].cpu_pct);
    }

    #[test]
    fn counters_going_backwards_never_give_negative_or_huge_rates() {
        // Same uptime progression and restart count, but the VMM's counters went back (a
        // restart the daemon did not count): since-start rates, not u64 wrap-arounds.
        let prev = stats(1_000_000, vec![running("a", 100.0, 1000)]);
        let cur = stats(1_002_000, vec![running("a", 102.0, 51)]);
        let r = &view(Some(&prev), &cur).rows[0];
        assert!(r.since_start);
        assert!(close(r.cpu_pct, 0.5 * 51.0 / 102.0 * 100.0), "{:?}", r.cpu_pct);
        let d = r.disk.unwrap();
        assert!(d.read_bytes < 1e9 && d.read_bytes >= 0.0, "{d:?}");
        // Only a disk's counter going back.
        let mut cur = running("a", 102.0, 1010);
        cur.devices.get_mut("disk0").unwrap().block.as_mut().unwrap().write_bytes = 0;
        let r = &view(Some(&prev), &stats(1_002_000, vec![cur])).rows[0];
        assert!(r.since_start);
        assert_eq!(r.disk.unwrap().write_bytes, 0.0);
        // Uptime going back: a new run.
        let r = &view(Some(&prev), &stats(1_002_000, vec![running("a", 1.5, 1010)])).rows[0];
        assert!(r.since_start);
        // The same time stamp twice (or a clock step back): no interval, since-start rates.
        let v = view(Some(&prev), &stats(999_000, vec![running("a", 102.0, 1010)]));
        assert_eq!(v.interval_s, None);
        assert!(v.rows[0].since_start);
    }

    #[test]
    fn a_device_set_change_or_gap_leaves_those_rates_out_for_one_sample() {
        let prev = stats(1_000_000, vec![running("a", 100.0, 10)]);
        let mut cur = running("a", 102.0, 14);
        cur.devices.insert("disk1".into(), cur.devices["disk0"].clone());
        let r = &view(Some(&prev), &stats(1_002_000, vec![cur])).rows[0];
        assert!(!r.since_start);
        assert_eq!(r.disk, None);
        assert!(r.net.is_some() && r.cpu_pct.is_some());
        // The previous sample missed the devices (the VMM's API did not answer in time).
        let mut p = running("a", 100.0, 10);
        p.devices.clear();
        let r = &view(Some(&stats(1_000_000, vec![p])), &stats(1_002_000, vec![running("a", 102.0, 14)])).rows[0];
        assert_eq!((r.disk, r.net), (None, None));
        assert!(close(r.cpu_pct, 100.0));
    }

    fn row_named(name: &str, cpu: Option<f64>, rss_mib: Option<u64>, io: Option<f64>) -> VmRow {
        VmRow {
            name: name.into(),
            state: VmState::Running,
            cpus: 1,
            uptime_s: Some(10.0),
            memory_mib: 512,
            resident_bytes: rss_mib.map(|m| m << 20),
            balloon_mib: None,
            cpu_pct: cpu,
            ready_pct: cpu.map(|c| 100.0 - c),
            disk: io.map(|b| DiskRates { read_bytes: b, ..Default::default() }),
            net: None,
            since_start: false,
        }
    }

    #[test]
    fn sorting() {
        let mut rows = vec![
            row_named("c", Some(5.0), Some(100), None),
            row_named("a", None, None, None),
            row_named("d", Some(50.0), Some(10), Some(1.0)),
            row_named("b", Some(5.0), Some(300), Some(9.0)),
        ];
        let names = |r: &[VmRow]| r.iter().map(|r| r.name.clone()).collect::<Vec<_>>().join("");
        sort_rows(&mut rows, SortKey::Cpu);
        assert_eq!(names(&rows), "dbca", "largest first, ties by name, no figure last");
        sort_rows(&mut rows, SortKey::Ready);
        assert_eq!(names(&rows), "bcda");
        sort_rows(&mut rows, SortKey::Mem);
        assert_eq!(names(&rows), "bcda");
        sort_rows(&mut rows, SortKey::Io);
        assert_eq!(names(&rows), "bdac");
        sort_rows(&mut rows, SortKey::Net);
        assert_eq!(names(&rows), "abcd", "nobody has NICs: by name");
        sort_rows(&mut rows, SortKey::Name);
        assert_eq!(names(&rows), "abcd");
        let mut k = SortKey::Cpu;
        let mut seen = vec![];
        for _ in 0..6 {
            seen.push(k.as_str());
            k = k.next();
        }
        assert_eq!((seen.join(","), k), ("cpu,ready,mem,io,net,name".to_string(), SortKey::Cpu));
        assert_eq!("io".parse::<SortKey>(), Ok(SortKey::Io));
        assert!("disk".parse::<SortKey>().unwrap_err().contains("accepted: cpu, ready"));
    }

    #[test]
    fn batch_block() {
        let mut big = running("web-frontend-01", 102.0, 14);
        big.balloon =
            Some(BalloonInfo { target_mib: 128, actual_mib: 100, stats: None, stats_age_s: None, reported_mib: 0 });
        let prev = stats(1_700_000_000_000, vec![running("web-frontend-01", 100.0, 10), running("db", 50.0, 10)]);
        let cur =
            stats(1_700_000_002_000, vec![big, running("db", 52.0, 11), stopped("idle"), running("fresh", 3.0, 3)]);
        let text = format_batch(&view(Some(&prev), &cur), SortKey::Cpu);
        let expected = "\
rustvisor top - 2023-11-14 22:13:22.000Z  rates over the last 2.0 s  sort: cpu
host: 4 CPUs, 8192 MiB for VMs, 6000 MiB available; KSM unknown; cgroups: cgroup v2 at /sys/fs/cgroup/rustvisor.slice
VMs: 4 (3 running, 0 paused, 1 stopped, 0 crashed); 2 up commit 6 vCPUs (1.50 per CPU, policy 4) and 2048 MiB (0.25x, policy 1)
NAME             STATE     VCPU    %CPU    %RDY  RES_MiB  MEM_MiB  BAL_MiB  RD_OPS/s  WR_OPS/s  RD_MiB/s  WR_MiB/s  RX_KiB/s  TX_KiB/s  DROP/s  UPTIME
web-frontend-01  running      2   100.0    20.0      300     1024      100      20.0      40.0      2.00      4.00       2.0       8.0     4.0  1m42s
fresh            running      2    50.0    10.0      300     1024        -      10.0      20.0      1.00      2.00       1.0       4.0     2.0  3s*
db               running      2    25.0     5.0      300     1024        -       5.0      10.0      0.50      1.00       0.5       2.0     1.0  52s
idle             stopped      1       -       -        -      256        -         -         -         -         -         -         -       -  -
* rates averaged since the VM started (no earlier sample of this run)

";
        assert_eq!(text, expected, "got:\n{text}");
        assert!(!text.contains('\x1b'), "no escape codes");
        let mut with_ksm = cur.clone();
        with_ksm.ksm = Some(vmm::ksm::HostKsm { run: 1, pages_sharing: 2560, page_size: 4096, ..Default::default() });
        let text = format_batch(&view(None, &with_ksm), SortKey::Cpu);
        assert!(text.lines().nth(1).unwrap().contains("; KSM on, 10 MiB saved; "), "{text}");
        // A first block: no interval, no '*' marks (every row is since start).
        let first = format_batch(&view(None, &cur), SortKey::Name);
        assert!(first
            .lines()
            .next()
            .unwrap()
            .ends_with("first sample: rates are averages since each VM started  sort: name"));
        assert!(!first.contains('*'), "{first}");
        let names: Vec<&str> = first.lines().skip(4).filter_map(|l| l.split_whitespace().next()).collect();
        assert_eq!(names, ["db", "fresh", "idle", "web-frontend-01"]);
    }

    #[test]
    fn flags() {
        let a = |interval: &str, sort: &str, iterations: Option<&str>| TopArgs {
            connect: Connect { connect: "/nonexistent.sock".into() },
            interval: interval.into(),
            sort: sort.into(),
            batch: true,
            iterations: iterations.map(String::from),
        };
        let (i, s, n) = parse_args(&a("0.5", "net", Some("3"))).unwrap();
        assert_eq!((i, s, n), (Duration::from_millis(500), SortKey::Net, Some(3)));
        for (bad, flag) in [
            (a("0", "cpu", None), "--interval"),
            (a("soon", "cpu", None), "--interval"),
            (a("NaN", "cpu", None), "--interval"),
            (a("2", "disk", None), "--sort"),
            (a("2", "cpu", Some("0")), "--iterations"),
            (a("2", "cpu", Some("-1")), "--iterations"),
        ] {
            let e = parse_args(&bad).unwrap_err();
            assert_eq!(e.code, 2);
            assert!(e.message.starts_with(flag), "{}", e.message);
            assert!(!e.message.contains('\n'));
        }
        // A daemon that is not there: one line, exit status 1.
        let e = batch(&a("2", "cpu", Some("1")).connect, Duration::from_secs(1), SortKey::Cpu, Some(1)).unwrap_err();
        assert_eq!(e.code, 1);
        assert!(e.message.contains("cannot connect to the daemon"), "{}", e.message);
    }

    #[test]
    fn screen() {
        let prev = stats(1_700_000_000_000, vec![running("web", 100.0, 10), stopped("idle")]);
        let cur = stats(1_700_000_002_000, vec![running("web", 102.0, 14), stopped("idle")]);
        let mut app = App {
            sort: SortKey::Cpu,
            interval: Duration::from_secs(2),
            prev: Some(prev),
            cur: cur.clone(),
            frozen: None,
            error: None,
        };
        let mut t = Terminal::new(TestBackend::new(160, 12)).unwrap();
        let text = |t: &Terminal<TestBackend>| {
            let b = t.backend().buffer();
            (0..b.area.height)
                .map(|y| (0..b.area.width).map(|x| b[(x, y)].symbol()).collect::<String>().trim_end().to_string())
                .collect::<Vec<_>>()
        };
        t.draw(|f| draw(f, &app)).unwrap();
        let lines = text(&t);
        assert!(lines[0].contains("rates over the last 2.0 s"), "{lines:#?}");
        assert!(lines[3].starts_with("NAME") && lines[3].contains("%CPU") && lines[3].contains("UPTIME"), "{lines:#?}");
        assert!(lines[4].starts_with("web") && lines[4].contains("100.0"), "{lines:#?}");
        assert!(lines[5].starts_with("idle"), "{lines:#?}");
        assert!(lines[11].contains("q quit") && lines[11].contains("sort (cpu)"), "{lines:#?}");
        // Pause: new samples do not change the screen.
        app.toggle_pause();
        app.push(stats(1_700_000_004_000, vec![stopped("idle")]));
        app.sort = app.sort.next();
        t.draw(|f| draw(f, &app)).unwrap();
        let lines = text(&t);
        assert!(lines[4].starts_with("web"), "{lines:#?}");
        assert!(lines[11].contains("PAUSED") && lines[11].contains("sort (ready)"), "{lines:#?}");
        app.toggle_pause();
        app.error = Some("cannot connect to the daemon".into());
        t.draw(|f| draw(f, &app)).unwrap();
        let lines = text(&t);
        assert!(lines[2].contains("error: cannot connect"), "{lines:#?}");
        assert!(lines[4].starts_with("idle"), "{lines:#?}");
        assert!(!lines.iter().any(|l| l.starts_with("web")), "{lines:#?}");
    }
}
