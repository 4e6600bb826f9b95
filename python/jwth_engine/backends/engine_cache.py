"""On-disk cache of exported ONNX graphs and TensorRT engines.

An artifact is reused only when everything that shaped it is equal; those components form its
`ArtifactKey` and its file name carries their digest:

  ONNX graph      preset (name + content digest), weights hash, precision recipe, opset, export
                  format version, torch and timm versions (the exporter and the model code)
  TensorRT engine the ONNX components + max batch, GPU name and compute capability, TensorRT
                  version and the build profile (engine/tensorrt/*.json)

Each artifact has a JSON manifest beside it holding the components. Writers hold an exclusive
`flock` on `<artifact>.lock` (so that several workers of one node build an engine once) and move
finished files into place with os.replace (a reader never sees half a file).

Location: `cache_dir` argument > $JWTH_CACHE_DIR > $XDG_CACHE_HOME/jwth-engine > ~/.cache/jwth-engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from ..errors import ConfigError


def default_cache_dir() -> Path:
    if os.environ.get("JWTH_CACHE_DIR"):
        return Path(os.environ["JWTH_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jwth-engine"


def resolve_cache_dir(cache_dir: str | os.PathLike | None, kind: str) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = root / kind
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot create the engine cache folder ({exc.strerror}); "
                          f"set --cache-dir or $JWTH_CACHE_DIR") from exc
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"{folder}: engine cache folder is not writable; set --cache-dir or $JWTH_CACHE_DIR")
    return folder


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "x"


@dataclass(frozen=True)
class ArtifactKey:
    kind: str                      # "onnx" | "tensorrt"
    preset: str
    preset_digest: str
    weights_hash: str
    precision: str                 # numerics recipe baked into the artifact
    exporter: str                  # torch/timm versions, opset, export format version
    max_batch: int = 0             # 0: dynamic batch without a profile (ONNX)
    gpu_name: str = ""
    compute_capability: str = ""
    runtime_version: str = ""      # TensorRT version for engines
    build_profile: str = ""        # digest of the TensorRT build profile

    def components(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.components(), sort_keys=True).encode()).hexdigest()

    def stem(self) -> str:
        """Readable and unique: preset, precision, batch, GPU, then the digest of everything."""
        parts = [_slug(self.preset), self.precision]
        if self.max_batch:
            parts.append(f"b{self.max_batch}")
        if self.compute_capability:
            parts.append(f"sm{self.compute_capability.replace('.', '')}")
        return "-".join(parts + [self.digest()[:16]])


def artifact_path(key: ArtifactKey, cache_dir: str | os.PathLike | None, suffix: str) -> Path:
    return resolve_cache_dir(cache_dir, key.kind) / f"{key.stem()}{suffix}"


def write_manifest(path: Path, key: ArtifactKey, **extra) -> None:
    manifest = {"components": key.components(), "digest": key.digest(), "file": path.name,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
    atomic_write_bytes(path.with_suffix(path.suffix + ".json"), (json.dumps(manifest, indent=2) + "\n").encode())


def read_manifest(path: Path) -> dict | None:
    manifest = path.with_suffix(path.suffix + ".json")
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text())


def atomic_write_bytes(dest: Path, data: bytes) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, dest)


@contextlib.contextmanager
def artifact_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock for building `path` (POSIX flock; a no-op where there is none)."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent builders may duplicate work, results stay correct
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
