"""HBM traffic of a compiled XLA program, read from its optimized HLO text (no jax needed).

Each top-level instruction reads its operands and writes its result (a fusion's internals stay in
VMEM / registers), which is how XLA's cost analysis counts "bytes accessed", with three
differences that make the count what the program touches rather than whole buffers:
- a while body counts once per trip (XLA counts it once; the trip count comes from the loop's
  `known_trip_count` or the constant its condition compares with);
- slices, dynamic slices and gathers, also inside fusions (a scan body reading its layer of the
  stacked weights), read only their output's bytes of the operand;
- a dynamic-update-slice into a buffer (a scan stacking its outputs, a KV-cache write) is in place:
  it writes the update, not the buffer.
Arrays whose layout says S(1) live in on-chip VMEM and are not HBM traffic. Used by
bench/scale_plan.py (the roofline's bytes) and bench/hlo_bytes.py (the ranking by source line).
"""
from __future__ import annotations

import collections
import re

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_HEAD = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
# No HBM traffic of their own: views, bookkeeping, the second half of async pairs, control flow
# (a while body is walked instead).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "iota", "copy-done", "slice-done", "while", "conditional", "call", "opt-barrier"}


def hbm_bytes(type_text: str) -> int:
    """Bytes of the arrays in a type that live in HBM (layouts marked S(1) are on-chip VMEM)."""
    total = 0
    for dtype, dims, layout in _ARRAY.findall(type_text):
        if "S(1)" not in layout:
            total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


class Hlo:
    """The optimized HLO text of one program: computations, each instruction's result type, and the
    JAX source line of each stack frame (from the module's FileNames / FileLocations / StackFrames)."""

    def __init__(self, text: str):
        self.comps: dict[str, list[tuple]] = {}
        self.entry, tables, comp, table = None, {}, None, None
        for line in text.splitlines():
            if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                table, comp = tables.setdefault(line, {}), None
            elif table is not None and re.match(r"^\d+ ", line):
                key, val = line.split(" ", 1)
                table[int(key)] = val
            elif (head := _HEAD.match(line)) and not line.startswith(" "):
                table, comp = None, head.group(1)
                self.comps[comp] = []
                if line.startswith("ENTRY"):
                    self.entry = comp
            elif comp and (m := _INSTR.match(line)):
                name, result, opcode, rest = m.groups()
                operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
                self.comps[comp].append((name, result, opcode, operands, line))
        self.types = {n: r for instrs in self.comps.values() for n, r, *_ in instrs}
        self._tables = tables

    def source(self, line: str) -> str:
        """file:line of the innermost frame in this project's code (trainer/, bench/), else the op name."""
        frame = re.search(r"stack_frame_id=(\d+)", line)
        frames, locs = self._tables.get("StackFrames", {}), self._tables.get("FileLocations", {})
        files = self._tables.get("FileNames", {})
        fid, seen = int(frame.group(1)) if frame else 0, set()
        while fid in frames and fid not in seen:
            seen.add(fid)
            f = re.search(r"file_location_id=(\d+) parent_frame_id=(\d+)", frames[fid])
            loc = re.search(r"file_name_id=(\d+) .*line=(\d+)", locs.get(int(f.group(1)), ""))
            path = files.get(int(loc.group(1)), "").strip('"') if loc else ""
            ours = max(path.rfind("/trainer/"), path.rfind("/bench/"))
            if ours >= 0:
                return f"{path[ours + 1:]}:{loc.group(2)}"
            fid = int(f.group(2))
        op = re.search(r'op_name="([^"]+)"', line)
        return op.group(1).split("/")[-1] if op else "?"

    def trip_count(self, while_line: str) -> int:
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_line)
        if known:
            return int(known.group(1))
        cond = re.search(r"condition=%([\w.\-]+)", while_line)  # i < N with a constant N
        consts = [int(c) for c in re.findall(r"s32\[\]\S* constant\((\d+)\)",
                                             "\n".join(i[4] for i in self.comps.get(cond.group(1), [])))] if cond else []
        return max(consts) if consts else 1

    def sliced_operands(self, fused: str) -> dict[int, int]:
        """Parameter index -> bytes actually read, for fusion parameters that are only (dynamic-)sliced,
        directly or inside a nested fusion (a scan body reading its layer of the stacked weights)."""
        instrs = self.comps.get(fused, [])
        params = {n: int(re.search(r"parameter\((\d+)\)", l).group(1)) for n, _, op, _, l in instrs if op == "parameter"}
        reads: dict[int, int] = {}
        whole = set()  # params some user reads in full
        for n, result, op, operands, line in instrs:
            nested = self.sliced_operands(re.search(r"calls=%([\w.\-]+)", line).group(1)) if op == "fusion" else {}
            for j, o in enumerate(operands):
                if o not in params:
                    continue
                if op in ("dynamic-slice", "slice", "gather") and j == 0:
                    reads[params[o]] = reads.get(params[o], 0) + hbm_bytes(result.replace("S(1)", ""))
                elif j in nested:
                    reads[params[o]] = reads.get(params[o], 0) + nested[j]
                elif not (op in ("dynamic-slice", "slice", "gather") and j > 0):
                    whole.add(params[o])
        return {i: b for i, b in reads.items() if i not in whole}

    def in_place_update(self, fused: str) -> tuple[set[int], int] | None:
        """When every output of a fusion is a dynamic-update-slice into one of its parameters (a scan
        stacking its outputs, a KV-cache write), XLA updates those buffers in place: (the parameter
        indices, the bytes of the updates). Else None."""
        instrs = {i[0]: i for i in self.comps.get(fused, [])}
        root = next((i for i in instrs.values() if i[4].lstrip().startswith("ROOT")), None)
        outs = [instrs.get(o) for o in root[3]] if root and root[2] == "tuple" else [root]
        if not outs or any(o is None or o[2] != "dynamic-update-slice" for o in outs):
            return None
        params, written = set(), 0
        for o in outs:
            buffer, update = instrs.get(o[3][0]), instrs.get(o[3][1])
            if buffer is None or buffer[2] != "parameter" or update is None:
                return None
            params.add(int(re.search(r"parameter\((\d+)\)", buffer[4]).group(1)))
            written += hbm_bytes(update[1].replace("S(1)", ""))
        return params, written

    def moved(self, result: str, opcode: str, operands: list[str], line: str) -> int:
        """HBM bytes one execution of an instruction reads and writes: what XLA's cost analysis
        counts, except that slices, gathers and in-place updates touch only their part of a buffer."""
        if opcode in ("copy-start", "slice-start"):  # async: (dest, src, ...) -> the slice read + the write
            dest = _ARRAY.search(result.lstrip("(").split("), ", 1)[-1] if opcode == "slice-start" else result)
            part = hbm_bytes(f"{dest.group(1)}[{dest.group(2)}]")
            src_in_hbm = bool(operands) and hbm_bytes(self.types.get(operands[0], "")) > 0
            dst_in_hbm = "S(1)" not in (dest.group(3) or "")
            return part * (int(src_in_hbm) + int(dst_in_hbm))
        if opcode in ("dynamic-slice", "slice", "gather"):
            return 2 * hbm_bytes(result)
        if opcode == "dynamic-update-slice":
            return 2 * hbm_bytes(self.types.get(operands[1], ""))
        fused = re.search(r"calls=%([\w.\-]+)", line).group(1) if opcode == "fusion" else None
        sliced = self.sliced_operands(fused) if fused else {}
        update = self.in_place_update(fused) if fused else None
        in_place, written = update if update else (set(), hbm_bytes(result))
        reads = sum(min(sliced.get(i, 1 << 62), hbm_bytes(self.types.get(o, ""))) for i, o in enumerate(operands)
                    if i not in in_place)
        return written + reads


def ranked_bytes(text: str) -> tuple[list[tuple[str, int, int]], int]:
    """[(source line and op, HBM bytes, executions)] largest first, and their total: the entry
    computation's instructions and those of while bodies, times the loops' trip counts."""
    hlo = Hlo(text)
    by_source, counts, total = collections.Counter(), collections.Counter(), 0

    def walk(comp: str, trips: int):
        nonlocal total
        for name, result, opcode, operands, line in hlo.comps.get(comp, []):
            if opcode == "while":
                body = re.search(r"body=%([\w.\-]+)", line)
                walk(body.group(1), trips * hlo.trip_count(line))
                continue
            if opcode in _FREE:
                continue
            moved = hlo.moved(result, opcode, operands, line) * trips
            if not moved:
                continue
            shape = _ARRAY.search(result)
            key = f"{hlo.source(line)} {opcode} {shape.group(0) if shape else ''}"
            by_source[key] += moved
            counts[key] += trips
            total += moved

    walk(hlo.entry, 1)
    return [(k, b, counts[k]) for k, b in by_source.most_common()], total
