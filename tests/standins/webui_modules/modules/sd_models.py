"""modules/sd_models.py: model_data holds the loaded model (None until first use)."""

import types

model_data = types.SimpleNamespace(sd_model=None)
