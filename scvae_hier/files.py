"""Writing files atomically: written under a temporary name, then renamed over the target, so an
interrupt (Ctrl-C, a killed job, a full disk) leaves either the old file or the new one, never
half of one. Every file of a run folder is written through here."""
import json
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` (same suffix, e.g. .weights.h5) to write to; on
    success it replaces `path`, on failure it is removed."""
    path = Path(path)
    tmp = path.with_name("tmp-" + path.name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path, data):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default), encoding="utf-8")


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv(frame, path, **kwargs):
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **kwargs)


def write_h5ad(adata, path):
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, compression="gzip")
