"""`npc-engine playtest`: the terminal UI and the golden-conversation script mode."""
