"""The Ray Tune function trainable: one Optuna trial = one architecture across the sizes.

It runs in a Ray worker, reads the prepared data and the run cache from their (absolute,
shared) paths, and reports once per size. It never touches the study: the driver alone
writes to storage (which keeps SQLite safe and lets workers on other nodes run without a
database connection). A Python exception in the trial is reported as a ``failed`` event
with its cause; a crash of the worker itself reaches the driver through Ray. After a CUDA
failure the worker process is not used again (:class:`WorkerEnded`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Any

from archsearch.errors import is_cuda_failure, is_disk_full, is_out_of_memory
from archsearch.result import SizeRecord
from archsearch.trial import TrialPlan, free_worker, run_trial

__all__ = ["WorkerEnded", "cvfp_trainable", "is_out_of_memory"]

WORKER_ENDED = "a CUDA error: this worker's CUDA context may be unusable, so the worker process runs no other trial"


class WorkerEnded(RuntimeError):
    """Raised by the trainable after it reported a trial failed by a CUDA error: Ray Tune then
    ends the trial's actor, and with it the worker process, instead of keeping it for the next
    trial (it keeps only the actors of trials that ended without an error); the next trial
    starts in a new process."""

PROGRESS_S = 5.0
"""Phase-level progress reaches the driver at most this often."""


def _clean(x: Any) -> Any:
    """JSON-safe copy (NaN/Inf become None)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


@contextmanager
def memory_limit(gb: float | None):
    """Let this worker allocate at most ``gb`` GB more while the trial runs (RLIMIT_DATA, the
    process's private writable memory, over what it holds now: torch and Ray imported). An
    allocation beyond it fails in the trial (torch's "can't allocate memory", MemoryError)
    instead of the machine running out; the old limit is back afterwards, for the next trial
    this worker runs. Linux; elsewhere no limit."""
    try:
        import resource

        with open("/proc/self/status") as f:
            held = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    except (ImportError, OSError, StopIteration):
        gb = None
    if not gb:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    new = held + int(gb * 2**30)
    if hard != resource.RLIM_INFINITY:
        new = min(new, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (new, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def _process_age() -> float | None:
    """Seconds since this process started (Linux; None elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


WARMUP_VAR = "ARCHSEARCH_WORKER_WARMUP"
"""The trial worker's warm-up thread (:class:`Warmup`): ``auto`` (the default, and any value
not below) for trials on a GPU, ``1`` for every trial, ``0`` for none (to measure it). A CPU
trial gains nothing from it: its imports are all it would do there, and they hold the GIL
that the trial's own start needs."""

WARM_MODULES = ("torch", "archsearch.cvfp.run", "archsearch.families.cvfp")
"""What a worker's first run imports: the engine."""
CUDA_MODULES = ("archsearch.cvfp.fast.kernels", "archsearch.cvfp.fast.phase1_kernels", "archsearch.cvfp.fast.recurrent_kernels",
                "archsearch.cvfp.fast.head", "torch._higher_order_ops.triton_kernel_wrap", "torch.fx.experimental.symbolic_shapes")
"""On CUDA, the Triton kernels' modules too (their imports define the kernels), and the torch
modules a first CUDA run loads lazily (its profile: benchmarks/h200_worker_start.json)."""


class Warmup:
    """The first uses a trial's run would otherwise make itself, in a thread started at the
    trainable's entry, while the trial starts and loads its data: the imports above and, on
    CUDA, once the worker's allocator is configured (:meth:`allow_cuda`), the device's context,
    cuBLAS's handle (the engine's own GEMM probe, ``archsearch.cvfp.fast.device.gemm_caps``,
    whose answer it keeps) and Triton's driver.
    Joined at the run's first progress event (a run's start), so the run's phases never run
    beside it; its CUDA calls hold the engine's ``CAPTURE_LOCK`` (the lock every CUDA-graph
    capture and device-wide synchronisation takes), so nothing the engine does before that
    event (a staged trial's memory query) can meet them badly either.

    Scheduling only: it draws no random numbers and leaves no tensor behind, and a run's
    numbers do not depend on whether a context, a handle or a module was made before it
    (``tests/search/test_worker_warmup.py``: a run's numbers with it and without it, to the
    bit). The join has no time limit: the thread makes the calls the run's first steps would
    make, which would hang the run as well. Its failure is recorded (``error``) and nothing
    else: the run then meets, and reports, the same problem itself."""

    def __init__(self, cuda: bool):
        self.cuda, self.info = cuda, {"cuda": cuda, "seconds": None, "waited_s": None, "error": None, "cuda_skipped": False}
        self._thread = threading.Thread(target=self._run, name="archsearch-warmup", daemon=True)
        self._cuda_go = threading.Event()
        self._skip_cuda = False

    def allow_cuda(self) -> None:
        """Let its CUDA part begin: only once the worker's allocator is configured (a shared
        GPU's cap and allocator settings, archsearch.gpu_share.configure_worker, come before
        the process's first CUDA allocation). Until then the thread only imports."""
        self._cuda_go.set()

    def start(self) -> Warmup:
        self._thread.start()
        return self

    def _run(self) -> None:
        t = time.perf_counter()
        try:
            self._warm()
        except BaseException as e:  # noqa: BLE001 - nothing of it may reach the trial
            self.info["error"] = f"{type(e).__name__}: {e}"[:500]
        self.info["seconds"] = time.perf_counter() - t

    def _warm(self) -> None:
        import importlib

        for name in WARM_MODULES + (CUDA_MODULES if self.cuda else ()):
            try:
                importlib.import_module(name)
            except ImportError:  # an optional part (Triton) missing: the run takes its other path
                pass
        if not self.cuda:
            return
        self._cuda_go.wait()
        if self._skip_cuda:  # joined before allow_cuda: the trial went on without it
            self.info["cuda_skipped"] = True
            return
        import torch

        if not torch.cuda.is_available():
            return
        from archsearch.cvfp.fast.device import CAPTURE_LOCK, gemm_caps

        with CAPTURE_LOCK:
            device = torch.device("cuda", torch.cuda.current_device())  # the device Ray gave this worker (CUDA_VISIBLE_DEVICES)
            gemm_caps(device)  # the context, cuBLAS(Lt)'s handle and the probe the engine makes first
            try:
                from triton.runtime import driver

                driver.active.get_current_device()  # Triton's launcher utilities, loaded (built once, then cached)
            except ImportError:
                pass
            torch.cuda.current_stream(device).synchronize()

    def join(self) -> dict[str, Any]:
        """Wait for it (once; later calls return at once); what it did (``info``), with the
        seconds the trial waited for it."""
        if self.info["waited_s"] is None:
            t = time.perf_counter()
            if not self._cuda_go.is_set():
                self._skip_cuda = True
                self._cuda_go.set()
            self._thread.join()
            self.info["waited_s"] = time.perf_counter() - t
        return self.info


def _warmup(config: dict[str, Any]) -> Warmup | None:
    """This trial's warm-up, started, or None (:data:`WARMUP_VAR`)."""
    mode = os.environ.get(WARMUP_VAR, "auto").strip().lower()
    cuda = config.get("gpus", 0) > 0
    if mode in ("0", "false", "no", "off") or (mode not in ("1", "true", "yes", "on") and not cuda):
        return None
    return Warmup(cuda=cuda).start()


def cvfp_trainable(config: dict[str, Any]) -> None:
    entered, age = time.time(), _process_age()
    torch_before = "torch" in sys.modules  # imported already by warm_worker (ARCHSEARCH_RAY_WARM_WORKERS)
    warmup = _warmup(config)
    t = time.perf_counter()
    import ray
    import torch
    from ray import tune

    from archsearch.gpu_share import configure_worker

    worker = {"pid": os.getpid(), "entered": entered, "process_age_s": age, "imports_s": time.perf_counter() - t, "torch_before_trial": torch_before}

    plan = TrialPlan(**config["plan"])
    gpus = float(config.get("gpus", 0) or 0)
    plan.device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
    # a GPU shared with other trials: this worker's allocator capped to its share, before its
    # first CUDA allocation (archsearch.gpu_share)
    worker["gpu_share"] = configure_worker(gpus, cuda=plan.device == "cuda").to_dict()
    if warmup is not None:
        warmup.allow_cuda()  # the allocator is configured: the warm-up may make its first allocations
    torch.set_num_threads(max(1, int(config.get("cpus", 1))))
    node = ray.get_runtime_context().get_node_id()
    worker["resources"] = ray.get_runtime_context().get_assigned_resources()  # e.g. {"CPU": 1, "GPU": 0.25}: its share
    seq = 0
    cum_tokens = 0

    def report(event: str, payload: dict[str, Any], **extra: Any) -> None:
        nonlocal seq
        seq += 1
        tune.report({"archsearch_event": event, "seq": seq, "payload": json.dumps(_clean(payload)), "node": node or "", "pid": os.getpid(), **extra})

    report("started", {})  # the driver marks the trial RUNNING only now (it was WAITING, pending)

    def on_size(record: SizeRecord, partial: dict[str, Any]) -> None:
        nonlocal cum_tokens
        cum_tokens += record.train_tokens
        values = list(partial["objectives"].values())
        report("size", {"record": record.to_dict(), "partial": partial}, size_index=len(partial["sizes"]) - 1, step=cum_tokens,
               objective=values[0] if values and values[0] is not None else float("nan"))

    last_progress = [0.0]

    def progress(event: str, size, size_index, seed, **info) -> None:
        """Phase-level progress for the live view, at most every PROGRESS_S seconds. The first
        event (a run's start) waits for the warm-up first."""
        if warmup is not None and "warmup" not in worker:
            worker["warmup"] = warmup.join()
        now = time.monotonic()
        if event == "notice":  # a layer form the fast paths do not take: always shown
            report("progress", {"size_index": size_index, "size": size, "text": f"notice: {info['message']}"})
            return
        if now - last_progress[0] < PROGRESS_S or event not in ("phase1", "phase2", "contexts"):
            return
        last_progress[0] = now
        if event == "phase1":
            text = f"phase 1 iteration {info['iteration']}/{info['max_iterations']}"
        elif event == "phase2":
            text = f"phase 2 epoch {info['epoch']}/{info['max_epochs']}, val PPL {info['val_ppl']:.1f}"
        else:
            text = "validation contexts"
        report("progress", {"size_index": size_index, "size": size, "text": text})

    failure = None
    broken = False  # a CUDA failure: this process runs no other trial
    limit = config.get("memory_gb")
    try:
        with memory_limit(limit):
            result = run_trial(plan, on_size=on_size, progress=progress)
    except Exception as e:  # the trial failed; the study goes on
        tb = traceback.format_exc(limit=8)
        broken = is_cuda_failure(e)
        kind = "out_of_memory" if is_out_of_memory(e) else "disk_full" if is_disk_full(e) else "cuda_error" if broken else type(e).__name__
        error = f"{type(e).__name__}: {e}"
        if kind == "out_of_memory" and limit:
            error = f"the trial needs more memory than resources.memory_gb={limit:g} GB allows ({error})"
        if broken:  # CUDA's message goes on with advice about CUDA_LAUNCH_BLOCKING: its first line
            error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]} ({WORKER_ENDED})"
        failure = {"error": error[:2000], "kind": kind, "traceback": tb[-4000:]}
        e.__traceback__ = None  # its frames hold the run's tensors
    finally:
        if warmup is not None:  # a trial with no run to start (every run cached) or that failed before one
            worker["warmup"] = warmup.join()
        # this worker's next trial (or a co-tenant of its GPU) gets the memory back; after a
        # failure nothing of the trial's is kept. After a CUDA failure nothing is freed (it
        # would call CUDA again): the process ends
        if not broken:
            free_worker(plan, failed=failure is not None)
    if failure is not None:
        report("failed", failure)  # returns once the driver has taken it
        if broken:
            raise WorkerEnded(failure["error"])
        return
    report("final", dict(result, worker=worker))


def warm_worker() -> None:
    """Ray's ``worker_process_setup_hook`` of the embedded local Ray (search/runner.init_ray):
    every worker process, among them those Ray prestarts while the driver prepares the data
    and the study, imports torch and the engine when it starts, so the trial it is later given
    does not wait for them (seconds per worker). Never raises: a failed import is retried, and
    reported, by the trial itself."""
    try:
        import torch  # noqa: F401

        import archsearch.cvfp.run  # noqa: F401
        import torch.optim  # noqa: F401
    except Exception:  # pragma: no cover - the trial imports them again and reports the error
        pass
