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
