"""Caption index + Retriever with the real all-MiniLM-L6-v2 model and real FAISS."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dit_mem.cli import main
from dit_mem.data import read_video_table, source_id
from dit_mem.retrieval import Retriever, build_index, load_embedder

# (id, caption): pairs of related captions; clips of one source share a YouTube id.
BANK = [
    ("fox-_snow_1_1_0to120", "A red fox runs through fresh snow in a pine forest."),
    ("fox-_snow_1_2_120to300", "A red fox jumps into deep snow, hunting in the woods."),
    ("kitchenAAAA_1_0to90", "A chef slices vegetables on a wooden cutting board."),
    ("kitchenBBBB_4_10to99", "A cook chops onions and carrots with a large knife."),
    ("surf_wave01_1_0to60", "A surfer rides a big ocean wave at sunset."),
    ("surf_wave02_2_5to70", "A person surfing a huge wave in the sea at dusk."),
    ("citynight01_1_0to80", "Cars drive through a busy city street at night with neon lights."),
    ("citynight02_1_0to80", "Traffic moves along an illuminated downtown avenue after dark."),
    ("piano_play1_1_0to50", "Close-up of hands playing a grand piano."),
    ("piano_play2_3_0to50", "A pianist's fingers press the keys of a piano."),
    ("fox-_snow_1_3_300to400", "Snow falls quietly on an empty forest clearing."),
]


def write_csv(path: Path, rows, extra: str = "") -> Path:
    lines = ["video,caption,aesthetic score"] + [f'{v}.mp4,"{c}",5.0' for v, c in rows]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@pytest.fixture(scope="module")
def embedder():
    return load_embedder()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, embedder) -> Path:
    root = tmp_path_factory.mktemp("idx")
    csv = write_csv(root / "bank.csv", BANK, extra='empty_1_0to5.mp4,"",3.0\n')
    build_index(csv, root / "index", embedder=embedder)
    return root / "index"


def test_source_ids() -> None:
    assert source_id("fox-_snow_1_2_120to300") == "fox-_snow_1"
    assert source_id("---_iRTHryQ_13_0to241") == "---_iRTHryQ"
    assert source_id("not_an_openvid_name") == "not_an_openvid_name"


def test_manifest_and_id_map(index_dir: Path) -> None:
    m = json.loads((index_dir / "manifest.json").read_text())
    assert m["model"] == "all-MiniLM-L6-v2" and m["dim"] == 384 and m["pooling"] == "mean"
    assert m["rows"] == len(BANK) and m["dropped_empty_captions"] == 1 and m["kind"] == "flat"
    assert len(m["csv_sha256"]) == 64
    assert m["format"] == "dit-mem-index/3" and set(m["sha256"]) == {
        "index.faiss",
        "ids.arrow",
        "ids.lookup.npy",
        "sources.lookup.npy",
    }
    ids = Retriever(index_dir).table
    assert ids["id"].tolist() == [v for v, _ in BANK]
    assert {"caption", "source", "aesthetic score"} <= set(ids.columns)


def test_semantic_neighbours(index_dir: Path, embedder) -> None:
    r = Retriever(index_dir, model=embedder)
    # Every caption's nearest other caption is its pair.
    results = r.retrieve([c for _, c in BANK[:10]], k=2)
    for i, res in enumerate(results):
        assert res.ids[0] == BANK[i][0] and res.scores[0] == pytest.approx(1.0, abs=1e-4)
        assert res.ids[1] == BANK[i ^ 1][0], (BANK[i], res)
    [hit] = r.retrieve(["someone playing the piano"], k=3)
    assert set(hit.ids[:2]) == {"piano_play1_1_0to50", "piano_play2_3_0to50"}
    assert hit.scores == sorted(hit.scores, reverse=True) and len(hit.captions) == 3


def test_same_source_exclusion(index_dir: Path, embedder) -> None:
    r = Retriever(index_dir, model=embedder)
    fox = "a fox in the snow"
    [plain] = r.retrieve([fox], k=3)
    assert all(source_id(v) == "fox-_snow_1" for v in plain.ids)
    # A training clip from the same source (not in the bank) removes all three fox clips,
    # and k results still come back.
    excl, none = r.retrieve([fox, fox], k=3, exclude=["fox-_snow_1_9_900to990", None])
    assert len(excl) == 3 and not any(source_id(v) == "fox-_snow_1" for v in excl.ids)
    assert none.ids == plain.ids
    [multi] = r.retrieve([fox], k=11, exclude=[["kitchenAAAA_1_0to90", "surf_wave01_1_0to60"]])
    assert len(multi) == 9 and "kitchenAAAA_1_0to90" not in multi.ids
    with pytest.raises(ValueError, match="one entry .* per prompt: got 1 for 2 prompts"):
        r.retrieve([fox, fox], k=3, exclude=["fox-_snow_1_1_0to120"])
    with pytest.raises(ValueError, match="k must be an integer ≥ 1"):
        r.retrieve([fox], k=0)
    # an exclusion given as the CSV's file name works like the id
    [by_file] = r.retrieve([fox], k=3, exclude=["fox-_snow_1_9_900to990.mp4"])
    assert by_file.ids == excl.ids


def test_approximate_indexes(tmp_path: Path, embedder) -> None:
    csv = write_csv(tmp_path / "bank.csv", BANK)
    for kind in ("ivf", "hnsw"):
        m = build_index(csv, tmp_path / kind, kind=kind, embedder=embedder)
        # 11 captions: IVF has one list (searched whole), HNSW32 links every node: exact
        assert m["kind"] == kind and m["recall_at_5"] == 1.0
        [hit] = Retriever(tmp_path / kind, model=embedder).retrieve(["hands on piano keys"], k=2)
        assert hit.ids[0].startswith("piano_play")


def test_recall_counts_the_exact_top_k_an_index_returns() -> None:
    """recall@k against a hand count: an index holding only the even rows finds exactly the
    even members of each query's exact top 5."""
    import faiss

    from dit_mem.retrieval.index import recall_at_k

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((200, 16)).astype(np.float32)
    queries = vectors[:40] + 0.1 * rng.standard_normal((40, 16)).astype(np.float32)
    index = faiss.IndexIDMap(faiss.IndexFlatIP(16))
    even = np.arange(0, 200, 2)
    index.add_with_ids(vectors[even], even.astype(np.int64))
    top5 = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :5]
    want = float((top5 % 2 == 0).mean())
    assert 0.2 < want < 0.8 and recall_at_k(index, vectors, queries, k=5) == pytest.approx(want)


def test_cls_pooling_model_folder(tmp_path: Path) -> None:
    """A local sentence-transformers folder with CLS pooling (as gte-base-en-v1.5 uses)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    base = load_embedder().path
    folder = tmp_path / "minilm-cls"
    st = SentenceTransformer(
        modules=[Transformer(base), Pooling(384, pooling_mode="cls"), Normalize()]
    )
    st.save(str(folder))
    csv = write_csv(tmp_path / "bank.csv", BANK[:4])
    m = build_index(csv, tmp_path / "index", model=str(folder))
    assert m["pooling"] == "cls" and m["model"] == "minilm-cls" and m["dim"] == 384
    r = Retriever(tmp_path / "index")  # model reloaded from the manifest's folder
    assert r.embedder.pooling == "cls" and len(r.retrieve(["a fox"], k=2)[0]) == 2
    # A folder whose config points at code on the Hub fails clearly (offline).
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "Alibaba-NLP/new-impl--configuration.NewConfig"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="only runs when you ask for it by name"):
        load_embedder(folder)  # a file in the folder never turns remote code on by itself
    with pytest.raises(ValueError, match="points at another Hub repository.*configuration.py"):
        load_embedder(folder, trust_remote_code="minilm-cls")


def test_model_and_row_mismatch(index_dir: Path, tmp_path: Path, embedder) -> None:
    import shutil

    with pytest.raises(
        ValueError, match="built with embedding model 'all-MiniLM-L6-v2', not 'gte-base-en-v1.5'"
    ):
        Retriever(index_dir, model=str(tmp_path / "gte-base-en-v1.5"))
    bad = tmp_path / "bad"
    shutil.copytree(index_dir, bad)
    m = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**m, "dim": 768, "rows": len(BANK)}))
    with pytest.raises(
        ValueError, match="index.faiss: vectors are 384-d but manifest.json says 768-d"
    ):
        Retriever(bad, model=embedder)
    from dit_mem.data.idmap import FILES, IdMap
    from dit_mem.data.table import file_sha256

    IdMap.write(bad, Retriever(index_dir).table.iloc[:-1])
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"ids.arrow does not match the checksum"):
        Retriever(bad, model=embedder)
    m["sha256"] |= {n: file_sha256(bad / n) for n in FILES}  # consistent, but one row short
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        ValueError, match=r"row mismatch: index.faiss has 11 vectors, ids.arrow has 10 rows"
    ):
        Retriever(bad, model=embedder)


def test_bad_csvs_and_overwrite(tmp_path: Path, index_dir: Path, embedder, capsys) -> None:
    cases = {
        "nocap.csv": ("video,text\na.mp4,x\n", r"nocap.csv: missing required column\(s\) caption"),
        "novid.csv": (
            "name,caption\na.mp4,x\n",
            r"novid.csv: missing required column\(s\) video \(or video_path\)",
        ),
        "empty.csv": ("", "empty.csv: the CSV is empty"),
        "header.csv": ("video,caption\n", "header.csv: the CSV has a header but no rows"),
        "blank.csv": ("video,caption\na.mp4,\nb.mp4,  \n", "blank.csv: no usable rows"),
        "dup.csv": ("video,caption\nx/a.mp4,one\ny/a.mp4,two\n", "dup.csv: 1 duplicate video id"),
    }
    for name, (text, msg) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=msg):
            build_index(tmp_path / name, tmp_path / "out", embedder=embedder)
    assert not (tmp_path / "out").exists()
    # video_path is accepted as the file column.
    (tmp_path / "vp.csv").write_text("video_path,caption\n/data/v/abc_1_0to5.mp4,hello\n")
    assert read_video_table(tmp_path / "vp.csv")["id"].tolist() == ["abc_1_0to5"]
    # An existing index is kept unless --overwrite.
    before = {p.name: p.read_bytes() for p in index_dir.iterdir()}
    csv = write_csv(tmp_path / "bank.csv", BANK[:2])
    assert main(["build-index", "--csv", str(csv), "--out", str(index_dir)]) == 2
    assert "already holds an index" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in index_dir.iterdir()} == before


def test_cli_retrieve_table(index_dir: Path, capsys) -> None:
    assert main(["retrieve", "a surfer on a wave", "-k", "2", "--index", str(index_dir)]) == 0
    out = capsys.readouterr().out
    assert "rank   score  id" in out and "surf_wave0" in out


def test_pq_and_factory_indexes_record_their_search_settings(tmp_path: Path, embedder) -> None:
    """Trained kinds are trained on a sample, filled in chunks, and their search settings are
    recorded and settable at load; recall@5 against exact search on clustered vectors."""
    import numpy as np
    import pandas as pd

    from dit_mem.data.idmap import IdMap
    from dit_mem.retrieval import index as idx

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((64, 32)).astype(np.float32)
    x = centres[rng.integers(0, 64, 6000)] + 0.3 * rng.standard_normal((6000, 32), np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    table = pd.DataFrame({"id": [f"v{i}" for i in range(6000)], "caption": "c"})
    queries = idx.sample_queries(x, 200)
    _, truth = idx.exact_search(x, queries, 5)
    with pytest.raises(ValueError, match="pq_m=5 must divide the embedding width 32"):
        idx.factory_string("pq", 6000, 32, pq_m=5)
    for spec, load, want in (
        ("IVF16,PQ8np,Refine(Flat)", {"nprobe": 16, "k_factor": 16}, 0.95),
        ("IVF32_HNSW8,Flat", {"nprobe": 32, "ef_search": 64}, 0.99),
    ):
        monkey = idx.CHUNK
        idx.CHUNK = 1000  # six add() calls
        try:
            index = idx.make_index(x, factory=spec, nprobe=2, ef_search=16, k_factor=2)
        finally:
            idx.CHUNK = monkey
        assert index.ntotal == 6000
        folder = tmp_path / spec.replace(",", "_")
        manifest = {"model": "all-MiniLM-L6-v2", "dim": 32, "rows": 6000, "factory": spec}
        idx.write_index_folder(folder, index, table, manifest)
        recorded = json.loads((folder / "manifest.json").read_text())["search"]
        assert recorded == (
            {"nprobe": 2, "k_factor": 2} if "PQ" in spec else {"nprobe": 2, "ef_search": 16}
        )
        r = Retriever(folder, model=None, **load)
        assert idx.search_settings(r.index) == load
        rows = [IdMap.open(folder).rows_of(h.ids) for h in r.search(queries, 5)]
        recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(truth, rows, strict=True)])
        assert recall >= want, (spec, recall)
        assert idx.search_settings(Retriever(folder).index) == recorded  # the recorded ones
    # kind pq: IVF-PQ codes in memory, candidates re-ranked exactly from float16 vectors on disk
    assert idx.factory_string("pq", 6000, 32, nlist=16, pq_m=8) == "IVF16,PQ8np"
    index = idx.make_index(x, "pq", nlist=16, pq_m=8, nprobe=16)
    raw = np.mean(
        [len(set(a) & set(b)) / 5 for a, b in zip(truth, index.search(queries, 5)[1], strict=True)]
    )
    idx.write_index_folder(tmp_path / "pq", index, table, {**manifest, "kind": "pq"}, rerank=x)
    r = Retriever(tmp_path / "pq", k_factor=32)
    assert r.rerank.dtype == np.float16 and r.k_factor == 32
    rows = [IdMap.open(tmp_path / "pq").rows_of(h.ids) for h in r.search(queries, 5)]
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(truth, rows, strict=True)])
    assert recall >= 0.95 and recall > raw + 0.5, (raw, recall)
    idx._check_out(tmp_path / "pq", overwrite=True)  # its own folder: may be replaced
    with pytest.raises(ValueError, match=r"already holds an index .*vectors\.npy"):
        idx._check_out(tmp_path / "pq", overwrite=False)
    (tmp_path / "pq" / "vectors.npy").write_bytes(b"\x93NUMPY")  # changed after it was written
    with pytest.raises(ValueError, match=r"vectors\.npy does not match the size"):
        Retriever(tmp_path / "pq")


def test_id_map_columns_read_rows_across_chunks(tmp_path: Path) -> None:
    """A 10M-row id map is several Arrow chunks: rows are read in place, in the order asked."""
    import pyarrow as pa

    from dit_mem.data.idmap import Column, IdMap

    col = Column(pa.chunked_array([["a", "b"], ["c"], [], ["d", "e", "f"]]))
    assert col.take([5, 0, 2, 3, 2]) == ["f", "a", "c", "d", "c"] and col.take([]) == []
    assert (len(col), col[4], col[-1], list(col)) == (6, "e", "f", ["a", "b", "c", "d", "e", "f"])
    import pandas as pd

    table = pd.DataFrame({"id": ["x_1_0to1", "x_2_0to1", "y"], "caption": ["p", "q", "r"]})
    IdMap.write(tmp_path, table.assign(source=["x", "x", "y"]))
    m = IdMap.open(tmp_path)
    assert m.rows_of(["y", "nope", "x_1_0to1"]) == [2, None, 0]
    assert m.count_sources(["x"]) == 2 and m.record(1)["caption"] == "q"
