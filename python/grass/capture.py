"""Capture of compressed per-example gradients from a model's linear layers.

``track_layers`` selects the layers and builds their records (module, shape, compressor map,
columns: ``grass.layers.TrackedLayers``); ``Capture`` fills each layer's columns of a feature row.

While a ``Capture`` is active, every selected layer runs its forward through ``_CapturedLinear``,
a custom autograd Function with the same output. Its backward computes only the input gradient
(for the rest of the network) and hands the layer's inputs and output gradients to the layer's
compressor; the weight-gradient GEMM is never run and no ``.grad`` is formed. All parameters
are frozen for the duration, so autograd does no work for the other parameters either.

``loss_fn(model, batch)`` returns per-example losses (B,); the backward of their sum gives every
example the output gradients of its own loss, because examples do not interact in the model.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterable

import torch
from torch import nn

from .compressors import Compressor, LayerShape
from .layers import TrackedLayer, TrackedLayers

# What ``layers=`` accepts: fnmatch name patterns and/or module types, one or several.
LayerSpec = str | type | Iterable[str | type] | None


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): y = x @ W + b with W (d_in, d_out); no import needed."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def layer_shape(name: str, module: nn.Module) -> LayerShape:
    d_out, d_in = _weight_out_in(module).shape
    return LayerShape(name, d_in=d_in, d_out=d_out, bias=module.bias is not None)


def track_layers(model: nn.Module, layers: LayerSpec, compressor: Compressor, *, seed: int,
                 device: torch.device) -> TrackedLayers:
    """The records of the layers ``layers`` selects (see ``select_layers``), in module order:
    each layer's module, shape, the map ``compressor`` builds for it (from ``seed`` and the
    layer's name, on ``device``) and its columns in the feature row."""
    records = []
    for name, module in select_layers(model, layers).items():
        shape = layer_shape(name, module)
        records.append((module, shape, compressor.build(shape, seed=seed, device=device)))
    return TrackedLayers(records)


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as (d_out, d_in), a view for Conv1D."""
    return module.weight.t() if _is_conv1d(module) else module.weight


def select_layers(model: nn.Module, layers: LayerSpec = None) -> dict[str, nn.Module]:
    """The captured layers in module order: every nn.Linear / Conv1D, or those of them that
    ``layers`` selects by name pattern (fnmatch, e.g. ``"transformer.h.*.mlp.*"``) or by type.

    Raises ValueError when no linear layer matches.
    """
    if layers is not None and (isinstance(layers, (str, type)) or not isinstance(layers, Iterable)):
        layers = [layers]
    specs = None if layers is None else list(layers)
    for spec in specs or []:
        if not isinstance(spec, (str, type)):
            raise TypeError(
                f"layers must hold name patterns (str) or module types; got {type(spec).__name__}"
            )
    chosen = {}
    for name, module in model.named_modules():
        if is_linear(module) and (specs is None or any(
            isinstance(module, s) if isinstance(s, type) else fnmatch.fnmatchcase(name, s)
            for s in specs
        )):
            chosen[name] = module
    if not chosen:
        available = [n for n, m in model.named_modules() if is_linear(m)]
        raise ValueError(
            f"layers={layers!r} matches no linear layer of the model; its linear layers are "
            f"{available[:20]}{' ...' if len(available) > 20 else ''}"
        )
    return chosen


class _CapturedLinear(torch.autograd.Function):
    """y = x W^T + b; backward: grad_x = grad_y W, and (x, grad_y) go to ``sink``.

    ``anchor`` is a scalar leaf that requires grad, so the output is part of the graph even
    when x and the (frozen) parameters do not require grad.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, anchor, sink):
        ctx.save_for_backward(x, weight)
        ctx.sink = sink
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        ctx.sink(x, grad_y)
        grad_x = grad_y @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


class Capture:
    """Context manager that captures compressed per-example gradients of ``layers``.

    Each tracked layer's map fills its columns of a feature row. Inside the ``with`` block,
    ``features(batch, loss_fn, token_mask)`` returns (B, width) fp32. On exit, however the
    block ends, the model is as it was: parameters, requires_grad, training flags and forward
    methods.
    """

    def __init__(self, model: nn.Module, layers: TrackedLayers):
        self.model = model
        self.layers = layers
        self.width = layers.layout.width
        self._out: torch.Tensor | None = None
        self._token_mask: torch.Tensor | None = None
        self._batch_sizes: dict[str, int] = {}
        self._saved: list = []

    # -- installing and restoring -------------------------------------------------------------
    def __enter__(self) -> "Capture":
        params = list(self.model.parameters())
        modules = list(self.model.modules())
        self._saved = [
            [(p, p.requires_grad) for p in params],
            [(m, m.training) for m in modules],
            [(t.module, t.module.__dict__.get("forward")) for t in self.layers.values()],
        ]
        try:
            self._anchor = torch.ones((), requires_grad=True)
            for p in params:
                p.requires_grad_(False)
            # Attribution is of the deterministic model: dropout off, as in evaluation.
            self.model.eval()
            for layer in self.layers.values():
                layer.module.forward = self._forward_for(layer)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        if not self._saved:
            return
        requires, training, forwards = self._saved
        for p, flag in requires:
            p.requires_grad_(flag)
        for m, flag in training:
            m.training = flag
        for m, forward in forwards:
            if forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward
        self._saved = []

    def _forward_for(self, layer: TrackedLayer) -> Callable[[torch.Tensor], torch.Tensor]:
        def sink(x: torch.Tensor, grad_y: torch.Tensor) -> None:
            self._absorb(layer, x, grad_y)

        def forward(x: torch.Tensor) -> torch.Tensor:
            self._batch_sizes[layer.name] = x.shape[0]
            anchor = self._anchor.to(x.device) if self._anchor.device != x.device else self._anchor
            return _CapturedLinear.apply(x, _weight_out_in(layer.module), layer.module.bias,
                                         anchor, sink)

        return forward

    # -- per batch -----------------------------------------------------------------------------
    def _absorb(self, layer: TrackedLayer, x: torch.Tensor, grad_y: torch.Tensor) -> None:
        """Compress one call's (inputs, output gradients) into the layer's columns."""
        b = x.shape[0]
        acts = x.reshape(b, -1, x.shape[-1])
        grads = grad_y.reshape(b, -1, grad_y.shape[-1])
        mask = self._token_mask
        # The batch's token mask applies to layers that see the batch's (B, T) tokens.
        if mask is not None and tuple(mask.shape) != tuple(acts.shape[:2]):
            mask = None
        # A layer called more than once per forward: compression is linear in G_i, so the
        # features of the calls add up to those of the summed gradient.
        self._out[:, layer.columns.cols] += layer.map(acts, grads, mask)

    def _buffer(self, batch: int, device: torch.device) -> torch.Tensor:
        """The (B, width) output, reused across batches of the same size."""
        out = self._out
        if out is None or out.shape[0] != batch or out.device != device:
            out = self._out = torch.empty(batch, self.width, device=device)
        return out.zero_()

    def features(
        self,
        batch,
        loss_fn: Callable[[nn.Module, object], torch.Tensor],
        token_mask: torch.Tensor | None = None,
        first_row: int = 0,
    ) -> torch.Tensor:
        """Compressed per-example gradients of ``loss_fn(model, batch)``: (B, width) fp32.

        The returned tensor is a buffer reused by the next call. ``first_row`` numbers the
        examples in error messages.
        """
        self._batch_sizes.clear()
        self._token_mask = None if token_mask is None else token_mask.float()
        with torch.enable_grad():
            losses = loss_fn(self.model, batch)
            batch_size = self._check_losses(losses)
            out = self._buffer(batch_size, losses.device)
            losses.sum().backward()
        self._check_finite(out, first_row)
        return out

    def _check_losses(self, losses) -> int:
        seen = self._batch_sizes
        if not seen:
            raise ValueError("no captured layer ran during loss_fn(model, batch)")
        name, batch = next(iter(seen.items()))
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses)
            raise ValueError(
                f"loss_fn must return per-example losses of shape (B,) = ({batch},), one per "
                f"example (e.g. reduction='none'); got {shape}"
            )
        for layer, b in seen.items():
            if b != losses.shape[0]:
                raise ValueError(
                    f"loss_fn returned {losses.shape[0]} losses but layer {layer!r} saw inputs "
                    f"with leading dimension {b}; captured layers must see the batch as dim 0"
                )
        if not losses.requires_grad:
            raise ValueError("loss_fn's losses do not depend on any captured layer")
        return losses.shape[0]

    def _check_finite(self, out: torch.Tensor, first_row: int) -> None:
        finite = torch.isfinite(out)
        if bool(finite.all()):
            return
        for name, columns in self.layers.layout.items():
            bad = (~finite[:, columns.cols].all(1)).nonzero().flatten()
            if bad.numel():
                raise ValueError(
                    f"non-finite gradient in layer {name!r} for example {first_row + int(bad[0])}"
                    f" ({bad.numel()} example(s) of this batch affected)"
                )
