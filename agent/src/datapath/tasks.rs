//! The task census: for each task on the host, its descriptor table, the table's count of
//! references and the task's cgroup, read by a task iterator program (`aw_task_tables`).
//!
//! `enroll` asks it whether a task outside a unit shares one of the unit's descriptor tables
//! (cloned with `CLONE_FILES` and moved out, or a thread of one). Listing tasks cannot answer
//! that alone: a chain of sharers, each cloning the next and exiting, stays ahead of any
//! listing. The kernel counts every task using a table in the table itself, so the answer is
//! the count. While the unit is frozen its tasks make no clones, so once a table's count
//! equals the unit's tasks using it, no task outside uses it, then or later.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Read as _};
use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};

use agent_common::TaskTable;

use super::sys;

/// How many times the census is read again, at most, while a table's count differs from its
/// users or the unit's rows differ between two readings (a unit task dying of SIGKILL while
/// frozen, say), before the enroll is refused.
const READINGS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum CensusError {
    #[error(
        "the task census is not loaded ({0}): enroll cannot tell whether a task outside the unit shares its descriptor tables"
    )]
    Unavailable(String),
    #[error("reading the task census: {0}")]
    Read(#[source] io::Error),
    #[error("the task census read {0} bytes, not a whole number of rows: another build's program?")]
    Torn(usize),
    #[error(
        "task {inside} shares its descriptor table with task {outside}, outside the cgroup (cloned with CLONE_FILES): that task can put descriptors in it that no hook judges as the unit's"
    )]
    Outside { inside: u32, outside: u32 },
    #[error(
        "the descriptor table of task {inside} has {count} references, and {users} of the unit's tasks use it: a task outside the cgroup (cloned with CLONE_FILES) shares it, made where the census had passed: it can put descriptors in it that no hook judges as the unit's"
    )]
    Uncounted { inside: u32, users: u32, count: u32 },
    #[error(
        "task {0} of the unit is not in the task census (it exited while the unit was frozen, or the kernel's task layout is not known)"
    )]
    Missing(u32),
    #[error(
        "task {0} is in the unit's cgroups and was not when the unit's descriptors were read (moved in while it was frozen)"
    )]
    Joined(u32),
    #[error(
        "the unit's tasks or their descriptor tables changed between two readings of the task census"
    )]
    Unsteady,
}

/// The census program, attached as an iterator: each read of a new iterator made from the link
/// walks every task again.
pub struct TaskCensus {
    link: OwnedFd,
}

impl TaskCensus {
    /// Links the loaded census program `prog` as an iterator.
    pub fn link(prog: BorrowedFd<'_>) -> io::Result<Self> {
        Ok(Self {
            link: sys::iter_link(prog)?,
        })
    }

    /// Every row, from one walk over the host's tasks.
    pub fn read(&self) -> Result<Vec<TaskTable>, CensusError> {
        let iter = sys::iter_create(self.link.as_fd()).map_err(CensusError::Read)?;
        let mut iter = std::fs::File::from(iter);
        let mut bytes = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match iter.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
                // The kernel yields after a million tasks with nothing written yet.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) => {}
                Err(e) => return Err(CensusError::Read(e)),
            }
        }
        rows(&bytes)
    }

    /// Whether a task outside the unit (its cgroups `own`, its tasks `unit` as listed when its
    /// descriptors were read, all frozen) shares one of the unit's descriptor tables. Two
    /// readings must agree on the unit's rows: each reading's counts were then taken while
    /// every unit task counted held its table (a task that drops its table shows none after).
    pub fn sharers(&self, own: &HashSet<u64>, unit: &HashSet<u32>) -> Result<(), CensusError> {
        let mut last = Err(CensusError::Unsteady);
        for _ in 0..READINGS {
            let first = self.read()?;
            let second = self.read()?;
            last = judge(&first, own, unit)
                .and_then(|a| Ok((a, judge(&second, own, unit)?)))
                .and_then(|(a, b)| {
                    if a == b {
                        Ok(())
                    } else {
                        Err(CensusError::Unsteady)
                    }
                });
            match &last {
                Ok(()) | Err(CensusError::Outside { .. } | CensusError::Joined(_)) => return last,
                Err(_) => {}
            }
        }
        last
    }
}

/// The rows in `bytes`, as the program wrote them.
fn rows(bytes: &[u8]) -> Result<Vec<TaskTable>, CensusError> {
    const ROW: usize = std::mem::size_of::<TaskTable>();
    if !bytes.len().is_multiple_of(ROW) {
        return Err(CensusError::Torn(bytes.len()));
    }
    Ok(bytes
        .chunks_exact(ROW)
        .map(|r| {
            let word = |at: usize| u64::from_ne_bytes(r[at..at + 8].try_into().expect("8 bytes"));
            let half = |at: usize| u32::from_ne_bytes(r[at..at + 4].try_into().expect("4 bytes"));
            TaskTable {
                files: word(0),
                cgroup: word(8),
                tid: half(16),
                count: half(20),
            }
        })
        .collect())
}

/// The unit's rows of one reading, `(tid, table)` in order, once it is judged: every unit task
/// is there, no other task is in the unit's cgroups, no task outside them has a unit table in
/// its row, and each unit table's count is the unit's tasks using it.
fn judge(
    rows: &[TaskTable],
    own: &HashSet<u64>,
    unit: &HashSet<u32>,
) -> Result<Vec<(u32, u64)>, CensusError> {
    let mut inside: Vec<(u32, u64)> = Vec::new();
    // Each unit table: its users in the unit, and one of them to name.
    let mut tables: BTreeMap<u64, (u32, u32)> = BTreeMap::new();
    for r in rows.iter().filter(|r| own.contains(&r.cgroup)) {
        // An exited leader stays in its cgroup, out of the listing, until its last thread
        // exits; without a table (exited, or made without one) a task holds nothing to read.
        if !unit.contains(&r.tid) && r.files == 0 {
            continue;
        }
        if !unit.contains(&r.tid) {
            return Err(CensusError::Joined(r.tid));
        }
        inside.push((r.tid, r.files));
        // A task without a table (a vhost worker, made with none) shares none.
        if r.files != 0 {
            tables.entry(r.files).or_insert((0, r.tid)).0 += 1;
        }
    }
    inside.sort_unstable();
    if let Some(&tid) = unit
        .iter()
        .find(|&&t| inside.binary_search_by_key(&t, |(tid, _)| *tid).is_err())
    {
        return Err(CensusError::Missing(tid));
    }
    // A task outside seen is named before any count is weighed.
    let unit_tables = || {
        rows.iter()
            .filter_map(|r| Some((r, *tables.get(&r.files)?)))
    };
    if let Some((r, (_, named))) = unit_tables().find(|(r, _)| !own.contains(&r.cgroup)) {
        return Err(CensusError::Outside {
            inside: named,
            outside: r.tid,
        });
    }
    if let Some((r, (users, named))) = unit_tables().find(|(r, (users, _))| r.count != *users) {
        return Err(CensusError::Uncounted {
            inside: named,
            users,
            count: r.count,
        });
    }
    Ok(inside)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(tid: u32, files: u64, cgroup: u64, count: u32) -> TaskTable {
        TaskTable {
            files,
            cgroup,
            tid,
            count,
        }
    }

    fn set<T: std::hash::Hash + Eq + Copy>(v: &[T]) -> HashSet<T> {
        v.iter().copied().collect()
    }

    #[test]
    fn a_unit_whose_tables_only_its_tasks_use_passes() {
        // Two processes, one with a thread; a task outside with its own table.
        let rows = [
            row(10, 0xa, 7, 2),
            row(11, 0xa, 7, 2),
            row(12, 0xb, 8, 1),
            row(20, 0xc, 1, 1),
        ];
        let got = judge(&rows, &set(&[7, 8]), &set(&[10, 11, 12])).unwrap();
        assert_eq!(got, vec![(10, 0xa), (11, 0xa), (12, 0xb)]);
    }

    #[test]
    fn a_unit_task_without_a_table_is_in_the_census_and_shares_none() {
        // A vhost worker of the unit, and kernel threads outside: none has a table.
        let rows = [row(10, 0xa, 7, 1), row(11, 0, 7, 0), row(2, 0, 1, 0)];
        let got = judge(&rows, &set(&[7]), &set(&[10, 11])).unwrap();
        assert_eq!(got, vec![(10, 0xa), (11, 0)]);
    }

    #[test]
    fn a_task_outside_using_a_unit_table_is_named() {
        let rows = [row(10, 0xa, 7, 2), row(30, 0xa, 1, 2)];
        let err = judge(&rows, &set(&[7]), &set(&[10])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "task 10 shares its descriptor table with task 30, outside the cgroup (cloned with CLONE_FILES): that task can put descriptors in it that no hook judges as the unit's"
        );
    }

    #[test]
    fn a_reference_the_rows_do_not_show_refuses() {
        // The sharer was made behind the walk: only the count says it is there.
        let rows = [row(10, 0xa, 7, 2)];
        let err = judge(&rows, &set(&[7]), &set(&[10])).unwrap_err();
        assert!(matches!(
            err,
            CensusError::Uncounted {
                inside: 10,
                users: 1,
                count: 2
            }
        ));
        assert!(
            err.to_string()
                .contains("outside the cgroup (cloned with CLONE_FILES)")
        );
    }

    #[test]
    fn a_unit_task_missing_or_one_that_joined_refuses() {
        // No rows at all (an unknown layout writes none) is never a pass.
        let err = judge(&[], &set(&[7]), &set(&[10])).unwrap_err();
        assert!(matches!(err, CensusError::Missing(10)));
        let rows = [row(10, 0xa, 7, 1), row(40, 0xd, 7, 1)];
        let err = judge(&rows, &set(&[7]), &set(&[10])).unwrap_err();
        assert!(matches!(err, CensusError::Joined(40)));
        // A leader that called pthread_exit: a zombie in the unit's cgroup, out of its
        // listing, without a table. It holds nothing.
        let rows = [row(10, 0xa, 7, 1), row(9, 0, 7, 0)];
        assert_eq!(
            judge(&rows, &set(&[7]), &set(&[10])).unwrap(),
            vec![(10, 0xa)]
        );
        // A unit task whose cgroup could not be read (0) counts as one outside.
        let rows = [row(10, 0xa, 0, 1)];
        let err = judge(&rows, &set(&[7]), &set(&[10])).unwrap_err();
        assert!(matches!(err, CensusError::Missing(10)));
    }

    #[test]
    fn rows_are_read_whole() {
        let r = row(10, 0xa, 7, 2);
        // SAFETY: TaskTable is repr(C), integers only, no padding.
        let bytes: &[u8] = unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref(&r).cast(),
                std::mem::size_of::<TaskTable>(),
            )
        };
        assert_eq!(rows(bytes).unwrap(), vec![r]);
        assert!(matches!(rows(&bytes[..20]), Err(CensusError::Torn(20))));
    }
}
