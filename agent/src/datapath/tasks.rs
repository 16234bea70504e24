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
    pub fn read(&self) -> Result<Vec<Row>, CensusError> {
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
    /// On a pass, what the census says of the unit's io_uring use.
    pub fn sharers(
        &self,
        own: &HashSet<u64>,
        unit: &HashSet<u32>,
    ) -> Result<UnitRings, CensusError> {
        let mut last = Err(CensusError::Unsteady);
        for _ in 0..READINGS {
            let first = self.read()?;
            let second = self.read()?;
            last = judge(&first, own, unit)
                .and_then(|a| Ok((a, judge(&second, own, unit)?)))
                .and_then(|(a, b)| {
                    if a == b {
                        Ok(a)
                    } else {
                        Err(CensusError::Unsteady)
                    }
                })
                .map(|inside| UnitRings {
                    users: inside.iter().filter(|u| u.uring).map(|u| u.tid).collect(),
                    registered: inside
                        .into_iter()
                        .flat_map(|u| u.rings.into_iter().map(move |ino| (u.tid, ino)))
                        .collect(),
                });
            match &last {
                Ok(_) | Err(CensusError::Outside { .. } | CensusError::Joined(_)) => return last,
                Err(_) => {}
            }
        }
        last
    }

    /// The tasks in the cgroups `own` with an io_uring context or a ring registered with
    /// themselves, in order of task, from one reading.
    pub fn ring_users(&self, own: &HashSet<u64>) -> Result<Vec<u32>, CensusError> {
        Ok(ring_users(&self.read()?, own))
    }
}

fn ring_users(rows: &[Row], own: &HashSet<u64>) -> Vec<u32> {
    let mut users: Vec<u32> = rows
        .iter()
        .filter(|r| own.contains(&r.table.cgroup) && (r.table.uring != 0 || !r.rings.is_empty()))
        .map(|r| r.table.tid)
        .collect();
    users.sort_unstable();
    users.dedup();
    users
}

/// One task's row, with the inodes of the io_uring instances it registered with itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub table: TaskTable,
    pub rings: Vec<u64>,
}

/// The rows in `bytes`, as the program wrote them: each [`TaskTable`] followed by its
/// `rings` slots, of which the inodes of those holding a ring are kept.
fn rows(bytes: &[u8]) -> Result<Vec<Row>, CensusError> {
    const ROW: usize = std::mem::size_of::<TaskTable>();
    let torn = || CensusError::Torn(bytes.len());
    let take = |at: usize, n: usize| bytes.get(at..at + n).ok_or_else(torn);
    let word = |at| {
        Ok(u64::from_ne_bytes(
            take(at, 8)?.try_into().expect("8 bytes"),
        ))
    };
    let half = |at| {
        Ok(u32::from_ne_bytes(
            take(at, 4)?.try_into().expect("4 bytes"),
        ))
    };
    let (mut out, mut at) = (Vec::new(), 0);
    while at < bytes.len() {
        if bytes.len() - at < ROW {
            return Err(torn());
        }
        let table = TaskTable {
            files: word(at)?,
            cgroup: word(at + 8)?,
            tid: half(at + 16)?,
            count: half(at + 20)?,
            rings: half(at + 24)?,
            uring: half(at + 28)?,
        };
        at += ROW;
        if table.rings as usize > agent_common::MAX_REGISTERED_RINGS {
            return Err(torn());
        }
        let mut rings = Vec::new();
        for i in 0..table.rings as usize {
            // (file, inode): a file in the slot is a ring.
            if word(at + 16 * i)? != 0 {
                rings.push(word(at + 16 * i + 8)?);
            }
        }
        at += 16 * table.rings as usize;
        out.push(Row { table, rings });
    }
    Ok(out)
}

/// A unit task as one reading of the census shows it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Inside {
    tid: u32,
    files: u64,
    rings: Vec<u64>,
    uring: bool,
}

/// What the census says of the unit's io_uring use, once it has passed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UnitRings {
    /// The unit's tasks with an io_uring context: each made or entered a ring, or is a
    /// ring's SQPOLL thread.
    pub users: Vec<u32>,
    /// The rings the unit's tasks registered with themselves, `(task, inode)`: rings no
    /// descriptor may show.
    pub registered: Vec<(u32, u64)>,
}

/// The unit's rows of one reading, in order of task, once it is judged: every unit task is
/// there, no other task is in the unit's cgroups, no task outside them has a unit table in
/// its row, and each unit table's count is the unit's tasks using it.
fn judge(
    rows: &[Row],
    own: &HashSet<u64>,
    unit: &HashSet<u32>,
) -> Result<Vec<Inside>, CensusError> {
    let mut inside: Vec<Inside> = Vec::new();
    // Each unit table: its users in the unit, and one of them to name.
    let mut tables: BTreeMap<u64, (u32, u32)> = BTreeMap::new();
    for row in rows.iter().filter(|r| own.contains(&r.table.cgroup)) {
        let r = &row.table;
        // An exited leader stays in its cgroup, out of the listing, until its last thread
        // exits; without a table (exited, or made without one) a task holds nothing to read.
        if !unit.contains(&r.tid) && r.files == 0 {
            continue;
        }
        if !unit.contains(&r.tid) {
            return Err(CensusError::Joined(r.tid));
        }
        inside.push(Inside {
            tid: r.tid,
            files: r.files,
            rings: row.rings.clone(),
            uring: r.uring != 0,
        });
        // A task without a table (a vhost worker, made with none) shares none.
        if r.files != 0 {
            tables.entry(r.files).or_insert((0, r.tid)).0 += 1;
        }
    }
    inside.sort_unstable();
    if let Some(&tid) = unit
        .iter()
        .find(|&&t| inside.binary_search_by_key(&t, |u| u.tid).is_err())
    {
        return Err(CensusError::Missing(tid));
    }
    // A task outside seen is named before any count is weighed.
    let unit_tables = || {
        rows.iter()
            .map(|r| &r.table)
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

    fn row(tid: u32, files: u64, cgroup: u64, count: u32) -> Row {
        Row {
            table: TaskTable {
                files,
                cgroup,
                tid,
                count,
                ..TaskTable::default()
            },
            rings: Vec::new(),
        }
    }

    /// `(task, table)` of each unit task judged.
    fn tables(inside: Vec<Inside>) -> Vec<(u32, u64)> {
        inside.into_iter().map(|u| (u.tid, u.files)).collect()
    }

    fn set<T: std::hash::Hash + Eq + Copy>(v: &[T]) -> HashSet<T> {
        v.iter().copied().collect()
    }

    #[test]
    fn ring_users_are_the_tasks_in_the_cgroups_with_a_context_or_a_registered_ring() {
        let mut context = row(11, 0xa, 7, 2);
        context.table.uring = 1;
        let mut registered = row(12, 0xb, 8, 1);
        registered.rings = vec![4242];
        let mut outside = row(20, 0xc, 1, 1);
        outside.table.uring = 1;
        let rows = [row(10, 0xa, 7, 2), registered, context, outside];
        assert_eq!(ring_users(&rows, &set(&[7, 8])), vec![11, 12]);
        assert!(ring_users(&rows, &set(&[9])).is_empty());
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
        let got = tables(judge(&rows, &set(&[7, 8]), &set(&[10, 11, 12])).unwrap());
        assert_eq!(got, vec![(10, 0xa), (11, 0xa), (12, 0xb)]);
    }

    #[test]
    fn a_unit_task_without_a_table_is_in_the_census_and_shares_none() {
        // A vhost worker of the unit, and kernel threads outside: none has a table.
        let rows = [row(10, 0xa, 7, 1), row(11, 0, 7, 0), row(2, 0, 1, 0)];
        let got = tables(judge(&rows, &set(&[7]), &set(&[10, 11])).unwrap());
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
            tables(judge(&rows, &set(&[7]), &set(&[10])).unwrap()),
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
                std::ptr::from_ref(&r.table).cast(),
                std::mem::size_of::<TaskTable>(),
            )
        };
        assert_eq!(rows(bytes).unwrap(), vec![r.clone()]);
        assert!(matches!(rows(&bytes[..20]), Err(CensusError::Torn(20))));
        // A task with two registered rings (slots 0 and 2 of three): its row, then its
        // slots; then the next row.
        let mut with = bytes.to_vec();
        with[24..28].copy_from_slice(&3u32.to_ne_bytes());
        with[28..32].copy_from_slice(&1u32.to_ne_bytes());
        for (file, ino) in [(0xf1u64, 77u64), (0, 0), (0xf3, 78)] {
            with.extend_from_slice(&file.to_ne_bytes());
            with.extend_from_slice(&ino.to_ne_bytes());
        }
        with.extend_from_slice(bytes);
        let got = rows(&with).unwrap();
        assert_eq!(got[0].rings, vec![77, 78]);
        assert_eq!((got[0].table.rings, got[0].table.uring), (3, 1));
        assert_eq!(got[1], r);
        // Inodes cut short, or more than a task can register: another build's program.
        assert!(matches!(rows(&with[..40]), Err(CensusError::Torn(40))));
        let mut many = bytes.to_vec();
        many[24..28].copy_from_slice(&17u32.to_ne_bytes());
        many.extend_from_slice(&[0; 17 * 16]);
        assert!(matches!(rows(&many), Err(CensusError::Torn(_))));
    }

    #[test]
    fn a_unit_tasks_registered_rings_are_in_its_reading() {
        let mut r = row(10, 0xa, 7, 1);
        (r.table.rings, r.table.uring) = (1, 1);
        r.rings = vec![4242];
        let got = judge(&[r, row(20, 0xb, 1, 1)], &set(&[7]), &set(&[10])).unwrap();
        assert_eq!(
            got,
            vec![Inside {
                tid: 10,
                files: 0xa,
                rings: vec![4242],
                uring: true,
            }]
        );
    }
}
