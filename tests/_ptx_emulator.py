"""A bit-level emulator of the few PTX instructions our inline-asm kernels use, for one warp.

The inline PTX runs only on a GPU; these tests run it on the CPU, lane by lane in lockstep, so
its decode tables, byte permutes and the tensor-core fragment bookkeeping (which lane holds
which row and column of an ``mma``) are checked in CI. Registers hold 32-bit patterns; f32
registers hold float32 bits.
"""

from __future__ import annotations

import struct

import numpy as np


def _half_types():
    import ml_dtypes

    return {"bf16": ml_dtypes.bfloat16, "f16": np.float16}


_HALF_TYPES = _half_types()


def _f2b(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", float(np.float32(v))))[0]


def _b2f(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]


def _half(bits: int, dtype) -> float:
    return float(np.array([bits & 0xFFFF], np.uint16).view(dtype)[0])


def _prmt(a, b, c):
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    d = 0
    for k in range(4):
        sel = (c >> (4 * k)) & 0xF
        v = src[sel & 7]
        if sel & 8:  # sign-replicate mode
            v = 0xFF if v & 0x80 else 0
        d |= v << (8 * k)
    return d


def _lop3(a, b, c, lut):
    return sum(((lut >> ((((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1))) & 1) << i
               for i in range(32))


def _parse(asm: str):
    out = []
    for line in asm.replace("{\n", "\n").replace("\n}", "\n").split(";"):
        line = line.strip().strip("{}").strip()
        if not line or line.startswith((".reg", ".shared")):
            continue
        op, rest = line.split(None, 1)
        groups, cur, depth = [], "", 0
        for ch in rest:  # split on commas outside {...}
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                groups.append(cur.strip())
                cur = ""
            else:
                cur += ch
        groups.append(cur.strip())
        out.append((op, [[t.strip() for t in g.strip("{}").split(",")] if g.startswith("{") else g
                         for g in groups]))
    return out


def run_warp(asm: str, inputs: list[dict[str, int]], half_dtype=np.float16,
             shared: dict[int, int] | None = None) -> list[dict[str, int]]:
    """Run ``asm`` on ``len(inputs)`` threads in lockstep; ``inputs[thread]`` maps "$k" to 32-bit
    values. Thread i is lane i % 32 of the CTA (``%tid.x`` = i), so a whole CTA can run a fill
    with ``bar.sync`` (a no-op in lockstep).

    Returns each thread's registers. ``mma`` (m16n8k16, f32 accumulate, 16-bit inputs of
    ``half_dtype``) needs 32 lanes. ``shared``: word address -> 32-bit value, read by
    ``ld.shared`` and written by ``st.shared`` in place; a ``.shared`` variable's name is
    address 0.
    """
    lanes = [dict(r) for r in inputs]
    preds = [dict() for _ in lanes]
    shared = {} if shared is None else shared

    def val(lane, tok):
        if tok in lanes[lane]:
            return lanes[lane][tok]
        if tok == "%laneid":
            return lane % 32
        if tok == "%tid.x":
            return lane
        if tok.startswith("lowbit_"):
            return 0
        if tok.startswith("0f"):
            return int(tok[2:], 16)
        return int(tok, 0) & 0xFFFFFFFF

    for op, args in _parse(asm):
        if op.startswith("mma.sync"):
            assert len(lanes) == 32, "mma needs a whole warp"
            d, a, b, c = args
            A, B, C = np.zeros((16, 16)), np.zeros((16, 8)), np.zeros((16, 8))
            for ln in range(32):
                g, t = ln // 4, ln % 4
                av = [val(ln, r) for r in a]
                bv = [val(ln, r) for r in b]
                cv = [_b2f(val(ln, r)) for r in c]
                for reg, (row, col) in zip(av, [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
                    A[row, col], A[row, col + 1] = _half(reg, half_dtype), _half(reg >> 16, half_dtype)
                for reg, row in zip(bv, [2 * t, 2 * t + 8]):
                    B[row, g], B[row + 1, g] = _half(reg, half_dtype), _half(reg >> 16, half_dtype)
                for v, (row, col) in zip(cv, [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]):
                    C[row, col] = v
            D = A @ B + C
            for ln in range(32):
                g, t = ln // 4, ln % 4
                for r, (row, col) in zip(d, [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]):
                    lanes[ln][r] = _f2b(D[row, col])
            continue
        if op.startswith("bar.sync"):
            continue
        if op.startswith("shfl.sync.idx"):  # within each warp, from the values before the shuffle
            dst, src, lane_tok = args[0], args[1], args[2]
            before = [val(ln, src) for ln in range(len(lanes))]
            for ln in range(len(lanes)):
                lanes[ln][dst] = before[(ln // 32) * 32 + (val(ln, lane_tok) & 31)]
            continue
        for ln in range(len(lanes)):
            dst, srcs = args[0], args[1:]
            if op.startswith(("ld.shared", "st.shared")):
                addr_tok = (srcs[0] if op.startswith("ld") else dst).strip("[]")
                reg, _, off = addr_tok.partition("+")
                addr = val(ln, reg) + int(off or 0)
                assert addr % 4 == 0, f"unaligned shared address {addr}"
                if op.startswith("ld"):
                    lanes[ln][dst] = shared[addr]
                else:
                    for i, r in enumerate(srcs[0] if isinstance(srcs[0], list) else [srcs[0]]):
                        shared[addr + 4 * i] = val(ln, r)
                continue
            if op.startswith("setp."):
                x, y = val(ln, srcs[0]), val(ln, srcs[1])
                preds[ln][dst] = {"eq": x == y, "ne": x != y, "ge": x >= y, "lt": x < y}[op.split(".")[1]]
                continue
            if op.startswith(("cvt.rn.bf16x2.f32", "cvt.rn.f16x2.f32", "fma.rn.bf16x2", "fma.rn.f16x2")):
                ht = _HALF_TYPES["bf16" if "bf16" in op else "f16"]
                if op.startswith("cvt"):  # d = (cvt(a) << 16) | cvt(b)
                    a, b = (np.array([_b2f(val(ln, t))], np.float32).astype(ht).view(np.uint16)[0] for t in srcs)
                    lanes[ln][dst] = (int(a) << 16) | int(b)
                else:  # per 16-bit half: round(a * b + c), exact in fp32 before the one rounding
                    a, b, c = (val(ln, t) for t in srcs)
                    halves = []
                    for sh in (0, 16):
                        x, y, z = (np.array([(v >> sh) & 0xFFFF], np.uint16).view(ht).astype(np.float32)[0]
                                   for v in (a, b, c))
                        halves.append(int(np.array([x * y + z], np.float32).astype(ht).view(np.uint16)[0]))
                    lanes[ln][dst] = halves[0] | (halves[1] << 16)
                continue
            if op == "fma.rn.f32":
                a, b, c = (np.float32(_b2f(val(ln, s))) for s in srcs)
                lanes[ln][dst] = _f2b(np.float32(np.float64(a) * np.float64(b) + np.float64(c)))
                continue
            if op == "add.f32":
                lanes[ln][dst] = _f2b(np.float32(_b2f(val(ln, srcs[0]))) + np.float32(_b2f(val(ln, srcs[1]))))
                continue
            if op.startswith("selp."):
                lanes[ln][dst] = val(ln, srcs[0]) if preds[ln][srcs[2]] else val(ln, srcs[1])
                continue
            v = [val(ln, s) for s in srcs]
            lanes[ln][dst] = {
                "mov": lambda: v[0], "shr": lambda: v[0] >> v[1], "shl": lambda: (v[0] << v[1]) & 0xFFFFFFFF,
                "add": lambda: (v[0] + v[1]) & 0xFFFFFFFF, "mad": lambda: (v[0] * v[1] + v[2]) & 0xFFFFFFFF,
                "and": lambda: v[0] & v[1], "or": lambda: v[0] | v[1], "prmt": lambda: _prmt(*v),
                "lop3": lambda: _lop3(*v),
            }[op.split(".")[0]]()
    return lanes
