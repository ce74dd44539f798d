"""recipes/pretrain.py, paused at the first atomic cache write (tokenizer or packed corpus).

Usage: pretrain_paused.py READY_FILE -- RECIPE ARGS...

``os.replace`` is wrapped: the first rename into ``$ACCELTRAIN_CACHE`` (the moment a cache
file is complete under its temporary name, before it gets its final name) writes READY_FILE
with the final path and then waits there (60 s at most) for the test's signal. The recipe's
data code is not touched, so this keeps working however the packing is written, as long as
its cache writes are atomic renames.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

ready, recipe_args = Path(sys.argv[1]), sys.argv[3:]
cache = os.path.realpath(os.environ["ACCELTRAIN_CACHE"])
real_replace = os.replace


def paused_replace(src, dst, *args, **kwargs):
    if not ready.exists() and os.path.realpath(dst).startswith(cache + os.sep):
        ready.write_text(os.path.realpath(dst))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.01)
        raise RuntimeError("no signal came")
    return real_replace(src, dst, *args, **kwargs)


os.replace = paused_replace
recipe = Path(__file__).resolve().parents[3] / "recipes" / "pretrain.py"
sys.argv = [str(recipe), *recipe_args]
runpy.run_path(str(recipe), run_name="__main__")
