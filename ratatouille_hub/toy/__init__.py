"""The embedded default world (generated tasks, a tiny base and community fine-tunes) and the demo over it."""
