"""Finding the data in a batch: tensors, tuples, lists, dicts, dataclasses and named tuples, nested.

A node of a batch is named by a *key path*, written as a dotted string: ``"0"`` (the first element of a
tuple), ``"image"`` (a dict key, dataclass field or named-tuple field), ``"inputs.ids"`` (nested), or an
``int`` for a top-level index. At a mapping a component is tried as a string key first, then as an int
key; a key that itself contains dots is found when the rest of the path matches it whole.

Selectors default to the usual layouts: for a ``(x, y)`` tuple or list, element 0 holds the inputs and
element 1 the targets; for a dict, dataclass or named tuple, the first field named like an input (``x``,
``input``, ``inputs``, ``features``, ``image``, ``input_ids``, ...) and the first named like a target (``y``,
``label``, ``labels``, ``target``, ``targets``, ...); a bare tensor is all inputs. A selected node that
is itself a container stands for every tensor inside it, each a field named by its path.

A selector that matches nothing, or a batch without tensors, is a :class:`BatchSelectorError` that names
the available keys and the tensors found, so the fix is one read away.

Example:
    >>> import torch
    >>> batch = {"inputs": {"ids": torch.zeros(2, 5, dtype=torch.long)}, "label": torch.tensor([0, 1])}
    >>> sel = BatchSelector(inputs="inputs.ids")
    >>> [f.name for f in sel.resolve(batch).inputs], [f.name for f in sel.resolve(batch).targets]
    (['inputs.ids'], ['label'])
    >>> sel.get(batch, sel.resolve(batch).targets[0]).tolist()
    [0, 1]
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Iterator, List, NamedTuple, Optional, Tuple, Union

import torch

__all__ = [
    "INPUT_NAMES",
    "TARGET_NAMES",
    "BatchSelectorError",
    "Field",
    "Fields",
    "BatchSelector",
    "KeyPath",
    "Selector",
    "children",
    "describe",
    "format_path",
    "get_path",
    "parse_selector",
    "resolve_path",
    "tensor_leaves",
]

KeyPath = Tuple[Any, ...]
Selector = Union[int, str]

#: Field names taken as the inputs of a dict-like batch, in order of preference.
INPUT_NAMES: Tuple[str, ...] = ("x", "input", "inputs", "features", "feature", "image", "images", "img",
                                "input_ids", "pixel_values", "data", "sample", "samples")
#: Field names taken as the targets of a dict-like batch, in order of preference.
TARGET_NAMES: Tuple[str, ...] = ("y", "label", "labels", "target", "targets", "class", "classes", "class_id")
# Fields that index samples rather than describe them: never taken as inputs by default.
_INDEX_NAMES = ("idx", "index", "indices", "sample_id", "sample_ids", "id", "uid")
_MAX_DEPTH = 16
_SHOWN = 12


class BatchSelectorError(ValueError):
    """A selector that matches nothing in a batch, or a batch in which no data can be found.

    The message names the selector that failed, the keys available where it stopped, and every tensor of
    the batch.

    Example:
        >>> import torch
        >>> try:
        ...     BatchSelector(inputs="image").resolve({"x": torch.zeros(2, 3)})
        ... except BatchSelectorError as err:
        ...     print("image" in str(err), "x" in str(err))
        True True
    """


class Field(NamedTuple):
    """One tensor of a batch: its display name and its canonical key path.

    Example:
        >>> import torch
        >>> batch = {"inputs": {"ids": torch.zeros(2, 5, dtype=torch.long)}, "labels": torch.zeros(2)}
        >>> field = BatchSelector(inputs="inputs.ids", targets="labels").resolve(batch).inputs[0]
        >>> field.name, field.path
        ('inputs.ids', ('inputs', 'ids'))
    """

    name: str
    path: KeyPath


class Fields(NamedTuple):
    """The fields a :class:`BatchSelector` found: inputs, targets and (optionally) sample ids.

    Example:
        >>> import torch
        >>> batch = {"x": torch.zeros(4, 3), "y": torch.zeros(4, dtype=torch.long), "idx": torch.arange(4)}
        >>> fields = BatchSelector(sample_ids="idx").resolve(batch)
        >>> [f.name for f in fields.inputs], [f.name for f in fields.targets], fields.sample_ids.name
        (['x'], ['y'], 'idx')
    """

    inputs: List[Field]
    targets: List[Field]
    sample_ids: Optional[Field]


def _is_namedtuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")


def children(node: Any) -> Optional[List[Tuple[Any, Any]]]:
    """``(key, child)`` pairs of a container node, or ``None`` for a leaf (tensors, numbers, strings).

    Mappings give their items, named tuples and dataclass instances their fields by name, other tuples and
    lists their elements by index.
    """
    if isinstance(node, torch.Tensor) or isinstance(node, (str, bytes)):
        return None
    if isinstance(node, Mapping):
        return list(node.items())
    if _is_namedtuple(node):
        return [(name, getattr(node, name)) for name in node._fields]
    if isinstance(node, (tuple, list)):
        return list(enumerate(node))
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node)]
    return None


def format_path(path: KeyPath) -> str:
    """A key path as the dotted string a selector would use (``"<batch>"`` for the batch itself)."""
    return ".".join(str(k) for k in path) if path else "<batch>"


def _describe_leaf(node: Any) -> str:
    if isinstance(node, torch.Tensor):
        dtype = str(node.dtype).replace("torch.", "")
        return f"Tensor{list(node.shape)} {dtype}"
    return type(node).__name__


def tensor_leaves(node: Any, prefix: KeyPath = ()) -> List[Tuple[KeyPath, torch.Tensor]]:
    """Every tensor under ``node`` with its key path, depth first, in container order."""
    out: List[Tuple[KeyPath, torch.Tensor]] = []

    def walk(n: Any, path: KeyPath, depth: int) -> None:
        if isinstance(n, torch.Tensor):
            out.append((path, n))
            return
        kids = children(n) if depth < _MAX_DEPTH else None
        for key, child in kids or []:
            walk(child, path + (key,), depth + 1)

    walk(node, prefix, 0)
    return out


def describe(batch: Any, limit: int = _SHOWN) -> str:
    """A one-line summary of the tensors in ``batch`` (``"0: Tensor[16, 8] float32, 1: ..."``)."""
    leaves = tensor_leaves(batch)
    if not leaves:
        kids = children(batch)
        if kids is None:
            return f"a {type(batch).__name__} with no tensors"
        keys = ", ".join(repr(k) for k, _ in kids[:limit])
        return f"a {type(batch).__name__} with no tensors (keys: {keys or 'none'})"
    shown = ", ".join(f"{format_path(p)}: {_describe_leaf(t)}" for p, t in leaves[:limit])
    more = f", ... ({len(leaves) - limit} more)" if len(leaves) > limit else ""
    return shown + more


def parse_selector(selector: Selector) -> KeyPath:
    """A selector as a tuple of path components: ``0 -> (0,)``, ``"inputs.ids" -> ("inputs", "ids")``."""
    if isinstance(selector, bool):
        raise BatchSelectorError(f"a batch selector must be an int or a dotted string, got {selector!r}")
    if isinstance(selector, int):
        return (selector,)
    if isinstance(selector, str):
        if not selector or any(not part for part in selector.split(".")):
            raise BatchSelectorError(f"batch selector {selector!r} has an empty component; write e.g. "
                                     "'inputs.ids' or '0'")
        return tuple(selector.split("."))
    raise BatchSelectorError(f"a batch selector must be an int or a dotted string such as 'inputs.ids', got "
                             f"{type(selector).__name__} {selector!r}")


def _as_index(component: Any) -> Optional[int]:
    if isinstance(component, int) and not isinstance(component, bool):
        return component
    if isinstance(component, str):
        text = component[1:] if component.startswith("-") else component
        if text.isdigit():
            return int(component)
    return None


def _keys_of(node: Any) -> str:
    kids = children(node)
    if kids is None:
        return f"none ({_describe_leaf(node)} cannot be indexed)"
    if isinstance(node, (tuple, list)) and not _is_namedtuple(node):
        return f"indices 0..{len(node) - 1}" if len(node) else "none (empty)"
    keys = [repr(k) for k, _ in kids]
    return ", ".join(keys[:_SHOWN]) + (" ..." if len(keys) > _SHOWN else "") if keys else "none (empty)"


def _step(node: Any, component: Any, rest: Tuple[Any, ...]) -> Optional[Tuple[Any, Any, int]]:
    """Resolve one component at ``node``: ``(canonical key, child, extra components consumed)`` or None."""
    if isinstance(node, Mapping):
        if component in node:
            return component, node[component], 0
        index = _as_index(component)
        if index is not None and index in node:
            return index, node[index], 0
        if isinstance(component, str):  # a key that contains dots: match the longest joined prefix
            for j in range(len(rest), 0, -1):
                joined = ".".join([component] + [str(r) for r in rest[:j]])
                if joined in node:
                    return joined, node[joined], j
        return None
    if _is_namedtuple(node) and isinstance(component, str) and component in node._fields:
        return component, getattr(node, component), 0
    if isinstance(node, (tuple, list)):
        index = _as_index(component)
        if index is not None and -len(node) <= index < len(node):
            index = index % len(node)
            return index, node[index], 0
        return None
    if dataclasses.is_dataclass(node) and not isinstance(node, type) and isinstance(component, str):
        names = [f.name for f in dataclasses.fields(node)]
        if component in names:
            return component, getattr(node, component), 0
    return None


def resolve_path(batch: Any, selector: Union[Selector, KeyPath], where: str = "lightwatch") -> Tuple[KeyPath, Any]:
    """Follow ``selector`` into ``batch``; returns ``(canonical key path, node)``.

    The canonical path holds the actual keys (ints for sequence indices), so :func:`get_path` can follow
    it again on later batches without parsing.

    Raises:
        BatchSelectorError: naming the component that matched nothing, the keys available there, and the
            tensors of the batch.
    """
    parts = selector if isinstance(selector, tuple) else parse_selector(selector)
    node, canonical, i = batch, [], 0
    while i < len(parts):
        found = _step(node, parts[i], tuple(parts[i + 1:]))
        if found is None:
            at = format_path(tuple(canonical))
            raise BatchSelectorError(
                f"{where}: selector {format_path(tuple(parts))!r} matches nothing: no {parts[i]!r} in "
                f"{at} ({type(node).__name__}); available keys there: {_keys_of(node)}. Tensors in the batch: "
                f"{describe(batch)}. Pass a dotted key path such as 'inputs.ids' or an index such as 0."
            )
        key, node, consumed = found
        canonical.append(key)
        i += 1 + consumed
    return tuple(canonical), node


def get_path(batch: Any, path: KeyPath) -> Any:
    """The node at a canonical key path (from :func:`resolve_path`); ``LookupError`` if it is gone."""
    node = batch
    for key in path:
        kind = type(node)
        # plain containers first: an ABC isinstance check costs microseconds per batch and field
        if kind is dict or ((kind is list or kind is tuple) and type(key) is int) or isinstance(node, Mapping) or (
                isinstance(node, (tuple, list)) and isinstance(key, int)):
            try:
                node = node[key]
            except (KeyError, IndexError) as err:
                raise LookupError(key) from err
        elif hasattr(node, key if isinstance(key, str) else "\0"):
            node = getattr(node, key)
        else:
            raise LookupError(key)
    return node


def _find_named(batch: Any, names: Tuple[str, ...]) -> Optional[Any]:
    kids = children(batch) or []
    keys = [k for k, _ in kids]
    for name in names:
        if name in keys:
            return name
    lowered = {str(k).lower(): k for k in keys}
    for name in names:
        if name in lowered:
            return lowered[name]
    return None


class BatchSelector:
    """Finds input, target and sample-id tensors in batches of any structure.

    Args:
        inputs: a selector (``0``, ``"image"``, ``"inputs.ids"``) or a list of them; ``None`` picks the
            default for the batch layout (see the module docstring); ``[]`` selects no inputs.
        targets: likewise for targets; ``None`` picks the default, ``[]`` selects none.
        sample_ids: optional selector of per-sample ids (e.g. dataset indices) in the batch.
        where: the owner's name, for error messages.

    Example:
        >>> import torch
        >>> sel = BatchSelector()
        >>> fields = sel.resolve((torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)))
        >>> [(f.name, f.path) for f in fields.inputs + fields.targets]
        [('x', (0,)), ('y', (1,))]
    """

    def __init__(
        self,
        inputs: Optional[Union[Selector, Sequence[Selector]]] = None,
        targets: Optional[Union[Selector, Sequence[Selector]]] = None,
        sample_ids: Optional[Selector] = None,
        where: str = "lightwatch",
    ) -> None:
        self.where = where
        self.inputs = self._selectors(inputs, "inputs")
        self.targets = self._selectors(targets, "targets")
        if sample_ids is not None:
            parse_selector(sample_ids)
        self.sample_ids = sample_ids

    def _selectors(self, value: Any, name: str) -> Optional[List[Selector]]:
        if value is None:
            return None
        if isinstance(value, (int, str)):
            items = [value]
        elif isinstance(value, Sequence) or hasattr(value, "__iter__") and not isinstance(value, Mapping):
            items = list(value)  # lists, tuples and OmegaConf ListConfig
        else:
            raise BatchSelectorError(f"{self.where}({name}=...): expected a selector (an int or a dotted string) "
                                     f"or a list of them, got {type(value).__name__} {value!r}")
        for item in items:
            try:
                parse_selector(item)
            except BatchSelectorError as err:
                raise BatchSelectorError(f"{self.where}({name}=...): {err}") from None
        return items

    # ------------------------------------------------------------------------------------- resolve
    def resolve(self, batch: Any) -> Fields:
        """The fields of ``batch`` (resolve once per layout, then :meth:`get` each batch)."""
        leaves = tensor_leaves(batch)
        if not leaves:
            raise BatchSelectorError(
                f"{self.where}: cannot find any tensor in the batch: got {describe(batch)}. Batches must be "
                f"tensors, or tuples, lists, dicts, dataclasses or named tuples holding tensors; convert the "
                f"batch in your collate_fn or transfer_batch_to_device."
            )
        sequence = isinstance(batch, (tuple, list)) and not _is_namedtuple(batch)
        if self.targets is None:
            target_paths = self._default_targets(batch, sequence)
            target_fields = self._fields(batch, target_paths, alias="y" if sequence else None)
        else:
            target_fields = self._selected(batch, self.targets, "targets")
        if self.inputs is None:
            exclude = {f.path for f in target_fields}
            input_paths = self._default_inputs(batch, sequence, exclude)
            plain = sequence or isinstance(batch, torch.Tensor)
            input_fields = self._fields(batch, input_paths, alias="x" if plain else None)
            if not input_fields and not target_fields:
                raise BatchSelectorError(
                    f"{self.where}: no input tensors found by default in a {type(batch).__name__} batch "
                    f"({describe(batch)}). Pass inputs=... with a key path, e.g. inputs='image'."
                )
        else:
            input_fields = self._selected(batch, self.inputs, "inputs")
        ids = None
        if self.sample_ids is not None:
            path, node = resolve_path(batch, self.sample_ids, f"{self.where}(sample_ids=...)")
            if not isinstance(node, torch.Tensor):
                raise BatchSelectorError(f"{self.where}(sample_ids=...): {format_path(path)!r} is a "
                                         f"{type(node).__name__}, expected a tensor of integer ids")
            ids = Field(format_path(path), path)
        return Fields(input_fields, target_fields, ids)

    def _default_targets(self, batch: Any, sequence: bool) -> List[KeyPath]:
        if sequence:
            return [(1,)] if len(batch) >= 2 and tensor_leaves(batch[1]) else []
        if isinstance(batch, torch.Tensor):
            return []
        key = _find_named(batch, TARGET_NAMES)
        return [(key,)] if key is not None else []

    def _default_inputs(self, batch: Any, sequence: bool, exclude: set) -> List[KeyPath]:
        if isinstance(batch, torch.Tensor):
            return [()]
        if sequence:
            return [(0,)] if len(batch) else []
        key = _find_named(batch, INPUT_NAMES)
        if key is not None:
            return [(key,)]
        # No conventional name: every tensor that is neither a target nor a sample index.
        kids = children(batch) or []
        return [(k,) for k, child in kids if (k,) not in exclude and str(k).lower() not in _INDEX_NAMES
                and tensor_leaves(child)]

    def _selected(self, batch: Any, selectors: List[Selector], name: str) -> List[Field]:
        out: List[Field] = []
        for sel in selectors:
            path, node = resolve_path(batch, sel, f"{self.where}({name}=...)")
            fields = self._fields(batch, [path])
            if not fields:
                raise BatchSelectorError(
                    f"{self.where}({name}=...): {format_path(path)!r} selects a {type(node).__name__} with no "
                    f"tensors. Tensors in the batch: {describe(batch)}."
                )
            out += fields
        return out

    @staticmethod
    def _fields(batch: Any, paths: List[KeyPath], alias: Optional[str] = None) -> List[Field]:
        out: List[Field] = []
        for path in paths:
            node = get_path(batch, path)
            for leaf_path, _ in tensor_leaves(node, path):
                name = format_path(leaf_path)
                if alias is not None:  # a default pick of a plain layout: "x"/"y" rather than "0"/"1"
                    name = format_path((alias,) + leaf_path[len(path):])
                out.append(Field(name, leaf_path))
        return out

    # ----------------------------------------------------------------------------------------- get
    def get(self, batch: Any, field: Field) -> torch.Tensor:
        """The tensor of ``field`` in ``batch``; a clear :class:`BatchSelectorError` if the layout changed."""
        try:
            node = get_path(batch, field.path)
        except LookupError:
            node = None
        if not isinstance(node, torch.Tensor):
            raise BatchSelectorError(
                f"{self.where}: field {field.name!r} (key path {format_path(field.path)!r}) is missing from this "
                f"batch, whose layout changed since the first one: {describe(batch)}. Keep one batch layout per "
                f"split, or select the fields explicitly."
            )
        return node

    def iter_tensors(self, batch: Any, fields: List[Field]) -> Iterator[Tuple[Field, torch.Tensor]]:
        for field in fields:
            yield field, self.get(batch, field)
