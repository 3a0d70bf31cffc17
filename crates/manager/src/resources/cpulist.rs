//! Linux CPU lists ("0-3,6", `cpuset(7)` "List format"): the shape of `cpuset.cpus`,
//! `/sys/devices/system/cpu/online` and `--cpuset`.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// The highest CPU number a list may name (+1): the size of the kernel's `cpu_set_t` in
/// glibc (`CPU_SETSIZE`).
pub const MAX_CPUS: u32 = 1024;

/// A set of host CPU numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct CpuList(BTreeSet<u32>);

impl CpuList {
    /// The CPUs `cpus`.
    pub fn of(cpus: impl IntoIterator<Item = u32>) -> CpuList {
        CpuList(cpus.into_iter().collect())
    }

    /// CPUs 0 to `n - 1`.
    pub fn first(n: u32) -> CpuList {
        CpuList((0..n).collect())
    }

    /// The host's online CPUs (`/sys/devices/system/cpu/online`), or `None` when unreadable.
    pub fn online() -> Option<CpuList> {
        std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?.trim().parse().ok()
    }

    /// Whether it names no CPU.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many CPUs it names.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it names `cpu`.
    pub fn contains(&self, cpu: u32) -> bool {
        self.0.contains(&cpu)
    }

    /// Whether every CPU of `self` is in `other`.
    pub fn is_subset(&self, other: &CpuList) -> bool {
        self.0.is_subset(&other.0)
    }

    /// The CPUs of `self` not in `other`.
    pub fn without(&self, other: &CpuList) -> CpuList {
        CpuList(self.0.difference(&other.0).copied().collect())
    }

    /// The CPUs in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }
}

impl FromStr for CpuList {
    type Err = String;

    /// Parses "0-3,6" (ranges and single CPUs, commas between; blanks ignored; an empty
    /// string is the empty set). Errors name the bad part and the accepted shape.
    fn from_str(s: &str) -> Result<CpuList, String> {
        let mut set = BTreeSet::new();
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        if s.is_empty() {
            return Ok(CpuList(set));
        }
        let bad = |part: &str| format!("'{part}' (accepted: CPU numbers 0 to {} and ranges, e.g. 0-3,6)", MAX_CPUS - 1);
        for part in s.split(',') {
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (a, b),
                None => (part, part),
            };
            let lo: u32 = lo.parse().map_err(|_| bad(part))?;
            let hi: u32 = hi.parse().map_err(|_| bad(part))?;
            if lo > hi || hi >= MAX_CPUS {
                return Err(bad(part));
            }
            set.extend(lo..=hi);
        }
        Ok(CpuList(set))
    }
}

impl fmt::Display for CpuList {
    /// The shortest list: consecutive CPUs as ranges ("0-3,6").
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut it = self.0.iter().copied().peekable();
        while let Some(lo) = it.next() {
            let mut hi = lo;
            while it.peek() == Some(&(hi + 1)) {
                hi += 1;
                it.next();
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_lists() {
        let l: CpuList = "0-3,6, 8-9".parse().unwrap();
        assert_eq!(l.iter().collect::<Vec<_>>(), [0, 1, 2, 3, 6, 8, 9]);
        assert_eq!(l.to_string(), "0-3,6,8-9");
        assert_eq!("5".parse::<CpuList>().unwrap().to_string(), "5");
        assert_eq!("3,1,2".parse::<CpuList>().unwrap().to_string(), "1-3");
        assert!("".parse::<CpuList>().unwrap().is_empty());
        for bad in ["a", "3-1", "1-", "-1", "1,,2", "1024", "0-5000"] {
            let e = bad.parse::<CpuList>().unwrap_err();
            assert!(e.contains("accepted"), "{bad}: {e}");
        }
    }

    #[test]
    fn set_operations() {
        let all = CpuList::first(4);
        let pinned = CpuList::of([1, 2]);
        assert_eq!(all.without(&pinned).to_string(), "0,3");
        assert!(pinned.is_subset(&all));
        assert!(!all.is_subset(&pinned));
        assert!(CpuList::online().is_some_and(|l| l.contains(0)));
    }
}
