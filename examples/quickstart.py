"""Quick start: softmax and linear attention over one sequence split across processes, checked
against single-device attention.

    torchrun --nproc-per-node 2 examples/quickstart.py      # 2 CPU processes (gloo), or 2 GPUs (nccl)

Every process draws the same full-length q, k, v (same seed) only so that it can check the
result; in training each process holds just its own tokens (see seqpar.shard_batch).
"""
import torch
import torch.nn.functional as F

import seqpar
from seqpar.comm import init_distributed

rank, world = init_distributed()  # from torchrun's RANK / WORLD_SIZE: gloo on CPU, nccl on GPUs
device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
group = None  # None: all processes; any torch.distributed group works (the sequence-parallel group)
layout = "zigzag"  # rank r holds chunks r and 2P-1-r of 2P: every rank does the same causal work

B, T, H, H_KV, D = 1, 128 * world, 4, 2, 32  # zigzag needs T % (2 * world) == 0
torch.manual_seed(0)
q = torch.randn(B, T, H, D, device=device)  # [batch, tokens, heads, head dim], the whole sequence
k = torch.randn(B, T, H_KV, D, device=device)  # GQA: fewer key / value heads than query heads
v = torch.randn(B, T, H_KV, D, device=device)
g = F.logsigmoid(torch.randn(B, T, H, device=device) + 4)  # log decay gates <= 0, [batch, tokens, heads]

# Each rank keeps its tokens: [B, T / world, heads, head dim].
q_local, k_local, v_local = (seqpar.shard(x, layout=layout, group=group).requires_grad_() for x in (q, k, v))

# 1. Causal softmax attention over the whole sequence (scale 1 / sqrt(D)), and its gradients.
o_local = seqpar.attention(q_local, k_local, v_local, strategy="ring", layout=layout, group=group)
o_local.square().sum().backward()
o = seqpar.unshard(o_local.detach(), layout=layout, group=group)  # [B, T, H, D] on every rank

q_ref, k_ref, v_ref = (x.clone().requires_grad_() for x in (q, k, v))
o_ref = F.scaled_dot_product_attention(q_ref.transpose(1, 2), k_ref.transpose(1, 2), v_ref.transpose(1, 2),
                                       is_causal=True, enable_gqa=True).transpose(1, 2)
o_ref.square().sum().backward()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).detach().abs().max() / want.detach().abs().max())


softmax_error = max(relative_error(o, o_ref), *(relative_error(x.grad, seqpar.shard(ref.grad, layout=layout, group=group))
                                                for x, ref in ((q_local, q_ref), (k_local, k_ref), (v_local, v_ref))))

# 2. Gated linear attention: S_t = exp(g_t) S_(t-1) + k_t v_t^T, o_t = S_t^T q_t / sqrt(D), with the
#    final state S_T [B, H, D, D] (the same on every rank). Linear layers use H heads for q, k, v.
k_lin, v_lin = k.repeat_interleave(H // H_KV, dim=2), v.repeat_interleave(H // H_KV, dim=2)
o_lin_local, state = seqpar.linear_attention(
    q_local.detach(), seqpar.shard(k_lin, layout=layout, group=group), seqpar.shard(v_lin, layout=layout, group=group),
    strategy="lasp2", layout=layout, group=group, g=seqpar.shard(g, layout=layout, group=group),
    output_final_state=True)
o_lin = seqpar.unshard(o_lin_local, layout=layout, group=group)

S = torch.zeros(B, H, D, D, device=device)  # the recurrence, one token at a time
o_lin_ref = torch.empty_like(q)
for t in range(T):
    S = g[:, t, :, None, None].exp() * S + k_lin[:, t, :, :, None] * v_lin[:, t, :, None, :]
    o_lin_ref[:, t] = torch.einsum("bhd,bhde->bhe", q[:, t], S) * D ** -0.5
linear_error = max(relative_error(o_lin, o_lin_ref), relative_error(state, S))

if rank == 0:
    print(f"{world} process(es), {T} tokens ({T // world} per rank, layout {layout}); largest error / largest value:")
    print(f"softmax attention (ring) vs single-device SDPA, output and gradients: {softmax_error:.1e}")
    print(f"linear attention (lasp2) vs the recurrence, output and final state: {linear_error:.1e}")
assert softmax_error < 1e-4 and linear_error < 1e-4, (softmax_error, linear_error)  # fp32 arithmetic
torch.distributed.destroy_process_group()
