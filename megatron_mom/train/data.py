"""Training data: the corpus -> Megatron indexed dataset -> GPTDataset -> micro-batches.

Tokens are bytes (Megatron's offline byte-level tokenizer, vocabulary 512, end-of-document id
0), so no tokenizer files are needed. The indexed dataset (.bin/.idx) is written once per
corpus into the run directory; `GPTDataset` shuffles and packs documents into fixed-length
samples. The micro-batch iterator is a pure function of the number of samples consumed so far,
which is all a checkpoint needs to resume the data stream exactly.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, List

import numpy as np
import torch

BUNDLED_CORPUS = "stdlib_docstrings.jsonl.gz"


def byte_tokenizer():
    from megatron.core.tokenizers import MegatronTokenizer
    return MegatronTokenizer.from_pretrained(metadata_path={"library": "byte-level"})


def corpus_path(corpus: str) -> Path:
    if corpus == "bundled":
        return Path(str(resources.files("megatron_mom") / "data" / BUNDLED_CORPUS))
    path = Path(corpus)
    if not path.is_file():
        raise FileNotFoundError(f"data.corpus {corpus!r} is not a file; use 'bundled' or a "
                                f".txt / .jsonl / .jsonl.gz file")
    return path


def read_documents(path: Path) -> List[str]:
    """JSON lines with a "text" field (optionally gzipped), or plain text whose documents are
    separated by blank lines."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        content = f.read()
    if ".jsonl" in path.name:
        return [json.loads(line)["text"] for line in content.splitlines() if line.strip()]
    return [doc.strip() for doc in content.split("\n\n") if doc.strip()]


def build_indexed_dataset(corpus: str, cache_dir: Path) -> str:
    """Tokenize the corpus into `cache_dir` once (keyed by its content); return the path
    prefix of the .bin/.idx pair. Written under a temporary name, then renamed."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    path = corpus_path(corpus)
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:10]
    prefix = cache_dir / f"{path.name.split('.')[0]}-{digest}"
    if Path(f"{prefix}.idx").exists() and Path(f"{prefix}.bin").exists():
        return str(prefix)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_tokenizer()
    tmp = cache_dir / f".tmp-{os.getpid()}-{prefix.name}"
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=np.uint16)
    # Bytes 0x00 and 0x01 tokenize to the end-of-document and padding ids (GPTDataset masks
    # the padding id out of the loss and turns it into 0), so they are left out.
    reserved = {tokenizer.eod, tokenizer.pad}
    dropped = 0
    for text in read_documents(path):
        ids = tokenizer.tokenize(text)
        kept = [i for i in ids if i not in reserved]
        dropped += len(ids) - len(kept)
        ids = kept + [tokenizer.eod]
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
    builder.finalize(f"{tmp}.idx")
    if dropped:
        print(f"data: left out {dropped} NUL (0x00) / SOH (0x01) bytes of {path.name}: their "
              f"ids are the tokenizer's end-of-document and padding ids", flush=True)
    os.replace(f"{tmp}.bin", f"{prefix}.bin")   # .bin first: .idx marks a complete pair
    os.replace(f"{tmp}.idx", f"{prefix}.idx")
    return str(prefix)


def build_datasets(prefix: str, seq_length: int, split: str, seed: int, num_train: int,
                   num_valid: int):
    """(train, valid) GPTDatasets over the indexed dataset; valid is None without samples."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=([prefix], None), split=split,
        tokenizer=byte_tokenizer(), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, path_to_cache=None,
        mmap_bin_files=False)
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_train, num_valid, 0], lambda: True, config).build()
    return train, valid


@dataclass
class BatchLayout:
    """Which samples a rank reads: global batch = micro_batch * dp * num_microbatches."""
    micro_batch_size: int
    dp_size: int
    dp_rank: int
    num_microbatches: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp_size * self.num_microbatches


def micro_batches(dataset, layout: BatchLayout, consumed_samples: int,
                  device: torch.device) -> Iterator[dict]:
    """Endless micro-batches for this rank, starting after `consumed_samples` global samples.

    Micro-batch j of global batch n on rank r holds samples
    n * global_batch + (j * dp + r) * micro_batch + [0, micro_batch)."""
    mbs, dp, r = layout.micro_batch_size, layout.dp_size, layout.dp_rank
    start = consumed_samples
    while True:
        for j in range(layout.num_microbatches):
            first = start + (j * dp + r) * mbs
            samples = [dataset[i % len(dataset)] for i in range(first, first + mbs)]
            yield {key: torch.stack([s[key] for s in samples]).to(device)
                   for key in ("tokens", "labels", "loss_mask", "position_ids")}
        start += layout.global_batch_size
