"""The speed sweep: a spec expands to cases; series by series, every case is warmed up, then timed.

A series is the sizes (seq, batch) of one mechanism, impl, mode, dtype, ... Warm-up builds
each case once and calls it once: compilation, autotuning and cuDNN graph building happen
here, their cost lands in ``first_call_ms``, and cases that cannot run (unsupported, error,
OOM) get their row now. Timing then rebuilds each remaining case of the series and times it.
An OOM marks the larger sizes of its case ``skipped``. (DESIGN.md warms up the whole sweep
before timing any case; per series, a sweep stopped by a time limit keeps every finished
series instead of nothing, and no compile ever runs inside a timed region either way.)

Levels: a level is one function ``Case -> Workload`` in ``LEVELS``: kernel (the core on
q, k, v), layer (with projections), model (a full training step of a preset model), and
model-graph (that step captured once as a CUDA graph and replayed: the GPU's time alone,
without the host's cost of launching each op, which makes an eager step host-bound on a
slow host).

Mode decode: one step of N new tokens a sequence against a KV cache or a recurrent state of L
tokens (the mechanism's decode form, Mechanism.decode), at the kernel level; at the layer level
one token through one layer with its cache (projections, append, attention, output), at the model
level through the whole preset GPT (models/generate.Decoder), every cache filled as if L tokens
had been prefilled (impls: CACHED_DECODE_IMPLS);
``seq`` is then L (``--context``) and ``queries`` N. Its rows add the bytes the step must move (bench/flops.py),
GB/s, % of the measured copy bandwidth and the cache or state per sequence. On CUDA the timed
step is a CUDA graph replay where its impl allows one (``cuda_graph``); the warm-up's first call
is always the eager step, so compilation lands in ``first_call_ms``.

A packed batch (``--lengths``, bench/speed/lengths.py): in modes fwd, bwd and fwdbwd, one pack of N
sequences end to end in FlashAttention's varlen layout, no padding computed, at the kernel and
layer levels (VARLEN_LEVELS; varlen_workload). Its cases record the lengths asked and the pack
(``lengths``, ``pack``; ``batch`` is N, ``seq`` the longest); its rows the mean length, the packed
FLOPs (``flops``), what padding to the longest would have cost (``flops_padded``) and the time the
impl took to bind itself to the pack outside the timing (``setup_ms``: flex's block mask).
"""

from __future__ import annotations

import functools
import gc
import itertools
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator

import torch

from attnbench import flops as flop_model
from attnbench import gate, timing
from attnbench.case import Case, option_text
from attnbench.dtypes import DTYPES
from attnbench.errors import InputError
from attnbench.models import positions, registry
from attnbench.models.registry import Mechanism
from attnbench.speed import lengths as packing
from attnbench.store import case_key

DECODE = "decode"  # one generation step against a cache or state (module docstring)
MODES = ("fwd", "bwd", "fwdbwd", DECODE)
DECODE_BATCHES = [1]  # decode's batch sizes without --batch (--tokens budgets whole sequences)
MODEL_LEVELS = ("model", "model-graph")  # a training step of a preset model
VARLEN_LEVELS = ("kernel", "layer")  # a packed batch's: the core alone, and one layer with its projections


@dataclass
class SweepSpec:
    """What `attnbench speed` was asked for (stored in meta.json; --resume re-reads it)."""

    mechanisms: list[str]
    impls: list[str] | None  # None: every impl of each mechanism
    levels: list[str]
    modes: list[str]
    dtypes: list[str]
    device: str
    seqs: list[int]
    batches: list[int] | None = None  # exactly one of batches, tokens (a packed batch: neither, or tokens)
    tokens: int | None = None
    heads: int = 16
    kv_heads: int | None = None
    head_dim: int = 64
    causal: list[bool] = field(default_factory=lambda: [True])
    window: int | None = None
    positions: list[str] | None = None  # position schemes crossed with the mechanisms (None: each one's natural)
    options: dict[str, Any] = field(default_factory=dict)  # --option values; each mechanism takes those it declares
    preset: str = "small"  # the model level's preset
    max_call_ms: float | None = 2000.0  # slower cases skip their series' larger sizes (Sweep)
    check: bool = False  # the correctness gate (attnbench.gate) on each kernel-level case before it is timed
    contexts: list[int] = field(default_factory=list)  # mode decode: the cache lengths L (--context)
    queries: int = 1  # mode decode: new tokens per sequence a step (--queries)
    lengths: list[str] = field(default_factory=list)  # --lengths: one packed batch instead of seqs (bench/speed/lengths.py)
    seed: int = 0  # --seed: what a drawn pack's lengths are drawn with

    def larger(self, case: Case, other: Case) -> bool:
        """Whether a stop (OOM, too slow) at ``other`` means ``case`` is skipped: by seq alone under a token budget."""
        return case.longer_than(other) if self.tokens is not None else case.larger_than(other)

    def batches_for(self, seq: int) -> list[int]:
        """The batch sizes at ``seq``: the given list, or tokens // seq (at least 1)."""
        if self.batches is not None:
            return self.batches
        return [max(1, self.tokens // seq)]

    def packed(self) -> tuple[str, list[int]]:
        """--lengths as its canonical text and the pack's lengths; ("", []) without it."""
        if not self.lengths:
            return "", []
        asked = packing.parse(self.lengths)
        return asked.text, asked.pack(self.tokens, self.seed)

    def sizes(self, mode: str) -> list[tuple[int, int]]:
        """(seq, batch) of a mode's cases, smaller first: decode's (context, batch) from --context
        and --batch (DECODE_BATCHES without it), the others' from --seq and batches_for (a packed
        batch's one size: expand)."""
        if mode == DECODE:
            return [(context, batch) for context in sorted(self.contexts) for batch in sorted(self.batches or DECODE_BATCHES)]
        return [(seq, batch) for seq in sorted(self.seqs) for batch in sorted(self.batches_for(seq))]


@dataclass
class Workload:
    """A case built and ready: ``forward()`` runs the op once; ``leaves`` are the tensors whose
    grads are reset between backward repetitions; ``flops`` of one timed call in the case's mode;
    ``step``: when set, what fwdbwd times instead of forward + backward (a whole training step);
    ``peak_memory``: whether a call's peak above what was allocated before it is its memory
    (not for a graph replay, which allocates nothing: its pool was taken at capture);
    ``cuda_graph``: the timed call is a CUDA graph replay. Decode steps have no parameters and
    no FLOP count (None) but ``bytes`` (of one step) and ``mem_per_seq_mib`` (its cache or state).
    A packed batch's: ``flops_padded`` (what padding to its longest sequence would have cost) and
    ``setup_ms`` (binding the impl to the pack, outside the timed call)."""

    forward: Callable[[], torch.Tensor]
    leaves: list[torch.Tensor]
    params: int | None
    flops: float | None
    step: Callable[[], object] | None = None
    peak_memory: bool = True
    cuda_graph: bool = False
    bytes: int | None = None
    mem_per_seq_mib: float | None = None
    flops_padded: float | None = None
    setup_ms: float | None = None


# ---- validation and expansion


def check_device(device: str, dtypes: Iterable[str]) -> None:
    """Raise InputError when ``device`` does not exist here or cannot compute in a dtype."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device '{device}'; use cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise InputError(f"unsupported device '{device}'; use cpu or cuda[:N]")
    for name in dtypes:
        if dev.type == "cuda" and name == "bf16" and not torch.cuda.is_bf16_supported():
            raise InputError(f"{torch.cuda.get_device_name(dev)} cannot compute in bf16; use --dtype fp16")
        try:
            a = torch.ones(8, 8, device=dev, dtype=DTYPES[name])
            torch.softmax(a @ a, dim=-1)
        except RuntimeError as err:
            raise InputError(f"{device} cannot compute in {name}: {str(err).splitlines()[0]}") from None


def validate(spec: SweepSpec) -> None:
    """Every InputError a spec can deserve, before anything runs."""
    mechanisms = [registry.get(name) for name in spec.mechanisms]  # unknown names raise with the list
    if spec.impls is not None:
        decode = [m.decode.impls for m in mechanisms if m.decode is not None and DECODE in spec.modes]
        known = sorted({impl for m in mechanisms for impl in m.impls} | {impl for impls in decode for impl in impls})
        for impl in spec.impls:
            if impl not in known:
                raise InputError(f"unknown impl '{impl}' for {', '.join(spec.mechanisms)}; valid: {', '.join(known)}")
    if spec.max_call_ms is not None and spec.max_call_ms < 0:
        raise InputError(f"--max-call-ms must be >= 0 (0: no limit), got {spec.max_call_ms:g}")
    for level in spec.levels:
        if level not in LEVELS:
            raise InputError(f"unknown level '{level}'; valid: {', '.join(LEVELS)}")
    for mode in spec.modes:
        if mode not in MODES:
            raise InputError(f"unknown mode '{mode}'; valid: {', '.join(MODES)}")
    if DECODE in spec.modes and not spec.contexts:
        raise InputError("--mode decode needs --context L ... (the cache lengths)")
    if spec.contexts and DECODE not in spec.modes:
        raise InputError("--context gives the cache lengths of --mode decode; add decode to --mode")
    if spec.seed and not (spec.lengths and packing.parse(spec.lengths).drawn):
        raise InputError("--seed draws the lengths of --lengths uniform:LO-HI or file:PATH; nothing else is drawn with it")
    if spec.lengths:
        check_packed(spec)
    elif not spec.seqs:
        raise InputError("give at least one --seq")
    elif (spec.batches is None) == (spec.tokens is None):
        raise InputError("give --batch or --tokens, not both")
    positive = {"--seq": spec.seqs, "--batch": spec.batches or [], "--tokens": [spec.tokens] if spec.tokens is not None else []}
    positive |= {"--heads": [spec.heads], "--head-dim": [spec.head_dim]}
    positive |= {"--kv-heads": [spec.kv_heads] if spec.kv_heads is not None else [], "--window": [spec.window] if spec.window is not None else []}
    positive |= {"--context": spec.contexts, "--queries": [spec.queries]}
    for option, values in positive.items():
        bad = [v for v in values if v <= 0]
        if bad:
            raise InputError(f"{option} must be positive, got {bad[0]}")
    if spec.contexts and min(spec.contexts) < spec.queries:
        raise InputError(f"--context {min(spec.contexts)} is less than --queries {spec.queries}: the cache holds the new tokens too")
    for scheme in spec.positions or []:
        positions.check_scheme(scheme)
    registry.check_options(spec.mechanisms, spec.options, tuple(spec.positions or ()))
    kv_heads = spec.kv_heads or spec.heads
    if spec.heads % kv_heads:
        raise InputError(f"--heads ({spec.heads}) must be a multiple of --kv-heads ({kv_heads})")
    check_device(spec.device, spec.dtypes)
    check_runnable(expand(spec))


def check_packed(spec: SweepSpec) -> None:
    """--lengths: one pack replaces --seq and --batch, in the whole-sequence modes; --tokens sizes a
    drawn pack, and a listed one is its own size."""
    if DECODE in spec.modes:
        raise InputError("--lengths packs whole sequences for --mode fwd, bwd and fwdbwd; a decode step has no packed form here")
    if spec.seqs:
        raise InputError("--lengths replaces --seq: the pack's sequences are its lengths (drop --seq)")
    if spec.batches is not None:
        raise InputError("--lengths replaces --batch: one pack of N sequences (drop --batch)")
    if spec.check:
        raise InputError("--check gates B x T cases; it has no packed variable-length form (drop --check or --lengths)")
    asked = packing.parse(spec.lengths)
    if asked.drawn and spec.tokens is None:
        raise InputError(f"--lengths {asked.text} draws until the pack holds --tokens tokens: give --tokens")
    if not asked.drawn and spec.tokens is not None:
        raise InputError(f"--lengths {asked.text} is the pack itself ({sum(asked.listed)} tokens): drop --tokens, "
                         "which sizes a pack drawn from uniform:LO-HI or file:PATH")


def check_token_budget(tokens: int, seqs: Iterable[int]) -> None:
    """A --tokens the user gave must hold one sequence of every --seq: B = tokens // T is never 0.
    (The device's default budget is not checked: a --seq longer than it runs with B = 1.)"""
    longest = max(seqs)
    if tokens < longest:
        raise InputError(f"--tokens {tokens} is less than one sequence of --seq {longest} (B = tokens // T would be 0); "
                         f"give --tokens {longest} or more, or --batch")


def check_runnable(cases: list[Case]) -> None:
    """InputError when no case can run here: a sweep of unsupported rows alone is a refusal, not a result."""
    reasons: dict[str, list[str]] = {}
    for case in cases:
        reason = why_unsupported(case, registry.get(case.mechanism))
        if reason is None:
            return
        if case.impl not in reasons.setdefault(reason, []):
            reasons[reason].append(case.impl)
    why = [f"{', '.join(impls)}: {reason}" for reason, impls in reasons.items()]
    more = f"; and {len(why) - 3} other reasons" if len(why) > 3 else ""
    raise InputError(f"nothing in this sweep can run here (every case is unsupported): {'; '.join(why[:3]) or 'no cases'}{more}")


REFERENCE_IMPL = "torch"  # every mechanism's definition in plain torch: the slowest, timed last


def expand(spec: SweepSpec) -> list[Case]:
    """Every case of ``spec``, smaller sizes first within each series (so an OOM skips what
    follows), and every mechanism's plain-torch reference after all other impls: a sweep cut
    by a time limit has the fast impls of every mechanism before any reference (one recurrent
    reference can take minutes)."""
    cases = []
    lengths, pack = spec.packed()
    pack_text = ",".join(map(str, pack))
    sizes = {mode: [(max(pack), len(pack))] if pack else spec.sizes(mode) for mode in spec.modes}  # a pack: T its longest, B its N
    for name in spec.mechanisms:
        mechanism = registry.get(name)
        impls = [i for i in (spec.impls or mechanism.impls) if i in mechanism.impls]
        # a mechanism whose window has a default (window) records the window it really uses
        window = spec.window if spec.window is not None else mechanism.params.get("window", (None,))[0]
        for level, scheme in itertools.product(spec.levels, spec.positions or [None]):
            recorded = "" if scheme is None else scheme
            options = option_text(mechanism.split_options(spec.options, scheme)[1])
            heads, kv_heads, head_dim, preset = _shape(spec, level)
            for causal in spec.causal:
                for dtype in spec.dtypes:
                    for mode in spec.modes:
                        queries = spec.queries if mode == DECODE else None
                        for impl in impls if mode != DECODE else _decode_impls(spec, mechanism):
                            for seq, batch in sizes[mode]:
                                cases.append(Case(
                                    name, impl, level, mode, dtype, spec.device, batch, seq,
                                    heads, kv_heads, head_dim, causal, window, preset, recorded, options, queries,
                                    lengths, pack_text,
                                ))
    return sorted(cases, key=lambda case: case.impl == REFERENCE_IMPL)  # stable: the order above otherwise


def _decode_impls(spec: SweepSpec, mechanism: Mechanism) -> list[str]:
    """The decode impls of ``mechanism`` the sweep runs (--impl among them); a mechanism without a
    decode form gets the reference's name alone, for its rows that say so (never a silent drop)."""
    if mechanism.decode is None:
        return [REFERENCE_IMPL]
    return [i for i in (spec.impls or mechanism.decode.impls) if i in mechanism.decode.impls]


def _shape(spec: SweepSpec, level: str) -> tuple[int, int, int, str]:
    """(heads, kv_heads, head_dim, preset) of a level's cases: the model level's come from its preset."""
    if level not in MODEL_LEVELS:
        return spec.heads, spec.kv_heads or spec.heads, spec.head_dim, ""
    from attnbench.models.presets import Preset

    preset = Preset.from_name(spec.preset)
    return preset.heads, preset.heads, preset.dim // preset.heads, preset.name


def why_unsupported(case: Case, mechanism: Mechanism) -> str | None:
    """Why ``case`` cannot run on this machine, or None."""
    if case.level == "model-graph" and not case.device.startswith("cuda"):
        return "model-graph captures CUDA graphs: it needs a CUDA device"
    if case.mode == DECODE:
        return why_no_decode(case, mechanism)
    if case.pack:
        return why_not_packed(case, mechanism)
    cfg = case.layer_config()
    impl = mechanism.impl(case.impl)
    if case.level == "kernel" and (not mechanism.has_core or impl.run is None):
        return f"{case.mechanism}/{case.impl} has no kernel-level core (layer level only)"
    if case.level in MODEL_LEVELS and case.mode == "bwd":
        return "the model level times fwd (forward and loss) or fwdbwd (a whole training step)"
    return _why_not_positions(case, mechanism) or mechanism.why_not(cfg) or impl.why_not(cfg, case.device, DTYPES[case.dtype])


def _why_not_positions(case: Case, mechanism: Mechanism) -> str | None:
    if not case.positions:
        return None
    reason = positions.why_not(mechanism, case.positions)
    if reason:
        return reason
    if case.positions in positions.EMBEDDED and case.level not in MODEL_LEVELS:
        return f"{case.positions} positions are the model's embeddings, outside the attention: time them at --level model"
    return None


def why_not_packed(case: Case, mechanism: Mechanism) -> str | None:
    """Why the packed-batch ``case`` cannot run here, or None."""
    if case.level not in VARLEN_LEVELS:
        return f"a packed batch is timed at the {' and '.join(VARLEN_LEVELS)} levels"
    impl = mechanism.impl(case.impl)
    if impl.varlen is None:
        have = [name for name, other in mechanism.impls.items() if other.varlen is not None]
        takers = [name for name, m in registry.mechanisms().items() if any(i.varlen for i in m.impls.values())]
        where = f"{case.mechanism}'s impls with one: {', '.join(have)}" if have else f"the mechanisms with one: {', '.join(takers)}"
        return f"{case.mechanism}/{case.impl} has no packed variable-length core ({where})"
    cfg = case.layer_config()
    return _why_not_positions(case, mechanism) or mechanism.why_not(cfg) or impl.why_not_varlen(cfg, case.device, DTYPES[case.dtype])


def why_no_decode(case: Case, mechanism: Mechanism) -> str | None:
    """Why the decode ``case`` cannot run here, or None."""
    if mechanism.decode is None:
        have = ", ".join(name for name, m in registry.mechanisms().items() if m.decode is not None)
        return f"{case.mechanism} has no decode step here (the mechanisms with one: {have})"
    if not case.causal:
        return "a decode step is causal: its new tokens see the tokens before them (drop --bidirectional)"
    cfg = case.layer_config()
    if case.level != "kernel":
        return _why_no_cached_decode(case, mechanism) or _why_not_positions(case, mechanism) or mechanism.why_not(cfg)
    impl = mechanism.decode.impls[case.impl]
    reason = _why_not_positions(case, mechanism) or mechanism.why_not(cfg)
    return reason or impl.why_not(cfg, case.queries, case.device, DTYPES[case.dtype])


CACHED_DECODE_IMPLS = {REFERENCE_IMPL: "the layers' caches' own steps (models/generate.py)",
                       "triton": "the softmax family's KV caches read by our Triton decode kernel, linear's and deltanet's "
                                 "states stepped by our fused Triton steps"}


def _why_no_cached_decode(case: Case, mechanism: Mechanism) -> str | None:
    """Why a layer- or model-level decode case (a layer cache's step, models/generate.py) cannot run, or None."""
    if mechanism.decode.layer_cache is None:
        return f"{case.mechanism} has a decode step but no layer cache for a generate loop (models/generate.py)"
    if case.impl not in CACHED_DECODE_IMPLS:
        return f"the {case.level} level's decode step runs a layer cache ({', '.join(CACHED_DECODE_IMPLS)}): time {case.impl} at --level kernel"
    if case.impl == "triton":
        reason = mechanism.decode.impls["triton"].why_not(case.layer_config(), case.queries, case.device, DTYPES[case.dtype])
        if reason:
            return reason
    if case.queries != 1:
        return f"the {case.level} level's decode step takes one new token a sequence (--queries 1)"
    return _why_no_graph(case, mechanism) if case.level == "model-graph" else None


def _why_no_graph(case: Case, mechanism: Mechanism) -> str | None:
    """Why the model's decode step cannot be captured as a CUDA graph (model-graph), or None: a capture
    holds no host synchronisation, and a failed one leaves the process's CUDA context unusable."""
    if mechanism.decode.carries == "kv-cache" and case.impl != "triton":
        return "the plain-torch KV-cache steps check the lengths on the host (a synchronisation no graph holds): time triton at model-graph"
    if mechanism.decode.layer_host_sync is not None:
        return f"{mechanism.decode.layer_host_sync} (a synchronisation no graph holds)"
    if case.window is not None and (case.positions or mechanism.name) == "rope":
        return "a rolling cache's RoPE tables are sized from the lengths on the host (a synchronisation no graph holds)"
    return None


def _layer_cache(case: Case, mechanism: Mechanism):
    """The layer cache class a layer- or model-level decode case runs (CACHED_DECODE_IMPLS)."""
    cache = mechanism.decode.layer_cache
    if case.impl != "triton":
        return cache
    if mechanism.decode.carries == "state":
        return functools.partial(cache, state_step=cache.fused_step)  # models/state_decode.FusedStateCache
    from attnbench.kernels.decode import decode_attention

    return functools.partial(cache, attend=decode_attention)


# ---- levels: Case -> Workload


def _build_layer(case: Case) -> torch.nn.Module:
    layer = registry.build_layer(case.mechanism, case.layer_config())
    return layer.to(device=case.device, dtype=DTYPES[case.dtype])


def _randn(shape, case: Case, requires_grad: bool) -> torch.Tensor:
    return torch.randn(shape, device=case.device, dtype=DTYPES[case.dtype], requires_grad=requires_grad)


def kernel_workload(case: Case) -> Workload:
    """layer.attend(q, k, v): q [B, T, Hq, D], k/v [B, T, Hkv, D], the layer's own parameters."""
    layer = _build_layer(case)
    grad = case.mode != "fwd"
    b, t = case.batch, case.seq
    q = _randn((b, t, case.heads, case.head_dim), case, grad)
    k = _randn((b, t, case.kv_heads, case.head_dim), case, grad)
    v = _randn((b, t, case.kv_heads, case.head_dim), case, grad)
    leaves = [q, k, v, *layer.parameters()]
    return Workload(lambda: layer.attend(q, k, v), leaves, _param_count(layer), _core_flops(case))


def layer_workload(case: Case) -> Workload:
    """layer(x): x [B, T, C], C = heads * head_dim; projections and parameters included."""
    layer = _build_layer(case)
    x = _randn((case.batch, case.seq, case.heads * case.head_dim), case, case.mode != "fwd")
    forward = lambda: layer(x)  # noqa: E731
    flops = _core_flops(case) + flop_model.linear_flops(layer, forward, case.mode)
    return Workload(forward, [x, *layer.parameters()], _param_count(layer), flops)


def varlen_workload(case: Case) -> Workload:
    """A packed batch: the case's N sequences end to end (FlashAttention's varlen layout, no padding
    computed), each attending to itself alone. Its impl's core is bound to the pack first
    (QKVAttention.varlen_core, registry.Varlen: flex builds its block mask there), outside the
    timed call; that bind's time is ``setup_ms``. Kernel level: the core on q [total, Hq, D], k/v
    [total, Hkv, D]; layer level: x [total, C] through the projections, the core and the output
    projection (QKVAttention.forward_varlen). FLOPs: packed and padded (flops.varlen_flops)."""
    layer = _build_layer(case)
    lengths = case.seq_lengths()
    total = sum(lengths)
    cu_seqlens = packing.cu_seqlens(lengths, case.device)
    bound = []
    setup_ms = timing.first_call_ms(lambda: bound.append(layer.varlen_core(cu_seqlens, max(lengths))), torch.device(case.device))
    core, grad = bound[0], case.mode != "fwd"
    if case.level == "kernel":
        q = _randn((total, case.heads, case.head_dim), case, grad)
        k, v = (_randn((total, case.kv_heads, case.head_dim), case, grad) for _ in range(2))
        forward, inputs, per_token = (lambda: core(q, k, v)), [q, k, v], 0.0
    else:
        x = _randn((total, case.heads * case.head_dim), case, grad)
        forward, inputs = (lambda: layer.forward_varlen(x, core)), [x]
        per_token = flop_model.linear_flops(layer, forward, case.mode) / total
    flops, padded = flop_model.varlen_flops(registry.get(case.mechanism), case.layer_config(), lengths, case.mode, per_token)
    return Workload(forward, [*inputs, *layer.parameters()], _param_count(layer), flops, flops_padded=padded, setup_ms=setup_ms)


def _autocast(case: Case, cache_enabled: bool = True):
    """The model level's autocast to the case's dtype (off for fp32; parameters stay fp32, as in train)."""
    dtype = DTYPES[case.dtype]
    return torch.autocast(torch.device(case.device).type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=cache_enabled)


def model_workload(case: Case, graphed: bool = False) -> Workload:
    """A full training step of the ``case.preset`` model (GPT-style when causal, BERT-style MLM
    when bidirectional) on random tokens [B, T]: forward, loss, backward, AdamW step, under bf16
    or fp16 autocast for those dtypes (parameters stay fp32, as in `attnbench train`).
    fwd times the forward and loss alone, without autograd; FLOPs per token come from
    flops.train_flops_per_token, so % of peak is the MFU.
    graphed: what the case's mode times is captured once as a CUDA graph (capturable AdamW,
    autocast without its weight cache, as graph capture requires) and replayed."""
    from attnbench.models.transformer import build_model, training_step

    model = build_model(case.preset, case.mechanism, case.impl, "clm" if case.causal else "mlm", case.seq,
                        positions=case.positions or None, window=case.window, attention=case.option_values())
    model = model.to(case.device)
    ids = torch.randint(0, model.cfg.vocab_size, (case.batch, case.seq), device=case.device)
    batch = {"input_ids": ids, "labels": ids}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=graphed)

    def autocast():
        return _autocast(case, cache_enabled=not graphed)

    def forward():
        with autocast():
            return model(ids, labels=ids).loss_sum

    def step():
        with autocast():
            return training_step(model, optimizer, batch)

    if graphed and case.mode == "fwd":
        forward = _graph_of(torch.no_grad()(forward))
    elif graphed:
        step = _graph_of(step)
    flops = flop_model.train_flops_per_token(model, case.seq, case.mode) * case.batch * case.seq
    return Workload(forward, list(model.parameters()), _param_count(model), flops, step=step, peak_memory=not graphed, cuda_graph=graphed)


def layer_decode_workload(case: Case) -> Workload:
    """One token through one layer (projections, cache append, attention, output) for B sequences
    that hold L = case.seq tokens: the layer cache filled with random contents, each timed call one
    step undone after it (restore_cache), as model_decode_workload's (a fused state step's state keeps
    its token, written in place: only its length is undone, and a step's work does not depend on what
    the state holds)."""
    from attnbench.models.generate import cache_snapshot, restore_cache

    mechanism = registry.get(case.mechanism)
    layer = _build_layer(replace(case, impl=REFERENCE_IMPL)).eval()  # no step runs its core; linear's triton is a decode impl only
    cache = _layer_cache(case, mechanism)(layer, case.seq + 1)
    cache.fill(case.batch, case.seq, torch.device(case.device), DTYPES[case.dtype])
    start = cache_snapshot(cache)
    x = _randn((case.batch, 1, case.heads * case.head_dim), case, False)  # C, as layer_workload's

    @torch.no_grad()
    def step():
        o = cache.step(x)
        restore_cache(cache, start)
        return o

    memory = flop_model.decode_memory_mib(mechanism, case.layer_config(), case.seq, 1, DTYPES[case.dtype].itemsize)
    return Workload(step, [], _param_count(layer), None, mem_per_seq_mib=memory)


def model_decode_workload(case: Case) -> Workload:
    """One token through the ``case.preset`` GPT for B sequences that hold L = case.seq tokens: every
    layer's cache filled with random contents (models/generate.Decoder.fill), then each timed call
    is one step (embeddings, every block with its cache, the head's logits) under the dtype's
    autocast, undone after it (Decoder.restore) so that every call steps from L. model-graph: that
    step captured once as a CUDA graph, whose replays repeat it from L (the GPU's time without the
    host's launches; _why_no_graph says which steps can be). Memory per sequence: every layer's
    cache or state."""
    from attnbench.models.generate import Decoder
    from attnbench.models.transformer import build_model

    mechanism = registry.get(case.mechanism)
    model = build_model(case.preset, case.mechanism, REFERENCE_IMPL, "clm", case.seq + 1, positions=case.positions or None,
                        window=case.window, attention=case.option_values()).to(case.device).eval()
    decoder = Decoder(model, capacity=case.seq + 1, layer_cache=_layer_cache(case, mechanism))
    with _autocast(case):  # the caches take the dtype the projections give under it
        decoder.fill(case.batch, case.seq)
    start = decoder.snapshot()
    tokens = torch.randint(0, model.cfg.vocab_size, (case.batch,), device=case.device)
    graphed = case.level == "model-graph"

    @torch.no_grad()
    def step():
        with _autocast(case, cache_enabled=not graphed):
            logits = decoder.step(tokens)
        decoder.restore(start)
        return logits

    per_layer = flop_model.decode_memory_mib(mechanism, case.layer_config(), case.seq, 1, DTYPES[case.dtype].itemsize)
    return Workload(_graph_of(step) if graphed else step, [], _param_count(model), None, peak_memory=not graphed,
                    cuda_graph=graphed, mem_per_seq_mib=per_layer * model.cfg.layers)


def decode_workload(case: Case, graphed: bool) -> Workload:
    """One decode step of ``case.impl`` (Mechanism.decode): B sequences holding L = case.seq tokens,
    N = case.queries of them new; graphed: captured once as a CUDA graph and replayed, when the
    impl allows it on a CUDA device (otherwise the eager step). The layer and model levels:
    layer_decode_workload, model_decode_workload."""
    if case.level != "kernel":
        return layer_decode_workload(case) if case.level == "layer" else model_decode_workload(case)
    mechanism = registry.get(case.mechanism)
    impl = mechanism.decode.impls[case.impl]
    cfg, device, dtype = case.layer_config(), torch.device(case.device), DTYPES[case.dtype]
    step = impl.build(cfg, case.batch, case.seq, case.queries, device, dtype)
    graphed = graphed and impl.graphable and device.type == "cuda"
    return Workload(
        _graph_of(step) if graphed else step, [], None, None, peak_memory=not graphed, cuda_graph=graphed,
        bytes=flop_model.decode_bytes(mechanism, cfg, case.batch, case.seq, case.queries, dtype.itemsize),
        mem_per_seq_mib=flop_model.decode_memory_mib(mechanism, cfg, case.seq, case.queries, dtype.itemsize),
    )


def _graph_of(fn: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """``fn`` captured once as a CUDA graph, after ``warmup`` calls on a side stream (autotuning
    and lazy allocations happen there, as torch's graph docs prescribe); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _core_flops(case: Case) -> float:
    mechanism = registry.get(case.mechanism)
    return flop_model.core_flops(mechanism, case.layer_config(), case.batch, case.seq, case.mode)


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


LEVELS: dict[str, Callable[[Case], Workload]] = {
    "kernel": kernel_workload,
    "layer": layer_workload,
    "model": model_workload,
    "model-graph": lambda case: model_workload(case, graphed=True),
}


def workload(case: Case, timed: bool = True) -> Workload:
    """``case`` built: its level's workload, a packed batch's (varlen_workload), or a decode step
    (graphed where allowed when ``timed``; the warm-up calls the eager step, so compiling stays in
    first_call_ms)."""
    if case.mode == DECODE:
        return decode_workload(case, graphed=timed)
    return varlen_workload(case) if case.pack else LEVELS[case.level](case)


# ---- modes: Workload -> the timed callable


def timed_call(work: Workload, mode: str) -> Callable[[], object]:
    """fwd and decode: forward without autograd; bwd: backward of one forward done here, graph
    retained; fwdbwd: forward then backward, or the workload's whole step where it has one.
    The upstream gradient is random, made once."""
    if mode == "fwdbwd" and work.step is not None:
        return work.step
    if mode in ("fwd", DECODE):

        def fwd():
            with torch.no_grad():
                return work.forward()

        return fwd
    out = work.forward()
    grad = torch.randn_like(out)
    if mode == "bwd":
        return lambda: out.backward(grad, retain_graph=True)
    return lambda: work.forward().backward(grad)


# ---- the loop


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(err)


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _free(device: str) -> None:
    """After a failed case: its tensors may sit in reference cycles through the traceback."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


class Sweep:
    """Runs ``cases``; every finished row goes to ``write`` at once.

    ``recorded``: case keys (attnbench.store.case_key) already in the results, skipped on resume;
    ``prior_stops``: (case, reason) of cases that stopped their series before (stops_in);
    ``peaks``: measured matmul TFLOP/s per dtype name, for % of peak;
    ``copy_gbps``: measured copy bandwidth, for decode's % of bandwidth (None: not measured);
    ``larger(case, stop)``: whether a stop at ``stop`` skips ``case`` (SweepSpec.larger);
    ``max_call_ms``: a case slower than this per call skips the larger sizes of its series
    (a recurrent reference at 64k tokens would hold the sweep for minutes); None: no limit.
    """

    def __init__(
        self,
        cases: list[Case],
        write: Callable[[dict[str, Any]], None],
        recorded: set[tuple[str, ...]] = frozenset(),
        prior_stops: Iterable[tuple[Case, str]] = (),
        peaks: dict[str, float] | None = None,
        larger: Callable[[Case, Case], bool] = Case.larger_than,
        max_call_ms: float | None = None,
        check: bool = False,
        copy_gbps: float | None = None,
    ):
        self.pending = [c for c in cases if case_key(asdict(c)) not in recorded]
        self.write, self.peaks, self.larger = write, peaks or {}, larger
        self.stops: list[tuple[Case, str]] = list(prior_stops)
        self.max_call_ms, self.check, self.copy_gbps = max_call_ms, check, copy_gbps
        self.verdicts: dict[Case, str] = {}
        self.done: set[Case] = set()
        self.first_call: dict[Case, float] = {}
        self.rows: list[dict[str, Any]] = []

    def run(self, on_step: Callable[[str, Case], None] = lambda phase, case: None) -> list[dict[str, Any]]:
        """Series by series (the sizes of one mechanism/impl/mode/...): warm up each case of the
        series, then time each that warmed up; returns the rows written. A sweep stopped part way
        keeps every finished series' rows (resume runs the rest).
        ``on_step(phase, case)``: progress, once per pending case per phase ("warmup", "timing")."""
        for _, series in itertools.groupby(self.pending, key=Case.series):
            series = list(series)
            for case in series:
                on_step("warmup", case)
                self._step(case, self._warm_up)
            for case in series:
                on_step("timing", case)
                self._step(case, self._time)
        return self.rows

    def _step(self, case: Case, action: Callable[[Case], dict[str, Any] | None]) -> None:
        if case in self.done:
            return
        reason = next((why for stop, why in self.stops if self.larger(case, stop)), None)
        if reason:
            self._record(case, status="skipped", message=reason)
            return
        failed = False
        try:
            row = action(case)
        except Exception as err:  # one case failing never stops the sweep
            failed = True
            row = {"status": "oom" if is_oom(err) else "error", "message": one_line(err)}
        if failed:  # outside the except block, so the traceback's frames can be collected
            _free(case.device)
        if row is not None:
            self._record(case, **row)
            why = stop_reason(row["status"], row.get("ms_median"), self.max_call_ms)
            if why:
                self.stops.append((case, why))

    def _warm_up(self, case: Case) -> dict[str, Any] | None:
        mechanism = registry.get(case.mechanism)
        reason = why_unsupported(case, mechanism)
        if reason:
            return {"status": "unsupported", "message": reason}
        if self.check and case.level == "kernel" and case.mode != DECODE:
            self.verdicts[case] = gate_verdict(case, mechanism)
            if self.verdicts[case].startswith("fail"):  # a fast wrong answer is not a result
                return {"status": "error", "message": f"failed the correctness gate: {self.verdicts[case]}"}
        work = workload(case, timed=False)
        call = timed_call(work, case.mode)
        self.first_call[case] = timing.first_call_ms(call, torch.device(case.device))
        return None

    def _time(self, case: Case) -> dict[str, Any]:
        device = torch.device(case.device)
        work = workload(case)
        call = timed_call(work, case.mode)
        peak_mib = timing.peak_memory_mib(call, device) if work.peak_memory else None
        measured = timing.measure(call, device, grad_to_none=[t for t in work.leaves if t.requires_grad])
        tflops = None if work.flops is None else flop_model.tflops_per_s(work.flops, measured.median_ms)
        peak = self.peaks.get(case.dtype)
        gbps = None if work.bytes is None else flop_model.gb_per_s(work.bytes, measured.median_ms)
        return {
            "status": "ok",
            "message": "",
            "ms_median": measured.median_ms,
            "ms_p20": measured.p20_ms,
            "ms_p80": measured.p80_ms,
            "tokens_per_s": case.tokens() / (measured.median_ms * 1e-3),
            "flops": work.flops,
            "tflops": tflops,
            "pct_peak": 100.0 * tflops / peak if peak and tflops is not None else None,
            "peak_mem_mib": peak_mib,
            "params": work.params,
            "bytes": work.bytes,
            "gbps": gbps,
            "pct_bandwidth": 100.0 * gbps / self.copy_gbps if gbps is not None and self.copy_gbps else None,
            "mem_per_seq_mib": work.mem_per_seq_mib,
            "cuda_graph": work.cuda_graph,
            "flops_padded": work.flops_padded,
            "setup_ms": work.setup_ms,
        }

    def _record(self, case: Case, **result: Any) -> None:
        row = {**asdict(case), "first_call_ms": self.first_call.get(case), "check": self.verdicts.get(case),
               "mean_len": case.mean_length(), **result}
        self.write(row)
        self.rows.append(row)
        self.done.add(case)


GATE_MAX_SEQ = 2048  # the gate's float64 reference holds B x H x T x T scores: longer cases are checked at this T


def gate_verdict(case: Case, mechanism: Mechanism) -> str:
    """The correctness gate (attnbench.gate) on ``case``'s impl against the torch definition, at
    the case's shape with T capped at GATE_MAX_SEQ and B at 1: 'ok 1.02x', 'fail dq 3.1x',
    '... at T=2048' when capped; '' where the impl is the definition itself."""
    if case.impl == gate.REFERENCE:
        return ""
    seq = min(case.seq, GATE_MAX_SEQ)
    dtype = DTYPES[case.dtype]
    reason = gate.why_not(mechanism, case.positions or None, case.layer_config(), case.device, dtype)
    if reason:
        return f"unsupported {reason}"
    checked = gate.layer_case(str(case), mechanism, case.layer_config(), seq, dtype, False, case.device)
    said = gate.verdict(gate.measure(checked))
    return said + (f" at T={seq}" if seq < case.seq else "")


def stop_reason(status: str, ms_median: float | None, max_call_ms: float | None) -> str | None:
    """Why a case's result skips the larger sizes of its series, or None."""
    if status == "oom":
        return "a smaller size of this case ran out of memory"
    if status == "ok" and max_call_ms and ms_median is not None and ms_median > max_call_ms:
        return f"a smaller size took {ms_median:.0f} ms per call (over --max-call-ms {max_call_ms:g})"
    return None


def stops_in(rows: Iterable[dict[str, str]], max_call_ms: float | None) -> Iterator[tuple[Case, str]]:
    """(case, reason) of the CSV rows (strings) that stop their series (stop_reason), rebuilt as Cases."""
    for row in rows:
        ms = float(row["ms_median"]) if row.get("ms_median") else None
        why = stop_reason(row["status"], ms, max_call_ms)
        if not why:
            continue
        yield Case.from_row(row), why
