"""The k-NN search split over ranks (dino_simpool/evaluation/knn.py): the split covers the bank once, the merge key
is exact, torch (chunked matmul + topk) = faiss, 2 and 3 gloo ranks = one rank exactly (predictions, ties
included), every rank keeps only its shard, the gather chunk is divided by the world size, the GPU faiss path
empties torch's cache first and searches block by block, and the search logs its FLOPs and an ETA."""
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dino_simpool.evaluation import features as F_
from dino_simpool.evaluation import knn as K
from dino_simpool.evaluation.features import extract_features, gather_rows_per_rank
from dino_simpool.evaluation.knn import (BankShard, extract_bank_shard, knn_accuracy, knn_classify,
                                         knn_classify_shard, shard_rows)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clustered(n_train=50, n_test=23, d=12, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g)
    tl = torch.randint(0, classes, (n_train,), generator=g)
    sl = torch.randint(0, classes, (n_test,), generator=g)
    train = centers[tl] + 1.2 * torch.randn(n_train, d, generator=g)
    test = centers[sl] + 1.2 * torch.randn(n_test, d, generator=g)
    return train * 3.0, tl, test, sl  # not unit length


def _with_twins(train, tl):
    """Bit-identical twins with different labels in different blocks (rows 3 and 40): only the lower row may be
    kept when they tie at the k-th place; the query set holds their feature so that they are nearest."""
    train, tl = train.clone(), tl.clone()
    train[40] = train[3]
    tl[40] = (tl[3] + 1) % 5
    return train, tl


# ------------------------------------------------------------------------------------------------ the split
@pytest.mark.parametrize("n,block", [(1, 8), (50, 8), (64, 8), (1000, 7), (5, 100)])
@pytest.mark.parametrize("world", [1, 2, 3, 16])
def test_shard_rows_cover_the_bank_once_in_whole_blocks(n, block, world):
    spans = [shard_rows(n, world, r, block) for r in range(world)]
    assert [i for s in spans for i in s] == list(range(n))  # contiguous, in order, each row once
    sizes = [len(s) for s in spans]
    assert max(sizes) - min(sizes) <= block  # balanced to one block
    assert all(s.start % block == 0 for s in spans if len(s))  # whole blocks: the same blocks as on one rank


def test_gather_chunk_is_divided_by_the_world_size():
    assert gather_rows_per_rank(1) == F_.GATHER_CHUNK
    assert gather_rows_per_rank(16) == F_.GATHER_CHUNK // 16 == 4096
    assert gather_rows_per_rank(16, 10) == 1  # never 0


def test_keys_order_like_similarity_then_lower_row_and_round_trip():
    sims = torch.tensor([0.5, -0.25, 0.5, 1.0, -1.0, 0.0, -0.0, 0.5, 3e-39, -3e-39], dtype=torch.float32)
    rows = torch.tensor([7, 1, 2, 9, 0, 4, 5, 3, 8, 6])
    keys = K._keys(sims, rows)
    order = torch.argsort(keys, descending=True).tolist()
    expect = sorted(range(len(sims)), key=lambda i: (-float(sims[i]), 0 if str(float(sims[i])) != "-0.0" else 1,
                                                     int(rows[i])))
    assert order == expect
    s2, r2 = K._unkeys(keys)
    assert torch.equal(s2.view(torch.int32), sims.view(torch.int32)) and torch.equal(r2, rows)  # bit-exact
    assert bool((keys > K.KEY_PAD).all())


# ------------------------------------------------------------------------------------------------ backends
@pytest.mark.parametrize("bank_block,query_chunk", [(K.BANK_BLOCK, None), (7, 4), (16, 1)])
def test_torch_backend_predictions_equal_faiss(bank_block, query_chunk):
    """The torch backend (chunked matmul + topk) gives faiss' vote: same predictions, many blocks and chunks."""
    train, tl, test, sl = _clustered(300, 60, 16, 5, seed=4)
    ks = (1, 5, 20, 50)
    rf, pf = knn_classify(train, tl, test, sl, ks=ks, backend="faiss", return_predictions=True,
                          bank_block=bank_block, query_chunk=query_chunk)
    rt, pt = knn_classify(train, tl, test, sl, ks=ks, backend="torch", return_predictions=True,
                          bank_block=bank_block, query_chunk=query_chunk, device="cpu")
    assert rf == rt
    assert all(torch.equal(pf[k], pt[k]) for k in ks)
    ref, pref = knn_classify(train, tl, test, sl, ks=ks, backend="faiss", return_predictions=True)  # one block
    assert rf == ref and all(torch.equal(pf[k], pref[k]) for k in ks)
    assert 0 < rf[20][0] < 100


def test_twins_tie_goes_to_the_lower_row_in_every_backend():
    train, tl, _, _ = _clustered()
    train, tl = _with_twins(train, tl)
    q = train[3:4].clone()
    for backend in ("faiss", "torch"):
        for block in (8, 64):
            _, p = knn_classify(train, tl, q, tl[3:4], ks=(1,), T=0.07, backend=backend, bank_block=block,
                                return_predictions=True, num_classes=5)
            assert int(p[1][0, 0]) == int(tl[3]), (backend, block)  # row 3 (lower) wins over row 40


def test_nan_features_are_refused_in_one_line():
    train, tl, test, sl = _clustered()
    train[5, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        knn_classify(train, tl, test, sl, ks=(1,))
    train[5, 0] = 0.0
    test[2, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        knn_classify(train, tl, test, sl, ks=(1,), backend="torch")


def test_search_logs_flops_and_an_eta():
    train, tl, test, sl = _clustered(50, 23, 12)
    lines = []
    knn_classify(train, tl, test, sl, ks=(1, 5), bank_block=8, log=lines.append)
    assert f"{K.search_flops(23, 50, 12):.2e} FLOP" in lines[0] and "7 block(s)" in lines[0]
    assert K.search_flops(23, 50, 12) == 2 * 23 * 50 * 12
    assert any("ETA" in line for line in lines) and "took" in lines[-1]


def test_auto_backend_is_torch_on_a_gpu_without_faiss_gpu(monkeypatch):
    monkeypatch.setattr(K, "faiss_gpu_available", lambda: False)
    assert K.resolve_backend("auto", torch.device("cuda", 0), None, 20) == ("torch", False)
    assert K.resolve_backend("auto", torch.device("cpu"), None, 20) == ("faiss", False)
    monkeypatch.setattr(K, "faiss_gpu_available", lambda: True)
    assert K.resolve_backend("auto", torch.device("cuda", 0), None, 20) == ("faiss", True)
    assert K.resolve_backend("auto", torch.device("cuda", 0), None, 4096) == ("torch", False)  # beyond faiss GPU's k


class _FakeGpuIndex:
    """faiss' GpuIndexFlatIP API over a CPU IndexFlatIP: the GPU path's reset/add/search order, run on a CPU."""

    def __init__(self, calls, res, d, cfg):
        import faiss
        calls.append("GpuIndexFlatIP")
        self.calls, self.inner, self.reserved = calls, faiss.IndexFlatIP(d), None

    def reserveMemory(self, n):
        self.reserved = n

    def reset(self):
        self.inner.reset()

    def add(self, x):
        assert len(x) <= self.reserved  # one block at a time, never the whole bank
        self.calls.append(f"add{len(x)}")
        self.inner.add(x)

    def search(self, q, k):
        return self.inner.search(q, k)


def test_faiss_gpu_path_empties_torch_cache_first_and_searches_block_by_block(monkeypatch):
    calls = []
    monkeypatch.setattr(K, "faiss_gpu_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))

    class Cfg:
        device, useFloat16 = None, None

    monkeypatch.setattr(K.faiss, "StandardGpuResources", lambda: calls.append("StandardGpuResources") or object(),
                        raising=False)
    monkeypatch.setattr(K.faiss, "GpuIndexFlatConfig", Cfg, raising=False)
    monkeypatch.setattr(K.faiss, "GpuIndexFlatIP", lambda res, d, cfg: _FakeGpuIndex(calls, res, d, cfg),
                        raising=False)
    train, tl, test, sl = _clustered(50, 23, 12)
    r_gpu, p_gpu = knn_classify(train, tl, test, sl, ks=(1, 5, 30), backend="faiss", bank_block=16,
                                return_predictions=True)
    assert calls[:3] == ["empty_cache", "StandardGpuResources", "GpuIndexFlatIP"]
    assert calls[3:] == ["add16", "add16", "add16", "add2"]
    r_cpu, p_cpu = knn_classify(train, tl, test, sl, ks=(1, 5, 30), backend="faiss", use_gpu=False,
                                bank_block=16, return_predictions=True)
    assert r_gpu == r_cpu and all(torch.equal(p_gpu[k], p_cpu[k]) for k in (1, 5, 30))


# ------------------------------------------------------------------------------------------------ 2-3 gloo ranks
KS = (1, 5, 30)  # 30 > rank 0's 24 rows of a 50-row bank in blocks of 8: rank 0 pads its candidates


class TinyData(torch.utils.data.Dataset):
    """50 feature vectors as 'images'; index 4 is unreadable (SafeImageFolder's stand-in, ``ok`` False)."""
    classes = [f"c{i}" for i in range(5)]

    def __init__(self, n=50, seed=0):
        self.x, self.y, _, _ = _clustered(n, 1, 12, 5, seed=seed)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])

    def get_checked(self, i):
        k = 5 if i == 4 else i
        return self.x[k], int(self.y[k]), k == i


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 8), nn.Tanh())


def _single_rank_reference():
    train, tl, test, sl = _clustered()
    train, tl = _with_twins(train, tl)
    test = torch.cat([test, train[3:4]])
    sl = torch.cat([sl, tl[3:4]])
    out = {}
    for backend in ("faiss", "torch"):
        out[backend] = knn_classify(train, tl, test, sl, ks=KS, backend=backend, bank_block=8,
                                    return_predictions=True, device="cpu")
    return (train, tl, test, sl), out


def _worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        (train, tl, test, sl), _ = _single_rank_reference()
        res = {}
        for backend in ("faiss", "torch"):
            res[backend] = knn_classify(train, tl, test, sl, ks=KS, backend=backend, bank_block=8,
                                        return_predictions=True, device="cpu", distributed=True)
        # the library's periodic k-NN: the bank is embedded in shards and stays there
        sizes = []
        real_all_gather = dist.all_gather

        def recording_all_gather(parts, t, *a, **kw):
            if t.ndim == 2:
                sizes.append(t.shape[0])
            return real_all_gather(parts, t, *a, **kw)

        dist.all_gather = recording_all_gather
        try:
            val, _ = extract_features(_model(), TinyData(23, seed=1), batch_size=3, num_workers=0, gather_chunk=4)
        finally:
            dist.all_gather = real_all_gather
        shard = extract_bank_shard(_model(), TinyData(), batch_size=3, num_workers=0, bank_block=8)
        acc = knn_accuracy(_model(), TinyData(), TinyData(23, seed=1), ks=KS, batch_size=3, num_workers=0,
                           bank_block=8)
        torch.save({"res": res, "acc": acc, "gather_rows": sizes, "val": val, "shard_rows": shard.rows,
                    "shard_n": shard.feats.shape[0], "labels": shard.labels}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_search_on_gloo_ranks_equals_one_rank_exactly(tmp_path, world):
    _, ref = _single_rank_reference()
    acc1 = knn_accuracy(_model(), TinyData(), TinyData(23, seed=1), ks=KS, batch_size=3, num_workers=0,
                        bank_block=8)
    val1, _ = extract_features(_model(), TinyData(23, seed=1), batch_size=3, num_workers=0)
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    seen = []
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for backend in ("faiss", "torch"):
            r, p = got["res"][backend]
            assert r == ref[backend][0], (rank, backend)
            for k in KS:
                assert torch.equal(p[k], ref[backend][1][k]), (rank, backend, k)  # every prediction, every rank
        assert got["acc"] == acc1  # the periodic k-NN's numbers, on every rank
        span = shard_rows(50, world, rank, 8)
        assert got["shard_n"] == len([i for i in span if i != 4])  # only its own rows (less the unreadable one)
        assert got["shard_rows"].tolist() == [i for i in span if i != 4]
        assert got["labels"].shape == (50,) and int(got["labels"][4]) == -1
        seen += got["shard_rows"].tolist()
        assert max(got["gather_rows"]) == 4 // world  # gather chunk 4 rows in all: 4 // world from each rank
        torch.testing.assert_close(got["val"], val1)
    assert sorted(seen) == [i for i in range(50) if i != 4]
    assert 0 < ref["faiss"][0][5][0] < 100


def _bad_shard_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        train, tl, test, sl = _clustered()
        span = shard_rows(50, world, 0, 8)  # every rank claims rank 0's rows: rank 1 is wrong
        shard = BankShard(train[span.start:span.stop], torch.arange(span.start, span.stop), tl, 8)
        try:
            knn_classify_shard(shard, test, sl, ks=(1,))
            msg = "no error"
        except ValueError as e:
            msg = str(e)
        with open(f"{out_dir}/rank{rank}.txt", "w") as f:
            f.write(msg)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_a_wrong_shard_on_one_rank_fails_on_every_rank(tmp_path):
    mp.spawn(_bad_shard_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert "does not match shard_rows" in (tmp_path / f"rank{rank}.txt").read_text()


@pytest.mark.distributed
@pytest.mark.slow
def test_knn_command_on_two_ranks_equals_one_rank(tmp_path):
    """``torchrun -m eval.knn`` on 2 gloo ranks: each rank embeds and searches its part of the bank; the results
    equal one process's, with extraction (the bank never gathered) and with --load_features (the whole bank on
    every rank, the search split)."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    from dino_simpool.checkpoint import save_atomic
    from dino_simpool.models.backbones import build_backbone

    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    g = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        for c in "abc":
            (data / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray((g.random((32, 32, 3)) * 255).astype("uint8")).save(data / split / c / f"{i}.png")
    m = build_backbone("vit_tiny", depth=1, embed_dim=32, num_heads=2, patch_size=8, img_size=32)
    sd = {f"backbone.{k}": v for k, v in m.state_dict().items()}
    ckpt = save_atomic({"teacher": sd, "config": {"backbone": m.config}}, tmp_path / "checkpoint.pth")
    common = ["--pretrained_weights", str(ckpt), "--data_path", str(data), "--resize", "32", "--crop", "32",
              "--num_workers", "0", "--nb_knn", "1", "3", "20", "--batch_size_per_gpu", "2", "--bank_block", "4"]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"

    def run(nproc, name, *extra):
        cmd = ([torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "eval.knn"] if nproc > 1
               else [sys.executable, "-m", "eval.knn"])
        r = subprocess.run(cmd + common + ["--output_dir", str(tmp_path / name), *extra], capture_output=True,
                           text=True, cwd=root, env=env, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        return json.loads((tmp_path / name / "knn_results.json").read_text()), r.stdout

    one, _ = run(1, "one", "--dump_features", str(tmp_path / "f"))
    two, out = run(2, "two")  # no dump: the bank stays sharded (blocks of 4 rows: 2 on each rank)
    assert two["world_size"] == 2 and "FLOP over 2 rank(s)" in out and "in 2 block(s)" in out
    assert two["results"] == one["results"] and two["n_train"] == one["n_train"] == 15
    loaded, _ = run(2, "loaded", "--load_features", str(tmp_path / "f"))
    assert loaded["results"] == one["results"]
