import sys, os; sys.path.insert(0, os.path.dirname(__file__))
import torch, bench_loss as b
dev = sys.argv[1]; V, BT, chunk = map(int, sys.argv[2].split("x"))
inp = b.make_inputs(V, BT, dev)
for var in ["naive", f"chunked@{chunk}"]:
    b.run_variant(inp, var); inp["h_s"].grad=None; inp["w_s"].grad=None
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch.profiler.profile(activities=acts) as p:
        b.run_variant(inp, var); b._sync(dev)
    inp["h_s"].grad=None; inp["w_s"].grad=None
    key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    print("=====", var)
    print(p.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=40))
