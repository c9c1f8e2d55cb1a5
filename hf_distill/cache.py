"""Offline teacher cache: the file format, its fingerprints and the build loop (the loss math is in `hf_distill.loss`).

Run the teacher once, store its top-k log-probabilities per target token, train from them.

Layout of a cache folder:
    cache_info.json         fingerprints (teacher, tokenizer, dataset, settings), k, and each finished shard's
                            row count, size and sha256
    shard-00000.arrow ...   Arrow IPC stream shards, memory-mapped by `datasets.Dataset.from_file`

A shard is written under a temporary name, renamed once whole, then recorded in cache_info.json (itself replaced
atomically), so a build killed at any point resumes from its recorded shards; a shard whose size or sha256 differs
from its record is rebuilt by `build_cache` and refused by `load_cache`, never read as data.

One cache row per dataset row, with that row's target positions flattened in order:
    teacher_ids       top-k token ids (uint16 when the vocabulary fits, else int32), n_targets · k values
    teacher_logprobs  their log-probabilities at the cache's temperature (float16), n_targets · k values
    teacher_lse       logsumexp(teacher_logits / T) over the whole vocabulary (float32), n_targets values:
                      with the log-probs it gives back the raw top-k logits (for mse / cosine)

The mass outside the top-k is 1 − Σ p_topk and is kept as its own bucket in the divergence, never dropped or
folded into the top-k by renormalizing (unless `teacher_cache_tail="renormalize"` asks for it).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, concatenate_datasets
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.utils import logging

from .data import default_collator
from .loss import top_k_entries
from .forward import target_positions
from .modeling import CACHE_COLUMNS, CAUSAL, output_size
from .served import TeacherServer, add_served_targets

logger = logging.get_logger(__name__)

INFO_FILE = "cache_info.json"
MAX_BYTES_PER_TOKEN = 256


def default_top_k(vocab_size: int) -> int:
    """The largest k whose entry fits in 256 bytes a token: 63 with 16-bit ids, 42 with 32-bit ids."""
    id_bytes = 2 if vocab_size <= 65536 else 4
    return (MAX_BYTES_PER_TOKEN - 4) // (id_bytes + 2)


def bytes_per_token(vocab_size: int, k: int) -> int:
    return k * ((2 if vocab_size <= 65536 else 4) + 2) + 4


# ---- fingerprints --------------------------------------------------------------------------------


def _digest(update) -> str:
    hasher = hashlib.sha256()
    update(hasher)
    return hasher.hexdigest()[:16]


def teacher_fingerprint(teacher) -> str:
    """Hash of every parameter's bytes: two teachers share it only if their weights are identical."""

    def update(hasher):
        for name, tensor in sorted(teacher.state_dict().items()):
            hasher.update(name.encode())
            hasher.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())

    return _digest(update)


def tokenizer_fingerprint(tokenizer) -> str:
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return _digest(lambda hasher: hasher.update(json.dumps(vocab, ensure_ascii=False).encode()))


def dataset_fingerprint(dataset) -> str:
    """Hash of the token ids and labels of every row, in order."""

    def update(hasher):
        for column in ("input_ids", "labels"):
            for values in dataset.with_format("numpy")[column] if len(dataset) else []:
                hasher.update(np.asarray(values, dtype=np.int64).tobytes())
                hasher.update(b"|")

    return _digest(update)


@dataclass
class CacheSettings:
    temperature: float
    top_k: int
    distill_all_tokens: bool

    def as_dict(self):
        return {"temperature": self.temperature, "top_k": self.top_k, "distill_all_tokens": self.distill_all_tokens}


# ---- writing and reading -------------------------------------------------------------------------


def _info(path: Path):
    file = path / INFO_FILE
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text())
    except ValueError as error:
        raise ValueError(
            f"{file} is unreadable ({error}), so the teacher cache in {path} cannot be checked; delete that folder and "
            "build the cache again."
        ) from None


def _write_info(path: Path, info: dict) -> None:
    """Replace cache_info.json atomically: a kill leaves the old or the new file, never a cut one."""
    partial = path / (INFO_FILE + ".partial")
    partial.write_text(json.dumps({**info, "shards": dict(sorted(info["shards"].items()))}, indent=2))
    os.replace(partial, path / INFO_FILE)


def _sha256(file: Path) -> str:
    hasher = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _shard_record(file: Path, rows: int) -> dict:
    return {"rows": rows, "bytes": file.stat().st_size, "sha256": _sha256(file)}


def _shard_is_whole(file: Path, record: dict | None) -> bool:
    """Whether `file` is the shard its record describes (same size, then same sha256)."""
    if record is None or not file.exists() or file.stat().st_size != record["bytes"]:
        return False
    return _sha256(file) == record["sha256"]


def _shard_names(num_rows: int, shard_rows: int) -> list[str]:
    return [f"shard-{i:05d}.arrow" for i in range(-(-num_rows // shard_rows))]


def _check_same(existing: dict, wanted: dict, path: Path) -> None:
    for key in ("teacher", "tokenizer", "dataset", "settings"):
        if existing.get(key) != wanted.get(key):
            raise ValueError(
                f"The teacher cache in {path} was built for a different {key} ({existing.get(key)!r}, now "
                f"{wanted.get(key)!r}). Caches never mix: use another cache folder for this run."
            )


@torch.no_grad()
def build_cache(
    teacher,
    dataset,
    tokenizer,
    cache_dir: str | os.PathLike,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    distill_all_tokens: bool = False,
    batch_size: int = 8,
    shard_rows: int = 1024,
    teacher_name: str | None = None,
) -> Path:
    """Run the teacher over a tokenized causal dataset and write its top-k per target token to `cache_dir`.

    Resumable: finished shards are kept and skipped when run again with the same teacher, tokenizer, data
    and settings; a different one is refused rather than mixed in.
    """
    path = Path(cache_dir)
    served = isinstance(teacher, TeacherServer)
    if served:  # its top-k is all a server gives; its ids are the tokenizer's
        if temperature != 1.0:
            raise ValueError(f"A served teacher gives log-probabilities at temperature 1 only, not {temperature}.")
        teacher.top_k = top_k or teacher.top_k
        vocab = len(getattr(tokenizer, "tokenizer", tokenizer))
    else:
        vocab = output_size(teacher)
    settings = CacheSettings(temperature, teacher.top_k if served else top_k or default_top_k(vocab), distill_all_tokens)
    info = {
        "format": 2,
        "teacher": _digest(lambda h: h.update(f"served:{teacher.model}".encode())) if served else teacher_fingerprint(teacher),
        "teacher_name": teacher_name or (teacher.model if served else getattr(teacher.config, "_name_or_path", "")),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dataset": dataset_fingerprint(dataset),
        "settings": settings.as_dict(),
        "vocab_size": vocab,
        "num_rows": len(dataset),
        "shard_rows": shard_rows,
        "bytes_per_token": bytes_per_token(vocab, settings.top_k),
    }
    existing = _info(path)
    if existing is not None:
        _check_same(existing, info, path)
        if existing.get("shard_rows") != shard_rows:
            raise ValueError(
                f"The teacher cache in {path} was started with shard_rows={existing.get('shard_rows')}, now "
                f"{shard_rows}: shards would not line up. Resume it with shard_rows={existing.get('shard_rows')}, or "
                "use another cache folder."
            )
    records = dict((existing or {}).get("shards", {}))
    if existing is not None and "shards" not in existing:  # format 1 recorded no shards; they were renamed once whole
        for name in _shard_names(len(dataset), shard_rows):
            if (path / name).exists():
                records[name] = _shard_record(path / name, Dataset.from_file(str(path / name)).num_rows)
    info["shards"] = records
    path.mkdir(parents=True, exist_ok=True)
    _write_info(path, info)

    id_type = pa.uint16() if vocab <= 65536 else pa.int32()
    schema = pa.schema([
        ("teacher_ids", pa.list_(id_type)),
        ("teacher_logprobs", pa.list_(pa.float16())),
        ("teacher_lse", pa.list_(pa.float32())),
    ])
    device = "cpu" if served else next(teacher.parameters()).device
    if not served:
        teacher.eval()
    columns = [c for c in ("input_ids", "attention_mask", "labels") if c in dataset.column_names]
    rows_in = dataset.select_columns(columns)
    shards = range(0, len(dataset), shard_rows)
    for shard, start in enumerate(tqdm(shards, desc="teacher cache (shards)", disable=len(shards) < 2)):
        shard_path = path / f"shard-{shard:05d}.arrow"
        stop = min(start + shard_rows, len(dataset))
        if _shard_is_whole(shard_path, records.get(shard_path.name)):
            continue  # finished in an earlier run
        if shard_path.exists():
            logger.warning(f"teacher cache: {shard_path} is unrecorded, cut short or damaged; rebuilding it.")
        records.pop(shard_path.name, None)
        loader = DataLoader(
            rows_in.select(range(start, stop)), batch_size=batch_size, collate_fn=default_collator(CAUSAL, tokenizer)
        )
        rows = {"teacher_ids": [], "teacher_logprobs": [], "teacher_lse": []}
        for batch in tqdm(loader, desc=f"shard {shard}", leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            _, _, kd_mask = target_positions(batch["labels"], batch["attention_mask"], CAUSAL, distill_all_tokens)
            if served:
                answered = add_served_targets(batch, teacher, distill_all_tokens)  # one request a batch
                ids, logprobs, lse = (answered[column] for column in CACHE_COLUMNS)
            else:
                logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[kd_mask]
                ids, logprobs, lse = top_k_entries(logits, settings.top_k, temperature)
            counts = kd_mask.sum(-1).tolist()
            for chunk_ids, chunk_lp, chunk_lse in zip(ids.split(counts), logprobs.split(counts), lse.split(counts)):
                rows["teacher_ids"].append(chunk_ids.flatten().cpu().numpy().astype(np.int64))
                rows["teacher_logprobs"].append(chunk_lp.flatten().cpu().numpy().astype(np.float16))
                rows["teacher_lse"].append(chunk_lse.cpu().numpy().astype(np.float32))
        table = pa.table({
            "teacher_ids": pa.array([r.tolist() for r in rows["teacher_ids"]], type=pa.list_(id_type)),
            "teacher_logprobs": pa.array(rows["teacher_logprobs"], type=pa.list_(pa.float16())),
            "teacher_lse": pa.array(rows["teacher_lse"], type=pa.list_(pa.float32())),
        }, schema=schema)
        partial = shard_path.with_suffix(".partial")
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(table)
        record = _shard_record(partial, stop - start)
        os.replace(partial, shard_path)  # a shard exists only once whole...
        records[shard_path.name] = record
        _write_info(path, info)  # ...and counts only once recorded
        logger.info(f"teacher cache: rows {start}–{stop} of {len(dataset)} written to {shard_path.name}")
    return path


def load_cache(cache_dir: str | os.PathLike, dataset, tokenizer, settings: CacheSettings):
    """The cache's rows as a memory-mapped `Dataset`, after checking it was built for this data and settings."""
    path = Path(cache_dir)
    info = _info(path)
    if info is None:
        raise ValueError(f"{path} holds no teacher cache ({INFO_FILE} is missing); build one with `hf-distill cache-teacher`.")
    wanted = {
        "teacher": info["teacher"],  # the teacher need not be loaded to train from its cache
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dataset": dataset_fingerprint(dataset),
        "settings": {**settings.as_dict(), "top_k": info["settings"]["top_k"]},
    }
    _check_same(info, wanted, path)
    shards = [path / name for name in _shard_names(info["num_rows"], info["shard_rows"])]
    records = info.get("shards")  # None in a format-1 cache, which recorded no shards
    missing = [s.name for s in shards if not s.exists() or (records is not None and s.name not in records)]
    if missing:
        raise ValueError(f"The teacher cache in {path} is incomplete (missing {missing[:3]}...); run cache-teacher again to finish it.")
    damaged = [s.name for s in shards if records is not None and not _shard_is_whole(s, records[s.name])]
    if damaged:
        raise ValueError(
            f"The teacher cache in {path} has damaged shards {damaged[:3]}: their size or sha256 differs from what "
            f"{INFO_FILE} recorded when they were written. Run cache-teacher again with the same settings to rebuild "
            "them."
        )
    return concatenate_datasets([Dataset.from_file(str(s)) for s in shards]), info


def attach_cache(args, kind, train_dataset, data_collator, processing_class):
    """(training rows joined with their cached teacher entries, the collator that batches them, the cache's info),
    after checking the cache was built for exactly these rows."""
    if kind != CAUSAL:
        raise ValueError(f"teacher_cache works with causal LMs; this student is a {kind} model.")
    if processing_class is None:
        raise ValueError("teacher_cache needs the processing_class (tokenizer) to check the cache was built with it.")
    settings = CacheSettings(args.temperature, 0, args.distill_all_tokens)
    cache, info = load_cache(args.teacher_cache, train_dataset, processing_class, settings)
    train_dataset = concatenate_datasets([train_dataset, cache], axis=1)
    collator = CachedTeacherCollator(data_collator, info["settings"]["top_k"], args.distill_all_tokens)
    return train_dataset, collator, info


@dataclass
class CachedTeacherCollator:
    """Wraps a collator: cached teacher entries of each row are flattened into (positions, k) tensors.

    Rows are concatenated in order, matching the trainer's row-major selection of target positions; the batch is
    checked here, on the host, to hold one entry per distilled position.
    """

    collator: Any
    top_k: int
    distill_all_tokens: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        cached = [{key: feature.pop(key) for key in CACHE_COLUMNS} for feature in features]
        batch = self.collator(features)
        batch["teacher_ids"] = torch.cat([torch.as_tensor(c["teacher_ids"], dtype=torch.long) for c in cached]).view(-1, self.top_k)
        batch["teacher_logprobs"] = torch.cat(
            [torch.as_tensor(c["teacher_logprobs"], dtype=torch.float32) for c in cached]
        ).view(-1, self.top_k)
        batch["teacher_lse"] = torch.cat([torch.as_tensor(c["teacher_lse"], dtype=torch.float32) for c in cached])
        _, ce_mask, kd_mask = target_positions(batch["labels"], batch.get("attention_mask"), CAUSAL, self.distill_all_tokens)
        distilled = int((ce_mask | kd_mask).sum())
        if distilled != batch["teacher_lse"].shape[0]:
            raise ValueError(
                f"The batch has {distilled} distilled positions but the teacher cache gives {batch['teacher_lse'].shape[0]}: "
                "the cache was built for other labels or another distill_all_tokens setting. Rebuild it for this data."
            )
        return batch
