"""Sample replacement tokens from the generator and build the corrupted token map.

Reference semantics (the specification the fused kernel follows exactly):

* ``logits`` [M, V] are the generator's outputs at the M masked positions, in
  the row order of ``mask.nonzero()`` (row-major over [B, N]).
* Row r draws ``argmax_j(logits[r, j] / T + G[r, j])`` (Gumbel-max: exactly a
  draw from softmax(logits / T)). The Gumbel noise is counter-based:
  ``G[r, j] = -log(-log(u))`` with ``u`` made from ``hash32(key[r] ^ j)``, and
  ``key[r] = hash32(hash32(sample_key[b]) ^ n)`` for the masked position
  (b, n). A sample's draws thus depend on its own key only, never on the
  batch it sits in, the rank or how many numbers were drawn before: a resumed
  run or a run on another number of ranks draws the same tokens.
* ``corrupted`` = ``ids`` with the masked positions overwritten by the draws;
  unmasked positions untouched.
* ``replaced`` [B, N] (float 0/1) is 1 where a masked position's draw differs
  from the original id (ELECTRA: a draw equal to the original counts as original).

No gradient flows through sampling.

The fused op ``sample_ce`` does the generator's whole per-row work in one read
of the logits: the cross-entropy of each row against the original id (with its
gradient, softmax - onehot, written during the forward as in Liger-Kernel's
fused cross-entropy), the Gumbel-max draw above with the very same noise, the
corrupted map, the replaced labels and argmax accuracy. ``sample_ce_reference``
is its plain PyTorch twin; ``sample_ce`` dispatches (``cimfast.kernels.dispatch``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from cimfast.kernels.dispatch import HAS_TRITON, INTERPRETER, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

MASK32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors holding uint32 values."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32  # wraps in int64; the low 32 bits are exact
    return x ^ (x >> 16)


def uniform_from_bits(h: torch.Tensor) -> torch.Tensor:
    """uint32 hash -> float32 uniform in (0, 1) from its top 23 bits."""
    # 23 bits: (2^23 - 0.5) / 2^23 is exact in fp32, so u < 1 always (with 24
    # bits the top value rounds to 1.0 and its Gumbel noise to +inf)
    return ((h >> 9).float() + 0.5) * (1.0 / (1 << 23))


def row_keys(sample_keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per masked row key [M] (int64, uint32 range) from per-sample keys [B]."""
    pos = torch.arange(mask.shape[1], device=mask.device, dtype=torch.int64)
    keys = hash32(hash32(sample_keys.to(torch.int64)).unsqueeze(1) ^ pos)  # [B, N]
    return keys[mask.bool()]


def gumbel_noise_reference(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    cols = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    u = uniform_from_bits(hash32(keys.unsqueeze(1) ^ cols))
    return -torch.log(-torch.log(u))


def _check(logits, ids, mask, sample_keys, temperature):
    if logits.dim() != 2:
        raise ValueError(f"logits must be [masked positions, vocab], got {tuple(logits.shape)}")
    if ids.shape != mask.shape or ids.dim() != 2:
        raise ValueError(f"ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must both be [B, N]")
    if sample_keys.shape != (ids.shape[0],):
        raise ValueError(f"sample_keys must be [B]={ids.shape[0]}, got {tuple(sample_keys.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def sample_replace_reference(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                             sample_keys: torch.Tensor, temperature: float = 1.0, *,
                             positions: torch.Tensor | None = None):
    """Plain PyTorch: Gumbel noise [M, V], argmax, scatter. Returns (corrupted ids, replaced).

    ``positions`` (optional): the flat masked indices (see ``sample_ce``); with
    them no boolean indexing happens, so no host sync on CUDA."""
    _check(logits, ids, mask, sample_keys, temperature)
    with torch.no_grad():
        if positions is None:
            positions = mask.bool().reshape(-1).nonzero().squeeze(1)
        if positions.shape[0] != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} logit rows for {positions.shape[0]} masked positions")
        keys = row_keys_at(sample_keys, positions.clamp_min(0), ids.shape[1])
        scores = logits.detach().float() / temperature + gumbel_noise_reference(keys, logits.shape[1])
        draws = scores.argmax(dim=-1)
        # Padding rows (position -1) write into a spare last slot that is dropped.
        spare = ids.numel()
        corrupted = torch.cat([ids.reshape(-1), ids.new_zeros(1)])
        corrupted[torch.where(positions >= 0, positions, spare)] = draws.to(ids.dtype)
        corrupted = corrupted[:spare].view_as(ids)
        replaced = (corrupted != ids).float()
    return corrupted, replaced


class SampleCE(NamedTuple):
    """What ``sample_ce`` returns (a tuple; fields by name too)."""
    loss_rows: torch.Tensor  # [M] fp32 cross-entropy of each row against the original id (differentiable)
    corrupted: torch.Tensor  # [B, N] ids with the masked positions replaced by the draws
    replaced: torch.Tensor   # [B, N] float 0/1: the draw differs from the original id
    correct: torch.Tensor    # [M] bool: argmax(logits) == original id


def row_keys_at(sample_keys: torch.Tensor, positions: torch.Tensor, n: int) -> torch.Tensor:
    """``row_keys`` for masked positions given as flat indices into [B, n] (row-major,
    the order of ``mask.nonzero()``): the same keys, without a data-dependent shape."""
    positions = positions.to(torch.int64)
    return hash32(hash32(sample_keys.to(torch.int64))[positions // n] ^ (positions % n))


def sample_ce_reference(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                        sample_keys: torch.Tensor, temperature: float = 1.0, *,
                        positions: torch.Tensor | None = None) -> SampleCE:
    """Plain PyTorch twin of the fused op: cross-entropy + ``sample_replace_reference`` + argmax.
    ``positions`` (optional) must be ``mask.flatten().nonzero()``'s indices; see ``sample_ce``."""
    corrupted, replaced = sample_replace_reference(logits, ids, mask, sample_keys, temperature, positions=positions)
    if positions is None:
        targets, valid = ids[mask.bool()], None
    else:  # padding rows (position -1, fewer masked patches than rows): NaN loss, never correct
        valid = positions >= 0
        targets = ids.reshape(-1)[positions.clamp_min(0)]
    loss_rows = F.cross_entropy(logits.float(), targets, reduction="none")
    with torch.no_grad():
        correct = logits.argmax(dim=-1) == targets
    if valid is not None:
        loss_rows = torch.where(valid, loss_rows, float("nan"))
        correct = correct & valid
    return SampleCE(loss_rows, corrupted, replaced, correct)


# --------------------------------------------------------------------------- kernels

if HAS_TRITON:

    @triton.jit
    def _hash32(x):
        """lowbias32 on uint32 (wrapping multiplies, logical shifts): ``hash32`` above."""
        x ^= x >> 16
        x *= 0x7FEB352D
        x ^= x >> 15
        x *= 0x846CA68B
        x ^= x >> 16
        return x

    @triton.jit
    def _sample_ce_fwd_kernel(
        logits_ptr, stride_row, ids_ptr, pos_ptr, keys_ptr,
        loss_ptr, corrupted_ptr, replaced_ptr, correct_ptr, grad_ptr,
        M, V, temperature,
        ROWS: tl.constexpr, BLOCK_V: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)
        row_ok = rows < M
        # Rows past the end redo the last row instead of reading nothing: no
        # -inf - -inf = NaN on empty rows; their results are never stored.
        rows = tl.minimum(rows, M - 1).to(tl.int64)
        pos = tl.load(pos_ptr + rows)              # flat index into [B, N]
        # A batch with fewer masked patches than rows pads positions with -1
        # (nonzero_static): such rows read and write nothing and get a NaN
        # loss, which the training loop's non-finite check sees.
        pos_ok = pos >= 0
        pos = tl.maximum(pos, 0)
        target = tl.load(ids_ptr + pos)            # the original id
        key = tl.load(keys_ptr + rows).to(tl.uint32)
        row_base = logits_ptr + rows * stride_row  # [ROWS] pointers

        m = tl.full((ROWS,), float("-inf"), tl.float32)     # running max of the logits
        s = tl.zeros((ROWS,), tl.float32)                   # running sum of exp(x - m)
        arg = tl.zeros((ROWS,), tl.int32)                   # argmax of the logits
        best = tl.full((ROWS,), float("-inf"), tl.float32)  # running max of the Gumbel scores
        draw = tl.zeros((ROWS,), tl.int32)                  # its column: the draw

        # Pass 1: one read of the row, in BLOCK_V chunks (V need not be a multiple).
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            x = tl.load(row_base[:, None] + cols[None, :], mask=col_ok[None, :], other=float("-inf")).to(tl.float32)

            cmax = tl.max(x, axis=1)
            # Strict '>' keeps the earlier chunk on ties: torch.argmax returns the first maximum.
            arg = tl.where(cmax > m, v0 + tl.argmax(x, axis=1), arg)
            m_new = tl.maximum(m, cmax)
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
            m = m_new

            # The reference's counter-based Gumbel noise, recomputed from (row key, column).
            h = _hash32(key[:, None] ^ cols[None, :].to(tl.uint32))
            u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # as uniform_from_bits: 23 bits, u < 1
            # div_rn: IEEE division like PyTorch's (a GPU's default '/' is approximate)
            score = tl.where(col_ok[None, :], tl.math.div_rn(x, temperature) - tl.log(-tl.log(u)), float("-inf"))
            smax = tl.max(score, axis=1)
            draw = tl.where(smax > best, v0 + tl.argmax(score, axis=1), draw)
            best = tl.maximum(best, smax)

        lse = m + tl.log(s)
        target_ok = (target >= 0) & (target < V)
        target_logit = tl.load(row_base + target, mask=target_ok, other=0.0).to(tl.float32)
        tl.store(loss_ptr + rows, tl.where(pos_ok, lse - target_logit, float("nan")), mask=row_ok)
        tl.store(correct_ptr + rows, ((arg == target) & pos_ok).to(tl.int8), mask=row_ok)
        tl.store(corrupted_ptr + pos, draw.to(corrupted_ptr.dtype.element_ty), mask=row_ok & pos_ok)
        tl.store(replaced_ptr + pos, (draw != target).to(tl.float32), mask=row_ok & pos_ok)

        # Pass 2 (training only): d loss_r / d logits_r = softmax - onehot, now
        # that the row's logsumexp is known. The backward only scales it.
        if COMPUTE_GRAD:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                col_ok = cols < V
                x = tl.load(row_base[:, None] + cols[None, :], mask=col_ok[None, :], other=float("-inf")).to(tl.float32)
                g = tl.exp(x - lse[:, None]) - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
                tl.store(grad_ptr + rows[:, None] * V + cols[None, :], g.to(grad_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _scale_rows_kernel(grad_ptr, scale_ptr, out_ptr, M, V,
                           ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
        """out[r, :] = grad[r, :] * scale[r], in fp32, stored in out's dtype."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        ok = (rows < M)[:, None] & (cols < V)[None, :]
        offs = rows.to(tl.int64)[:, None] * V + cols[None, :]
        scale = tl.load(scale_ptr + rows, mask=rows < M, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (g * scale[:, None]).to(out_ptr.dtype.element_ty), mask=ok)


def _launch_config(V: int, block_v: int, rows: int, interpreter: bool = INTERPRETER) -> tuple[int, int, int]:
    """(rows per program, columns per chunk, warps) of the forward kernel. 0 means: pick."""
    if block_v and block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    if interpreter:
        # The interpreter runs programs one after another: few wide programs
        # (16 rows per program runs a 4096 x 768 test 15x faster than one).
        rows = rows or 16
        block_v = block_v or min(triton.next_power_of_2(V), 1024)
    else:
        # One row per program: M (about 19k rows in CIM) programs fill the GPU;
        # an 8192-wide chunk holds a whole DALL-E vocabulary row in registers.
        rows = rows or 1
        block_v = block_v or min(triton.next_power_of_2(V), 8192)
    tile = rows * block_v
    num_warps = 16 if tile >= 8192 else 8 if tile >= 2048 else 4
    return rows, block_v, num_warps


def _backward_launch_config(V: int, interpreter: bool = INTERPRETER) -> tuple[int, int, int]:
    """(rows per program, columns per program, warps) of the row-scaling backward kernel."""
    rows, block, _ = _launch_config(V, 0, 0, interpreter)
    return rows, (block if interpreter else min(block, 2048 // rows)), 4


# ----------------------------------------------------------------- host wrapper + op

@torch.library.custom_op("cimfast::sample_ce", mutates_args=())
def _sample_ce_op(logits: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
                  temperature: float, compute_grad: bool, block_v: int = 0, rows_per_program: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel launch. logits [M, V]; ids [B, N]; positions [M] flat indices of
    the masked positions in [B, N]; keys [M] row keys. Returns (loss_rows,
    corrupted, replaced, correct, grad); grad is [M, V] d loss_rows[r] /
    d logits[r] when compute_grad, else empty."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    M, V = logits.shape
    ids = ids.contiguous()
    corrupted = ids.clone()
    replaced = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    loss = torch.empty(M, dtype=torch.float32, device=logits.device)
    correct = torch.empty(M, dtype=torch.bool, device=logits.device)
    grad = torch.empty((M, V) if compute_grad else (0,), dtype=logits.dtype, device=logits.device)
    if M == 0:
        return loss, corrupted, replaced, correct, grad
    rows, block, num_warps = _launch_config(V, block_v, rows_per_program)
    _sample_ce_fwd_kernel[(triton.cdiv(M, rows),)](
        logits, logits.stride(0), ids, positions.contiguous(), keys.contiguous(),
        loss, corrupted, replaced, correct.view(torch.int8), grad,
        M, V, float(temperature),
        ROWS=rows, BLOCK_V=block, COMPUTE_GRAD=compute_grad, num_warps=num_warps)
    return loss, corrupted, replaced, correct, grad


@_sample_ce_op.register_fake
def _(logits, ids, positions, keys, temperature, compute_grad, block_v=0, rows_per_program=0):
    M, V = logits.shape
    return (logits.new_empty(M, dtype=torch.float32),
            ids.new_empty(ids.shape),
            ids.new_empty(ids.shape, dtype=torch.float32),
            logits.new_empty(M, dtype=torch.bool),
            logits.new_empty((M, V) if compute_grad else (0,)))


@torch.library.custom_op("cimfast::sample_ce_backward", mutates_args=())
def _sample_ce_backward_op(grad: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
    """grad [M, V] (softmax - onehot) times the upstream gradient of each row's loss."""
    M, V = grad.shape
    out = torch.empty_like(grad)
    if M == 0:
        return out
    rows, block, num_warps = _backward_launch_config(V)
    _scale_rows_kernel[(triton.cdiv(M, rows), triton.cdiv(V, block))](
        grad, grad_rows.contiguous(), out, M, V, ROWS=rows, BLOCK_V=block, num_warps=num_warps)
    return out


@_sample_ce_backward_op.register_fake
def _(grad, grad_rows):
    return torch.empty_like(grad)


def _sample_ce_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[4])
    ctx.num_rows = inputs[0].shape[0]


def _sample_ce_backward(ctx, grad_loss, *unused):
    # Only loss_rows is differentiable; corrupted/replaced/correct carry no gradient.
    (grad,) = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 8
    if grad.dim() != 2 and ctx.num_rows > 0:
        raise RuntimeError("cimfast::sample_ce ran with compute_grad=False, so it has no gradient to give")
    return (torch.ops.cimfast.sample_ce_backward(grad, grad_loss),) + (None,) * 7


_sample_ce_op.register_autograd(_sample_ce_backward, setup_context=_sample_ce_setup_context)


def sample_ce_triton(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, sample_keys: torch.Tensor,
                     temperature: float = 1.0, *, positions: torch.Tensor | None = None,
                     block_v: int = 0, rows_per_program: int = 0) -> SampleCE:
    """The fused kernel (CUDA, or the CPU under TRITON_INTERPRET=1). Same result as
    ``sample_ce_reference``; block_v/rows_per_program override the launch shape (tests)."""
    if not HAS_TRITON:
        raise RuntimeError("sample_ce_triton needs triton")
    _check(logits, ids, mask, sample_keys, temperature)
    mask = mask.bool()
    with torch.no_grad():
        if positions is None:
            keys = row_keys(sample_keys, mask)
            positions = mask.flatten().nonzero().squeeze(1)
        else:  # static shapes: no host sync, nothing data-dependent for torch.compile
            keys = row_keys_at(sample_keys, positions, mask.shape[1])
    if torch.compiler.is_compiling():
        # nonzero's length is data-dependent: state the fact instead of branching on it
        # (compiling this needs torch._dynamo.config.capture_dynamic_output_shape_ops).
        torch._check(positions.shape[0] == logits.shape[0], lambda: "logit rows != masked positions")
    elif positions.shape[0] != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} logit rows for {positions.shape[0]} masked positions")
    # The gradient pass costs a second read of the logits and an [M, V] buffer: skip it when unused.
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, corrupted, replaced, correct, _ = torch.ops.cimfast.sample_ce(
        logits, ids, positions, keys, float(temperature), compute_grad, block_v, rows_per_program)
    return SampleCE(loss, corrupted, replaced.detach(), correct)


def sample_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, sample_keys: torch.Tensor,
              temperature: float = 1.0, *, positions: torch.Tensor | None = None) -> SampleCE:
    """Cross-entropy rows, Gumbel-max replacement and accuracy in one pass
    (``sample_ce_reference`` defines the result). Dispatches kernel/reference.

    ``positions``: optional [M] flat indices of the masked positions in [B, N],
    row-major (what ``torch.nonzero_static(mask.flatten(), size=M)`` gives).
    With them the kernel path needs no ``nonzero``/boolean indexing: no host
    sync, static shapes under torch.compile. Without: taken from ``mask``."""
    if use_triton(logits, ids):
        return sample_ce_triton(logits, ids, mask, sample_keys, temperature, positions=positions)
    return sample_ce_reference(logits, ids, mask, sample_keys, temperature, positions=positions)


def sample_replace(logits, ids, mask, sample_keys, temperature: float = 1.0):
    """Dispatch point for sampling alone: (corrupted ids, replaced). The kernel
    path runs the fused op without its gradient pass."""
    if use_triton(logits, ids):
        with torch.no_grad():
            out = sample_ce_triton(logits.detach(), ids, mask, sample_keys, temperature)
        return out.corrupted, out.replaced
    return sample_replace_reference(logits, ids, mask, sample_keys, temperature)
