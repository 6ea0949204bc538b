"""gau: the gated attention unit with FLASH's mixed-chunk attention (Hua et al. 2022,
"Transformer Quality in Linear Time"). One head, no softmax:

    u, v = silu(x W_u), silu(x W_v)              [B, T, E]  (E = expansion * C)
    z = silu(x W_z)                              [B, T, S]  (shared by queries and keys)
    q_quad, k_quad, q_lin, k_lin = z * gamma_r + beta_r     (per-dimension scale and offset, r = 1..4)
    o = (u * (A v)) W_o

The sequence is cut into chunks of G tokens. Within a chunk the weights are quadratic,
relu(q_quad . k_quad / G)^2 (causal: keys at or before the query); across chunks they are
linear, q_lin . k_lin / G for every key of an earlier chunk (causal), or q_lin . k_lin / n
for every key of the sequence, its own chunk included, with n its real length
(bidirectional). Key padding: padded keys get v = 0, which removes them from both sums.

``torch`` is that definition with the [B, T, T] weight matrix A in memory; ``chunked`` is the
FLASH form at linear cost: [G, G] weights per chunk, plus one [S, E] state per chunk whose
(exclusive) prefix sums carry the earlier chunks. Both compute the same A exactly. With one
chunk (G >= T), causal, the linear part vanishes and this is the plain quadratic GAU with
relu(q . k / T)^2 over keys at or before the query (tested). The paper's relative position
bias is left out: the model adds absolute positions, or the layer rotates all four of q_quad,
k_quad, q_lin, k_lin by RoPE (as FLASH's code does); ALiBi has no softmax scores to bias here.

Decode (causal): GAUState carries the current chunk's k_quad and v (at most G rows) and the
earlier chunks' state; gau_step adds one token and folds a finished chunk into the state when
the next one starts, so a step costs O(G S + G E + S E) whatever the context.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from attnbench.kernels.decode_cost import held_in_chunk
from attnbench.models import positions
from attnbench.models.registry import MATMUL_BACKWARD, DecodeForm, DecodeImpl, Impl, LayerConfig, Mechanism

DEFAULT_CHUNK = 256
DEFAULT_QK_DIM = 128
DEFAULT_EXPANSION = 2


def _real_lengths(b: int, t: int, seq_lens: torch.Tensor | None, device) -> torch.Tensor:
    return torch.full((b,), t, device=device) if seq_lens is None else seq_lens.to(device)


def quadratic(q_quad, k_quad, q_lin, k_lin, v, *, causal, seq_lens=None, chunk=DEFAULT_CHUNK):
    """The definition: queries/keys [B, T, S], values [B, T, E] -> [B, T, E] through A [B, T, T]."""
    b, t, _ = v.shape
    position = torch.arange(t, device=v.device)
    same_chunk = (position[:, None] // chunk) == (position[None, :] // chunk)  # (T, T)
    before = position[None, :] <= position[:, None]
    lengths = _real_lengths(b, t, seq_lens, v.device)
    v = v * (position[None, :] < lengths[:, None])[..., None].to(v.dtype)  # padded keys carry nothing
    local = relu_squared(q_quad @ k_quad.transpose(1, 2) / chunk) * (same_chunk & before if causal else same_chunk)
    if causal:
        earlier_chunk = (position[None, :] // chunk) < (position[:, None] // chunk)
        far = (q_lin @ k_lin.transpose(1, 2)) * earlier_chunk / chunk
    else:
        far = (q_lin @ k_lin.transpose(1, 2)) / lengths.clamp(min=1).view(b, 1, 1).to(v.dtype)
    return (local + far) @ v


def mixed_chunk(q_quad, k_quad, q_lin, k_lin, v, *, causal, seq_lens=None, chunk=DEFAULT_CHUNK):
    """FLASH's linear-cost form: same arguments and result as the definition; memory
    O(T * G + T / G * S * E), no [T, T] tensor."""
    b, t, e = v.shape
    lengths = _real_lengths(b, t, seq_lens, v.device)
    v = v * (torch.arange(t, device=v.device)[None, :] < lengths[:, None])[..., None].to(v.dtype)
    pad = -t % chunk  # zero tail tokens: v = 0 carries nothing; their outputs are cut off
    n = (t + pad) // chunk
    q_quad, k_quad, q_lin, k_lin, v = (F.pad(x, (0, 0, 0, pad)).view(b, n, chunk, -1) for x in (q_quad, k_quad, q_lin, k_lin, v))
    local = relu_squared(q_quad @ k_quad.transpose(-1, -2) / chunk)  # (B, N, G, G)
    if causal:
        local = local * torch.ones(chunk, chunk, dtype=torch.bool, device=v.device).tril()
    states = k_lin.transpose(-1, -2) @ v  # (B, N, S, E): each chunk's sum of k_lin v^T
    if causal:  # chunk i sees chunks 0 .. i-1: prefix sums shifted by one (no cumsum - x cancellation)
        states = F.pad(states.cumsum(1), (0, 0, 0, 0, 1, 0))[:, :-1] / chunk
    else:
        states = states.sum(1, keepdim=True) / lengths.clamp(min=1).view(b, 1, 1, 1).to(v.dtype)
    o = local @ v + q_lin @ states  # (B, N, G, E)
    return o.reshape(b, n * chunk, e)[:, :t]


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


MIXERS = {"torch": quadratic, "chunked": mixed_chunk}


class GatedAttentionUnit(nn.Module):
    """The GAU layer, x [B, T, C] -> [B, T, C]; ``impl`` picks how the weights A are applied."""

    def __init__(self, cfg: LayerConfig):
        super().__init__()
        options = gau_options(cfg)
        self.causal, self.chunk = cfg.causal, options["chunk"]
        self.mix = MIXERS[cfg.impl]
        if cfg.positions == "alibi":
            raise ValueError(MECHANISM.refuses["alibi"])
        self.theta = positions.theta(cfg) if cfg.positions == "rope" else None
        expanded = options["expansion"] * cfg.dim
        self.uv = nn.Linear(cfg.dim, 2 * expanded, bias=cfg.bias)
        self.z = nn.Linear(cfg.dim, options["qk_dim"], bias=cfg.bias)
        # the paper's init for q_quad, k_quad, q_lin, k_lin: scales ~ N(0, 0.02^2), zero offsets
        self.gamma = nn.Parameter(torch.randn(4, options["qk_dim"]) * 0.02)
        self.beta = nn.Parameter(torch.zeros(4, options["qk_dim"]))
        self.out = nn.Linear(expanded, cfg.dim, bias=cfg.bias)

    def project(self, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, ...]:
        """x [B, T, C] of the tokens at positions start .. start+T-1 -> u, v [B, T, E] and q_quad,
        k_quad, q_lin, k_lin [B, T, S] (rotated at those positions under RoPE)."""
        u, v = F.silu(self.uv(x)).chunk(2, dim=-1)  # (B, T, E) each
        z = F.silu(self.z(x))  # (B, T, S)
        q_quad, k_quad, q_lin, k_lin = (z[:, :, None] * self.gamma + self.beta).unbind(dim=2)
        if self.theta is not None:
            q_quad, k_quad = self.rotated(q_quad, k_quad, start)
            q_lin, k_lin = self.rotated(q_lin, k_lin, start)
        return u, v, q_quad, k_quad, q_lin, k_lin

    def forward(self, x: torch.Tensor, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        u, v, q_quad, k_quad, q_lin, k_lin = self.project(x)
        mixed = self.mix(q_quad, k_quad, q_lin, k_lin, v, causal=self.causal, seq_lens=seq_lens, chunk=self.chunk)
        return self.out(u * mixed)

    def rotated(self, q: torch.Tensor, k: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on one-head queries and keys [B, T, S] (as [B, T, 1, S]) at positions start .. start+T-1."""
        q, k = positions.rotate_qk(q[:, :, None], k[:, :, None], self.theta, start)
        return q[:, :, 0], k[:, :, 0]


class GAUState(NamedTuple):
    """B sequences' causal GAU after L tokens: the current chunk's k_quad [B, H, S] and v [B, H, E]
    (H = its tokens so far, 1..G), its own sum of k_lin v^T [B, S, E], and the earlier chunks'
    state [B, S, E] = their sum of k_lin v^T / G (mixed_chunk's prefix sums)."""

    keys: torch.Tensor
    values: torch.Tensor
    current: torch.Tensor
    earlier: torch.Tensor


def gau_state(k_quad: torch.Tensor, k_lin: torch.Tensor, v: torch.Tensor, chunk: int) -> GAUState:
    """The state after the T >= 1 tokens of k_quad, k_lin [B, T, S], v [B, T, E]: every chunk before
    the one holding the last token folded, that one kept."""
    t = k_quad.shape[1]
    done = t - held_in_chunk(t, chunk)  # tokens of the folded chunks
    earlier = torch.einsum("bts,bte->bse", k_lin[:, :done], v[:, :done]) / chunk
    current = torch.einsum("bts,bte->bse", k_lin[:, done:], v[:, done:])
    return GAUState(k_quad[:, done:], v[:, done:], current, earlier)


def gau_step(q_quad, k_quad, q_lin, k_lin, v, state: GAUState, chunk: int) -> tuple[torch.Tensor, GAUState]:
    """Adds the token (k_quad, k_lin [B, S], v [B, E]) and reads with q_quad, q_lin [B, S]: (the mixed
    output [B, E], the new state). A token that starts a chunk folds the finished one first."""
    if state.keys.shape[1] == chunk:
        state = GAUState(state.keys[:, :0], state.values[:, :0], torch.zeros_like(state.current), state.earlier + state.current / chunk)
    keys, values = torch.cat([state.keys, k_quad[:, None]], 1), torch.cat([state.values, v[:, None]], 1)
    current = state.current + k_lin[:, :, None] * v[:, None, :]
    local = relu_squared(torch.einsum("bs,bhs->bh", q_quad, keys) / chunk)  # (B, H): the chunk's keys so far
    o = torch.einsum("bh,bhe->be", local, values) + torch.einsum("bs,bse->be", q_lin, state.earlier)
    return o, GAUState(keys, values, current, state.earlier)


class GAUCache:
    """A causal GAU layer's GAUState in a generate loop (DecodeForm.layer_cache), whatever the capacity."""

    def __init__(self, layer: GatedAttentionUnit, capacity: int):
        if not layer.causal:
            raise ValueError("a bidirectional GAU has no incremental form")
        self.layer, self.length, self.state = layer, 0, None

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's forward over the prompt x [B, T, C] -> [B, T, C]; the state after it kept."""
        _, v, _, k_quad, _, k_lin = self.layer.project(x)
        self.state, self.length = gau_state(k_quad, k_lin, v, self.layer.chunk), x.shape[1]
        return self.layer(x)

    def fill(self, batch: int, context: int, device, dtype) -> None:
        """As if ``context`` tokens had been read: a random state whose current chunk holds the tokens
        past the last whole chunk (a step's work depends on their count, not on what they hold)."""
        x = torch.randn(batch, held_in_chunk(context, self.layer.chunk), self.layer.uv.in_features, device=device, dtype=dtype)
        _, v, _, k_quad, _, k_lin = self.layer.project(x)
        self.state, self.length = gau_state(k_quad, k_lin, v, self.layer.chunk), context

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1, C] of the token at position ``length`` -> [B, 1, C]."""
        u, v, q_quad, k_quad, q_lin, k_lin = (y[:, 0] for y in self.layer.project(x, self.length))
        mixed, self.state = gau_step(q_quad, k_quad, q_lin, k_lin, v, self.state, self.layer.chunk)
        self.length += 1
        return self.layer.out(u * mixed)[:, None]


def gau_options(cfg: LayerConfig) -> dict:
    options = {
        "chunk": int(cfg.options.get("chunk", DEFAULT_CHUNK)),
        "qk_dim": int(cfg.options.get("qk_dim", DEFAULT_QK_DIM)),
        "expansion": int(cfg.options.get("expansion", DEFAULT_EXPANSION)),
    }
    for name, value in options.items():
        if value <= 0:
            raise ValueError(f"gau option {name} must be positive, not {value}")
    return options


def gau_flops(cfg: LayerConfig, batch: int, seq: int, seq_lens=None) -> float:
    """The token mixing of the FLASH form per token (projections, gating, scale/offset not
    counted), chunks of G, S = qk_dim, E = expansion * C:
    2*G*S (q_quad k_quad^T over its chunk, full tile) + 2*G*E (times v)
    + 2*S*E (k_lin v^T into its chunk's state) + 2*S*E (q_lin times the summed states)."""
    options = gau_options(cfg)
    g, s, e = options["chunk"], options["qk_dim"], options["expansion"] * cfg.dim
    return batch * seq * (2.0 * g * (s + e) + 4.0 * s * e)


def _sizes(cfg: LayerConfig) -> tuple[int, int, int]:
    """(G, S, E): chunk, qk_dim and value width of cfg's GAU."""
    options = gau_options(cfg)
    return options["chunk"], options["qk_dim"], options["expansion"] * cfg.dim


def _torch_step(cfg, batch, context, queries, device, dtype):
    """One token against a random state whose current chunk holds the context's tokens past its last whole chunk."""
    g, s, e = _sizes(cfg)
    held = held_in_chunk(context, g)
    q_quad, k_quad, q_lin, k_lin = (torch.randn(batch, s, device=device, dtype=dtype) for _ in range(4))
    v = torch.randn(batch, e, device=device, dtype=dtype)
    state = GAUState(torch.randn(batch, held, s, device=device, dtype=dtype), torch.randn(batch, held, e, device=device, dtype=dtype),
                     torch.randn(batch, s, e, device=device, dtype=dtype), torch.randn(batch, s, e, device=device, dtype=dtype))
    return lambda: gau_step(q_quad, k_quad, q_lin, k_lin, v, state, g)[0]


def _state_bytes(cfg: LayerConfig, context: int, itemsize: int) -> int:
    """One sequence's GAUState: the current chunk's k_quad and v rows and the two [S, E] sums, all in
    the inputs' dtype (the state is what the chunked forward's prefix sums hold)."""
    g, s, e = _sizes(cfg)
    return (held_in_chunk(context, g) * (s + e) + 2 * s * e) * itemsize


def _step_bytes(cfg: LayerConfig, batch: int, context: int, queries: int, itemsize: int) -> int:
    """The state read, the current chunk's sum written, the token's four [S] and one [E] read, [E] written."""
    _, s, e = _sizes(cfg)
    return batch * (_state_bytes(cfg, context, itemsize) + (s * e + 4 * s + 2 * e) * itemsize)


def _step_unsupported(cfg: LayerConfig, queries: int, device, dtype) -> str | None:
    if queries != 1:
        return "gau's step takes one token at a time (--queries 1)"
    return "gau's step takes no RoPE here (q and k are rotated in the layer: --level layer or model)" if cfg.positions == "rope" else None


DECODE = DecodeForm("state", _step_bytes, lambda cfg, context, queries, itemsize: _state_bytes(cfg, context, itemsize), {
    "torch": DecodeImpl("torch", _torch_step, "plain torch one-token step: the chunk's keys so far, the earlier chunks' state",
                        graphable=False, unsupported=_step_unsupported),
}, layer_cache=GAUCache)

IMPLS = {
    "torch": Impl("torch", None, "plain torch by definition (T x T weights in memory)"),
    "chunked": Impl("chunked", None, "torch, FLASH mixed chunks: quadratic within, prefix-summed states across"),
}

MECHANISM = Mechanism(
    name="gau",
    description="gated attention unit, FLASH mixed-chunk form: relu^2 within chunks, linear across (Hua et al. 2022)",
    family="linear",
    layer=GatedAttentionUnit,
    impls=IMPLS,
    flops=gau_flops,
    backward_factor=MATMUL_BACKWARD,  # its backward is the gradients of its in-chunk and state matmuls (relu^2 weights kept, nothing recomputed)
    refuses={"alibi": "gau has no softmax scores to bias (relu^2 weights within chunks, linear across)"},
    gqa=False,
    has_core=False,
    params={
        "chunk": (DEFAULT_CHUNK, "tokens per chunk G: quadratic attention within, linear across"),
        "qk_dim": (DEFAULT_QK_DIM, "width S of the shared query/key projection z"),
        "expansion": (DEFAULT_EXPANSION, "u and v width E as a multiple of the model width"),
    },
    decode=DECODE,
)
