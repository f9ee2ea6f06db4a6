"""Sharded data parallelism: FSDP2 (`torch.distributed.fsdp.fully_shard`) over every rank.

`--strategy fsdp` shards each trained module's parameters, gradients and AdamW moments, and the
EMA copy, so a rank holds 1/N of the ~20 bytes per parameter that DDP keeps whole on every GPU.
Each transformer block is its own FSDP unit (gathered just before it runs, freed after), then the
root. On CUDA, parameters are cast to bf16 for compute and gradients reduced in bf16 while the
sharded master weights and the optimizer stay fp32; on CPU everything stays fp32, so FSDP and DDP
losses can be compared to the last bits.

Checkpoints do not change: the weights, EMA and optimizer state are gathered into full tensors
(`full_state`, a collective every rank joins) and rank 0 writes the same safetensors files as
under DDP, so a run resumes at any worker count and under either strategy. A resume loads the
full checkpoint into the unsharded modules first; `shard` then cuts what this rank keeps.

The GAN family is not supported: its R1/R2 penalty takes a double backward through the
discriminator, which FSDP2 cannot run (the parameters' storage is freed after the first backward),
and every gan preset fits an 80 GB GPU under DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from t2i.errors import ConfigError
from t2i.train.state import TrainState

STRATEGIES = ("ddp", "fsdp")


def check_strategy(strategy: str, family: str) -> None:
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if strategy == "fsdp" and family != "flow":
        raise ConfigError(f"strategy fsdp: not for the {family} family (its R1/R2 penalty needs a double "
                          "backward, which FSDP2 cannot run; every gan preset fits one GPU under ddp)")


def _units(module: nn.Module) -> list[nn.Module]:
    """The FSDP units below the root: every member of a ModuleList (the transformer blocks)."""
    return [m for lst in module.modules() if isinstance(lst, nn.ModuleList) for m in lst]


def _fully_shard(module: nn.Module, mesh, policy: MixedPrecisionPolicy) -> None:
    for unit in _units(module):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)


def _sharded_optimizer(opt: torch.optim.Optimizer, old: dict[str, nn.Parameter],
                       new: dict[str, nn.Parameter]) -> torch.optim.Optimizer:
    """`opt` rebuilt over the sharded parameters, with its state (loaded in full, the same on every
    rank) cut to each parameter's shard and its hyper-parameters kept."""
    name_of = {id(p): n for n, p in old.items()}
    # torch picks its own implementation for DTensors (a fused CPU kernel takes plain tensors only)
    keep = lambda k: k not in ("params", "fused", "foreach")  # noqa: E731
    groups = [{**{k: v for k, v in g.items() if keep(k)}, "params": [new[name_of[id(p)]] for p in g["params"]]}
              for g in opt.param_groups]
    fresh = type(opt)(groups)
    sd = opt.state_dict()  # state keyed by the parameter's index in group order, as `fresh` numbers them
    sd["param_groups"] = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in sd["param_groups"]]
    params = [p for g in fresh.param_groups for p in g["params"]]
    for index, st in sd["state"].items():
        p = params[index]
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape == p.shape:
                st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
    fresh.load_state_dict(sd)
    return fresh


def shard(state: TrainState, bf16: bool = True) -> TrainState:
    """Shard every trained module, its optimizer and the EMA in place (see the module docstring)."""
    check_strategy("fsdp", state.family)
    if not (dist.is_available() and dist.is_initialized()):
        return state
    dev = state.runtime.device
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
              if bf16 and dev.type == "cuda" else MixedPrecisionPolicy())
    for name, module in state.modules.items():
        old = dict(module.named_parameters())
        _fully_shard(module, mesh, policy)
        state.opts[name] = _sharded_optimizer(state.opts[name], old, dict(module.named_parameters()))
    _fully_shard(state.ema, mesh, MixedPrecisionPolicy())  # never run forward: only lerped, shard by shard
    return state


def is_sharded(state: TrainState) -> bool:
    return any(isinstance(p, DTensor) for m in state.modules.values() for p in m.parameters())
