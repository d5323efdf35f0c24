class_name NpcMarker
extends Node2D
## One NPC in the demo: a coloured disc, its name, and a speech bubble.

const RADIUS := 22.0
const BUBBLE_WIDTH := 260.0

var npc_id := ""
var display_name := ""
var colour := Color.CORNFLOWER_BLUE

var _name_label := Label.new()
var _bubble := Label.new()


func _ready() -> void:
	_name_label.text = display_name
	_name_label.position = Vector2(-60, RADIUS + 4)
	_name_label.size = Vector2(120, 20)
	_name_label.horizontal_alignment = HORIZONTAL_ALIGNMENT_CENTER
	add_child(_name_label)
	_bubble.autowrap_mode = TextServer.AUTOWRAP_WORD_SMART
	_bubble.custom_minimum_size = Vector2(BUBBLE_WIDTH, 0)
	_bubble.position = Vector2(-BUBBLE_WIDTH / 2.0, -RADIUS - 90)
	_bubble.add_theme_color_override("font_color", Color.BLACK)
	var panel := StyleBoxFlat.new()
	panel.bg_color = Color(1, 1, 0.92)
	panel.set_corner_radius_all(8)
	panel.set_content_margin_all(6)
	_bubble.add_theme_stylebox_override("normal", panel)
	_bubble.visible = false
	add_child(_bubble)


func _draw() -> void:
	draw_circle(Vector2.ZERO, RADIUS, colour)


func show_thinking() -> void:
	_bubble.text = "…"
	_bubble.visible = true


func append_reply(text: String) -> void:
	if _bubble.text == "…":
		_bubble.text = ""
	_bubble.text += text


func finish_reply(reply: Dictionary) -> void:
	var text: String = reply.get("text", "")
	if reply.get("reason", "") == "cancelled":
		_bubble.text = text + " —"
	elif text.is_empty():
		_bubble.text = "(says nothing)"


func hide_bubble() -> void:
	_bubble.visible = false
