"""The result store: one atomic, self-describing folder of Arrow/Parquet tables per run.

Layout (DESIGN.md section 5, documented in docs/results.md)::

    <out>/<experiment>/run=<run id>/{summary,metrics,faults,...}.parquet + manifest.json

A run is written into the hidden sibling ``.tmp-run=<id>-<pid>/`` and renamed into place by
``commit()``: a reader (pyarrow.dataset ignores names starting with ".") never sees a
half-written run. Long tables stream as Arrow IPC (``<name>.arrows``, every batch flushed) and
are compacted to Parquet at commit, so a crash loses at most the batch being written.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.config import ClusterError, Config, config_hash, config_to_dict

# Schema metadata keys carried by every table a run writes.
META_CONFIG = b"iommu_emu.config"
META_SEED = b"iommu_emu.seed"
META_RUN = b"iommu_emu.run"
META_VERSIONS = b"iommu_emu.versions"

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
PARQUET_EXT = ".parquet"
STREAM_EXT = ".arrows"
_TMP_PREFIX = ".tmp-run="
_OLD_PREFIX = ".old-run="
_COMPACT_ROWS = 1 << 16  # rows gathered per Parquet row group when compacting a stream
_TABLE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class ResultsError(ClusterError):
    """A result folder is missing, unreadable or misused."""


class RunExistsError(ResultsError):
    """The final run folder already exists and ``overwrite`` was not asked for."""


def run_id(cfg: Config) -> str:
    """``<experiment>-s<seed>-<config hash>``: the same config always gets the same id."""
    return f"{cfg.experiment.name}-s{cfg.experiment.seed}-{config_hash(cfg)}"


def run_dir(out_dir: str | Path, experiment: str, rid: str) -> Path:
    """The final folder of a run."""
    return Path(out_dir) / experiment / f"run={rid}"


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


def is_complete(out_dir: str | Path, experiment: str, rid: str) -> bool:
    """True if the run folder is committed: manifest present, for this run, files there."""
    path = run_dir(out_dir, experiment, rid)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("run") != rid:
        return False
    files = manifest.get("files", {})
    return isinstance(files, dict) and all((path / f).is_file() for f in files)


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
    """Writes one run's tables into a hidden folder; ``commit()`` publishes it atomically.

    States: open (tables and streams may be written) -> committed (the folder is
    ``run=<id>``) or aborted (nothing left behind). Use as a context manager: leaving the
    block without ``commit()`` aborts.
    """

    def __init__(self, out_dir: str | Path, cfg: Config, run_id_: str | None = None, *,
                 overwrite: bool = False) -> None:
        self.cfg = cfg
        self.run_id = run_id_ if run_id_ is not None else run_id(cfg)
        self.overwrite = overwrite
        self.experiment_dir = Path(out_dir) / cfg.experiment.name
        self.final_dir = self.experiment_dir / f"run={self.run_id}"
        if self.final_dir.exists() and not overwrite:
            raise RunExistsError(f"run folder {self.final_dir} already exists "
                                 "(use overwrite to replace it)")
        self.tmp_dir = self.experiment_dir / f"{_TMP_PREFIX}{self.run_id}-{os.getpid()}"
        if self.tmp_dir.exists():  # left by an earlier crashed writer with our pid
            shutil.rmtree(self.tmp_dir)
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
        self.state = "open"

    # --- writing ---------------------------------------------------------------------------
    def _check_open(self, name: str) -> None:
        if self.state != "open":
            raise ResultsError(f"run writer is {self.state}")
        if not _TABLE_NAME_RE.match(name):
            raise ResultsError(f"bad table name {name!r} (letters, digits, _)")
        if name + PARQUET_EXT in self._files or name in self._streams:
            raise ResultsError(f"table {name!r} was already written in this run")

    def with_metadata(self, schema: pa.Schema) -> pa.Schema:
        """``schema`` carrying this run's config, seed, run id and versions."""
        return schema.with_metadata({**(schema.metadata or {}), **self._metadata})

    def write_table(self, name: str, table: pa.Table) -> Path:
        """Write ``<name>.parquet`` with the run metadata in its schema."""
        self._check_open(name)
        table = table.replace_schema_metadata(self.with_metadata(table.schema).metadata)
        path = self.tmp_dir / (name + PARQUET_EXT)
        pq.write_table(table, path)
        self._files[path.name] = table.num_rows
        return path

    def stream(self, name: str, schema: pa.Schema) -> StreamSink:
        """Open ``<name>.arrows`` for batch-by-batch writing; compacted at commit."""
        self._check_open(name)
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
    def manifest(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "run": self.run_id,
            "experiment": self.cfg.experiment.name,
            "config_hash": config_hash(self.cfg),
            "seed": self.cfg.experiment.seed,
            "files": {f: {"rows": n} for f, n in sorted(self._files.items())},
            "versions": self.versions,
            "notes": list(self.cfg.notes),
            "config": config_to_dict(self.cfg),
        }

    def commit(self) -> Path:
        """Compact streams, write the manifest last, and rename the folder into place."""
        if self.state != "open":
            raise ResultsError(f"run writer is {self.state}")
        for name, sink in sorted(self._streams.items()):
            self._compact(name, sink)
        self._streams.clear()
        tmp_manifest = self.tmp_dir / (MANIFEST + ".tmp")
        with open(tmp_manifest, "w", encoding="utf-8") as f:
            json.dump(self.manifest(), f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_manifest, self.tmp_dir / MANIFEST)
        self._publish()
        self.state = "committed"
        return self.final_dir

    def _publish(self) -> None:
        old = None
        if self.final_dir.exists():
            if not self.overwrite:
                raise RunExistsError(f"run folder {self.final_dir} already exists "
                                     "(use overwrite to replace it)")
            # Move the old run aside under a hidden name, then swap: a reader sees either
            # the old complete run, no run, or the new complete run; never a mixture.
            old = self.experiment_dir / f"{_OLD_PREFIX}{self.run_id}-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.rename(self.final_dir, old)
        try:
            os.rename(self.tmp_dir, self.final_dir)  # fails rather than replace a non-empty dir
        except OSError:
            if old is not None:
                os.rename(old, self.final_dir)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Close streams and remove the temporary folder (idempotent)."""
        for sink in self._streams.values():
            with contextlib.suppress(Exception):
                sink.close()
        self._streams.clear()
        if self.state == "open":
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.state = "aborted"

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.state == "open":
            self.abort()


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


def read_run(path: str | Path) -> dict[str, pa.Table]:
    """Tables of one run folder by name; streams of a crashed run are recovered."""
    p = Path(path)
    if not p.is_dir():
        raise ResultsError(f"no run folder at {p}")
    tables: dict[str, pa.Table] = {}
    for f in sorted(p.iterdir()):
        try:
            if f.suffix == PARQUET_EXT:
                tables[f.stem] = pq.read_table(f)
            elif f.suffix == STREAM_EXT and f.stem not in tables:
                tables[f.stem] = recover_stream(f)
        except (OSError, pa.ArrowException) as e:
            raise ResultsError(f"cannot read {f}: {e}") from None
    return tables


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a committed run folder."""
    p = Path(path) / MANIFEST
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ResultsError(f"cannot read {p}: {e}") from None


def read_summaries(path: str | Path, table: str = "summary") -> pa.Table:
    """``<table>.parquet`` of one run folder, or of every committed run of an experiment.

    An experiment folder is read with pyarrow.dataset and Hive partitioning (``run=<id>``);
    hidden temporary folders are skipped.
    """
    import pyarrow.dataset as ds

    p = Path(path)
    single = p / (table + PARQUET_EXT)
    try:
        if single.is_file():
            return pq.read_table(single)
        files = sorted(str(f) for f in p.glob(f"run=*/{table}{PARQUET_EXT}"))
        if not files:
            raise ResultsError(f"no {table}{PARQUET_EXT} in {p} or its run=* folders")
        dataset = ds.dataset(files, format="parquet",
                             partitioning=ds.partitioning(flavor="hive"),
                             partition_base_dir=str(p))
        return dataset.to_table()
    except (OSError, pa.ArrowException) as e:
        raise ResultsError(f"cannot read results in {p}: {e}") from None
