"""The sections of the engine's configuration (``retrieval:``, ``guard:``, ``memory:``,
``server:`` …), each a pydantic model with its defaults and bounds; ``config.EngineConfig``
puts them together and reads them from flags, the environment and the config file."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class RetrievalConfig(BaseModel):
    """Generative Agents memory scoring (Park et al. 2023, §4.1).

    score = w_recency*recency + w_relevance*relevance + w_importance*importance, each
    min-max normalised over the candidates. The defaults are the released reference
    code's weights (0.5, 3, 2); the paper used 1, 1, 1.
    """

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(6, ge=0, le=100, description="Memories put into each prompt.")
    candidates: int = Field(40, ge=1, le=1000, description="Nearest memories scored per turn.")
    weight_recency: float = Field(0.5, ge=0)
    weight_relevance: float = Field(3.0, ge=0)
    weight_importance: float = Field(2.0, ge=0)
    recency_decay: float = Field(
        0.995, gt=0, le=1, description="Recency factor per hour since last retrieval (paper)."
    )
    normalize_floor: float = Field(
        0.1,
        ge=0,
        description="A spread smaller than this is not stretched to [0, 1] by min-max scaling, "
        "so near-identical values (ten memories from the same minute) do not look far apart.",
    )
    min_relevance: float = Field(
        0.28,
        ge=-1,
        le=1,
        description="Memories below this cosine similarity are never used: what the player "
        "never told stays untold. Calibrated for MiniLM: tools/recall_probe.py --calibrate "
        "(60 recall questions against 30 never-told ones); rerun it for another embedder.",
    )
    min_relevance_events: float = Field(
        0.18,
        ge=-1,
        le=1,
        description="The bar for events the game told the NPC (event messages): players "
        "ask about them vaguely ('Anything strange happen lately?' scores 0.22 against "
        "'Someone broke into the customs shed'; unrelated questions 0.11 at most).",
    )
    min_relevance_small_talk: float = Field(
        0.55,
        ge=-1,
        le=1,
        description="The bar for memories that state nothing about the player: the "
        "player's own questions, the NPC's replies, summaries of small talk. Near any "
        "question about the player by form alone, they come in only on a close match.",
    )
    hybrid: bool = Field(
        True,
        description="Join keyword (BM25) matches to the nearest by meaning and fuse the two "
        "rankings (reciprocal rank fusion) into the relevance that is scored.",
    )
    rrf_k: float = Field(
        60.0, gt=0, description="Reciprocal rank fusion constant: larger flattens the ranks."
    )


class GuardConfig(BaseModel):
    """Output guards (``npc_engine.guard``): secrets and out-of-world talk."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="Check replies for guarded secrets and out-of-world terms."
    )
    meaning: Literal["minilm", "minilm+use"] = Field(
        "minilm+use",
        description="What the meaning checks read sentences with: MiniLM (English), or MiniLM "
        "with Google's multilingual USE v3 (a third more leaks caught at the same false cuts, "
        "and secrets told in other languages; ~2 s to load, ~12 ms a sentence more).",
    )
    threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Similarity of a reply sentence (or it with the one before) to a guarded "
        "secret or its first- and second-person rewrites at which it counts as telling it. "
        "Default: 0.46 with minilm+use, 0.52 with minilm (tuned on tests/probes/guard_leaks.yaml).",
    )
    world_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Similarity of a reply sentence to a description of a modern thing at which "
        "it leaves the world (worlds with out_of_world terms). Default: 0.42 with minilm+use, "
        "0.46 with minilm (tuned on tests/probes/guard_leaks.yaml).",
    )

    @property
    def secret_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return 0.46 if self.meaning == "minilm+use" else 0.52

    @property
    def out_of_world_threshold(self) -> float:
        if self.world_threshold is not None:
            return self.world_threshold
        return 0.42 if self.meaning == "minilm+use" else 0.46


class ActionConfig(BaseModel):
    """Declared game actions (persona/world ``actions``): how the engine picks one."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Choose game actions after replies.")
    gate: float = Field(
        0.35,
        ge=-1,
        le=1,
        description="An action is near the player's line when one of its example lines (or "
        "its name, description and words) is at least this similar (MiniLM cosine); none "
        "near: no action, no model call. -1 asks the model about every offered action.",
    )
    accept: float = Field(
        0.5,
        ge=-1,
        le=1,
        description="A line this similar to one action's example, and clearly nearer to it "
        "than to any other action's (``margin``), is that action: no model call.",
    )
    margin: float = Field(
        0.05,
        ge=0,
        le=2,
        description="How much nearer the best action's example must be than any other "
        "action's for the engine to decide alone; closer calls go to the model.",
    )


class LoreConfig(BaseModel):
    """The lorebook: world entries looked up per turn (docs/lore.md)."""

    model_config = ConfigDict(extra="forbid")

    budget_tokens: int = Field(
        200, ge=0, le=4096, description="Tokens of lore entries noted in one turn at most."
    )
    max_entries: int = Field(4, ge=0, le=50, description="Entries noted in one turn at most.")
    min_similarity: float = Field(
        0.45,
        ge=-1,
        le=1,
        description="An entry without a key match is noted when its meaning (MiniLM cosine "
        "to the player's line) is at least this (tuned on tests/probes/lore_questions.yaml).",
    )
    scan_turns: int = Field(
        2, ge=0, le=20, description="Earlier exchanges scanned for keys, besides this line."
    )


class RumourConfig(BaseModel):
    """What a world tick passes on (``npc_engine/rumours.py`` has the design)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    min_importance: int = Field(6, ge=1, le=10, description="A memory worth telling, at least.")
    max_hops: int = Field(2, ge=1, le=10, description="Tellers a rumour passes through at most.")
    per_npc: int = Field(3, ge=0, le=50, description="Rumours an NPC passes on per tick.")
    fade_minutes: float = Field(
        4320, gt=0, description="A rumour older than this (game minutes) is forgotten."
    )
    max_tick_minutes: float = Field(
        1440,
        gt=0,
        description="Game minutes one world tick may move past the last one (a far-future "
        "game_time is cut to this: one request cannot fade every rumour).",
    )


class GenerationConfig(BaseModel):
    """Which generator writes the replies (``npc_engine.backends``)."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field(
        "llama",
        description="llama: the GGUF in-process (llama.cpp); openai: an OpenAI-compatible "
        "server (url, api_key_env, model); scripted: a fixed reply, word by word, for wiring "
        "tests without a model; adversarial: tells the prompt's secrets every way it can, "
        "for testing the output guards (never for players).",
    )
    scripted_reply: str = Field(
        "Aye, I hear you.", description="What the scripted backend answers every time."
    )
    # The `openai` backend (docs/deploy.md): any OpenAI-compatible server.
    url: str | None = Field(
        None,
        description="openai: the server's base URL, e.g. http://127.0.0.1:8080/v1 "
        "(llama-server, vLLM, SGLang, llama_cpp.server, a hosted API).",
    )
    api_key_env: str | None = Field(
        None,
        description="openai: the name of the environment variable holding the API key "
        "(the key itself never goes in a config file).",
    )
    model: str | None = Field(
        None,
        description="openai: the model name the server serves (default: the server's "
        "first model). A persona's `model:` overrides it per NPC.",
    )
    api: Literal["completions", "chat"] = Field(
        "completions",
        description="openai: completions sends the engine's own rendered prompt (its "
        "layout keeps the server's prefix cache hitting; llama-server, vLLM, SGLang); chat "
        "sends the messages, for hosted chat-only APIs.",
    )
    send: Literal["tokens", "text"] = Field(
        "tokens",
        description="openai, completions: send the prompt as token ids (llama-server, vLLM, "
        "SGLang: a control token a player types stays text) or as text (servers that take "
        "only text, like llama_cpp.server: control tokens' texts are taken out of what "
        "players and games wrote before rendering).",
    )
    tokenizer: str | None = Field(
        None,
        description="openai: the GGUF (known model id or path) whose vocabulary counts "
        "prompt tokens and whose chat template renders the prompt, loaded vocab-only; "
        "default: `model`, the engine's own (the same GGUF the server runs, or one with "
        "its tokenizer, so counts and the prefix cache match).",
    )
    timeout: float = Field(
        60.0,
        gt=0,
        le=600,
        description="openai: seconds a whole request may take (connecting, the first token "
        "and the whole reply, retries included); past it the reply ends `unavailable`, "
        "however the server trickles.",
    )
    connect_timeout: float = Field(
        3.0, gt=0, le=60, description="openai: seconds to open a connection to the server."
    )
    retries: int = Field(
        2,
        ge=0,
        le=10,
        description="openai: retries (exponential backoff) of a request that failed before "
        "its first token: connection refused, 429, 5xx. Never after text went out.",
    )
    slots: int = Field(
        0,
        ge=0,
        le=1024,
        description="openai, llama-server: its -np; each conversation is pinned to one "
        "slot (id_slot) so its KV cache stays there. 0: the server picks the slot whose "
        "cache matches best (llama-server's default), right when conversations outnumber "
        "slots.",
    )


class ConsolidationConfig(BaseModel):
    """Folding old small talk into summaries, and the caps that bound memory growth
    (``npc_engine.memory.upkeep``). Runs on the memory writer's thread, after writes."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    every: int = Field(
        40, ge=1, description="Look at a (NPC, player) pair after this many new memories of it."
    )
    keep_recent: int = Field(
        40, ge=0, description="The newest dialogue memories of a pair are never folded."
    )
    fold_size: int = Field(
        20, ge=2, le=200, description="Dialogue memories folded into one summary."
    )
    max_importance: int = Field(
        4, ge=1, le=10, description="Only dialogue rated at most this important is folded."
    )
    max_per_player: int = Field(
        400,
        ge=50,
        description="Memories one NPC keeps of one player, facts aside; past it the oldest "
        "summaries and superseded lines go first, then the oldest other lines.",
    )
    max_facts_per_player: int = Field(
        200, ge=10, description="Facts (current and superseded) kept about one player."
    )
    max_per_npc: int = Field(
        100_000,
        ge=1000,
        description="Memories of one NPC, all players together; past it the oldest "
        "summaries, lines and events go first, facts last.",
    )


class MemoryConfig(BaseModel):
    """Which store keeps the memories (``npc_engine.backends``), and their upkeep."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field(
        "chroma",
        description="chroma: Chroma on disk in data_dir, or on a Chroma server when `url` "
        "is set (the real store); memory: in RAM, gone at exit, for tests.",
    )
    url: str | None = Field(
        None,
        description="A Chroma server (chroma run), e.g. http://127.0.0.1:8000: memories, "
        "histories and game state live there, shared by every engine replica. None: "
        "Chroma on disk in data_dir, one process.",
    )
    token_env: str | None = Field(
        None,
        description="The name of the environment variable holding the Chroma server's "
        "token (sent as a bearer token).",
    )
    tenant: str = Field("default_tenant", description="The Chroma server's tenant.")
    database: str = Field("default_database", description="The Chroma server's database.")
    timeout: float = Field(
        5.0,
        gt=0,
        le=120,
        description="Seconds a call to the Chroma server may take before the request that "
        "needed it fails with `unavailable`.",
    )
    embed_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Threads of the sentence embedder (MiniLM); default: all cores. 1 where "
        "engine replicas share cores with a generation server.",
    )
    facts: bool = Field(
        True,
        description="Find durable facts in player lines (my name is…, I used to be…) and "
        "keep them as kind 'fact' memories, shown as what the NPC knows about the player.",
    )
    consolidation: ConsolidationConfig = Field(default_factory=ConsolidationConfig)

    @field_validator("url")
    @classmethod
    def _server_address(cls, url: str | None) -> str | None:
        """Chroma's HttpClient takes a host and a port, nothing else: a path, credentials
        or a query in the URL would be dropped without a word (a reverse-proxy prefix
        lost, a password ignored), so they are refused here."""
        if url is None:
            return None
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise ValueError(f"not an http(s)://host:port address ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s)://host:port address")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "credentials in the URL are not sent to the Chroma server: put the token in "
                "the environment variable named by memory.token_env"
            )
        if parts.path not in ("", "/"):
            raise ValueError(
                f"the path {parts.path!r} would be dropped: the Chroma client reaches a "
                "server at http(s)://host:port only (no path prefix)"
            )
        if parts.query or parts.fragment:
            raise ValueError("a query or fragment would be dropped: give http(s)://host:port")
        return url


class ServerLimits(BaseModel):
    """Safety limits of ``npc-engine serve``; every one has a safe default."""

    model_config = ConfigDict(extra="forbid")

    max_frame_bytes: int = Field(
        1 << 20,
        ge=1024,
        description="Larger frames get too_large; frames over 4x this close the connection "
        "(1009) without being read into memory.",
    )
    max_connections: int = Field(
        64,
        ge=1,
        description="Open connections at once; further handshakes get HTTP 503.",
    )
    server_rate_per_second: float = Field(
        200.0,
        gt=0,
        description="Sustained requests per second over all connections (rate_limited), so "
        "opening many sockets does not multiply the per-connection rate.",
    )
    server_rate_burst: int = Field(400, ge=1, description="Server-wide request burst.")
    max_pending_per_connection: int = Field(
        32,
        ge=1,
        description="Requests of one connection waiting to be served in order (events, "
        "memory calls, says being accepted); more get busy.",
    )
    shutdown_grace: float = Field(
        5.0,
        gt=0,
        le=60,
        description="Seconds a stopping server gives running replies to end; then each "
        "gets reply.end with code shutdown at once.",
    )
    max_in_flight_per_connection: int = Field(
        8, ge=1, description="Accepted, unfinished says per connection; more get busy."
    )
    max_queued_generations: int = Field(
        64, ge=1, description="Says waiting for or in generation, all connections; more get busy."
    )
    rate_per_second: float = Field(
        20.0, gt=0, description="Sustained requests per second per connection (rate_limited)."
    )
    rate_burst: int = Field(40, ge=1, description="Requests a connection may send in a burst.")
    idle_timeout: float = Field(
        300.0,
        ge=0,
        description="Seconds without a frame and with no reply running before the server "
        "closes the connection (close code 4408); 0 disables.",
    )
    ping_interval: float = Field(
        20.0, gt=0, description="WebSocket keepalive ping every this many seconds."
    )
    delta_interval_ms: float = Field(
        15.0,
        ge=0,
        le=1000,
        description="After the first delta of a reply (sent at once), text is gathered for up "
        "to this long into one reply.delta: a game reads frames once per rendered frame "
        "(16.7 ms at 60 fps), and each frame costs CPU that the model's threads lose on "
        "small machines. 0 sends every token as it comes.",
    )
