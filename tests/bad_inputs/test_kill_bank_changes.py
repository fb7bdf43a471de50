"""Every change of a bank killed between any two of its file operations leaves the bank as it
was or as the change made it, never in between; and the same command run again finishes it.

One process loads the libraries once, then forks a child per kill point: child N runs the
command (``dit_mem.cli.main``) and dies (``os._exit``: as SIGKILL, no cleanup runs) right before
its file operation number N on the bank folder's own entries (its parts, the journal,
``bank.json``, what a change stages beside them). The parent then opens the bank as a reader
would (a reader finishes a committed change a killed writer left), compares it with the bank
before the change and after it, and runs the command again. Latent files are each their own
change (written whole, one by one: ``test_bank_build.py::test_a_killed_build_resumes``), so an
eager build is covered by its lazy twin's change plus that.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from dit_mem.testing import TINY_GEOMETRY, build_tiny_wan, write_bank

RUNNER = textwrap.dedent(
    """
    import json, os, pathlib, shutil, sys
    import faiss, numpy, torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    import functools
    import dit_mem.models.base_model, dit_mem.retrieval.embedder, dit_mem.retrieval.index
    import dit_mem.retrieval.retriever
    from dit_mem.bank import MemoryBank
    from dit_mem.bank.journal import history
    from dit_mem.cli import main

    # the models load once (the children are forked from here): a command's file operations
    # are what is tested, and each run would load the same embedding model and VAE again
    embedder = functools.cache(dit_mem.retrieval.embedder.load_embedder)
    for module in (dit_mem.retrieval.embedder, dit_mem.retrieval.index, dit_mem.retrieval.retriever):
        module.load_embedder = embedder
    vae = functools.cache(dit_mem.models.base_model.load_vae)
    dit_mem.models.base_model.load_vae = vae

    plan = json.loads(pathlib.Path(sys.argv[1]).read_text())
    root = pathlib.Path(plan["root"])

    def state(bank):
        try:
            b = MemoryBank.from_pretrained(bank)  # finishes a committed change a writer left
        except FileNotFoundError:
            return None  # no bank (yet): an empty folder
        link = bank / "videos"
        return {
            "history": [r["op"] for r in history(bank)],
            "ids": b.ids.tolist(),
            "index": b.retriever.manifest["factory"],
            "videos": str(link.resolve()) if link.exists() else None,
            "tokens": len(b.tokens) if b.tokens is not None else None,
            "vae": (b.latents.manifest.get("vae_fingerprint") is not None) if b.latents else None,
        }

    def run(argv, bank, kill_at=None):
        argv = [a.replace("BANK", str(bank)) for a in argv]
        if kill_at is None:
            return main(argv)
        seen = [0]

        def patch(owner, name):
            original = getattr(owner, name)

            def wrapper(*args, **kwargs):
                paths = [pathlib.Path(a) for a in args[:2] if isinstance(a, (str, pathlib.Path))]
                mine = any(p.parent == bank for p in paths)  # the bank's own entries, changed
                noop = name in ("rmtree", "unlink") and not os.path.lexists(paths[0])
                noop |= name == "mkdir" and os.path.lexists(paths[0])
                if mine and not noop:
                    seen[0] += 1
                    if seen[0] == kill_at:
                        os._exit(137)
                return original(*args, **kwargs)

            setattr(owner, name, wrapper)

        for owner, name in [(os, "replace"), (os, "rename"), (os, "symlink"), (os, "unlink"),
                            (os, "mkdir"), (shutil, "rmtree")]:
            patch(owner, name)
        rc = main(argv)
        print("OPS", seen[0], file=sys.stderr, flush=True)
        os._exit(rc)

    report = {}
    for name, scenario in plan["scenarios"].items():
        start = root / f"{name}-start"
        start.mkdir()
        for argv in scenario["setup"]:
            if argv == ["strip-vae"]:  # a bank of an older dit-mem: no VAE fingerprint recorded
                m = json.loads((start / "latents/manifest.json").read_text())
                m.pop("vae_fingerprint")
                (start / "latents/manifest.json").write_text(json.dumps(m))
                continue
            assert run(argv, start) == 0, (name, argv)
        before = state(start)
        done = root / f"{name}-done"
        shutil.copytree(start, done, symlinks=True)
        assert run(scenario["change"], done) == 0, name
        after = state(done)
        results, kill_at = [], 1
        while kill_at <= 200:
            bank = root / f"{name}-{kill_at}"
            shutil.copytree(start, bank, symlinks=True)
            pid = os.fork()
            if pid == 0:
                run(scenario["change"], bank, kill_at)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            seen = state(bank)
            rerun = run(scenario["change"], bank)
            results.append({"kill_at": kill_at, "exit": code, "state": seen, "rerun": rerun,
                            "final": state(bank)})
            shutil.rmtree(bank)
            if code != 137:
                break
            kill_at += 1
        report[name] = {"before": before, "after": after, "results": results}
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-bank")
    csv = write_bank(root, videos=root / "videos")
    lines = csv.read_text().splitlines()
    first, more = root / "first.csv", root / "more.csv"
    first.write_text("\n".join(lines[:5]) + "\n")
    more.write_text("\n".join([lines[0], *lines[5:8]]) + "\n")
    import shutil

    shutil.copytree(root / "videos", root / "moved")  # the videos moved to another folder
    model = build_tiny_wan(root / "model")
    from dit_mem.memory import MemoryEncoder

    MemoryEncoder.from_preset("tiny").save_pretrained(root / "encoder")
    frames, height, width = TINY_GEOMETRY["wan"]
    size = ["--num-frames", str(frames), "--height", str(height), "--width", str(width)]
    build = ["bank", "build", "--videos", str(root / "videos"), "--base-model", str(model)]
    build += [*size, "--num-workers", "0", "--bank", "BANK"]
    lazy = [*build, "--csv", str(first), "--lazy"]
    eager = [*build, "--csv", str(first)]
    moved = [a if a != str(root / "videos") else str(root / "moved") for a in lazy]
    scenarios = {
        "build": {"setup": [], "change": lazy},
        "add": {"setup": [lazy], "change": [*build, "--csv", str(more), "--lazy", "--add"]},
        "reindex": {"setup": [lazy], "change": [*lazy, "--kind", "hnsw", "--reindex"]},
        "relink": {"setup": [lazy], "change": moved},
        "tokens": {
            "setup": [eager],
            "change": ["cache-tokens", "--bank", "BANK", "--encoder", str(root / "encoder")],
        },
        "record-vae": {
            "setup": [eager, ["strip-vae"]],
            "change": ["bank", "verify", "BANK", "--base-model", str(model)],
        },
    }
    path = root / "plan.json"
    path.write_text(json.dumps({"root": str(root), "scenarios": scenarios}))
    return root, path


def test_every_bank_change_killed_anywhere_leaves_before_or_after(plan):
    root, path = plan
    runner = root / "runner.py"
    runner.write_text(RUNNER)
    proc = subprocess.run(
        [sys.executable, str(runner), str(path)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, r in report.items():
        before, after = r["before"], r["after"]
        assert before != after, name  # the change changes something
        results = r["results"]
        killed = [x for x in results if x["exit"] == 137]
        assert results[-1]["exit"] == 0 and len(killed) >= 3, (name, results[-1])
        for x in results:
            assert x["state"] in (before, after), (name, x)  # never in between
            assert x["rerun"] == 0 and x["final"] == after, (name, x)  # the command finishes it
        sides = {json.dumps(x["state"], sort_keys=True) for x in killed}
        assert len(sides) == 2, (name, sides)  # kills land on both sides of the commit
        assert after["history"][: len(before["history"] if before else [])] == (
            before["history"] if before else []
        )  # history appended to, never rewritten
