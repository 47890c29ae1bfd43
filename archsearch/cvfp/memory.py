"""An upper estimate of one CVFP run's peak GPU memory, from its config and data sizes (pure:
no torch, no Ray, no Optuna).

What a GPU run allocates, stage by stage, read from run.py, phases.py, fast/layers.py,
fast/recurrent.py, fast/graphs.py and fast/head.py (bf16 on a GPU unless the config says
otherwise; ``g`` = bytes of the products' dtype, 2 for bf16, 4 for fp32/tf32). Shapes:
N training tokens (the run's size), M validation tokens, V vocabulary, E embedding width,
C context width, L layers, k input tokens, n = phase-1 rows per chunk (batch x chunk
batches, at most N), B = phase-2 batch, b = evaluation rows per step, d_i the TokenBlock's
widths.

- **resident** (the whole run): the embedding W and its normalised table (V, E) fp32 twice,
  the parameters of both blocks, token ids and windows (int64), phase 1's gradients (they
  stay on the ContextBlock's parameters after phase 1).
- **phase 1**: Adam's two moments; ``prev``, the noise, the input contexts and ``out_all``
  (N, C) fp32 each, two more (N, C) temporaries at the convergence rate (6 in all), or 4 of
  them while a chunk of n rows runs forward and backward: the token vectors (fp32 and g), per
  layer the GEMM input (n, C + E k) g, its output (n, C) g and the layer's output (n, C) fp32
  (plus, on the plain path, the fp32 concatenation and the ReLU's output), the loss's
  (n, C) temporaries and the backward's. ``engine.phase1_fused`` (fast/phase1.py, bf16 runs)
  holds ``prev``, the noise and ``out_all`` (3 of them) and its buffers, allocated once per
  phase 1 for the largest chunk: the token vectors and input contexts (g), the (n, L C) g
  pre-activations, the outputs of layers 0..L-2 in fp32 and g, the (n, C) fp32 gradient, the
  weights' g copies and fp32 gradient accumulators (L C (C + E k) each), the reductions'
  partial sums and the table (V + 1, E) in g; the larger of the two counts is taken.
- **contexts**: the final contexts (N, C) fp32, the shifted inputs (N, C) fp32 and the
  training cache (L, N, C) g, with a step of 4 b rows of activations.
- **recurrence** (the validation pass): the token halves P and two (L, M, C) fp32 outputs
  (persistent kernel; the graph path pads and keeps one more) and W_c stacked twice, next to
  the final contexts and the training cache; then (P freed) the run's phase-2 session is
  prepared beside the validation cache: a new session's warm-up step (uncaptured
  activations) and its graphs' pools.
- **phase 2**: the training cache (L, N, C) g and the validation cache (L, M, C) fp32; the
  session (kept by the worker for its next run): a copy of the TokenBlock, its Adam moments
  and gradients, the token-vector table (V, E) fp32, the head (V padded to 64, E) g, the
  captured step's per-layer GEMM inputs (B, C + d_i) g and the validation pass's
  (M, C + d_i) g; the captured step's activations with its (B, V) g logits, and the
  validation pass's per chunk (b, V) g logits (each graph keeps its own pool).
  ``engine.phase2_fused`` (fast/phase2.py, bf16 runs) replaces the TokenBlock's copy, its
  gradients and Adam's moments by four flat fp32 buffers of the block's parameters (each
  group of them aligned, so a little longer) and adds their bf16 shadow, the norm's scratch
  and Adam's step; its batch buffers are the step's GEMM inputs (one aligned buffer), windows,
  targets, row weights, loss per row, and the head's input, its gradient and a chunk of
  logits, held as buffers where the autograd step has them in its graph's pool
  (:func:`phase2_step_bytes` counts them as its constructor allocates them); its warm-up step
  keeps a copy of the flat parameters instead of allocating gradients and Adam's state.

The sum of each stage's live tensors is counted as if all of them were live at once, and the
largest stage is the run's peak: an upper estimate of ``torch.cuda.max_memory_allocated`` of
the run (scripts/check_memory_estimate.py compares the two on a GPU). The graphs' pools are
counted as allocated from their capture on (the allocator keeps them reserved for the graphs'
life; the tensors in them are freed). A kept session holds no data of the run that left it
(run.py drops its reference to the training cache after phase 2). :func:`trial_memory` puts a
trial's runs together, one after another or staged (``engine.stage_sizes``). It leaves out
what a process holds beside PyTorch's allocations (the CUDA context, cached but unused
blocks): archsearch.resources.process_bytes adds those.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from archsearch.config import RunConfig, phase1_params, phase2_params, token_widths

HEAD_PAD_ROWS = 64
"""fast/head.py pads the head's rows to a multiple of this."""
CHUNK_ROWS = 4096
"""fast/head.py forms the logits this many rows at a time."""
WORKSPACE_BYTES = 256 * 2**20
"""cuBLAS workspaces (one per stream, the capture stream included) and kernels' scratch."""
FLAT_ALIGN = 64
"""fast/phase2.py starts every group of parameters in its flat buffers at a multiple of this
many elements (its ALIGN)."""
NORM_BLOCK, NORM_PARTIALS = 4096, 1024
"""fast/phase2_kernels' norm pass: elements per program and at most this many programs (its
SQ_BLOCK and MAX_PARTIALS), one fp32 partial sum each."""
MAX_PROGRAMS = 4 * 256
"""fast/phase1_kernels' reductions run at most 4 programs per multiprocessor (256 SMs bound
every GPU made so far): their partial sums are (programs, C) and (programs, 3 C) fp32."""


@dataclass(frozen=True)
class RunMemory:
    """Bytes a run allocates at the peak of each stage (every stage includes ``resident``)."""

    resident: int
    phase1: int
    contexts: int
    recurrence: int
    phase2: int
    kept: int
    """What stays allocated after the run, for the worker's next run (the phase-2 session)."""

    @property
    def peak(self) -> int:
        return max(self.phase1, self.contexts, self.recurrence, self.phase2)

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "peak": self.peak}


def _gemm_bytes(precision: str) -> int:
    """Bytes per element of the products' inputs on a GPU (auto is bf16 there: config.resolve_precision)."""
    return 2 if precision in ("auto", "bf16") else 4


def _aligned(n: int) -> int:
    return -(-n // FLAT_ALIGN) * FLAT_ALIGN


def fused_phase2_numel(context_dim: int, widths: list[int]) -> int:
    """Elements of each of fast/phase2.py's flat buffers (parameters, gradients, moments, shadow):
    per TokenLayer its groups fc.weight, [proj.weight, proj.bias] where the widths differ, and
    (norm.weight, norm.bias, fc.bias), each starting at a multiple of FLAT_ALIGN."""
    off = 0
    for d_in, d_out in zip(widths[:-1], widths[1:]):
        groups = [d_out * (context_dim + d_in)] + ([d_out * d_in, d_out] if d_in != d_out else []) + [3 * d_out]
        for n in groups:
            off = _aligned(off) + n
    return _aligned(off)


def _fused_phase2(cfg: RunConfig, triton: bool) -> bool:
    """Whether phase 2 steps through fast/phase2.py (its ``supported``: engine.phase2_fused, bf16,
    Triton, the fused layers' view of the block; auto is bf16 on a GPU)."""
    e = cfg.engine
    return triton and e.fused_layers and e.phase2_fused and _gemm_bytes(e.precision) == 2


def phase2_step_bytes(cfg: RunConfig, train_tokens: int, vocab_size: int, embed_dim: int, *, triton: bool = True) -> int:
    """Bytes of phase 2's step itself, beside the token-vector table and the head: for the
    autograd step (graphs.Phase2Step) the TokenBlock's parameters, their gradients, Adam's two
    moments, its GEMM inputs, windows, targets and row weights; for the fused step
    (fast/phase2.FusedPhase2Step) every buffer its constructor allocates (the block's
    parameters become views of its flat fp32 buffer, so that buffer stands for them)."""
    m, B = cfg.model, cfg.phase2.batch_size
    L, C, k, E = m.num_layers, m.context_dim, m.num_input_tokens, int(embed_dim)
    g = _gemm_bytes(cfg.engine.precision)
    widths = token_widths(E, k, L)
    if not _fused_phase2(cfg, triton):
        cat_cols = sum(C + d for d in widths[:-1])  # per TokenLayer its GEMM input's columns
        return 4 * phase2_params(m, E) * 4 + g * B * cat_cols + 8 * B * (k + 1) + 4 * B
    rows = min(B, max(1, int(train_tokens) - 1))  # the step's buffers: a batch of the N - 1 positions at most
    T = fused_phase2_numel(C, widths)
    programs = min(NORM_PARTIALS, 1 << (-(-T // NORM_BLOCK) - 1).bit_length())  # the next power of 2
    V = int(vocab_size)
    Vp = -(-V // HEAD_PAD_ROWS) * HEAD_PAD_ROWS
    return (
        4 * 4 * T + g * T  # parameters, gradients, Adam's m and v (fp32), the shadow (g)
        + 4 * (programs + 1) + 4 + 8 * 5  # the norm's partials and clip factor, its count; Adam's step and powers (fp64)
        + g * sum(_aligned(rows * (C + d)) for d in widths[:-1]) + 8 * 2 * L  # the GEMM inputs (one buffer) and their table
        + 2 * g * rows * E + g * min(rows, CHUNK_ROWS) * Vp  # the head's input and its gradient, a chunk of logits
        + 4 * rows + 8 * rows * (k + 1) + 4 * rows + 8 + 8  # loss per row, windows, targets, row weights, rows, loss sum
    )


def estimate_run_memory(cfg: RunConfig, train_tokens: int, val_tokens: int, vocab_size: int, embed_dim: int,
                        *, triton: bool = True) -> RunMemory:  # fmt: skip
    """Peak bytes of one CVFP run on a GPU (see the module's text for what is counted).
    ``triton``: whether the GPU runs the Triton paths (fused layers where
    ``engine.fused_layers``, the fused head, the persistent recurrence); without them the
    plain paths' larger temporaries are counted."""
    m, p1, p2, e = cfg.model, cfg.phase1, cfg.phase2, cfg.engine
    N, M, V, E = int(train_tokens), int(val_tokens), int(vocab_size), int(embed_dim)
    L, C, k = m.num_layers, m.context_dim, m.num_input_tokens
    Ek = E * k
    g = _gemm_bytes(e.precision)
    fused = triton and e.fused_layers
    P1, P2 = phase1_params(m, E), phase2_params(m, E)
    widths = token_widths(E, k, L)
    NC = 4 * N * C  # one (N, C) fp32 tensor

    resident = (
        2 * 4 * (V + 1) * E  # W and its normalised table (V + 1, E) fp32
        + 4 * (P1 + P2)  # both blocks' parameters
        + 8 * (2 * N + 2 * M + 2 * (k - 1))  # ids and windows (int64)
        + 4 * P1  # phase 1's gradients stay on the ContextBlock
        + WORKSPACE_BYTES
    )

    # phase 1: a chunk of n rows forward and backward
    n = min(N, p1.batch_size * e.phase1_chunk_batches)
    per_layer = n * (g * (C + Ek) + g * C + 4 * C + 8)  # GEMM input, its output, the layer's output, mean/rstd
    if not fused:
        per_layer += n * (4 * (C + Ek) + g * C + 4 * C)  # the fp32 concatenation, ReLU's output, the residual sum
    chunk = n * Ek * (4 + g) + L * per_layer + 3 * 4 * n * C + 3 * 4 * n * C  # token vectors, layers, loss, backward
    adam1 = 2 * 4 * P1
    phase1 = max(6 * NC, 4 * NC + chunk)
    if fused and e.phase1_fused and g == 2:  # fast/phase1.FusedPhase1 (bf16 runs): its buffers, once per phase 1
        W1 = L * C * (C + Ek)  # the layers' weights
        nb = -(-n // p1.batch_size)
        buffers = (
            g * (V + 1) * E  # the table in g
            + n * (g * Ek + g * C + g * L * C)  # token vectors, input contexts, pre-activations
            + max(L - 1, 1) * n * C * (4 + g) + 8 * L * n + 4 * n * C  # layer outputs fp32 and g, mean/rstd, d output
            + 4 * (MAX_PROGRAMS + nb) * (C + 3) + 4 * MAX_PROGRAMS * 3 * C  # the reductions' partial sums
            + (4 + g) * W1 + 4 * 3 * L * C  # gradient accumulators and g weights
            + 4 * C * (C + Ek) + 4 * max(L * C * Ek, n * C)  # a weight gradient formed beside the old; a GEMM's fp32 result
        )
        phase1 = max(phase1, 3 * NC + buffers)
    phase1 += resident + adam1

    # the training cache (parallel pass, no grad)
    b = e.eval_batch_size
    step = 4 * b * (Ek * (4 + g) + L * 4 * C + g * (C + Ek) + g * C)
    train_cache = g * L * N * C
    contexts = resident + NC + NC + train_cache + step

    # the validation recurrence (the run's passes; held_bytes counts another staged run's)
    LMC = 4 * L * M * C
    recurrence = NC + train_cache + 2 * 4 * L * C * C + 4 * b * (Ek + C)  # W_c twice, the token half's batch
    if triton and e.recurrent in ("auto", "persistent", "graph"):
        # the persistent kernel: P, the pass's output and the kernel's (3 copies); where its grid
        # cannot be resident (C above 32 rows per multiprocessor: 1024 is safe on GPUs of 32 SMs and
        # more) or with ``graph``, the graph path: P, the output, the padded P and its output
        persistent = e.recurrent != "graph" and C <= 1024
        recurrence += (3 if persistent else 4) * LMC + (0 if persistent else 2 * 4 * L * 129 * C)  # + static buffers
    else:
        recurrence += 2 * LMC  # P and the output (the plain pass: the output only)

    # phase 2: the session (or, below 4 batches, the same parts uncaptured) and its graphs' pools
    Vp = -(-V // HEAD_PAD_ROWS) * HEAD_PAD_ROWS if triton else V
    B = p2.batch_size
    cat_cols = sum(C + d for d in widths[:-1])  # per TokenLayer its GEMM input's columns
    fused2 = _fused_phase2(cfg, triton)
    session = (
        phase2_step_bytes(cfg, N, V, E, triton=triton)  # the step: the TokenBlock, its gradients, Adam's, its buffers
        + 4 * (V + 1) * E  # the token-vector table
        + g * Vp * E  # the head
        + g * M * cat_cols + 8 * M * (k + 1)  # the validation pass's GEMM inputs, windows, targets
    )

    def activations(rows: int, train: bool, head_buffered: bool = False) -> int:
        """A TokenBlock forward (and, for training, backward) over ``rows`` rows with its head
        (``head_buffered``: the fused step's, whose head input, its gradient and logits are
        buffers of the step, counted in :func:`phase2_step_bytes`)."""
        act = 4 * rows * Ek
        for d_in, d_out in zip(widths[:-1], widths[1:]):
            act += rows * d_out * (g + (g if d_in != d_out else 0) + 4) + 8 * rows  # z, projection, output, mean/rstd
            if not fused:
                act += rows * (4 * (C + d_in) + g * d_out + 4 * d_out)
        logits = min(rows, CHUNK_ROWS) * Vp * g
        if not triton:  # F.cross_entropy over fp32 logits: a copy, log-softmax and its gradient
            logits = rows * V * (g + 4 * 3 if train else g + 4 * 2)
        act += (0 if head_buffered else logits + 2 * g * rows * E) + 8 * rows * E + 8 * rows
        if train:
            act += 3 * 4 * rows * max(widths)  # the backward's temporaries
        return act

    # the graphs' pools keep a step's and a validation chunk's temporaries for the session's life
    step_act = activations(B, True, head_buffered=fused2)
    pools = step_act + activations(min(b, M), False)
    if fused2:  # a new session's eager step: its activations beside a copy of the flat parameters
        warmup = step_act + 4 * fused_phase2_numel(C, widths)
    else:  # its activations, gradients, Adam's, g weights
        warmup = step_act + 4 * P2 * 3 + g * P2
    # after the passes (P freed), the run's phase-2 session is prepared beside the validation cache
    recurrence = resident + max(recurrence, NC + train_cache + LMC + session + pools + warmup)
    er = 12 * min(N, e.er_max_rows) * C + 8 * C * C + 8 * (2 * C * C + 6 * C)  # rows, their fp64 copy, the Gram, eigvalsh's workspace
    phase2 = resident + NC + train_cache + LMC + session + pools + er  # the final contexts live until the ERs
    graphed = p2.batch_size * 4 <= N - 1 and e.phase2_graph
    kept = session + pools if graphed else 0
    return RunMemory(resident, phase1, contexts, recurrence, phase2, kept)


def held_bytes(cfg: RunConfig, train_tokens: int, val_tokens: int, embed_dim: int, stage: str = "pass") -> int:
    """Bytes a staged run (cvfp/run.py, ``engine.stage_sizes``) holds on its device while
    another run works: from its phase 1 on its (N, C) final contexts, its blocks' parameters,
    the ContextBlock's phase-1 gradients and its token ids and windows (``stage="start"``);
    during the batched validation pass also its (L, M-1, C) validation cache, its token
    halves and its W_c stacked twice (``"pass"``, the most); after it, until its finish, the
    validation cache (``"finish"``); fp32 all (the ids int64)."""
    m = cfg.model
    C, L, k = m.context_dim, m.num_layers, m.num_input_tokens
    caches = {"start": 0, "pass": 2, "finish": 1}[stage]
    weights = 2 * L * C * C if stage == "pass" else 0
    ids = 8 * (2 * train_tokens + k)
    return ids + 4 * (train_tokens * C + caches * L * (val_tokens - 1) * C + weights + 2 * phase1_params(m, embed_dim) + phase2_params(m, embed_dim))


def trial_memory(cfg: RunConfig, train_tokens: list[int], val_tokens: int, vocab_size: int, embed_dim: int,
                 staged: bool) -> tuple[int, int]:  # fmt: skip
    """(peak, kept) bytes of a trial's runs on a GPU (``train_tokens``: one entry per run, its
    sizes times its seeds): the trial allocates at most peak + kept, kept standing for the one
    phase-2 session a thread holds at a time (an earlier run's or trial's, or the staged
    trial's own during its finishes; archsearch.resources.process_bytes adds the largest any
    config keeps). One after another, the largest run's peak bounds them all. Staged (cvfp/run.train_staged, all runs in one group: the most a group
    holds), the runs not working hold :func:`held_bytes` beside the working one: each run's
    phase 1 beside the runs started before it; the first run's train cache and recurrence
    beside every other run's share of the batched pass; each run's finish beside the runs still to finish and
    the validation caches of every run of the group (one launch's caches are views of one
    tensor, freed with the last of them)."""
    runs = sorted(int(n) for n in train_tokens)
    ests = [estimate_run_memory(cfg, n, val_tokens, vocab_size, embed_dim) for n in runs]
    peak = max(e.peak for e in ests)
    kept = max(e.kept for e in ests)
    if not staged or len(runs) < 2:
        return peak, kept
    held = {stage: [held_bytes(cfg, n, val_tokens, embed_dim, stage) for n in runs] for stage in ("start", "pass", "finish")}
    m = cfg.model
    val = 4 * m.num_layers * (val_tokens - 1) * m.context_dim  # one run's validation cache
    starts = max(sum(held["start"][:j]) + e.phase1 for j, e in enumerate(ests))
    passes = sum(held["pass"][1:]) + max(ests[0].contexts, ests[0].recurrence)  # the first run's train cache is built first
    finishes = max(sum(held["start"][j + 1 :]) + val * (len(runs) - 1) + max(e.contexts + val, e.phase2) for j, e in enumerate(ests))
    return max(peak, starts, passes, finishes), kept
