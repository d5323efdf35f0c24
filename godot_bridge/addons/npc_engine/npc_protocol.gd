class_name NpcProtocol
extends RefCounted
## Protocol v1 messages as plain Dictionaries: building requests and reading server frames.
##
## Pure functions with no node or socket, so game code and tests can use them directly.
## Request ids are strings: Godot's JSON parser turns every number into a float.

const PROTOCOL_VERSION := "1"

## Server message types that answer a `say` (routed by `re` to the reply they belong to).
const REPLY_TYPES: Array[String] = ["reply.start", "reply.delta", "reply.end"]


static func hello(request_id: String, client_name: String, token: String = "") -> Dictionary:
	var message := {
		"type": "hello", "id": request_id, "protocol": PROTOCOL_VERSION, "client": client_name
	}
	if not token.is_empty():
		message["token"] = token
	return message


## `game_time`: minutes of game time since the game's epoch (< 0: not sent, the engine
## then uses the last one it was given, or the wall clock).
static func say(
	request_id: String,
	npc_id: String,
	text: String,
	player_id: String = "",
	context: Dictionary = {},
	max_tokens: int = 0,
	game_time: float = -1.0,
	scene_id: String = ""
) -> Dictionary:
	var message := {"type": "say", "id": request_id, "npc_id": npc_id, "text": text}
	if not player_id.is_empty():
		message["player_id"] = player_id
	if not context.is_empty():
		message["context"] = context
	if max_tokens > 0:
		message["max_tokens"] = max_tokens
	if game_time >= 0.0:
		message["game_time"] = game_time
	if not scene_id.is_empty():
		message["scene_id"] = scene_id
	return message


## Several NPCs talk among themselves (2-6 ids); each line streams as reply.* frames with
## `npc_id` and `scene_id`, then one `scene.end`. With `player_id` the player is present and
## may join with `say(..., scene_id)`.
static func scene_start(
	request_id: String,
	scene_id: String,
	npc_ids: Array,
	player_id: String = "",
	topic: String = "",
	max_turns: int = 0,
	max_tokens: int = 0,
	game_time: float = -1.0
) -> Dictionary:
	var message := {
		"type": "scene.start", "id": request_id, "scene_id": scene_id, "npc_ids": npc_ids
	}
	if not player_id.is_empty():
		message["player_id"] = player_id
	if not topic.is_empty():
		message["topic"] = topic
	if max_turns > 0:
		message["max_turns"] = max_turns
	if max_tokens > 0:
		message["max_tokens"] = max_tokens
	if game_time >= 0.0:
		message["game_time"] = game_time
	return message


## Game time passes (e.g. each game hour): rumours spread along relationships.
static func world_tick(request_id: String, game_time: float = -1.0) -> Dictionary:
	var message := {"type": "world.tick", "id": request_id}
	if game_time >= 0.0:
		message["game_time"] = game_time
	return message


## The player walks up: answered with reply.* frames exactly as `say` is.
static func greet(
	request_id: String,
	npc_id: String,
	player_id: String = "",
	context: Dictionary = {},
	game_time: float = -1.0
) -> Dictionary:
	var message := {"type": "greet", "id": request_id, "npc_id": npc_id}
	if not player_id.is_empty():
		message["player_id"] = player_id
	if not context.is_empty():
		message["context"] = context
	if game_time >= 0.0:
		message["game_time"] = game_time
	return message


## `npc_ids` may be ["*"] for every NPC.
static func npc_warm(request_id: String, npc_ids: Array) -> Dictionary:
	return {"type": "npc.warm", "id": request_id, "npc_ids": npc_ids}


static func save_create(request_id: String, save_id: String) -> Dictionary:
	return {"type": "save.create", "id": request_id, "save_id": save_id}


static func save_load(request_id: String, save_id: String) -> Dictionary:
	return {"type": "save.load", "id": request_id, "save_id": save_id}


static func save_delete(request_id: String, save_id: String) -> Dictionary:
	return {"type": "save.delete", "id": request_id, "save_id": save_id}


static func save_list(request_id: String) -> Dictionary:
	return {"type": "save.list", "id": request_id}


static func cancel(request_id: String, target: String) -> Dictionary:
	return {"type": "cancel", "id": request_id, "target": target}


## `npc_ids` may be ["*"] for every NPC; `importance` 1-10, 0 lets the engine rate it.
static func event(
	request_id: String,
	npc_ids: Array,
	text: String,
	player_id: String = "",
	importance: int = 0,
	game_time: float = -1.0
) -> Dictionary:
	var message := {"type": "event", "id": request_id, "npc_ids": npc_ids, "text": text}
	if not player_id.is_empty():
		message["player_id"] = player_id
	if importance > 0:
		message["importance"] = clampi(importance, 1, 10)
	if game_time >= 0.0:
		message["game_time"] = game_time
	return message


static func npc_list(request_id: String) -> Dictionary:
	return {"type": "npc.list", "id": request_id}


static func memory_list(
	request_id: String, npc_id: String, player_id: String = "", query: String = "", limit: int = 10
) -> Dictionary:
	var message := {"type": "memory.list", "id": request_id, "npc_id": npc_id, "limit": limit}
	if not player_id.is_empty():
		message["player_id"] = player_id
	if not query.is_empty():
		message["query"] = query
	return message


## `state.set`: trust (absolute, or a delta) needs `npc_id`; `flags` values are bool, int
## or short strings, `null` deletes one. Unset arguments are not sent.
static func state_set(
	request_id: String,
	player_id: String,
	npc_id: String = "",
	trust: Variant = null,
	trust_delta: Variant = null,
	flags: Dictionary = {},
	game_time: float = -1.0
) -> Dictionary:
	var message := {"type": "state.set", "id": request_id, "player_id": player_id}
	if game_time >= 0.0:
		message["game_time"] = game_time
	if not npc_id.is_empty():
		message["npc_id"] = npc_id
	if trust != null:
		message["trust"] = int(trust)
	if trust_delta != null:
		message["trust_delta"] = int(trust_delta)
	if not flags.is_empty():
		message["flags"] = flags
	return message


static func state_get(request_id: String, player_id: String, npc_id: String = "") -> Dictionary:
	var message := {"type": "state.get", "id": request_id, "player_id": player_id}
	if not npc_id.is_empty():
		message["npc_id"] = npc_id
	return message


static func ping(request_id: String) -> Dictionary:
	return {"type": "ping", "id": request_id}


static func encode(message: Dictionary) -> String:
	return JSON.stringify(message)


## Parses one text frame. Returns the message, or {} when the frame is not a JSON object
## with a string `type` (the caller reports it; one bad frame must not stop the client).
static func decode(frame: String) -> Dictionary:
	var parsed: Variant = JSON.parse_string(frame)
	if typeof(parsed) != TYPE_DICTIONARY:
		return {}
	var message: Dictionary = parsed
	if typeof(message.get("type")) != TYPE_STRING:
		return {}
	return message


static func is_reply_message(message: Dictionary) -> bool:
	return REPLY_TYPES.has(message.get("type", ""))


## The `re` of a server message as a String ("" when absent).
static func answer_id(message: Dictionary) -> String:
	var re: Variant = message.get("re", "")
	return re if typeof(re) == TYPE_STRING else ""


## Seconds to wait before reconnect attempt `attempt` (0-based): exponential, capped,
## with up to 25% jitter so a room full of clients does not reconnect in lockstep.
static func backoff_seconds(attempt: int, base: float, cap: float, jitter: float) -> float:
	var delay := minf(cap, base * pow(2.0, attempt))
	return delay * (1.0 + 0.25 * clampf(jitter, 0.0, 1.0))
