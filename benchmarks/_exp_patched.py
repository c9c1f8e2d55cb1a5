"""Temporary experiment (not part of the deliverable): original vs patched _ChunkedBlendedLoss."""
import gc, sys, time, statistics, os
sys.path.insert(0, os.path.dirname(__file__))
import torch, torch.nn.functional as F
import bench_loss as b
import hf_distill.chunked as C
from hf_distill.chunked import blended_loss

class Patched(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_head, positions, settings, chunk_size):
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
        totals = torch.zeros(3, dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            h = hidden[part]
            teacher_logits = None
            if teacher_hidden is not None:
                with torch.no_grad():
                    teacher_logits = teacher_head(teacher_hidden[part])
            with torch.enable_grad():
                logits = F.linear(h, weight, bias).detach().requires_grad_(True)
                loss, kd_sum, ce_sum = blended_loss(logits, teacher_logits, positions.chunk(part), settings)
                grad_logits = torch.autograd.grad(loss, logits)[0] if loss.requires_grad else torch.zeros_like(logits)
            del logits, teacher_logits
            totals += torch.stack([loss.detach(), kd_sum, ce_sum])
            if grad_hidden is not None:
                grad_hidden[part] = grad_logits @ weight.to(grad_logits.dtype)
            if grad_weight is not None:
                # CHANGE 1: accumulate in place, no (V, D) temporary per chunk
                grad_weight.addmm_(grad_logits.t().to(grad_weight.dtype), h.to(grad_weight.dtype))
            if grad_bias is not None:
                grad_bias += grad_logits.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        kd_total, ce_total = totals[1].clone(), totals[2].clone()
        ctx.mark_non_differentiable(kd_total, ce_total)
        return totals[0].clone(), kd_total, ce_total

    @staticmethod
    def backward(ctx, grad_loss, _a, _b):
        # CHANGE 2: no (V, D) copy when the incoming gradient is 1 (the usual case)
        one = bool(grad_loss == 1)
        grads = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            if grad is None:
                grads.append(None)
            else:
                grads.append((grad if one else grad * grad_loss).to(dtype))
        return (*grads, None, None, None, None, None)

ORIG = C._ChunkedBlendedLoss
dev = sys.argv[1]
cfgs = [tuple(map(int, c.split("x"))) for c in sys.argv[2].split(",")]
reps = int(sys.argv[3])
for V, BT, chunk in cfgs:
    inp = b.make_inputs(V, BT, dev)
    tiny = b.make_inputs(1024, 64, dev)
    for cls in (ORIG, Patched):
        C._ChunkedBlendedLoss = cls; b.step_chunked(tiny, 16)
    probe = b.PeakMemory(dev)
    res = {"orig": ([], []), "patched": ([], [])}
    for r in range(reps):
        for name, cls in (("orig", ORIG), ("patched", Patched)):
            C._ChunkedBlendedLoss = cls
            inp["h_s"].grad = None; inp["w_s"].grad = None
            gc.collect(); b._trim_heap(); b._sync(dev)
            probe.start(); t0 = time.perf_counter()
            b.step_chunked(inp, chunk); b._sync(dev)
            res[name][0].append((time.perf_counter() - t0) * 1e3); res[name][1].append(probe.stop() / 2**20)
            if r == 0:
                res[name] = res[name] + (inp["w_s"].grad.clone() if dev != "cpu" or V * 896 < 5e7 else inp["w_s"].grad.norm(),)
    gw = "same" if not torch.is_tensor(res["orig"][2]) else float((res["orig"][2] - res["patched"][2]).abs().max() / res["orig"][2].abs().max())
    for name in res:
        print(f"V={V} BT={BT} chunk={chunk} {name:8s} ms {[round(x,1) for x in res[name][0]]} median {statistics.median(res[name][0]):.1f}  MiB median {statistics.median(res[name][1]):.1f}", flush=True)
    print("  grad_W max rel diff orig vs patched:", gw)
    del inp
