"""Sharded orbax checkpoints of the serving layout: write once, restore straight into shardings.

A qwenjax orbax checkpoint is a directory:

    CKPT/
      qwenjax_checkpoint.json   format marker: version, the tp the layout was made for, dtype, head plan
      config.json               copied from the source HF directory (also tokenizer files,
      tokenizer.json …          generation_config.json)
      params/                   orbax (OCDBT/tensorstore) tree of the ``Weights`` pytree

``params`` holds exactly the arrays ``load_checkpoint`` builds for that tp: KV heads
replicated, q heads, MLP columns and vocab rows zero-padded, in the serving dtype; with
``quantization: "fp8"`` each projection is a ``{"value", "scale"}`` pair (quantization.py),
restored as it was written (a mesh whose tp needs another layout is refused: convert again).
Restoring on a mesh with the same layout reads each device's shards directly into
their ``NamedSharding``s (each process reads only what it holds). A mesh whose tp
gives another layout (e.g. 0.5B's 2 KV heads: tp=4 replicates them to 4, tp=2 keeps
2) restores the saved layout sharded over the target mesh, then re-lays it out on
device with jitted gathers whose out_shardings are the target's; see ``relayout``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwenjax.config import ModelConfig
from qwenjax.model import Layout, LayerWeights, ParamSpec, Weights, param_specs, weight_shardings
from qwenjax.parallel import DEFAULT_RULES, HeadPlan, ShardingRules, mesh_tp
from qwenjax.quantization import DEFAULT_GROUP_SIZE, is_quantized

FORMAT = "qwenjax-orbax"
VERSION = 1
METADATA_FILE = "qwenjax_checkpoint.json"
PARAMS_DIR = "params"
# Copied next to the weights so that the checkpoint alone serves text (tokenizer, chat
# template, stop tokens); any of them missing in the source is skipped.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json")


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """A directory convert wrote (or began to write: ``read_metadata`` then says what is missing)."""
    path = Path(path)
    return (path / METADATA_FILE).is_file() or (path / PARAMS_DIR).is_dir()


# ---- pytree <-> plain dict (the on-disk tree does not depend on our dataclass names) ----------
_LAYER_FIELDS = ("attn_norm", "qkv", "qkv_bias", "o", "mlp_norm", "gate_up", "down")


def _to_tree(weights: Weights) -> dict:
    def leaf(x):  # a quantized weight: a dict of its arrays ({value, scale} or {value, scale, zero})
        if not is_quantized(x):
            return x
        return {f.name: _on_disk(getattr(x, f.name))
                for f in dataclasses.fields(x) if not f.metadata.get("static")}

    tree = {"embed": weights.embed, "final_norm": weights.final_norm,
            "layers": {str(i): {name: leaf(getattr(layer, name)) for name in _LAYER_FIELDS}
                       for i, layer in enumerate(weights.layers)}}
    if weights.lm_head is not None:
        tree["lm_head"] = weights.lm_head
    return tree


def _on_disk(x):
    """tensorstore has no 4-bit integers: int4 codes and zero points are written as uint8."""
    if x.dtype != jnp.uint4:
        return x
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, jnp.uint8, sharding=x.sharding)
    return x.astype(jnp.uint8)


def _from_tree(tree: dict, layout: Layout) -> Weights:
    specs = param_specs(layout)

    def layer(i: int) -> LayerWeights:
        fields = {}
        for name in _LAYER_FIELDS:
            value, spec = tree["layers"][str(i)][name], getattr(specs.layers[i], name)
            # A quantized spec's static facts (contract; axis, group) with the restored arrays.
            if is_quantized(spec):
                value = {k: v.astype(getattr(spec, k).dtype) for k, v in value.items()}
                value = dataclasses.replace(spec, **value)
            fields[name] = value
        return LayerWeights(**fields)

    return Weights(embed=tree["embed"], layers=[layer(i) for i in range(layout.config.num_layers)],
                   final_norm=tree["final_norm"], lm_head=tree.get("lm_head"))


# ---- metadata ---------------------------------------------------------------------------------
def _metadata(layout: Layout, dtype: str) -> dict:
    h = layout.heads
    return {"format": FORMAT, "version": VERSION, "tp": h.tp, "dtype": dtype,
            "heads": {"num_heads": h.num_heads, "num_kv_heads": h.num_kv_heads,
                      "kv_replicas": h.kv_replicas, "q_per_kv": h.q_per_kv},
            "mlp": layout.mlp, "vocab": layout.vocab, "quantization": layout.quantization,
            "group_size": layout.group_size}


def read_metadata(directory: str | os.PathLike) -> dict:
    """The checked metadata of a qwenjax orbax checkpoint (clear errors for anything else)."""
    directory = Path(directory)
    path = directory / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a qwenjax orbax checkpoint (no {METADATA_FILE})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the checkpoint is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format must be {FORMAT!r}, got {meta.get('format') if isinstance(meta, dict) else meta!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: version {meta.get('version')!r} is not supported (this qwenjax "
                         f"reads version {VERSION})")
    for key in ("tp", "dtype", "heads", "mlp", "vocab"):
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}; the checkpoint is corrupt")
    if not isinstance(meta["tp"], int) or meta["tp"] < 1:
        raise ValueError(f"{path}: tp must be a positive int, got {meta['tp']!r}")
    from qwenjax.weights import DTYPES

    if meta["dtype"] not in DTYPES:
        raise ValueError(f"{path}: dtype must be one of {', '.join(DTYPES)}, got {meta['dtype']!r}")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: the checkpoint has no config.json")
    for name in ("", "_METADATA", "manifest.ocdbt"):  # the tree and the OCDBT root
        if not (directory / PARAMS_DIR / name).exists():
            raise FileNotFoundError(f"{directory}: the checkpoint has no {PARAMS_DIR}/{name} "
                                    "(incomplete convert or copy?)")
    return meta


def saved_layout(config: ModelConfig, meta: dict, source: str) -> Layout:
    """The layout the checkpoint was written in, checked against its recorded head plan."""
    # Checkpoints written before quantization existed have no key: dense.
    layout = Layout.create(config, meta["tp"], quantization=meta.get("quantization"),
                           group_size=meta.get("group_size", DEFAULT_GROUP_SIZE))
    expected = _metadata(layout, meta["dtype"])
    for key in ("heads", "mlp", "vocab"):
        if meta[key] != expected[key]:
            raise ValueError(f"{source}: {METADATA_FILE} says {key} = {meta[key]} but config.json at "
                             f"tp={meta['tp']} gives {expected[key]}; the checkpoint does not match "
                             "its config")
    return layout


# ---- save -------------------------------------------------------------------------------------
def save_checkpoint(weights: Weights, layout: Layout, out_dir: str | os.PathLike, dtype: str,
                    source_dir: str | os.PathLike) -> Path:
    """Write ``weights`` (laid out for ``layout``) as an orbax checkpoint plus side files.

    The metadata file is written last: a directory without it is not a checkpoint,
    so an interrupted convert is never mistaken for a complete one.
    """
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out_dir}: directory exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    source_dir = Path(source_dir)
    if jax.process_index() == 0:
        for name in SIDE_FILES:
            if (source_dir / name).is_file():
                shutil.copy2(source_dir / name, out / name)
    # Uncompressed: weights barely compress (zstd saves ~20%, mostly padding and KV replicas)
    # and decompressing cost 30% of the 0.5B's restore time on CPU (BENCHMARKS.md).
    checkpointer = ocp.PyTreeCheckpointer(use_compression=False, use_zarr3=True)
    checkpointer.save(out / PARAMS_DIR, _to_tree(weights))
    checkpointer.close()
    if jax.process_index() == 0:
        (out / METADATA_FILE).write_text(json.dumps(_metadata(layout, dtype), indent=2) + "\n")
    return out


# ---- restore ----------------------------------------------------------------------------------
def _staging_sharding(shape: tuple[int, ...], spec: ParamSpec, mesh: Mesh,
                      rules: ShardingRules) -> NamedSharding:
    """A sharding over ``mesh`` for a parameter in a *foreign* layout.

    Its tp-split dimension may not divide by this mesh's tp (4 KV heads on tp=8), so split
    the rule's dimension when it divides, else the first one that does (usually embed),
    else replicate: each device still holds about 1/tp of the parameter.
    """
    target = rules.spec(spec.axes)
    tp = mesh_tp(mesh)
    axis_dims = [i for i, a in enumerate(target) if a is not None]
    order = axis_dims + [i for i in range(len(shape)) if i not in axis_dims]
    for dim in order:
        if shape[dim] % tp == 0:
            parts = [None] * len(shape)
            parts[dim] = "tp"
            return NamedSharding(mesh, PartitionSpec(*parts))
    return NamedSharding(mesh, PartitionSpec())


def _head_index(saved: HeadPlan, target: HeadPlan, kv_slots: bool) -> np.ndarray:
    """For each (kv_head, slot) of ``target``, the flat (kv_head, slot) of ``saved`` holding the same
    checkpoint head; ``saved`` size (out of range, filled with zeros by the gather) for padding."""
    s_slots = saved.q_per_kv + (2 if kv_slots else 0)
    t_slots = target.q_per_kv + (2 if kv_slots else 0)
    group = saved.num_heads // saved.num_kv_heads
    missing = saved.kv_heads * s_slots
    index = np.full((target.kv_heads, t_slots), missing, np.int32)
    for g in range(target.kv_heads):
        for j in range(target.q_per_kv):
            head = target.q_source(g, j)
            if head is None:
                continue
            kv, within = divmod(head, group)
            replica, slot = divmod(within, saved.q_per_kv)
            index[g, j] = (kv * saved.kv_replicas + replica) * s_slots + slot
        if kv_slots:
            base = target.kv_source(g) * saved.kv_replicas * s_slots
            index[g, target.q_per_kv] = base + saved.q_per_kv          # K
            index[g, target.q_per_kv + 1] = base + saved.q_per_kv + 1  # V
    return index.reshape(-1)


def _resize(x: jax.Array, axis: int, size: int, new_size: int) -> jax.Array:
    """Drop zero padding past ``size`` on ``axis`` and zero-pad to ``new_size``."""
    x = jax.lax.slice_in_dim(x, 0, size, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, new_size - size)
    return jnp.pad(x, pad)


class _Relayout:
    """Traceable maps from ``saved``'s layout to ``target``'s: one for a layer, one for the rest."""

    def __init__(self, saved: Layout, target: Layout):
        self.saved, self.target = saved, target
        self.qkv_index = _head_index(saved.heads, target.heads, kv_slots=True)
        self.o_index = _head_index(saved.heads, target.heads, kv_slots=False)

    def _heads(self, x, start, index, slots):
        # Flatten (kv_heads, slots) at dims start, start+1, gather, split back.
        shape = x.shape
        flat = x.reshape(*shape[:start], shape[start] * shape[start + 1], *shape[start + 2:])
        out = jnp.take(flat, index, axis=start, mode="fill", fill_value=0)
        return out.reshape(*shape[:start], self.target.heads.kv_heads, slots, *shape[start + 2:])

    def layer(self, w: LayerWeights) -> LayerWeights:
        inter, mlp, tj = self.target.config.intermediate_size, self.target.mlp, self.target.heads.q_per_kv
        return LayerWeights(
            attn_norm=w.attn_norm,
            qkv=self._heads(w.qkv, 1, self.qkv_index, tj + 2),
            qkv_bias=self._heads(w.qkv_bias, 0, self.qkv_index, tj + 2),
            o=self._heads(w.o, 0, self.o_index, tj),
            mlp_norm=w.mlp_norm,
            gate_up=_resize(w.gate_up, 2, inter, mlp),
            down=_resize(w.down, 0, inter, mlp),
        )

    def outer(self, embed, final_norm, lm_head):
        vocab, padded = self.target.config.vocab_size, self.target.vocab
        return (_resize(embed, 0, vocab, padded), final_norm,
                None if lm_head is None else _resize(lm_head, 1, vocab, padded))


def relayout(weights: Weights, saved: Layout, target: Layout, mesh: Mesh,
             rules: ShardingRules = DEFAULT_RULES) -> Weights:
    """``weights`` in ``saved``'s layout (any sharding over ``mesh``) → ``target``'s layout in its
    shardings, on device.

    One jitted program per layer, compiled once and reused for every layer (all layers have
    the same shapes): an unrolled whole-model program took seconds to compile for the 0.5B
    and would grow with 80-layer models. Each saved layer is dropped once converted, so the
    peak is the saved model plus one layer rather than both models.
    """
    maps = _Relayout(saved, target)
    shardings = weight_shardings(target, mesh, rules)
    layer_fn = jax.jit(maps.layer, out_shardings=shardings.layers[0])
    saved_layers = list(weights.layers)
    layers = []
    for i in range(len(saved_layers)):
        layers.append(layer_fn(saved_layers[i]))
        saved_layers[i] = None
    outer_fn = jax.jit(maps.outer, out_shardings=(shardings.embed, shardings.final_norm, shardings.lm_head))
    embed, final_norm, lm_head = outer_fn(weights.embed, weights.final_norm, weights.lm_head)
    return Weights(embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)


def _same_shapes(a: Layout, b: Layout) -> bool:
    # Equal shapes mean an equal layout: kv_heads and q_per_kv fix the head plan, and
    # MLP / vocab padding is zeros at the end.
    shapes = lambda layout: [s.shape for s in jax.tree.leaves(param_specs(layout),
                                                              is_leaf=lambda x: isinstance(x, ParamSpec))]
    return shapes(a) == shapes(b)


def restore_checkpoint(directory: str | os.PathLike, mesh: Mesh, dtype: str | None = None,
                       rules: ShardingRules = DEFAULT_RULES
                       ) -> tuple[ModelConfig, Layout, Weights, str]:
    """Restore a qwenjax orbax checkpoint onto ``mesh`` in ``dtype`` (None: the saved dtype).

    Returns (config, layout for the mesh's tp, weights, dtype name).
    """
    import orbax.checkpoint as ocp

    from qwenjax.weights import resolve_dtype

    directory = Path(directory).absolute()
    meta = read_metadata(directory)
    dtype = dtype or meta["dtype"]
    jdtype = resolve_dtype(dtype)
    config = ModelConfig.from_hf(directory)
    saved = saved_layout(config, meta, str(directory))
    target = Layout.create(config, mesh_tp(mesh), quantization=saved.quantization,
                           group_size=saved.group_size)
    same = _same_shapes(saved, target)
    if not same and saved.quantization is not None:
        raise ValueError(f"{directory}: {saved.quantization} weights written for tp={meta['tp']} "
                         f"restore only where tp gives the same layout; tp={mesh_tp(mesh)} lays "
                         "the heads out differently: convert the HF checkpoint for this tp")
    specs = param_specs(saved)
    is_spec = lambda x: isinstance(x, ParamSpec)
    if same:
        # fp8 values and their float32 scales keep their own dtypes.
        abstract = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype or jdtype,
                                           sharding=rules.sharding(mesh, s.axes)),
            specs, is_leaf=is_spec)
    else:
        abstract = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, jdtype,
                                           sharding=_staging_sharding(s.shape, s, mesh, rules)),
            specs, is_leaf=is_spec)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.restore(directory / PARAMS_DIR, _to_tree(abstract))
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        # tensorstore errors carry a page of JSON spec after the first sentence.
        reason = str(e).split(" [tensorstore_spec", 1)[0][:400]
        raise ValueError(f"{directory}: cannot restore {PARAMS_DIR}/ ({type(e).__name__}: {reason}); "
                         "the checkpoint is corrupt or incomplete") from None
    weights = _from_tree(tree, saved)
    del tree
    if not same:
        weights = relayout(weights, saved, target, mesh, rules)
    return config, target, weights, dtype


# ---- convert ----------------------------------------------------------------------------------
def _convert_mesh(tp: int) -> Mesh:
    """Where convert builds the tp layout: over tp devices when there are that many, else whole on
    one CPU device (host RAM holds the full model in the serving dtype then)."""
    from qwenjax.parallel import make_mesh

    if len(jax.devices()) >= tp:
        return make_mesh(tp=tp)
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:
        raise ValueError(f"tp={tp} needs {tp} devices or the CPU backend to build the layout on; "
                         f"only {len(jax.devices())} device(s) and no CPU backend (JAX_PLATFORMS?)") from None
    return make_mesh(tp=1, devices=[cpu])


def convert_to_orbax(model: str | os.PathLike, out_dir: str | os.PathLike, tp: int, dtype: str,
                     progress: bool = True, quantization: str | None = None) -> Path:
    """An HF directory or a GGUF file → an orbax checkpoint laid out for ``tp`` in ``dtype``
    (``quantization``: "fp8", "int4" or "int8" projections; an FP8/AWQ/GPTQ HF checkpoint
    stays as it is unless told otherwise)."""
    from qwenjax.weights import checkpoint_layout, load_checkpoint, resolve_dtype

    jdtype = resolve_dtype(dtype)
    if tp < 1:
        raise ValueError(f"tp must be ≥ 1, got {tp}")
    model = Path(model)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out_dir}: directory exists and is not empty")
    if model.is_file():
        from qwenjax.gguf_model import prepare

        model = prepare(model)  # the GGUF's config and tokenizer; weights dequantized as read
    from qwenjax.score_head import head_kind

    kind = head_kind(model)
    if kind is not None:
        raise ValueError(f"--model {model}: a {kind} checkpoint (a score head instead "
                         "of an LM head); orbax checkpoints hold causal LMs only: serve the HF "
                         "directory")
    if is_orbax_checkpoint(model):
        raise ValueError(f"--model {model}: already a qwenjax orbax checkpoint (it restores at any tp; "
                         "convert reads HF directories and GGUF files)")
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"--model {model}: neither a GGUF file nor a directory with config.json")
    config = ModelConfig.from_hf(model)
    layout = checkpoint_layout(config, model, tp, quantization=quantization)
    weights = load_checkpoint(model, layout, _convert_mesh(tp), jdtype)
    return save_checkpoint(weights, layout, out, dtype, source_dir=model)
