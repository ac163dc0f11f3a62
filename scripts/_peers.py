"""The MoE layers of other frameworks, built with moe_lm's weights, for scripts/bench_peers.py.

Every candidate computes the same function: softmax router over all experts, top-k, weights
renormalised to sum 1, dropless, SwiGLU experts (down(silu(gate x) * up x)), outputs summed with
their gate weights. Each builder copies the weights of one moe_lm MoELayer into the peer's own
module and says how to read the peer's gradients back in moe_lm's layout, so outputs and gradients
can be compared element by element.

Peers that are not installed are skipped (`Peer.missing` says why). Two need stand-ins on a CPU
machine, and the tables say so:
- torchtitan's GroupedExperts casts activations and weights to bf16 for `torch._grouped_mm`,
  which on CPU is ~14x slower than fp32; "torchtitan" runs its same forward without the casts.
  `torchtitan (bf16 as shipped)` is the unmodified module.
- OLMo-core's dropless MoE gathers and scatters tokens with Triton kernels (GPU only); their
  pure-torch equivalents below stand in for them. Its expert GEMMs without the `grouped_gemm`
  package are OLMo-core's own per-expert loop, as shipped.
Both packages import GPU-only or network-only modules (triton, cached_path) at import time without
using them on this path: inert placeholder modules are supplied for those imports only, and only
when the real module is not installed.
"""

from __future__ import annotations

import copy
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_lm.model.moe import MoELayer

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # router [E,H], gate_up [E,2I,H], down [E,H,I]


@dataclass
class Peer:
    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]  # x_TH -> y_TH
    module: nn.Module
    grads: Callable[[], Grads]  # after backward: gradients in moe_lm's layout
    note: str = ""


# ---------------------------------------------------------------------------------------------
# Import-time placeholders


class _Inert(type):
    """A placeholder class whose attributes, calls and items are placeholders; decorators pass through."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert(f"{cls.__name__}.{name}")

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]  # @decorator
        return _inert(cls.__name__ + "()")  # @decorator(options), or a constructor

    def __getitem__(cls, key: Any) -> Any:
        return _inert(cls.__name__ + "[]")


def _inert(name: str) -> Any:
    return _Inert(name, (), {})


class _InertModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert(f"{self.__name__}.{name}")


class _InertFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _InertModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []


@contextmanager
def _placeholders(names: tuple[str, ...]) -> Iterator[None]:
    """Placeholder modules for `names` that are not installed, for the imports inside this block.

    torch itself probes for triton (inductor, torch.utils._triton); those probes run first, so torch
    keeps seeing the real answer, and the placeholders are removed again afterwards.
    """
    import torch._inductor.compile_fx  # noqa: F401 - runs inductor's triton probe now
    from torch.utils._triton import has_triton, has_triton_package

    has_triton_package(), has_triton()  # cached: later calls keep the real answer
    absent = {n for n in names if importlib.util.find_spec(n) is None}
    finder = _InertFinder(absent)
    sys.meta_path.append(finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for mod in [m for m in sys.modules if m.split(".")[0] in absent]:
            del sys.modules[mod]


def _import(module: str, placeholders: tuple[str, ...]) -> tuple[Any, str]:
    """(module, "") or (None, why it is unavailable)."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return None, "not installed (pip install -e '.[bench]', see docs/benchmarks.md)"
    quiet = logging.getLogger(module.split(".")[0])  # e.g. "transformer_engine unavailable"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with _placeholders(placeholders):
            return importlib.import_module(module), ""
    except Exception as e:  # noqa: BLE001 - any import failure means: skip this peer, say why
        return None, f"import failed: {type(e).__name__}: {str(e)[:120]}"
    finally:
        quiet.setLevel(level)


# ---------------------------------------------------------------------------------------------
# Weight copies


def _weights(ours: MoELayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(router [E,H], gate [E,I,H], up [E,I,H], down [E,H,I]), detached copies, and the full gate_up."""
    inter = ours.experts.intermediate_size
    gu = ours.experts.gate_up_proj.detach()
    return (
        ours.router.weight.detach().clone(),
        gu[:, :inter].clone(),
        gu[:, inter:].clone(),
        ours.experts.down_proj.detach().clone(),
        gu.clone(),
    )


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None, "no gradient reached this parameter"
    return p.grad


def moe_lm_peer(ours: MoELayer, impl: str) -> Peer:
    # A copy of its own, as every peer has: sharing `ours` would hand its weights, warm in cache, to
    # whichever variant runs right after another.
    layer = ours if impl == "auto" else copy.deepcopy(ours)
    layer.experts.impl = impl

    return Peer(
        f"moe_lm {impl}" if impl != "auto" else "moe_lm",
        lambda x: layer(x)[0],
        layer,
        lambda: (
            _grad(layer.router.weight),
            _grad(layer.experts.gate_up_proj),
            _grad(layer.experts.down_proj),
        ),
    )


def transformers_peer(ours: MoELayer, impl: str) -> Peer | str:
    mixtral, why = _import("transformers.models.mixtral.modeling_mixtral", ())
    if mixtral is None:
        return why
    from transformers import MixtralConfig

    e, h, inter = ours.num_experts, ours.experts.gate_up_proj.shape[-1], ours.experts.intermediate_size
    cfg = MixtralConfig(
        hidden_size=h, intermediate_size=inter, num_local_experts=e, num_experts_per_tok=ours.top_k,
        router_jitter_noise=0.0,
    )  # fmt: skip
    cfg._experts_implementation = impl
    block = mixtral.MixtralSparseMoeBlock(cfg)
    router, _, _, down, gu = _weights(ours)
    with torch.no_grad():
        block.gate.weight.copy_(router)
        block.experts.gate_up_proj.copy_(gu)
        block.experts.down_proj.copy_(down)
    return Peer(
        f"transformers {impl}",
        lambda x: block(x[None])[0],
        block,
        lambda: (_grad(block.gate.weight), _grad(block.experts.gate_up_proj), _grad(block.experts.down_proj)),
    )


def _titan_fp32_forward(self: Any, x_RD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """torchtitan's GroupedExperts.forward (0.3.0) for plain tensors, without its bf16 casts."""
    offsets_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
    h_RF = F.silu(self._grouped_mm(A=x_RD, B_t=self.w1_EFD.transpose(-2, -1), offs=offsets_E))
    h_RF = h_RF * self._grouped_mm(A=x_RD, B_t=self.w3_EFD.transpose(-2, -1), offs=offsets_E)
    return self._grouped_mm(A=h_RF, B_t=self.w2_EDF.transpose(-2, -1), offs=offsets_E)


def torchtitan_peer(ours: MoELayer, bf16: bool) -> Peer | str:
    moe, why = _import("torchtitan.models.common.moe", ("triton",))
    if moe is None:
        return why
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    e, k, h, inter = (ours.num_experts, ours.top_k, ours.experts.gate_up_proj.shape[-1],
                      ours.experts.intermediate_size)  # fmt: skip
    layer = moe.MoE.Config(
        num_experts=e,
        routed_experts=moe.RoutedExperts.Config(
            inner_experts=moe.GroupedExperts.Config(dim=h, hidden_dim=inter, num_experts=e),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=e, top_k=k),
        ),
        router=moe.TokenChoiceTopKRouter.Config(
            num_experts=e,
            gate=Linear.Config(in_features=h, out_features=e),
            top_k=k,
            score_func="softmax",
            route_norm=True,
        ),  # fmt: skip
        load_balance_coeff=None,
    ).build()
    experts = layer.routed_experts.inner_experts
    if not bf16:
        experts.forward = types.MethodType(_titan_fp32_forward, experts)
    router, gate, up, down, _ = _weights(ours)
    with torch.no_grad():
        layer.router.gate.weight.copy_(router)
        experts.w1_EFD.copy_(gate)
        experts.w3_EFD.copy_(up)
        experts.w2_EDF.copy_(down)

    def grads() -> Grads:
        gu = torch.cat((_grad(experts.w1_EFD), _grad(experts.w3_EFD)), dim=1)
        return _grad(layer.router.gate.weight), gu, _grad(experts.w2_EDF)

    name = "torchtitan (bf16 as shipped)" if bf16 else "torchtitan"
    return Peer(name, lambda x: layer(x[None])[0], layer, grads)


class _OlmoKernels:
    """Pure-torch equivalents of OLMo-core's Triton gather/scatter (olmo_core.kernels.moe).

    indices: sorted position -> (token * top_k + slot); weights: per (token, slot), flat.
    """

    @staticmethod
    def gather(x: torch.Tensor, indices: torch.Tensor, bin_ids: Any, weights: Any, bins: Any, top_k: int) -> torch.Tensor:  # fmt: skip
        out = x[indices.long() // top_k]
        return out if weights is None else out * weights[indices.long()][:, None]

    @staticmethod
    def scatter(x: torch.Tensor, indices: torch.Tensor, bin_ids: Any, weights: Any, bins: Any, top_k: int) -> torch.Tensor:  # fmt: skip
        idx = indices.long()
        rows = x if weights is None else x * weights[idx][:, None]
        out = x.new_zeros(idx.numel() // top_k, x.shape[-1])
        return out.index_add_(0, idx // top_k, rows)

    @staticmethod
    def scatter_wgrad(x: torch.Tensor, grad: torch.Tensor, indices: torch.Tensor, bin_ids: Any, bins: Any, top_k: int) -> torch.Tensor:  # fmt: skip
        idx = indices.long()
        wgrad = x.new_empty(idx.numel())
        wgrad[idx] = torch.linalg.vecdot(x, grad[idx // top_k])
        return wgrad


def olmo_core_peer(ours: MoELayer) -> Peer | str:
    names = ("cached_path", "triton")
    parallel, why = _import("olmo_core.nn.moe.parallel_mlp", names)
    if parallel is None:
        return why
    ops, _ = _import("olmo_core.ops.moe", names)
    mlp_mod, _ = _import("olmo_core.nn.moe.mlp", names)
    router_mod, _ = _import("olmo_core.nn.moe.router", names)
    ops.kernels = _OlmoKernels  # Triton is GPU only
    e, k, h, inter = (ours.num_experts, ours.top_k, ours.experts.gate_up_proj.shape[-1],
                      ours.experts.intermediate_size)  # fmt: skip
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "grouped_gemm not available": the CPU case, known
        mlp = mlp_mod.DroplessMoEMLP(d_model=h, hidden_size=inter, num_experts=e)
    block = parallel.ParallelDroplessMLP(mlp=mlp, top_k=k)
    router_m = router_mod.MoELinearRouter(d_model=h, num_experts=e, top_k=k, normalize_expert_weights=1.0)
    router, gate, up, down, _ = _weights(ours)
    with torch.no_grad():
        router_m.weight.copy_(router.reshape(-1))
        mlp.w1.copy_(gate.reshape(e * inter, h))
        mlp.w3.copy_(up.reshape(e * inter, h))
        mlp.w2.copy_(down.transpose(1, 2).reshape(e * inter, h))
    holder = nn.ModuleDict({"router": router_m, "mlp": block})

    def forward(x_TH: torch.Tensor) -> torch.Tensor:
        weights, idx, per_expert, _ = router_m(x_TH[None])
        return block(x_TH, weights.view(-1, k), idx.view(-1, k), per_expert)

    def grads() -> Grads:
        gu = torch.cat((_grad(mlp.w1).view(e, inter, h), _grad(mlp.w3).view(e, inter, h)), dim=1)
        down_g = _grad(mlp.w2).view(e, inter, h).transpose(1, 2)
        return _grad(router_m.weight).view(e, h), gu, down_g

    return Peer("OLMo-core", forward, holder, grads, note="Triton gather/scatter replaced by pure torch")


PEERS = ("moe_lm", "moe_lm loop", "moe_lm grouped_mm", "torchtitan", "transformers grouped_mm",
         "transformers eager", "OLMo-core")  # fmt: skip
OPTIONAL = ("torchtitan (bf16 as shipped)",)


def build_peer(name: str, ours: MoELayer) -> Peer | str:
    """The named candidate with `ours`' weights, or why it cannot run here."""
    if name.startswith("moe_lm"):
        return moe_lm_peer(ours, name.split()[-1] if " " in name else "auto")
    if name.startswith("transformers"):
        return transformers_peer(ours, name.split()[-1])
    if name.startswith("torchtitan"):
        return torchtitan_peer(ours, bf16="bf16" in name)
    if name == "OLMo-core":
        return olmo_core_peer(ours)
    raise ValueError(f"unknown candidate {name!r}; known: {', '.join(PEERS + OPTIONAL)}")
