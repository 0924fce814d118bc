"""training-daemon: a local GPU LoRA training daemon with a file-drop queue."""

__version__ = "0.1.0"
