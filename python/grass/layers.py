"""Per-layer records: each layer's columns in a feature row, and what is tracked for it.

A feature row is the concatenation of every captured layer's k_l compressed coordinates.
``Layout`` is that row's plan: an ordered, immutable mapping name -> ``LayerColumns`` (the
layer's k_l columns [start, stop)), built in one place from ordered (name, k_l) pairs. A store
keeps its Layout; curvature, scoring, the sampled Fisher and the index take the Layout (or some
of its records) to find a layer's columns.

``TrackedLayers`` is the Attributor's view of the same layers: per layer the module, its
``LayerShape``, its built ``LayerMap`` and its ``LayerColumns``, with the Layout they form.
Both are looked up by layer name; two Layouts are equal only when every name has the same
columns, which fixes the order as well.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Generic, TypeVar

from torch import nn

from .compressors import LayerMap, LayerShape

__all__ = ["LayerColumns", "Layout", "TrackedLayer", "TrackedLayers"]

R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class LayerColumns:
    """Layer ``name``'s k columns [start, start + k) of a feature row."""

    name: str
    k: int
    start: int

    @property
    def stop(self) -> int:
        return self.start + self.k

    @property
    def cols(self) -> slice:
        """The columns as a slice: ``rows[:, columns.cols]`` is the layer's (m, k) block."""
        return slice(self.start, self.stop)


class _ByName(Mapping, Generic[R]):
    """An immutable ordered mapping layer name -> record; a missing name is a KeyError that
    lists the known names."""

    def __init__(self, records: dict[str, R]):
        self._records = records

    def __getitem__(self, name: str) -> R:
        try:
            return self._records[name]
        except KeyError:
            raise KeyError(f"no layer named {name!r}; the layers are {list(self._records)}"
                           ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)


class Layout(_ByName[LayerColumns]):
    """The columns of a feature row: name -> LayerColumns, contiguous, in the order given.

    sizes: ordered (name, k_l) pairs, names distinct str, k_l positive int; ValueError
    otherwise. ``width`` is sum_l k_l.
    """

    def __init__(self, sizes: Iterable[tuple[str, int]]):
        records: dict[str, LayerColumns] = {}
        start = 0
        for pair in sizes:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ValueError(f"layers must be (name, k) pairs; got {pair!r}")
            name, k = pair
            if not isinstance(name, str) or isinstance(k, bool) or not isinstance(k, int) or k <= 0:
                raise ValueError(f"layers must map str names to positive ints, got {name!r}: {k!r}")
            if name in records:
                raise ValueError(f"layer {name!r} is listed twice; layer names must be distinct")
            records[name] = LayerColumns(name, k, start)
            start += k
        super().__init__(records)
        self.width = start

    @property
    def sizes(self) -> dict[str, int]:
        """name -> k_l, in column order (what a store's manifest records, as pairs)."""
        return {name: c.k for name, c in self.items()}

    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and list(self.values()) == list(other.values())

    def __repr__(self) -> str:
        return f"Layout({[(c.name, c.k) for c in self.values()]})"


@dataclasses.dataclass(frozen=True)
class TrackedLayer:
    """One captured layer: its module, shape (weight (d_out, d_in), bias), built compressor map
    ((B, T, d_in) acts, (B, T, d_out) grads -> (B, k) fp32) and columns in the feature row."""

    module: nn.Module
    shape: LayerShape
    map: LayerMap
    columns: LayerColumns

    @property
    def name(self) -> str:
        return self.shape.name


class TrackedLayers(_ByName[TrackedLayer]):
    """The Attributor's captured layers, name -> TrackedLayer in column order, and their
    ``layout``. Built from ordered (module, shape, map) triples: the columns follow from the
    maps' k in that order."""

    def __init__(self, layers: Iterable[tuple[nn.Module, LayerShape, LayerMap]]):
        layers = list(layers)
        self.layout = Layout((shape.name, layer_map.k) for _, shape, layer_map in layers)
        super().__init__({
            shape.name: TrackedLayer(module, shape, layer_map, self.layout[shape.name])
            for module, shape, layer_map in layers})

    def config(self) -> list[list]:
        """[[name, d_out, d_in, bias], ...] in column order: the layers' part of a config."""
        return [[t.shape.name, t.shape.d_out, t.shape.d_in, t.shape.bias] for t in self.values()]

    def __repr__(self) -> str:
        return f"TrackedLayers({[(t.name, t.columns.k) for t in self.values()]})"
