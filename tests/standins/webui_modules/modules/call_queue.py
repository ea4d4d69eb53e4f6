"""modules/call_queue.py: the one lock every generation and model switch takes."""

from standins.a1111 import QueueLock

queue_lock = QueueLock()
