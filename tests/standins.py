"""Local stand-ins for the data tests: a tiny GPT-2-like tokenizer + embedding, a tiny
UltraChat in the Hub's parquet layout, a fake Hugging Face Hub cache. Nothing here touches
the network. (A module of its own, not conftest, so tests and spawned workers import it.)"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WORDS = (
    "the a model token context vector fixed point layer train data stream scaling law "
    "loss perplexity search study trial size hello world question answer please explain why "
    "how what small large fast slow green blue red cat dog tree river mountain city"
).split()


def sentences(rng: random.Random, n: int, lo: int = 3, hi: int = 12) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "." for _ in range(n)]


def make_tokenizer_folder(
    folder: Path, vocab_size: int = 300, dim: int = 8, seed: int = 0, key: str = "wte.weight"
) -> Path:
    """A byte-level BPE (GPT-2's scheme: "\\n" is a token of its own) saved as tokenizer.json
    beside a model.safetensors holding ``key`` (V x dim). Like MiniLM's file, the saved
    tokenizer turns truncation and padding ON, which loading must undo."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tok.train_from_iterator(sentences(rng, 300), trainer)
    tok.enable_truncation(max_length=8)
    tok.enable_padding(length=16)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    emb = np.random.default_rng(seed).standard_normal((tok.get_vocab_size(), dim)).astype(np.float32)
    other = np.zeros((4, dim), np.float32)  # a second tensor, as real checkpoints have
    save_file({key: emb, "wpe.weight": other}, str(folder / "model.safetensors"))
    return folder


def reference_tokenizer(folder: Path):
    """The stand-in tokenizer as the tests expect prepare_data to use it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def ultrachat_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows in UltraChat-200k's schema: prompt, prompt_id, messages = [{content, role}]."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        turns = rng.randint(2, 4)
        messages = [
            {"content": " ".join(sentences(rng, rng.randint(1, 3))), "role": "user" if t % 2 == 0 else "assistant"}
            for t in range(turns)
        ]
        rows.append({"prompt": messages[0]["content"], "prompt_id": f"{i:064x}", "messages": messages})
    return rows


def write_ultrachat(folder: Path, rows: list[dict], split: str = "train_sft") -> Path:
    """The Hub layout of HuggingFaceH4/ultrachat_200k: data/<split>-00000-of-00001-<hash>.parquet
    for two splits, and a README.md whose config lists them (as the real repo's does)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "data" / f"{split}-00000-of-00001-0123abcd.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:5]), folder / "data" / "test_sft-00000-of-00001-4567ef01.parquet")
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        f"  - split: {split}\n    path: data/{split}-*\n  - split: test_sft\n    path: data/test_sft-*\n---\n"
    )
    return folder


@dataclass
class FakeHub:
    """A Hugging Face Hub cache in a temporary folder (HF_HUB_OFFLINE=1)."""

    cache: Path

    def add(self, repo_id: str, files_from: Path, repo_type: str = "model", commit: str = "a" * 40) -> Path:
        """Install every file under ``files_from`` as snapshot ``commit`` of ``repo_id`` on main."""
        import shutil

        repo = self.cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / commit
        shutil.copytree(files_from, snapshot)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return snapshot


def prepare_in_worker(spec: dict, barrier, results) -> None:
    """Body of a spawned process of the concurrency test: start together, prepare, report."""
    try:
        from archsearch.data import data_spec_from_dict, prepare_data

        barrier.wait(timeout=60)
        data = prepare_data(data_spec_from_dict(spec))
        results.put((str(data.path), data.fingerprint, data.meta["created"], data.meta["builder"]["pid"]))
    except BaseException as e:  # reported to the test instead of dying silently
        results.put(("error", f"{type(e).__name__}: {e}"))
