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


def release() -> bool:
    """Drop the calling thread's kept phase-2 session (graphs, buffers, Adam; GPU runs only)."""
    from archsearch.cvfp.fast.graphs import release_phase2_graphs

    return release_phase2_graphs()


def gpu_memory(cfg: RunConfig, train_tokens: list[int], val_tokens: int, vocab_size: int, embed_dim: int) -> tuple[int, int]:
    """(peak, kept) bytes of a trial on a GPU: its largest run's (archsearch.cvfp.memory), times
    the sizes it trains at once (``engine.concurrent_sizes``: each size thread keeps its own
    session). Its runs go one after another, so the largest size bounds them all."""
    from archsearch.cvfp.memory import estimate_run_memory

    est = estimate_run_memory(cfg, max(train_tokens), val_tokens, vocab_size, embed_dim)
    threads = _sizes_at_once(cfg)
    return threads * est.peak, threads * est.kept


def _sizes_at_once(cfg: RunConfig) -> int:
    """Sizes of a trial trained at once in threads (archsearch.trial.concurrent_sizes; 1 where
    the engine has no such threads)."""
    try:
        from archsearch.trial import concurrent_sizes
    except ImportError:
        return 1
    return concurrent_sizes(cfg)


family = Family(
    name="cvfp", config=RunConfig, param_counts=param_counts, train=train, version=1, release=release, gpu_memory=gpu_memory,
    description="Context Vector Fixed-Point model (shared/reference/cvfp.md); versioned by runcache.ENGINE_VERSION",
)  # fmt: skip
