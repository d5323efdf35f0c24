class_name NpcEngineClient
extends Node
## A connection to an npc-engine server (protocol v1, JSON text frames).
##
## Enabled as a plugin it is the `NpcEngine` autoload; it can also be added to a scene
## as a node. The socket is polled in `_process`, so every signal fires on the main
## thread. It reconnects with exponential backoff; requests made while (re)connecting are
## queued and sent after the handshake. A reply cut off by a disconnect still ends: with
## `reply_finished` and reason "error", code "disconnected", so no speech bubble waits
## forever.

## The handshake finished; `welcome` holds the server name and its NPCs.
signal connected(welcome: Dictionary)
## The connection closed (the client reconnects by itself when `reconnect` is on).
signal disconnected(code: int, reason: String)
## A `say` was accepted; show the NPC "thinking" until the first delta.
signal reply_started(request_id: String, npc_id: String)
## The next piece of a reply; `seq` counts from 0 without gaps.
signal reply_delta(request_id: String, seq: int, text: String)
## The reply is over. `reply` is the `reply.end` message: text, reason, emotion, usage.
signal reply_finished(request_id: String, reply: Dictionary)
## The server answered a request with an `error` (a rejected `say` ends here, not in
## `reply_finished`). `request_id` is "" when the error answers no request. A request
## still waiting for its answer when the connection drops ends here too, with code
## "disconnected".
signal error_received(request_id: String, code: String, message: String, details: Dictionary)
## Answer to `list_npcs()` (also refreshed on every connect).
signal npcs_listed(npcs: Array)
## Answer to `send_event()`: the ids of the stored memories.
signal event_stored(request_id: String, memory_ids: Array)
## Answer to `list_memories()`.
signal memories_listed(request_id: String, items: Array)
## Answer to `set_state()` and `get_state()`: trust (with an NPC), flags, unlocked entries.
signal state_received(request_id: String, state: Dictionary)
## The NPC acts in the game after its line: `action` is {"name": ..., "args": {...}}, always
## one the persona or world declares, with valid arguments (also in reply["game_action"]).
signal game_action(request_id: String, npc_id: String, action: Dictionary)
## `npc.warm` finished: the NPCs whose first line will now come as fast as a warm turn.
signal warmed(request_id: String, npc_ids: Array, ms: int)
## `save.create` / `save.load` / `save.delete` done (`kind` says which); `answer` is the `ok`.
signal save_done(request_id: String, kind: String, answer: Dictionary)
## `save.list`: [{"save_id", "created_at", "memories"}, …], oldest first.
signal saves_listed(request_id: String, saves: Array)
## A line of a scene begins (`request_id`: the scene's, or the player's say it answers).
signal scene_line_started(scene_id: String, request_id: String, npc_id: String)
## More of that line, as it streams.
signal scene_line_delta(scene_id: String, request_id: String, seq: int, text: String)
## The line is complete (`reply` is its reply.end: text, reason, emotion…).
signal scene_line_finished(scene_id: String, request_id: String, npc_id: String, reply: Dictionary)
## The scene is over: `reason` max_turns, ended, cancelled or error; `turns` lines spoken.
signal scene_ended(scene_id: String, reason: String, turns: int)
## `world.tick` done: `spread` rumours were passed on.
signal rumours_spread(request_id: String, spread: int)

enum State { IDLE, CONNECTING, HANDSHAKE, READY, WAITING_TO_RETRY }

const UNAUTHORIZED_CLOSE_CODE := 4401
## Closed by this client after the server refused its hello for good.
const HELLO_REFUSED_CLOSE_CODE := 4000
## Hello errors that retrying cannot fix.
const FINAL_HELLO_ERRORS := ["unauthorized", "unsupported_protocol"]
const PROTOCOL := preload("res://addons/npc_engine/npc_protocol.gd")

@export var url := "ws://127.0.0.1:8765/"
## Needed when the server was started with --token (always off loopback).
@export var token := ""
@export var client_name := "godot-game/1.0"
## Connect as soon as the node enters the tree.
@export var auto_connect := true
@export var reconnect := true
@export var reconnect_base_seconds := 0.5
@export var reconnect_max_seconds := 15.0
## Requests kept while not connected; more are refused with error "busy".
@export var max_queued_requests := 64
## Send a protocol ping after this many quiet seconds so the server's idle timeout
## does not close a connection the game still wants. 0 disables.
@export var keepalive_seconds := 60.0
## Largest frame the client can receive. Godot's default (64 KiB) is smaller than a
## 100-item `memory.items` answer can be (up to ~300 KB) or an `inspect` prompt; 4 MiB
## covers both with room (the server's own limit for frames it reads is 1 MiB).
@export var inbound_buffer_bytes := 4 * 1024 * 1024

## The NPCs the server knows (id, name, role), from the last welcome or `list_npcs()`.
var npcs: Array = []
var state: State = State.IDLE

var _socket := WebSocketPeer.new()
var _next_id := 0
var _hello_id := ""
var _outbox: Array[Dictionary] = []
var _open_replies := {}  # request id -> npc id, for every say sent and not yet ended
var _open_requests := {}  # request id -> message type, for the other requests
var _line_speakers := {}  # request id -> npc id of the scene line streaming under it
var _attempt := 0
var _retry_at := 0.0
var _last_sent := 0.0


func _ready() -> void:
	if auto_connect:
		connect_to_server()


func _exit_tree() -> void:
	reconnect = false
	_socket.close(1000, "bye")


func _process(_delta: float) -> void:
	if state == State.IDLE:
		return
	if state == State.WAITING_TO_RETRY:
		if _now() >= _retry_at:
			_open()
		return
	_socket.poll()
	match _socket.get_ready_state():
		WebSocketPeer.STATE_OPEN:
			if state == State.CONNECTING:
				_say_hello()
			while _socket.get_available_packet_count() > 0:
				var packet := _socket.get_packet()
				if _socket.was_string_packet():
					_on_frame(packet.get_string_from_utf8())
			if state == State.READY and keepalive_seconds > 0:
				if _now() - _last_sent > keepalive_seconds:
					_send(PROTOCOL.ping(_new_id()))
		WebSocketPeer.STATE_CLOSED:
			_on_closed(_socket.get_close_code(), _socket.get_close_reason())


## Connect (or reconnect now) to `server_url`, or to `url` when empty.
func connect_to_server(server_url: String = "") -> void:
	if not server_url.is_empty():
		url = server_url
	_attempt = 0
	_open()


func disconnect_from_server() -> void:
	reconnect = false
	_socket.close(1000, "bye")


func is_ready() -> bool:
	return state == State.READY


## Ask `npc_id` something; returns the request id that the reply signals carry.
## `context` is free-form game state (location, time of day, quest flags).
## `game_time` (minutes since the game's epoch; < 0: not sent) drives memory recency,
## "how long ago" and the time of day in the prompt.
func say(
	npc_id: String,
	text: String,
	player_id: String = "",
	context: Dictionary = {},
	max_tokens := 0,
	game_time := -1.0
) -> String:
	var request_id := _new_id()
	_open_replies[request_id] = npc_id
	_send(PROTOCOL.say(request_id, npc_id, text, player_id, context, max_tokens, game_time))
	return request_id


## The player walks up to `npc_id`: at a first meeting the persona's greeting arrives at
## once; later the NPC greets from what it remembers. Same signals as `say`.
func greet(
	npc_id: String, player_id: String = "", context: Dictionary = {}, game_time := -1.0
) -> String:
	var request_id := _new_id()
	_open_replies[request_id] = npc_id
	_send(PROTOCOL.greet(request_id, npc_id, player_id, context, game_time))
	return request_id


## NPCs talk among themselves (2-6 ids), e.g. two guards as the player walks by; each
## line comes through `scene_line_started` / `_delta` / `_finished`, then `scene_ended`.
## Returns the scene request's id (`cancel()` it to end the scene at once).
func start_scene(
	scene_id: String,
	npc_ids: Array,
	player_id: String = "",
	topic: String = "",
	max_turns := 0,
	max_tokens := 0,
	game_time := -1.0
) -> String:
	var request_id := _new_id()
	_send(
		PROTOCOL.scene_start(
			request_id, scene_id, npc_ids, player_id, topic, max_turns, max_tokens, game_time
		)
	)
	return request_id


## The player speaks in a running scene they are in (`facing`: the NPC they talk to, who
## answers unless the line names another); the answer comes as this request's line.
func say_in_scene(
	scene_id: String, facing: String, text: String, player_id: String = "", game_time := -1.0
) -> String:
	var request_id := _new_id()
	_open_replies[request_id] = facing
	_send(PROTOCOL.say(request_id, facing, text, player_id, {}, 0, game_time, scene_id))
	return request_id


## Game time passed: rumours spread (answered by `rumours_spread`).
func world_tick(game_time := -1.0) -> String:
	return _ask(PROTOCOL.world_tick("", game_time))


## Prepare NPCs' prompts (at level load, for the NPCs nearby); answered by `warmed`.
func warm(npc_ids: Array) -> String:
	return _ask(PROTOCOL.npc_warm("", npc_ids))


## Save slots: every NPC's memories, conversations, trust and flags. Answered by
## `save_done` (or `error_received`, details.field "save_id" for an unknown slot).
func save_create(save_id: String) -> String:
	return _ask(PROTOCOL.save_create("", save_id))


## Restores the slot exactly; replies still running end first (reason "cancelled").
func save_load(save_id: String) -> String:
	return _ask(PROTOCOL.save_load("", save_id))


func save_delete(save_id: String) -> String:
	return _ask(PROTOCOL.save_delete("", save_id))


## Answered by `saves_listed`.
func save_list() -> String:
	return _ask(PROTOCOL.save_list(""))


## Sends a request built without an id, under a new one; its answer is routed by type.
func _ask(message: Dictionary) -> String:
	var request_id := _new_id()
	message["id"] = request_id
	_open_requests[request_id] = message["type"]
	_send(message)
	return request_id


## Stop a running or queued reply; it ends with `reply_finished`, reason "cancelled".
func cancel(request_id: String) -> void:
	_send(PROTOCOL.cancel(_new_id(), request_id))


## Tell NPCs what they saw or heard. `npc_ids` may be ["*"]; `player_id` "" means
## knowledge shared with every player. Answered by `event_stored`.
func send_event(npc_ids: Array, text: String, player_id: String = "", importance := 0) -> String:
	var request_id := _new_id()
	_open_requests[request_id] = "event"
	_send(PROTOCOL.event(request_id, npc_ids, text, player_id, importance))
	return request_id


## Answered by `npcs_listed`.
func list_npcs() -> String:
	var request_id := _new_id()
	_open_requests[request_id] = "npc.list"
	_send(PROTOCOL.npc_list(request_id))
	return request_id


## Newest first, or ranked by `query`; answered by `memories_listed`.
func list_memories(npc_id: String, player_id := "", query := "", limit := 10) -> String:
	var request_id := _new_id()
	_open_requests[request_id] = "memory.list"
	_send(PROTOCOL.memory_list(request_id, npc_id, player_id, query, limit))
	return request_id


## Set how `npc_id` regards the player (`trust` -100..100, or `trust_delta`) and the
## player's `flags` (quest stages, deeds; `null` deletes one). Answered by `state_received`.
func set_state(
	player_id: String,
	npc_id: String = "",
	trust: Variant = null,
	trust_delta: Variant = null,
	flags: Dictionary = {}
) -> String:
	var request_id := _new_id()
	_open_requests[request_id] = "state"
	_send(PROTOCOL.state_set(request_id, player_id, npc_id, trust, trust_delta, flags))
	return request_id


## The player's flags, and with `npc_id` that NPC's trust; answered by `state_received`.
func get_state(player_id: String, npc_id: String = "") -> String:
	var request_id := _new_id()
	_open_requests[request_id] = "state"
	_send(PROTOCOL.state_get(request_id, player_id, npc_id))
	return request_id


func _open() -> void:
	_socket = WebSocketPeer.new()
	_socket.inbound_buffer_size = inbound_buffer_bytes
	var failure := _socket.connect_to_url(url)
	if failure != OK:
		_on_closed(-1, "cannot connect to %s (error %d)" % [url, failure])
		return
	state = State.CONNECTING


func _say_hello() -> void:
	state = State.HANDSHAKE
	_hello_id = _new_id()
	_transmit(PROTOCOL.hello(_hello_id, client_name, token))


func _send(message: Dictionary) -> void:
	if state == State.READY:
		_transmit(message)
		return
	if _outbox.size() >= max_queued_requests:
		var request_id: String = message["id"]
		_open_replies.erase(request_id)
		_open_requests.erase(request_id)
		error_received.emit(request_id, "busy", "Not connected and the outbox is full.", {})
		return
	_outbox.append(message)
	if state == State.IDLE and auto_connect:
		connect_to_server()


func _transmit(message: Dictionary) -> void:
	_socket.send_text(PROTOCOL.encode(message))
	_last_sent = _now()


func _on_frame(frame: String) -> void:
	var message := PROTOCOL.decode(frame)
	if message.is_empty():
		push_warning("npc-engine: ignored a frame that is not a protocol message")
		return
	var request_id := PROTOCOL.answer_id(message)
	if PROTOCOL.is_reply_message(message):
		_on_reply_message(request_id, message)
		return
	match message["type"]:
		"welcome":
			_on_welcome(message)
		"error":
			_on_error(request_id, message)
		"npc.items":
			_open_requests.erase(request_id)
			npcs = message.get("npcs", [])
			npcs_listed.emit(npcs)
		"memory.items":
			_open_requests.erase(request_id)
			memories_listed.emit(request_id, message.get("items", []))
		"state":
			_open_requests.erase(request_id)
			state_received.emit(request_id, message)
		"save.items":
			_open_requests.erase(request_id)
			saves_listed.emit(request_id, message.get("saves", []))
		"scene.end":
			scene_ended.emit(
				str(message.get("scene_id", "")),
				str(message.get("reason", "")),
				int(message.get("turns", 0))
			)
		"ok":
			var asked: String = _open_requests.get(request_id, "")
			_open_requests.erase(request_id)
			if asked == "event":
				event_stored.emit(request_id, message.get("memory_ids", []))
			elif asked == "npc.warm":
				warmed.emit(request_id, message.get("warmed", []), int(message.get("ms", 0)))
			elif asked.begins_with("save."):
				save_done.emit(request_id, asked.trim_prefix("save."), message)
			elif asked == "world.tick":
				rumours_spread.emit(request_id, int(message.get("spread", 0)))


func _on_reply_message(request_id: String, message: Dictionary) -> void:
	var scene_id := str(message.get("scene_id", "")) if message.get("scene_id") != null else ""
	if not scene_id.is_empty():
		_on_scene_line(scene_id, request_id, message)
	match message["type"]:
		"reply.start":
			reply_started.emit(request_id, str(message.get("npc_id", "")))
		"reply.delta":
			reply_delta.emit(request_id, int(message.get("seq", 0)), str(message.get("text", "")))
		"reply.end":
			var npc_id: String = _open_replies.get(request_id, "")
			_open_replies.erase(request_id)
			reply_finished.emit(request_id, message)
			var action: Variant = message.get("game_action")
			if typeof(action) == TYPE_DICTIONARY:
				game_action.emit(request_id, npc_id, action)


func _on_scene_line(scene_id: String, request_id: String, message: Dictionary) -> void:
	match message["type"]:
		"reply.start":
			_line_speakers[request_id] = str(message.get("npc_id", ""))
			scene_line_started.emit(scene_id, request_id, _line_speakers[request_id])
		"reply.delta":
			var seq := int(message.get("seq", 0))
			scene_line_delta.emit(scene_id, request_id, seq, str(message.get("text", "")))
		"reply.end":
			var npc_id: String = _line_speakers.get(request_id, "")
			_line_speakers.erase(request_id)
			scene_line_finished.emit(scene_id, request_id, npc_id, message)


func _on_welcome(message: Dictionary) -> void:
	state = State.READY
	_attempt = 0
	npcs = message.get("npcs", [])
	connected.emit(message)
	npcs_listed.emit(npcs)
	var queued := _outbox
	_outbox = []
	for request in queued:
		_transmit(request)


func _on_error(request_id: String, message: Dictionary) -> void:
	var code := str(message.get("code", "internal"))
	if request_id == _hello_id and state == State.HANDSHAKE:
		# A refused hello must not leave the client half-connected: close, then retry
		# unless retrying cannot help (a wrong token, a protocol the server lacks).
		if code in FINAL_HELLO_ERRORS:
			reconnect = false
		_socket.close(HELLO_REFUSED_CLOSE_CODE, "hello refused: %s" % code)
	_open_replies.erase(request_id)
	_open_requests.erase(request_id)
	var details: Dictionary = message.get("details", {})
	error_received.emit(request_id, code, str(message.get("message", "")), details)


func _on_closed(code: int, reason: String) -> void:
	var was_open := state == State.READY or state == State.HANDSHAKE
	var unsent := {}
	for request in _outbox:
		unsent[request["id"]] = true
	for request_id: String in _open_replies.keys():
		if unsent.has(request_id):
			continue  # still queued: it goes out after the reconnect
		var cut_off := {
			"type": "reply.end",
			"re": request_id,
			"text": "",
			"reason": "error",
			"error": {"code": "disconnected", "message": "connection lost: %s" % reason},
		}
		reply_finished.emit(request_id, cut_off)
		_open_replies.erase(request_id)
	for request_id: String in _open_requests.keys():
		if not unsent.has(request_id):
			_open_requests.erase(request_id)
			var lost := "connection lost before the answer: %s" % reason
			error_received.emit(request_id, "disconnected", lost, {})
	if was_open or _attempt == 0:
		disconnected.emit(code, reason)
	if reconnect and code != UNAUTHORIZED_CLOSE_CODE:
		var jitter := randf()
		_retry_at = (
			_now()
			+ PROTOCOL.backoff_seconds(
				_attempt, reconnect_base_seconds, reconnect_max_seconds, jitter
			)
		)
		_attempt += 1
		state = State.WAITING_TO_RETRY
	else:
		state = State.IDLE


func _new_id() -> String:
	_next_id += 1
	return "g%d" % _next_id


func _now() -> float:
	return Time.get_ticks_msec() / 1000.0
