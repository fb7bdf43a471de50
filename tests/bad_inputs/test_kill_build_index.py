"""``build-index --overwrite`` killed between any two of its file operations leaves the old index
or the new one, whole: the Retriever loads it and its checksums hold."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# One process loads the libraries and the embedding model once, then forks a child per kill
# point: child N rebuilds the index and dies (os._exit, as SIGKILL: no cleanup runs) right
# before its file operation number N; the parent then opens the index as a reader would.
RUNNER = textwrap.dedent(
    """
    import json, os, pathlib, shutil, sys
    import faiss, numpy, torch

    import dit_mem.utils.io as io
    from dit_mem.retrieval import Retriever, build_index, load_embedder

    torch.set_num_threads(1)
    old_csv, new_csv, idx = (pathlib.Path(p) for p in sys.argv[1:4])
    embedder = load_embedder()
    build_index(old_csv, idx, embedder=embedder)

    def rebuild_and_die_at(kill_at):
        seen = [0]

        def patch(owner, name):
            original = getattr(owner, name)

            def wrapper(*args, **kwargs):
                seen[0] += 1
                if seen[0] == kill_at:
                    os._exit(137)
                return original(*args, **kwargs)

            setattr(owner, name, wrapper)

        for owner, name in [
            (os, "replace"), (os, "rename"), (os, "link"), (shutil, "rmtree"),
            (io, "_exchange"), (pathlib.Path, "rename"), (pathlib.Path, "mkdir"),
            (pathlib.Path, "write_text"), (faiss, "write_index"), (numpy, "save"),
        ]:
            patch(owner, name)
        build_index(new_csv, idx, overwrite=True, embedder=embedder)
        print("OPS", seen[0], flush=True)
        os._exit(0)

    results, kill_at = [], 1
    while True:
        pid = os.fork()
        if pid == 0:
            rebuild_and_die_at(kill_at)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        try:
            ids = Retriever(idx, model=embedder).ids.tolist()
        except Exception as e:  # reported to the test, which fails on it
            ids = f"{type(e).__name__}: {e}"
        results.append({"kill_at": kill_at, "exit": code, "ids": ids})
        if code == 0 or kill_at > 200:
            break
        kill_at += 1
    leftovers = sorted(p.name for p in idx.parent.iterdir() if p.name.startswith(".tmp-"))
    build_index(old_csv, idx, overwrite=True, embedder=embedder)
    cleaned = not [p for p in idx.parent.iterdir() if p.name.startswith(".tmp-")]
    final = Retriever(idx, model=embedder).ids.tolist()
    print(json.dumps({"results": results, "leftovers": leftovers, "cleaned": cleaned, "final": final}))
    """
)


def test_overwrite_killed_at_every_step_leaves_old_or_new(tmp_path):
    old_csv, new_csv = tmp_path / "old.csv", tmp_path / "new.csv"
    old_csv.write_text("video,caption\na.mp4,a red fox\nb.mp4,a blue car\n")
    new_csv.write_text("video,caption\nc.mp4,a green tree\nd.mp4,a white cat\ne.mp4,rain\n")
    (tmp_path / "runner.py").write_text(RUNNER)
    argv = [sys.executable, str(tmp_path / "runner.py"), old_csv, new_csv, tmp_path / "index"]
    proc = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    results = report["results"]
    old, new = ["a", "b"], ["c", "d", "e"]
    for r in results:  # after every kill: the old index or the new one, whole and verified
        assert r["ids"] in (old, new), r
    killed = [r for r in results if r["exit"] == 137]
    assert results[-1]["exit"] == 0 and len(killed) == len(results) - 1 >= 5
    assert {tuple(r["ids"]) for r in killed} == {tuple(old), tuple(new)}  # both sides happen
    assert results[-1]["ids"] == new
    assert report["cleaned"] and report["final"] == old  # the next build clears kill leftovers
