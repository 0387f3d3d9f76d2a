"""Does a next-token model see the future? A probe of two forward passes, for language models.

A model trained to predict token ``t + 1`` from tokens ``0..t`` must not read tokens after ``t``: without a
causal attention mask (a hand-built 4D mask that keeps only the padding, a bidirectional encoder used as a
decoder, ``is_causal`` dropped) it copies the next token instead of predicting it. The training loss then
falls faster than it can at generation time, and nothing in the gradients or activations looks wrong.

The probe: change one token in the middle of the inputs and run the same forward call again; the outputs at
the positions before it must not move (they are bit-identical in a causal model, whatever the kernel). It
applies when the batch says the objective is next-token prediction: two integer ``[batch, time]`` tensors of
which one is the other (Hugging Face's convention: the model shifts the labels itself) or the other shifted
by one position, with ``-100`` (or a given ``ignore_index``) positions left out. Where the model is also
given the shifted targets (an encoder-decoder fed its targets, as Lightning's demo Transformer is), the mask
structure is the model's own business and the probe does not apply.

Thresholds: the change before the altered position, relative to the outputs' largest magnitude, is 0 in
healthy causal models (GPT-2 from Hugging Face, 5 seeds) and 0.012-0.022 in the same models without their
causal mask; anything above 1e-3 is a leak.

Example:
    >>> import torch
    >>> tokens = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7]] * 4)
    >>> pair = next_token_pair({"input_ids": tokens, "labels": tokens.clone()})
    >>> pair.shift, pair.position
    (0, 4)
    >>> embed, mix = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4)
    >>> causal = lambda x: mix(embed(x).cumsum(1))            # position t reads tokens 0..t
    >>> peeking = lambda x: mix(embed(x).flip(1).cumsum(1).flip(1))  # position t reads tokens t..T-1
    >>> leak_of(causal, (tokens,), {}, pair) == 0.0, leak_of(peeking, (tokens,), {}, pair) > 1e-3
    (True, True)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

__all__ = ["LEAK_MAX", "CallCapture", "FutureLeakProbe", "NextTokenPair", "contains", "leak_of", "next_token_pair"]

#: Outputs before the altered position may move by at most this fraction of their largest magnitude.
LEAK_MAX = 1e-3
# Fewer labelled positions than this, or sequences shorter than MIN_LENGTH, say nothing about the objective.
MIN_LABELLED = 16
MIN_LENGTH = 4


@dataclass
class NextTokenPair:
    """The inputs and the labels of a next-token objective found in a batch.

    Args:
        inputs: the token ids the model reads, ``[batch, time]``.
        labels: the targets; ``labels == inputs`` (``shift=0``, the model shifts them) or
            ``labels[:, t] == inputs[:, t + 1]`` (``shift=1``) wherever a label is given.
        shift: 0 or 1, as above.
        position: the position the probe alters; every row has a label there and before it.

    Example:
        >>> import torch
        >>> tokens = torch.arange(40).reshape(2, 20) % 7
        >>> pair = next_token_pair((tokens[:, :-1], tokens[:, 1:]))  # an (x, y) batch, y shifted by one
        >>> pair.shift, pair.position, pair.inputs.shape[1]
        (1, 9, 19)
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    shift: int
    position: int


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from _tensors(value)


def _token_matrices(batch: Any) -> List[torch.Tensor]:
    """Integer ``[batch, time]`` tensors, the inputs-like first (dict keys named so come first)."""
    found: List[torch.Tensor] = []
    if isinstance(batch, Mapping):  # Hugging Face batches name them; keep that order: input_ids, then labels
        named = [batch[k] for k in ("input_ids", "labels") if isinstance(batch.get(k), torch.Tensor)]
        found += named
    for t in _tensors(batch):
        if all(t is not f for f in found):
            found.append(t)
    return [t for t in found if t.dim() == 2 and not t.is_floating_point() and not t.is_complex()
            and t.dtype != torch.bool and t.shape[1] >= MIN_LENGTH]


def next_token_pair(batch: Any, ignore_index: int = -100) -> Optional[NextTokenPair]:
    """The (inputs, labels) of a next-token objective in ``batch``, or None when it has none.

    Reads a few values to the host (once per fit: the caller probes one batch).

    Args:
        batch: what the dataloader yields (a tensor, a tuple/list or a dict, nested).
        ignore_index: the label of positions the loss skips (cross-entropy's default ``-100``).
    """
    matrices = _token_matrices(batch)
    for i, inputs in enumerate(matrices):
        for labels in matrices[i + 1:]:
            if labels.shape != inputs.shape:
                continue
            given = labels != ignore_index
            for shift in (0, 1):
                if shift:
                    same, where = inputs[:, 1:] == labels[:, :-1], given[:, :-1]
                else:
                    same, where = inputs == labels, given
                count = int(where.sum())
                if count < MIN_LABELLED or not bool(same[where].all()):
                    continue
                # the altered position: half of the shortest labelled stretch, so it is a real token in every row
                shortest = int(given.sum(1).min())
                position = max(1, min(shortest, inputs.shape[1]) // 2)
                if position >= inputs.shape[1]:
                    continue
                return NextTokenPair(inputs, labels, shift, position)
    return None


def contains(structure: Any, tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` (this very object) is inside ``structure`` (tensors, dicts, lists, tuples)."""
    return any(t is tensor for t in _tensors(structure))


def _replace(structure: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    if isinstance(structure, torch.Tensor):
        return new if structure is old else structure
    if isinstance(structure, Mapping):
        replaced = {k: _replace(v, old, new) for k, v in structure.items()}
        if type(structure) is dict:
            return replaced
        try:  # an OrderedDict, a Hugging Face BatchEncoding: the same mapping type where it can be rebuilt
            return type(structure)(replaced)
        except Exception:
            return replaced
    if isinstance(structure, tuple) and hasattr(structure, "_fields"):  # a namedtuple
        return type(structure)(*(_replace(v, old, new) for v in structure))
    if isinstance(structure, (list, tuple)):
        return type(structure)(_replace(v, old, new) for v in structure)
    return structure


def _sequence_output(output: Any, batch: int, length: int) -> Optional[torch.Tensor]:
    """The first floating ``[batch, time, ...]`` tensor of a model's output (logits of a Hugging Face output)."""
    for t in _tensors(output):
        if t.is_floating_point() and t.dim() >= 2 and t.shape[0] == batch and t.shape[1] == length:
            return t
    return None


def leak_of(forward: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any],
            pair: NextTokenPair) -> Optional[float]:
    """How much the outputs before ``pair.position`` move when the token there changes (0 for a causal model).

    Runs ``forward`` twice without gradients, on ``args``/``kwargs`` as captured and with ``pair.inputs``
    replaced by a copy whose token at ``pair.position`` differs in every row. None when the output has no
    ``[batch, time, ...]`` tensor or the batch holds a single token value.

    Args:
        forward: the module (or function) the inputs were given to.
        args: its positional arguments, as captured.
        kwargs: its keyword arguments, as captured.
        pair: the next-token objective found in the batch.
    """
    inputs, p = pair.inputs, pair.position
    high, low = inputs.max(), inputs.min()
    if bool(high == low):
        return None
    altered = inputs.clone()
    altered[:, p] = torch.where(inputs[:, p] == high, low, high)
    with torch.no_grad():
        before = _sequence_output(forward(*args, **kwargs), *inputs.shape)
        after = _sequence_output(forward(*_replace(args, inputs, altered), **_replace(kwargs, inputs, altered)),
                                 *inputs.shape)
    if before is None or after is None:
        return None
    earlier_before, earlier_after = before[:, :p].float(), after[:, :p].float()
    scale = float(earlier_before.abs().max())
    if scale == 0.0:
        return None
    return float((earlier_after - earlier_before).abs().max()) / scale


class CallCapture:
    """Finds the outermost module call that receives a given tensor, during one forward pass.

    Registers a forward pre-hook on every module of ``root`` and keeps the first call (outer modules' hooks
    run first) whose arguments hold ``tensor``; every hook is removed as soon as it is found, or by
    :meth:`remove`.

    Args:
        root: the module whose submodules (itself included) are watched.
        tensor: the tensor to look for (by identity).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2))
        >>> tokens = torch.tensor([[1, 2, 3]])
        >>> capture = CallCapture(net, tokens)
        >>> _ = net(tokens)
        >>> capture.module is net, capture.args[0] is tokens
        (True, True)
    """

    def __init__(self, root: torch.nn.Module, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.module: Optional[torch.nn.Module] = None
        self.args: Tuple[Any, ...] = ()
        self.kwargs: Dict[str, Any] = {}
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in root.modules()]

    def _hook(self, module: torch.nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        if self.module is None and (contains(args, self.tensor) or contains(kwargs, self.tensor)):
            self.module, self.args, self.kwargs = module, args, dict(kwargs)
            self.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class FutureLeakProbe:
    """The probe over one training step: find the objective in the batch, capture the call, measure the leak.

    :meth:`start` with the first batch of a fit (before its forward pass), :meth:`finish` after that forward
    pass (before backward). The model runs the two probe passes in eval mode (no dropout, no update of
    normalisation statistics) and gets its modes back afterwards.

    Args:
        ignore_index: the label of positions the loss skips.

    Example:
        >>> import torch
        >>> class Peeking(torch.nn.Module):  # a "language model" whose position t reads every token
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed, self.out = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10)
        ...     def forward(self, tokens):
        ...         return self.out(self.embed(tokens).mean(1, keepdim=True).expand(-1, tokens.shape[1], -1))
        >>> model, tokens = Peeking(), torch.randint(0, 10, (4, 9))
        >>> probe = FutureLeakProbe()
        >>> probe.start(model, {"input_ids": tokens, "labels": tokens})
        True
        >>> _ = model(tokens)  # the training step's forward pass
        >>> probe.finish() > LEAK_MAX
        True
    """

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index
        self._capture: Optional[CallCapture] = None
        self._pair: Optional[NextTokenPair] = None
        #: the module the inputs were given to, once :meth:`finish` found one
        self.module: Optional[torch.nn.Module] = None


    def start(self, root: torch.nn.Module, batch: Any) -> bool:
        """Look for a next-token objective in ``batch``; if there is one, watch ``root`` for the call that reads
        its inputs. Returns whether it did."""
        self._pair = next_token_pair(batch, self.ignore_index)
        if self._pair is None:
            return False
        self._capture = CallCapture(root, self._pair.inputs)
        return True

    def finish(self) -> Optional[float]:
        """The leak (see :func:`leak_of`), or None when the probe does not apply; removes every hook."""
        capture, pair = self._capture, self._pair
        if capture is None or pair is None:
            return None
        capture.remove()
        self._capture, self._pair = None, None  # the captured arguments hold a batch: let it go
        module = self.module = capture.module
        if module is None:
            return None
        if pair.shift == 1 and (contains(capture.args, pair.labels) or contains(capture.kwargs, pair.labels)):
            return None  # the model is given its targets (an encoder-decoder fed them): its masks are its own
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        try:
            return leak_of(module, capture.args, capture.kwargs, pair)
        finally:
            for m, training in modes:
                m.training = training
