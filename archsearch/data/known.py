"""The embedding shape (V, E) of a data spec, found without downloading or preparing anything."""

from __future__ import annotations

from pathlib import Path

KNOWN_SHAPES = {
    "minilm": (30522, 384),
    "gpt2": (50257, 768),
    "openai-community/gpt2": (50257, 768),
}


def _safetensors_shape(path: Path, key: str | None) -> tuple[int, int] | None:
    from safetensors import safe_open

    from archsearch.data.tokenizer import EMBEDDING_KEYS

    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = [key] if key else [k for k in EMBEDDING_KEYS if k in f.keys()]
            for k in keys:
                if k in f.keys():
                    shape = f.get_slice(k).get_shape()
                    return int(shape[0]), int(shape[1])
    except Exception:
        return None
    return None


def known_embedding_shape(spec) -> tuple[int, int] | None:
    """(V, E) of ``spec``'s tokenizer/embedding: from a table for the named ones, the header of
    a local folder's model.safetensors, or the local Hugging Face cache; None if unknown."""
    from archsearch.data.spec import DEFAULT_TOKENIZER

    name = spec.tokenizer or DEFAULT_TOKENIZER[spec.source]
    if name in KNOWN_SHAPES and not spec.embedding_key:
        return KNOWN_SHAPES[name]
    folder = Path(name).expanduser()
    if folder.is_dir():
        return _safetensors_shape(folder / "model.safetensors", spec.embedding_key)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "model.safetensors")
    except Exception:
        return None
    return _safetensors_shape(Path(cached), spec.embedding_key) if isinstance(cached, str) else None
