//! Automatic ballooning: when the memory left for VMs runs low, the daemon inflates the
//! balloons of its idlest guests (never leaving a guest less than its `balloon_min_mib`),
//! and when memory is plentiful again it deflates them, busiest guest first — the policy of
//! Proxmox VE's auto-ballooning, with a low and a high watermark so it does not oscillate.
//! [`plan`] is the pure decision; the supervisor feeds it every few seconds and sends the
//! new sizes to the VMMs (`PUT vm.balloon`, virtio 1.2 §5.5).

/// When and how fast the policy acts, MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermarks {
    /// Reclaim from guests while the memory available for VMs is below this.
    pub low_mib: u64,
    /// Give memory back while the memory available is above this (and reclaim up to it).
    pub high_mib: u64,
    /// The most one VM's balloon moves per round.
    pub step_mib: u64,
}

impl Watermarks {
    /// 10% and 20% of `total_mib`, in steps of 64 MiB.
    pub fn for_host(total_mib: u64) -> Watermarks {
        Watermarks { low_mib: total_mib / 10, high_mib: total_mib / 5, step_mib: 64 }
    }
}

/// A running VM the policy may balloon.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Its name.
    pub name: String,
    /// Its guest RAM, MiB.
    pub memory_mib: u64,
    /// The least RAM to leave it, MiB.
    pub min_mib: u64,
    /// Its balloon's size now (the target last set), MiB.
    pub balloon_mib: u64,
    /// How busy it was lately: host CPU seconds per second of its VMM.
    pub busy: f64,
}

impl Candidate {
    /// MiB more its balloon may take.
    fn room(&self) -> u64 {
        self.memory_mib.saturating_sub(self.min_mib).saturating_sub(self.balloon_mib)
    }
}

/// The balloon sizes to set this round: (VM, new size in MiB), only for VMs that change.
pub fn plan(available_mib: u64, marks: Watermarks, vms: &[Candidate]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    if available_mib < marks.low_mib {
        // Reclaim up to the high watermark, the idlest guests first.
        let mut need = marks.high_mib.saturating_sub(available_mib);
        let mut order: Vec<&Candidate> = vms.iter().filter(|v| v.room() > 0).collect();
        order.sort_by(|a, b| a.busy.total_cmp(&b.busy).then_with(|| a.name.cmp(&b.name)));
        for v in order {
            if need == 0 {
                break;
            }
            let take = v.room().min(marks.step_mib).min(need);
            need -= take;
            out.push((v.name.clone(), v.balloon_mib + take));
        }
    } else if available_mib > marks.high_mib {
        // Give back what stays above the high watermark, the busiest guests first.
        let mut spare = available_mib - marks.high_mib;
        let mut order: Vec<&Candidate> = vms.iter().filter(|v| v.balloon_mib > 0).collect();
        order.sort_by(|a, b| b.busy.total_cmp(&a.busy).then_with(|| a.name.cmp(&b.name)));
        for v in order {
            if spare == 0 {
                break;
            }
            let give = v.balloon_mib.min(marks.step_mib).min(spare);
            spare -= give;
            out.push((v.name.clone(), v.balloon_mib - give));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, balloon: u64, busy: f64) -> Candidate {
        Candidate { name: name.into(), memory_mib: 1024, min_mib: 512, balloon_mib: balloon, busy }
    }

    const MARKS: Watermarks = Watermarks { low_mib: 1000, high_mib: 2000, step_mib: 64 };

    #[test]
    fn low_memory_inflates_the_idlest_first_never_below_the_minimum() {
        let vms = [vm("busy", 0, 0.9), vm("idle", 0, 0.01), vm("full", 512, 0.0)];
        // Short by 1100 MiB of the high watermark: one step from each that has room.
        assert_eq!(plan(900, MARKS, &vms), [("idle".to_string(), 64), ("busy".to_string(), 64)]);
        // Short by only 10 MiB.
        assert_eq!(plan(999, Watermarks { high_mib: 1009, ..MARKS }, &vms), [("idle".to_string(), 10)]);
        // A step never passes the minimum.
        let near = [vm("near", 500, 0.0)];
        assert_eq!(plan(0, MARKS, &near), [("near".to_string(), 512)]);
    }

    #[test]
    fn plenty_deflates_the_busiest_first_and_between_the_marks_nothing_moves() {
        let vms = [vm("a", 128, 0.1), vm("b", 32, 0.5), vm("c", 0, 1.0)];
        assert_eq!(plan(3000, MARKS, &vms), [("b".to_string(), 0), ("a".to_string(), 64)]);
        assert_eq!(plan(2040, MARKS, &vms), [("b".to_string(), 0), ("a".to_string(), 120)]);
        assert!(plan(1500, MARKS, &vms).is_empty());
        assert!(plan(3000, MARKS, &[]).is_empty());
        assert_eq!(Watermarks::for_host(24_000), Watermarks { low_mib: 2400, high_mib: 4800, step_mib: 64 });
    }
}
