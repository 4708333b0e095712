"""A user's own data (sdk.datasources): image folders read with Pillow and cached, CSV/Parquet
tables read with pandas/pyarrow, NumPy arrays; the splits cut from them; the errors; a recipe
trained end to end on an image folder."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from sdk import data, datasources
from sdk.cli import main
from sdk.errors import ConfigError

PIL = pytest.importorskip("PIL.Image")


def _bar(kind: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A noisy image of a horizontal bar, a vertical bar or a diagonal (the three classes)."""
    h, w = size
    img = rng.uniform(0, 60, size=(h, w))
    rows, cols = np.mgrid[0:h, 0:w]
    at = rng.uniform(0.3, 0.7)
    if kind == "horizontal":
        on = np.abs(rows / h - at) < 0.15
    elif kind == "vertical":
        on = np.abs(cols / w - at) < 0.15
    else:
        on = np.abs(rows / h - cols / w) < 0.15
    img[on] = 255
    return img.astype(np.uint8)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """root/<class>/<image>: 12 images per class, of mixed sizes and formats."""
    monkeypatch.setenv("PAPERPLUG_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for kind in ("vertical", "horizontal", "diagonal"):
        (root / kind).mkdir(parents=True)
        for i in range(12):
            size = (16, 16) if i % 2 else (20, 24)
            img = PIL.fromarray(_bar(kind, size, rng))
            img.save(root / kind / f"{i:02d}.{'png' if i % 3 else 'bmp'}")
    (root / "vertical" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    return root


def test_image_folder_decodes_resizes_and_names_classes_in_sorted_order(folder):
    src = datasources.image_folder(folder, size=(8, 10))
    assert src.classes == ("diagonal", "horizontal", "vertical")
    assert src.x.shape == (36, 80) and src.image_shape == (8, 10) and src.channels == 1
    assert torch.equal(torch.bincount(src.y), torch.tensor([12, 12, 12]))
    assert 0 <= float(src.x.min()) and float(src.x.max()) <= 1
    # the first file of "horizontal" is 20x24; Pillow's own resize of it is what we hold
    expected = PIL.open(folder / "horizontal" / "00.bmp").convert("L").resize((10, 8),
                                                                            PIL.Resampling.BILINEAR)
    first = int((src.y == 1).nonzero()[0])
    assert torch.equal((src.x[first] * 255).round().to(torch.uint8),
                       torch.from_numpy(np.array(expected)).flatten())
    rgb = datasources.image_folder(folder, size=(8, 10), color="rgb")
    assert rgb.x.shape == (36, 240) and rgb.channels == 3
    # a gray image in RGB has three equal channels
    channels = rgb.x.reshape(36, 3, 80)
    assert torch.equal(channels[:, 0], channels[:, 1]) and torch.equal(channels[:, 1], channels[:, 2])


def test_image_folder_cache_is_used_then_invalidated_by_an_edit(folder, monkeypatch):
    first = datasources.image_folder(folder, size=(8, 8))
    cached = list((datasources.cache_dir() / "image_folder").glob("*.pt"))
    assert len(cached) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache holds this folder")

    with monkeypatch.context() as m:
        m.setattr(PIL, "open", no_decoding)
        again = datasources.image_folder(folder, size=(8, 8))
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    # another size is another entry; an edited file is decoded again
    datasources.image_folder(folder, size=(4, 4))
    assert len(list((datasources.cache_dir() / "image_folder").glob("*.pt"))) == 2
    edited = folder / "diagonal" / "03.bmp"  # a BMP of the same size keeps its byte count
    size = edited.stat().st_size
    PIL.fromarray(np.zeros((16, 16), np.uint8)).save(edited)
    os.utime(edited, ns=(1, 1))
    assert edited.stat().st_size == size  # only the modification time tells the edit
    changed = datasources.image_folder(folder, size=(8, 8))
    assert not torch.equal(changed.x, first.x)
    # a damaged cache file is decoded again, not trusted, and cache=False writes nothing
    for damage in (lambda f: f.write_bytes(b"garbage"),
                   lambda f: torch.save(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), f)):
        for f in (datasources.cache_dir() / "image_folder").glob("*.pt"):
            damage(f)
        assert torch.equal(datasources.image_folder(folder, size=(8, 8)).x, changed.x)
    before = sorted(p.name for p in (datasources.cache_dir() / "image_folder").iterdir())
    datasources.image_folder(folder, size=(5, 5), cache=False)
    assert sorted(p.name for p in (datasources.cache_dir() / "image_folder").iterdir()) == before


def test_image_folder_errors_name_the_field_and_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path: .*does not exist"):
        datasources.image_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no class sub-folders"):
        datasources.image_folder(tmp_path / "empty")
    (tmp_path / "empty" / "cat").mkdir()
    with pytest.raises(ConfigError, match=r"class folder .*cat.* holds no images"):
        datasources.image_folder(tmp_path / "empty")
    (tmp_path / "empty" / "cat" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "empty" / "dog").mkdir()
    PIL.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "empty" / "dog" / "a.png")
    with pytest.raises(ConfigError, match=r"cannot read image .*broken\.png"):
        datasources.image_folder(tmp_path / "empty", cache=False)
    with pytest.raises(ConfigError, match=r"data\.image_size"):
        datasources.image_folder(tmp_path / "empty", size=(0, 4))
    with pytest.raises(ConfigError, match=r"data\.color: expected one of grayscale, rgb"):
        datasources.image_folder(tmp_path / "empty", color="cmyk")


def test_splits_of_an_image_folder_are_stratified_unscaled_and_indexed(folder):
    s = data.load("image_folder", path=str(folder), size=(8, 8), calibration_fraction=0.25,
                  test_fraction=0.25)
    assert s.classes == ("diagonal", "horizontal", "vertical") and s.num_classes == 3
    assert s.image_shape == (8, 8) and s.channels == 1 and s.in_dim == 64
    for part, n in ((s.train, 6), (s.calibration, 3), (s.test, 3)):
        assert torch.equal(torch.bincount(part.y, minlength=3), torch.full((3,), n))
    index = torch.cat([s.train.index, s.calibration.index, s.test.index])
    assert torch.equal(index.sort().values, torch.arange(36))
    assert float(s.train.x.max()) <= 1  # images keep their [0, 1] values
    # an RGB folder shifts all channels of an image together
    rgb = data.load("image_folder", path=str(folder), size=(8, 8), color="rgb")
    x = rgb.train.x[:4]
    shifted, _ = data.RandomShift((8, 8), 2)(x, data.Batch())
    per_channel = shifted.reshape(4, 3, 64)
    assert torch.equal(per_channel[:, 0], per_channel[:, 2]) and not torch.equal(shifted, x)


pd = None


@pytest.fixture
def frame():
    global pd
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    n = 60
    species = np.array(["adelie", "gentoo", "chinstrap"])[np.arange(n) % 3]
    return pd.DataFrame({
        "bill": rng.normal(size=n) + (species == "gentoo") * 3,
        "island": np.array(["biscoe", "dream"])[np.arange(n) % 2],
        "year": 2007 + np.arange(n) % 3,  # integer-coded: one-hot only when declared categorical
        "species": species,
    })


def test_table_one_hot_encodes_text_and_declared_columns_and_maps_the_target(frame, tmp_path):
    path = tmp_path / "penguins.csv"
    frame.to_csv(path, index=False)
    src = datasources.table(path, target="species")
    assert src.classes == ("adelie", "chinstrap", "gentoo")
    assert src.x.shape == (60, 4)  # bill, island=biscoe, island=dream, year
    assert torch.allclose(src.x[:, 0], torch.as_tensor(frame["bill"].to_numpy(), dtype=torch.float32))
    assert torch.equal(src.x[:, 1], torch.as_tensor((frame["island"] == "biscoe").to_numpy(),
                                                    dtype=torch.float32))
    assert torch.equal(src.x[:, 1] + src.x[:, 2], torch.ones(60))
    names = {"adelie": 0, "chinstrap": 1, "gentoo": 2}
    assert src.y.tolist() == [names[v] for v in frame["species"]]
    declared = datasources.table(path, target="species", features=["year", "bill"],
                                 categorical=["year"])
    assert declared.x.shape == (60, 4)  # year=2007, 2008, 2009, then bill
    assert torch.equal(declared.x[:, :3].sum(1), torch.ones(60))
    # integer targets keep their order; the splits standardise with training statistics
    frame.assign(species=frame["species"].map(names) + 5).to_csv(tmp_path / "ids.csv", index=False)
    assert datasources.table(tmp_path / "ids.csv", target="species").classes == ("5", "6", "7")
    s = data.load("table", path=str(path), target="species")
    assert torch.allclose(s.train.x.mean(0), torch.zeros(4), atol=1e-5)
    assert s.image_shape is None and s.num_classes == 3


def test_parquet_reads_the_same_table(frame, tmp_path):
    pytest.importorskip("pyarrow")
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    a = datasources.table(tmp_path / "t.csv", target="species")
    b = datasources.table(tmp_path / "t.parquet", target="species")
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.classes == b.classes


def test_table_errors_name_the_field_and_the_column(frame, tmp_path):
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(ConfigError, match=r"data\.target: no column 'kind'; columns: \['bill'"):
        datasources.table(path, target="kind")
    with pytest.raises(ConfigError, match=r"data\.target: the table source needs"):
        datasources.table(path, target=None)
    with pytest.raises(ConfigError, match=r"data\.features: no column 'mass'"):
        datasources.table(path, target="species", features=["bill", "mass"])
    with pytest.raises(ConfigError, match=r"data\.categorical: no column 'sex'"):
        datasources.table(path, target="species", categorical=["sex"])
    with pytest.raises(ConfigError, match="cannot also be a feature"):
        datasources.table(path, target="species", features=["species"])
    frame.loc[3, "bill"] = np.nan
    frame.to_csv(tmp_path / "holes.csv", index=False)
    with pytest.raises(ConfigError, match=r"data\.features: column 'bill' has 1 missing value"):
        datasources.table(tmp_path / "holes.csv", target="species")
    frame.loc[3, "bill"] = 0.0
    frame.assign(species=0.5).to_csv(tmp_path / "reg.csv", index=False)
    with pytest.raises(ConfigError, match="non-integer numbers"):
        datasources.table(tmp_path / "reg.csv", target="species")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(ConfigError, match=r"expected a table \(\.csv"):
        datasources.table(tmp_path / "t.xlsx", target="species")


def test_arrays_from_npz_and_npy_and_image_shaped_arrays(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 5)).astype(np.float32), np.arange(30) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y, feats=x * 2, labels=y)
    src = datasources.arrays(tmp_path / "d.npz")
    assert torch.equal(src.x, torch.from_numpy(x)) and src.y.tolist() == y.tolist()
    other = datasources.arrays(tmp_path / "d.npz", features=["feats"], target="labels")
    assert torch.equal(other.x, torch.from_numpy(x * 2))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    assert torch.equal(datasources.arrays(tmp_path / "x.npy", target=str(tmp_path / "y.npy")).x,
                       src.x)
    images = rng.integers(0, 256, size=(30, 3, 4, 6), dtype=np.uint8)
    np.savez(tmp_path / "img.npz", x=images, y=y)
    img = datasources.arrays(tmp_path / "img.npz")
    assert img.image_shape == (4, 6) and img.channels == 3 and img.x.shape == (30, 72)
    assert torch.allclose(img.x * 255, torch.from_numpy(images.reshape(30, -1)).float())
    s = data.load("arrays", path=str(tmp_path / "img.npz"))
    assert s.image_shape == (4, 6) and float(s.train.x.max()) <= 1  # images: not standardised


def test_array_errors_and_no_pickle(tmp_path):
    np.savez(tmp_path / "short.npz", x=np.zeros((10, 2)), y=np.zeros(9))
    with pytest.raises(ConfigError, match=r"data\.target: x has 10 rows but y has 9"):
        datasources.arrays(tmp_path / "short.npz")
    with pytest.raises(ConfigError, match=r"data\.target: .* has no array 'y'"):
        np.savez(tmp_path / "nolabels.npz", x=np.zeros((10, 2)))
        datasources.arrays(tmp_path / "nolabels.npz")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    np.save(tmp_path / "y.npy", np.arange(4) % 2)
    with pytest.raises(ConfigError, match="without pickle"):
        datasources.arrays(tmp_path / "obj.npy", target=str(tmp_path / "y.npy"))
    with pytest.raises(ConfigError, match=r"data\.target: an \.npy source needs target"):
        datasources.arrays(tmp_path / "y.npy")
    np.savez(tmp_path / "one.npz", x=np.zeros((4, 2)), y=np.zeros(4))
    with pytest.raises(ConfigError, match="at least two classes"):
        datasources.arrays(tmp_path / "one.npz")
    np.savez(tmp_path / "nan.npz", x=np.full((4, 2), np.nan), y=np.arange(4) % 2)
    with pytest.raises(ConfigError, match="NaN or inf"):
        datasources.arrays(tmp_path / "nan.npz")


def _recipe(tmp_path, data_table: str) -> str:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f"""name = "own_images"
seed = 0

[data]
{data_table}
batch_size = 16

[encoder]
name = "mlp"
hidden_dims = [64]
out_dim = 3

[[objectives]]
name = "cross_entropy"

[optimizer]
name = "adamw"
lr = 3e-3

[trainer]
max_epochs = 25

[calibrator]
name = "temperature_scaling"
""")
    return str(recipe)


def test_a_recipe_trains_on_an_image_folder(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CI", "1")
    recipe = _recipe(tmp_path, f'name = "image_folder"\npath = "{folder}"\nimage_size = [8, 8]\n'
                               'calibration_fraction = 0.25\ntest_fraction = 0.25\n'
                               'augment = { shift = 1 }')
    assert main(["run", recipe, "--run-dir", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n_train"] + summary["n_calibration"] + summary["n_test"] == 36
    assert summary["accuracy"] >= 0.75  # chance is 1/3: bars of three orientations


@pytest.mark.parametrize(("table", "message"), [
    ('name = "image_folder"', "data.path: the image_folder source needs the path"),
    ('name = "image_folder"\npath = "x"\ntarget = "label"', "data.target: 'image_folder' takes no "
                                                            "target (only table, arrays do)"),
    ('name = "digits"\npath = "x"', "data.path: 'digits' takes no path"),
    ('name = "table"\npath = "missing.csv"\ntarget = "y"', "data.path: 'missing.csv' does not exist"),
])
def test_recipe_data_keys_are_checked_against_the_source(table, message, tmp_path, capsys):
    code = main(["run", _recipe(tmp_path, table), "--run-dir", str(tmp_path / "run")])
    assert code == 2 and message in capsys.readouterr().err
