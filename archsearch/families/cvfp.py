"""The ``cvfp`` family: the CVFP engine (``archsearch.cvfp``) behind the family protocol.

Its runs are ``archsearch.cvfp.run.train_run``. Its config is the whole :class:`archsearch.config.RunConfig` (model shape in ``model:``, the
two phases in ``phase1:``/``phase2:``, arithmetic in ``engine:``), so every space file written
before families existed keeps its meaning, its study signature and its run-cache keys.
"""

from __future__ import annotations

from archsearch.config import RunConfig, param_counts as _cvfp_counts
from archsearch.families import Family, RunData
from archsearch.result import RunResult


def param_counts(cfg: RunConfig, embed_dim: int, vocab_size: int = 0) -> dict[str, int]:
    """Phase 1 (ContextBlock), phase 2 (TokenBlock) and their sum; the frozen embedding and
    tied head are not counted (cvfp.md 3)."""
    c = _cvfp_counts(cfg.model, embed_dim)
    return {"phase1": c["phase1_params"], "phase2": c["phase2_params"], "total": c["total_params"]}


def train(cfg: RunConfig, data: RunData, seed: int, device: str = "cpu", progress=None) -> RunResult:
    from archsearch.cvfp.phases import noop
    from archsearch.cvfp.run import train_run

    return train_run(cfg, data.embedding, data.train_ids, data.val_ids, seed, device, progress or noop)


def stage_sizes(cfg: RunConfig, device: str, runs: int, may_stop: bool) -> bool:
    """``engine.stage_sizes`` resolved: true / false as set; auto = on where it helps (CUDA
    with Triton and the persistent recurrent pass, more than one run to train) unless the
    trial may be stopped after any size (a pruner): then the unfinished sizes' phase 1 would
    be spent for nothing."""
    setting = cfg.engine.stage_sizes
    if setting is True or setting is False:
        return setting and runs > 1
    from archsearch.cvfp.run import staging_helps

    return runs > 1 and not may_stop and staging_helps(cfg, device)


def train_many(cfg: RunConfig, runs: list, device: str = "cpu", may_stop: bool = False):
    """A trial's runs staged (archsearch.cvfp.run.train_staged) where :func:`stage_sizes` says
    so, else None. ``runs``: (load, seed, progress), ``load() -> RunData`` (one embedding and
    validation stream for all); every run's data is loaded here, before the first phase 1."""
    if not stage_sizes(cfg, device, len(runs), may_stop):
        return None
    from archsearch.cvfp.phases import noop
    from archsearch.cvfp.run import train_staged

    data = [load() for load, _, _ in runs]
    staged = [(d.train_ids, seed, progress or noop) for d, (_, seed, progress) in zip(data, runs)]
    return train_staged(cfg, data[0].embedding, data[0].val_ids, staged, device)


def release() -> bool:
    """Drop the calling thread's kept phase-2 session (graphs, buffers, Adam; GPU runs only)."""
    from archsearch.cvfp.fast.graphs import release_phase2_graphs

    return release_phase2_graphs()


def gpu_memory(cfg: RunConfig, train_tokens: list[int], val_tokens: int, vocab_size: int, embed_dim: int) -> tuple[int, int]:
    """(peak, kept) bytes of a trial on a GPU (archsearch.cvfp.memory.trial_memory; ``train_tokens``:
    one entry per run). Staged where its runs may be (``engine.stage_sizes`` not false, more
    than one run; a pruner turns auto off: archsearch.resources)."""
    from archsearch.cvfp.memory import trial_memory

    return trial_memory(cfg, train_tokens, val_tokens, vocab_size, embed_dim, staged=cfg.engine.stage_sizes is not False)


family = Family(
    name="cvfp", config=RunConfig, param_counts=param_counts, train=train, version=1, release=release, gpu_memory=gpu_memory,
    train_many=train_many,
    description="Context Vector Fixed-Point model (docs/model.md); versioned by runcache.ENGINE_VERSION",
)  # fmt: skip
