"""Privacy of what crosses the cut: client-side defences and the attacks a curious server can run."""
