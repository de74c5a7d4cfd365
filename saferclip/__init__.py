__version__ = "0.1.0"

# `import saferclip` registers the embedded world's open_clip architecture (saferclip-tiny).
from .core import register_tiny_arch as _register_tiny_arch

_register_tiny_arch()
