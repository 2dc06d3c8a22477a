#!/usr/bin/env python
"""Render every recipe in recipes/ to olive_configs/<name>.json, or --check that none drifted.

The rendered configs are the portable form: the model by its hub id and the data by its hub
dataset id and file name; `slmops finetune` writes the run's exact config (local paths, data
hashes) into its output folder.

    python scripts/render_olive_configs.py           # write olive_configs/
    python scripts/render_olive_configs.py --check   # exit 1 and name each drifted file
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slmops.training.olive_config import drifted_configs, write_golden_configs

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    recipes, configs = REPO / "recipes", REPO / "olive_configs"
    if args.check:
        drifted = drifted_configs(recipes, configs)
        for name in drifted:
            print(f"drifted: olive_configs/{name}.json (run: python scripts/render_olive_configs.py)")
        return 1 if drifted else 0
    for path in write_golden_configs(recipes, configs):
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
