"""Client agent: what a data owner runs next to its data (front and back blocks, local loss)."""
