"""Two CPU processes (accelerate, gloo) train the tiny synthetic set; both must end identical.

    python benchmarks/train_two_processes.py [--steps 6] [--keep DIR]

Launches ``scripts/train_dit_mem.sh`` with ``NUM_PROCESSES=2`` on a config written from
``dit_mem.testing``, then checks ``rank_agreement.json`` (every process's parameter
fingerprint, gathered at the end of training) and that the run's final encoder equals its last
checkpoint. Prints the wall time. Too slow for the test suite (two interpreters start up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(args: argparse.Namespace) -> int:
    from dit_mem.config import save_config
    from dit_mem.memory import MemoryEncoder
    from dit_mem.testing import make_synthetic_run
    from dit_mem.training import latest_checkpoint

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="dit-mem-2proc-"))
    cfg = make_synthetic_run(
        root,
        num_train=8,
        overrides=[
            f"max_steps={args.steps}",
            "checkpoint_every=2",
            "gradient_accumulation_steps=2",
        ],
    )
    config = root / "train.yaml"
    save_config(cfg, config)
    env = {**os.environ, "NUM_PROCESSES": "2", "CONFIG": str(config), "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run(
        [str(REPO / "scripts" / "train_dit_mem.sh")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    wall = time.time() - t0
    print(proc.stdout[-2000:])
    if proc.returncode != 0:
        print(proc.stderr[-6000:], file=sys.stderr)
        return proc.returncode
    run = Path(cfg.output_dir)
    agreement = json.loads((run / "rank_agreement.json").read_text())
    last = latest_checkpoint(run)
    final = MemoryEncoder.from_pretrained(str(run / "encoder")).state_dict()
    saved = MemoryEncoder.from_pretrained(str(last.encoder_dir)).state_dict()
    same = all(torch.equal(final[k], saved[k]) for k in final)
    print(
        json.dumps(
            {
                "processes": agreement["num_processes"],
                "identical": agreement["identical"],
                "fingerprints": agreement["fingerprints"],
                "steps": last.step,
                "final_equals_last_checkpoint": same,
                "wall_s": round(wall, 1),
                "run": str(run),
            },
            indent=2,
        )
    )
    ok = agreement["num_processes"] == 2 and agreement["identical"] and same
    return 0 if ok else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--keep", help="folder for the run (default: a new temporary folder)")
    sys.exit(main(p.parse_args()))
