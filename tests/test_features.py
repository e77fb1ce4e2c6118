"""Feature extraction (dino_simpool/evaluation/features.py): order, 2-rank gloo sharding == one rank; the k-NN
dumps (eval/features.py): dump/load round-trip."""
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from dino_simpool.evaluation.features import extract_features
from eval.features import load_features, save_features

N, D_IN = 11, 6  # odd size: a 2-rank DistributedSampler pads one duplicate


class TinyData(torch.utils.data.Dataset):
    def __init__(self, n=N):
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, D_IN, generator=g)
        self.y = torch.arange(n) % 3

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class TinyDataWithUnreadable(TinyData):
    """As SafeImageFolder: index 4 is unreadable, index 5 stands in for it (``ok`` False)."""

    def get_checked(self, i):
        k = 5 if i == 4 else i
        return self.x[k], int(self.y[k]), k == i


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 5), nn.Tanh())


def test_single_process_matches_direct_forward():
    ds, model = TinyData(), tiny_model()
    model.train()
    feats, labels = extract_features(model, ds, batch_size=4, num_workers=0)
    assert model.training  # mode restored
    with torch.no_grad():
        expect = model(ds.x)
    assert feats.dtype == torch.float32 and labels.dtype == torch.int64
    torch.testing.assert_close(feats, expect)
    assert labels.tolist() == ds.y.tolist()


def test_empty_dataset_raises():
    with pytest.raises(ValueError, match="empty"):
        extract_features(tiny_model(), TinyData(0), num_workers=0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        feats, labels = extract_features(tiny_model(), TinyData(), batch_size=2, num_workers=0, desc="test",
                                        gather_chunk=2)  # several gather rounds
        torch.save({"feats": feats, "labels": labels}, f"{out_dir}/rank{rank}.pt")
        feats, labels = extract_features(tiny_model(), TinyDataWithUnreadable(), batch_size=2, num_workers=0)
        torch.save({"feats": feats, "labels": labels}, f"{out_dir}/rank{rank}_unreadable.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_two_rank_gloo_equals_single_rank(tmp_path):
    single_f, single_l = extract_features(tiny_model(), TinyData(), batch_size=3, num_workers=0)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["feats"].shape == (N, 5)  # the padded duplicate is gone
        torch.testing.assert_close(got["feats"], single_f)  # same rows, same order, on every rank
        assert got["labels"].tolist() == single_l.tolist()
        got = torch.load(tmp_path / f"rank{rank}_unreadable.pt", weights_only=True)
        keep = [i for i in range(N) if i != 4]
        torch.testing.assert_close(got["feats"], single_f[keep])  # the unreadable row is gone on every rank
        assert got["labels"].tolist() == single_l[keep].tolist()


def test_unreadable_images_are_left_out_not_duplicated(tmp_path):
    from PIL import Image

    from dino_simpool.data import SafeImageFolder
    from dino_simpool.dino.augment import eval_transform

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for j in range(2):
            Image.new("RGB", (20, 20), (60 * j, 100, 200 if cls == "a" else 0)).save(tmp_path / cls / f"{j}.png")
    (tmp_path / "a" / "1.png").write_bytes((tmp_path / "a" / "0.png").read_bytes()[:40])  # truncated
    ds = SafeImageFolder(tmp_path, transform=eval_transform(resize=16, crop=16))
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    with pytest.warns(UserWarning, match="1 unreadable image"):
        feats, labels = extract_features(model, ds, batch_size=2, num_workers=0)
    assert feats.shape == (3, 4) and labels.tolist() == [0, 1, 1]
    # training still takes a stand-in for it (the DataLoader keeps its batch size)
    assert ds[1][1] == 1 and ds.get_checked(1)[2] is False and ds.get_checked(0)[2] is True


@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_dump_load_round_trip(tmp_path, fmt):
    g = torch.Generator().manual_seed(0)
    tf, tl = torch.randn(9, 4, generator=g), torch.arange(9) % 3
    sf, sl = torch.randn(5, 4, generator=g), torch.tensor([0, 2, 2, 1, 0])
    save_features(tmp_path, tf, tl, sf, sl, ["a", "b", "c"], fmt=fmt)
    b = load_features(tmp_path)
    for k, v in [("train_feats", tf), ("train_labels", tl), ("test_feats", sf), ("test_labels", sl)]:
        assert torch.equal(b[k], v), k
    assert b["classes"] == ["a", "b", "c"]


def test_load_dino_style_npy_names_and_errors(tmp_path):
    np.save(tmp_path / "trainfeat.npy", np.ones((3, 2), np.float32))
    np.save(tmp_path / "trainlabels.npy", np.array([0, 1, 1]))
    np.save(tmp_path / "testfeat.npy", np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="testlabels.npy"):
        load_features(tmp_path)
    np.save(tmp_path / "testlabels.npy", np.array([1]))
    b = load_features(tmp_path)
    assert b["train_feats"].shape == (3, 2) and b["classes"] is None
    (tmp_path / "features.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        load_features(tmp_path)


def _dino_dump(d, tf, tl, sf, sl):
    """What DINO's eval_knn.py --dump_features writes: four torch.save'd tensors."""
    d.mkdir(parents=True, exist_ok=True)
    torch.save(tf, d / "trainfeat.pth")
    torch.save(sf, d / "testfeat.pth")
    torch.save(tl, d / "trainlabels.pth")
    torch.save(sl, d / "testlabels.pth")


def test_load_dino_pth_dump(tmp_path):
    g = torch.Generator().manual_seed(0)
    tf, tl = torch.nn.functional.normalize(torch.randn(9, 4, generator=g), dim=1), torch.arange(9) % 3
    sf, sl = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=1), torch.tensor([0, 2, 2, 1, 0])
    _dino_dump(tmp_path / "d", tf, tl, sf, sl)
    b = load_features(tmp_path / "d")
    for k, v in [("train_feats", tf), ("train_labels", tl), ("test_feats", sf), ("test_labels", sl)]:
        assert torch.equal(b[k], v), k
    assert b["classes"] is None


def test_dino_dump_errors_are_one_line(tmp_path):
    g = torch.Generator().manual_seed(0)
    _dino_dump(tmp_path, torch.randn(3, 2, generator=g), torch.arange(3), torch.randn(1, 2, generator=g),
               torch.tensor([1]))
    (tmp_path / "testlabels.pth").unlink()
    with pytest.raises(ValueError, match="missing testlabels.pth"):
        load_features(tmp_path)
    torch.save({"not": "a tensor"}, tmp_path / "testlabels.pth")
    with pytest.raises(ValueError, match="not a tensor"):
        load_features(tmp_path)

    class Evil:  # a pickle that would run code: weights_only=True refuses it
        def __reduce__(self):
            return (print, ("pwned",))

    import pickle
    with open(tmp_path / "testlabels.pth", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(ValueError, match="cannot read .*testlabels.pth"):
        load_features(tmp_path)
    torch.save(torch.tensor([0.5]), tmp_path / "testlabels.pth")
    with pytest.raises(ValueError, match="test labels must be a 1-D integer tensor"):
        load_features(tmp_path)


def test_dump_in_dino_format_is_what_dino_loads(tmp_path):
    g = torch.Generator().manual_seed(0)
    tf, tl = torch.randn(9, 4, generator=g), torch.arange(9) % 3
    sf, sl = torch.randn(5, 4, generator=g), torch.tensor([0, 2, 2, 1, 0])
    save_features(tmp_path, tf, tl, sf, sl, ["a", "b", "c"], fmt="dino")
    # DINO's eval_knn.py --load_features: torch.load of each file
    for name, v in [("trainfeat.pth", tf), ("trainlabels.pth", tl), ("testfeat.pth", sf), ("testlabels.pth", sl)]:
        assert torch.equal(torch.load(tmp_path / name, weights_only=True), v), name
    assert not (tmp_path / "features.safetensors").exists()
    assert load_features(tmp_path)["classes"] == ["a", "b", "c"]
