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
    train, test, info = dsprites.split_latents(positions=4, rate=0.3, seed=3, test_max=None, test="unseen")
    ks, ko = set(info["kept_scales"]), set(info["kept_orientations"])
    assert len(ks) == 3 and len(ko) == 20 and info["test"] == "unseen"
    assert all(s in ks and o in ko for s, o in train[:, 1:3].tolist())
    assert all(s not in ks or o not in ko for s, o in test[:, 1:3].tolist())
    assert len(train) == round(0.3 * info["kept_images"]) and len(test) == info["images"] - info["kept_images"]
    assert set(train[:, 0]) == {0, 1, 2}


def test_kept_test_is_the_remaining_kept_latent_images():
    # the default (paper App. I): the test set is the kept-latent images not drawn for training
    train, test, info = dsprites.split_latents(positions=4, rate=0.3, seed=3, test_max=None)
    ks, ko = set(info["kept_scales"]), set(info["kept_orientations"])
    assert info["test"] == "kept"
    assert all(s in ks and o in ko for s, o in train[:, 1:3].tolist())
    assert all(s in ks and o in ko for s, o in test[:, 1:3].tolist())
    tr, te = set(map(tuple, train.tolist())), set(map(tuple, test.tolist()))
    assert not tr & te and len(tr) == len(train) and len(te) == len(test)
    assert len(train) + len(test) == info["kept_images"]  # train and test partition the kept images
    # the same training set as --test unseen (same draws), and a capped test set is a seeded subset
    assert np.array_equal(train, dsprites.split_latents(4, 0.3, 3, None, "unseen")[0])
    tr2, capped, _ = dsprites.split_latents(positions=4, rate=0.3, seed=3, test_max=100)
    assert np.array_equal(tr2, train) and len(capped) == 100 and set(map(tuple, capped.tolist())) <= te
    assert np.array_equal(capped, dsprites.split_latents(4, 0.3, 3, 100)[1])
    with pytest.raises(ValueError):
        dsprites.split_latents(4, 0.3, 3, None, "all")


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


@pytest.mark.parametrize("test", ["kept", "unseen"])
def test_cli_test_option(tmp_path, capsys, test):
    out = tmp_path / "ds"
    assert dsprites.main([str(out), "--rate", "0.5", "--size", "16", "--positions", "2", "--test", test,
                          "--test-max", "0", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert ("with kept latents not trained on" in err) == (test == "kept")
    assert f"test={test}," in read_index(str(out / "test"))["source"]["path"]
    _, _, info = dsprites.split_latents(2, 0.5, 0, None, test)
    n_train = round(0.5 * info["kept_images"])
    n_test = info["kept_images"] - n_train if test == "kept" else info["images"] - info["kept_images"]
    assert read_index(str(out / "train"))["num_samples"] == n_train
    assert read_index(str(out / "test"))["num_samples"] == n_test


@pytest.mark.parametrize("args", [["--rate", "0"], ["--rate", "1.5"], ["--size", "4"], ["--positions", "0"],
                                  ["--seed", "-1"], ["--test", "all"], ["--rate", "1", "--test", "kept"]])
def test_bad_options_are_one_line(tmp_path, capsys, args):
    assert run_cli(dsprites.main, [str(tmp_path / "x"), *args], dsprites.PROG) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]
    assert not (tmp_path / "x").exists()
