"""The results directory of a run, on disk: its files, its lock, its rows.

    results/<run>/
      config.json     the resolved suite, versions, git hash, teacher and evaluator identities
      results.jsonl   one row per (method entry, NFE, seed): every metric, its CI, its protocol
      floor.json      the real-vs-real FID floor (embedded world)
      summary.json    wall time and cell count of the last session
      tables/ plots/ grids/   derived from the rows (``bench.results``)
      .lock           held by the one process writing the run
      .cache-path     the cache this run used (a machine path: never part of the results)

Every file is written atomically (``core.io``); rows are rewritten whole after each cell, so a
killed run keeps every finished cell and ``--resume`` continues from them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

from core import io
from core.errors import UserError

RESULTS_FILE = "results.jsonl"
CONFIG_FILE = "config.json"
FLOOR_FILE = "floor.json"
SUMMARY_FILE = "summary.json"
VALUES_DIR = "values"
CACHE_PATH_FILE = ".cache-path"


def load_rows(run: Path) -> list[dict]:
    """The rows of a run's results.jsonl ([] when it has none); UserError naming a corrupt line."""
    path = Path(run) / RESULTS_FILE
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n}: corrupt results row; the file was not written by flashbench") from None
    return rows


def load_floor(run: Path) -> dict | None:
    path = Path(run) / FLOOR_FILE
    return json.loads(path.read_text()) if path.exists() else None


def read_config(run: Path, action: str = "resume") -> dict:
    """A run's config.json; UserError naming `action` (what the caller would do with it: resume, merge) when the
    directory is not a flashbench run."""
    path = Path(run) / CONFIG_FILE
    if not path.exists():
        raise UserError(f"cannot {action} {run}: it has no {CONFIG_FILE} (not a flashbench run)")
    return json.loads(path.read_text())


class RunDir:
    """results/<run>/: created once, locked against a second writer, rows written atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = None

    @property
    def results(self) -> Path:
        return self.path / RESULTS_FILE

    def check_new(self, resume: bool) -> None:
        """UserError when a new run would overwrite a run, or a resume names something that is not one, or the path
        cannot hold a run (a file, a dangling link, under a file)."""
        dangling = next((a for a in (self.path, *self.path.parents) if a.is_symlink() and not a.exists()), None)
        if dangling is not None:
            raise UserError(f"--out {self.path}: {dangling} is a dangling symbolic link (its target is gone); remove it, "
                            "recreate its target, or choose another folder")
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} is a file, not a folder; choose a folder path for the run")
        blocked = next((a for a in self.path.parents if a.exists() and not a.is_dir()), None)
        if blocked is not None:
            raise UserError(f"--out {self.path} lies under {blocked}, which is a file; choose a folder path for the run")
        if self.path.exists() and not resume and any(self.path.iterdir()):
            raise UserError(f"run directory {self.path} already exists; choose a new --out, or --resume it")
        if resume and not (self.path / CONFIG_FILE).exists():
            raise UserError(f"cannot resume {self.path}: it has no {CONFIG_FILE} (not a flashbench run)")

    def create(self, resume: bool) -> None:
        self.check_new(resume)
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock()

    def lock(self) -> None:
        f = open(self.path / ".lock", "a+")  # noqa: SIM115 - held for the life of the run
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise UserError(f"run {self.path} is in use by another flashbench process; "
                            "wait for it or use another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock = f

    @contextlib.contextmanager
    def staged(self):
        """A new run written whole or not at all (``merge``, ``evaluate``): yields a RunDir for a hidden sibling
        ``.<name>.partial`` and renames it to this path when the block completes. A failure removes it; a killed
        process leaves it, and the next attempt at the same path clears it (unless a live process holds its lock),
        so a failed or killed merge can simply be run again. UserError when this path cannot take a new run."""
        self.check_new(False)
        stage = RunDir(self.path.parent / f".{self.path.name}.partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if stage.path.exists():
            stage.lock()  # refuses while another process writes it; a dead one's lock is gone
            stage.unlock()
            shutil.rmtree(stage.path)
        stage.path.mkdir()
        stage.lock()
        try:
            yield stage
        except BaseException:
            stage.unlock()
            shutil.rmtree(stage.path, ignore_errors=True)
            raise
        stage.unlock()
        (stage.path / ".lock").unlink(missing_ok=True)
        if self.path.exists():  # an empty folder given as --out
            self.path.rmdir()
        stage.path.rename(self.path)

    def unlock(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def config(self) -> dict | None:
        path = self.path / CONFIG_FILE
        return json.loads(path.read_text()) if path.exists() else None

    def write_config(self, config: dict) -> None:
        io.write_json(self.path / CONFIG_FILE, config)

    def remembered_cache(self) -> str | None:
        path = self.path / CACHE_PATH_FILE
        return path.read_text().strip() if path.exists() else None

    def remember_cache(self, cache: Path) -> None:
        io.write_text(self.path / CACHE_PATH_FILE, str(Path(cache).resolve()) + "\n")

    def rows(self) -> list[dict]:
        return load_rows(self.path)

    def write_rows(self, rows: list[dict]) -> None:
        io.write_text(self.results, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def write_floor(self, floor: dict) -> None:
        io.write_json(self.path / FLOOR_FILE, floor)

    def has_floor(self) -> bool:
        return (self.path / FLOOR_FILE).exists()

    def write_summary(self, summary: dict) -> None:
        io.write_json(self.path / SUMMARY_FILE, summary)

    def values_path(self, key: str) -> Path:
        return self.path / VALUES_DIR / (key.replace("|", "__").replace("=", "-") + ".safetensors")

    def write_values(self, key: str, values: list, grid, start: int) -> None:
        """A shard's per-sample metric values of one cell (and its grid images), for `flashbench merge`."""
        tensors = {f"part{k}": v for k, v in enumerate(values)}
        if grid is not None:
            tensors["grid"] = grid
        io.save_tensors(self.values_path(key), tensors, {"parts": len(values), "start": start})

    def check_values(self, key: str) -> None:
        """UserError (one line) naming a cell's values file when it is missing or cannot be read whole."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.values_path(key)
        if not path.is_file():
            raise UserError(f"{path}: missing; the shard {self.path.name} did not finish cell {key} (resume it)")
        try:
            if not any(k.startswith("part") for k in load_file(str(path))):
                raise ValueError("no values")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UserError(f"{path}: cannot be read ({type(e).__name__}: a cut or corrupt copy?); copy the shard's "
                            "values again, or re-run that shard") from None

    def read_values(self, key: str) -> tuple[list, object]:
        """(the parts' values, the grid images or None) that ``write_values`` stored for a cell."""
        from safetensors.torch import load_file

        t = load_file(str(self.values_path(key)))
        parts = sorted((k for k in t if k.startswith("part")), key=lambda k: int(k[4:]))
        return [t[k] for k in parts], t.get("grid")
