"""Modules that borrow their weights from another framework's modules instead of holding a copy.

ComfyUI already holds the checkpoint's weights (and patches the user's LoRAs into them). ICE's diffusers
modules have other parameter names and, in places, other shapes (a 1x1 convolution kernel read as a linear
matrix), but the converted tensors are views of the same memory. :func:`plan_views` records, for every
parameter of a module built from the converted state, which source tensor it lies in and where;
:func:`bind_weights` then gives the module, for the length of a node's run, tensors over the *current*
memory of those sources (after ComfyUI moved, cast or patched them), and :func:`release_weights` leaves the
module on the meta device again, so that between runs ICE holds no weight memory at all.

The bound tensors are fresh tensor objects over the sources' storage. They are not inference tensors even
when the sources are (ComfyUI loads models inside ``torch.inference_mode``), so autograd may save them for
the backward pass of Stage Two; the learned token vectors are the only leaves that receive gradients.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

META = torch.device("meta")


@dataclass(frozen=True)
class TensorView:
    """Where one parameter lies in a source tensor: the source's name, the element offset from the source's
    first element, and the view's shape and strides (in elements)."""

    source: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass
class WeightPlan:
    """For each parameter or buffer name of a module: a view of a source tensor (``views``), or a tensor
    the module keeps for itself because it lies in no source (``owned``, e.g. a re-concatenated weight)."""

    views: dict[str, TensorView] = field(default_factory=dict)
    owned: dict[str, torch.Tensor] = field(default_factory=dict)

    def owned_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.owned.values())


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by name (shared ones under each of their names)."""
    named = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    return named


def plan_views(module: nn.Module, sources: dict[str, torch.Tensor]) -> WeightPlan:
    """Which source tensor each of ``module``'s tensors lies in (same storage, same dtype, inside the
    source's elements). Tensors that lie in none are copied into ``owned`` as ordinary (non-inference)
    tensors on the CPU; a source must be contiguous so that its moved or cast copies keep the layout."""
    by_storage: dict[tuple[str, int], list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in sources.items():
        if tensor.is_contiguous() and not tensor.is_meta:
            by_storage.setdefault(_storage_key(tensor), []).append((name, tensor))
    plan = WeightPlan()
    for name, tensor in module_tensors(module).items():
        view = None if tensor.is_meta else _find_view(tensor, by_storage.get(_storage_key(tensor), ()))
        if view is not None:
            plan.views[name] = view
        elif tensor.is_meta:
            raise ValueError(f"{name} has no values and lies in no source tensor; the module was not fully built.")
        else:
            with torch.inference_mode(False):
                plan.owned[name] = tensor.detach().to("cpu", copy=True)
    return plan


def bind_weights(module: nn.Module, plan: WeightPlan, sources: dict[str, torch.Tensor], *,
                 device: torch.device, dtype: torch.dtype) -> int:
    """Give ``module`` tensors over the current memory of ``sources`` (frozen parameters, ``requires_grad``
    off). A source that is not on ``device`` in ``dtype`` is copied there for this binding; owned tensors are
    copied to ``device`` (floating ones in ``dtype``). Returns how many bytes were copied rather than shared."""
    device = torch.device(device)
    copied = 0
    with torch.inference_mode(False):
        for name, view in plan.views.items():
            if view.source not in sources:
                raise ValueError(
                    f"The weight {view.source} that {name} borrows is gone; load the model again with the same "
                    "checkpoint."
                )
            value = borrowed(sources[view.source], view)
            if value.device != device or value.dtype != dtype:
                value = value.to(device, dtype)
                copied += value.numel() * value.element_size()
            _assign(module, name, value)
        for name, tensor in plan.owned.items():
            value = tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
            copied += value.numel() * value.element_size()
            _assign(module, name, value)
    return copied


def release_weights(module: nn.Module) -> None:
    """Leave every parameter and buffer of ``module`` on the meta device (shapes and dtypes kept, no memory)."""
    for name, tensor in module_tensors(module).items():
        _assign(module, name, torch.empty(tensor.shape, dtype=tensor.dtype, device=META))


def borrowed(source: torch.Tensor, view: TensorView) -> torch.Tensor:
    """A tensor over ``source``'s memory laid out as ``view`` (not an inference tensor, no copy)."""
    reach = view.offset + _elements_spanned(view.shape, view.stride)
    if not source.is_contiguous() or (view.shape and reach > source.numel()):
        raise ValueError(
            f"The weight {view.source} changed its layout {tuple(source.shape)} since ICE was loaded; run Load ICE "
            "Model again."
        )
    return _alias(source, source.storage_offset() + view.offset, view.shape, view.stride)


def normal_alias(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory, shape and strides as ``tensor``, as a tensor that is not an inference tensor (modules
    can be built around it and autograd may save it)."""
    return _alias(tensor, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))


def _alias(tensor: torch.Tensor, storage_offset: int, shape, stride) -> torch.Tensor:
    """A new tensor object, made outside inference mode, over ``tensor``'s storage with this layout."""
    with torch.inference_mode(False):
        alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        return alias.set_(tensor.untyped_storage(), storage_offset, shape, stride)


def _elements_spanned(shape, stride) -> int:
    """How many elements of its storage a strided view reaches, from its first element to its last."""
    return sum((size - 1) * step for size, step in zip(shape, stride)) + 1


def shared_bytes(module: nn.Module, sources: dict[str, torch.Tensor]) -> int:
    """Bytes of ``module``'s tensors that lie in the memory of ``sources`` (for checks and reports)."""
    ranges = [_byte_range(t) for t in sources.values() if not t.is_meta]
    total = 0
    for tensor in module_tensors(module).values():
        if tensor.is_meta:
            continue
        start, stop = _byte_range(tensor)
        if any(start >= low and stop <= high for low, high in ranges):
            total += tensor.numel() * tensor.element_size()
    return total


def _find_view(tensor: torch.Tensor, candidates) -> TensorView | None:
    for name, source in candidates:
        if source.dtype != tensor.dtype:
            continue
        offset = tensor.storage_offset() - source.storage_offset()
        reach = offset + _elements_spanned(tensor.shape, tensor.stride())
        if offset >= 0 and reach <= source.numel():
            return TensorView(name, offset, tuple(tensor.shape), tuple(tensor.stride()))
    return None


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return str(tensor.device), tensor.untyped_storage().data_ptr()


def _byte_range(tensor: torch.Tensor) -> tuple[int, int]:
    start = tensor.data_ptr()
    span = _elements_spanned(tensor.shape, tensor.stride()) if tensor.numel() else 0
    return start, start + span * tensor.element_size()


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        raise ValueError(f"{name} is neither a parameter nor a buffer of {type(module).__name__}.")
