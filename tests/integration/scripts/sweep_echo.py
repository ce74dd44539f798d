"""A trivial training script for the sweep tests: reads ``--config``, writes ``result.json``.

Usage: sweep_echo.py --config RUN/sweep_config.yaml [anything else]

It records the config it read, its argv, and the SLURM array index (if any) in
``<output_dir>/result.json``, and exits 3 when the config says ``fail: true``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
args, _ = parser.parse_known_args()
config = yaml.safe_load(Path(args.config).read_text())
out = Path(config["output_dir"])
out.mkdir(parents=True, exist_ok=True)
(out / "result.json").write_text(json.dumps({
    "config": config, "argv": sys.argv[1:], "array_task": os.environ.get("SLURM_ARRAY_TASK_ID"),
}))
print(f"sweep_echo: lr={config.get('lr')}", flush=True)
sys.exit(3 if config.get("fail") else 0)
