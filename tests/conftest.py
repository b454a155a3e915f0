"""Test-wide settings."""

import os

import torch

# One intra-op thread: the suite's models are tiny, and on a 2-core machine shared with other
# processes, torch's default thread pool oversubscribes and runs several times slower.
torch.set_num_threads(int(os.environ.get("DEEPSHRINK_TEST_THREADS", "1")))
os.environ.setdefault("DEEPSHRINK_NO_PROGRESS", "1")
os.environ.setdefault("DEEPSHRINK_THREADS", os.environ.get("DEEPSHRINK_TEST_THREADS", "1"))  # CLI default
