from __future__ import annotations

from pathlib import Path

import pytest

from npc_engine.config import load_config
from npc_engine.errors import ConfigError


@pytest.mark.timeout(30)
def test_flags_beat_env_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file = tmp_path / "engine.yaml"
    config_file.write_text(
        "n_ctx: 1024\ntemperature: 0.2\nmax_tokens: 33\nretrieval:\n  top_k: 3\n"
    )
    monkeypatch.setenv("NPC_ENGINE_TEMPERATURE", "0.4")
    monkeypatch.setenv("NPC_ENGINE_RETRIEVAL__WEIGHT_RECENCY", "1.5")
    config = load_config(config_file, n_ctx=2048)
    assert config.n_ctx == 2048
    assert config.temperature == 0.4
    assert config.max_tokens == 33
    assert config.retrieval.top_k == 3
    assert config.retrieval.weight_recency == 1.5


@pytest.mark.timeout(30)
def test_invalid_values_name_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file = tmp_path / "engine.yaml"
    config_file.write_text("n_ctxx: 1024\n")
    with pytest.raises(ConfigError, match=r"config file.*n_ctxx"):
        load_config(config_file)
    monkeypatch.setenv("NPC_ENGINE_TEMPERATURE", "hot")
    with pytest.raises(ConfigError, match="temperature"):
        load_config()
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://chroma:8000/tenant-a", "path '/tenant-a' would be dropped"),
        ("http://ops:S3cret@chroma:8000", "credentials in the URL"),
        ("http://chroma:8000?token=abc", "query or fragment"),
        ("chroma:8000", r"not an http\(s\)://host:port"),
    ],
)
def test_a_chroma_url_the_client_cannot_honour_is_refused(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=rf"memory\.url: .*{says}") as refused:
        load_config(memory={"url": url})
    assert "S3cret" not in str(refused.value)
    for fine in ("http://chroma:8000", "https://chroma.example:443/"):
        assert load_config(memory={"url": fine}).memory.url == fine
