//! The binding table: `AW_BINDINGS` (cgroup id → binding), which the hooks read walking a
//! task's cgroup ancestry, and its copy in `AW_BINDING_SLOTS`, which the packet line reads on
//! every packet with an array lookup (a socket notes its binding's slot at creation).
//!
//! The hash map is the authority; a slot is a copy the kernel trusts only while its cgroup id
//! is the socket's. So the copy is written in full before the binding names it, changes
//! nothing but `revoked` afterwards (a renewal takes a fresh slot), and loses its cgroup id
//! before the binding goes: a packet reading a slot mid-write sees this binding or no match
//! (then the hash map), never another binding's fields under this cgroup's id.

use std::{collections::VecDeque, os::fd::AsFd as _};

use aya::maps::{Array, HashMap, MapData, MapError};
use tracing::warn;

use agent_common::{self as c, Binding, BindingSlot};

use super::{DatapathError, map_err, sys};

const SLOTS: u32 = c::BINDING_SLOTS;

pub(super) struct Bindings {
    map: HashMap<MapData, u64, Binding>,
    slots: Array<MapData, BindingSlot>,
    /// Slots no binding names, the longest unused first: a slot let go is reused last.
    free: VecDeque<u32>,
}

impl Bindings {
    /// Adopts the pinned tables: the slot copies are rewritten from the bindings in one batch
    /// (a slot named twice or out of range, which only a foreign writer could leave, gets a
    /// fresh one), and slots no binding names are cleared.
    pub(super) fn open(
        map: HashMap<MapData, u64, Binding>,
        slots: Array<MapData, BindingSlot>,
    ) -> Result<Self, DatapathError> {
        let entries = map
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(c::MAP_BINDINGS))?;
        let mut values = vec![BindingSlot::default(); SLOTS as usize];
        let mut stray = vec![];
        for (cgroup_id, b) in entries {
            match values.get_mut(b.slot as usize) {
                Some(v) if v.cgroup_id == 0 => {
                    *v = BindingSlot {
                        cgroup_id,
                        binding: b,
                    }
                }
                _ => stray.push((cgroup_id, b)),
            }
        }
        let free = (0..SLOTS)
            .filter(|&i| values[i as usize].cgroup_id == 0)
            .collect();
        let keys: Vec<u8> = (0..SLOTS).flat_map(u32::to_ne_bytes).collect();
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| {
                // SAFETY: BindingSlot is plain old data (repr(C), explicit padding).
                unsafe {
                    std::slice::from_raw_parts(
                        std::ptr::from_ref(v).cast::<u8>(),
                        std::mem::size_of::<BindingSlot>(),
                    )
                }
                .iter()
                .copied()
            })
            .collect();
        let fd = aya::maps::IterableMap::map(&slots).fd().as_fd();
        sys::map_update_batch_raw(fd, &keys, &bytes, SLOTS as usize).map_err(|(_, source)| {
            DatapathError::Io {
                path: c::MAP_BINDING_SLOTS.into(),
                source,
            }
        })?;
        let mut this = Self { map, slots, free };
        for (cgroup_id, b) in stray {
            warn!(
                cgroup_id,
                slot = b.slot,
                "binding without a slot of its own: given one"
            );
            this.insert(cgroup_id, b)?;
        }
        Ok(this)
    }

    /// Binds `cgroup_id` (or replaces its binding: renewal) in a fresh slot. On an error the
    /// binding in force stays in force (a renewal's old slot may have been let go: its sockets
    /// then read the binding itself).
    pub(super) fn insert(&mut self, cgroup_id: u64, mut b: Binding) -> Result<(), DatapathError> {
        let old = self.get(cgroup_id)?;
        let slot = self.free.pop_front().ok_or(DatapathError::BindingsFull {
            max: c::MAX_BINDINGS,
        })?;
        b.slot = slot;
        // The fields first, under no cgroup id, then the id: a socket of this cgroup that
        // noted this slot index long ago never reads this cgroup's id over a previous
        // binding's fields.
        for cgroup in [0, cgroup_id] {
            let copy = BindingSlot {
                cgroup_id: cgroup,
                binding: b,
            };
            if let Err(e) = self.slots.set(slot, copy, 0) {
                let _ = self.slots.set(slot, BindingSlot::default(), 0);
                self.free.push_back(slot);
                return Err(map_err(c::MAP_BINDING_SLOTS)(e));
            }
        }
        // A renewal lets the old slot go before the binding changes, so no slot is left
        // naming this cgroup with the old binding's fields whatever fails next.
        if let Some(old) = old {
            if let Err(e) = self.release(cgroup_id, old) {
                let _ = self.slots.set(slot, BindingSlot::default(), 0);
                self.free.push_back(slot);
                return Err(e);
            }
        }
        if let Err(e) = self.map.insert(cgroup_id, b, 0) {
            // Unnamed, so no socket has noted it since it was written.
            let _ = self.slots.set(slot, BindingSlot::default(), 0);
            self.free.push_back(slot);
            return Err(match e {
                // A hash map with every entry taken refuses a new key with E2BIG.
                MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                    DatapathError::BindingsFull {
                        max: c::MAX_BINDINGS,
                    }
                }
                e => map_err(c::MAP_BINDINGS)(e),
            });
        }
        Ok(())
    }

    /// Marks a binding revoked: the slot copy first, since the packet line reads it.
    pub(super) fn revoke(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        let mut b = self
            .map
            .get(&cgroup_id, 0)
            .map_err(map_err(c::MAP_BINDINGS))?;
        b.revoked = 1;
        if self.names(b.slot, cgroup_id)? {
            self.slots
                .set(
                    b.slot,
                    BindingSlot {
                        cgroup_id,
                        binding: b,
                    },
                    0,
                )
                .map_err(map_err(c::MAP_BINDING_SLOTS))?;
        }
        self.map
            .insert(cgroup_id, b, 0)
            .map_err(map_err(c::MAP_BINDINGS))
    }

    /// Removes a binding: its slot loses the cgroup id first, so no packet reads the copy of a
    /// binding that is gone.
    pub(super) fn remove(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        let Some(b) = self.get(cgroup_id)? else {
            return Ok(());
        };
        self.release(cgroup_id, b)?;
        match self.map.remove(&cgroup_id) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
                Ok(())
            }
            Err(e) => Err(map_err(c::MAP_BINDINGS)(e)),
        }
    }

    pub(super) fn get(&self, cgroup_id: u64) -> Result<Option<Binding>, DatapathError> {
        match self.map.get(&cgroup_id, 0) {
            Ok(b) => Ok(Some(b)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(c::MAP_BINDINGS)(e)),
        }
    }

    pub(super) fn entries(&self) -> Result<Vec<(u64, Binding)>, DatapathError> {
        self.map
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(c::MAP_BINDINGS))
    }

    pub(super) fn count(&self) -> usize {
        self.map.keys().count()
    }

    /// Whether `slot` holds the copy of `cgroup_id`'s binding.
    fn names(&self, slot: u32, cgroup_id: u64) -> Result<bool, DatapathError> {
        if slot >= SLOTS {
            return Ok(false);
        }
        let v = self
            .slots
            .get(&slot, 0)
            .map_err(map_err(c::MAP_BINDING_SLOTS))?;
        Ok(v.cgroup_id == cgroup_id)
    }

    /// Takes the cgroup id off the slot of `cgroup_id`'s binding `b` (only that field
    /// changes) and frees it. A slot holding another cgroup's copy is left alone.
    fn release(&mut self, cgroup_id: u64, b: Binding) -> Result<(), DatapathError> {
        if !self.names(b.slot, cgroup_id)? {
            return Ok(());
        }
        self.slots
            .set(
                b.slot,
                BindingSlot {
                    cgroup_id: 0,
                    binding: b,
                },
                0,
            )
            .map_err(map_err(c::MAP_BINDING_SLOTS))?;
        self.free.push_back(b.slot);
        Ok(())
    }
}
