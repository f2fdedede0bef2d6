import torch, time, json, math
torch.set_num_threads(1)
from sae.activation_store import ActivationStore
from sae.config import DictionaryConfig
from sae.training import TrainingConfig, train_dictionaries
store=ActivationStore("/work/runs/store_L10-12")
n=store.n_tokens; print("unique tokens", n, flush=True)
hook="blocks.12.hook_resid_post"
cfgs=[DictionaryConfig("standard", d_in=576, d_sae=2304, hook_name=hook, model_name="smollm2-135m", tied=True, l1_coefficient=a) for a in (1.5e-3, 3e-3)]
total=max(2_000_000, n*2)
tc=TrainingConfig(total_tokens=total, batch_size=2048, lr=3e-3, lr_warmup_steps=50, checkpoint_every=100, log_every=25, dead_window_tokens=1_000_000)
t=time.time()
res=train_dictionaries(store, cfgs, tc, "/work/runs/main_saes", progress=True)
for r in res: print(r.name, {k: round(v,4) for k,v in r.metrics.items() if isinstance(v,float)}, flush=True)
print("train seconds", time.time()-t, flush=True)
