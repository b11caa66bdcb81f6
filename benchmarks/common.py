"""What every benchmark script shares: the checkout on ``sys.path``, offline settings and paths.

Imported first by each ``benchmarks/bench_*.py`` (run as scripts, so this folder is on the path).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks" / "out"
REAL_MIX = ROOT.parent / "shared" / "data" / "real_mix.jsonl.gz"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Offline, like the tests: no hub lookups, a local Ray without auth, no tokenizer thread pools
# competing with the measured work.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
