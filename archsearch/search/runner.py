"""``archsearch run``: a space file -> trials on Ray Tune -> an Optuna study.

Order matters for "bad input writes nothing": the space, the storage URL, the data and
the cluster's resources are all checked before the study is created or touched.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archsearch import paths
from archsearch.console import data_progress
from archsearch.errors import ConfigError, is_disk_full
from archsearch.plan import prepare_space_data, trial_plan
from archsearch.space import Space, known_embed_dim, known_vocab_size
from archsearch.timing import Laps


@dataclass
class RunSummary:
    study_name: str
    storage: str
    outcomes: list[Any] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)
    done_before: list[str] = field(default_factory=list)
    failed_stale: list[int] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    artifact_dir: str | None = None
    cluster_lost: str | None = None
    """Why the Ray cluster was lost mid-run (its raylet or GCS died, or stopped answering)."""
    disk_full: str | None = None
    """Why the run stopped early for want of space (see StudyBridge.halt)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per part of the run, contiguous laps (archsearch.timing): checks, ray_init,
    data_wait, study, trials, record, publish (``archsearch run`` adds imports and space before
    them, summary and ray_shutdown after), and data, which runs beside ray_init."""
    repeats: int = 0
    """Proposals answered from the study (configs it already held), not run."""
    exhausted: str | None = None
    """Set when the search stopped because the sampler proposed only repeats."""
    gpu_sharing: dict[str, Any] | None = None
    """What ``resources.gpus: auto`` decided on a cluster with GPUs (archsearch.resources.Sharing)."""

    @property
    def failed(self) -> list[Any]:
        return [o for o in self.outcomes if o.state == "FAIL"]

    def to_dict(self) -> dict[str, Any]:
        """The run's summary as plain data (what ``archsearch run --json`` writes)."""
        return {
            "study": self.study_name, "storage": self.storage, "seconds": self.seconds,
            "interrupted": self.interrupted, "counts": self.counts, "queued": self.queued,
            "failed_stale": self.failed_stale, "timings": self.timings,
            "trials": [dict(o.__dict__) for o in self.outcomes], "repeats": self.repeats, "exhausted": self.exhausted,
            "gpu_sharing": self.gpu_sharing,
        }  # fmt: skip


def init_ray(address: str | None, quiet: bool = True, temp_dir: str | None = None):
    """Connect to a cluster (``--address``) or start an embedded local Ray (dashboard off)
    whose folders (sessions, logs, sockets, spilled objects) are under ``temp_dir``
    (default: :func:`ray_temp_dir`)."""
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray

    if ray.is_initialized():
        return ray
    reap_orphans()
    kwargs: dict[str, Any] = {"log_to_driver": not quiet, "logging_level": "ERROR", "configure_logging": True}
    if address:
        _probe(address)
        try:
            with _masked_entrypoint(ray):
                ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise ConfigError(f"--address {address}: cannot connect to a Ray cluster there ({str(e).splitlines()[0]})") from None
    else:
        # "local": a new embedded instance, never a cluster that `ray start` left on this machine
        temp_dir = temp_dir or ray_temp_dir()
        keep = ray_sessions_kept()
        with _loopback_only(ray), _owner_mark(), _prompt_node_wait(), _masked_entrypoint(ray):
            ray.init(address="local", include_dashboard=False, _node_ip_address=LOOPBACK, _temp_dir=temp_dir, **local_init_options(), **kwargs)
        node = ray._private.worker._global_node
        if node is not None:
            _EMBEDDED.update(session=Path(node.get_session_dir_path()), keep=keep)
            _mark_session(_EMBEDDED["session"])
            import atexit

            atexit.register(_prune_old_sessions)  # where no stop_embedded_ray comes (the Python API's Ray stays up): at exit
    return ray


@contextmanager
def _masked_entrypoint(ray):
    """Ray records its driver's command line as the job's entrypoint (in the GCS's job table:
    ``ray list jobs``, a cluster's dashboard); ``--storage postgresql://user:PASSWORD@…`` is
    on it. While ``ray.init`` connects, the command line it reads goes through
    :func:`archsearch.search.storage.mask_args` (Ray asks ``ray._private.utils.get_entrypoint_name``)."""
    from subprocess import list2cmdline

    from archsearch.search.storage import mask_args

    utils = ray._private.utils
    original = getattr(utils, "get_entrypoint_name", None)

    def masked() -> str:
        try:
            with open("/proc/self/cmdline", "rb") as f:
                args = [os.fsdecode(a) for a in f.read().split(b"\0")[:-1]]
        except OSError:  # not Linux: what Python was given
            args = [sys.executable, *sys.argv]
        return ("(interactive_shell) " if hasattr(sys, "ps1") else "") + list2cmdline(mask_args(args))

    if original is None:  # another Ray: nothing to patch
        yield
        return
    utils.get_entrypoint_name = masked
    try:
        yield
    finally:
        utils.get_entrypoint_name = original


CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")
"""Environment variables Ray Tune copies from the driver into every trainable's runtime_env
(``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``, for cloud checkpoint storage, which
archsearch does not use), where Ray's runtime-env agent logs them in plain text
(``session_*/logs/runtime_env_agent.log`` under the home). :func:`_no_credentials_to_trials`
keeps them out: a local worker inherits the driver's environment anyway, a cluster's worker
has its node's."""


@contextmanager
def _no_credentials_to_trials():
    """While Tune runs: :data:`CREDENTIAL_VARS` not among the variables it copies into the
    trainable's runtime_env (nothing else changes; the driver's own environment keeps them)."""
    try:
        from ray.tune.execution import class_cache
    except ImportError:  # another Ray Tune layout: nothing to change
        yield
        return
    original = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if original is None:
        yield
        return
    class_cache.ENV_VARS_TO_PROPAGATE = {v for v in original if v not in CREDENTIAL_VARS}
    try:
        yield
    finally:
        class_cache.ENV_VARS_TO_PROPAGATE = original


NODE_POLL_S = 0.02
"""How often the embedded Ray's start asks the GCS whether the raylet has registered."""
NODE_WAIT_S = 60.0
"""How long it asks, at most; then Ray's own wait (30 s more, then its error) takes over."""


@contextmanager
def _prompt_node_wait():
    """Notice the raylet's registration within NODE_POLL_S instead of Ray's whole second.

    ``ray.init`` waits for the new raylet to register with the GCS in a C++ loop that asks,
    then sleeps one second (GlobalStateAccessor::GetNode); the raylet registers only once its
    dashboard and runtime-env agents (Python processes) have started, so the wait ends on the
    next whole second after that (benchmarks/NOTES.md, branch ``cmd2``). While the node starts,
    Ray's ``services.get_node`` first polls the GCS's node table itself, then calls Ray's own,
    which then answers at once: the same node information either way. Anything unexpected
    (another Ray whose functions differ) falls through to Ray's wait unchanged."""
    from ray._private import services

    original = getattr(services, "get_node", None)
    if original is None:  # pragma: no cover - a Ray without it: its own wait
        yield
        return

    @functools.wraps(original)
    def get_node(gcs_address, node_id, *args, **kwargs):
        try:
            from ray._raylet import GcsClient
            from ray.core.generated.gcs_pb2 import GcsNodeInfo

            client = GcsClient(address=gcs_address)
            deadline = time.monotonic() + NODE_WAIT_S
            while time.monotonic() < deadline:
                alive = client.get_all_node_info(timeout=5, state_filter=GcsNodeInfo.GcsNodeState.ALIVE)
                if any(key.hex() == node_id for key in alive):
                    break
                time.sleep(NODE_POLL_S)
        except Exception:  # Ray's own wait below decides
            pass
        return original(gcs_address, node_id, *args, **kwargs)

    services.get_node = get_node
    try:
        yield
    finally:
        services.get_node = original


WARM_WORKERS_VAR = "ARCHSEARCH_RAY_WARM_WORKERS"


def local_init_options() -> dict[str, Any]:
    """ray.init options of the embedded local Ray beyond the dashboard's and the address's.

    No idle workers prestarted for the driver (Ray starts one per CPU when the driver
    connects, ~0.5 s of CPU each, 16 on a 16-core host): a trial never runs in one, since Ray
    Tune gives its trainable class a runtime_env of its own (``env_vars``), so every trial
    actor gets a fresh worker process, and archsearch starts no other Ray tasks.

    With ``ARCHSEARCH_RAY_WARM_WORKERS=1`` every worker Ray starts imports torch and the engine
    at once (trainable.warm_worker). Since a trial's worker starts only at its hand-out, this
    moves the imports, it does not hide them (no gain measured, benchmarks/NOTES.md): opt-in."""
    options: dict[str, Any] = {"_system_config": {"prestart_worker_first_driver": False}}
    if os.environ.get(WARM_WORKERS_VAR, "") in ("1", "true", "yes"):
        options["runtime_env"] = {"worker_process_setup_hook": "archsearch.search.trainable.warm_worker"}
    return options


RAY_TMPDIR_VAR = "ARCHSEARCH_RAY_TMPDIR"
SOCKET_PATH_MAX = 107
"""Bytes of a unix socket path on Linux (108 with its NUL; macOS: 103)."""


def ray_tmp_limit(pid: int | None = None) -> int:
    """The longest Ray temp folder whose socket paths fit: Ray puts them at
    ``<temp>/session_<date>_<time>_<usec>_<driver pid>/sockets/plasma_store`` (and ``raylet``),
    with room for the ``.N`` suffix Ray adds when a name is taken."""
    tail = len("/session_2026-12-01_12-20-41_208516_") + len(str(pid or os.getpid())) + len("/sockets/plasma_store") + 2
    return SOCKET_PATH_MAX - tail


def ray_temp_dir(note: bool = True) -> str:
    """The embedded Ray's temp folder: ``$ARCHSEARCH_RAY_TMPDIR`` if set (too long: a usage
    error), else ``<home>/ray``. A home too deep for Ray's socket paths is reached through a
    short link, ``<system temp>/archsearch-<uid>/<hash of the folder>``, and a one-line note
    names it (``note``; quiet runs print nothing): Ray's files still live under the home, only
    the link is outside."""
    import hashlib
    import tempfile

    limit = ray_tmp_limit()
    explicit = os.environ.get(RAY_TMPDIR_VAR)
    if explicit:
        folder = Path(explicit).expanduser().absolute()
        if len(os.fsencode(folder)) > limit:
            raise ConfigError(f"{RAY_TMPDIR_VAR}={_short(folder)}: {len(os.fsencode(folder))} bytes, but Ray's unix socket paths "
                              f"under it allow a folder of at most {limit} bytes ({SOCKET_PATH_MAX} for the whole path); choose a shorter one")  # fmt: skip
        return str(folder)
    target = paths.home() / "ray"
    if len(os.fsencode(target)) <= limit:
        return str(target)
    name = hashlib.sha256(os.fsencode(target)).hexdigest()[:8]
    links = Path(tempfile.gettempdir()) / f"archsearch-{os.getuid()}"
    if len(os.fsencode(links / name)) > limit:
        links = Path("/tmp") / links.name
    hint = f"set {RAY_TMPDIR_VAR} to a folder of at most {limit} bytes, or use a shorter ARCHSEARCH_HOME"
    try:
        links.mkdir(mode=0o700, exist_ok=True)
        st = links.lstat()
        import stat

        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise ConfigError(f"{links} (for a short link to Ray's folder) is not a private folder of this user: {hint}")
        target.mkdir(parents=True, exist_ok=True)
        link = links / name
        if not (link.is_symlink() and os.readlink(link) == str(target)):
            fresh = links / f".{link.name}.{os.getpid()}"
            fresh.unlink(missing_ok=True)
            fresh.symlink_to(target, target_is_directory=True)
            os.replace(fresh, link)  # atomic: a run starting at the same time sees the old link or the new one
    except OSError as e:
        raise ConfigError(f"{target} is too deep for Ray's unix socket paths ({SOCKET_PATH_MAX} bytes) and no short link to it "
                          f"could be made in {links} ({e.strerror or e}): {hint}") from None  # fmt: skip
    if not note:
        return str(link)
    from archsearch.console import err_console

    err_console.print(f"[yellow]note:[/yellow] {target} is too deep for Ray's socket paths; Ray reaches it through the link {link} "
                      f"({hint} to avoid it)", highlight=False, soft_wrap=True)  # fmt: skip
    return str(link)


RAY_SESSIONS_VAR = "ARCHSEARCH_RAY_SESSIONS"
RAY_SESSIONS_KEPT = 5
"""Session folders of the embedded Ray a run leaves in its temp folder when it ends: the newest
this many, and any whose driver still runs (``$ARCHSEARCH_RAY_SESSIONS`` overrides it; 0 keeps
only those in use)."""
_SESSION_NAME = re.compile(r"session_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+_(\d+)")
"""Ray's name for a head node's session folder: ``session_<date>_<time>_<µs>_<driver pid>``."""
_EMBEDDED: dict[str, Any] = {}
"""The session folder of the embedded Ray :func:`init_ray` started in this process, and the
sessions to keep once it stops (:func:`stop_embedded_ray` prunes the others)."""


def ray_sessions_kept() -> int:
    """How many session folders a run keeps (:data:`RAY_SESSIONS_KEPT`, or ``$ARCHSEARCH_RAY_SESSIONS``:
    a whole number of 0 or more, else a usage error naming it)."""
    raw = os.environ.get(RAY_SESSIONS_VAR, "").strip()
    if not raw:
        return RAY_SESSIONS_KEPT
    if not (raw.isascii() and raw.isdigit()):
        raise ConfigError(f"{RAY_SESSIONS_VAR}={raw!r}: not a whole number of 0 or more (how many of the embedded Ray's "
                          f"session folders a run keeps; default {RAY_SESSIONS_KEPT})")  # fmt: skip
    return int(raw)


def _driver_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists here (another user's too)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # none, or a pid no process can have
        return False
    except OSError:  # another user's (EPERM)
        return True
    return True


SESSION_MARK = "archsearch-driver"
"""A file :func:`init_ray` writes into its embedded Ray's session folder: ``<host> <pid> <start
time>`` of the driver, so that a run tells a session in use on another machine sharing the home
(whose pids it cannot see), and a live driver from a dead one whose pid a later process took."""


def _mark_session(session: Path) -> None:
    try:
        (session / SESSION_MARK).write_text(f"{socket.gethostname()} {os.getpid()} {_start_time(os.getpid())}\n")
    except OSError:  # only the pruning reads it (a session without it is judged by its name's pid)
        pass


def _session_in_use(path: Path, pid: int) -> bool:
    """Whether a session folder's driver may still run: by its mark where it has one (another
    host's: yes), else by the pid its name ends with."""
    try:
        fd = os.open(path / SESSION_MARK, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))  # a link is not followed: left alone
        with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
            host, mark_pid, started = f.read(4096).split()
    except FileNotFoundError:
        return _driver_alive(pid)
    except (OSError, ValueError):  # unreadable, a link, or not a mark: left alone
        return True
    if host != socket.gethostname() or not mark_pid.isdigit():
        return True
    if not _driver_alive(int(mark_pid)):
        return False
    now = _start_time(int(mark_pid))
    return now is None or started == "None" or now == started  # another start time: the pid was reused


def prune_ray_sessions(folder: str | Path, keep: int, in_use: tuple[Path, ...] = ()) -> list[Path]:
    """Remove the embedded Ray's session folders in ``folder`` beyond the newest ``keep`` (by the
    date and time in their names) whose driver (the pid their name ends with) is gone; a session
    in ``in_use``, one whose driver runs (another ``archsearch run`` sharing the home, with its
    own Ray; judged by its :data:`SESSION_MARK` where it has one: another host's stays),
    anything not a folder of this user named as Ray names sessions, and every link
    (``session_latest``) stay; no link is followed, in or under the folder. Returns the folders
    removed. Never raises OSError: what cannot be read or removed is a logged warning."""
    import logging

    protected = {Path(p).name for p in in_use}
    sessions = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                m = _SESSION_NAME.fullmatch(entry.name)
                try:
                    if m and entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == os.getuid():
                        sessions.append((entry.name, int(m.group(1)), Path(entry.path)))
                except OSError:
                    continue
    except OSError as e:
        logging.getLogger(__name__).warning("could not look for old Ray sessions in %s: %s", folder, e)
        return []
    sessions.sort(reverse=True)  # newest first: the names' zero-padded date, time and microseconds
    removed, failed = [], []
    for name, pid, path in sessions[keep:]:
        if name in protected or _session_in_use(path, pid):
            continue
        try:
            shutil.rmtree(path)  # links inside are removed, not followed
            removed.append(path)
        except OSError as e:
            failed.append(f"{path.name} ({e.strerror or e})")
    if failed:
        logging.getLogger(__name__).warning("could not remove %d old Ray session folder(s) in %s: %s", len(failed), folder, "; ".join(failed[:3]))
    return removed


def _short(path: Path, n: int = 120) -> str:
    text = str(path)
    return text if len(text) <= n else text[: n // 2] + "…" + text[-n // 2 :]


LOOPBACK = "127.0.0.1"
OWNER_VAR = "ARCHSEARCH_RAY_OWNER"
"""Set in the environment of the embedded Ray's processes (GCS, raylet, and through the
raylet its agents and workers): ``<driver pid>:<driver start time>``."""


def _start_time(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (Linux), which tells it from a later
    process that reuses its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@contextmanager
def _owner_mark():
    before = os.environ.get(OWNER_VAR)
    os.environ[OWNER_VAR] = f"{os.getpid()}:{_start_time(os.getpid())}"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(OWNER_VAR, None)
        else:
            os.environ[OWNER_VAR] = before


def reap_orphans() -> list[int]:
    """SIGKILL the embedded-Ray processes of archsearch drivers that are gone (a driver
    killed with SIGKILL leaves its GCS, raylet, agents and idle workers running for minutes).
    They are found by the owner mark in their environment; processes of live drivers, and
    anything without the mark, are left alone. Linux (/proc); elsewhere a no-op."""
    import signal

    mine = os.getpid()
    killed = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == mine:
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        mark = next((v for v in env.split(b"\0") if v.startswith(OWNER_VAR.encode() + b"=")), None)
        if mark is None:
            continue
        owner, _, started = mark.split(b"=", 1)[1].decode(errors="replace").partition(":")
        if not owner.isdigit() or _start_time(int(owner)) == started:
            continue  # its driver is alive
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except OSError:
            pass
    return killed


@contextmanager
def _loopback_only(ray):
    """Make the embedded Ray's GCS, raylet, agents and workers listen on 127.0.0.1 alone.

    ``_node_ip_address="127.0.0.1"`` by itself is not enough: ray.init replaces a loopback
    address by the machine's routable one unless Ray believes clusters are disabled (its
    Windows/macOS mode, switched by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), and its servers
    bind to the node address. The switch is on only while this node starts, so that a later
    ``--address`` connection in the same process reports its real address; the processes
    started here keep it in their environment (they run on this machine only)."""
    from ray._private import ray_constants

    var = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    before_env, before_const = os.environ.get(var), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[var] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_const
        if before_env is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = before_env


def _probe(address: str) -> None:
    """Fail fast on a host:port where no Ray cluster answers: nothing listens, or something
    that does not speak gRPC (Ray itself retries either for minutes)."""
    import socket

    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        conn = socket.create_connection((host or "127.0.0.1", int(port)), timeout=10)
    except OSError as e:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({e.strerror or e})") from None
    with conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "false", ""):
            why = _not_grpc(conn)
            if why:
                raise ConfigError(f"--address {address}: something listens there, but not a Ray cluster ({why}); "
                                  "give the head's GCS address (`ray start --head --port=...`)")  # fmt: skip


PROBE_GRPC_S = 5.0
"""Seconds an --address port has to answer like a gRPC server (Ray's GCS) before it is refused."""


def _not_grpc(conn) -> str | None:
    """Why the server on ``conn`` is not a gRPC (HTTP/2) server like Ray's GCS, or None.
    Ray itself retries a port that accepts but never answers for minutes; a gRPC server
    answers the HTTP/2 connection preface with a SETTINGS frame at once."""
    conn.settimeout(PROBE_GRPC_S)
    try:
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # preface + empty SETTINGS
        head = b""
        while len(head) < 9:
            part = conn.recv(9 - len(head))
            if not part:
                return "it closed the connection"
            head += part
    except TimeoutError:
        return f"no gRPC answer within {PROBE_GRPC_S:g} s"
    except OSError as e:
        return f"{e.strerror or e}"
    if head[3] != 0x04:
        return "its answer is not gRPC's"
    return None


def trial_resources(space: Space, ray) -> tuple[float, float]:
    cluster = ray.cluster_resources()
    have_gpus, have_cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 0))
    gpus = space.gpus if space.gpus is not None else (1.0 if have_gpus >= 1 else 0.0)
    problems = []
    if gpus > have_gpus:
        problems.append(f"resources.gpus: {gpus:g} GPU per trial, but the Ray cluster has {have_gpus:g} (set resources.gpus=0 to run on CPU)")
    if space.cpus > have_cpus:
        problems.append(f"resources.cpus: {space.cpus:g} CPU per trial, but the Ray cluster has {have_cpus:g}")
    have_memory = float(cluster.get("memory", 0)) / 2**30
    if space.memory_gb is not None and space.memory_gb > have_memory:
        problems.append(f"resources.memory_gb: {space.memory_gb:g} GB per trial, but the Ray cluster offers {have_memory:.1f} GB")
    if problems:
        raise ConfigError(problems)
    return gpus, space.cpus


GPU_MEMORY_TIMEOUT_S = 120.0
"""Seconds the child process that reads the GPUs' memory may take (torch's import and CUDA's
initialisation: seconds); past it, auto gives each trial a GPU of its own."""

_GPU_MEMORY_CODE = (
    "import json, torch\n"
    "m = [int(torch.cuda.get_device_properties(i).total_memory) for i in range(torch.cuda.device_count())] "
    "if torch.cuda.is_available() else None\n"
    "print(json.dumps(m or None))\n"
)


def local_gpu_memory() -> list[int] | None:
    """Bytes of each CUDA device this process sees (``torch.cuda.get_device_properties``: the
    same devices, under the same CUDA_VISIBLE_DEVICES, as the embedded Ray's), or None where
    there is none. Without an NVIDIA driver on the machine it returns at once (a CPU run pays
    nothing). Reading the properties makes no CUDA context.

    Read in a child process: the driver itself never imports torch (seconds of imports that
    would hold the driver's GIL while Ray starts beside them, and a longer interpreter exit);
    the child asks torch exactly as the driver would have."""
    if not Path("/proc/driver/nvidia/gpus").is_dir() and shutil.which("nvidia-smi") is None:
        return None
    import json
    import subprocess
    import sys

    try:
        out = subprocess.run([sys.executable, "-c", _GPU_MEMORY_CODE], capture_output=True, text=True, timeout=GPU_MEMORY_TIMEOUT_S,
                             stdin=subprocess.DEVNULL)  # fmt: skip
        if out.returncode != 0:
            return None
        memory = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):  # a broken driver or build: auto then gives each trial a GPU of its own
        return None
    if not isinstance(memory, list) or not all(isinstance(m, int) and m > 0 for m in memory):
        return None
    return memory or None


def _gpu_memory_job(space: Space, address: str | None):
    """For ``resources.gpus: auto`` on the embedded Ray: :func:`local_gpu_memory` (a child
    process) waited on in a thread of its own while Ray starts, with its seconds; None otherwise."""
    if space.gpus is not None or address:
        return None
    pool = ThreadPoolExecutor(1, thread_name_prefix="archsearch-gpu-memory")
    job = pool.submit(_timed, local_gpu_memory)
    pool.shutdown(wait=False)  # the job still runs to its end
    return job


def planned_trials(space: Space, n_new: int) -> int:
    """Trials this run may hand out: a grid's configs, a search's warm start and new trials."""
    return len(space.configs) + (0 if space.is_grid else n_new)


def auto_sharing(space: Space, ray, gpus: float, data, gpu_memory: list[int] | None, n_new: int, local: bool = True):
    """``resources.gpus: auto`` on a cluster with GPUs: the :class:`archsearch.resources.Sharing`
    that decides each trial's share of a GPU (None where auto means no GPU, or gpus is explicit).
    The GPUs' memory is the driver's view (``gpu_memory``), so a cluster joined with --address
    gets one GPU per trial."""
    from archsearch.resources import Sharing, resolve_auto

    if space.gpus is not None or gpus <= 0:
        return None
    cluster = ray.cluster_resources()
    n_gpus = float(cluster.get("GPU", 0))
    fits_cpus = int(float(cluster.get("CPU", 0)) / space.cpus + 1e-9) if space.cpus > 0 else space.max_concurrent
    at_once = max(1, min(space.max_concurrent, planned_trials(space, n_new), fits_cpus))  # trials that can run at once
    if not local:
        return Sharing(1, 1.0, "a cluster (--address): the driver does not see its GPUs' memory")
    if gpu_memory and len(gpu_memory) < n_gpus:
        gpu_memory = None  # Ray counts GPUs this process does not see: their memory is unknown
    tokens = [len(data.train_stream(size, space.data.size_unit)) for size in space.data.sizes]
    sizes = (tokens, len(data.val_tokens), data.vocab_size, data.embed_dim)
    return resolve_auto(space, n_gpus, min(gpu_memory) if gpu_memory else None, at_once, sizes)


def run_search(
    space: Space,
    *,
    storage: str | None = None,
    study_name: str | None = None,
    n_trials: int | None = None,
    address: str | None = None,
    view_mode: str = "auto",
    artifacts: Callable[..., Any] | None = None,
    laps: Laps | None = None,
) -> RunSummary:
    """Run ``space``'s study. ``artifacts(trial, config_name, records, fit, folder)`` draws and
    stores each finished trial's views and returns their files (default: its plot and table in
    the storage's artifact folder, see :mod:`archsearch.report.artifacts` and
    ``archsearch.search.bridge.ArtifactsFn``). ``laps``: the caller's, continued (the summary's
    timings are then its dict), else laps from this call's start."""
    t0 = time.time()
    laps = laps or Laps()
    timings = laps.into
    import optuna

    from archsearch.search import storage as stg
    from archsearch.search import study as st

    url = stg.resolve_url(storage or space.storage)
    stg.check_writable(url)
    check_search_options(space)
    st.check_heartbeat_vars()  # it judges stale trials by them
    name = study_name or space.study_name
    n_new = _n_new(space, n_trials)
    if address:
        _probe(address)  # first: a wrong address ends in a second, before Ray is imported or data prepared
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # every check first (space, storage URL, cluster resources, sizes against the data):
    # a bad request writes nothing but, at most, a valid prepared-data folder (the embedded
    # Ray's folder is removed again). The data is prepared (or loaded and verified) while Ray
    # starts; both take seconds.
    new_dirs = [] if address else [d for d in (paths.home(), paths.home() / "ray") if not d.exists()]
    from archsearch.search.study import check_heartbeat_vars

    check_heartbeat_vars()  # a bad $ARCHSEARCH_HEARTBEAT_S / $ARCHSEARCH_GRACE_S: a usage error before anything is made
    if not address:
        ray_sessions_kept()  # a bad $ARCHSEARCH_RAY_SESSIONS: a usage error before anything is made
    ray_tmp = None if address else ray_temp_dir(note=view_mode != "quiet")
    started = False
    try:
        with ThreadPoolExecutor(2, thread_name_prefix="archsearch-setup") as pool:
            data_job = pool.submit(_timed, prepare_space_data, space, data_progress(view_mode == "quiet"))
            laps.lap("checks")
            import ray  # before the thread below imports its parts

            imports_job = pool.submit(_warm_imports)  # Ray Tune, the storage's SQL layer: seconds of imports
            memory_job = _gpu_memory_job(space, address)
            started = not address and not ray.is_initialized()  # an embedded Ray of this call (not the caller's)
            init_ray(address, quiet=True, temp_dir=ray_tmp)
            laps.lap("ray_init")
            gpus, cpus = trial_resources(space, ray)
            data, timings["data"] = data_job.result()  # its own seconds, beside ray_init: not a lap
            memory = None
            if memory_job is not None:
                memory, timings["gpu_memory"] = memory_job.result()
            sharing = auto_sharing(space, ray, gpus, data, memory, n_new, local=not address)
            timings["warm_imports"] = imports_job.result()
            if sharing is not None:
                gpus = sharing.gpus
                if view_mode != "quiet":
                    from archsearch.console import err_console

                    err_console.print(f"[yellow]note:[/yellow] {sharing.message()}", highlight=False, soft_wrap=True)
        check_param_counts(space, data.embed_dim, data.vocab_size)  # a broken family fails here, before any study is written
        trackers = _open_trackers(space, name)
    except ConfigError:
        if started:
            discard_embedded_ray(new_dirs)
        else:
            for folder in reversed(new_dirs):  # made for Ray's folder (a link's target), left empty
                try:
                    folder.rmdir()
                except OSError:
                    pass
        raise
    from archsearch.search.bridge import StudyBridge
    from archsearch.search.trainable import cvfp_trainable
    from archsearch.search.view import LiveView

    laps.lap("data_wait")
    with stg.writer_lock(url):
        opt_storage = stg.open_storage(url)
        study = st.create_or_load(space, opt_storage, name)
        with stg.study_lock(opt_storage, url, name):
            rec = st.reconcile(study, space)
        summary = RunSummary(name, stg.mask_url(url), queued=rec.queued, done_before=rec.done, failed_stale=rec.failed_stale)
        summary.gpu_sharing = sharing.to_dict() if sharing is not None else None
        art = stg.artifact_dir_for(url)
        summary.artifact_dir = str(art)
        if artifacts is None:
            from archsearch.report.artifacts import TrialArtifacts

            artifacts = TrialArtifacts(art)
        make_plan = functools.partial(trial_plan, space, data_path=str(data.path))  # extra (capped_retry) included
        view = LiveView(len(space.data.sizes), space.data.size_unit, [o.label for o in space.objectives], view_mode)
        bridge = StudyBridge(study, space, make_plan, n_new, data.embed_dim, artifacts=artifacts, view=view, trackers=trackers,
                             scratch_dir=art)  # fmt: skip
        bridge.plan_gpus = gpus
        bridge.vocab_size = data.vocab_size
        results_dir = paths.home() / "ray" / f"{name}-{int(t0)}-{os.getpid()}"
        laps.lap("study")
        late_imports = _late_imports()  # a trial's end needs them first, seconds from now
        watch = ClusterWatch(ray, bridge, local=not address)
        try:
            with view:
                watch.start()
                _fit(ray, cvfp_trainable, bridge, space, gpus, cpus, results_dir)
        except ClusterLost:
            pass
        except KeyboardInterrupt:
            summary.interrupted = True
        except OSError as e:  # Tune's own experiment-state write in this process (it re-raises it)
            if not is_disk_full(e):
                raise
            bridge.halt(f"the disk is full: {e}")  # as when the study or the run cache cannot write
        finally:
            watch.stop()
            summary.cluster_lost = bridge.lost
            summary.disk_full = bridge.halted
            if bridge.lost:
                watch.clear_pending()
            left = bridge.fail_unfinished("interrupted before it finished; queued again for the next run")
            summary.interrupted = summary.interrupted or bool(left)
            bridge.close()
            trackers.close()
            shutil.rmtree(results_dir, ignore_errors=True)
        summary.outcomes = bridge.outcomes
        summary.repeats, summary.exhausted = bridge.repeats, bridge.exhausted
        summary.interrupted = not summary.cluster_lost and (summary.interrupted or any(o.kind == "interrupted" for o in bridge.outcomes))
        laps.lap("trials")
        timings["late_imports"] = late_imports()  # done long since, unless no trial ran (then the publishing needs them)
        summary.counts = _counts(study)
        _record_run(study, space, data, t0, timings["trials"], bridge)
        laps.lap("record")
        if summary.counts.get("COMPLETE"):
            _publish(study, url, storage or space.storage)
        laps.lap("publish")
        summary.seconds = time.time() - t0
        summary.timings = timings
        return summary


def check_search_options(space: Space) -> None:
    """Build the study's sampler and pruner once, before any storage is opened or created:
    an option Optuna refuses is a usage error that writes nothing (space.py checks the types;
    this catches what only Optuna's constructors know)."""
    from archsearch.search.distributions import make_pruner, make_sampler

    try:
        make_sampler(space)
        make_pruner(space)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sampler/early_stopping: {e}") from None


class ClusterLost(BaseException):
    """Raised in the thread running Ray Tune when the cluster is gone (see ClusterWatch). A
    BaseException, like KeyboardInterrupt: Tune's ``except Exception`` cleanup would wait on
    the dead cluster (removing placement groups through the GCS blocks for a minute)."""


WATCH_S = 1.0
"""How often the embedded Ray's raylet and GCS processes are checked."""
PROBE_TIMEOUT_S = 5.0
PROBE_FAILURES = 3
"""A cluster (--address) whose GCS has not answered this many probes in a row is lost (~15-30 s)."""


class ClusterWatch:
    """Notices a lost Ray cluster within seconds, where Ray Tune would wait forever.

    The embedded Ray: its raylet or GCS process has exited. A cluster (``--address``): its
    GCS has not answered PROBE_FAILURES probes in a row. Then every running trial ends FAIL
    ``cluster_lost`` (the bridge records it and queues it again), and ClusterLost is raised
    in the thread that runs Ray Tune, which unwinds the run to its summary."""

    def __init__(self, ray, bridge, local: bool):
        self.ray, self.bridge, self.local = ray, bridge, local
        self._stop = threading.Event()
        self._target = threading.get_ident()
        self._thread = threading.Thread(target=self._run, name="archsearch-cluster-watch", daemon=True)

    def start(self) -> None:
        self._target = threading.get_ident()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(WATCH_S if self.local else PROBE_TIMEOUT_S):
            reason = self._local_loss() if self.local else None
            if not self.local:
                failures = 0 if self._probe() else failures + 1
                if failures >= PROBE_FAILURES:
                    reason = f"its GCS has not answered for {failures} probes of {PROBE_TIMEOUT_S:g} s"
            if reason and not self._stop.is_set():
                self.bridge.cluster_lost(reason)
                self._raise_in_target()
                return

    def _local_loss(self) -> str | None:
        from ray._private import ray_constants

        node = self.ray._private.worker._global_node
        if node is None:
            return None
        for kind in (ray_constants.PROCESS_TYPE_RAYLET, ray_constants.PROCESS_TYPE_GCS_SERVER):
            for info in node.all_processes.get(kind, []):
                code = info.process.poll()
                if code is not None:
                    return f"the embedded Ray's {kind} process (pid {info.process.pid}) exited with code {code}"
        return None

    def _probe(self) -> bool:
        try:
            gcs = self.ray._private.worker.global_worker.gcs_client
            gcs.internal_kv_exists(b"archsearch-probe", b"archsearch", timeout=PROBE_TIMEOUT_S)
            return True
        except Exception:
            return False

    def _raise_in_target(self) -> None:
        import ctypes

        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._target), ctypes.py_object(ClusterLost))

    def clear_pending(self) -> None:
        """No ClusterLost left to land later in the thread that ran Ray Tune."""
        import ctypes

        if threading.get_ident() == self._target:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._target), None)


def discard_embedded_ray(new_dirs: list[Path] = ()) -> None:
    """After a usage error found once the embedded Ray had started: stop it and remove its
    session folder, then the folders in ``new_dirs`` (made for this run) if they are empty,
    so that the error leaves nothing behind."""
    import ray

    _EMBEDDED.clear()  # its own session goes below; the others are left as they are
    node = ray._private.worker._global_node if ray.is_initialized() else None
    session = Path(node.get_session_dir_path()) if node is not None else None
    if ray.is_initialized():
        ray.shutdown()
    if session is not None:
        shutil.rmtree(session, ignore_errors=True)
        latest = session.parent / "session_latest"
        if latest.is_symlink() and not latest.exists():
            latest.unlink(missing_ok=True)
    for folder in sorted(new_dirs, key=lambda d: len(d.parts), reverse=True):
        try:
            folder.rmdir()  # only if empty
        except OSError:
            pass


def stop_embedded_ray() -> None:
    """Stop Ray at the end of a command, before its summary is written (a no-op if Ray is not
    up; with ``--address`` only this driver disconnects).

    Ray's own exit handler would do the same after a fixed 0.5 s pause (for the workers' log
    lines, which an archsearch run does not forward), and its shutdown stops the processes of
    the node one after another, each given up to 1 s to end on SIGTERM: the autoscaler monitor
    takes all of it, since its SIGTERM handler reports its own end to the GCS, which Ray has
    stopped by then. A local run has no autoscaling and the monitor keeps no state, so it is
    stopped with SIGKILL first; Ray then stops the rest as usual (the raylet first, which
    stops the workers).

    Where :func:`init_ray` started this embedded Ray, its temp folder's old session folders are
    then pruned (:func:`prune_ray_sessions`: the newest :func:`ray_sessions_kept` and those in use
    stay; without a call here, at the interpreter's exit); a cluster's (``--address``) are never
    touched."""
    if "ray" not in sys.modules:
        return
    import ray

    if not ray.is_initialized():
        _prune_old_sessions()
        return
    node = ray._private.worker._global_node
    if node is not None and node.is_head():
        from ray._private import ray_constants

        for info in node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []):
            if info.process.poll() is None:
                info.process.kill()
                try:
                    info.process.wait(timeout=5)
                except Exception:  # pragma: no cover - Ray's shutdown kills and waits again
                    pass
    ray.shutdown()
    _prune_old_sessions()


def _prune_old_sessions() -> None:
    """Once: prune the temp folder of the embedded Ray that init_ray started (its own session stays)."""
    started = _EMBEDDED.copy()
    _EMBEDDED.clear()
    if started:
        session = started["session"]
        prune_ray_sessions(session.parent, started["keep"], in_use=(session,))


def abandon_ray(code: int = 1) -> None:
    """Exit now, after a lost cluster: stop what is left of the embedded Ray's processes
    (plain signals, no call to the dead cluster) and skip the exit handlers of Ray and Ray
    Tune, which talk to the GCS and would block for a minute."""
    import sys

    try:
        import ray

        node = ray._private.worker._global_node
        if node is not None:
            node.kill_all_processes(check_alive=False, allow_graceful=False)
    except Exception:  # pragma: no cover - best effort; the next run cleans up leftovers
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _open_trackers(space: Space, study_name: str):
    """The space's experiment trackers, opened after every other check and before the study
    is touched: a tracker that cannot be opened (a tracking server that does not answer) is
    a config error that leaves the study as it was."""
    from archsearch.tracking import Trackers, _mask

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # MLflow's default retries for minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    try:
        return Trackers.open(space.tracking, study_name, paths.home())
    except Exception as e:
        which = ", ".join(space.tracking.enabled) if space.tracking else "tracking"
        raise ConfigError(f"tracking ({which}): cannot open the tracker: {_mask(f'{type(e).__name__}: {e}')[:500]}") from None
MAX_RUN_RECORDS = 100
"""Runs of a study kept in its ``runs`` attribute (the newest)."""


def _record_run(study, space: Space, data, t0: float, trial_seconds: float, bridge) -> None:
    """What the report's header needs of this run, appended to the study's ``runs`` attribute:
    date, versions (CVFP's engine and its GPU paths', as run keys hold them), data fingerprint, seeds, the settings that differ from the defaults, the
    command's wall time so far and the trials' time. Never fails the run."""
    import datetime
    import logging

    try:
        from archsearch import __version__
        from archsearch.runcache import ENGINE_VERSION, GPU_ENGINE_VERSION

        runs = list(study.user_attrs.get("runs") or [])
        runs.append({
            "date": datetime.datetime.fromtimestamp(t0, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "archsearch_version": __version__, "engine_version": ENGINE_VERSION, "gpu_engine_version": GPU_ENGINE_VERSION,
            "data_fingerprint": _fingerprint(data), "seeds": list(space.seeds),
            "settings": non_default_settings(space), "seconds": round(time.time() - t0, 1),
            "trial_seconds": round(trial_seconds, 1), "trials": sum(1 for o in bridge.outcomes if o.state != "REPEAT"),
            "repeats": bridge.repeats, "exhausted": bridge.exhausted,
        })  # fmt: skip
        study.set_user_attr("runs", runs[-MAX_RUN_RECORDS:])
    except Exception as e:  # pragma: no cover - bookkeeping must not fail a finished run
        logging.getLogger(__name__).warning("could not record the run in the study: %s", e)


def _fingerprint(data) -> str | None:
    for name in ("fingerprint", "stream_fingerprint"):
        value = getattr(data, name, None)
        if isinstance(value, str):
            return value[:16]
    return None


def non_default_settings(space: Space) -> dict[str, Any]:
    """Every run setting (model/phase1/phase2/engine) the space sets away from its default."""
    from archsearch.config import RunConfig

    base, default = space.base.to_dict(), RunConfig().to_dict()
    out: dict[str, Any] = {}
    for section, values in base.items():
        if not isinstance(values, dict):
            continue
        for k, v in values.items():
            if default.get(section, {}).get(k) != v:
                out[f"{section}.{k}"] = v
    return out


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - t


WARM_IMPORTS = ("archsearch.search.bridge", "archsearch.search.trainable", "ray.tune", "sqlalchemy.orm", "alembic.command",
                "alembic.migration", "optuna.storages._rdb.models")
"""Imported while Ray starts: what the study and Ray Tune's start need right after it (Ray
Tune and the bridge, the SQL layer Optuna's storage loads on first use)."""
LATE_IMPORTS = ("archsearch.report.artifacts", "scipy.stats", "matplotlib.pyplot")
"""Imported beside Ray Tune's start, not waited for: what a trial's end needs first (its fit's
interval, its plot). Beside Ray's start they held the driver's GIL longer than Ray's start
took (benchmarks/NOTES.md, branch ``cmd2``)."""


def _import_all(names: tuple[str, ...]) -> float:
    """Import ``names``; their seconds. A failure here is met again, and reported, where the
    module is really used."""
    import importlib

    t = time.perf_counter()
    for name in names:
        try:
            if name == "matplotlib.pyplot":
                import matplotlib

                matplotlib.use("Agg")
            importlib.import_module(name)
        except Exception:  # pragma: no cover
            pass
    return time.perf_counter() - t


def _warm_imports() -> float:
    """:data:`WARM_IMPORTS`, in a thread beside Ray's start; their seconds."""
    return _import_all(WARM_IMPORTS)


def _late_imports() -> Callable[[], float]:
    """:data:`LATE_IMPORTS` in a daemon thread of their own (an import the main thread needs
    meanwhile waits on Python's import lock for the thread's, then finds it done); returns the
    wait for it, which gives their seconds."""
    box: dict[str, float] = {}
    thread = threading.Thread(target=lambda: box.update(seconds=_import_all(LATE_IMPORTS)), name="archsearch-late-imports", daemon=True)
    thread.start()

    def wait() -> float:
        thread.join()
        return box.get("seconds", 0.0)

    return wait


def _publish(study, url: str, given: str | None = None) -> None:
    """The study's summary as its note and its log-log plot as a study-level graph in
    optuna-dashboard (a failure here must not fail the run). ``given``: the storage as the
    user named it (see storage.shown_url)."""
    import logging

    from archsearch.report import publish_to_dashboard, study_report
    from archsearch.search.storage import shown_url

    try:
        publish_to_dashboard(study, study_report(study, shown_url(url, given)))
    except Exception as e:  # pragma: no cover - plotting/serialisation problems are reported, not raised
        logging.getLogger(__name__).warning("could not write the dashboard views: %s", e)


def _n_new(space: Space, n_trials: int | None) -> int:
    if space.is_grid:
        if n_trials:
            raise ConfigError("--n-trials: a grid runs exactly its configs; --n-trials is for search samplers (tpe, random, cmaes, nsga2)")
        return 0
    if n_trials is not None and n_trials < 0:
        raise ConfigError(f"--n-trials: expected a number >= 0, got {n_trials}")
    return space.n_trials if n_trials is None else n_trials


def _fit(ray, trainable, bridge, space: Space, gpus: float, cpus: float, results_dir: Path) -> None:
    from ray import tune

    from archsearch.search.bridge import PrunerScheduler, StudySearcher

    if _USER_PENDING is None:
        # Tune starts at most this many trials' workers at a time; with the default 1, the
        # second GPU's worker starts only once the first one runs (seconds lost per worker)
        os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(_slots(ray, space, gpus, cpus))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": cpus, "gpu": gpus, **({"memory": int(space.memory_gb * 2**30)} if space.memory_gb else {})}),
        tune_config=tune.TuneConfig(
            search_alg=StudySearcher(bridge),
            scheduler=PrunerScheduler(bridge),
            num_samples=-1,
            # no more trials than the cluster runs at once: a trial handed out waits only for
            # its worker to start, never for another trial's CPU or GPU
            max_concurrent_trials=_slots(ray, space, gpus, cpus),
            reuse_actors=True,  # a worker keeps torch imported between trials
        ),
        run_config=tune.RunConfig(
            name=results_dir.name,
            storage_path=str(results_dir.parent),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
            log_to_file=False,
        ),
    )
    with _quiet_tune_errors(), _no_credentials_to_trials(), _interruptible_resource_updates():
        tuner.fit()


RESOURCE_WAIT_S = 0.1
"""How often Ray Tune's thread looks up from a resource update it waits on (ClusterWatch's
exception reaches it within this)."""


@contextmanager
def _interruptible_resource_updates():
    """While Tune runs: its periodic refresh of the cluster's resources (``ray.cluster_resources``,
    a blocking call into the GCS, every TUNE_STATE_REFRESH_PERIOD seconds) runs in a daemon
    helper thread while Tune's thread waits on it in steps of RESOURCE_WAIT_S. If the GCS dies
    during that call, the call blocks for about a minute, and ClusterLost, which ClusterWatch
    raises in Tune's thread, would wait for it (a run that noticed the lost cluster at once still
    hung for 60 s); now the exception arrives at the next step and the run ends (abandon_ray
    leaves the helper behind). A refresh that is not due returns at once in Tune's thread."""
    try:
        from ray.tune.utils import resource_updater
    except ImportError:  # another Ray Tune layout: nothing to change
        yield
        return
    cls = getattr(resource_updater, "_ResourceUpdater", None)
    original = getattr(cls, "update_avail_resources", None)
    if original is None:
        yield
        return

    def update(self, *args, **kwargs):
        due = kwargs.get("force") or time.time() - getattr(self, "_last_resource_refresh", float("-inf")) >= getattr(self, "_refresh_period", 0)
        if not due:
            return original(self, *args, **kwargs)
        box: dict[str, Any] = {}

        def call():
            try:
                box["value"] = original(self, *args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - re-raised in Tune's thread
                box["error"] = e

        helper = threading.Thread(target=call, name="archsearch-tune-resources", daemon=True)
        helper.start()
        while helper.is_alive():
            helper.join(RESOURCE_WAIT_S)  # Python-level steps: an async exception (ClusterLost) gets in
        if "error" in box:
            raise box["error"]
        return box.get("value")

    cls.update_avail_resources = update
    try:
        yield
    finally:
        cls.update_avail_resources = original


@contextmanager
def _quiet_tune_errors():
    """Ray Tune logs every failed trial with Ray's traceback (a worker killed by the memory
    monitor: ~100 lines) and a closing "Trials did not complete"; the bridge records each
    failure with its cause and the summary shows it, so those loggers stay quiet; so does the
    saving of Tune's experiment state (a full disk fails it, and archsearch never restores it)."""
    import logging

    loggers = [logging.getLogger(n) for n in ("ray.tune.execution.tune_controller", "ray.tune.tune", "ray.tune.execution.experiment_state")]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, before):
            lg.setLevel(level)


_USER_PENDING = os.environ.get("TUNE_MAX_PENDING_TRIALS_PG")


def _slots(ray, space: Space, gpus: float, cpus: float) -> int:
    """How many trials the cluster can run at once (never more than ``max_concurrent``)."""
    cluster = ray.cluster_resources()
    fits = [space.max_concurrent]
    if gpus > 0:
        fits.append(int(cluster.get("GPU", 0) / gpus + 1e-9))
    if cpus > 0:
        fits.append(int(cluster.get("CPU", 0) / cpus + 1e-9))
    return max(1, min(fits))


def _counts(study) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(t.state.name for t in study.get_trials(deepcopy=False)))


# --------------------------------------------------------------------------- dry run


@dataclass
class DryRun:
    study_name: str
    storage: str
    exists: bool
    to_run: list[tuple[str, dict[str, Any]]]
    done: list[str]
    stale: list[int]
    n_new: int
    embed_dim: int | None
    vocab_size: int | None = None


def check_param_counts(space: Space, embed_dim: int, vocab_size: int) -> None:
    """Every named config's (and the base's) parameter counts, which also checks that each
    family of the space answers ``param_counts`` as the protocol says (FamilyError if not)."""
    from archsearch.config import run_param_counts

    for params in [{}, *space.configs.values()]:
        run_param_counts(space.run_config(params), embed_dim, vocab_size)


def dry_run(space: Space, *, storage: str | None = None, study_name: str | None = None, n_trials: int | None = None) -> DryRun:
    """What ``run`` would do, without writing anything (no study, no data, no cache)."""
    import optuna

    from archsearch.search import storage as stg
    from archsearch.search import study as st
    from archsearch.search.distributions import full_params

    url = stg.resolve_url(storage or space.storage)
    stg.check_writable(url)
    check_search_options(space)
    st.check_heartbeat_vars()  # it judges stale trials by them
    name = study_name or space.study_name
    n_new = _n_new(space, n_trials)
    wanted = {n: full_params(space, p) for n, p in space.configs.items()}
    present: dict[str, Any] = {}
    stale: list[int] = []
    exists = False
    try:
        opt_storage = stg.open_storage(url, create=False)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=name, storage=opt_storage)
        exists = True
        now = time.time()
        for t in study.get_trials(deepcopy=False):
            if t.state == optuna.trial.TrialState.RUNNING and not st.owner_alive(t.system_attrs.get(st.A_OWNER), t.system_attrs.get(st.A_HEARTBEAT), now):
                stale.append(t.number)
                continue
            if t.state != optuna.trial.TrialState.FAIL:
                present.setdefault(st.trial_key(t), t.state.name)
    except (FileNotFoundError, KeyError):
        pass
    except Exception as e:  # a storage that does not exist yet (no tables) is "no study"
        if "no such table" not in str(e).lower() and "does not exist" not in str(e).lower():
            raise
    to_run = [(n, p) for n, p in wanted.items() if st.params_key(p) not in present]
    done = [n for n, p in wanted.items() if st.params_key(p) in present]
    return DryRun(name, stg.mask_url(url), exists, to_run, done, stale, n_new, known_embed_dim(space.data), known_vocab_size(space.data))
