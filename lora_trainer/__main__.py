"""``python -m lora_trainer``: run the command, then leave at once.

After a training run, Python's own teardown (freeing gigabytes of tensors one by one, torch's static destructors)
takes about a second and does nothing for the user: by then every file is written, renamed and closed. So the
process flushes its log and streams and exits without it. An unexpected error still ends the normal way, with its
traceback.
"""

import logging
import os
import sys

from .cli import main

code = main()
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code if isinstance(code, int) else 1)
