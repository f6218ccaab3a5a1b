"""The fetch stage: raw images at data/raw, replaced atomically.

What lands there, for each source, is `pipeline.data.sources`'s; plus
`source.json` (where the data came from, its checksum, counts and `task`).
Everything is built in a hidden sibling directory and renamed into place only
when complete, so a failed fetch leaves the previous data/raw exactly as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.atomic import atomic_dir
from pipeline.config import FetchConfig
from pipeline.data import sources
from pipeline.errors import DataError
from pipeline.layout import RAW_DIR


def run(cfg: FetchConfig, out_dir: Path = RAW_DIR) -> dict:
    """Produce `out_dir` from `cfg` and return the dict also written to source.json."""
    out_dir = Path(out_dir)
    try:
        with atomic_dir(out_dir) as work:
            if cfg.source == "digits":
                info = sources.fetch_digits(work)
            elif cfg.source == "digit_scenes":
                info = sources.fetch_digit_scenes(work)
            else:
                info = sources.fetch_archive(cfg, work)
            (work / "source.json").write_text(json.dumps(info, indent=2) + "\n")
    except OSError as exc:
        raise DataError(f"fetch: writing {out_dir} failed ({exc.strerror or exc})") from exc
    return info
