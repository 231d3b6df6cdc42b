"""Sharding, all_reduce and gathering across processes (gloo on CPU), and resuming a statistics run."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from rulewriter.core import distributed as D
from rulewriter.studies.evaluate import predict
from rulewriter.models.registry import Preprocess, load_classifier
from rulewriter.core.stats import SecondMoment, collect_second_moment


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x))))).flatten(1))


def tiny_classifier():
    # float64, so that keys do not depend on how images are batched and sums can be compared to 1e-12
    torch.manual_seed(0)
    return load_classifier(Tiny().double(), labels=["a", "b", "c", "d"], preprocess=Preprocess(8, 8, (0.5,) * 3, (0.5,) * 3))


def write_images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shards_cover_everything_once_and_unshard_restores_order():
    n, w = 11, 3
    parts = [D.shard_indices(n, rank_=r, world=w) for r in range(w)]
    assert sorted(i for p in parts for i in p) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert D.unshard(parts, n) == list(range(n))


def test_single_process_defaults():
    assert (D.rank(), D.world_size(), D.is_main(), D.is_distributed()) == (0, 1, True, False)
    assert D.shard("abc") == ["a", "b", "c"]
    t = torch.ones(2, dtype=torch.float64)
    assert D.all_reduce_sum([t])[0] is t
    assert D.all_gather_objects(3) == [3]
    assert D.init_from_env() is False  # WORLD_SIZE unset: nothing to join


def _worker(rank: int, world: int, port: int, folder: str, cache: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        clf = tiny_classifier()
        paths = sorted(Path(folder).glob("*.png"))
        s = collect_second_moment(clf, "conv2", paths, view=2, precision="fp64", batch_size=2, cache_dir=cache,
                                  progress=False)
        preds = predict(clf, paths, [i % 4 for i in range(len(paths))], progress=False, batch_size=2)["before"]
        save_file({"C": s.moment(), "mean": s.mean(), "count": torch.tensor(s.count),
                   "top1": torch.as_tensor(preds.top1.copy()), "label_prob": torch.as_tensor(preds.label_prob.copy())},
                  f"{out}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tmp_path):
    # 7 images over 2 ranks: uneven shards, and batches that do not divide them.
    paths = write_images(tmp_path / "imgs", 7)
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path / "imgs"), str(cache), str(out)), nprocs=2,
                       join=True, start_method="spawn")
    clf = tiny_classifier()
    single = collect_second_moment(clf, "conv2", paths, view=2, precision="fp64", batch_size=3, progress=False)
    preds = predict(clf, paths, [i % 4 for i in range(7)], progress=False)["before"]
    for r in range(2):
        res = load_file(out / f"rank{r}.safetensors")
        assert int(res["count"]) == single.count
        torch.testing.assert_close(res["C"], single.moment(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res["mean"], single.mean(), rtol=1e-12, atol=1e-12)
        assert res["top1"].tolist() == preds.top1.tolist()  # gathered back in the original order
        np.testing.assert_allclose(res["label_prob"].numpy(), preds.label_prob, rtol=1e-6)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and "partial" not in files[0]  # rank 0 wrote the one cache file; partials removed
    cached = SecondMoment.load(cache / files[0])
    meta = cached.meta
    torch.testing.assert_close(cached.moment(), single.moment(), rtol=1e-12, atol=1e-12)


def _worker_own_cache(rank: int, world: int, port: int, folder: str, caches: list, out: str) -> None:
    import datetime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A short timeout: a rank left waiting in all_reduce fails the test instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        paths = sorted(Path(folder).glob("*.png"))
        s = collect_second_moment(tiny_classifier(), "conv2", paths, view=2, precision="fp64", batch_size=2,
                                  cache_dir=caches[rank], progress=False)
        save_file({"C": s.moment(), "count": torch.tensor(s.count)}, f"{out}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_a_cache_file_only_one_rank_sees_does_not_hang_the_others(tmp_path):
    paths = write_images(tmp_path / "imgs", 6)
    seen, unseen, out = tmp_path / "seen", tmp_path / "unseen", tmp_path / "out"
    out.mkdir()
    single = collect_second_moment(tiny_classifier(), "conv2", paths, view=2, precision="fp64", batch_size=2,
                                   cache_dir=seen, progress=False)  # only rank 0's folder has the file
    mp.start_processes(_worker_own_cache, args=(2, free_port(), str(tmp_path / "imgs"), [str(seen), str(unseen)],
                                                str(out)), nprocs=2, join=True, start_method="spawn")
    for r in range(2):
        res = load_file(out / f"rank{r}.safetensors")
        assert int(res["count"]) == single.count
        torch.testing.assert_close(res["C"], single.moment(), rtol=1e-12, atol=1e-12)


class Flaky(torch.utils.data.Dataset):
    """Images that can be told to fail at one index, as a crash or an interruption would."""

    def __init__(self, clf, paths, fail_at: int | None) -> None:
        self.clf, self.paths, self.fail_at, self.seen = clf, paths, fail_at, []

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        # What a custom dataset defines to be cached (and resumed): the same images give the same string.
        return "flaky:" + ",".join(p.name for p in self.paths)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError("interrupted")
        self.seen.append(i)
        return self.clf.preprocess.image(Image.open(self.paths[i]).convert("RGB")), 0


def test_an_interrupted_run_resumes_from_its_partial_file(tmp_path):
    clf = tiny_classifier()
    paths = write_images(tmp_path / "imgs", 9)
    cache = tmp_path / "cache"
    kw = dict(view=2, precision="fp64", batch_size=2, cache_dir=cache, checkpoint_every=1, progress=False)
    with pytest.raises(RuntimeError, match="interrupted"):
        collect_second_moment(clf, "conv2", Flaky(clf, paths, fail_at=5), **kw)
    partial = [p for p in cache.iterdir() if "partial" in p.name]
    assert len(partial) == 1
    meta = SecondMoment.load(partial[0]).meta
    assert json.loads(json.dumps(meta))["images_done"] == 4  # two whole batches were checkpointed

    again = Flaky(clf, paths, fail_at=None)
    resumed = collect_second_moment(clf, "conv2", again, **kw)
    assert sorted(again.seen) == [4, 5, 6, 7, 8]  # only the rest was read
    full = collect_second_moment(clf, "conv2", paths, view=2, precision="fp64", progress=False)
    assert resumed.count == full.count
    torch.testing.assert_close(resumed.moment(), full.moment(), rtol=1e-12, atol=1e-12)
    assert not [p for p in cache.iterdir() if "partial" in p.name]


def test_a_damaged_partial_file_is_ignored(tmp_path):
    clf = tiny_classifier()
    paths = write_images(tmp_path / "imgs", 4)
    cache = tmp_path / "cache"
    kw = dict(view=2, precision="fp64", batch_size=2, cache_dir=cache, checkpoint_every=1, progress=False)
    with pytest.raises(RuntimeError):
        collect_second_moment(clf, "conv2", Flaky(clf, paths, fail_at=3), **kw)
    partial = next(p for p in cache.iterdir() if "partial" in p.name)
    partial.write_bytes(b"\x00garbage")
    s = collect_second_moment(clf, "conv2", Flaky(clf, paths, fail_at=None), **kw)
    full = collect_second_moment(clf, "conv2", paths, view=2, precision="fp64", progress=False)
    torch.testing.assert_close(s.moment(), full.moment(), rtol=1e-12, atol=1e-12)


@pytest.fixture()
def five_photos(tmp_path, shared_dir) -> Path:
    """A folder with the first 5 imagenet-samples photos."""
    src = sorted((shared_dir / "data" / "imagenet-samples").glob("*.jpg"))[:5]
    if len(src) < 5:
        pytest.skip("imagenet-samples has fewer than 5 photos")
    data = tmp_path / "data"
    data.mkdir()
    for p in src:
        shutil.copy(p, data / p.name)
    return data


def test_torchrun_stats_command_equals_single_process(tmp_path, five_photos):
    """The real command line under torchrun, 2 gloo processes, on EfficientNet-Lite0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RULEWRITER_CACHE": str(tmp_path / "cache")}
    common = ["stats", "--model", "efficientnet-lite0", "--layer", "_blocks.15._project_conv", "--data", str(five_photos),
              "--precision", "fp64", "--batch-size", "2", "--no-cache", "--quiet", "--json", "--device", "cpu"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", "-m", "rulewriter", *common, "--out", str(tmp_path / "two.safetensors")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    info = json.loads(two.stdout[two.stdout.index("{"):])
    assert info["processes"] == 2 and info["count"] == 5 * 49
    one = subprocess.run([sys.executable, "-m", "rulewriter", *common, "--out", str(tmp_path / "one.safetensors")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a = SecondMoment.load(tmp_path / "two.safetensors")
    b = SecondMoment.load(tmp_path / "one.safetensors")
    assert a.count == b.count
    torch.testing.assert_close(a.moment(), b.moment(), rtol=1e-10, atol=1e-12)


def test_shards_from_separate_machines_merge_to_the_whole(tmp_path):
    from rulewriter.errors import StatsError
    from rulewriter.core.stats import merge_files

    clf = tiny_classifier()
    paths = write_images(tmp_path / "imgs", 7)
    kw = dict(view=2, precision="fp64", progress=False)
    parts = []
    for i in range(3):
        s = collect_second_moment(clf, "conv2", paths, shard=f"{i}/3", **kw)
        parts.append(s.save(tmp_path / f"part{i}.safetensors", s.meta))
    merged, meta = merge_files(parts)
    full = collect_second_moment(clf, "conv2", paths, **kw)
    assert merged.count == full.count and meta["missing_shards"] == []
    torch.testing.assert_close(merged.moment(), full.moment(), rtol=1e-12, atol=1e-12)
    with pytest.raises(StatsError, match="already in the sum"):
        merge_files([parts[0], parts[1], parts[0]])
    assert merge_files(parts[:2])[1]["missing_shards"] == ["2/3"]
    for bad in ("3/3", "x", "1/2/3"):
        with pytest.raises(StatsError, match="shard"):
            collect_second_moment(clf, "conv2", paths, shard=bad, **kw)


def test_torchrun_evaluate_command_equals_single_process(tmp_path, five_photos):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["evaluate", "--model", "efficientnet-lite0", "--data", str(five_photos), "--batch-size", "2", "--quiet",
              "--json", "--device", "cpu"]
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"eval{n}"
        cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={free_port()}"]
               if n > 1 else [sys.executable])
        r = subprocess.run([*cmd, "-m", "rulewriter", *common, "--out", str(out)], capture_output=True, text=True,
                           env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count('"n_images"') == 1  # only rank 0 prints
        runs[n] = json.loads((out / "evaluation.json").read_text())
    assert runs[1]["normal"]["n_images"] == runs[2]["normal"]["n_images"] == 5
    assert runs[1]["images"] == runs[2]["images"]  # same predictions, in the same order
    assert runs[1]["normal"]["top1"] == runs[2]["normal"]["top1"]
    assert runs[1]["normal"]["confidence"] == pytest.approx(runs[2]["normal"]["confidence"], rel=1e-5)
