"""Quiet-window CPU micro-benchmarks behind docs/pending/README.md ("Leads measured for the next speed
batch"): small 3x3 convolutions as unfold + MKL linear, top-k choices of the point sampler, R50 1x1
convolutions as MKL linear vs THNN. One thread, interleaved medians; nothing else may run beside it.

    python benchmarks/speed_leads.py reports/bench/speed_leads_cpu.json
"""
import torch, time, torch.nn.functional as F, json, sys
torch.set_num_threads(1)
def bench(fns, n=15):
    ts={k:[] for k in fns}
    for _ in range(2):
        for f in fns.values(): f()
    for _ in range(n):
        for k,f in fns.items():
            t0=time.perf_counter(); f(); ts[k].append(time.perf_counter()-t0)
    return {k: round(sorted(v)[n//2]*1e3,3) for k,v in ts.items()}
out={}
# A: small-spatial 3x3 convs of the tiny backbone (channels-last, as the model runs them), fwd+bwd
for (B,C,H,O,k,s) in [(4,512,4,512,3,1),(4,256,8,512,3,2),(4,256,8,256,3,1),(4,128,16,256,3,2),(4,128,16,128,3,1)]:
    x=torch.randn(B,C,H,H).to(memory_format=torch.channels_last).requires_grad_()
    w=torch.randn(O,C,k,k).to(memory_format=torch.channels_last).requires_grad_()
    p=k//2
    def ref():
        y=F.conv2d(x,w,None,s,p); y.backward(torch.ones_like(y))
    def im2col():
        cols=F.unfold(x,(k,k),padding=p,stride=s)
        y=F.linear(cols.transpose(1,2), w.reshape(O,-1)); y.backward(torch.ones_like(y))
    r=bench({"conv":ref,"im2col_mkl":im2col}); r["ratio"]=round(r["conv"]/r["im2col_mkl"],2)
    out[f"conv B{B} C{C} H{H} O{O} k{k} s{s}"]=r; print(list(out.items())[-1], flush=True)
# B: top-k of the importance sampling
u=torch.randn(800,3072)
r=bench({"topk_unsorted":lambda: u.topk(768,dim=1,sorted=False), "topk_sorted":lambda: u.topk(768,dim=1),
         "sort_slice":lambda: u.sort(dim=1,descending=True).indices[:, :768],
         "argsort_neg":lambda: torch.argsort(u,dim=1,descending=True)[:, :768]})
out["topk 800x3072 k768"]=r; print(r, flush=True)
# C: 1x1 convs of R50 (batch 1): THNN vs MKL linear on the channels-last view
for (B,C,H,O) in [(1,256,128,256),(1,64,128,256),(1,256,128,64),(1,512,64,128),(1,128,64,512),(1,1024,32,256),(1,256,32,1024),(1,2048,16,512),(1,512,16,2048)]:
    x=torch.randn(B,C,H,H).to(memory_format=torch.channels_last).requires_grad_()
    w=torch.randn(O,C,1,1).requires_grad_(); b=torch.randn(O).requires_grad_()
    g=torch.randn(B,O,H,H).to(memory_format=torch.channels_last)
    def conv():
        F.conv2d(x,w,b).backward(g)
    def lin():
        F.linear(x.permute(0,2,3,1), w.flatten(1), b).permute(0,3,1,2).backward(g)
    r=bench({"thnn":conv,"mkl_linear":lin},n=9); r["ratio"]=round(r["thnn"]/r["mkl_linear"],2)
    out[f"1x1 B{B} C{C} H{H} O{O}"]=r; print(list(out.items())[-1], flush=True)
from m2f.bench.common import environment
out["environment"]=environment("cpu")
json.dump(out, open(sys.argv[1] if len(sys.argv)>1 else "speed_leads_cpu.json","w"), indent=1)
