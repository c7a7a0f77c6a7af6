"""Will a model fit on a box, how much KV cache is left, and how fast is batch-1 decode?

Everything is per device and read off the model's own declaration
(``model.param_specs`` of ``Layout.create(config, tp)``) through the one
``ShardingRules`` table, so padded q heads, replicated KV heads, padded MLP
width and vocab are counted exactly as the runtime lays them out. Nothing is
allocated and nothing is compiled.

The model, in one place (docs/meshes.md walks through it):

- budget per device      = memory_gb × kv_cache_fraction
- weights per device     = Σ params on the device × their bytes (fp8 projections: 1 B each
  + a float32 scale per output channel; int4/int8: ½ or 1 B each + a float32 scale and a
  zero point per group of input channels); with pp > 1 a stage's layer slots
  (⌈layers/pp⌉ on every stage, as the runtime lays them out) + the embedding, final
  norm and lm_head, which every stage holds (replicated over pp)
- workspace per device   = 1 GiB fixed (XLA scratch, cuBLAS/cuDNN workspaces,
  allocator slack; a prefill chunk's activations fit in it)
  + max_num_seqs × 4 B × (2 × vocab/tp            fp32 logits + the sampler's copy
                          + 2 × hidden + qkv/tp + 2 × mlp/tp)   fp32 activations
- KV per token per device = kv_heads/tp × 2 (K, V) × layers on it × (head_dim × dtype bytes,
  or head_dim + 4 with an fp8 KV cache: e4m3 values and a float32 scale per token and head)
- KV capacity             = ⌊(budget − weights − workspace) / page bytes⌋ pages
                            (minimum over stages), × page_size tokens
- decode ms/token (batch 1, one sequence at ``context`` tokens); stages run one after
  another, so it is the sum of the per-stage times plus the hops between them
    stage s     = (its weights streamed + its KV × context) / hbm_read
                  + its all-reduces (2 per layer slot, + 1 for the embedding lookup on stage 0)
                  (the embedding table is gathered, not streamed: one row per token)
    all-reduce  = within a host: latency + 2 (tp−1)/tp × hidden × dtype bytes / link bw
                  spanning h hosts of d devices (TP16 on 2 × 8): reduce-scatter in the host
                  + all-reduce of 1/d of the bytes across hosts + all-gather in the host =
                  2 intra-node latencies + 1 inter-node latency + the bytes terms
    pipeline    = (pp − 1) hops × [latency + hidden × dtype bytes / bw]
                  + 1 all-reduce over the pp stages (the last stage's hidden state to all)
                  on the inter-node link (intra-node when the stages share a host)

Not modelled: compute time, kernel launch gaps, the sampler's cross-shard
reduction, overlap between collectives and HBM reads. Bandwidths are vendor
figures unless the mesh YAML says measured, so most modeled times are lower bounds.
"""
from __future__ import annotations

import dataclasses
import json
import math

from qwenjax.config import ModelConfig
from qwenjax.mesh_config import DTYPES, MeshConfig
import jax

from qwenjax.kv_cache import check_kv_cache_dtype, kv_bytes_per_vector
from qwenjax.model import Layout, ParamSpec, param_specs
from qwenjax.parallel import DEFAULT_RULES, ShardingRules, split_layers
from qwenjax.quantization import DEFAULT_GROUP_SIZE, element_bytes

GB = 1e9
GiB = 2**30
KiB = 2**10
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

DEFAULT_MAX_NUM_SEQS = 256   # vLLM's default batch ceiling; a starting point, not a measurement
DEFAULT_CONTEXT = 2048       # tokens of KV one decode step reads in the modeled ms/token
WORKSPACE_FIXED_BYTES = GiB  # estimate; see the module docstring


@dataclasses.dataclass(frozen=True)
class Plan:
    # what was planned
    model: str
    mesh: str
    device: str
    dtype: str
    quantization: str | None  # weights: None (in dtype), "fp8", "int4" or "int8" projections
    kv_cache_dtype: str       # "auto" (dtype) or "fp8"
    hosts: int
    devices_per_host: int
    dp: int
    tp: int
    pp: int
    max_model_len: int
    max_num_seqs: int
    context: int
    page_size: int
    kv_cache_fraction: float
    memory_bytes_per_device: int

    # layout (per device unless named otherwise)
    q_heads: int                    # checkpoint
    q_heads_laid_out: int           # after zero-padding of GQA groups
    q_heads_per_device: int
    kv_heads: int                   # checkpoint
    kv_heads_laid_out: int          # after replication (a multiple of tp)
    kv_replicas: int
    kv_heads_per_device: int
    mlp_per_device: int
    vocab_per_device: int
    layers_per_stage: tuple[int, ...]

    # weights
    weights_bytes_model: int              # the checkpoint's own figure (config.weight_bytes)
    weights_bytes_laid_out: int           # Σ over the TP group incl. padding and replication
    weights_bytes_per_stage: tuple[int, ...]  # per device of each stage
    weights_bytes_per_device: int         # the largest stage's

    # KV cache
    kv_bytes_per_token: int               # the model's own figure (all layers and KV heads)
    kv_bytes_per_token_per_device: int    # the largest stage's
    kv_bytes_per_token_laid_out: int      # Σ over one replica's devices (replication included)
    kv_bytes_per_sequence: int            # model-level, at max_model_len
    kv_bytes_per_sequence_per_device: int

    # memory budget
    memory_budget_bytes_per_device: int   # memory × kv_cache_fraction
    workspace_bytes_per_device: int
    kv_cache_bytes_per_device: int        # what is left for pages on the tightest stage (≥ 0)
    kv_capacity_pages: int
    kv_capacity_tokens: int               # per replica
    kv_capacity_seqs: int                 # sequences of max_model_len tokens, per replica
    kv_capacity_seqs_total: int           # × dp
    fits: bool
    reason: str

    # batch-1 decode model
    decode_weight_bytes_read: int         # per device, summed over stages
    decode_kv_bytes_read: int             # per device, summed over stages, at `context`
    hbm_read_tbps: float
    modeled_hbm_ms: float
    num_allreduces: int
    allreduce_bytes: int
    allreduce_us: float                   # one all-reduce: latency + bytes term
    collective_link: str                  # "intra_node" | "inter_node" | "none"
    link_latency_us: float
    link_bandwidth_gbps: float
    modeled_collective_ms: float
    modeled_pipeline_ms: float
    modeled_stage_ms: tuple[float, ...]   # each stage's HBM + all-reduces; batch 1 sums them
    modeled_decode_ms: float
    modeled_tokens_per_s: float

    # speculative decoding with a draft model (0 without one): its share of each device
    draft_weights_bytes_per_device: int = 0
    draft_kv_bytes_per_token_per_device: int = 0

    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    def format(self) -> str:
        return _format(self)


def plan(config: ModelConfig, mesh: MeshConfig, max_model_len: int | None = None,
         max_num_seqs: int | None = None, dtype: str | None = None,
         context: int = DEFAULT_CONTEXT, rules: ShardingRules = DEFAULT_RULES,
         quantization: str | None = None, kv_cache_dtype: str = "auto",
         group_size: int | None = DEFAULT_GROUP_SIZE, draft: ModelConfig | None = None) -> Plan:
    """Per-device memory, KV capacity and modeled batch-1 decode time of ``config`` on ``mesh``.
    ``draft``: a draft model for speculative decoding, laid out on the same devices in ``dtype``
    with its own KV cache page for every page (qwenjax/engine/draft_model.py)."""
    notes: list[str] = []
    dtype = dtype or mesh.dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if max_model_len is None:
        max_model_len = mesh.max_model_len
        if max_model_len > config.max_context:
            notes.append(f"max_model_len {max_model_len} of {mesh.name} lowered to the model's "
                         f"context {config.max_context}")
            max_model_len = config.max_context
    elif max_model_len > config.max_context:
        notes.append(f"max_model_len {max_model_len} exceeds the model's context {config.max_context} "
                     "(needs YaRN rope_scaling in config.json)")
    max_num_seqs = DEFAULT_MAX_NUM_SEQS if max_num_seqs is None else max_num_seqs
    for key, value in (("max_model_len", max_model_len), ("max_num_seqs", max_num_seqs),
                       ("context", context)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} must be a positive int, got {value!r}")

    tp, pp = mesh.tp, mesh.pp
    if pp > config.num_layers:
        raise ValueError(f"axes.pp = {pp} exceeds the model's {config.num_layers} layers")
    nbytes = DTYPE_BYTES[dtype]
    layout = Layout.create(config, tp, quantization=quantization, group_size=group_size)
    heads = layout.heads
    specs = param_specs(layout)
    sizes = {"tp": tp}
    is_spec = lambda x: isinstance(x, ParamSpec)  # noqa: E731

    def itemsize(spec: ParamSpec) -> float:
        return nbytes if spec.dtype is None else element_bytes(spec.dtype)

    def on_device(param) -> int:  # a ParamSpec, or a quantized weight's specs (values, scales…)
        return round(sum(_device_elements(s, sizes, rules) * itemsize(s)
                         for s in jax.tree.leaves(param, is_leaf=is_spec)))

    def laid_out(param) -> int:
        return round(sum(math.prod(s.shape) * itemsize(s)
                         for s in jax.tree.leaves(param, is_leaf=is_spec)))

    # The per-layer declaration (the pp = 1 layout; with pp > 1 each device holds one stage's
    # slots of exactly these shapes).
    layer = specs.layers[0]
    layer_fields = [getattr(layer, f.name) for f in dataclasses.fields(layer)]
    layer_bytes = sum(on_device(s) for s in layer_fields)
    embed_bytes = on_device(specs.embed)
    norm_bytes = on_device(specs.final_norm)
    # Tied weights: the logits read the embedding table, so the last stage needs it too.
    head_bytes = 0 if specs.lm_head is None else on_device(specs.lm_head)

    # Σ of global shapes: what the whole TP group stores, padding and replication included.
    laid_out_total = (sum(laid_out(s) for s in layer_fields) * config.num_layers
                      + laid_out(specs.embed) + laid_out(specs.final_norm)
                      + (0 if specs.lm_head is None else laid_out(specs.lm_head)))

    stages = split_layers(config.num_layers, pp)
    # Every stage is laid out with the fullest stage's slot count (padding slots are zero
    # identity layers), and runs all its slots: memory and time follow the slots.
    slots = stages[0]
    kv_heads_per_device = heads.kv_heads // tp
    kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
    kv_vector = kv_bytes_per_vector(config.head_dim, dtype, kv_cache_dtype)
    kv_token_per_layer = kv_heads_per_device * 2 * kv_vector
    kv_token_model = config.num_layers * config.num_kv_heads * 2 * kv_vector
    # The logits read lm_head, or the embedding table itself when tied.
    logits_bytes = head_bytes if specs.lm_head is not None else embed_bytes
    draft_weights = draft_kv_token = 0
    if draft is not None:
        if pp > 1:
            raise ValueError("a draft model needs pp = 1 (speculative_config.model)")
        draft_layout = Layout.create(draft, tp)
        draft_weights = sum(on_device(s) for s in jax.tree.leaves(param_specs(draft_layout),
                                                                     is_leaf=is_spec))
        draft_kv_token = (draft.num_layers * (draft_layout.heads.kv_heads // tp) * 2
                          * kv_bytes_per_vector(draft.head_dim, dtype, "auto"))
    stage_weights, stage_streamed, stage_kv_token = [], [], []
    for s in range(pp):
        last = s == pp - 1
        stage_weights.append(slots * layer_bytes + embed_bytes + norm_bytes + head_bytes
                             + draft_weights)
        # Every stage computes the logits (replicated over pp) at the same time: count them once.
        stage_streamed.append(slots * layer_bytes + (norm_bytes + logits_bytes if last else 0))
        stage_kv_token.append(slots * kv_token_per_layer)

    # ---- memory -----------------------------------------------------------------------
    qkv_per_device = kv_heads_per_device * (heads.q_per_kv + 2) * config.head_dim
    per_seq_workspace = 4 * (2 * (layout.vocab // tp) + 2 * config.hidden_size
                             + qkv_per_device + 2 * (layout.mlp // tp))
    workspace = WORKSPACE_FIXED_BYTES + max_num_seqs * per_seq_workspace
    budget = int(mesh.hardware.memory_bytes * mesh.kv_cache_fraction)
    pages_per_seq = -(-max_model_len // mesh.page_size)
    stage_free = [budget - w - workspace for w in stage_weights]
    # (A draft model's cache has a page for every page of the served model's.)
    stage_pages = [max(0, free) // (mesh.page_size * (kv + draft_kv_token))
                   for free, kv in zip(stage_free, stage_kv_token)]
    tight = min(range(pp), key=lambda s: stage_pages[s])
    capacity_pages = stage_pages[tight]
    capacity_seqs = capacity_pages // pages_per_seq
    kv_token_device = max(stage_kv_token)
    kv_token_group = sum(stage_kv_token) * tp  # one replica's devices together

    capacity_line = f"{mesh.hardware.memory_gb:g} GB × {mesh.kv_cache_fraction:g}"
    worst = max(range(pp), key=lambda s: stage_weights[s])
    where = f" (pipeline stage {worst})" if pp > 1 else ""
    if stage_weights[worst] > budget:
        fits = False
        reason = (f"weights need {stage_weights[worst] / GB:.1f} GB per device{where} but only "
                  f"{budget / GB:.1f} GB of {capacity_line} are available")
    elif stage_weights[worst] + workspace > budget:
        fits = False
        reason = (f"weights ({stage_weights[worst] / GB:.1f} GB) + workspace ({workspace / GB:.1f} GB) "
                  f"need {(stage_weights[worst] + workspace) / GB:.1f} GB per device{where} but only "
                  f"{budget / GB:.1f} GB of {capacity_line} are available")
    elif capacity_seqs < 1:
        need = pages_per_seq * mesh.page_size * (stage_kv_token[tight] + draft_kv_token)
        where = f" (pipeline stage {tight})" if pp > 1 else ""
        fits = False
        reason = (f"KV cache for one {max_model_len}-token sequence needs {need / GB:.2f} GB per "
                  f"device{where} but only {max(0, stage_free[tight]) / GB:.2f} GB of {capacity_line} "
                  f"remain after weights ({stage_weights[tight] / GB:.1f} GB) and workspace "
                  f"({workspace / GB:.1f} GB)")
    else:
        fits = True
        reason = (f"fits: {capacity_seqs} sequence(s) of {max_model_len} tokens per replica "
                  f"({capacity_pages * mesh.page_size:,} tokens of KV cache)")

    # ---- decode model ---------------------------------------------------------------------
    hbm_bps = mesh.hardware.hbm_read_tbps * 1e12
    weight_read = sum(stage_streamed)
    kv_read = sum(stage_kv_token) * context
    hbm_ms = (weight_read + kv_read) / hbm_bps * 1e3
    act_bytes = config.hidden_size * nbytes  # one token's residual stream
    if tp > 1:
        link = mesh.collective_link
        link_name = "inter_node" if mesh.tp_spans_hosts else "intra_node"
        num_ar = allreduces_per_step(slots * pp)
        ar_us = tp_allreduce_us(mesh, act_bytes)
    else:
        link, link_name, num_ar, ar_us = None, "none", 0, 0.0
    collective_ms = num_ar * ar_us / 1e3
    stage_ms = tuple(
        (stage_streamed[s] + stage_kv_token[s] * context) / hbm_bps * 1e3
        + (2 * slots + (s == 0)) * ar_us / 1e3 for s in range(pp))
    pipeline_ms = 0.0
    if pp > 1:
        hop = mesh.hardware.inter_node if mesh.hosts > 1 else mesh.hardware.intra_node
        hops_us = (pp - 1) * (hop.latency_us + act_bytes / (hop.bandwidth_gbps * 1e9) * 1e6)
        gather_us = allreduce_us(pp, act_bytes, hop.latency_us, hop.bandwidth_gbps)
        pipeline_ms = (hops_us + gather_us) / 1e3
    decode_ms = sum(stage_ms) + pipeline_ms

    # ---- notes ------------------------------------------------------------------------------
    if quantization is not None:
        dense_layer = sum(_device_elements(s, sizes, rules) * nbytes
                          for s in jax.tree.leaves(param_specs(Layout.create(config, tp)).layers[0],
                                                   is_leaf=is_spec))
        notes.append(f"{quantization} projection weights: {layer_bytes * slots / GB:.2f} GB of layers "
                     f"per device instead of {dense_layer * slots / GB:.2f} GB in {dtype} "
                     "(embedding, lm_head, norms and biases stay in " + dtype + ")")
    if heads.kv_replicas > 1:
        notes.append(f"KV heads replicated ×{heads.kv_replicas} at load ({config.num_kv_heads} → "
                     f"{heads.kv_heads}); the group stores {kv_token_group / KiB:.0f} KiB "
                     f"per token for a {kv_token_model / KiB:.0f} KiB model")
    if heads.q_heads != config.num_heads:
        notes.append(f"q heads padded {config.num_heads} → {heads.q_heads} with zero heads "
                     "(whole GQA groups per device)")
    if layout.mlp != config.intermediate_size or layout.vocab != config.vocab_size:
        notes.append(f"zero-padded to a multiple of tp: mlp {config.intermediate_size} → {layout.mlp}, "
                     f"vocab {config.vocab_size} → {layout.vocab}")
    if pp > 1 and slots * pp != config.num_layers:
        notes.append(f"{config.num_layers} layers over {pp} stages: {'/'.join(map(str, stages))} "
                     f"real layers, every stage laid out and run with {slots} slots")
    if pp > 1:
        notes.append(f"batch 1 runs the stages one after another; with ≥ {pp} sequences decode "
                     f"overlaps them in {pp} micro-batches (per-stage "
                     f"{max(stage_ms):.2f} ms bounds a step)")
    if context > max_model_len:
        notes.append(f"decode context {context} exceeds max_model_len {max_model_len}")
    if draft is not None:
        notes.append(f"draft model {draft.name}: {draft_weights / GB:.2f} GB of weights and "
                     f"{draft_kv_token / KiB:.1f} KiB of KV per token per device, counted in the "
                     "memory and KV capacity; the modeled step is the served model's alone")
    if mesh.dp > 1:
        notes.append(f"{mesh.dp} data-parallel replicas: capacity and decode are per replica; "
                     "each replica is an engine of its own (docs/deployment.md)")

    return Plan(
        model=config.name, mesh=mesh.name, device=mesh.hardware.device, dtype=dtype,
        quantization=quantization, kv_cache_dtype=kv_cache_dtype, hosts=mesh.hosts, devices_per_host=mesh.devices_per_host, dp=mesh.dp, tp=tp, pp=pp,
        max_model_len=max_model_len, max_num_seqs=max_num_seqs, context=context,
        page_size=mesh.page_size, kv_cache_fraction=mesh.kv_cache_fraction,
        memory_bytes_per_device=mesh.hardware.memory_bytes,
        q_heads=config.num_heads, q_heads_laid_out=heads.q_heads,
        q_heads_per_device=heads.q_heads // tp,
        kv_heads=config.num_kv_heads, kv_heads_laid_out=heads.kv_heads,
        kv_replicas=heads.kv_replicas, kv_heads_per_device=kv_heads_per_device,
        mlp_per_device=layout.mlp // tp, vocab_per_device=layout.vocab // tp,
        layers_per_stage=tuple(stages),
        weights_bytes_model=config.weight_bytes(dtype),
        weights_bytes_laid_out=laid_out_total,
        weights_bytes_per_stage=tuple(stage_weights),
        weights_bytes_per_device=max(stage_weights),
        kv_bytes_per_token=kv_token_model,
        kv_bytes_per_token_per_device=kv_token_device,
        kv_bytes_per_token_laid_out=kv_token_group,
        kv_bytes_per_sequence=kv_token_model * max_model_len,
        kv_bytes_per_sequence_per_device=kv_token_device * max_model_len,
        memory_budget_bytes_per_device=budget,
        workspace_bytes_per_device=workspace,
        kv_cache_bytes_per_device=max(0, stage_free[tight]),
        kv_capacity_pages=capacity_pages,
        kv_capacity_tokens=capacity_pages * mesh.page_size,
        kv_capacity_seqs=capacity_seqs,
        kv_capacity_seqs_total=capacity_seqs * mesh.dp,
        fits=fits, reason=reason,
        decode_weight_bytes_read=weight_read, decode_kv_bytes_read=kv_read,
        hbm_read_tbps=mesh.hardware.hbm_read_tbps,
        modeled_hbm_ms=hbm_ms, num_allreduces=num_ar, allreduce_bytes=act_bytes if tp > 1 else 0,
        allreduce_us=ar_us, collective_link=link_name,
        link_latency_us=link.latency_us if link else 0.0,
        link_bandwidth_gbps=link.bandwidth_gbps if link else 0.0,
        modeled_collective_ms=collective_ms, modeled_pipeline_ms=pipeline_ms,
        modeled_stage_ms=stage_ms,
        modeled_decode_ms=decode_ms, modeled_tokens_per_s=1e3 / decode_ms,
        draft_weights_bytes_per_device=draft_weights,
        draft_kv_bytes_per_token_per_device=draft_kv_token,
        notes=tuple(notes),
    )


def allreduces_per_step(num_layers: int) -> int:
    """Attention-out and MLP-down per layer, plus the vocab-sharded embedding lookup."""
    return 2 * num_layers + 1


def allreduce_us(tp: int, nbytes: float, latency_us: float, bandwidth_gbps: float) -> float:
    """One ring all-reduce of ``nbytes`` over ``tp`` devices: latency + 2(tp−1)/tp × bytes / bandwidth."""
    if tp == 1:
        return 0.0
    return latency_us + 2 * (tp - 1) / tp * nbytes / (bandwidth_gbps * 1e9) * 1e6


def tp_allreduce_us(mesh: MeshConfig, nbytes: float) -> float:
    """One all-reduce over the mesh's TP group: a ring on one host's link, or, when the group
    spans hosts, the two-level form NCCL and XLA use across nodes (reduce-scatter in the host,
    all-reduce of 1/d of the bytes between hosts, all-gather in the host)."""
    tp, hw = mesh.tp, mesh.hardware
    if not mesh.tp_spans_hosts:
        link = hw.intra_node
        return allreduce_us(tp, nbytes, link.latency_us, link.bandwidth_gbps)
    d, hosts = mesh.devices_per_host, tp // mesh.devices_per_host
    intra, inter = hw.intra_node, hw.inter_node
    in_host = 0.0
    if d > 1:  # reduce-scatter and all-gather: each (d−1)/d of the bytes, one latency
        in_host = 2 * (intra.latency_us + (d - 1) / d * nbytes / (intra.bandwidth_gbps * 1e9) * 1e6)
    return in_host + allreduce_us(hosts, nbytes / d, inter.latency_us, inter.bandwidth_gbps)


def _device_elements(spec: ParamSpec, sizes: dict[str, int], rules: ShardingRules) -> int:
    """Elements of ``spec`` one device holds, splitting each dimension its rule shards."""
    count = 1
    for dim, logical in zip(spec.shape, spec.axes):
        mesh_axis = getattr(rules, logical) if logical is not None else None
        split = sizes.get(mesh_axis, 1) if mesh_axis is not None else 1
        if dim % split:
            raise ValueError(f"{logical} dimension {dim} does not divide over {mesh_axis}={split}; "
                             "the layout should have padded it")
        count *= dim // split
    return count


# ---- the text report ------------------------------------------------------------------------
def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def _format(p: Plan) -> str:
    topo = (f"{p.hosts} hosts × {p.devices_per_host}" if p.hosts > 1 else f"{p.devices_per_host}") + "×"
    lines = [
        f"{p.model} on {p.mesh}: {topo} {p.device}; dp={p.dp} tp={p.tp} pp={p.pp}; {p.dtype}"
        + (f", {p.quantization} weights" if p.quantization else "")
        + (f", {p.kv_cache_dtype} KV cache" if p.kv_cache_dtype != "auto" else ""),
        f"  layout     q heads {p.q_heads} → {p.q_heads_laid_out} ({p.q_heads_per_device}/device), "
        f"KV heads {p.kv_heads} → {p.kv_heads_laid_out} ({p.kv_heads_per_device}/device), "
        f"mlp {p.mlp_per_device}/device, vocab {p.vocab_per_device}/device",
    ]
    if p.pp > 1:
        stages = ", ".join(f"stage {s}: {n} layers {_gb(w)} {ms:.2f} ms" for s, (n, w, ms) in
                           enumerate(zip(p.layers_per_stage, p.weights_bytes_per_stage,
                                         p.modeled_stage_ms)))
        lines.append(f"  stages     {stages}")
    lines += [
        f"  weights    {_gb(p.weights_bytes_per_device)} per device "
        f"(model {_gb(p.weights_bytes_model)}; the TP group stores {_gb(p.weights_bytes_laid_out)} "
        f"with padding and replication)",
        f"  KV cache   {p.kv_bytes_per_token_per_device / KiB:.1f} KiB/token per device; model "
        f"{p.kv_bytes_per_token / KiB:.1f} KiB/token = {p.kv_bytes_per_sequence / GiB:.2f} GiB per "
        f"{p.max_model_len}-token sequence",
        f"  memory     {p.memory_bytes_per_device / GB:g} GB × {p.kv_cache_fraction:g} = "
        f"{_gb(p.memory_budget_bytes_per_device)} per device: weights {_gb(p.weights_bytes_per_device)} "
        f"+ workspace {_gb(p.workspace_bytes_per_device)} ({p.max_num_seqs} seqs) "
        f"+ KV {_gb(p.kv_cache_bytes_per_device)}",
        f"  capacity   {p.kv_capacity_tokens:,} tokens = {p.kv_capacity_pages:,} pages of {p.page_size} "
        f"= {p.kv_capacity_seqs} × {p.max_model_len}-token sequences per replica",
        f"  fit        {'yes' if p.fits else 'NO'}: {p.reason.removeprefix('fits: ')}",
        f"  decode     batch 1, context {p.context}: {p.modeled_decode_ms:.2f} ms/token modeled "
        f"({p.modeled_tokens_per_s:.1f} tok/s) = HBM {p.modeled_hbm_ms:.2f} + collectives "
        f"{p.modeled_collective_ms:.2f} + pipeline {p.modeled_pipeline_ms:.2f} ms",
        f"    HBM          {p.modeled_hbm_ms:7.2f} ms  {_gb(p.decode_weight_bytes_read)} weights + "
        f"{_gb(p.decode_kv_bytes_read)} KV read per device at {p.hbm_read_tbps:g} TB/s",
    ]
    if p.num_allreduces and p.tp > p.devices_per_host:
        lines.append(f"    collectives  {p.modeled_collective_ms:7.2f} ms  {p.num_allreduces} all-reduces × "
                     f"{p.allreduce_us:.2f} µs, two-level over {p.tp // p.devices_per_host} hosts: "
                     f"reduce-scatter + all-gather in the host (intra_node), all-reduce of "
                     f"1/{p.devices_per_host} of {p.allreduce_bytes / KiB:.0f} KiB between hosts at "
                     f"{p.link_latency_us:g} µs + {p.link_bandwidth_gbps:g} GB/s (inter_node)")
    elif p.num_allreduces:
        lines.append(f"    collectives  {p.modeled_collective_ms:7.2f} ms  {p.num_allreduces} all-reduces × "
                     f"{p.allreduce_us:.2f} µs = {p.link_latency_us:g} µs latency + "
                     f"{p.allreduce_us - p.link_latency_us:.2f} µs for {p.allreduce_bytes / KiB:.0f} KiB "
                     f"at {p.link_bandwidth_gbps:g} GB/s ({p.collective_link})")
    else:
        lines.append(f"    collectives  {0.0:7.2f} ms  none (tp=1)")
    lines.append(f"    pipeline     {p.modeled_pipeline_ms:7.2f} ms  "
                 + (f"{p.pp - 1} stage hop(s) + 1 all-reduce over the {p.pp} stages"
                    if p.pp > 1 else "none (pp=1)"))
    lines += [f"  note       {n}" for n in p.notes]
    return "\n".join(lines)

