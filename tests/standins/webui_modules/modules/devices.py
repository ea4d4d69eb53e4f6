"""modules/devices.py: the device the WebUI runs on (--use-cpu all)."""

import torch

device = torch.device("cpu")
