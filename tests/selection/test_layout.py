"""hybrid.json: round trips, atomic writes that refuse to overwrite, and one-line errors for damaged files."""

import json

import pytest

from flashmorph.errors import ConfigError
from flashmorph.selection.layout import HybridLayout, SelectionCost, layout_from_full_layers


def _layer_layout():
    return layout_from_full_layers(4, [1, 3], "gates", inputs={"budget": 2, "gates": "runs/x/gates.safetensors"},
                                   layer_scores=[0.1, 0.9, 0.2, 0.8],
                                   cost=SelectionCost(forward_passes=3, wall_seconds=0.5, tokens=96))


def _head_layout():
    heads = [[True, False], [False, False], [True, True]]
    return HybridLayout(["full", "linear", "full"], "gates", inputs={"level": "head"}, full_heads=heads,
                        layer_scores=[0.5, 0.1, 0.9])


@pytest.mark.parametrize("make", [_layer_layout, _head_layout])
def test_round_trip(tmp_path, make):
    layout = make()
    path = layout.save(tmp_path / "hybrid.json")
    loaded = HybridLayout.load(path, num_layers=layout.num_layers)
    assert loaded == layout
    assert json.loads(path.read_text())["full_layers"] == layout.full_layers


def test_save_refuses_to_overwrite(tmp_path):
    path = _layer_layout().save(tmp_path / "hybrid.json")
    other = layout_from_full_layers(4, [0], "random")
    with pytest.raises(ConfigError, match="already exists.*--force"):
        other.save(path)
    other.save(path, overwrite=True)
    assert HybridLayout.load(path).full_layers == [0]
    assert [p.name for p in tmp_path.iterdir()] == ["hybrid.json"]  # no temp file left behind


def _damaged(tmp_path, edit):
    data = _layer_layout().to_dict()
    edit(data)
    path = tmp_path / "hybrid.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(num_layers=5), r"layer_types has 4 entries but num_layers=5"),
    (lambda d: d["layer_types"].__setitem__(0, "sliding"), r"layer_types\[0\]='sliding' is unknown"),
    (lambda d: d.update(full_layers=[0]), r"full_layers=\[0\] disagrees with layer_types"),
    (lambda d: d.update(format="other/2"), r"has format 'other/2'"),
    (lambda d: d.update(colour="red"), r"unknown key 'colour'"),
    (lambda d: d.pop("method"), r"lacks 'method'"),
    (lambda d: d.update(layer_scores=[0.1]), r"layer_scores must be a list of one number per layer \(4\)"),
    (lambda d: d.update(cost={"forward_passes": -1}), r"cost.forward_passes=-1"),
    (lambda d: d.update(full_heads=[[True], [False], [True], [True]]), r"layer_types\[0\]='linear' disagrees"),
])
def test_damaged_file_is_a_one_line_error(tmp_path, edit, message):
    path = _damaged(tmp_path, edit)
    with pytest.raises(ConfigError, match=message) as err:
        HybridLayout.load(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_wrong_layer_count_for_the_model(tmp_path):
    path = _layer_layout().save(tmp_path / "hybrid.json")
    with pytest.raises(ConfigError, match="describes 4 layers but the model has 6"):
        HybridLayout.load(path, num_layers=6)


def test_bad_json_and_missing_file(tmp_path):
    path = tmp_path / "hybrid.json"
    path.write_text(_layer_layout().to_json()[:40])  # truncated
    with pytest.raises(ConfigError, match=r"is not valid JSON \(line \d+"):
        HybridLayout.load(path)
    with pytest.raises(ConfigError, match="does not exist"):
        HybridLayout.load(tmp_path / "absent.json")


def test_constructor_validates():
    with pytest.raises(ConfigError, match="unknown"):
        HybridLayout(["full", "softmax"], "gates")
    with pytest.raises(ConfigError, match="outside"):
        layout_from_full_layers(2, [2], "gates")
    with pytest.raises(ConfigError, match="JSON values"):
        HybridLayout(["full"], "gates", inputs={"path": object()})
