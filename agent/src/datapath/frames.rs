//! The verifier refuses a program whose deepest chain of BPF function calls needs more than
//! 512 bytes of stack, each frame rounded up to 32 bytes. Only kernels that run the BPF LSM
//! programs load them (the kernel matrix, not this host), so the frames are read here from
//! the object itself: a change that grows one fails on every host, not first on 6.1.

use std::collections::{BTreeMap, HashMap};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget, SymbolKind};

/// The verifier's limit on a call chain's stack (`MAX_BPF_STACK`).
const MAX_STACK: u32 = 512;

/// A function's place: its section and its offset in it.
type Place = (usize, u64);

struct Function {
    name: String,
    /// The deepest stack byte it touches below its frame pointer.
    frame: u32,
    calls: Vec<Place>,
}

/// Each function of the object (programs and the BPF functions they call), with its frame
/// as the verifier counts it: the deepest offset below r10 that it loads from, stores to,
/// or takes a pointer to, following pointers through copies, constant additions and spills.
/// The reading is straight-line (no branch joins).
fn functions(elf: &[u8]) -> (BTreeMap<Place, Function>, Vec<Place>) {
    let file = object::File::parse(elf).expect("the eBPF object parses");
    let mut functions = BTreeMap::new();
    let mut programs = Vec::new();
    for sym in file.symbols() {
        if sym.kind() != SymbolKind::Text || sym.size() == 0 {
            continue;
        }
        let Some(index) = sym.section_index() else {
            continue;
        };
        let section = file.section_by_index(index).expect("the symbol's section");
        let data = section.data().expect("the section's bytes");
        let relocations: HashMap<u64, RelocationTarget> = section
            .relocations()
            .map(|(at, r)| (at, r.target()))
            .collect();
        let start = sym.address();
        let code = &data[start as usize..(start + sym.size()) as usize];
        let (mut frame, mut calls) = (0u32, Vec::new());
        // Where each register points in the frame, if it does (r10 at 0): `rX = r10;
        // rX += -N` points N deep, and so does a copy spilled to the stack and loaded back.
        let mut points: [Option<i64>; 11] = [None; 11];
        points[10] = Some(0);
        let mut spilled: HashMap<i64, i64> = HashMap::new();
        let mut touch = |at: i64| frame = frame.max(u32::try_from(-at).unwrap_or(0));
        // A BPF function called (a call, src 1) or passed as a callback (a 64-bit constant,
        // src 4), relative to the next instruction or through a relocation.
        let target = |i: usize, imm: i32| {
            let at = start + 8 * i as u64;
            let (sec, base) = match relocations.get(&at) {
                Some(RelocationTarget::Symbol(s)) => {
                    let t = file.symbol_by_index(*s).expect("the call's symbol");
                    (t.section_index().expect("a section").0, t.address())
                }
                _ => (index.0, at),
            };
            let to = base as i64 + 8 * (i64::from(imm) + 1);
            (sec, u64::try_from(to).expect("a call into its section"))
        };
        for (i, insn) in code.chunks_exact(8).enumerate() {
            let (op, dst, src) = (
                insn[0],
                usize::from(insn[1] & 0xf),
                usize::from(insn[1] >> 4),
            );
            let off = i64::from(i16::from_le_bytes([insn[2], insn[3]]));
            let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
            let class = op & 7;
            if dst > 10 || src > 10 {
                // The second half of a 64-bit constant, or no instruction of a function.
                continue;
            }
            match class {
                // LD: a 64-bit constant (a callback with src 4).
                0 => {
                    if op == 0x18 && src == 4 {
                        calls.push(target(i, imm));
                    }
                    points[dst] = None;
                }
                // LDX, from [src + off]; a doubleword loads back a pointer spilled there.
                1 => {
                    let from = points[src].map(|base| base + off);
                    from.map(&mut touch);
                    if dst != 10 {
                        points[dst] = from
                            .filter(|_| op == 0x79)
                            .and_then(|a| spilled.get(&a).copied());
                    }
                }
                // ST, STX, to [dst + off]; a doubleword store of a pointer spills it.
                2 | 3 => {
                    if let Some(base) = points[dst] {
                        let to = base + off;
                        touch(to);
                        match (op, points[src]) {
                            (0x7b, Some(p)) => spilled.insert(to, p),
                            _ => spilled.remove(&to),
                        };
                    }
                }
                _ => {}
            }
            match op {
                // mov64 dst, src
                0xbf if dst < 10 => points[dst] = points[src],
                // add64 / sub64 dst, imm
                0x07 | 0x17 if dst < 10 && points[dst].is_some() => {
                    let by = if op == 0x07 {
                        i64::from(imm)
                    } else {
                        -i64::from(imm)
                    };
                    let now = points[dst].map(|base| base + by);
                    now.map(&mut touch);
                    points[dst] = now;
                }
                // call: a BPF function (src 1) or a helper, which leaves r0-r5 holding
                // nothing of the stack.
                0x85 => {
                    if src == 1 {
                        calls.push(target(i, imm));
                    }
                    points[..6].fill(None);
                }
                // Any other write leaves no stack pointer this reading follows: a constant
                // moved in, or arithmetic on a register that may hold one only on another
                // path (the reading is straight-line, and the objects built so far do no
                // other arithmetic on their stack pointers).
                _ if (class == 4 || class == 7) && dst < 10 => points[dst] = None,
                _ => {}
            }
        }
        let name = sym.name().unwrap_or_default().to_owned();
        if section.name().unwrap_or_default() != ".text" {
            programs.push((index.0, start));
        }
        functions.insert((index.0, start), Function { name, frame, calls });
    }
    (functions, programs)
}

/// The deepest chain from `at`, frames rounded as the verifier rounds them, and its names.
fn deepest(functions: &BTreeMap<Place, Function>, at: Place, depth: usize) -> (u32, Vec<String>) {
    let f = &functions[&at];
    assert!(depth < 16, "calls nest past 16 at {}", f.name);
    let own = f.frame.max(1).div_ceil(32) * 32;
    let (below, mut chain) = f
        .calls
        .iter()
        .map(|&c| {
            assert!(
                functions.contains_key(&c),
                "{} calls {c:?}, no function",
                f.name
            );
            deepest(functions, c, depth + 1)
        })
        .max_by_key(|(d, _)| *d)
        .unwrap_or_default();
    chain.insert(0, format!("{} ({})", f.name, f.frame));
    (own + below, chain)
}

#[test]
fn every_programs_deepest_call_chain_fits_the_verifiers_stack() {
    let (functions, programs) = functions(super::EBPF_OBJECT);
    assert!(programs.len() > 20, "{} programs", programs.len());
    let mut over = Vec::new();
    for p in programs {
        let (depth, chain) = deepest(&functions, p, 0);
        if depth > MAX_STACK {
            over.push(format!("{depth} bytes: {}", chain.join(" -> ")));
        }
    }
    assert!(
        over.is_empty(),
        "over the verifier's {MAX_STACK} bytes:\n{}",
        over.join("\n")
    );
}

/// The reading itself, on the receipt program: its frame and the record's beneath it, as
/// the disassembly shows them.
#[test]
fn the_receipts_chain_is_read_with_the_records_frame_beneath_it() {
    let (functions, programs) = functions(super::EBPF_OBJECT);
    let receipt = programs
        .into_iter()
        .find(|p| functions[p].name == agent_common::PROG_LSM_FILE_RECEIVE)
        .expect("the receipt program");
    let (depth, chain) = deepest(&functions, receipt, 0);
    assert!(chain.len() >= 2, "{chain:?}");
    assert!(depth > 256 && depth <= MAX_STACK, "{depth}: {chain:?}");
}
