"""Classification and reward checkpoints (qwenjax/score_head.py): tiny random ones written by
transformers, their outputs against transformers' in float32, through the engine (batched,
chunked, at tp 2), ``LLM.classify``/``LLM.reward`` and the HTTP routes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qwenjax.pooling import PoolingParams
from tiny import tiny_config

LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def _randomize(model) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A Qwen2ForSequenceClassification with 3 labels, and transformers' model of it."""
    import torch
    import transformers

    directory = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(3)
    config = transformers.Qwen2Config(**{**tiny_config().to_hf_dict(),
                                         "architectures": ["Qwen2ForSequenceClassification"]},
                                      num_labels=3, id2label=LABELS,
                                      label2id={v: k for k, v in LABELS.items()}, pad_token_id=249)
    model = transformers.Qwen2ForSequenceClassification(config).float().eval()
    _randomize(model)
    model.save_pretrained(directory, safe_serialization=True)
    return directory, model


def _two_layer_head(directory, seed: int, architecture: str, labels: int, **config):
    """A checkpoint of Qwen2.5-Math-RM's / -PRM's layout (score.0, ReLU, score.2) written to
    ``directory``, and a function giving its head's outputs at every prompt position [T,
    labels] with transformers' backbone."""
    import torch
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    hf_config = transformers.Qwen2Config(**tiny_config().to_hf_dict())
    backbone = transformers.Qwen2Model(hf_config).float().eval()
    _randomize(backbone)
    hidden = hf_config.hidden_size
    head = {"score.0.weight": 0.2 * torch.randn(hidden, hidden), "score.0.bias": 0.1 * torch.randn(hidden),
            "score.2.weight": 0.3 * torch.randn(labels, hidden),
            "score.2.bias": 0.1 * torch.randn(labels)}
    tensors = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    save_file({**tensors, **head}, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(
        {**tiny_config().to_hf_dict(), "architectures": [architecture], **config}))

    def outputs(ids):
        with torch.no_grad():
            h = backbone(torch.tensor([ids])).last_hidden_state[0]
            h = torch.relu(h @ head["score.0.weight"].T + head["score.0.bias"])
            return (h @ head["score.2.weight"].T + head["score.2.bias"]).numpy()

    return outputs


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A Qwen2ForRewardModel, and a function computing its reward (the head on the last token)."""
    directory = tmp_path_factory.mktemp("reward")
    outputs = _two_layer_head(directory, 4, "Qwen2ForRewardModel", 1, num_labels=1)
    return directory, lambda ids: outputs(ids)[-1]


STEP_TAG = 7  # the tiny vocabulary's stand-in for Qwen2.5-Math-PRM's "<extra_0>"


@pytest.fixture(scope="module")
def process_reward_model(tmp_path_factory):
    """A Qwen2ForProcessRewardModel (2 labels), and a function giving its head's logits at every
    prompt position."""
    directory = tmp_path_factory.mktemp("prm")
    return directory, _two_layer_head(directory, 5, "Qwen2ForProcessRewardModel", 2)


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _steps(n: int, seed: int) -> list[int]:
    """A prompt of ``n`` tokens with a step tag every few tokens (and last)."""
    ids = np.random.default_rng(seed).integers(10, 240, n)
    ids[5::9] = STEP_TAG
    ids[-1] = STEP_TAG
    return ids.tolist()


def test_process_reward_model_matches_transformers(process_reward_model):
    """Qwen2.5-Math-PRM's use: each step's probabilities (softmax of the head) at its step tag,
    chunked and batched; every token's with token_classify; one per prompt refused."""
    from qwenjax import LLM

    directory, logits = process_reward_model
    llm = LLM(str(directory), max_model_len=128, max_num_seqs=4, prefill_chunk=16,
              max_num_batched_tokens=32, warm_up=False, progress=False,
              pooler_config={"step_tag_id": STEP_TAG})
    assert llm.engine.head_kind == "process_reward"
    assert llm.engine.pooler.tok_pooling_type == "STEP"  # the checkpoint's default, tag overridden
    prompts = [_steps(n, seed) for seed, n in enumerate((40, 9, 77))]
    for ids, result in zip(prompts, llm.reward(prompts, use_tqdm=False)):
        want = _softmax(logits(ids))[np.asarray(ids) == STEP_TAG]
        assert len(result.outputs.data) == len(want) >= 1
        np.testing.assert_allclose(result.outputs.data, want, atol=2e-5)
    every, = llm.encode(prompts[1], pooling_task="token_classify", use_tqdm=False)
    # The model's STEP pooling applies to token tasks: the same rows.
    np.testing.assert_allclose(every.outputs.data, _softmax(logits(prompts[1]))[
        np.asarray(prompts[1]) == STEP_TAG], atol=2e-5)
    from qwenjax.pooling import PoolingParams

    every, = llm.encode(prompts[1], PoolingParams(step_tag_id=prompts[1][0]),
                        pooling_task="token_classify", use_tqdm=False)
    np.testing.assert_allclose(every.outputs.data, _softmax(logits(prompts[1]))[
        np.asarray(prompts[1]) == prompts[1][0]], atol=2e-5)
    raw, = llm.encode(prompts[1], PoolingParams(use_activation=False), pooling_task="reward",
                      use_tqdm=False)
    np.testing.assert_allclose(raw.outputs.data, logits(prompts[1])[np.asarray(prompts[1]) == STEP_TAG],
                               atol=2e-5)
    with pytest.raises(ValueError, match="task 'classify' needs"):
        llm.classify([prompts[0]], use_tqdm=False)
    with pytest.raises(ValueError, match="process_reward model .* ask it to reward"):
        llm.generate([prompts[0]])


def test_token_classify_on_outcome_models(classifier, reward_model):
    import torch

    from qwenjax import LLM

    prompt = _steps(30, 9)
    directory, model = classifier
    llm = LLM(str(directory), max_model_len=128, max_num_seqs=4, prefill_chunk=16,
              max_num_batched_tokens=32, warm_up=False, progress=False)
    every, = llm.encode(prompt, pooling_task="token_classify", use_tqdm=False)
    with torch.no_grad():
        hidden = model.model(torch.tensor([prompt])).last_hidden_state
        want = model.score(hidden).softmax(-1)[0].numpy()  # the head at every position
    np.testing.assert_allclose(every.outputs.data, want, atol=2e-5)
    llm = LLM(str(reward_model[0]), max_model_len=128, max_num_seqs=4, prefill_chunk=16,
              max_num_batched_tokens=32, warm_up=False, progress=False)
    every, = llm.encode(prompt, pooling_task="token_classify", use_tqdm=False)
    rewards = np.asarray(every.outputs.data)
    assert rewards.shape == (30, 1)  # raw rewards, the last one the outcome reward
    np.testing.assert_allclose(rewards[-1], reward_model[1](prompt), atol=2e-5)
    np.testing.assert_allclose(rewards[10], reward_model[1](prompt[:11]), atol=2e-5)


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, 240, n).tolist() for n in (5, 23, 70, 1)]


@pytest.mark.parametrize("tp", [1, 2])
def test_classify_matches_transformers(classifier, tp):
    import torch

    from qwenjax import LLM

    directory, model = classifier
    llm = LLM(str(directory), tp=tp, max_model_len=128, max_num_seqs=4, prefill_chunk=16,
              max_num_batched_tokens=32, warm_up=False, progress=False)
    assert llm.labels == ("negative", "neutral", "positive")
    prompts = _prompts()
    results = llm.classify(prompts, use_tqdm=False)
    for ids, result in zip(prompts, results):
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits.softmax(-1)[0].numpy()
        assert result.outputs.num_classes == 3 and result.prompt_token_ids == ids
        np.testing.assert_allclose(result.outputs.probs, want, atol=2e-5)
    # vLLM's pooling_params (use_activation=False: the head's raw logits) and
    # truncate_prompt_tokens (each prompt's last k tokens).
    raw, = llm.classify([prompts[2]], pooling_params=PoolingParams(use_activation=False),
                        use_tqdm=False)
    cut, = llm.classify([prompts[2]], truncate_prompt_tokens=8, use_tqdm=False)
    with torch.no_grad():
        logits = model(torch.tensor([prompts[2]])).logits[0].numpy()
        want = model(torch.tensor([prompts[2][-8:]])).logits.softmax(-1)[0].numpy()
    np.testing.assert_allclose(raw.outputs.probs, logits, atol=2e-5)
    assert cut.prompt_token_ids == prompts[2][-8:] and cut.finished
    np.testing.assert_allclose(cut.outputs.probs, want, atol=2e-5)
    with pytest.raises(ValueError, match="dimensions applies to embeddings, not to task 'classify'"):
        llm.classify([prompts[0]], pooling_params=PoolingParams(dimensions=4), use_tqdm=False)
    # The backbone's hidden state is there too (embedding requests), and generation is refused.
    assert len(llm.embed([prompts[0]], use_tqdm=False)[0].outputs.embedding) == 64
    with pytest.raises(ValueError, match="classify model .* does not generate"):
        llm.generate([prompts[0]])
    with pytest.raises(ValueError, match="task 'reward' needs a checkpoint with a reward head"):
        llm.reward([prompts[0]], use_tqdm=False)
    if tp == 1:  # AsyncLLM: the same probabilities
        import asyncio

        from qwenjax import AsyncLLM

        served = AsyncLLM(llm.lm, max_model_len=128, max_num_seqs=4, prefill_chunk=16,
                          max_num_batched_tokens=32, warm_up=False, progress=False)
        try:
            result = asyncio.run(served.classify(prompts[1]))
        finally:
            served.shutdown()
        np.testing.assert_allclose(result.outputs.probs, results[1].outputs.probs, atol=1e-6)


def test_reward_matches_transformers(reward_model):
    from qwenjax import LLM

    directory, reward = reward_model
    llm = LLM(str(directory), max_model_len=128, max_num_seqs=4, prefill_chunk=16,
              max_num_batched_tokens=32, warm_up=False, progress=False)
    prompts = _prompts()
    for ids, result in zip(prompts, llm.reward(prompts, use_tqdm=False)):
        np.testing.assert_allclose(result.outputs.data, reward(ids), atol=2e-5)
    with pytest.raises(ValueError, match="task 'classify' needs"):
        llm.classify([prompts[0]], use_tqdm=False)
    with pytest.raises(ValueError, match="sleep level 2 drops the weights"):
        llm.sleep(level=2)
    with pytest.raises(ValueError, match="new weights for a classification or reward model"):
        llm.update_weights(directory)

    # AsyncLLM: the same rewards, as concurrent requests on its engine thread.
    import asyncio

    from qwenjax import AsyncLLM

    served = AsyncLLM(llm.lm, max_model_len=128, max_num_seqs=4, prefill_chunk=16,
                      max_num_batched_tokens=32, warm_up=False, progress=False)
    try:
        async def all_rewards():
            return await asyncio.gather(*(served.reward(ids) for ids in prompts))

        for ids, result in zip(prompts, asyncio.run(all_rewards())):
            np.testing.assert_allclose(result.outputs.data, reward(ids), atol=2e-5)
    finally:
        served.shutdown()


def test_pooling_params_name_bad_tasks():
    with pytest.raises(ValueError, match="task must be one of embed, classify, reward"):
        PoolingParams(task="score")
    with pytest.raises(ValueError, match="dimensions applies to embeddings"):
        PoolingParams(task="classify", dimensions=4)
    with pytest.raises(ValueError, match="no score head"):
        PoolingParams(task="reward").check(64, None)
    probs = PoolingParams(task="classify").apply(np.array([9.0, 9.0, 0.0, np.log(3.0)]), 2)
    np.testing.assert_allclose(probs, [0.25, 0.75])
    assert PoolingParams(task="reward").apply(np.array([1.0, 2.0, -0.5]), 2) == [-0.5]


def test_a_score_head_checkpoint_is_not_converted(classifier, tmp_path):
    from qwenjax.orbax_checkpoint import convert_to_orbax

    with pytest.raises(ValueError, match="a classify checkpoint .* serve the HF directory"):
        convert_to_orbax(classifier[0], tmp_path / "out", tp=1, dtype="float32", progress=False)


def test_http_classify_and_pooling(classifier, reward_model, server_loop):
    """vLLM's /classify and /pooling, SGLang's /classify form, and generation refused, on a
    classification and a reward checkpoint served over HTTP."""
    import grpc

    from qwenjax.engine.async_engine import EngineThread
    from qwenjax.engine.engine import Engine, EngineConfig
    from qwenjax.loading import load_model
    from qwenjax_proto.v1 import inference_pb2 as pb
    from qwenjax_proto.v1 import inference_pb2_grpc as pb_grpc
    from server_harness import Servers, http

    prompts = _prompts()[:3]
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, prefill_chunk=16,
                          max_prefill_seqs=2, max_model_len=128, num_pages=64)
    answers = {}
    for kind, directory in (("classify", classifier[0]), ("reward", reward_model[0])):
        thread = EngineThread(Engine(load_model(directory, dtype="float32"), config, warm_up=False))
        servers = Servers(server_loop, thread, port=0, metrics_port=None, http_port=0)
        try:
            server = servers.start()
            base = f"http://127.0.0.1:{server.http_port}"
            status, pooled = http(base, "/pooling", {"input": prompts})
            assert status == 200, pooled
            answers[kind] = [d["data"] for d in pooled["data"]]
            assert pooled["usage"]["prompt_tokens"] == sum(map(len, prompts))
            status, sglang = http(base, "/classify", {"input_ids": prompts})
            assert status == 200  # (a prefix-cache hit this time: equal up to float rounding)
            np.testing.assert_allclose([r["embedding"] for r in sglang], answers[kind], atol=1e-6)
            with grpc.insecure_channel(server.address) as channel:  # gRPC Embed with a task
                response = pb_grpc.InferenceStub(channel).Embed(pb.EmbedRequest(
                    inputs=[pb.EmbedInput(token_ids=pb.TokenIds(ids=p)) for p in prompts],
                    task=kind), timeout=60)
            np.testing.assert_allclose([list(e.values) for e in response.embeddings],
                                       answers[kind], atol=1e-5)
            status, refused = http(base, "/v1/completions", {"prompt": prompts[0], "max_tokens": 2})
            assert status == 400 and "does not generate" in refused["error"]["message"]
            status, refused = http(base, "/score", {"text_1": "a", "text_2": "b"})
            assert status == 400 and "cross-encoder" in refused["error"]["message"]
            status, classified = http(base, "/classify", {"input": prompts})
            if kind == "classify":
                # vLLM's /pooling with a task: a list per token; gRPC Embed's rows alike.
                status, tokens = http(base, "/pooling", {"input": prompts[:2], "task": "token_classify"})
                assert status == 200, tokens
                assert [len(d["data"]) for d in tokens["data"]] == [len(p) for p in prompts[:2]]
                np.testing.assert_allclose(tokens["data"][0]["data"][-1], answers[kind][0], atol=1e-5)
                with grpc.insecure_channel(server.address) as channel:
                    response = pb_grpc.InferenceStub(channel).Embed(pb.EmbedRequest(
                        inputs=[pb.EmbedInput(token_ids=pb.TokenIds(ids=prompts[0]))],
                        task="token_classify"), timeout=60)
                np.testing.assert_allclose([list(t.values) for t in response.embeddings[0].tokens],
                                           tokens["data"][0]["data"], atol=1e-5)
                status, refused = http(base, "/pooling", {"input": prompts[:1], "task": "mean"})
                assert status == 400 and "task must be one of" in refused["error"]["message"]
                status, classified = http(base, "/classify", {"input": prompts})
                assert status == 200
                np.testing.assert_allclose([d["probs"] for d in classified["data"]], answers[kind],
                                           atol=1e-6)
                assert all(d["label"] == LABELS[int(np.argmax(d["probs"]))] and d["num_classes"] == 3
                           for d in classified["data"])
            else:
                assert status == 400 and "needs a checkpoint with a classify head" in \
                    classified["error"]["message"]
        finally:
            servers.stop_all()
            thread.shutdown()
    for ids, probs in zip(prompts, answers["classify"]):
        assert abs(sum(probs) - 1) < 1e-6 and len(probs) == 3
    for ids, reward in zip(prompts, answers["reward"]):
        np.testing.assert_allclose(reward, reward_model[1](ids), atol=2e-5)
