//! Where this kernel keeps what the receipt line reads beyond the layouts that never change:
//! an inet socket's FREEBIND and TRANSPARENT flags, found in the kernel's BTF. Linux 6.5
//! moved them from bitfields of `struct inet_sock` into the bits of its `inet_flags`, and
//! where `inet_sock` begins them depends on the size of `struct sock`, which each kernel's
//! configuration sets: no offset compiled into the programs would hold everywhere.

use std::path::{Path, PathBuf};

use agent_common::{KERNEL_FIELDS, KernelLayout, TaskLayout};
use btf::btf::{Btf, StructMember, Type};

/// Where the running kernel publishes its BTF.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("reading the kernel's BTF from {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: btf::Error,
    },
    #[error("the kernel's BTF at {path} has no struct {name}")]
    NoStruct { path: PathBuf, name: &'static str },
    #[error("the kernel's BTF at {path} has no field {strukt}.{field}")]
    NoField {
        path: PathBuf,
        strukt: &'static str,
        field: &'static str,
    },
    #[error(
        "the kernel's BTF at {path} puts {strukt}.{field} at byte {found}, where the LSM programs read byte {expected}"
    )]
    Moved {
        path: PathBuf,
        strukt: &'static str,
        field: &'static str,
        expected: usize,
        found: u64,
    },
    #[error(
        "the kernel's BTF at {path} has neither inet_sock.inet_flags with INET_FLAGS_{flag} nor the bitfield {strukt}.{field}"
    )]
    NoFlag {
        path: PathBuf,
        flag: &'static str,
        strukt: &'static str,
        field: &'static str,
    },
    #[error("no system call table is known on {arch}")]
    NoSyscallTable { arch: &'static str },
    #[error("the kernel's BTF at {path} has no enumerator {name}")]
    NoEnumerator { path: PathBuf, name: &'static str },
    #[error(
        "the kernel's BTF at {path} has {strukt}.{what} as {found}, where the task census reads {expected} bytes"
    )]
    Size {
        path: PathBuf,
        strukt: &'static str,
        what: &'static str,
        expected: u32,
        found: String,
    },
    #[error("the kernel keeps {what} at byte {byte}, past where the programs read (4096)")]
    TooFar { what: &'static str, byte: u64 },
    #[error("the kernel keeps {what} at bit {bit}, not at the start of a byte")]
    Unaligned { what: &'static str, bit: u64 },
    #[error(
        "the kernel's BTF at {path} has sk_buff.end as something other than a 4-byte offset from its head"
    )]
    EndNotOffset { path: PathBuf },
    #[error(
        "the kernel's BTF at {path} puts SKBFL_SHARED_FRAG or SKBFL_ZEROCOPY_ENABLE past the first byte of skb_shared_info.flags (mask {mask:#x})"
    )]
    FlagsPastByte { path: PathBuf, mask: u64 },
}

/// A kernel's BTF, parsed (tens of megabytes while it lives: keep it only while asking).
pub struct KernelBtf {
    path: PathBuf,
    btf: Btf,
}

impl KernelBtf {
    pub fn read(path: &Path) -> Result<Self, LayoutError> {
        let btf = Btf::from_file(path).map_err(|source| LayoutError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            path: path.to_owned(),
            btf,
        })
    }

    fn members(&self, name: &'static str) -> Result<&[StructMember], LayoutError> {
        match self.btf.get_type_by_name(name).map(|t| &t.base_type) {
            Ok(Type::Struct(s)) => Ok(&s.members),
            _ => Err(LayoutError::NoStruct {
                path: self.path.clone(),
                name,
            }),
        }
    }

    /// The bit offset and type of field `name` among `members`, looking into anonymous
    /// structs and unions (`skc_daddr` sits in one inside another).
    fn field(&self, members: &[StructMember], name: &str, depth: u8) -> Option<(u64, u32)> {
        for m in members {
            if m.name.as_deref() == Some(name) {
                return Some((u64::from(m.offset), m.type_id));
            }
            // The parser names an anonymous member "".
            if m.name.as_deref().unwrap_or_default().is_empty() && depth < 4 {
                let Some(inner) = self.members_of(m.type_id) else {
                    continue;
                };
                if let Some((bit, ty)) = self.field(inner, name, depth + 1) {
                    return Some((u64::from(m.offset) + bit, ty));
                }
            }
        }
        None
    }

    /// The members of struct or union `type_id`, through typedefs and qualifiers (`struct
    /// file` keeps a `const struct path`).
    fn members_of(&self, mut type_id: u32) -> Option<&[StructMember]> {
        for _ in 0..8 {
            match &self.btf.get_type_by_id(type_id).ok()?.base_type {
                Type::Struct(s) | Type::Union(s) => return Some(&s.members),
                Type::Typedef(t) | Type::Volatile(t) | Type::Const(t) | Type::Restrict(t) => {
                    type_id = t.type_id;
                }
                _ => return None,
            }
        }
        None
    }

    /// The bit offset of `path` (a field, a field of that field's struct, ...) in `members`.
    fn bit_of(&self, members: &[StructMember], path: &[&str]) -> Option<u64> {
        let (mut members, mut bits) = (members, 0);
        for (i, name) in path.iter().enumerate() {
            let (bit, ty) = self.field(members, name, 0)?;
            bits += bit;
            if i + 1 < path.len() {
                members = self.members_of(ty)?;
            }
        }
        Some(bits)
    }

    /// Each of [`KERNEL_FIELDS`] where the programs read it.
    pub fn check_fields(&self) -> Result<(), LayoutError> {
        for f in &KERNEL_FIELDS {
            let members = self.members(f.strukt)?;
            let bit = self
                .bit_of(members, &[f.field])
                .ok_or_else(|| LayoutError::NoField {
                    path: self.path.clone(),
                    strukt: f.strukt,
                    field: f.field,
                })?;
            if bit % 8 != 0 || bit / 8 != f.at as u64 {
                return Err(LayoutError::Moved {
                    path: self.path.clone(),
                    strukt: f.strukt,
                    field: f.field,
                    expected: f.at,
                    found: bit / 8,
                });
            }
        }
        Ok(())
    }

    /// Where this kernel keeps an inet socket's FREEBIND and TRANSPARENT flags: the
    /// `*_at` and `*_mask` fields of [`KernelLayout`], the others 0.
    pub fn inet_flags(&self) -> Result<KernelLayout, LayoutError> {
        let bit_of = |flag, field| {
            self.inet_flag(flag, field)?
                .ok_or_else(|| self.no_flag(flag, "inet_sock", field))
        };
        let (freebind_at, freebind_mask) =
            byte_of("FREEBIND flag", bit_of("FREEBIND", "freebind")?)?;
        let (transparent_at, transparent_mask) =
            byte_of("TRANSPARENT flag", bit_of("TRANSPARENT", "transparent")?)?;
        Ok(KernelLayout {
            freebind_at,
            transparent_at,
            freebind_mask,
            transparent_mask,
            ..KernelLayout::default()
        })
    }

    /// The bit (from the socket) of inet socket flag `INET_FLAGS_{flag}` in `inet_flags`
    /// (Linux 6.5 and later), else of the one-bit field `field` of `struct inet_sock`; None
    /// where neither is.
    fn inet_flag(&self, flag: &str, field: &str) -> Result<Option<u64>, LayoutError> {
        match self.in_inet_flags(flag)? {
            Some(bit) => Ok(Some(bit)),
            None => Ok(self.one_bit(self.members("inet_sock")?, field)),
        }
    }

    /// The bit (from the socket) of `INET_FLAGS_{flag}` in `inet_sock.inet_flags`; None on a
    /// kernel without that word or that flag.
    fn in_inet_flags(&self, flag: &str) -> Result<Option<u64>, LayoutError> {
        let members = self.members("inet_sock")?;
        // `struct inet_sock` begins with its `struct sock`: an offset in it is one from `sk`.
        Ok(self
            .bit_of(members, &["inet_flags"])
            .zip(self.enum_value(&format!("INET_FLAGS_{flag}")))
            // `inet_flags` is an unsigned long the kernel's bitops index from its least
            // significant bit: on a little-endian machine bit n is in byte n / 8.
            .map(|(word, bit)| word + bit))
    }

    /// The bit offset of one-bit field `field` among `members`.
    fn one_bit(&self, members: &[StructMember], field: &str) -> Option<u64> {
        members
            .iter()
            .find(|m| m.name.as_deref() == Some(field) && m.bits == Some(1))
            .map(|m| u64::from(m.offset))
    }

    fn no_flag(
        &self,
        flag: &'static str,
        strukt: &'static str,
        field: &'static str,
    ) -> LayoutError {
        LayoutError::NoFlag {
            path: self.path.clone(),
            flag,
            strukt,
            field,
        }
    }

    /// Where this kernel keeps the flag that opens an inet socket's ICMP error queue
    /// (`IP_RECVERR`): the byte and the mask in it.
    pub fn recverr(&self) -> Result<(u16, u8), LayoutError> {
        let v4 = self
            .inet_flag("RECVERR", "recverr")?
            .ok_or_else(|| self.no_flag("RECVERR", "inet_sock", "recverr"))?;
        byte_of("RECVERR flag", v4)
    }

    /// The same for an IPv6 socket (`IPV6_RECVERR`): the `recverr6_*` and `pinet6_at` fields
    /// of [`KernelLayout`], the others 0.
    pub fn recverr6(&self) -> Result<KernelLayout, LayoutError> {
        // Linux 6.7 moved IPv6's flag into `inet_flags` too; before, it is a bit of the
        // socket's `struct ipv6_pinfo`, which `inet_sock.pinet6` points to.
        let (v6, pinet6_at) = match self.in_inet_flags("RECVERR6")? {
            Some(bit) => (bit, 0),
            None => {
                let pinfo = self.members("ipv6_pinfo")?;
                let bit = self
                    .one_bit(pinfo, "recverr")
                    .ok_or_else(|| self.no_flag("RECVERR6", "ipv6_pinfo", "recverr"))?;
                let at = self.sized_at("inet_sock", &["pinet6"], "pinet6", 8)?;
                let at = u16::try_from(at).map_err(|_| LayoutError::TooFar {
                    what: "inet_sock.pinet6",
                    byte: u64::from(at),
                })?;
                (bit, at)
            }
        };
        let (recverr6_at, recverr6_mask) = byte_of("RECVERR6 flag", v6)?;
        Ok(KernelLayout {
            recverr6_at,
            recverr6_mask,
            pinet6_at,
            ..KernelLayout::default()
        })
    }

    /// Where the saved registers keep the number of the system call a task is in, and the
    /// native `setsockopt`'s number (see [`KernelLayout::syscall_nr_at`]).
    pub fn syscall_nr(&self) -> Result<(u16, u16), LayoutError> {
        // The numbers are each architecture's system call table's, which BTF does not carry.
        #[cfg(target_arch = "x86_64")]
        let (field, size, setsockopt) = ("orig_ax", 8, 54);
        #[cfg(target_arch = "aarch64")]
        let (field, size, setsockopt) = ("syscallno", 4, 208);
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        return Err(LayoutError::NoSyscallTable {
            arch: std::env::consts::ARCH,
        });
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        {
            let at = self.sized_at("pt_regs", &[field], "the system call's number", size)?;
            let at = u16::try_from(at).map_err(|_| LayoutError::TooFar {
                what: "pt_regs's system call number",
                byte: u64::from(at),
            })?;
            Ok((at, setsockopt))
        }
    }

    /// Where the receipt line reads whether a socket was made within the attach point (see
    /// [`KernelLayout::sk_cgroup_at`]): those fields of a [`KernelLayout`], the others 0.
    /// Linux 6.0 and later (`cgroup.ancestors`; before, `ancestor_ids`, which is not read).
    pub fn socket_cgroup(&self) -> Result<KernelLayout, LayoutError> {
        let short = |what: &'static str, at: u32| {
            u16::try_from(at).map_err(|_| LayoutError::TooFar {
                what,
                byte: u64::from(at),
            })
        };
        let sk_cgroup_at = self.sized_at(
            "sock",
            &["sk_cgrp_data", "cgroup"],
            "sk_cgrp_data.cgroup",
            8,
        )?;
        let level_at = self.sized_at("cgroup", &["level"], "level", 4)?;
        let kn_at = self.sized_at("cgroup", &["kn"], "kn", 8)?;
        let kn_id_at = self.sized_at("kernfs_node", &["id"], "id", 8)?;
        // A flexible array of pointers: no size to check.
        let ancestors_at = self.byte_in("cgroup", &["ancestors"], "ancestors")?;
        Ok(KernelLayout {
            sk_cgroup_at: short("sock.sk_cgrp_data.cgroup", sk_cgroup_at)?,
            cgroup_level_at: short("cgroup.level", level_at)?,
            cgroup_ancestors_at: ancestors_at,
            cgroup_kn_at: short("cgroup.kn", kn_at)?,
            kn_id_at: short("kernfs_node.id", kn_id_at)?,
            ..KernelLayout::default()
        })
    }

    /// Where `struct sock` keeps `SOCK_BINDADDR_LOCK` (bit 2 of `sk_userlocks`, a 4-bit
    /// field before Linux 6.x and a byte since; bit 2 is the same bit either way on a
    /// little-endian machine).
    pub fn bindaddr_lock(&self) -> Result<(u16, u8), LayoutError> {
        let field = self
            .members("sock")?
            .iter()
            .find(|m| m.name.as_deref() == Some("sk_userlocks"))
            .ok_or_else(|| LayoutError::NoField {
                path: self.path.clone(),
                strukt: "sock",
                field: "sk_userlocks",
            })?;
        match field.bits.unwrap_or(0) {
            0 | 4..=8 => byte_of("sk_userlocks", u64::from(field.offset) + 2),
            _ => Err(LayoutError::Unaligned {
                what: "sk_userlocks",
                bit: u64::from(field.offset),
            }),
        }
    }

    /// Where `struct sock` says a task holds its lock (`sk_lock.owned`, an int).
    pub fn owned_at(&self) -> Result<u16, LayoutError> {
        self.byte_in("sock", &["sk_lock", "owned"], "sk_lock.owned")
    }

    /// The byte offset in struct `strukt` of the field at `path`, which must start a byte.
    fn byte_in(
        &self,
        strukt: &'static str,
        path: &[&str],
        what: &'static str,
    ) -> Result<u16, LayoutError> {
        let bit = self
            .bit_of(self.members(strukt)?, path)
            .ok_or_else(|| LayoutError::NoField {
                path: self.path.clone(),
                strukt,
                field: what,
            })?;
        match byte_of(what, bit)? {
            (at, 1) => Ok(at),
            _ => Err(LayoutError::Unaligned { what, bit }),
        }
    }

    /// Where the task census reads each task's descriptor table and its count of references,
    /// its number, and its cgroup's id (see [`TaskLayout`]).
    pub fn task_layout(&self) -> Result<TaskLayout, LayoutError> {
        Ok(TaskLayout {
            files_at: self.sized_at("task_struct", &["files"], "files", 8)?,
            pid_at: self.sized_at("task_struct", &["pid"], "pid", 4)?,
            cgroups_at: self.sized_at("task_struct", &["cgroups"], "cgroups", 8)?,
            count_at: self.sized_at("files_struct", &["count", "counter"], "count.counter", 4)?,
            dfl_cgrp_at: self.sized_at("css_set", &["dfl_cgrp"], "dfl_cgrp", 8)?,
            kn_at: self.sized_at("cgroup", &["kn"], "kn", 8)?,
            kn_id_at: self.sized_at("kernfs_node", &["id"], "id", 8)?,
            ..self.registered_rings()?
        })
    }

    /// Where the census reads a task's io_uring context and the io_uring instances it
    /// registered with itself: neither on a kernel without io_uring (no
    /// `task_struct.io_uring`), no registered rings before Linux 5.18 (no
    /// `io_uring_task.registered_rings`), where no task has any.
    fn registered_rings(&self) -> Result<TaskLayout, LayoutError> {
        let has = |strukt: &'static str, field: &str| {
            self.members(strukt)
                .is_ok_and(|m| self.field(m, field, 0).is_some())
        };
        if !has("task_struct", "io_uring") {
            return Ok(TaskLayout::default());
        }
        let uring_at = self.sized_at("task_struct", &["io_uring"], "io_uring", 8)?;
        if !has("io_uring_task", "registered_rings") {
            return Ok(TaskLayout {
                uring_at,
                ..TaskLayout::default()
            });
        }
        let slots = agent_common::MAX_REGISTERED_RINGS as u32;
        Ok(TaskLayout {
            uring_at,
            rings_at: self.sized_at(
                "io_uring_task",
                &["registered_rings"],
                "registered_rings",
                8 * slots,
            )?,
            f_inode_at: self.sized_at("file", &["f_inode"], "f_inode", 8)?,
            i_ino_at: self.sized_at("inode", &["i_ino"], "i_ino", 8)?,
            ..TaskLayout::default()
        })
    }

    /// The byte where `path` in `strukt` starts, checked to be a field of `size` bytes (an
    /// integer or a pointer) that starts on a byte.
    fn sized_at(
        &self,
        strukt: &'static str,
        path: &[&str],
        what: &'static str,
        size: u32,
    ) -> Result<u32, LayoutError> {
        let no_field = || LayoutError::NoField {
            path: self.path.clone(),
            strukt,
            field: what,
        };
        let (mut members, mut bits, mut ty) = (self.members(strukt)?, 0, 0);
        for (i, name) in path.iter().enumerate() {
            let (bit, t) = self.field(members, name, 0).ok_or_else(no_field)?;
            (bits, ty) = (bits + bit, t);
            if i + 1 < path.len() {
                members = self.members_of(t).ok_or_else(no_field)?;
            }
        }
        match self.size_of(ty) {
            Some(found) if found == size => {}
            found => {
                return Err(LayoutError::Size {
                    path: self.path.clone(),
                    strukt,
                    what,
                    expected: size,
                    found: found.map_or_else(
                        || "something other than an integer or a pointer".to_owned(),
                        |f| format!("{f} bytes"),
                    ),
                });
            }
        }
        if bits % 8 != 0 {
            return Err(LayoutError::Unaligned { what, bit: bits });
        }
        u32::try_from(bits / 8).map_err(|_| no_field())
    }

    /// Where a file's name is read (see [`KernelLayout::file_dentry_at`]): `f_path.dentry`
    /// in `struct file`, then `d_name.len` and `d_name.name` in `struct dentry`.
    pub fn file_name(&self) -> Result<(u16, u16, u16), LayoutError> {
        Ok((
            self.byte_in("file", &["f_path", "dentry"], "f_path.dentry")?,
            self.byte_in("dentry", &["d_name", "len"], "d_name.len")?,
            self.byte_in("dentry", &["d_name", "name"], "d_name.name")?,
        ))
    }

    /// Where `struct sock` keeps its protocol (a u16 since Linux 5.6).
    pub fn protocol_at(&self) -> Result<u16, LayoutError> {
        let sock = self.members("sock")?;
        let field = sock
            .iter()
            .find(|m| m.name.as_deref() == Some("sk_protocol"))
            .ok_or_else(|| LayoutError::NoField {
                path: self.path.clone(),
                strukt: "sock",
                field: "sk_protocol",
            })?;
        let bit = u64::from(field.offset);
        // A bitfield before 5.6: not a byte the program could read whole.
        if field.bits.unwrap_or(0) != 0 {
            return Err(LayoutError::Unaligned {
                what: "sk_protocol",
                bit,
            });
        }
        match byte_of("sk_protocol", bit)? {
            (at, 1) => Ok(at),
            _ => Err(LayoutError::Unaligned {
                what: "sk_protocol",
                bit,
            }),
        }
    }

    /// Where `struct msghdr` keeps a send's flags (bytes from its start).
    pub fn msg_flags_at(&self) -> Result<u16, LayoutError> {
        match self.byte_in("msghdr", &["msg_flags"], "msg_flags")? {
            0 => Err(LayoutError::Unaligned {
                what: "msghdr.msg_flags",
                bit: 0,
            }),
            at => Ok(at),
        }
    }

    /// Where the packet line reads whether a packet's data is in pages its sender shares
    /// (see [`KernelLayout::shared_frag_mask`]): the `skb_*`, `shinfo_*` and mask fields of a
    /// [`KernelLayout`], the others 0.
    pub fn shared_frags(&self) -> Result<KernelLayout, LayoutError> {
        let skb = self.members("sk_buff")?;
        let skb_head_at = self.byte_in("sk_buff", &["head"], "head")?;
        let skb_end_at = self.byte_in("sk_buff", &["end"], "end")?;
        // `end` is an offset from `head` (a 4-byte `sk_buff_data_t`) wherever longs are 64
        // bits; a pointer elsewhere, which the program does not read.
        let (_, end_type) = self.field(skb, "end", 0).ok_or(LayoutError::NoField {
            path: self.path.clone(),
            strukt: "sk_buff",
            field: "end",
        })?;
        if self.size_of(end_type) != Some(4) {
            return Err(LayoutError::EndNotOffset {
                path: self.path.clone(),
            });
        }
        let shinfo_flags_at = self.byte_in("skb_shared_info", &["flags"], "flags")?;
        let mut mask = 0u64;
        for flag in ["SKBFL_SHARED_FRAG", "SKBFL_ZEROCOPY_ENABLE"] {
            mask |= self.enum_value(flag).ok_or(LayoutError::NoEnumerator {
                path: self.path.clone(),
                name: flag,
            })?;
        }
        let shared_frag_mask = u8::try_from(mask).map_err(|_| LayoutError::FlagsPastByte {
            path: self.path.clone(),
            mask,
        })?;
        Ok(KernelLayout {
            skb_head_at,
            skb_end_at,
            shinfo_flags_at,
            shared_frag_mask,
            ..KernelLayout::default()
        })
    }

    /// The size in bytes of type `id`, through typedefs and qualifiers.
    fn size_of(&self, mut id: u32) -> Option<u32> {
        for _ in 0..8 {
            let t = self.btf.get_type_by_id(id).ok()?;
            // The parser gives a pointer as its pointee, with the indirections counted.
            if t.num_refs > 0 {
                return Some(8);
            }
            match &t.base_type {
                Type::Integer(i) => return Some(i.bits / 8),
                Type::Pointer(_) => return Some(8),
                Type::Array(a) => return Some(a.num_elements * self.size_of(a.elem_type_id)?),
                Type::Typedef(t) | Type::Volatile(t) | Type::Const(t) | Type::Restrict(t) => {
                    id = t.type_id;
                }
                _ => return None,
            }
        }
        None
    }

    /// Where `struct sock` counts the bytes of received data a socket holds.
    pub fn rmem_alloc_at(&self) -> Result<u16, LayoutError> {
        self.byte_in(
            "sock",
            &["sk_backlog", "rmem_alloc", "counter"],
            "sk_backlog.rmem_alloc.counter",
        )
    }

    /// The value of the enumerator `name` in any enum (the kernel's `INET_FLAGS_*` are
    /// members of an anonymous one).
    fn enum_value(&self, name: &str) -> Option<u64> {
        self.btf
            .get_types()
            .iter()
            .find_map(|t| match &t.base_type {
                Type::Enum32(e) | Type::Enum64(e) => e
                    .entries
                    .iter()
                    .find(|en| en.name.as_deref() == Some(name))
                    .and_then(|en| u64::try_from(en.value).ok()),
                _ => None,
            })
    }
}

/// The byte holding bit `bit`, and the bit's mask in it; within where the receipt line reads.
fn byte_of(what: &'static str, bit: u64) -> Result<(u16, u8), LayoutError> {
    let byte = bit / 8;
    match u16::try_from(byte) {
        Ok(b) if byte < 4096 => Ok((b, 1u8 << (bit % 8))),
        _ => Err(LayoutError::TooFar { what, byte }),
    }
}

// A bit numbered from the least significant end of a word is in byte n / 8 only where the
// least significant byte comes first.
const _: () = assert!(cfg!(target_endian = "little"));

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF file as the kernel's format documentation lays it out: header, types, strings.
    struct BtfFile {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    const BTF_KIND_INT: u32 = 1;
    const BTF_KIND_PTR: u32 = 2;
    const BTF_KIND_STRUCT: u32 = 4;
    const BTF_KIND_UNION: u32 = 5;
    const BTF_KIND_ENUM: u32 = 6;
    const BTF_KIND_CONST: u32 = 10;

    impl BtfFile {
        fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
            }
        }
        fn name(&mut self, s: &str) -> u32 {
            let at = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            at
        }
        fn words(&mut self, words: &[u32]) {
            for w in words {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
        }
        /// Type 1 (the first added): an 8-byte unsigned int.
        fn int(&mut self) {
            let n = self.name("long unsigned int");
            self.words(&[n, BTF_KIND_INT << 24, 8, 64]);
        }
        /// Members: (name, offset in bits, bitfield size or 0), all of type 1.
        fn strukt(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) {
            let typed: Vec<_> = members.iter().map(|&(m, o, b)| (m, o, b, 1)).collect();
            self.typed(BTF_KIND_STRUCT, name, size, &typed);
        }
        /// Members: (name, offset in bits, bitfield size or 0, type id); "" is anonymous.
        fn typed(&mut self, kind: u32, name: &str, size: u32, members: &[(&str, u32, u32, u32)]) {
            let n = if name.is_empty() { 0 } else { self.name(name) };
            let bitfields = members.iter().any(|m| m.2 != 0);
            let info = (kind << 24) | (u32::from(bitfields) << 31) | members.len() as u32;
            self.words(&[n, info, size]);
            for &(m, off, bits, ty) in members {
                let mn = if m.is_empty() { 0 } else { self.name(m) };
                let off = if bitfields { (bits << 24) | off } else { off };
                self.words(&[mn, ty, off]);
            }
        }
        fn constant(&mut self, ty: u32) {
            self.words(&[0, BTF_KIND_CONST << 24, ty]);
        }
        fn enumeration(&mut self, entries: &[(&str, u32)]) {
            self.words(&[0, (BTF_KIND_ENUM << 24) | entries.len() as u32, 4]);
            for (e, v) in entries {
                let en = self.name(e);
                self.words(&[en, *v]);
            }
        }
        fn write(&self, name: &str) -> Written {
            let mut out = Vec::new();
            out.extend_from_slice(&0xeb9fu16.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            for w in [
                24u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            let dir = tempfile::Builder::new()
                .prefix(&format!("aw-layout-{name}-"))
                .tempdir()
                .expect("temp dir");
            let path = dir.path().join("vmlinux");
            std::fs::write(&path, out).expect("write the BTF file");
            Written { _dir: dir, path }
        }
    }

    /// A BTF file written, removed with its directory when dropped.
    struct Written {
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    impl std::ops::Deref for Written {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.path
        }
    }

    #[test]
    fn flags_in_inet_flags_bits_from_linux_6_5() {
        let mut f = BtfFile::new();
        f.int();
        f.enumeration(&[
            ("INET_FLAGS_PKTINFO", 0),
            ("INET_FLAGS_FREEBIND", 11),
            ("INET_FLAGS_TRANSPARENT", 15),
        ]);
        f.strukt(
            "inet_sock",
            1000,
            &[("pinet6", 6272, 0), ("inet_flags", 6400, 0)],
        );
        let at = KernelBtf::read(&f.write("6.5"))
            .and_then(|b| b.inet_flags())
            .expect("resolved");
        // Bit 11 of the word at byte 800: byte 801, bit 3; bit 15: byte 801, bit 7.
        assert_eq!(
            at,
            KernelLayout {
                freebind_at: 801,
                transparent_at: 801,
                freebind_mask: 1 << 3,
                transparent_mask: 1 << 7,
                ..KernelLayout::default()
            }
        );
    }

    #[test]
    fn flags_in_bitfields_before_linux_6_5() {
        let mut f = BtfFile::new();
        f.int();
        // 6.1's order: recverr, is_icsk, freebind, hdrincl, mc_loop, transparent, ...
        f.strukt(
            "inet_sock",
            1000,
            &[
                ("recverr", 7232, 1),
                ("is_icsk", 7233, 1),
                ("freebind", 7234, 1),
                ("hdrincl", 7235, 1),
                ("mc_loop", 7236, 1),
                ("transparent", 7237, 1),
            ],
        );
        let at = KernelBtf::read(&f.write("6.1"))
            .and_then(|b| b.inet_flags())
            .expect("resolved");
        assert_eq!(
            at,
            KernelLayout {
                freebind_at: 904,
                transparent_at: 904,
                freebind_mask: 1 << 2,
                transparent_mask: 1 << 5,
                ..KernelLayout::default()
            }
        );
    }

    #[test]
    fn error_queue_flags_in_inet_flags_from_linux_6_6() {
        let mut f = BtfFile::new();
        f.int();
        f.enumeration(&[("INET_FLAGS_RECVERR", 9), ("INET_FLAGS_RECVERR6", 26)]);
        f.strukt(
            "inet_sock",
            1000,
            &[("pinet6", 6272, 0), ("inet_flags", 6400, 0)],
        );
        let btf = KernelBtf::read(&f.write("6.7")).expect("read");
        let at = btf.recverr6().expect("resolved");
        // Bit 9 of the word at byte 800: byte 801, bit 1; bit 26: byte 803, bit 2; both read
        // from the socket.
        assert_eq!(btf.recverr().expect("resolved"), (801, 1 << 1));
        assert_eq!(
            at,
            KernelLayout {
                recverr6_at: 803,
                recverr6_mask: 1 << 2,
                pinet6_at: 0,
                ..KernelLayout::default()
            }
        );
    }

    #[test]
    fn error_queue_flags_in_bitfields_before_linux_6_5() {
        let mut f = BtfFile::new();
        f.int();
        f.strukt(
            "inet_sock",
            1000,
            &[
                ("pinet6", 6272, 0),
                ("recverr", 7232, 1),
                ("is_icsk", 7233, 1),
            ],
        );
        f.strukt(
            "ipv6_pinfo",
            200,
            &[("saddr", 0, 0), ("recverr", 808, 1), ("sndflow", 809, 1)],
        );
        let btf = KernelBtf::read(&f.write("6.1-recverr")).expect("read");
        assert_eq!(btf.recverr().expect("resolved"), (904, 1));
        let at = btf.recverr6().expect("resolved");
        // IPv6's flag is read from the `ipv6_pinfo` the pointer at byte 784 leads to.
        assert_eq!(
            at,
            KernelLayout {
                recverr6_at: 101,
                recverr6_mask: 1,
                pinet6_at: 784,
                ..KernelLayout::default()
            }
        );
        let mut f = BtfFile::new();
        f.int();
        f.strukt(
            "inet_sock",
            1000,
            &[("pinet6", 6272, 0), ("recverr", 7232, 1)],
        );
        f.strukt("ipv6_pinfo", 200, &[("saddr", 0, 0)]);
        let path = f.write("no-recverr6");
        let btf = KernelBtf::read(&path).expect("read");
        assert_eq!(btf.recverr().expect("IPv4's flag alone"), (904, 1));
        let err = btf.recverr6().expect_err("no IPv6 flag");
        assert_eq!(
            err.to_string(),
            format!(
                "the kernel's BTF at {} has neither inet_sock.inet_flags with INET_FLAGS_RECVERR6 nor the bitfield ipv6_pinfo.recverr",
                path.display()
            )
        );
    }

    #[test]
    fn a_kernel_without_either_layout_is_an_error_naming_the_flag() {
        let mut f = BtfFile::new();
        f.int();
        f.strukt("inet_sock", 1000, &[("freebind", 7234, 1)]);
        let path = f.write("neither");
        let err = KernelBtf::read(&path)
            .and_then(|b| b.inet_flags())
            .expect_err("no TRANSPARENT");
        assert_eq!(
            err.to_string(),
            format!(
                "the kernel's BTF at {} has neither inet_sock.inet_flags with INET_FLAGS_TRANSPARENT nor the bitfield inet_sock.transparent",
                path.display()
            )
        );
        let mut f = BtfFile::new();
        f.int();
        let path = f.write("nostruct");
        assert_eq!(
            KernelBtf::read(&path)
                .and_then(|b| b.inet_flags())
                .expect_err("no struct")
                .to_string(),
            format!(
                "the kernel's BTF at {} has no struct inet_sock",
                path.display()
            )
        );
    }

    /// `struct socket` and `struct sock_common` as the programs read them, `skc_daddr` inside
    /// an anonymous struct in an anonymous union as in the kernel; `skc_v6_daddr` at the bit
    /// given (a kernel built without network namespaces has it 8 bytes earlier).
    fn kernel_fields(v6_daddr_at: u32) -> BtfFile {
        let mut f = BtfFile::new();
        f.int(); // 1
        // 2: struct { skc_daddr; skc_rcv_saddr; }, 3: the union holding it.
        f.typed(
            BTF_KIND_STRUCT,
            "",
            8,
            &[("skc_daddr", 0, 0, 1), ("skc_rcv_saddr", 32, 0, 1)],
        );
        f.typed(
            BTF_KIND_UNION,
            "",
            8,
            &[("skc_addrpair", 0, 0, 1), ("", 0, 0, 2)],
        );
        f.typed(
            BTF_KIND_STRUCT,
            "sock_common",
            136,
            &[
                ("", 0, 0, 3),
                ("skc_dport", 96, 0, 1),
                ("skc_num", 112, 0, 1),
                ("skc_family", 128, 0, 1),
                ("skc_state", 144, 0, 1),
                ("skc_v6_daddr", v6_daddr_at, 0, 1),
            ],
        );
        f.strukt(
            "socket",
            128,
            &[
                ("state", 0, 0),
                ("type", 32, 0),
                ("flags", 64, 0),
                ("file", 128, 0),
                ("sk", 192, 0),
            ],
        );
        f
    }

    #[test]
    fn the_lsm_programs_fixed_fields_are_checked_where_they_read_them() {
        let path = kernel_fields(448).write("fields");
        KernelBtf::read(&path)
            .and_then(|b| b.check_fields())
            .expect("the layout the programs read");
        let path = kernel_fields(384).write("no-netns");
        let err = KernelBtf::read(&path).and_then(|b| b.check_fields());
        assert_eq!(
            err.expect_err("moved").to_string(),
            format!(
                "the kernel's BTF at {} puts sock_common.skc_v6_daddr at byte 48, where the LSM programs read byte 56",
                path.display()
            )
        );
    }

    #[test]
    fn the_bind_address_lock_as_a_bitfield_and_as_a_byte() {
        // 6.1: `sk_padding:1, sk_kern_sock:1, sk_no_check_tx:1, sk_no_check_rx:1,
        // sk_userlocks:4` in one byte; SOCK_BINDADDR_LOCK is the field's bit 2.
        let mut f = BtfFile::new();
        f.int();
        f.strukt(
            "sock",
            800,
            &[("sk_kern_sock", 1937, 1), ("sk_userlocks", 1940, 4)],
        );
        let got = KernelBtf::read(&f.write("lock-bits")).and_then(|b| b.bindaddr_lock());
        assert_eq!(got.expect("bitfield"), (242, 1 << 6));
        let mut f = BtfFile::new();
        f.int();
        f.strukt("sock", 800, &[("sk_userlocks", 1944, 0)]);
        let got = KernelBtf::read(&f.write("lock-byte")).and_then(|b| b.bindaddr_lock());
        assert_eq!(got.expect("byte"), (243, 1 << 2));
    }

    /// Linux 6.12's `struct file`: `f_path` a `const struct path` in an anonymous union;
    /// `d_name.len` in an anonymous struct in an anonymous union of `struct qstr`.
    /// The task census's fields: pointers, a 4-byte number, the count inside `atomic_t`, and
    /// the cgroup's id, of type `id_type` (1: 8 bytes; 5: a union, as before Linux 5.5).
    /// With `rings`, io_uring's registered rings too: `task_struct.io_uring`, and
    /// `registered_rings` an array of that many pointers.
    fn task_fields(id_type: u32, rings: Option<u32>) -> BtfFile {
        let mut f = BtfFile::new();
        f.int(); // 1: 8 bytes
        let n = f.name("int");
        f.words(&[n, BTF_KIND_INT << 24, 4, 32]); // 2: 4 bytes
        f.words(&[0, BTF_KIND_PTR << 24, 1]); // 3: a pointer
        f.typed(BTF_KIND_STRUCT, "", 4, &[("counter", 0, 0, 2)]); // 4: atomic_t
        f.typed(BTF_KIND_UNION, "", 8, &[("ino", 0, 0, 1)]); // 5
        f.typed(
            BTF_KIND_STRUCT,
            "task_struct",
            4096,
            &[
                ("pid", 800, 0, 2),
                ("files", 14592, 0, 3),
                ("cgroups", 16000, 0, 3),
                (
                    if rings.is_some() { "io_uring" } else { "pad" },
                    20000,
                    0,
                    3,
                ),
            ],
        );
        f.typed(BTF_KIND_STRUCT, "files_struct", 64, &[("count", 0, 0, 4)]);
        f.typed(BTF_KIND_STRUCT, "css_set", 64, &[("dfl_cgrp", 128, 0, 3)]);
        f.typed(BTF_KIND_STRUCT, "cgroup", 64, &[("kn", 320, 0, 3)]);
        f.typed(
            BTF_KIND_STRUCT,
            "kernfs_node",
            64,
            &[("id", 256, 0, id_type)],
        );
        if let Some(slots) = rings {
            f.words(&[0, 3 << 24, 0, 3, 1, slots]); // 11: struct file *[slots]
            f.typed(
                BTF_KIND_STRUCT,
                "io_uring_task",
                256,
                &[("registered_rings", 256, 0, 11)],
            );
            f.typed(BTF_KIND_STRUCT, "file", 256, &[("f_inode", 1280, 0, 3)]);
            f.typed(BTF_KIND_STRUCT, "inode", 256, &[("i_ino", 512, 0, 1)]);
        }
        f
    }

    #[test]
    fn the_task_censuss_fields_with_their_sizes() {
        let got = KernelBtf::read(&task_fields(1, None).write("tasks"))
            .and_then(|b| b.task_layout())
            .expect("the census's fields");
        assert_eq!(
            got,
            TaskLayout {
                files_at: 1824,
                pid_at: 100,
                cgroups_at: 2000,
                count_at: 0,
                dfl_cgrp_at: 16,
                kn_at: 40,
                kn_id_at: 32,
                ..TaskLayout::default()
            }
        );
        // No registered rings in this BTF: none read.
        assert_eq!(got.rings_at, 0);
        let got = KernelBtf::read(&task_fields(1, Some(16)).write("tasks-rings"))
            .and_then(|b| b.task_layout())
            .expect("the census's fields with registered rings");
        assert_eq!(
            (got.uring_at, got.rings_at, got.f_inode_at, got.i_ino_at),
            (2500, 32, 160, 64)
        );
        let path = task_fields(1, Some(8)).write("tasks-rings-8");
        assert_eq!(
            KernelBtf::read(&path)
                .and_then(|b| b.task_layout())
                .expect_err("eight slots")
                .to_string(),
            format!(
                "the kernel's BTF at {} has io_uring_task.registered_rings as 64 bytes, where the task census reads 128 bytes",
                path.display()
            )
        );
        let path = task_fields(5, None).write("tasks-union");
        assert_eq!(
            KernelBtf::read(&path)
                .and_then(|b| b.task_layout())
                .expect_err("a union")
                .to_string(),
            format!(
                "the kernel's BTF at {} has kernfs_node.id as something other than an integer or a pointer, where the task census reads 8 bytes",
                path.display()
            )
        );
        let mut f = BtfFile::new();
        f.int();
        f.strukt("task_struct", 4096, &[("pid", 800, 0), ("files", 1600, 0)]);
        let path = f.write("tasks-pid");
        assert_eq!(
            KernelBtf::read(&path)
                .and_then(|b| b.task_layout())
                .expect_err("an 8-byte pid")
                .to_string(),
            format!(
                "the kernel's BTF at {} has task_struct.pid as 8 bytes, where the task census reads 4 bytes",
                path.display()
            )
        );
        let mut f = BtfFile::new();
        f.int();
        f.strukt("task_struct", 4096, &[("pid", 800, 0)]);
        let path = f.write("tasks-nofiles");
        assert_eq!(
            KernelBtf::read(&path)
                .and_then(|b| b.task_layout())
                .expect_err("no files")
                .to_string(),
            format!(
                "the kernel's BTF at {} has no field task_struct.files",
                path.display()
            )
        );
    }

    #[test]
    fn a_files_name_through_qualifiers_and_anonymous_members() {
        let mut f = BtfFile::new();
        f.int(); // 1
        f.strukt("path", 16, &[("mnt", 0, 0), ("dentry", 64, 0)]); // 2
        f.constant(2); // 3
        f.typed(
            BTF_KIND_UNION,
            "",
            16,
            &[("f_path", 0, 0, 3), ("__f_path", 0, 0, 2)],
        ); // 4
        f.typed(
            BTF_KIND_STRUCT,
            "file",
            200,
            &[("f_mode", 0, 0, 1), ("", 128, 0, 4)],
        ); // 5
        f.typed(
            BTF_KIND_STRUCT,
            "",
            8,
            &[("hash", 0, 0, 1), ("len", 32, 0, 1)],
        ); // 6
        f.typed(
            BTF_KIND_UNION,
            "",
            8,
            &[("", 0, 0, 6), ("hash_len", 0, 0, 1)],
        ); // 7
        f.typed(
            BTF_KIND_STRUCT,
            "qstr",
            16,
            &[("", 0, 0, 7), ("name", 64, 0, 1)],
        ); // 8
        f.typed(
            BTF_KIND_STRUCT,
            "dentry",
            192,
            &[("d_flags", 0, 0, 1), ("d_name", 256, 0, 8)],
        ); // 9
        let got = KernelBtf::read(&f.write("file-name")).and_then(|b| b.file_name());
        assert_eq!(got.expect("the name's fields"), (24, 36, 40));

        let mut f = BtfFile::new();
        f.int();
        f.strukt("file", 200, &[("f_mode", 0, 0)]);
        let path = f.write("file-no-path");
        let err = KernelBtf::read(&path)
            .and_then(|b| b.file_name())
            .expect_err("no f_path");
        assert_eq!(
            err.to_string(),
            format!(
                "the kernel's BTF at {} has no field file.f_path.dentry",
                path.display()
            )
        );
    }

    /// The running kernel's own BTF has the fixed fields where the programs read them, and the
    /// flags in one of the two layouts.
    #[test]
    fn the_running_kernel_resolves() {
        let btf = KernelBtf::read(Path::new(KERNEL_BTF)).expect("this kernel's BTF");
        btf.check_fields().expect("the LSM programs' fixed offsets");
        let at = btf.inet_flags().expect("the flags");
        let (recverr_at, recverr_mask) = btf.recverr().expect("the error-queue flag");
        let queue = btf.recverr6().expect("IPv6's error-queue flag");
        let (nr_at, setsockopt) = btf.syscall_nr().expect("the system call's number");
        assert!(nr_at > 0 && setsockopt > 0, "{nr_at} {setsockopt}");
        let cg = btf.socket_cgroup().expect("a socket's cgroup");
        assert!(
            cg.sk_cgroup_at > 0
                && cg.cgroup_level_at > 0
                && cg.cgroup_ancestors_at > cg.cgroup_level_at
                && cg.cgroup_kn_at > 0
                && cg.kn_id_at > 0,
            "{cg:?}"
        );
        assert!(
            recverr_mask != 0 && queue.recverr6_mask != 0 && recverr_at > 0,
            "{recverr_at} {recverr_mask} {queue:?}"
        );
        let rmem = btf.rmem_alloc_at().expect("sk_backlog.rmem_alloc");
        assert!(rmem > 0, "{rmem}");
        let (lock_at, lock_mask) = btf.bindaddr_lock().expect("sk_userlocks");
        assert!(lock_at > 0 && lock_mask != 0, "{lock_at} {lock_mask}");
        let protocol = btf.protocol_at().expect("sk_protocol");
        assert!(btf.owned_at().expect("sk_lock.owned") > 0);
        assert!(btf.msg_flags_at().expect("msghdr.msg_flags") > 0);
        let (dentry, len, name) = btf.file_name().expect("a file's name");
        assert!(dentry > 0 && len > 0 && name > len, "{dentry} {len} {name}");
        let frags = btf.shared_frags().expect("the shared-pages flag");
        let tasks = btf.task_layout().expect("the task census's fields");
        assert!(
            tasks.files_at > 0 && tasks.pid_at > 0 && tasks.cgroups_at > 0,
            "{tasks:?}"
        );
        // Linux 5.18 and later with io_uring, as every kernel the tests run on.
        assert!(
            tasks.uring_at > 0 && tasks.rings_at > 0 && tasks.f_inode_at > 0 && tasks.i_ino_at > 0,
            "{tasks:?}"
        );
        assert!(frags.skb_head_at > 0 && frags.skb_end_at > 0, "{frags:?}");
        assert_ne!(frags.shared_frag_mask, 0);
        assert!(protocol > 0, "{protocol}");
        assert_ne!(at.freebind_mask, 0);
        assert_ne!(at.transparent_mask, 0);
        assert!(at.freebind_at > 0 && at.transparent_at > 0, "{at:?}");
    }
}
