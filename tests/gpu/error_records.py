"""The measured errors of the GPU tests, kept in $OUT (when set) for docs and reviews."""
import json
import os


def write_errors(stem: str, errors: dict) -> None:
    """Merge `errors` into $OUT/<stem>.json; under pytest-xdist into one file per worker
    (<stem>_gw0.json, ...), since workers finishing together would overwrite each other."""
    out = os.environ.get("OUT")
    if not (out and errors):
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    path = os.path.join(out, f"{stem}_{worker}.json" if worker else f"{stem}.json")
    old = json.load(open(path)) if os.path.exists(path) else {}
    old.update(errors)
    json.dump(old, open(path, "w"), indent=1)


def merge_worker_files(out: str) -> None:
    """Fold the per-worker files of a finished run into <stem>.json each: fewer files to carry
    back from a GPU machine (a device call returns only a few)."""
    parts = {}
    for name in sorted(os.listdir(out)):
        stem, sep, worker = name.rpartition("_gw")
        if sep and worker.endswith(".json") and worker[:-5].isdigit():
            parts.setdefault(stem, []).append(os.path.join(out, name))
    for stem, paths in parts.items():
        merged_path = os.path.join(out, f"{stem}.json")
        merged = json.load(open(merged_path)) if os.path.exists(merged_path) else {}
        for path in paths:
            merged.update(json.load(open(path)))
        json.dump(merged, open(merged_path, "w"), indent=1)
        for path in paths:
            os.remove(path)


if __name__ == "__main__":  # python tests/gpu/error_records.py OUT_DIR
    import sys
    merge_worker_files(sys.argv[1])
