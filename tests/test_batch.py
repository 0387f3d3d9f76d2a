"""Finding inputs and targets in batches of every common structure, and the errors when that fails."""
from __future__ import annotations

from collections import OrderedDict, namedtuple
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from lightwatch.core.batch import (
    BatchSelector,
    BatchSelectorError,
    describe,
    format_path,
    get_path,
    parse_selector,
    resolve_path,
    tensor_leaves,
)

X = torch.randn(4, 3)
Y = torch.tensor([0, 1, 2, 0])


def names(batch: Any, **kwargs: Any) -> tuple:
    fields = BatchSelector(**kwargs).resolve(batch)
    return [f.name for f in fields.inputs], [f.name for f in fields.targets]


@pytest.mark.parametrize("batch", [(X, Y), [X, Y], (X, Y, torch.arange(4))])
def test_tuples_and_lists_are_x_then_y(batch: Any) -> None:
    sel = BatchSelector()
    fields = sel.resolve(batch)
    assert [(f.name, f.path) for f in fields.inputs] == [("x", (0,))]
    assert [(f.name, f.path) for f in fields.targets] == [("y", (1,))]
    assert sel.get(batch, fields.inputs[0]) is X and sel.get(batch, fields.targets[0]) is Y


def test_a_bare_tensor_is_all_inputs() -> None:
    assert names(X) == (["x"], [])
    assert names((X,)) == (["x"], [])


@pytest.mark.parametrize("keys, expected", [
    (("x", "y"), (["x"], ["y"])),
    (("input", "label"), (["input"], ["label"])),
    (("image", "labels"), (["image"], ["labels"])),
    (("features", "target"), (["features"], ["target"])),
    (("inputs", "targets"), (["inputs"], ["targets"])),
    (("Image", "Label"), (["Image"], ["Label"])),  # case-insensitive fallback
])
def test_dicts_use_conventional_names(keys: tuple, expected: tuple) -> None:
    assert names({keys[0]: X, keys[1]: Y}) == expected


def test_hugging_face_style_batches_take_input_ids_and_labels() -> None:
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5),
             "labels": torch.zeros(2, 5, dtype=torch.long)}
    assert names(batch) == (["input_ids"], ["labels"])


def test_dicts_without_conventional_names_take_every_tensor_but_targets_and_indices() -> None:
    batch = OrderedDict(age=torch.zeros(4), income=torch.ones(4), idx=torch.arange(4), label=Y, note="text")
    assert names(batch) == (["age", "income"], ["label"])


def test_dataclasses_and_named_tuples() -> None:
    @dataclass
    class Batch:
        image: torch.Tensor
        label: torch.Tensor

    Pair = namedtuple("Pair", ["features", "target"])
    assert names(Batch(X, Y)) == (["image"], ["label"])
    sel = BatchSelector()
    fields = sel.resolve(Pair(X, Y))
    assert [f.name for f in fields.inputs] == ["features"] and sel.get(Pair(X, Y), fields.targets[0]) is Y


def test_nested_selectors_by_key_path() -> None:
    batch = ({"image": X, "meta": {"ids": Y}}, Y)
    sel = BatchSelector(inputs=["0.image", "0.meta.ids"], targets=1)
    fields = sel.resolve(batch)
    assert [f.name for f in fields.inputs] == ["0.image", "0.meta.ids"]
    assert [f.path for f in fields.inputs] == [(0, "image"), (0, "meta", "ids")]
    assert sel.get(batch, fields.inputs[1]) is Y and sel.get(batch, fields.targets[0]) is Y


def test_a_selected_container_stands_for_every_tensor_in_it() -> None:
    batch = {"inputs": {"ids": Y, "mask": X}, "y": Y}
    assert names(batch, inputs="inputs") == (["inputs.ids", "inputs.mask"], ["y"])
    # the default input pick of a plain tuple whose first element is a dict: x.<key>
    assert names(({"ids": Y, "mask": X}, Y)) == (["x.ids", "x.mask"], ["y"])


def test_key_paths_handle_negative_indices_int_keys_and_dotted_keys() -> None:
    assert resolve_path((X, Y), -1)[0] == (1,)
    assert resolve_path({0: X, "a.b": Y}, "0")[0] == (0,)
    assert resolve_path({"a.b": {"c": Y}}, "a.b.c") == (("a.b", "c"), Y)
    assert get_path({"a.b": {"c": Y}}, ("a.b", "c")) is Y
    assert parse_selector("inputs.ids") == ("inputs", "ids") and parse_selector(3) == (3,)
    assert format_path(()) == "<batch>" and format_path((0, "ids")) == "0.ids"


def test_empty_selection_lists_turn_a_side_off() -> None:
    assert names((X, Y), targets=[]) == (["x"], [])
    assert names((X, Y), inputs=[]) == ([], ["y"])


def test_sample_ids_selector() -> None:
    sel = BatchSelector(sample_ids="idx")
    fields = sel.resolve({"x": X, "y": Y, "idx": torch.arange(4)})
    assert fields.sample_ids is not None and fields.sample_ids.name == "idx"


def test_a_selector_that_matches_nothing_names_the_available_keys() -> None:
    with pytest.raises(BatchSelectorError) as err:
        BatchSelector(inputs="image").resolve({"pixels": X, "label": Y})
    msg = str(err.value)
    assert "'image'" in msg and "'pixels'" in msg and "'label'" in msg and "Tensor[4, 3] float32" in msg
    with pytest.raises(BatchSelectorError, match=r"indices 0\.\.1"):
        BatchSelector(inputs=2).resolve((X, Y))
    with pytest.raises(BatchSelectorError, match="no 'ids' in inputs"):
        BatchSelector(inputs="inputs.ids").resolve({"inputs": {"tokens": Y}})


def test_a_batch_without_tensors_is_a_clear_error() -> None:
    with pytest.raises(BatchSelectorError, match="cannot find any tensor.*str"):
        BatchSelector().resolve("just a string")
    with pytest.raises(BatchSelectorError, match="cannot find any tensor.*keys: 'text'"):
        BatchSelector().resolve({"text": ["a", "b"]})


def test_bad_selectors_fail_at_construction() -> None:
    for bad in ("a..b", "", 1.5, True):
        with pytest.raises(BatchSelectorError):
            BatchSelector(inputs=bad)  # type: ignore[arg-type]


def test_a_selected_node_without_tensors_is_an_error() -> None:
    with pytest.raises(BatchSelectorError, match="selects a list with no tensors"):
        BatchSelector(inputs="text").resolve({"text": ["a"], "y": Y})


def test_a_layout_change_after_the_first_batch_is_a_clear_error() -> None:
    sel = BatchSelector()
    fields = sel.resolve({"x": X, "y": Y})
    with pytest.raises(BatchSelectorError, match="field 'y'.*missing.*layout changed"):
        sel.get({"x": X}, fields.targets[0])


def test_describe_and_leaves() -> None:
    batch = {"a": X, "b": [Y, {"c": X}]}
    assert [format_path(p) for p, _ in tensor_leaves(batch)] == ["a", "b.0", "b.1.c"]
    assert describe(batch) == "a: Tensor[4, 3] float32, b.0: Tensor[4] int64, b.1.c: Tensor[4, 3] float32"
