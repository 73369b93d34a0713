"""Per-layer records: the column Layout, and the Attributor's and the store's records agreeing."""

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import grass
from grass.layers import LayerColumns, Layout
from grass.store import GradientStore, StoreError

N = 9


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _data(n: int = N, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _attr(path=None) -> grass.Attributor:
    # Identity keeps each layer whole: k = 5 * 7 = 35 and 3 * 6 = 18, so the layers differ in width.
    return grass.Attributor(_model(), _loss, grass.Identity(), store=path, batch_size=4,
                            progress=False)


def test_layout_places_layers_in_the_given_order():
    layout = Layout([("b", 3), ("a", 2)])
    assert list(layout) == ["b", "a"] and layout.width == 5
    assert layout["b"] == LayerColumns("b", 3, 0) and layout["a"] == LayerColumns("a", 2, 3)
    assert layout["a"].stop == 5 and layout["a"].cols == slice(3, 5)
    assert layout.sizes == {"b": 3, "a": 2}
    assert layout == Layout([("b", 3), ("a", 2)])
    assert layout != Layout([("a", 2), ("b", 3)])  # the same layers in other columns
    assert layout != {"b": layout["b"], "a": layout["a"]}  # only a Layout equals a Layout
    with pytest.raises(KeyError, match=r"no layer named 'c'; the layers are \['b', 'a'\]"):
        layout["c"]


@pytest.mark.parametrize("sizes, message", [
    ([("a", 2), ("a", 3)], "layer 'a' is listed twice"),
    ([("a", 0)], "positive ints, got 'a': 0"),
    ([("a", True)], "positive ints, got 'a': True"),
    ([("a", 2.0)], "positive ints, got 'a': 2.0"),
    ([(3, 2)], "str names"),
    ([("a", 2, 1)], r"\(name, k\) pairs"),
])
def test_layout_refuses_bad_sizes(sizes, message):
    with pytest.raises(ValueError, match=message):
        Layout(sizes)


def test_attributor_and_store_columns_agree_by_name(tmp_path):
    attr = _attr(tmp_path / "s")
    store = attr.cache(_data())
    reopened = GradientStore.load(tmp_path / "s")
    names = [name for name, *_ in attr.config["layers"]]
    assert names == ["0", "2"] and list(attr.layers) == names
    for name, layer in attr.layers.items():
        assert layer.name == name and layer.module is attr.model.get_submodule(name)
        assert layer.columns.k == layer.map.k == layer.shape.numel
        assert store.layout[name] == layer.columns and reopened.layout[name] == layer.columns
    assert store.width == reopened.width == attr.layers.layout.width == 35 + 18
    # The rows hold each layer's features in the columns its record names.
    features = _attr().features(_data()).values
    for name, layer in attr.layers.items():
        torch.testing.assert_close(reopened.read(0, N, layer=name),
                                   features[:, layer.columns.cols])


def test_store_listing_the_layers_in_another_order_is_refused(tmp_path):
    path = tmp_path / "s"
    attr = _attr(path)
    # A store of the same configuration whose manifest lists the layers in the other order,
    # complete, so that only the order can stop it being used.
    swapped = Layout(reversed(list(attr.layers.layout.sizes.items())))
    store = GradientStore.open(path, config=attr.config, n_rows=N, layers=swapped)
    store.write(0, torch.randn(N, store.width))
    order = r"another column order \(\['2', '0'\]; requested \['0', '2'\]\)"
    with pytest.raises(StoreError, match=order):
        attr.cache(_data())
    with pytest.raises(StoreError, match=order):
        grass.Attributor.load(path, _model(), _loss, progress=False)
    # The store itself still opens with its own order.
    assert list(GradientStore.load(path).layout) == ["2", "0"]


def test_manifest_keeps_the_layers_as_name_k_pairs_in_column_order(tmp_path):
    # The on-disk form of a store's layers, which existing stores hold and this code must read:
    # [[name, k], ...] in the manifest, [[name, d_out, d_in, bias], ...] in its config.
    _attr(tmp_path / "s").cache(_data())
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["layers"] == [["0", 35], ["2", 18]] and manifest["width"] == 53
    assert manifest["config"]["layers"] == [["0", 5, 6, True], ["2", 3, 5, True]]
