"""The fused kernels candidate attention runs on (`model.CausalSelfAttention.attend_candidates`).

Each candidate attends to the cached history keys with an additive padding bias; the kernel
returns the output and its log-sum-exp so that the model can fold in the candidate's own key
without concatenating it to the cache. Which kernel serves a device and dtype is found once
(cuDNN's, the memory-efficient one, the CPU flash kernel, then the reference formula); how many
chunks of keys run side by side on a GPU is `history_splits`. Imports torch only.
"""
from __future__ import annotations

import warnings

import torch


def history_splits(batch: int, heads: int, candidates: int, width: int, device: torch.device) -> int:
    """Chunks of the history keys that candidate attention runs side by side: on a GPU, enough
    that the batch's (64-query block, head) tiles fill its multiprocessors (at batch 1, 4 heads
    and 256 candidates cuDNN's kernel ran 16 tiles on 132 multiprocessors, each walking all 2,048
    keys), each chunk at least 128 keys and a power-of-two share of the width; 1 on a CPU."""
    if device.type != "cuda":
        return 1
    tiles = batch * heads * -(-candidates // 64)
    sms = _multiprocessors(device)
    s = 1
    while tiles * s * 2 <= sms and width % (2 * s) == 0 and width // (2 * s) >= 128:
        s *= 2
    return s


_SMS: dict = {}


def _multiprocessors(device: torch.device) -> int:
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def history_attention(q, keys, values, bias, splits: int = 1):
    """Softmax attention of q (B, H, C, Dh) over keys with an additive bias, in `splits` equal
    chunks of keys -> each chunk's (out (B, S, H, C, Dh), log-sum-exp (B, S, H, C); fp32, fp64 for
    fp64 inputs), from the device's fused kernel: cuDNN's in bf16/fp16 on CUDA, the
    memory-efficient one otherwise on CUDA, the flash kernel on CPU. A kernel this build or GPU
    does not offer (cuDNN's needs a recent GPU) falls back to the next, and last to the reference
    formula (scores in memory), chosen once per device and dtype (before any graph capture).
    A row's chunks are one batch of the kernel: views in the cache's layout from `_heads`
    (another layout is copied); the caller merges them by their log-sum-exps."""
    B, H, C, Dh = q.shape
    S, Wt = splits, keys.shape[2]
    if S > 1:
        q = q[:, None].expand(B, S, H, C, Dh).reshape(B * S, H, C, Dh)  # small: C queries
        keys, values = _key_chunks(keys, S), _key_chunks(values, S)  # (B*S, H, Wt/S, Dh)
        bias = bias.reshape(B * S, 1, 1, Wt // S)
    bias = bias.to(q.dtype).expand(B * S, H, C, Wt // S)
    key = (q.device, q.dtype)
    if key not in _CHOSEN_KERNEL:
        _CHOSEN_KERNEL[key] = _first_working_kernel(q, keys, values, bias)
    y, lse = _HISTORY_KERNELS[_CHOSEN_KERNEL[key]](q, keys, values, bias)
    return y.unflatten(0, (B, S)), lse[..., :C].reshape(B, S, H, C)


def _key_chunks(t: torch.Tensor, S: int) -> torch.Tensor:
    """(B, H, W, Dh) -> (B*S, H, W/S, Dh): row b's chunk s at b*S + s."""
    B, H, W, Dh = t.shape
    return t.unflatten(2, (S, W // S)).transpose(1, 2).reshape(B * S, H, W // S, Dh)


def _reference_attention(q, keys, values, bias):
    s = (q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias  # (B, H, C, Wt)
    lse = torch.logsumexp(s.float() if s.dtype.itemsize < 4 else s, dim=-1)
    return torch.softmax(s, dim=-1) @ values, lse


_HISTORY_KERNELS = {
    "cudnn": lambda q, k, v, b: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, b, True)[:2],
    "efficient": lambda q, k, v, b: torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, b, True)[:2],
    "flash_cpu": lambda q, k, v, b: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=b),
    "reference": _reference_attention,
}
_CHOSEN_KERNEL: dict = {}


def _first_working_kernel(q, keys, values, bias) -> str:
    if q.is_cuda:
        order = ["cudnn", "efficient"] if q.dtype in (torch.bfloat16, torch.float16) else ["efficient"]
    else:
        order = ["flash_cpu"]
    for name in order:
        try:
            _HISTORY_KERNELS[name](q, keys, values, bias)
            return name
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError, TypeError, AttributeError) as e:
            warnings.warn(f"candidate attention: the {name} kernel is not available here ({type(e).__name__}: "
                          f"{str(e)[:120]}); trying the next", stacklevel=3)
    return "reference"
