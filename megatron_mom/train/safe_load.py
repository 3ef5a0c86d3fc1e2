"""Reading a checkpoint without running code from it.

Unpickling can call any function a file names, so a checkpoint that someone else wrote (or
changed) could run code on load. Megatron's `dist_checkpointing.load` reads three kinds of
pickles; `dist_load` reads each in a restricted way, through load strategies passed to that
call (other code in the process keeps Megatron's and torch's own readers; only while one of
our loads runs does Megatron's torch_dist module name the stricter reader and planner):

- `.metadata`, torch.distributed.checkpoint's index of the shard files: a restricted unpickler
  that builds only the checkpoint-metadata classes of torch.distributed.checkpoint (plus
  torch.Size, dtypes and layouts). torch 2.13 reads it with a plain `pickle.load`.
- objects stored inside the shard files (our RNG states): `torch.load(weights_only=True)`,
  i.e. tensors and plain Python data only. torch's default planner uses weights_only=False.
- `common.pt` (schedule, iteration, optimizer hyper-parameters): `torch.load(weights_only=True)`
  even if TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set.

Tensor data in the shard files is read by torch with weights_only=True already.
"""
from __future__ import annotations

import io
import json
import pickle
from contextlib import contextmanager
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


METADATA_FILE = ".metadata"     # torch.distributed.checkpoint's index (filesystem._metadata_fn)
COMMON_FILE = "common.pt"       # megatron's non-sharded state (strategies/common.py)


def _metadata_classes() -> dict:
    """(module, name) -> object for everything a `.metadata` pickle may name."""
    from torch.distributed.checkpoint import filesystem, metadata, planner
    allowed = [metadata.Metadata, metadata.MetadataIndex, metadata.StorageMeta,
               metadata.ChunkStorageMetadata, metadata.TensorProperties,
               metadata.TensorStorageMetadata, metadata.BytesStorageMetadata,
               metadata._MEM_FORMAT_ENCODING, planner.SavePlan, planner.WriteItem,
               planner.WriteItemType, planner.TensorWriteData, planner.BytesIOWriteData,
               filesystem._StorageInfo, torch.Size, torch.serialization._get_layout]
    table = {(obj.__module__, obj.__qualname__): obj for obj in allowed}
    for name, value in vars(torch).items():      # torch.float32 etc. pickle as globals
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            table[("torch", name)] = value
    return table


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only checkpoint-metadata objects; any other global is refused before use."""
    allowed: dict = {}

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint-metadata "
                                         f"class") from None


def read_metadata(path: Path):
    """The torch.distributed.checkpoint `Metadata` in file `path`, built without running code."""
    from torch.distributed.checkpoint.metadata import Metadata
    if not _MetadataUnpickler.allowed:
        _MetadataUnpickler.allowed = _metadata_classes()
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the folder is not a complete checkpoint") \
            from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: refused to read it ({type(err).__name__}: {err}); the "
                              f"file is damaged or was not written by torch's checkpointing, "
                              f"and loading a checkpoint never runs code") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not a checkpoint "
                              f"index (torch.distributed.checkpoint Metadata)")
    return metadata


def load_plain(source, where: str):
    """torch.load with weights_only=True: tensors and plain data (dict, list, tuple, str,
    numbers, None), never code. `where` names the file (and entry) for the error."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{where} is missing: the folder is not a complete checkpoint") \
            from None
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"{where}: refused to unpickle it: it holds something other than "
                              f"tensors and plain data, or is damaged ({first_line}); loading a "
                              f"checkpoint never runs code") from None
    except (EOFError, RuntimeError) as err:
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else "end of file"
        raise CheckpointError(f"{where} is damaged or truncated ({type(err).__name__}: "
                              f"{detail})") from None


def _strategies(metadata):
    """Megatron's torch_dist load strategies with the restricted readers above; `metadata`
    is the checkpoint's `.metadata`, read beforehand by `read_metadata`."""
    from megatron.core.dist_checkpointing.strategies import torch as torch_strategy
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta

    class RestrictedReader(FileSystemReader):
        """Serves the `.metadata` read by `read_metadata` instead of unpickling it."""

        def read_metadata(self, *args, **kwargs):
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class PlainDataPlanner(torch_strategy.MCoreLoadPlanner):
        """Objects stored in the shard files come back through `load_plain`."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            obj = load_plain(value, f"object {fqn!r} in the shard files")
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    class ShardedStrategy(torch_strategy.TorchDistLoadShardedStrategy):
        def load(self, sharded_state_dict, checkpoint_dir):
            with _replaced(torch_strategy, MCoreLoadPlanner=PlainDataPlanner,
                           _get_filesystem_reader=lambda path, **_: RestrictedReader(path)):
                return super().load(sharded_state_dict, checkpoint_dir)

    class CommonStrategy(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            return load_plain(Path(checkpoint_dir) / COMMON_FILE,
                              str(Path(checkpoint_dir) / COMMON_FILE))

    return ShardedStrategy(), CommonStrategy()


@contextmanager
def _replaced(module, **names):
    """Module attributes swapped for the duration of one load (Megatron's torch_dist
    strategy looks its reader and planner up by module-level name)."""
    saved = {name: getattr(module, name) for name in names}
    for name, value in names.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def dist_load(template: dict, path: Path) -> dict:
    """`dist_checkpointing.load(template, path)` with every pickle read restricted, and
    failures while reading the files raised as one CheckpointError."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException
    sharded, common = _strategies(read_metadata(Path(path) / METADATA_FILE))
    try:
        return dist_checkpointing.load(template, str(path), sharded_strategy=sharded,
                                       common_strategy=common)
    except CheckpointException as err:    # torch's collective wrapper, a BaseException
        raise _reading_failed(path, [exc for exc, _ in err.failures.values()]) from err
    except (CheckpointingException, EOFError, pickle.UnpicklingError,
            json.JSONDecodeError, UnicodeDecodeError) as err:   # the last two: metadata.json
        raise _reading_failed(path, [err]) from err


def _reading_failed(path: Path, failures: list) -> CheckpointError:
    """Our own error if a rank raised one, else a summary of the first failure."""
    for exc in failures:
        if isinstance(exc, CheckpointError):
            return exc
    first = failures[0]
    detail = str(first).strip().splitlines()[0] if str(first).strip() else "end of file"
    return CheckpointError(f"{path}: reading the checkpoint failed ({type(first).__name__}: "
                           f"{detail}); its files are damaged, truncated or do not belong to "
                           f"this model: resume from an earlier checkpoint")
