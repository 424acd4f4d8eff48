"""preprocess.dsprites: shapes, the App. I latent-hole design, shards through the image path."""

from __future__ import annotations

import numpy as np
import pytest

from preprocess import dsprites
from preprocess.errors import run_cli
from preprocess.shard_images import iter_samples, read_index


def test_shapes_differ_and_rotate_scale_move():
    imgs = [dsprites.render(s, 1.0, 0.3, 0.5, 0.5, 32) for s in range(3)]
    assert all(img.dtype == np.uint8 and set(np.unique(img)) == {0, 255} for img in imgs)
    areas = [int((img > 0).sum()) for img in imgs]
    assert len(set(areas)) == 3  # square, ellipse and heart cover different areas
    sq = dsprites.render(0, 1.0, 0.0, 0.5, 0.5, 32)
    assert (dsprites.render(0, 0.5, 0.0, 0.5, 0.5, 32) > 0).sum() < (sq > 0).sum() / 2  # scale
    assert not np.array_equal(dsprites.render(0, 1.0, np.pi / 8, 0.5, 0.5, 32), sq)  # orientation
    moved = dsprites.render(0, 1.0, 0.0, 1.0, 0.0, 32)
    assert abs(int((moved > 0).sum()) - int((sq > 0).sum())) < 0.2 * (sq > 0).sum()  # same shape, moved
    assert not np.array_equal(moved, sq)
    big = dsprites.render(0, 1.0, np.pi / 4, 1.0, 1.0, 32)
    assert big[-1].max() == 0 and big[:, -1].max() == 0  # never cut by the border


def test_split_keeps_half_the_values_and_tests_on_unseen_ones():
    train, test, info = dsprites.split_latents(positions=4, rate=0.3, seed=3, test_max=None)
    ks, ko = set(info["kept_scales"]), set(info["kept_orientations"])
    assert len(ks) == 3 and len(ko) == 20
    assert all(s in ks and o in ko for s, o in train[:, 1:3].tolist())
    assert all(s not in ks or o not in ko for s, o in test[:, 1:3].tolist())
    assert len(train) == round(0.3 * info["kept_images"]) and len(test) == info["images"] - info["kept_images"]
    assert set(train[:, 0]) == {0, 1, 2}


def test_cli_writes_train_and_test_shards(tmp_path, capsys):
    out = tmp_path / "ds"
    assert dsprites.main([str(out), "--rate", "0.05", "--size", "16", "--positions", "2", "--test-max", "50",
                          "--no-progress"]) == 0
    train, test = read_index(str(out / "train")), read_index(str(out / "test"))
    assert train["classes"] == ["square", "ellipse", "heart"] and test["num_samples"] == 50
    key, data, ext, label = next(iter_samples(str(out / "train")))
    assert ext == "png" and label in (0, 1, 2)
    # an existing set is not replaced without --overwrite
    assert run_cli(dsprites.main, [str(out), "--no-progress"], dsprites.PROG) != 0


@pytest.mark.parametrize("args", [["--rate", "0"], ["--rate", "1.5"], ["--size", "4"], ["--positions", "0"],
                                  ["--seed", "-1"]])
def test_bad_options_are_one_line(tmp_path, capsys, args):
    assert run_cli(dsprites.main, [str(tmp_path / "x"), *args], dsprites.PROG) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]
    assert not (tmp_path / "x").exists()
