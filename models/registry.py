"""The mechanism registry: every attention as data.

Each module models/attention/<name>.py defines ``MECHANISM``, one `Mechanism`. The
registry discovers them, so adding a mechanism touches no shared file.

Kernel-level API (every impl's ``run``):
    run(q, k, v, *, causal: bool, seq_lens: LongTensor[B] | None, **options) -> o
    q [B, T, Hq, D], k/v [B, S, Hkv, D] (any strides), o [B, T, Hq, D].
    ``seq_lens[b]`` is the number of valid keys of sequence b (key padding, what a BERT
    attention_mask means); ``options`` are the mechanism's own (rope theta, alibi slopes,
    window, ...) as its layer's ``core_options()`` returns them.

Packed variable-length batches (FlashAttention's varlen layout, ``speed --lengths``): an impl's
``varlen.bind(cu_seqlens, max_seqlen, *, causal, **options) -> attend``, attend(q [total, Hq, D],
k/v [total, Hkv, D]) -> o [total, Hq, D] (``Varlen``).

Layer-level API: ``mechanism.layer(LayerConfig) -> nn.Module`` with
    forward(x [B, T, C], seq_lens=None) -> [B, T, C]
and, for mechanisms with a q/k/v core (``has_core``), attend(q, k, v, seq_lens=None) -> o,
the kernel-level op with the layer's own parameters (projections excluded).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from attnbench.models import positions
from attnbench.models.errors import UnknownNameError

Family = Literal["exact", "linear", "sparse", "recurrent"]
# what "auto" means when a model is built to train: our fused kernel, then SDPA, then the
# efficient torch form, then the definition (peers like fla are asked for by name)
TRAINING_IMPL_PREFERENCE = ("triton", "sdpa", "chunked", "torch")
# 2.0: dS = dO V^T and dV = P^T dO, dQ = dS K and dK = dS^T Q (two matmuls per forward one)
# + 0.5: the backward recomputes S = Q K^T (one of the two forward matmuls)
SOFTMAX_BACKWARD = 2.5
MATMUL_BACKWARD = 2.0  # dX = dY W and dW = dY^T X: two matmuls the size of each forward one
Position = Literal["learned", "sinusoidal", "rope", "alibi", "none", "inside"]


def _always_available() -> str | None:
    return None


def missing_module(module: str, install: str = "") -> Callable[[], str | None]:
    """An Impl.missing (or DecodeImpl.missing) for an impl that needs ``module``: None where it imports,
    else "<module> is not installed" and the ``install`` hint."""

    def missing() -> str | None:
        try:
            importlib.import_module(module)
        except ImportError:
            return f"{module} is not installed{install}"
        return None

    return missing


def unavailable(name: str, missing: Callable[[], str | None], needs_cuda: bool, device: torch.device) -> str | None:
    """Why an impl ``name`` cannot run on ``device`` at all (a package missing, no CUDA), or None."""
    reason = missing()
    if reason:
        return reason
    if needs_cuda and device.type != "cuda":
        return f"{name} needs a CUDA device"
    if needs_cuda and not torch.cuda.is_available():
        return "no CUDA device on this machine"
    return None


@dataclass(frozen=True)
class Varlen:
    """An impl's core over a packed variable-length batch: N sequences end to end, no padding
    (FlashAttention's varlen layout), each attending to itself alone at positions 0 .. L - 1.

    bind(cu_seqlens int32 [N + 1], max_seqlen, *, causal, **run's options but offset) -> attend,
        attend(q [total, Hq, D], k/v [total, Hkv, D]) -> o [total, Hq, D]. What depends on the pack
        alone (flex's block mask, the host's copy of the offsets) is built by bind, once, so that
        attend, the call that is timed, does only what every call must.
    unsupported: why it cannot run ``cfg`` packed, beyond Impl.why_not (a mask the form cannot
        take, GQA), or None.
    """

    bind: Callable[..., Callable[..., torch.Tensor]]
    unsupported: Callable[["LayerConfig", torch.device, torch.dtype], str | None] = (
        lambda cfg, device, dtype: None
    )


@dataclass(frozen=True)
class Impl:
    """One way to compute a mechanism.

    run: the kernel-level core (module docstring), or None for a layer-only impl.
    run_packed: the same core over the fused projection, (qkv [B, T, Hq + 2 Hkv, D], heads,
        **run's keywords) -> o, for an impl whose backward writes qkv's gradient in one piece
        (saving the concatenation of dq, dk, dv that a split's backward runs); None: the layer
        splits qkv and calls run.
    needs_cuda: the impl runs only on a CUDA device.
    missing: returns why the impl cannot run on this machine at all (package missing), or None.
    unsupported: returns why it cannot run this case (dtype, padding, shape), or None.
    no_padding: why it cannot take key padding (seq_lens, a runtime input), or "" when it can.
    varlen: its core over a packed variable-length batch (Varlen), or None: it has none.
    """

    name: str
    run: Callable[..., torch.Tensor] | None
    description: str = ""
    run_packed: Callable[..., torch.Tensor] | None = None
    needs_cuda: bool = False
    missing: Callable[[], str | None] = _always_available
    unsupported: Callable[["LayerConfig", torch.device, torch.dtype], str | None] = (
        lambda cfg, device, dtype: None
    )
    no_padding: str = ""
    varlen: Varlen | None = None

    def why_not(self, cfg: "LayerConfig", device: torch.device | str, dtype: torch.dtype) -> str | None:
        """Why this impl cannot run ``cfg`` on ``device`` in ``dtype``, or None when it can."""
        device = torch.device(device)
        return unavailable(self.name, self.missing, self.needs_cuda, device) or self.unsupported(cfg, device, dtype)

    def why_not_varlen(self, cfg: "LayerConfig", device: torch.device | str, dtype: torch.dtype) -> str | None:
        """Why this impl cannot run ``cfg`` over a packed variable-length batch here, or None."""
        if self.varlen is None:
            return f"{self.name} has no packed variable-length core"
        return self.why_not(cfg, device, dtype) or self.varlen.unsupported(cfg, torch.device(device), dtype)


@dataclass(frozen=True)
class DecodeImpl:
    """One way to compute a mechanism's decode step (``speed --mode decode``).

    build(cfg, batch, context, queries, device, dtype) -> step: random inputs of B sequences that
        hold ``context`` tokens each (a KV cache or a recurrent state; the ``queries`` new ones
        included), and the zero-argument step over them, the one call that is timed.
    graphable: the step may be captured as a CUDA graph (no host synchronisation in it).
    needs_cuda, missing, unsupported(cfg, queries, device, dtype): as Impl's.
    """

    name: str
    build: Callable[..., Callable[[], torch.Tensor]]
    description: str = ""
    graphable: bool = True
    needs_cuda: bool = False
    missing: Callable[[], str | None] = _always_available
    unsupported: Callable[["LayerConfig", int, torch.device, torch.dtype], str | None] = (
        lambda cfg, queries, device, dtype: None
    )

    def why_not(self, cfg: "LayerConfig", queries: int, device: torch.device | str, dtype: torch.dtype) -> str | None:
        """Why this impl cannot run the step of ``cfg`` with ``queries`` new tokens here, or None."""
        device = torch.device(device)
        return unavailable(self.name, self.missing, self.needs_cuda, device) or self.unsupported(cfg, queries, device, dtype)


@dataclass(frozen=True)
class DecodeForm:
    """A mechanism's decode step: what it carries from token to token and its cost model.

    carries: "kv-cache" (grows with the context) or "state" (a fixed size).
    bytes(cfg, batch, context, queries, itemsize): what one step must read and write;
    memory(cfg, context, queries, itemsize): the cache or state of one sequence, in bytes
        (the formulas: kernels/decode_cost.py).
    impls: its DecodeImpls by name.
    layer_cache: what a generate loop (models/generate.py) keeps for one of the mechanism's layers,
        layer_cache(layer, capacity) -> an object with prefill(x [B, T, C]) -> [B, T, C] (the layer's
        own forward over the prompt, its keys and values or its state kept) and step(x [B, 1, C]) ->
        [B, 1, C] (one token more); capacity: the most tokens it will hold. ValueError for a layer
        whose options have no incremental form; None: the mechanism has none (generate recomputes).
    layer_host_sync: why the layer cache's step synchronises with the host (so no CUDA graph holds a
        model's decode step, `--level model-graph`), or None; a KV cache's plain-torch steps always do.
    """

    carries: Literal["kv-cache", "state"]
    bytes: Callable[..., int]
    memory: Callable[..., int]
    impls: dict[str, DecodeImpl]
    layer_cache: Callable[..., Any] | None = None
    layer_host_sync: str | None = None


@dataclass
class LayerConfig:
    """What builds one attention layer.

    dim: model width C; heads: query heads Hq; kv_heads: Hkv (None = Hq; Hq % Hkv == 0);
    head_dim: D (None = dim // heads); causal: causal or bidirectional; impl: impl name;
    window: sliding window W, None = full. The one meaning of ``--window W`` everywhere: the W keys
        before each query plus the query itself (FlashAttention's window_size=(W, 0)); bidirectional:
        W on each side plus the query (``window_bounds``). An impl whose own window counts otherwise
        translates it and says so, pointing here;
    positions: the position scheme the layer applies, "rope" or "alibi" (models/positions.py),
        or None for the mechanism's own (rope for rope, alibi for alibi, nothing for the others);
    options: the mechanism's extra parameters (see Mechanism.params for names and defaults)
        and its scheme's (positions.PARAMS: RoPE's theta).
    """

    dim: int
    heads: int
    kv_heads: int | None = None
    head_dim: int | None = None
    causal: bool = False
    impl: str = "torch"
    window: int | None = None
    bias: bool = False
    positions: Literal["rope", "alibi"] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.positions not in (None, *positions.IN_LAYER):
            raise ValueError(f"a layer applies position scheme rope, alibi or none (None), not '{self.positions}'")
        if self.kv_heads is None:
            self.kv_heads = self.heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.heads
        if self.heads <= 0 or self.kv_heads <= 0 or self.head_dim <= 0:
            raise ValueError("heads, kv_heads and head_dim must be positive")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @property
    def window_bounds(self) -> tuple[int, int] | None:
        """(left, right) keys visible around each query, or None for no window."""
        if self.window is None:
            return None
        return (self.window, 0) if self.causal else (self.window, self.window)


@dataclass(frozen=True)
class Mechanism:
    """A named attention: what it is, what it supports, how it is computed.

    flops: forward FLOPs of the kernel-level core, flops(cfg, batch, seq, seq_lens=None)
        (models/pair_flops.py holds the shared models, e.g. softmax_flops counts visible q-k pairs).
    backward_factor: the backward's FLOPs as a multiple of ``flops`` by its cost model:
        SOFTMAX_BACKWARD for forms whose backward recomputes its scores (every flash-style
        kernel), MATMUL_BACKWARD for forms whose backward is the gradients of their matmuls
        alone; a mechanism's file says why it has the one it has.
    position: its natural position scheme (models/positions.py), what it is built with when
        none is asked for: "learned" (the model adds learned embeddings), "rope", "alibi", or
        "inside" (it encodes positions itself).
    refuses: the position schemes it cannot take, each with the one-line reason.
    windowed: its layer honours LayerConfig.window (a sliding window); the others refuse one.
    params: its extra parameters with defaults and one-line meanings, for `attnbench list`.
    decode: its decode step against a KV cache or a recurrent state, or None (no decode form here).
    """

    name: str
    description: str
    family: Family
    layer: Callable[[LayerConfig], torch.nn.Module]
    impls: dict[str, Impl]
    flops: Callable[..., float]
    backward_factor: float = SOFTMAX_BACKWARD
    position: Position = "learned"
    refuses: dict[str, str] = field(default_factory=dict)
    causal: bool = True
    bidirectional: bool = True
    padding: bool = True
    gqa: bool = True
    has_core: bool = True
    windowed: bool = False
    params: dict[str, tuple[Any, str]] = field(default_factory=dict)
    decode: DecodeForm | None = None

    def impl(self, name: str) -> Impl:
        try:
            return self.impls[name]
        except KeyError:
            valid = ", ".join(self.impls)
            raise UnknownNameError(f"unknown impl '{name}' for {self.name}; valid: {valid}") from None

    def preferred_impl(self, cfg: LayerConfig, device: torch.device | str, dtype: torch.dtype) -> str | None:
        """The first impl of TRAINING_IMPL_PREFERENCE, then of the rest, that runs ``cfg`` here."""
        ranked = [n for n in TRAINING_IMPL_PREFERENCE if n in self.impls] + [n for n in self.impls if n not in TRAINING_IMPL_PREFERENCE]
        return next((n for n in ranked if self.impls[n].why_not(cfg, device, dtype) is None), None)

    def split_options(self, given: dict[str, Any], scheme: str | None = None) -> tuple[int | None, dict[str, Any]]:
        """Of a run's mechanism options (``--window``, ``--option``), the ones this mechanism
        declares in ``params`` or position ``scheme`` in positions.PARAMS: (its window or None,
        the rest for LayerConfig.attention)."""
        declared = {**positions.PARAMS.get(scheme, {}), **self.params}
        mine = {k: v for k, v in given.items() if k in declared}
        return mine.pop("window", None), mine

    def why_not(self, cfg: LayerConfig) -> str | None:
        """Why this mechanism cannot build ``cfg`` (an unsupported option), or None."""
        if cfg.causal and not self.causal:
            return f"{self.name} has no causal form"
        if not cfg.causal and not self.bidirectional:
            return f"{self.name} is causal only"
        if cfg.kv_heads != cfg.heads and not self.gqa:
            return f"{self.name} does not support GQA"
        if cfg.window is not None and not self.windowed:
            takers = ", ".join(name for name, m in mechanisms().items() if m.windowed)
            return f"{self.name} takes no sliding window (the mechanisms that do: {takers})"
        return None if cfg.positions is None else positions.why_not(self, cfg.positions)


def _discover() -> dict[str, Mechanism]:
    from attnbench.models import attention

    found: dict[str, Mechanism] = {}
    for info in sorted(pkgutil.iter_modules(attention.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{attention.__name__}.{info.name}")
        mechanism = getattr(module, "MECHANISM", None)
        if isinstance(mechanism, Mechanism):
            found[mechanism.name] = mechanism
    return found


_MECHANISMS: dict[str, Mechanism] | None = None


def mechanisms() -> dict[str, Mechanism]:
    """All registered mechanisms by name, in a fixed order (exact family first)."""
    global _MECHANISMS
    if _MECHANISMS is None:
        order = {"exact": 0, "sparse": 1, "linear": 2, "recurrent": 3}
        found = _discover()
        _MECHANISMS = dict(sorted(found.items(), key=lambda kv: (order[kv[1].family], kv[0] != "standard", kv[0])))
    return _MECHANISMS


def get(name: str) -> Mechanism:
    """The mechanism called ``name``; UnknownNameError lists the valid names."""
    registry = mechanisms()
    try:
        return registry[name]
    except KeyError:
        raise UnknownNameError(f"unknown mechanism '{name}'; valid: {', '.join(registry)}") from None


def check_options(names: list[str], given: dict[str, Any], schemes: tuple[str, ...] = ()) -> None:
    """UnknownNameError (a user error: exit 2) for an option that none of the mechanisms ``names``
    nor of the position ``schemes`` declares."""
    declared = {p for name in names for p in get(name).params} | {p for s in schemes for p in positions.PARAMS.get(s, {})}
    for key in given:
        if key not in declared:
            raise UnknownNameError(f"option '{key}' is not a parameter of {', '.join(names)}; theirs: {', '.join(sorted(declared)) or 'none'}")


def build_layer(name: str, cfg: LayerConfig) -> torch.nn.Module:
    """The attention layer of mechanism ``name`` configured by ``cfg``."""
    mechanism = get(name)
    mechanism.impl(cfg.impl)
    reason = mechanism.why_not(cfg)
    if reason:
        raise ValueError(reason)
    return mechanism.layer(cfg)
