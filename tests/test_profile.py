"""Data profiles: JSON round trips, strict JSON, atomic writes, and clear errors for bad files."""
from __future__ import annotations

import json
import os
from typing import Any, Dict

import pytest
import torch

from lightwatch.metrics import Histogram, LabelCounts, Moments, SampleHasher
from lightwatch.profile import (
    PROFILE_FORMAT,
    DataProfile,
    FieldProfile,
    ProfileError,
    SplitProfile,
    dtype_name,
    parse_dtype,
)


def make_profile(with_nan: bool = True) -> DataProfile:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    if with_nan:
        x[5, 1] = float("nan")
        x[:, 2] = 0.0  # a constant feature
    m = Moments(num_features=3)
    m.update(x)
    h = Histogram.from_quantiles(x, bins=5)
    h.update(x)
    labels = LabelCounts(num_classes=4)
    labels.update(torch.randint(0, 4, (200,), generator=g))
    hashes = SampleHasher()
    hashes.update(x)
    fields = {
        "x": FieldProfile("x", "input", "numeric", "float32", [3], 1, 3, ["a", "b", "c"], m, h),
        "y": FieldProfile("y", "target", "labels", "int64", [], None, 1, labels=labels, num_classes=4),
    }
    train = SplitProfile("train", samples=200, batches=13, epoch=1, step=26, fields=fields,
                         duplicates={"samples": 200, "unique": 200, "duplicates": 0, "duplicate_fraction": 0.0},
                         hashes=hashes)
    return DataProfile({"train": train})


def test_round_trip_is_exact(tmp_path: Any) -> None:
    profile = make_profile()
    path = str(tmp_path / "p.json")
    profile.save(path)
    back = DataProfile.load(path)
    a, b = profile.splits["train"], back.splits["train"]
    assert (b.samples, b.batches, b.epoch, b.step) == (200, 13, 1, 26)
    fa, fb = a.fields["x"], b.fields["x"]
    assert (fb.dtype, fb.shape, fb.feature_dim, fb.num_features) == ("float32", [3], 1, 3)
    assert fb.feature_names == ["a", "b", "c"]
    assert torch.equal(fb.histogram.edges, fa.histogram.edges)
    assert torch.equal(fb.histogram.binned_counts(), fa.histogram.binned_counts())
    ma, mb = fa.moments.compute(), fb.moments.compute()
    for key in ("count", "nan_count", "mean", "var", "min", "max"):
        assert torch.allclose(ma[key].double(), mb[key].double(), equal_nan=True, rtol=0, atol=0), key
    assert b.fields["y"].labels.counts.tolist() == a.fields["y"].labels.counts.tolist()
    assert b.fields["y"].num_classes == 4
    assert torch.equal(b.hashes.hashes(), a.hashes.hashes())
    assert fb.feature_label(1) == "x.b" and b.fields["y"].feature_label(0) == "y"


def test_files_are_strict_json_without_temporaries(tmp_path: Any) -> None:
    path = tmp_path / "p.json"
    make_profile().save(str(path))
    assert os.listdir(tmp_path) == ["p.json"]

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data["format"] == PROFILE_FORMAT and data["version"] == 1
    assert "nan" in json.dumps(data["splits"]["train"]["fields"]["x"]["moments"])  # NaN written as the string


def test_profiles_can_leave_the_hashes_out(tmp_path: Any) -> None:
    path = str(tmp_path / "p.json")
    make_profile().save(path, with_hashes=False)
    assert DataProfile.load(path).splits["train"].hashes is None


def test_split_lookup_falls_back_to_train() -> None:
    profile = make_profile()
    assert profile.split("val") is profile.splits["train"]
    assert profile.split("val", fallback=()) is None


def write(tmp_path: Any, obj: Any, raw: bool = False) -> str:
    path = tmp_path / "bad.json"
    path.write_text(obj if raw else json.dumps(obj))
    return str(path)


def good_dict() -> Dict[str, Any]:
    return make_profile().to_dict()


def test_a_truncated_file_is_a_clear_error(tmp_path: Any) -> None:
    text = json.dumps(good_dict())
    with pytest.raises(ProfileError, match=r"bad\.json.*not valid JSON.*line 1.*truncated"):
        DataProfile.load(write(tmp_path, text[: len(text) // 2], raw=True))


def test_a_missing_file_says_how_to_make_one(tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist.*profile_path"):
        DataProfile.load(str(tmp_path / "nope.json"))


def test_a_binary_file_is_rejected(tmp_path: Any) -> None:
    path = tmp_path / "p.pkl"
    path.write_bytes(b"\x80\x04\x95\xff\xfe")
    with pytest.raises(ProfileError, match="not a text file|not valid JSON"):
        DataProfile.load(str(path))


@pytest.mark.parametrize("mutate, pattern", [
    (lambda d: d.update(format="tfdv"), "'format' is 'tfdv'.*not a lightwatch data profile"),
    (lambda d: d.update(version=99), "version 99 was written by a newer lightwatch"),
    (lambda d: d.update(version="1"), "'version' must be a positive integer"),
    (lambda d: d.pop("splits"), "missing key 'splits'"),
    (lambda d: d["splits"]["train"].update(samples=-1), r"split 'train': key 'samples' must be >= 0"),
    (lambda d: d["splits"]["train"]["fields"]["x"].update(num_features=4, feature_names=None),
     r"field 'x': 'moments' has 3 features but num_features is 4"),
    (lambda d: d["splits"]["train"]["fields"]["x"].update(dtype="float33"), r"field 'x': key 'dtype': unknown dtype"),
    (lambda d: d["splits"]["train"]["fields"]["x"].update(kind="text"), r"field 'x': key 'kind' must be one of"),
    (lambda d: d["splits"]["train"]["fields"]["x"]["histogram"].update(edges=[[0, 0, 1, 2, 3, 4]] * 3),
     r"field 'x': key 'histogram': .*strictly increasing"),
    (lambda d: d["splits"]["train"]["fields"]["x"]["moments"].update(count=[1, 2]),
     r"field 'x': key 'moments': .*'count' has 2 entries, expected 3"),
    (lambda d: d["splits"]["train"]["fields"]["y"].update(labels=None), r"field 'y': a labels field needs 'labels'"),
    (lambda d: d["splits"]["train"]["fields"]["y"].update(num_classes=0), r"field 'y': key 'num_classes' must be >= 1"),
    (lambda d: d["splits"]["train"]["hashes"].update(hashes="***"), r"split 'train': key 'hashes': .*base64"),
])
def test_corrupt_or_foreign_profiles_name_what_and_where(tmp_path: Any, mutate: Any, pattern: str) -> None:
    d = good_dict()
    mutate(d)
    with pytest.raises(ProfileError, match=pattern) as err:
        DataProfile.load(write(tmp_path, d))
    assert "bad.json" in str(err.value)


def test_a_json_array_is_not_a_profile(tmp_path: Any) -> None:
    with pytest.raises(ProfileError, match="expected a JSON object, got list"):
        DataProfile.load(write(tmp_path, [1, 2]))


def test_layout_checks_name_both_layouts() -> None:
    field = make_profile().splits["train"].fields["x"]
    field.check_layout(3, "numeric", "here")
    with pytest.raises(ProfileError, match=r"here: field 'x' has 3 features in the reference.*but 5 in this run"):
        field.check_layout(5, "numeric", "here")
    with pytest.raises(ProfileError, match="numeric data in the reference profile but labels data"):
        field.check_layout(3, "labels", "here")


def test_dtype_names() -> None:
    assert dtype_name(torch.bfloat16) == "bfloat16" and parse_dtype("int64") is torch.int64
    with pytest.raises(ValueError, match="unknown dtype 'Tensor'"):
        parse_dtype("Tensor")


def test_summary_reads_well() -> None:
    text = make_profile().summary()
    assert "[train] 200 samples in 13 batches" in text and "y: labels, 4 classes" in text
