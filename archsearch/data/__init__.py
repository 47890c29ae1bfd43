"""Data sources, tokenizers/embeddings and the prepared-data cache.

    spec = data_spec_from_dict({"source": "wiki", "sizes": {"tokens": [50_000, 100_000]}})
    data = prepare_data(spec, progress=print)    # tokenises once, then loads from the cache
    stream = data.train_stream(50_000, "tokens")  # int32 ids
    key = data.stream_fingerprint(50_000, "tokens")

Importing this package pulls in only numpy, safetensors and json; ``datasets``, ``gensim``,
``huggingface_hub`` and ``tokenizers`` are imported when a folder is built.
"""

from archsearch.data.prepare import prepare_data, prepared_path
from archsearch.data.prepared import PreparedData, load_prepared
from archsearch.data.spec import (
    DEFAULT_TOKENIZER,
    SIZE_UNITS,
    SOURCES,
    DataSpec,
    check_data_spec,
    data_spec_from_dict,
)

__all__ = [
    "DEFAULT_TOKENIZER",
    "SIZE_UNITS",
    "SOURCES",
    "DataSpec",
    "PreparedData",
    "check_data_spec",
    "data_spec_from_dict",
    "load_prepared",
    "prepare_data",
    "prepared_path",
]
