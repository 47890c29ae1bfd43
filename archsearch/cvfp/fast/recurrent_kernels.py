"""Triton kernels of the recurrent validation pass (imported only where Triton is available;
recurrent.py chooses among them).

1. ``_recurrent_kernel`` (:func:`recurrent_batched`): the whole pass of R runs of one shape
   in one persistent launch, described below.
2. ``recurrent_step``: one ContextLayer step, for the graphed fallback. Kernel k finishes
   layer k-1 (LayerNorm of x + ReLU(h), computed redundantly by every program from the full
   vectors) and starts layer k (each program computes ROWS rows of W_c y + P). The kernel
   boundary is the grid-wide barrier the LayerNorm needs, so a step of L layers is L
   launches, replayed from a CUDA graph (recurrent.triton_pass).

The persistent kernel.

Each run r has its own token halves P[r] (L, T, C), recurrent weights W[r] (L, C, C) and
LayerNorm affine G[r], B[r] (L, C); all runs share L, C and T (a trial's sizes share the
validation stream and the model shape). Program ``pid`` serves run ``pid // NPROG`` and
rows ``[part * ROWS, (part + 1) * ROWS)`` of every layer's C x C mat-vec, part = pid % NPROG.
Every program keeps its run's full context vector c (C,) in registers.

Per step t and layer i, every program of run r:
  1. computes its rows of h = W[r, i] c + P[r, i, t] (in sub-tiles of SUB rows; SUB == ROWS
     keeps the ROWS x C tile in registers and prefetches the next layer's tile; P's rows are
     always prefetched a layer ahead);
  2. publishes them in slot k % 2 of its run's h buffer (k = the layer's global index,
     1-based: k = t * L + i + 1);
  3. waits until all NPROG programs of run r have published slot k (the synchronisation,
     SYNC below);
  4. reads the whole h, computes c = LayerNorm(c + ReLU(h)) with G[r, i], B[r, i] itself
     (redundantly in every program) and stores its own ROWS columns of c as out[r, i, t].
Two slots suffice: a program can only write slot k % 2 again (for layer k + 2) after
reading all of layer k + 1, which every program publishes only after it has read layer k.

SYNC (constexpr) says how step 3 is done:
  - ``"atomic"``: a counter per run. After its stores, every program does one atomic add
    (release, GPU scope) and spins on atomic adds of 0 (acquire; the compiler turns them
    into acquire loads, ``ld.acquire.gpu``) until the counter reaches k * NPROG; then it
    reads h bypassing L1 (.cg). Today's protocol.
  - ``"volatile"``: the same counter, the spin on relaxed volatile loads and one acquire
    after it (the acquire's ordering paid once per wait, not once per poll).
  - ``"flag"``: no counter. Every h value is stored as one 64-bit word, its step number k
    in the high half and the float's bits in the low half (an aligned 64-bit store is
    seen whole or not at all), so a program polls the whole slot with volatile loads until
    every word carries k: the value arrives with its flag, one round trip per poll, no
    fence and no atomics. It RACES: on an H200 (2026-12-01) the same pass at L2/C64, rows 8,
    repeated 5 times gave 3 different outputs (scripts/check_determinism.py); the cause is not
    found (a torn 64-bit load? the wait has no block-wide barrier). recurrent.PLAN uses
    ``"atomic"``; this mode is kept for scripts/bench_recurrent.py.

Residency: a program waits for every other program of its run, so all of them must be
resident at once, or the first ones spin while the rest wait for a free multiprocessor.
:func:`resident_programs` says how many programs of a compiled variant the device holds
at once (registers, threads, shared memory and the block limit per multiprocessor); the
launcher refuses grids beyond it. As a last guard every wait gives up after ``max_spin``
polls (MAX_SPIN): the program then marks ``err`` and stops waiting for the rest of the pass (its
outputs are garbage, the launcher raises BarrierTimeout), so a mistake costs an error, not a
hung GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from archsearch.cvfp.fast.device import sm_count

SYNC_MODES = ("atomic", "volatile", "flag")
MAX_SPIN = 1 << 22  # polls of one wait before it gives up (seconds; a normal wait takes a few)
MAX_BLOCKS_PER_SM = 16  # the lowest hardware limit since Volta (sm_75/86: 16; sm_80/90: 32)


class BarrierTimeout(RuntimeError):
    """A wait of the persistent kernel gave up: its programs were not all resident."""


@triton.jit
def _flagged(x, k):
    """64-bit words: k in the high half, the float32 bits of x in the low half."""
    bits = x.to(tl.int32, bitcast=True).to(tl.uint32, bitcast=True).to(tl.int64)  # zero-extended
    return (k.to(tl.int64) << 32) | bits


@triton.jit(do_not_specialize=["T", "max_spin"])
def _recurrent_kernel(
    p_ptr, w_ptr, g_ptr, b_ptr, out_ptr, hbuf_ptr, bar_ptr, err_ptr, eps, T, max_spin,
    L: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, SUB: tl.constexpr,
    NPROG: tl.constexpr, SYNC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    run = pid // NPROG
    part = pid % NPROG
    r64 = run.to(tl.int64)
    p_ptr += r64 * L * T * C  # this run's tensors (offsets inside a run fit int32: the launcher checks)
    out_ptr += r64 * L * T * C
    w_ptr += r64 * L * C * C
    g_ptr += r64 * L * C
    b_ptr += r64 * L * C
    hbuf_ptr += r64 * 2 * C
    bar_ptr += run
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    lo = part * ROWS
    mine = cmask & (cols >= lo) & (cols < lo + ROWS)
    rows = lo + tl.arange(0, ROWS)
    rmask = rows < C
    wmask = rmask[:, None] & cmask[None, :]
    wofs = rows[:, None] * C + cols[None, :]
    c = tl.zeros([BLOCK_C], tl.float32)
    if SUB == ROWS:
        w = tl.load(w_ptr + wofs, mask=wmask, other=0.0)  # layer 0's rows
    p = tl.load(p_ptr + rows, mask=rmask, other=0.0)  # P[0, 0]
    alive = max_spin > 0  # false once a wait has given up: no more waiting in this pass
    k = 0
    for t in range(T):
        for i in tl.static_range(L):
            k += 1
            slot = hbuf_ptr + (k % 2) * C
            # 1-2. this program's rows of h, published in slot k % 2
            if SUB == ROWS:
                h_rows = tl.sum(w * c[None, :], axis=1) + p
            else:  # sub-tiles of W read each layer (from L1 where it holds them), results gathered in h2
                sidx = tl.arange(0, ROWS // SUB)[:, None]
                h2 = tl.zeros([ROWS // SUB, SUB], tl.float32)
                for s in tl.static_range(ROWS // SUB):
                    srows = lo + s * SUB + tl.arange(0, SUB)
                    smask = srows < C
                    ws = tl.load(w_ptr + i * C * C + srows[:, None] * C + cols[None, :], mask=smask[:, None] & cmask[None, :], other=0.0)
                    h2 = tl.where(sidx == s, tl.sum(ws * c[None, :], axis=1)[None, :], h2)
                h_rows = tl.reshape(h2, [ROWS]) + p
            if SYNC == "flag":
                tl.store(slot + rows, _flagged(h_rows, k), mask=rmask)
            else:
                tl.store(slot + rows, h_rows, mask=rmask)
            # prefetch the next layer's P (and rows of W): their latency hides behind the wait
            ni = (i + 1) % L
            nt = t + 1 if i == L - 1 else t
            if SUB == ROWS:
                w = tl.load(w_ptr + ni * C * C + wofs, mask=wmask, other=0.0)
            p = tl.load(p_ptr + (ni * T + nt) * C + rows, mask=rmask & (rows * 0 + nt < T), other=0.0)  # past the last step: nothing
            # 3. wait for the other programs of this run; 4. read the whole h
            spins = 0
            if SYNC == "flag":
                word = tl.load(slot + cols, mask=cmask, other=0, volatile=True)
                late = tl.sum(tl.where(cmask & ((word >> 32).to(tl.int32) != k), 1, 0), axis=0)
                while (late > 0) & alive:
                    word = tl.load(slot + cols, mask=cmask, other=0, volatile=True)
                    late = tl.sum(tl.where(cmask & ((word >> 32).to(tl.int32) != k), 1, 0), axis=0)
                    spins += 1
                    alive = spins < max_spin
                h = word.to(tl.int32).to(tl.float32, bitcast=True)  # the low half: the value
            else:
                tl.debug_barrier()  # the whole program's stores precede the release below
                tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
                target = k * NPROG
                if SYNC == "atomic":
                    while (tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu") < target) & alive:
                        spins += 1
                        alive = spins < max_spin
                else:
                    while (tl.load(bar_ptr, volatile=True) < target) & alive:
                        spins += 1
                        alive = spins < max_spin
                    tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
                tl.debug_barrier()
                h = tl.load(slot + cols, mask=cmask, other=0.0, cache_modifier=".cg")
            z = c + tl.maximum(h, 0.0)
            mean = tl.sum(z, axis=0) / C
            d = tl.where(cmask, z - mean, 0.0)
            var = tl.sum(d * d, axis=0) / C
            gamma = tl.load(g_ptr + i * C + cols, mask=cmask, other=0.0)
            beta = tl.load(b_ptr + i * C + cols, mask=cmask, other=0.0)
            c = tl.where(cmask, d * tl.rsqrt(var + eps) * gamma + beta, 0.0)
            tl.store(out_ptr + (i * T + t) * C + cols, c, mask=mine)
    if not alive:
        tl.atomic_add(err_ptr, 1)


def _meta(C: int, rows: int, sub: int, warps: int | None, sync: str, L: int) -> dict:
    block = triton.next_power_of_2(C)
    if warps is None:
        warps = 4 if block <= 1024 else 8
    return dict(L=L, C=C, BLOCK_C=block, ROWS=rows, SUB=sub, NPROG=triton.cdiv(C, rows), SYNC=sync, num_warps=warps)


def _buffers(R: int, C: int, sync: str, device):
    hbuf = torch.zeros(R, 2, C, device=device, dtype=torch.int64 if sync == "flag" else torch.float32)
    bar = torch.zeros(R, device=device, dtype=torch.int32)
    err = torch.zeros(1, device=device, dtype=torch.int32)
    return hbuf, bar, err


_COMPILED: dict = {}


def compiled_info(device, L: int, C: int, rows: int = 8, sub: int | None = None, warps: int | None = None, sync: str = "atomic") -> dict:
    """The compiled variant's resources and how many of its programs one multiprocessor holds
    at once (``per_sm``: by registers, allocated per warp in units of 256, by threads, by shared
    memory and by MAX_BLOCKS_PER_SM; 0 when it does not compile). Compiled once per variant
    and device."""
    sub = rows if sub is None else sub
    meta = _meta(C, rows, sub, warps, sync, L)
    key = (device, tuple(sorted(meta.items())))
    if key not in _COMPILED:
        z = torch.zeros(1, device=device)
        hbuf, bar, err = _buffers(1, C, sync, device)
        try:
            with torch.cuda.device(device):
                ck = _recurrent_kernel.warmup(z, z, z, z, z, hbuf, bar, err, 1e-5, 2, 2, grid=(1,), **meta)
                getattr(ck, "_init_handles", lambda: None)()  # loads it: n_regs, n_spills (and out-of-resources errors)
                n_regs, n_spills, shared = ck.n_regs, ck.n_spills, ck.metadata.shared
        except triton.runtime.errors.OutOfResources as e:  # registers, shared memory: this variant does not fit
            _COMPILED[key] = {"per_sm": 0, "compile_error": f"{type(e).__name__}: {e}"[:300]}
            return _COMPILED[key]
        except AttributeError as e:  # another Triton's compiled-kernel API: one program per multiprocessor is safe
            _COMPILED[key] = {"per_sm": 1, "introspection_error": f"{type(e).__name__}: {e}"[:300]}
            return _COMPILED[key]
        props = torch.cuda.get_device_properties(device)
        warps = meta["num_warps"]
        regs_per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
        per_sm = min(
            getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * warps),  # 64 Ki on every NVIDIA GPU since Kepler
            props.max_threads_per_multi_processor // (warps * 32),
            (getattr(props, "shared_memory_per_multiprocessor", 0) or props.shared_memory_per_block) // (shared + 1024),  # 1 KiB reserved per block
            MAX_BLOCKS_PER_SM,
        )  # fmt: skip
        _COMPILED[key] = {"n_regs": n_regs, "n_spills": n_spills, "shared": shared, "num_warps": warps, "per_sm": per_sm}
    return _COMPILED[key]


def resident_programs(device, L: int, C: int, rows: int = 8, sub: int | None = None, warps: int | None = None, sync: str = "atomic") -> int:
    """How many programs of this variant the device is guaranteed to hold at once (all
    multiprocessors x compiled_info's per_sm); a grid-barrier launch must not exceed it."""
    per_sm = compiled_info(device, L, C, rows, sub, warps, sync)["per_sm"]
    return sm_count(device) * per_sm


def recurrent_batched(P, W, G, B, eps: float, rows: int = 8, sub: int | None = None, warps: int | None = None,
                      sync: str = "atomic", check_residency: bool = True):  # fmt: skip
    """(R, L, T, C) layer outputs of R recurrences in one launch, each context starting at
    zero; P (R, L, T, C), W (R, L, C, C), G and B (R, L, C), all float32 and contiguous.
    None when the grid R * ceil(C / rows) is not guaranteed resident at once on the device
    (``check_residency`` off only under the interpreter, which runs one program at a time
    and so needs C <= rows) or a run's offsets would overflow int32. ``rows`` and ``sub``
    are powers of two (sub <= rows)."""
    R, L, T, C = P.shape
    sub = rows if sub is None else sub
    if sync not in SYNC_MODES or rows < 1 or sub < 1 or rows & (rows - 1) or sub & (sub - 1) or sub > rows:
        raise ValueError(f"recurrent_batched: sync must be one of {SYNC_MODES} and rows >= sub powers of two, got {sync!r}, {rows}, {sub}")
    if L * T * C >= 2**31:
        return None
    meta = _meta(C, rows, sub, warps, sync, L)
    grid = R * meta["NPROG"]
    if check_residency and grid > resident_programs(P.device, L, C, rows, sub, warps, sync):
        return None
    out = torch.empty_like(P)
    hbuf, bar, err = _buffers(R, C, sync, P.device)
    _recurrent_kernel[(grid,)](P, W, G, B, out, hbuf, bar, err, eps, T, MAX_SPIN, **meta)
    if int(err.item()):
        raise BarrierTimeout(f"recurrent kernel: {int(err.item())} program(s) gave up waiting at a barrier "
                           f"(rows={rows} sub={sub} sync={sync} grid={grid}); its programs were not all resident")  # fmt: skip
    return out


def recurrent_persistent(P, W, G, B, eps: float, rows: int | None = None, sync: str = "atomic"):
    """(L, T, C) layer outputs of one recurrence (P (L, T, C), W (L, C, C), G and B (L, C)):
    :func:`recurrent_batched` of one run; ``rows`` None takes the fewest rows (8, 16, 32) whose
    grid has one program per multiprocessor. None where no variant fits."""
    C = P.shape[-1]
    if rows is None:
        sms = sm_count(P.device)
        rows = next((r for r in (8, 16, 32) if triton.cdiv(C, r) <= sms), None)
        if rows is None:
            return None
    out = recurrent_batched(P[None], W[None], G[None], B[None], eps, rows=rows, sync=sync)
    return None if out is None else out[0]


# the graphed fallback: one launch per layer and step (recurrent.triton_pass)


@triton.jit
def _recurrent_step_kernel(
    xin_ptr, hin_ptr, xout_ptr, hout_ptr, gamma_ptr, beta_ptr, w_ptr, p_ptr, out_ptr, eps,
    C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, FIRST: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    x = tl.load(xin_ptr + cols, mask=cmask, other=0.0)
    if FIRST:
        y = x  # the initial context: no layer to finish
    else:
        h = tl.load(hin_ptr + cols, mask=cmask, other=0.0)
        z = x + tl.maximum(h, 0.0)
        mean = tl.sum(z, axis=0) / C
        d = tl.where(cmask, z - mean, 0.0)
        var = tl.sum(d * d, axis=0) / C
        gamma = tl.load(gamma_ptr + cols, mask=cmask, other=0.0)
        beta = tl.load(beta_ptr + cols, mask=cmask, other=0.0)
        y = d * tl.rsqrt(var + eps) * gamma + beta
    lo = pid * ROWS
    mine = cmask & (cols >= lo) & (cols < lo + ROWS)
    tl.store(xout_ptr + cols, y, mask=mine)  # every program writes its slice of y
    if not FIRST:
        tl.store(out_ptr + cols, y, mask=mine)
    rows = lo + tl.arange(0, ROWS)
    rmask = rows < C
    w = tl.load(w_ptr + rows[:, None] * C + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    hnew = tl.sum(w * y[None, :], axis=1) + tl.load(p_ptr + rows, mask=rmask, other=0.0)
    tl.store(hout_ptr + rows, hnew, mask=rmask)


def recurrent_step(xin, hin, xout, hout, gamma, beta, w, p, out, eps: float, first: bool = False, rows: int = 8) -> None:
    """Finish the previous layer into ``out``/``xout`` and start the next one into ``hout``."""
    C = xin.shape[0]
    block = triton.next_power_of_2(C)
    grid = (triton.cdiv(C, rows),)
    _recurrent_step_kernel[grid](xin, hin, xout, hout, gamma, beta, w, p, out, eps,
                                 C=C, BLOCK_C=block, ROWS=rows, FIRST=first, num_warps=4)  # fmt: skip
