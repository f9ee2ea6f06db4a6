"""Export a registered model as a folder the Hugging Face `diffusers` library loads, offline.

`t2i export REF DIR --format diffusers` writes:

  DIR/model_index.json           the pipeline class (pipeline.py) and its components
  DIR/pipeline.py                T2IFlowPipeline or T2IGANPipeline (a DiffusionPipeline)
  DIR/transformer/               flow: t2i_flow.py (the architecture + a ModelMixin wrapper),
                                 config.json, diffusion_pytorch_model.safetensors (the EMA weights)
  DIR/gan_generator/             gan: the same, with t2i_gan.py
  DIR/scheduler/                 flow: FlowMatchEulerDiscreteScheduler config, `shift` = the model's time shift
  DIR/text_encoder/, tokenizer/  the card's text encoder, copied file for file (text_encoder/ digests
                                 to the card's encoder revision)
  DIR/README.md                  the model card, from the registry card

Loading (the exact call the tests make, with HF_HUB_OFFLINE=1 and t2i not importable):

    pipe = DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)

diffusers finds pipeline.py through model_index.json's `_class_name` and each network's code in its
component folder; `trust_remote_code=True` is its consent to run code from a folder, even a local one
(`custom_pipeline=DIR/pipeline.py` loads the same class).

Self-contained, by choice: the exported code imports torch, numpy, PIL, diffusers and transformers
only. A user's diffusers environment should not need t2i, whose dependencies (Ray, s3fs, ...) are
heavy, and the folder should keep working when t2i's architecture moves on. The network is still t2i's
own class, not a second copy to keep in step: the exporter copies t2i/models/{flow,gan}.py (about
300 lines each) into the component folder verbatim, defining in place the one name they import from t2i
(ConfigError), and appends the diffusers wrapper; anything else imported from t2i fails the export.
What pipeline.py re-implements is small: t2i's caption features (t2i.text.TextEncoder's tokenization
and pooling, with its float16 rounding), per-row noise (t2i.runtime.row_draws) and the guidance and
Heun steps of t2i.sampling.flow_sample; the tests compare each against t2i.

Time convention (flow). t2i: x_t = (1 - t) x0 + t eps, t = 1 is noise, t = 0 is data, and the network
returns the velocity dx_t/dt = eps - x0 (an x-predicting model converts inside the network). That is
diffusers' flow matching (SD3): sigma = t, `scale_noise` is sigma * noise + (1 - sigma) * x0, and
FlowMatchEulerDiscreteScheduler.step is x + (sigma_next - sigma) * v. t2i's times are
shift * s / (1 + (shift - 1) * s) for s = linspace(1, 0, steps + 1); the pipeline passes
sigmas = linspace(1, 1/steps, steps) and the scheduler applies the same shift and appends 0. The
transformer takes `timestep` in the scheduler's units (sigma x 1000, diffusers' num_train_timesteps).
Heun models: the Euler scheduler steps with the averaged velocity, corrected on every step but the
last, as t2i does (FlowMatchHeunDiscreteScheduler spaces its times differently).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.util
import json
import shutil
import sys
import time
import uuid
from pathlib import Path

import torch

from t2i import storage
from t2i.config import EncoderSpec, from_dict
from t2i.errors import T2IError
from t2i.generate import check_encoder, model_digest
from t2i.registry import Registry
from t2i.text import resolve_encoder_path, weights_digest
from t2i.text.encoder import quiet_transformers

FORMATS = ("diffusers",)
INDEX = "model_index.json"
# family -> (component folder, module file stem, wrapper class, pipeline class). Not "generator" for the
# GAN: diffusers pipelines take a torch.Generator under that name.
LAYOUT = {
    "flow": ("transformer", "t2i_flow", "T2IFlowTransformer", "T2IFlowPipeline"),
    "gan": ("gan_generator", "t2i_gan", "T2IGANGenerator", "T2IGANPipeline"),
}
SOURCES = {"flow": "t2i.models.flow", "gan": "t2i.models.gan"}
# Encoder files worth copying: weights (safetensors only; pickles are never loaded), configs and
# tokenizer files. Subfolders (sentence-transformers' pooling config, onnx/) are not transformers'.
ENCODER_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja", ".md")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "chat_template.jinja")


# ----------------------------------------------------------------------------- the exported code

# pipeline.py: this text, then the family's class. A raw string: it is Python source, written as is.
PIPELINE_COMMON = r'''
from __future__ import annotations

import hashlib

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

FP16_MAX = 65504.0  # t2i clamps hidden states to the float16 range before storing them as float16


def t2i_noise(seeds, ids, shape):
    """[B, *shape] standard normal noise; row k drawn as `t2i generate` draws it for (seeds[k], ids[k])
    (t2i.runtime.row_draws: one CPU generator per row, seeded from a blake2b hash of the pair)."""
    rows = []
    for seed, id_ in zip(seeds, ids):
        key = hashlib.blake2b(repr((int(seed), str(id_))).encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(key, "little") & ((1 << 63) - 1))
        rows.append(torch.randn(shape, generator=g))
    return torch.stack(rows)


class T2IPipelineMixin:
    """Caption features, noise and output images, as t2i makes them."""

    def _token_ids(self, captions):
        """(input ids, index of the first kept state) per caption, as t2i.text.TextEncoder tokenizes."""
        tok, m, prefix = self.tokenizer, self.config.max_tokens, self.config.prefix
        if self.config.encoder_kind != "decoder":
            ids = tok(list(captions), truncation=True, max_length=m)["input_ids"]
            return ids, [0] * len(ids)
        # Decoder LLMs read [BOS if the tokenizer adds one] + prefix + caption; only the caption's
        # states are kept, a token spanning the prefix/caption boundary included.
        probe = "a red circle"
        full, bare = tok([probe])["input_ids"][0], tok([probe], add_special_tokens=False)["input_ids"][0]
        head = next((full[:s] for s in range(len(full) - len(bare) + 1) if full[s:s + len(bare)] == bare), [])
        enc = tok([prefix + c for c in captions], add_special_tokens=False, return_offsets_mapping=True)
        ids, starts = [], []
        for tok_ids, offsets in zip(enc["input_ids"], enc["offset_mapping"]):
            k = next((j for j, (_, end) in enumerate(offsets) if end > len(prefix)), len(tok_ids))
            ids.append(head + tok_ids[:k] + tok_ids[k:][:m])
            starts.append(len(head) + k)
        return ids, starts

    @torch.no_grad()
    def encode_prompt(self, prompts, device=None):
        """t2i's text features: tokens [B, L, D] (zeros past a caption's length), mask bool [B, L],
        pooled [B, D]; float32 holding float16 values, as t2i stores and samples from them.

        Captions of equal token count are encoded together, unpadded, so a caption's features do not
        depend on the rest of the batch (as in t2i.generate.ImageMaker)."""
        device = device or self._execution_device
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts to encode")
        unique = list(dict.fromkeys(prompts))
        ids, starts = self._token_ids(unique)
        if any(not x for x in ids):
            raise ValueError("a prompt has no tokens to encode")
        layer, feats, groups = self.config.hidden_layer, {}, {}
        for i, x in enumerate(ids):
            groups.setdefault(len(x), []).append(i)
        for n, idx in groups.items():
            input_ids = torch.tensor([ids[i] for i in idx], device=device)
            out = self.text_encoder(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    output_hidden_states=layer != -1)
            h = (out.last_hidden_state if layer == -1 else out.hidden_states[layer]).float()
            h = h.clamp(-FP16_MAX, FP16_MAX)  # [b, n, D]
            start = torch.tensor([starts[i] for i in idx], device=device)
            if self.config.encoder_kind == "decoder":
                pooled = h[:, -1]  # a causal model's last caption token is the one that saw all of it
            else:
                keep = (torch.arange(n, device=device) >= start[:, None]).unsqueeze(-1)  # [b, n, 1]
                pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1)
            for row, i in enumerate(idx):
                feats[unique[i]] = (h[row, starts[i]:].half().float(), pooled[row].half().float())
        rows = [feats[p] for p in prompts]
        L = max(1, max(t.shape[0] for t, _ in rows))
        tokens = torch.zeros(len(rows), L, rows[0][0].shape[1], device=device)
        mask = torch.zeros(len(rows), L, dtype=torch.bool, device=device)
        for k, (t, _) in enumerate(rows):
            tokens[k, :t.shape[0]], mask[k, :t.shape[0]] = t, True
        return tokens, mask, torch.stack([p for _, p in rows])

    def prepare_latents(self, batch, shape, seed=None, ids=None, generator=None, latents=None, device=None):
        """The starting noise [batch, *shape]: `latents` as given; else with `seed` (an int or one per
        row) t2i's per-row draw for (seed, id), ids defaulting to "0", "1", ...; else `generator`."""
        device = device or self._execution_device
        if latents is not None:
            return latents.to(device=device, dtype=torch.float32)
        if seed is not None:
            seeds = [seed] * batch if isinstance(seed, int) else list(seed)
            ids = [str(k) for k in range(batch)] if ids is None else [ids] if isinstance(ids, str) else list(ids)
            if len(seeds) != batch or len(ids) != batch:
                raise ValueError(f"{batch} prompts need as many seeds and ids, got {len(seeds)} and {len(ids)}")
            return t2i_noise(seeds, ids, shape).to(device)
        return randn_tensor((batch, *shape), generator=generator, device=torch.device(device), dtype=torch.float32)

    @staticmethod
    def to_output(x, output_type="pil", return_dict=True):
        """Images in [-1, 1] [B, 3, H, W] -> "pil" (t2i's uint8 rounding), "np" [B, H, W, 3] or "pt"
        [B, 3, H, W] in [0, 1], or "latent" (as sampled, unclamped)."""
        if output_type == "latent":
            images = x
        elif output_type == "pil":
            u8 = x.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
            images = [Image.fromarray(a) for a in u8.numpy()]
        elif output_type in ("np", "pt"):
            images = x.float().clamp(-1, 1).add(1).div(2)
            images = images.permute(0, 2, 3, 1).cpu().numpy() if output_type == "np" else images
        else:
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        return ImagePipelineOutput(images=images) if return_dict else (images,)
'''

FLOW_PIPELINE = r'''

class T2IFlowPipeline(T2IPipelineMixin, DiffusionPipeline):
    """A t2i flow-matching DiT: Euler (or Heun) steps from noise (t = 1) to data (t = 0) with
    classifier-free guidance written out as in t2i.sampling.flow_sample."""

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, transformer, scheduler, text_encoder, tokenizer, encoder_kind: str = "encoder",
                 hidden_layer: int = -1, max_tokens: int = 64, prefix: str = "", model_ref: str = "",
                 model_digest: str = "", encoder_revision: str = ""):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer)
        self.register_to_config(encoder_kind=encoder_kind, hidden_layer=hidden_layer, max_tokens=max_tokens,
                                prefix=prefix, model_ref=model_ref, model_digest=model_digest,
                                encoder_revision=encoder_revision)

    def velocity(self, x, timestep, text, guidance):
        """Guided velocity (noise - data) at `timestep` (scheduler units): the conditional and the
        unconditional (caption dropped) halves in one call, v_u + guidance * (v_c - v_u)."""
        tokens, mask, pooled = text
        B, dtype = x.shape[0], self.transformer.dtype
        t = timestep.reshape(1).expand(B)
        if guidance == 1.0:
            return self.transformer(x.to(dtype), t, tokens.to(dtype), mask, pooled.to(dtype)).sample.float()
        drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(x.device)
        v = self.transformer(torch.cat([x, x]).to(dtype), torch.cat([t, t]), torch.cat([tokens, tokens]).to(dtype),
                             torch.cat([mask, mask]), torch.cat([pooled, pooled]).to(dtype), drop=drop).sample.float()
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + guidance * (v_cond - v_uncond)

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps=None, guidance_scale=None, sampler=None, seed=None, ids=None,
                 generator=None, latents=None, output_type="pil", return_dict=True):
        """Images for `prompt` (a string or a list). Defaults (steps, guidance, "euler"/"heun") are the
        model's; `seed`/`ids` give t2i's noise, so a row of a `t2i generate` manifest comes out again."""
        cfg = self.transformer.config
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        steps = num_inference_steps or cfg.steps
        guidance = cfg.guidance if guidance_scale is None else guidance_scale
        method = sampler or cfg.sampler
        device = self._execution_device
        text = self.encode_prompt(prompts, device)
        x = self.prepare_latents(len(prompts), (3, cfg.resolution, cfg.resolution), seed, ids, generator, latents,
                                 device)
        # t2i's times before the shift are linspace(1, 0, steps + 1); the scheduler shifts and appends 0.
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), device=device)
        timesteps, sigmas = self.scheduler.timesteps, self.scheduler.sigmas
        for i, t in enumerate(self.progress_bar(timesteps)):
            v = self.velocity(x, t, text, guidance)
            if method == "heun" and i < steps - 1:
                x_euler = x + (sigmas[i + 1] - sigmas[i]) * v
                v = 0.5 * v + 0.5 * self.velocity(x_euler, timesteps[i + 1], text, guidance)
            x = self.scheduler.step(v, t, x).prev_sample
        self.maybe_free_model_hooks()
        return self.to_output(x, output_type, return_dict)
'''

GAN_PIPELINE = r'''

class T2IGANPipeline(T2IPipelineMixin, DiffusionPipeline):
    """A t2i text-conditional GAN: one generator pass from z [B, z_dim] and the caption features."""

    model_cpu_offload_seq = "text_encoder->gan_generator"

    def __init__(self, gan_generator, text_encoder, tokenizer, encoder_kind: str = "encoder", hidden_layer: int = -1,
                 max_tokens: int = 64, prefix: str = "", model_ref: str = "", model_digest: str = "",
                 encoder_revision: str = ""):
        super().__init__()
        self.register_modules(gan_generator=gan_generator, text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(encoder_kind=encoder_kind, hidden_layer=hidden_layer, max_tokens=max_tokens,
                                prefix=prefix, model_ref=model_ref, model_digest=model_digest,
                                encoder_revision=encoder_revision)

    @torch.no_grad()
    def __call__(self, prompt, seed=None, ids=None, generator=None, latents=None, output_type="pil",
                 return_dict=True):
        """Images for `prompt` (a string or a list); `seed`/`ids` give t2i's noise (see prepare_latents)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device, dtype = self._execution_device, self.gan_generator.dtype
        tokens, mask, pooled = self.encode_prompt(prompts, device)
        z = self.prepare_latents(len(prompts), (self.gan_generator.config.z_dim,), seed, ids, generator, latents,
                                 device)
        x = self.gan_generator(z.to(dtype), tokens.to(dtype), mask, pooled.to(dtype)).sample.float()
        self.maybe_free_model_hooks()
        return self.to_output(x, output_type, return_dict)
'''

# The diffusers wrapper appended to the copied architecture file; {…} fields filled per model.
WRAPPER = r'''

# ----------------------------------------------------------------------------- diffusers wrapper (t2i export)

from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402
from diffusers.models.modeling_utils import ModelMixin  # noqa: E402
from diffusers.utils import BaseOutput  # noqa: E402


@dataclasses.dataclass
class T2IModelOutput(BaseOutput):
    sample: torch.Tensor


class {cls}(ModelMixin, ConfigMixin):
    """t2i's {net} (above) as a diffusers model: its config is {config}'s fields, its weights `net.*`.

    {forward_doc}
    """

    @register_to_config
    def __init__(self, {params}):
        super().__init__()
        self.net = {net}({config}(
            {args}))

{forward}
'''

FLOW_FORWARD = r'''
    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, pooled_projections,
                drop=None, return_dict=True):
        B = hidden_states.shape[0]
        t = torch.as_tensor(timestep, device=hidden_states.device).float().reshape(-1).expand(B) / 1000.0
        v = self.net(hidden_states, t, encoder_hidden_states, encoder_attention_mask.bool(), pooled_projections, drop)
        return T2IModelOutput(sample=v) if return_dict else (v,)
'''

GAN_FORWARD = r'''
    def forward(self, latents, encoder_hidden_states, encoder_attention_mask, pooled_projections, return_dict=True):
        x = self.net(latents, encoder_hidden_states, encoder_attention_mask.bool(), pooled_projections)
        return T2IModelOutput(sample=x) if return_dict else (x,)
'''

FORWARD_DOC = {
    "flow": "forward(hidden_states [B,3,H,W], timestep (scheduler units: flow time t x 1000; t = 1 is noise),\n"
            "    encoder_hidden_states [B,L,D], encoder_attention_mask [B,L] (True = token), pooled_projections\n"
            "    [B,D], drop bool [B]: rows given the null caption) -> sample: the velocity noise - data.",
    "gan": "forward(latents z [B,z_dim], encoder_hidden_states [B,L,D], encoder_attention_mask [B,L],\n"
           "    pooled_projections [B,D]) -> sample: images [B,3,R,R] in [-1, 1].",
}


def vendored_source(family: str) -> str:
    """t2i's architecture file for `family`, verbatim but for its one t2i import (ConfigError), which
    is defined in place; any other import from t2i is a change this exporter does not know about."""
    module = importlib.import_module(SOURCES[family])
    path = Path(module.__file__)
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    for node in reversed(ast.parse(text).body):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "t2i":
            if node.module != "t2i.errors" or [a.name for a in node.names] != ["ConfigError"]:
                raise RuntimeError(f"{path}: imports {node.module}; the diffusers export copies this file and can "
                                   "only stand in for t2i.errors.ConfigError")
            lines[node.lineno - 1:node.end_lineno] = [
                "\n", "class ConfigError(ValueError):\n",
                '    """An invalid model config (t2i.errors.ConfigError in t2i itself)."""\n']
    out = (f"# Written by `t2i export`: t2i's {path.parent.name}/{path.name}, unchanged but for ConfigError, defined\n"
           "# here so that this folder needs only torch and diffusers; the diffusers wrapper is at the end.\n"
           + "".join(lines))
    for node in ast.walk(ast.parse(out)):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if any(n.split(".")[0] == "t2i" for n in names):
            raise RuntimeError(f"{path}: still imports t2i after the export's rewrite ({names[0]})")
    return out


def component_source(family: str, cfg) -> str:
    """The component's module: the architecture, then a ModelMixin whose __init__ takes the config's fields
    (defaults: this model's values; tuples come back from config.json as lists)."""
    _, _, cls, _ = LAYOUT[family]
    fields = [f.name for f in dataclasses.fields(cfg) if f.name != "family"]
    values = {n: getattr(cfg, n) for n in fields}
    params = ",\n                 ".join(f"{n}: {type(v).__name__} = {v!r}" for n, v in values.items())
    args = ",\n            ".join(f"{n}=tuple({n})" if isinstance(v, tuple) else f"{n}={n}" for n, v in values.items())
    net, config = ("flow_network", "FlowConfig") if family == "flow" else ("Generator", "GANConfig")
    wrapper = WRAPPER.format(cls=cls, net=net, config=config, params=params, args=args,
                             forward_doc=FORWARD_DOC[family].replace("\n", "\n    "),
                             forward=(FLOW_FORWARD if family == "flow" else GAN_FORWARD).lstrip("\n"))
    return vendored_source(family) + wrapper


def pipeline_source(family: str, ref: str) -> str:
    component, module, _, cls = LAYOUT[family]
    doc = (f'"""{cls}: the text-to-image pipeline of t2i model {ref}, written by `t2i export --format diffusers`.\n\n'
           "    from diffusers import DiffusionPipeline\n"
           '    pipe = DiffusionPipeline.from_pretrained("DIR", trust_remote_code=True)\n'
           '    image = pipe("a red circle on a blue background", seed=0).images[0]\n\n'
           f"Needs torch, diffusers and transformers, not t2i: the network's code is {component}/{module}.py.\n"
           '"""\n')
    return doc + PIPELINE_COMMON + (FLOW_PIPELINE if family == "flow" else GAN_PIPELINE)


def load_component(path: Path, cls: str):
    """The wrapper class from the module just written (the exporter saves its weights with it, which
    also proves the file imports)."""
    name = f"_t2i_export_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return getattr(module, cls)


# ----------------------------------------------------------------------------- the model card


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "-" if v in (None, "") else str(v)


def _parent(parent) -> str:
    if not parent:
        return "none (trained from scratch)"
    if isinstance(parent, dict):
        where = parent.get("registry") or parent.get("url") or ""
        return f"{parent.get('ref')} ({parent.get('kind')}{': ' + where if where else ''})"
    return str(parent)


def model_card(card: dict, cfg, spec: EncoderSpec, family: str, diffusers_version: str) -> str:
    """README.md for the export, from the registry card only (which never holds credentials)."""
    component, module, cls, pipe_cls = LAYOUT[family]
    rows = [("model", card["ref"]), ("family", family), ("created", card.get("created")),
            ("training steps", card.get("step")), ("samples seen", card.get("samples_seen")),
            ("dataset", card.get("dataset_url")), ("dataset digest", card.get("dataset_digest")),
            ("parent", _parent(card.get("parent"))), ("training run", card.get("run")),
            ("weights digest (sha256 of t2i's ema.safetensors, the `digest` of t2i generate manifests)",
             model_digest(card))]
    enc = [("name", spec.name), ("kind", spec.kind), ("revision (t2i.text.weights_digest)", spec.revision),
           ("hidden layer", spec.hidden_layer), ("max tokens", spec.max_tokens), ("prefix", repr(spec.prefix)),
           ("dim", spec.dim)]
    if family == "flow":
        sampling = (f"{cfg.steps} {cfg.sampler} steps, guidance {cfg.guidance}, time shift {cfg.time_shift}, "
                    f"{cfg.prediction}-prediction (the network's output is always the velocity)")
    else:
        sampling = f"one generator pass from z [B, {cfg.z_dim}]"
    metrics = card.get("metrics") or {}
    lines = ["---", "library_name: diffusers", "pipeline_tag: text-to-image",
             f"tags: [t2i, text-to-image, {'flow-matching' if family == 'flow' else 'gan'}]", "---", "",
             f"# {card['ref']}", ""]
    if card.get("description"):
        lines += [str(card["description"]), ""]
    lines += [f"A t2i {family} model at {cfg.resolution} px, exported with `t2i export --format diffusers` "
              f"(diffusers {diffusers_version}). Sampling: {sampling}.", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    lines += ["", "## Text encoder", "",
              "Bundled in `text_encoder/` and `tokenizer/`; `text_encoder/` digests to the revision below, the "
              "encoder the model was trained on.", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in enc]
    lines += ["", "## Metrics", ""]
    lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())] \
        if metrics else ["none recorded"]
    lines += ["", "## Use", "",
              "Requires torch, diffusers, transformers (numpy and Pillow come with them); t2i is not needed. "
              "Works offline (`HF_HUB_OFFLINE=1`). `trust_remote_code=True` lets diffusers run this folder's "
              f"`pipeline.py` and `{component}/{module}.py`.", "", "```python",
              "from diffusers import DiffusionPipeline", "",
              'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)',
              'images = pipe(["a red circle on a blue background"], seed=0).images',
              "```", "",
              f"`{pipe_cls}.__call__` takes `prompt` (a string or a list), `seed` and `ids` (the noise of "
              "`t2i generate` for each (seed, id): a row of its manifest comes out again, up to float rounding), "
              "or `generator`/`latents`, and `output_type` (`pil`, `np`, `pt`, `latent`)"
              + (", `num_inference_steps`, `guidance_scale`, `sampler` (`euler`/`heun`)." if family == "flow" else ".")]
    if family == "flow":
        lines += ["", "Time convention: t2i's flow time t is diffusers' sigma (x_t = (1 - t) x0 + t noise, t = 1 "
                  "is noise) and the transformer returns the velocity noise - x0, as FlowMatchEulerDiscreteScheduler "
                  f"expects; `scheduler/` carries the time shift ({cfg.time_shift}). The transformer's `timestep` is "
                  "in the scheduler's units (t x 1000)."]
    lines += ["", "## Model config", "", "```json",
              json.dumps(card.get("model") or {}, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the export


def require_diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise T2IError(f"--format diffusers needs the diffusers package ({e}): pip install 't2i[diffusers]'") from None
    return diffusers


def destination(out: str, overwrite: bool) -> Path:
    """The local directory to export to: absent or empty, or with `overwrite` a previous export (never
    an arbitrary directory, which --overwrite would otherwise delete)."""
    if not storage.is_local(out):
        raise T2IError(f"{storage.describe(out)}: t2i export writes a local directory")
    dest = Path(storage.split(out)[1])
    if dest.exists() and not dest.is_dir():
        raise T2IError(f"{dest}: exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()):
        if not overwrite:
            raise T2IError(f"{dest}: not empty (--overwrite replaces a previous export)")
        if not (dest / INDEX).is_file():
            raise T2IError(f"{dest}: not empty and not a diffusers export (no {INDEX}); refusing to replace it")
    return dest


def encoder_classes(path: Path, kind: str) -> tuple[str, str]:
    """The transformers classes diffusers loads text_encoder/ and tokenizer/ with: the ones t2i's
    TextEncoder uses (AutoModel's base model; T5's encoder stack)."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    with quiet_transformers():
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if kind == "t5":
        model = {"mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}.get(config.model_type, "T5EncoderModel")
    else:
        model = MODEL_MAPPING_NAMES.get(config.model_type)
        model = model[0] if isinstance(model, (tuple, list)) else model
    if not model:
        raise T2IError(f"text encoder {path}: transformers has no base model class for {config.model_type!r}")
    return model, type(tokenizer).__name__


def copy_encoder(src: Path, text_dir: Path, tok_dir: Path) -> None:
    text_dir.mkdir()
    tok_dir.mkdir()
    for f in sorted(src.iterdir()):
        if not f.is_file():
            continue
        if f.suffix in ENCODER_SUFFIXES:
            shutil.copyfile(f, text_dir / f.name)
        if f.name in TOKENIZER_FILES or f.suffix == ".model":
            shutil.copyfile(f, tok_dir / f.name)


def write_export(root: Path, card: dict, cfg, net, spec: EncoderSpec, encoder: Path, diffusers) -> None:
    """Every file of the export, into the empty directory `root`."""
    family = cfg.family
    component, module, cls, pipe_cls = LAYOUT[family]
    (root / component).mkdir()
    code = root / component / f"{module}.py"
    code.write_text(component_source(family, cfg))
    with torch.device("meta"):  # no second random init of a model that may hold billions of parameters
        wrapper = load_component(code, cls)()  # its defaults are this model's config
    wrapper.net.load_state_dict(net.state_dict(), strict=True, assign=True)
    wrapper.save_pretrained(root / component, safe_serialization=True)

    copy_encoder(encoder, root / "text_encoder", root / "tokenizer")
    if spec.revision and weights_digest(root / "text_encoder") != spec.revision:
        raise RuntimeError(f"{root / 'text_encoder'}: the copy of {encoder} does not digest to {spec.revision}")
    text_cls, tok_cls = encoder_classes(encoder, spec.kind)

    index = {"_class_name": ["pipeline", pipe_cls], "_diffusers_version": diffusers.__version__,
             component: [module, cls], "text_encoder": ["transformers", text_cls],
             "tokenizer": ["transformers", tok_cls], "encoder_kind": spec.kind, "hidden_layer": spec.hidden_layer,
             "max_tokens": spec.max_tokens, "prefix": spec.prefix, "model_ref": card["ref"],
             "model_digest": model_digest(card), "encoder_revision": spec.revision}
    if family == "flow":
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=float(cfg.time_shift))
        scheduler.save_pretrained(root / "scheduler")
        index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (root / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (root / "pipeline.py").write_text(pipeline_source(family, card["ref"]))
    (root / "README.md").write_text(model_card(card, cfg, spec, family, diffusers.__version__))


def export(ref: str, out: str, *, registry: str | None = None, fmt: str = "diffusers",
           overwrite: bool = False) -> dict:
    """Write registered model `ref` to the local directory `out` in `fmt` (see the module docstring).

    The weights are read through the registry (digests verified); the text encoder must be the one on
    the card (same digest). The folder is built beside `out` and moved into place whole, so `out` never
    holds half an export. Returns {model, family, out, diffusers, files, bytes, seconds}."""
    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise T2IError(f"--format {fmt!r}: known formats are {', '.join(FORMATS)}")
    dest = destination(out, overwrite)
    diffusers = require_diffusers()
    cfg, net, card = Registry(registry).load(ref)
    if cfg.family not in LAYOUT:
        raise T2IError(f"model '{card['ref']}': t2i export has no diffusers layout for the {cfg.family} family")
    if not card.get("encoder"):
        raise T2IError(f"model '{card['ref']}': its card records no text encoder, so there is none to bundle")
    spec = from_dict(EncoderSpec, card["encoder"])
    encoder = resolve_encoder_path(spec.name)
    check_encoder(card["ref"], encoder, spec.revision)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.export-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        write_export(tmp, card, cfg, net, spec, encoder, diffusers)
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:12]}" if dest.exists() else None
        if old:
            dest.rename(old)
        tmp.rename(dest)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = [f for f in dest.rglob("*") if f.is_file()]
    return {"model": card["ref"], "family": cfg.family, "out": str(dest), "diffusers": diffusers.__version__,
            "files": len(files), "bytes": sum(f.stat().st_size for f in files), "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- `t2i export`


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", metavar="REF", help="registered model: NAME, NAME:VERSION or NAME@ALIAS")
    p.add_argument("dir", metavar="DIR", help="local output directory (absent or empty)")
    p.add_argument("--format", default="diffusers", help="output format: diffusers (default)")
    p.add_argument("--registry", metavar="URL", default=None,
                   help="registry URL (default: $T2I_REGISTRY, else ~/.t2i/registry)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it holds a previous export")


def run(args: argparse.Namespace) -> int:
    s = export(args.ref, args.dir, registry=args.registry, fmt=args.format, overwrite=args.overwrite)
    print(f"export: {s['model']} ({s['family']}) -> {s['out']} [{s['files']} files, {s['bytes'] / 1e6:.1f} MB, "
          f"diffusers {s['diffusers']}, {s['seconds']:.1f} s]; load it with "
          f"DiffusionPipeline.from_pretrained({s['out']!r}, trust_remote_code=True)")
    return 0
