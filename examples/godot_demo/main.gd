extends Node2D
## The demo: arrow keys walk, Enter walks up to the nearest NPC (it greets you) and opens
## the line to talk, Esc cuts a reply short, F5 saves and F9 loads the quick-save slot.
##
## The NPCs come from the server's welcome, so the demo shows whatever personas the
## engine loaded; at level load the demo warms them all (`npc.warm`). NPCs act through
## declared game actions: when Mara gives you something (`give_item`), it lands in your
## pockets (shown at the top). The game clock runs a game minute per real second and goes
## with every line (`game_time`), so NPCs know the time of day and how long ago things were.
## Walk past the first two NPCs and they talk to each other (a scene); every game hour the
## demo sends `world.tick`, so what you told one of them reaches the people they talk to.
## Start the engine first: `tools/dev.sh serve` in the npc-engine repo.

const PLAYER_SPEED := 220.0
const TALK_DISTANCE := 90.0
const PLAYER_ID := "demo-player"
const QUICK_SAVE := "quicksave"
const GAME_MINUTES_PER_SECOND := 1.0
const OVERHEAR_DISTANCE := 160.0
const SCENE_ID := "demo-square"
const COLOURS: Array[Color] = [
	Color.CORNFLOWER_BLUE, Color.INDIAN_RED, Color.SEA_GREEN, Color.GOLDENROD, Color.ORCHID
]

var _player := Node2D.new()
var _markers := {}  # npc id -> NpcMarker
var _status := Label.new()
var _input := LineEdit.new()
var _talking_to: NpcMarker = null
var _reply_id := ""
var _game_minutes := 18.0 * 60.0  # evening of day 1
var _pockets: Array[String] = []
var _scene_request := ""  # the running scene's request id ("" when none runs)
var _scene_speaker := ""  # who is saying the scene line streaming now
var _overheard := false  # the pair talked as the player passed; once per approach
var _last_tick_hour := -1


func _ready() -> void:
	_player.position = Vector2(512, 480)
	_player.draw.connect(func() -> void: _player.draw_circle(Vector2.ZERO, 14, Color.WHITE))
	add_child(_player)
	_status.position = Vector2(16, 12)
	add_child(_status)
	_input.position = Vector2(262, 548)
	_input.size = Vector2(500, 32)
	_input.placeholder_text = "Say something and press Enter (Esc to leave)"
	_input.visible = false
	_input.text_submitted.connect(_on_line_submitted)
	add_child(_input)

	NpcEngine.connected.connect(_on_connected)
	NpcEngine.disconnected.connect(_on_disconnected)
	NpcEngine.reply_started.connect(_on_reply_started)
	NpcEngine.reply_delta.connect(_on_reply_delta)
	NpcEngine.reply_finished.connect(_on_reply_finished)
	NpcEngine.error_received.connect(_on_error_received)
	NpcEngine.game_action.connect(_on_game_action)
	NpcEngine.save_done.connect(_on_save_done)
	NpcEngine.scene_line_started.connect(_on_scene_line_started)
	NpcEngine.scene_line_delta.connect(_on_scene_line_delta)
	NpcEngine.scene_line_finished.connect(_on_scene_line_finished)
	NpcEngine.scene_ended.connect(_on_scene_ended)
	_status.text = "Connecting to %s …" % NpcEngine.url


func _process(delta: float) -> void:
	_game_minutes += delta * GAME_MINUTES_PER_SECOND
	if not _input.visible:
		var direction := Input.get_vector("ui_left", "ui_right", "ui_up", "ui_down")
		_player.position += direction * PLAYER_SPEED * delta
	var nearest := _nearest_marker()
	if nearest != null and not _input.visible:
		_status.text = "Press Enter to talk to %s" % nearest.display_name
	_overhear_the_first_two()
	var hour := int(_game_minutes / 60.0)
	if NpcEngine.is_ready() and hour != _last_tick_hour:
		_last_tick_hour = hour
		NpcEngine.world_tick(_game_minutes)  # gossip spreads once a game hour


## The player walks past the first two NPCs: they talk to each other about the evening.
func _overhear_the_first_two() -> void:
	var ids := _markers.keys()
	if ids.size() < 2 or not NpcEngine.is_ready():
		return
	var pair: Array = [ids[0], ids[1]]
	var middle: Vector2 = (_markers[pair[0]].position + _markers[pair[1]].position) / 2.0
	var near := middle.distance_to(_player.position) < OVERHEAR_DISTANCE
	if near and not _overheard and _scene_request.is_empty():
		_overheard = true
		_scene_request = NpcEngine.start_scene(
			SCENE_ID, pair, "", "the evening's news", 4, 48, _game_minutes
		)
	elif not near:
		_overheard = false


func _on_scene_line_started(_scene_id: String, _request_id: String, npc_id: String) -> void:
	_scene_speaker = npc_id
	if _markers.has(npc_id):
		_markers[npc_id].show_thinking()


func _on_scene_line_delta(_scene_id: String, _request_id: String, _seq: int, text: String) -> void:
	if _markers.has(_scene_speaker):
		_markers[_scene_speaker].append_reply(text)


func _on_scene_line_finished(
	_scene_id: String, _request_id: String, npc_id: String, reply: Dictionary
) -> void:
	if _markers.has(npc_id):
		_markers[npc_id].finish_reply(reply)


func _on_scene_ended(_scene_id: String, _reason: String, _turns: int) -> void:
	_scene_request = ""


func _unhandled_input(event: InputEvent) -> void:
	if event.is_action_pressed("ui_accept") and not _input.visible:
		_talking_to = _nearest_marker()
		if _talking_to != null:
			_input.visible = true
			_input.grab_focus()
			_reply_id = NpcEngine.greet(_talking_to.npc_id, PLAYER_ID, {}, _game_minutes)
	elif event.is_action_pressed("ui_cancel"):
		if not _reply_id.is_empty():
			NpcEngine.cancel(_reply_id)
		_input.visible = false
	elif event is InputEventKey and event.pressed and event.keycode == KEY_F5:
		NpcEngine.save_create(QUICK_SAVE)
	elif event is InputEventKey and event.pressed and event.keycode == KEY_F9:
		NpcEngine.save_load(QUICK_SAVE)


func _on_connected(welcome: Dictionary) -> void:
	_status.text = "Connected to %s" % welcome.get("server", "npc-engine")
	for marker: NpcMarker in _markers.values():
		marker.queue_free()
	_markers.clear()
	var npcs: Array = welcome.get("npcs", [])
	for index in npcs.size():
		var npc: Dictionary = npcs[index]
		var marker := NpcMarker.new()
		marker.npc_id = npc["id"]
		marker.display_name = npc.get("name", npc["id"])
		marker.colour = COLOURS[index % COLOURS.size()]
		marker.position = Vector2(160 + index * 720.0 / maxi(1, npcs.size() - 1), 250)
		add_child(marker)
		_markers[marker.npc_id] = marker
	NpcEngine.warm(["*"])  # level load: every NPC's first line comes as fast as a warm turn


func _on_disconnected(_code: int, reason: String) -> void:
	_status.text = "Engine not reachable (%s); retrying …" % reason


func _on_line_submitted(text: String) -> void:
	if _talking_to == null or text.strip_edges().is_empty():
		return
	_input.clear()
	var context := {"location": "the demo square", "time_of_day": "evening"}
	_reply_id = NpcEngine.say(_talking_to.npc_id, text, PLAYER_ID, context, 0, _game_minutes)


func _on_reply_started(request_id: String, npc_id: String) -> void:
	if request_id == _reply_id and _markers.has(npc_id):
		_markers[npc_id].show_thinking()


func _on_reply_delta(request_id: String, _seq: int, text: String) -> void:
	if request_id == _reply_id and _talking_to != null:
		_talking_to.append_reply(text)


func _on_reply_finished(request_id: String, reply: Dictionary) -> void:
	if request_id == _reply_id and _talking_to != null:
		_talking_to.finish_reply(reply)
		_reply_id = ""


## Mara hands over a key (or an ale, stew, a map): the engine only ever sends actions the
## persona declares, with arguments from the declared list, so the game can trust them.
func _on_game_action(_request_id: String, npc_id: String, action: Dictionary) -> void:
	var args: Dictionary = action.get("args", {})
	if action.get("name") == "give_item":
		_pockets.append(str(args.get("item", "")))
		_status.text = (
			"%s gives you: %s · pockets: %s"
			% [
				_markers[npc_id].display_name if _markers.has(npc_id) else npc_id,
				args.get("item", "?"),
				", ".join(_pockets)
			]
		)
	else:
		_status.text = "%s: %s %s" % [npc_id, action.get("name"), args]


func _on_save_done(_request_id: String, kind: String, _answer: Dictionary) -> void:
	_status.text = "Quick-saved." if kind == "create" else "Quick-save loaded."


func _on_error_received(
	_request_id: String, code: String, message: String, _details: Dictionary
) -> void:
	_status.text = "npc-engine error %s: %s" % [code, message]


func _nearest_marker() -> NpcMarker:
	var best: NpcMarker = null
	for marker: NpcMarker in _markers.values():
		var distance := marker.position.distance_to(_player.position)
		if (
			distance < TALK_DISTANCE
			and (best == null or distance < best.position.distance_to(_player.position))
		):
			best = marker
	return best
