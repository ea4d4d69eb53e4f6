"""LoRA training for Stable Diffusion, inside the WebUI or on its own.

Importing this package does nothing heavy: no torch, no model scans, no logging set-up.
"""

__version__ = "0.1.0"
