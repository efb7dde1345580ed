"""The result store: each result table of an experiment is one Hive-partitioned dataset.

Layout (documented in docs/results.md)::

    <out>/<experiment>/<table>/[<param>=<value>/...]/run=<run id>/part-0.parquet
    <out>/<experiment>/_runs/[<param>=<value>/...]/run=<run id>/manifest.json

so ``pd.read_parquet(<out>/<experiment>/summary)`` (or pyarrow.dataset, polars, DuckDB) reads
every run of an experiment or sweep in one call, with ``run`` and the sweep parameters as
columns; no table has a column of those names. A run is staged in the hidden
``.tmp-run=<id>-<pid>/`` (readers skip names starting with "." or "_"); ``commit()`` renames
each table file into its dataset (one atomic rename per file) and writes the manifest last, so
a run counts as complete only once every table is in place. Long tables stream as Arrow IPC
(``<name>.arrows``, every batch flushed) and are compacted to Parquet at commit; a run that
fails keeps its streams readable next to a manifest with ``status: failed``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import tomllib
import uuid
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.config import ClusterError, Config, config_hash, config_to_dict
from workloads import input_digest

# Schema metadata keys carried by every table a run writes.
META_CONFIG = b"iommu_emu.config"
META_SEED = b"iommu_emu.seed"
META_RUN = b"iommu_emu.run"
META_VERSIONS = b"iommu_emu.versions"
META_PARTITION_KEYS = b"iommu_emu.partition_keys"  # set by read_dataset: ["run", params...]

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2
RUNS_DIR = "_runs"  # manifests (and failed runs' streams); "_" keeps dataset readers out
PART_FILE = "part-0.parquet"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"
PARQUET_EXT = ".parquet"
STREAM_EXT = ".arrows"
_TMP_PREFIX = ".tmp-run="
_COMPACT_ROWS = 1 << 16  # rows gathered per Parquet row group when compacting a stream
_TABLE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# Columns that join tables (summary, metrics, faults) have one type in every table.
KEY_TYPES = {"host": pa.int32(), "vm": pa.int32()}


class ResultsError(ClusterError):
    """A result folder is missing, unreadable or misused."""


class RunExistsError(ResultsError):
    """The final run folder already exists and ``overwrite`` was not asked for."""


def run_id(cfg: Config) -> str:
    """``<experiment>-s<seed>-<hash>``: the hash covers the config and the content of the
    files its workloads read (workloads.input_digest), so the same inputs get the same id."""
    h = config_hash(cfg)
    digests = [input_digest(g.workload.kind, g.workload.params) for g in cfg.vms]
    if any(digests):
        h = hashlib.sha256("\0".join([h, *digests]).encode()).hexdigest()[:len(h)]
    return f"{cfg.experiment.name}-s{cfg.experiment.seed}-{h}"


Params = Sequence[tuple[str, str]]  # a sweep point's (column, value) partition keys


def _partition(params: Params, rid: str) -> Path:
    return Path(*[f"{k}={v}" for k, v in params], f"run={rid}")


def run_dir(out_dir: str | Path, experiment: str, rid: str, params: Params = ()) -> Path:
    """The folder holding a run's manifest.json."""
    return Path(out_dir) / experiment / RUNS_DIR / _partition(params, rid)


def table_file(out_dir: str | Path, experiment: str, table: str, rid: str,
               params: Params = ()) -> Path:
    """Where a committed run's ``table`` lives in the table's dataset."""
    return Path(out_dir) / experiment / table / _partition(params, rid) / PART_FILE


def _package_version() -> str:
    try:
        return metadata.version("iommu-emu")
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def versions() -> dict[str, str]:
    """Versions that produced a run (stored in metadata and the manifest)."""
    return {"iommu-emu": _package_version(), "python": platform.python_version(),
            "numpy": np.__version__, "pyarrow": pa.__version__}


def run_status(out_dir: str | Path, experiment: str, rid: str, params: Params = ()) -> str:
    """``complete`` (manifest and every table file there), ``failed``, or ``missing``."""
    exp_dir = Path(out_dir) / experiment
    try:
        manifest = json.loads((run_dir(out_dir, experiment, rid, params) / MANIFEST).read_text())
    except (OSError, ValueError):
        return "missing"
    if not isinstance(manifest, dict) or manifest.get("run") != rid:
        return "missing"
    if manifest.get("status") == STATUS_FAILED:
        return STATUS_FAILED
    files = manifest.get("files", {})
    ok = isinstance(files, dict) and all(
        isinstance(f, dict) and (exp_dir / str(f.get("path", ""))).is_file()
        for f in files.values())
    return STATUS_COMPLETE if ok and manifest.get("status") == STATUS_COMPLETE else "missing"


def is_complete(out_dir: str | Path, experiment: str, rid: str, params: Params = ()) -> bool:
    """True if the run is committed: its manifest says complete and its tables are there."""
    return run_status(out_dir, experiment, rid, params) == STATUS_COMPLETE


class StreamSink:
    """An Arrow IPC stream file written batch by batch; each batch is flushed to the OS."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.schema = schema
        self.rows = 0
        self._file = pa.OSFile(str(path), "wb")
        self._writer: Any = pa.ipc.new_stream(self._file, schema)
        self._file.flush()

    @property
    def closed(self) -> bool:
        return self._writer is None

    def write_batch(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Append a batch (or a table's batches); it is on disk when this returns."""
        if self._writer is None:
            raise ResultsError(f"stream {self.path.name} is closed")
        if not batch.schema.equals(self.schema, check_metadata=False):
            raise ResultsError(f"stream {self.path.name}: batch schema {batch.schema} does "
                               f"not match the stream's {self.schema}")
        if isinstance(batch, pa.Table):
            for b in batch.to_batches():
                self._writer.write_batch(b)
        else:
            self._writer.write_batch(batch)
        self.rows += batch.num_rows
        self._file.flush()

    def close(self) -> None:
        """Write the end-of-stream marker and close the file (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            self._writer = None


class RunWriter:
    """Stages one run's tables in a hidden folder; ``commit()`` publishes them.

    States: open (tables and streams may be written) -> committed (every table in its
    dataset, manifest written last), failed (``fail()``: the streams and a manifest naming
    what failed are kept in the run folder) or aborted (nothing left behind). Use as a context
    manager: leaving the block while open aborts. A committed run is only replaced when
    ``overwrite`` is asked; a failed one is always redone.
    """

    def __init__(self, out_dir: str | Path, cfg: Config, run_id_: str | None = None, *,
                 overwrite: bool = False, params: Params = ()) -> None:
        self.cfg = cfg
        self.run_id = run_id_ if run_id_ is not None else run_id(cfg)
        self.overwrite = overwrite
        self.params = [(str(k), str(v)) for k, v in params]
        self.out_dir = Path(out_dir)
        self.experiment_dir = self.out_dir / cfg.experiment.name
        self.final_dir = run_dir(out_dir, cfg.experiment.name, self.run_id, self.params)
        if (self.final_dir / MANIFEST).exists() and not overwrite and run_status(
                out_dir, cfg.experiment.name, self.run_id, self.params) != STATUS_FAILED:
            raise RunExistsError(f"run {self.run_id} already exists in {self.final_dir} "
                                 "(use --overwrite to replace it)")
        # Unique per writer: two sweep points may resolve to one run id (in their own
        # partitions) and be written at the same time.
        self.tmp_dir = self.experiment_dir / (f"{_TMP_PREFIX}{self.run_id}-{os.getpid()}-"
                                              f"{uuid.uuid4().hex[:8]}")
        self.tmp_dir.mkdir(parents=True)
        self.versions = versions()
        self._metadata = {
            META_CONFIG: json.dumps(config_to_dict(cfg), sort_keys=True).encode(),
            META_SEED: str(cfg.experiment.seed).encode(),
            META_RUN: self.run_id.encode(),
            META_VERSIONS: json.dumps(self.versions, sort_keys=True).encode(),
        }
        self._files: dict[str, int] = {}
        self._streams: dict[str, StreamSink] = {}
        self.placement: dict[str, Any] = {}
        self.state = "open"

    # --- writing ---------------------------------------------------------------------------
    def _check_open(self, name: str) -> None:
        if self.state != "open":
            raise ResultsError(f"run writer is {self.state}")
        if not _TABLE_NAME_RE.match(name) or name == RUNS_DIR:
            raise ResultsError(f"bad table name {name!r} (letters, digits, _)")
        if name + PARQUET_EXT in self._files or name in self._streams:
            raise ResultsError(f"table {name!r} was already written in this run")

    def _check_columns(self, name: str, schema: pa.Schema) -> None:
        keys = {"run", *(k for k, _ in self.params)}
        clash = sorted(keys & set(schema.names))
        if clash:
            raise ResultsError(f"table {name!r} has columns named like partition keys: "
                               f"{', '.join(clash)}")

    def with_metadata(self, schema: pa.Schema) -> pa.Schema:
        """``schema`` carrying this run's config, seed, run id and versions."""
        return schema.with_metadata({**(schema.metadata or {}), **self._metadata})

    def write_table(self, name: str, table: pa.Table) -> Path:
        """Stage ``<name>.parquet`` with the run metadata in its schema."""
        self._check_open(name)
        self._check_columns(name, table.schema)
        for col, typ in KEY_TYPES.items():
            i = table.schema.get_field_index(col)
            if i >= 0 and table.schema.field(i).type != typ:
                table = table.set_column(i, pa.field(col, typ), table.column(i).cast(typ))
        table = table.replace_schema_metadata(self.with_metadata(table.schema).metadata)
        path = self.tmp_dir / (name + PARQUET_EXT)
        pq.write_table(table, path)
        self._files[path.name] = table.num_rows
        return path

    def stream(self, name: str, schema: pa.Schema) -> StreamSink:
        """Open ``<name>.arrows`` for batch-by-batch writing; compacted at commit."""
        self._check_open(name)
        self._check_columns(name, schema)
        sink = StreamSink(self.tmp_dir / (name + STREAM_EXT), self.with_metadata(schema))
        self._streams[name] = sink
        return sink

    def _compact(self, name: str, sink: StreamSink) -> None:
        sink.close()
        out = self.tmp_dir / (name + PARQUET_EXT)
        rows = 0
        with pa.OSFile(str(sink.path), "rb") as f:
            reader = pa.ipc.open_stream(f)
            with pq.ParquetWriter(out, sink.schema) as writer:
                pending: list[pa.RecordBatch] = []
                pending_rows = 0
                for batch in reader:
                    pending.append(batch)
                    pending_rows += batch.num_rows
                    if pending_rows >= _COMPACT_ROWS:
                        writer.write_table(pa.Table.from_batches(pending, sink.schema))
                        rows += pending_rows
                        pending, pending_rows = [], 0
                if pending or rows == 0:
                    writer.write_table(pa.Table.from_batches(pending, sink.schema))
                    rows += pending_rows
        sink.path.unlink()
        self._files[out.name] = rows

    # --- finishing -------------------------------------------------------------------------
    def table_paths(self) -> dict[str, Path]:
        """Where each table of this run is (or will be, once committed) published."""
        return {Path(f).stem: table_file(self.out_dir, self.cfg.experiment.name, Path(f).stem,
                                         self.run_id, self.params)
                for f in sorted(self._files) if f.endswith(PARQUET_EXT)}

    def manifest(self, status: str = STATUS_COMPLETE, error: str = "",
                 failed: Sequence[str] = ()) -> dict[str, Any]:
        if status == STATUS_COMPLETE:
            files = {Path(f).stem: {"path": str(p.relative_to(self.experiment_dir)),
                                    "rows": self._files[f]}
                     for f, p in zip(sorted(self._files), self.table_paths().values(),
                                     strict=True)}
        else:
            files = {Path(f).stem: {"path": f, "rows": n} for f, n in sorted(self._files.items())}
        out = {
            "format": MANIFEST_FORMAT,
            "status": status,
            "run": self.run_id,
            "experiment": self.cfg.experiment.name,
            "params": dict(self.params),
            "config_hash": config_hash(self.cfg),
            "seed": self.cfg.experiment.seed,
            "files": files,
            "versions": self.versions,
            "notes": list(self.cfg.notes),
            "placement": self.placement,
            "config": config_to_dict(self.cfg),
        }
        if status != STATUS_COMPLETE:
            out["error"] = error
            out["failed"] = list(failed)
        return out

    def _write_manifest(self, folder: Path, manifest: dict[str, Any]) -> None:
        tmp = folder / (MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / MANIFEST)

    def _clear_final(self) -> None:
        """Remove an earlier attempt of this run (its manifest first, then its files)."""
        old = self.final_dir / MANIFEST
        previous: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            previous = json.loads(old.read_text())
        old.unlink(missing_ok=True)
        if previous.get("status") == STATUS_COMPLETE:
            for f in (previous.get("files") or {}).values():
                if isinstance(f, dict) and f.get("path"):
                    with contextlib.suppress(OSError):
                        (self.experiment_dir / str(f["path"])).unlink()
        if self.final_dir.exists():
            shutil.rmtree(self.final_dir, ignore_errors=True)

    def commit(self) -> Path:
        """Compact streams, rename every table into its dataset, write the manifest last."""
        if self.state != "open":
            raise ResultsError(f"run writer is {self.state}")
        for name, sink in sorted(self._streams.items()):
            self._compact(name, sink)
        self._streams.clear()
        if (self.final_dir / MANIFEST).exists() and not self.overwrite and run_status(
                self.out_dir, self.cfg.experiment.name, self.run_id,
                self.params) != STATUS_FAILED:
            raise RunExistsError(f"run {self.run_id} already exists in {self.final_dir} "
                                 "(use --overwrite to replace it)")
        manifest = self.manifest()
        self._clear_final()
        for f, target in zip(sorted(self._files), self.table_paths().values(), strict=True):
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.tmp_dir / f, target)  # atomic: a reader sees no part-file
        self.final_dir.mkdir(parents=True, exist_ok=True)
        self._write_manifest(self.final_dir, manifest)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.state = "committed"
        return self.final_dir

    def fail(self, error: str, failed: Sequence[str] = ()) -> Path:
        """Keep what was written (streams stay readable) under a ``failed`` manifest."""
        if self.state != "open":
            raise ResultsError(f"run writer is {self.state}")
        for sink in self._streams.values():
            with contextlib.suppress(Exception):
                sink.close()
            with contextlib.suppress(OSError, ResultsError):
                self._files[sink.path.name] = recover_stream(sink.path).num_rows
        self._streams.clear()
        manifest = self.manifest(STATUS_FAILED, error, failed)
        self._write_manifest(self.tmp_dir, manifest)
        self._clear_final()
        self.final_dir.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.tmp_dir, self.final_dir)
        self.state = STATUS_FAILED
        return self.final_dir

    def abort(self) -> None:
        """Close streams and remove the staging folder (idempotent)."""
        for sink in self._streams.values():
            with contextlib.suppress(Exception):
                sink.close()
        self._streams.clear()
        if self.state == "open":
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.state = "aborted"

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if self.state == "open" and isinstance(exc, KeyboardInterrupt):
            # Ctrl-C or SIGTERM (cluster.cli): keep what was streamed, like a failed run, and
            # tell the caller where (``exc.path``); the run is redone by the next attempt.
            why = str(exc) or "Ctrl-C"
            with contextlib.suppress(OSError, ResultsError):
                exc.path = self.fail(f"interrupted ({why})", ["interrupted"])  # type: ignore[attr-defined]
        if self.state == "open":
            self.abort()


def staging_folders(path: str | Path) -> list[Path]:
    """``.tmp-run=*`` staging folders in ``path`` (an experiment folder) or in the experiment
    folders under it (a results folder), sorted."""
    p = Path(path)
    found = [*p.glob(f"{_TMP_PREFIX}*"), *p.glob(f"*/{_TMP_PREFIX}*")]
    return sorted(f for f in found if f.is_dir())


def writer_alive(staging: Path) -> bool:
    """Whether the process that staged ``staging`` (``.tmp-run=<id>-<pid>-<n>``) still runs on
    this machine. A folder whose writer is gone is litter of a killed run."""
    try:
        pid = int(staging.name.rsplit("-", 2)[1])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True   # exists, owned by someone else
    return True


def leftover_staging(path: str | Path) -> list[Path]:
    """Staging folders under ``path`` whose writer no longer runs (``iommu-emu clean``)."""
    return [f for f in staging_folders(path) if not writer_alive(f)]


# --- Reading -------------------------------------------------------------------------------
def recover_stream(path: str | Path) -> pa.Table:
    """Every complete batch of an ``.arrows`` file, even one whose writer crashed mid-batch."""
    p = Path(path)
    try:
        f = pa.OSFile(str(p), "rb")
    except (OSError, pa.ArrowException) as e:
        raise ResultsError(f"cannot open stream {p}: {e}") from None
    with f:
        try:
            reader = pa.ipc.open_stream(f)
        except (OSError, pa.ArrowException) as e:
            raise ResultsError(f"stream {p} has no readable schema: {e}") from None
        batches: list[pa.RecordBatch] = []
        while True:
            try:
                batches.append(reader.read_next_batch())
            except StopIteration:
                break
            except (OSError, pa.ArrowException):
                break  # a torn last batch: keep what came before it
        return pa.Table.from_batches(batches, reader.schema)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a run folder (``<experiment>/_runs/.../run=<id>``)."""
    p = Path(path) / MANIFEST
    try:
        manifest = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ResultsError(f"cannot read {p}: {e}") from None
    if not isinstance(manifest, dict):
        raise ResultsError(f"{p} is not a manifest")
    return manifest


def _experiment_dir(run_folder: Path, manifest: dict[str, Any]) -> Path:
    """``<experiment>`` above ``_runs/<param folders>/run=<id>``."""
    return run_folder.parents[len(manifest.get("params") or {}) + 1]


def read_run(path: str | Path) -> dict[str, pa.Table]:
    """Tables of one run by name: a committed run's from their datasets; a failed or staging
    folder's from its own files (streams of a crashed run are recovered)."""
    p = Path(path)
    if not p.is_dir():
        raise ResultsError(f"no run folder at {p}")
    tables: dict[str, pa.Table] = {}
    if (p / MANIFEST).is_file():
        manifest = read_manifest(p)
        if manifest.get("status") == STATUS_COMPLETE:
            exp_dir = _experiment_dir(p, manifest)
            for name, f in sorted((manifest.get("files") or {}).items()):
                file = exp_dir / str(f.get("path", ""))
                try:
                    tables[name] = pq.read_table(file)
                except (OSError, pa.ArrowException) as e:
                    raise ResultsError(f"cannot read {file}: {e}") from None
            return tables
    for f in sorted(p.iterdir()):
        try:
            if f.suffix == PARQUET_EXT:
                tables[f.stem] = pq.read_table(f)
            elif f.suffix == STREAM_EXT and f.stem not in tables:
                tables[f.stem] = recover_stream(f)
        except (OSError, pa.ArrowException) as e:
            raise ResultsError(f"cannot read {f}: {e}") from None
    return tables


def read_dataset(path: str | Path) -> pa.Table:
    """A table's dataset folder (``<experiment>/<table>``) with its Hive keys as columns
    (their names in the schema metadata ``META_PARTITION_KEYS``)."""
    import pyarrow.dataset as ds

    p = Path(path)
    try:
        dataset = ds.dataset(p, format="parquet", partitioning="hive")
        table = dataset.to_table()
    except (OSError, pa.ArrowException) as e:
        raise ResultsError(f"cannot read results in {p}: {e}") from None
    keys = [k for k in dataset.partitioning.schema.names if k in table.column_names]
    meta = {**(table.schema.metadata or {}), META_PARTITION_KEYS: json.dumps(keys).encode()}
    return table.replace_schema_metadata(meta)


def read_summaries(path: str | Path, table: str = "summary") -> pa.Table:
    """``table`` of one run folder, of a table's dataset folder, or of an experiment.

    ``path`` may be a run folder (with manifest.json), an experiment folder (its ``<table>/``
    dataset is read: every run, with ``run`` and sweep parameters as columns) or the
    ``<table>/`` folder itself.
    """
    p = Path(path)
    if (p / MANIFEST).is_file():
        tables = read_run(p)
        if table not in tables:
            raise ResultsError(f"run folder {p} has no {table} table")
        return tables[table]
    target = p / table if (p / table).is_dir() else p
    if not target.is_dir() or not any(target.rglob(f"*{PARQUET_EXT}")):
        raise ResultsError(f"no {table} results in {p} (expected {p / table}/.../*.parquet "
                           "or a run folder with manifest.json)")
    return read_dataset(target)
