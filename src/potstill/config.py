"""Typed, validated run configuration.

Precedence, each overriding the one before:
  1. defaults in the classes below
  2. the YAML file                          (``potstill distill run.yaml``)
  3. environment variables                  (``POTSTILL_TRAIN__LR=3e-4``: section__key)
  4. dotted command-line overrides          (``train.lr=3e-4 loss.logits.temperature=2``)

Every mistake becomes one :class:`~potstill.errors.ConfigError` line that says which key,
where it came from (file, variable or override), what is wrong, and, for an unknown
key, the closest valid one.

Fields that name a model or dataset also accept objects from Python (an ``nn.Module``, a
tokenizer, a ``datasets.Dataset``, a list of strings or conversations).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

# Bounds that keep numbers inside what the libraries below accept: counts of steps, examples or
# tokens fit a signed 32-bit int (torch and numpy index with them), seeds an unsigned one
# (numpy's global seed), and floats are finite (``1e400`` parses to inf).
MAX_COUNT = 2**31 - 1
MAX_SEED = 2**32 - 1
MAX_TOKENS = 2**24  # tokens per sequence: beyond any model's context

SECTIONS = ("teacher", "student", "data", "loss", "onpolicy", "train", "eval", "output", "cache", "generate")
ENV_PREFIX = "POTSTILL_"


class _Section(BaseModel):
    # extra="forbid" turns a typo into an error; arbitrary types let objects through.
    # allow_inf_nan=False: an overflowing float (train.lr=1e400 is inf) is an error, not a silent inf.
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_assignment=True,
                              allow_inf_nan=False)


# A model, tokenizer or dataset given either by name/path or as an object from Python.
NameOrObject = Union[str, Any]


class ServerConfig(_Section):
    """A teacher served by vLLM (OpenAI-compatible API): the run sends token ids and reads the
    top-k prompt log-probs of every position; no teacher model loads in this process."""

    url: str = Field(..., min_length=1, description="the server's base URL, e.g. http://gpu-node:8000")
    model: str | None = Field(None, description="the served model name; default: the only model the server serves")
    top_k: int = Field(20, ge=1, le=4096, description="teacher log-probs per position (vLLM --max-logprobs must allow it)")
    timeout_s: float = Field(300.0, gt=0, le=86400, description="seconds one request may take before it is retried")
    retries: int = Field(5, ge=0, le=100, description="retries of a failed request (backoff doubles, from backoff_s)")
    backoff_s: float = Field(1.0, ge=0, le=3600, description="wait before the first retry")
    max_concurrency: int = Field(8, ge=1, le=1024, description="requests in flight at once (one per sequence)")
    lookahead: int = Field(1, ge=0, le=64, description="optimizer steps whose teacher signal is asked for ahead "
                                                      "of time, while the student trains (0: no overlap)")
    api_key_env: str | None = Field(None, description="name of the environment variable holding the API key")
    check_tokenizer: bool = Field(True, description="before the first step, check the server tokenizes like "
                                                    "this run (vLLM's /tokenize)")


# transformers' attention kernels (``attn_implementation``); flash_attention_2/3 need their package and CUDA.
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"]


class TeacherConfig(_Section):
    """The frozen model that teaches. Loaded with ``AutoModelForCausalLM``, or served (``server``)."""

    name_or_path: NameOrObject | None = Field(None, description="hub id, local folder, or an nn.Module")
    revision: str | None = Field(None, description="hub branch, tag or commit")
    tokenizer: NameOrObject | None = Field(None, description="defaults to name_or_path")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 when training in bf16, else float32")
    trust_remote_code: bool = Field(False, description="allow model code from the hub repository")
    quantization: Literal["none", "int8", "int4"] = Field(
        "none", description="load the teacher with int8 / int4 weights (output head kept): less memory")
    quantization_backend: Literal["auto", "torchao", "bitsandbytes"] = Field(
        "auto", description="auto: torchao (CPU and CUDA); bitsandbytes: CUDA only, needs the package")
    cache: str | None = Field(
        None, description="train from a teacher cache written by potstill cache-teacher: no teacher is loaded")
    server: ServerConfig | None = Field(
        None, description="a teacher served by vLLM: no teacher is loaded (name_or_path, if given, names its tokenizer)")
    attn_implementation: AttnImplementation | None = Field(
        None, description="sdpa | eager | flash_attention_2 | ...: set on the loaded teacher; default: transformers'")

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherConfig":
        if self.server is not None and self.cache is not None:
            raise ValueError("give teacher.server or teacher.cache, not both: a run reads its teacher from one place")
        if self.server is not None and self.quantization != "none":
            raise ValueError("teacher.quantization applies to a teacher loaded in this process, not to teacher.server "
                             "(quantize it in the server: vLLM --quantization)")
        return self


# The fields of PruneConfig that name a target (the rest say how to measure and round).
PRUNE_TARGETS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_layers",
                 "params")


class PruneConfig(_Section):
    """Minitron-style pruning of the teacher: the channels, heads and blocks that matter least on a
    few calibration batches of the run's data are removed (arXiv 2407.14679). Give the target shape,
    or a parameter count (then the hidden and MLP widths shrink by one ratio), or both (the shape's
    fields are kept, the rest fitted to the count)."""

    hidden_size: int | None = Field(None, ge=1, le=MAX_COUNT, description="target hidden size (embedding channels)")
    intermediate_size: int | None = Field(None, ge=1, le=MAX_COUNT, description="target MLP width")
    num_attention_heads: int | None = Field(None, ge=1, le=MAX_COUNT, description="target query heads")
    num_key_value_heads: int | None = Field(None, ge=1, le=MAX_COUNT, description="target key/value heads (GQA groups)")
    num_layers: int | None = Field(None, ge=1, le=MAX_COUNT, description="target decoder blocks (depth pruning)")
    params: int | None = Field(None, ge=1, description="target parameter count (e.g. 20000000)")
    calibration_batches: int = Field(8, ge=1, le=MAX_COUNT, description="batches of train data for the importance")
    layer_importance: Literal["cosine", "loss"] = Field(
        "cosine", description="depth: 1 - cos(block input, output) (ShortGPT) | the LM loss rise without the block")
    round_to: int = Field(8, ge=1, le=4096, description="fitted widths are multiples of this")

    @model_validator(mode="after")
    def _some_target(self) -> "PruneConfig":
        if all(getattr(self, k) is None for k in PRUNE_TARGETS):
            raise ValueError("give a target: params, or one or more of " + ", ".join(PRUNE_TARGETS[:-1]))
        return self


class FromTeacherConfig(_Section):
    """Initialize the student from the teacher: a subset of its decoder layers, or pruned."""

    layers: list[int] | None = Field(None, description="teacher layer indices to keep, in order")
    every: int | None = Field(None, ge=1, le=MAX_COUNT, description="keep layers 0, every, 2*every, ...")
    prune: PruneConfig | None = Field(None, description="prune heads, channels and blocks by importance")

    @model_validator(mode="after")
    def _one_rule(self) -> "FromTeacherConfig":
        if sum(x is not None for x in (self.layers, self.every, self.prune)) != 1:
            raise ValueError("give exactly one of 'layers' (a list of teacher layer indices), 'every' (an integer) "
                             "or 'prune' (a target shape or parameter count)")
        if self.layers is not None and not self.layers:
            raise ValueError("'layers' is empty: keep at least one teacher layer")
        return self


class LoraConfig(_Section):
    """Train low-rank adapters (PEFT LoRA) instead of the whole student; the run writes the
    adapter and the merged student."""

    r: int = Field(16, ge=1, le=65536, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling: alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: Union[list[str], str] = Field(
        "all-linear", description="module names (or a regex) that get adapters; all-linear: every linear layer but the head")


class EmbeddingsFromTeacher(_Section):
    """The student's input embeddings and output head taken from the teacher's."""

    mode: Literal["copy", "project"] = Field(
        "copy", description="copy: equal widths; project: the teacher's rows on their top principal directions (PCA)")
    freeze: bool = Field(False, description="keep them frozen during training")


class StudentConfig(_Section):
    """The model that learns: pretrained, built from a config, or cut from the teacher."""

    name_or_path: NameOrObject | None = Field(None, description="hub id, local folder, or an nn.Module")
    revision: str | None = Field(None, description="hub branch, tag or commit")
    tokenizer: NameOrObject | None = Field(None, description="defaults to the student's, else the teacher's")
    config: dict[str, Any] | None = Field(
        None, description="model config fields for a randomly initialized student (model_type defaults to the teacher's)")
    from_teacher: FromTeacherConfig | None = Field(None, description="default when no student section is given: every: 2")
    trust_remote_code: bool = Field(False, description="allow model code from the hub repository")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, ~30% slower")
    bitnet: bool = Field(False, description="BitNet b1.58: ternary weights, 8-bit activations in every linear layer")
    bitnet_head: bool = Field(False, description="with bitnet: make the output head ternary too")
    bitnet_embeddings: bool = Field(False, description="with bitnet: make the input embeddings ternary too")
    lora: LoraConfig | None = Field(None, description="train LoRA adapters only (needs the peft package)")
    freeze: list[str] = Field(default_factory=list, description="regexes: parameters whose names match stay frozen")
    train_only: list[str] = Field(default_factory=list, description="regexes: only parameters whose names match train")
    spectrum: str | None = Field(None, description="a Spectrum YAML (unfrozen_parameters: regexes): only those train")
    embeddings_from_teacher: EmbeddingsFromTeacher | None = Field(
        None, description="initialize the input embeddings and output head from the teacher's")
    attn_implementation: AttnImplementation | None = Field(
        None, description="sdpa | eager | flash_attention_2 | ...: set on the student however it was made")

    @model_validator(mode="after")
    def _one_source(self) -> "StudentConfig":
        given = [k for k in ("name_or_path", "config", "from_teacher") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of student.name_or_path, student.config or student.from_teacher"
                + (f" (got {', '.join(given)})" if given else ""))
        if (self.bitnet_head or self.bitnet_embeddings) and not self.bitnet:
            raise ValueError("student.bitnet_head / bitnet_embeddings need student.bitnet=true")
        if self.train_only and self.spectrum:
            raise ValueError("give student.train_only or student.spectrum, not both: each names what trains")
        if self.lora is not None and self.bitnet:
            raise ValueError("student.lora with student.bitnet is not supported: adapters on ternary layers")
        if self.lora is not None and (self.train_only or self.spectrum):
            raise ValueError("student.lora trains the adapters only: student.train_only / spectrum do not apply")
        return self


class DataConfig(_Section):
    """Where the training text comes from and how it becomes token blocks."""

    source: Any = Field(None, description="hub dataset name, local file/glob/folder, list of them, or an object")
    config_name: str | None = Field(None, description="hub dataset configuration name")
    split: str = Field("train", description="hub dataset split")
    revision: str | None = Field(None, description="hub dataset revision")
    format: Literal["auto", "text", "messages", "sharegpt", "prompt_completion"] = Field(
        "auto", description="auto: detected from the columns")
    text_field: str = Field("text", description="column of plain text")
    messages_field: str = Field("messages", description="column of OpenAI-style role/content lists")
    conversations_field: str = Field("conversations", description="column of ShareGPT from/value lists")
    prompt_field: str = Field("prompt", description="prompt column (prompt_completion format)")
    completion_field: str = Field("completion", description="completion column; loss only there")
    chat_template: str | None = Field(None, description="Jinja chat template; default: the tokenizer's")
    assistant_only_loss: bool = Field(True, description="chat data: loss only on assistant tokens")
    max_length: int = Field(1024, ge=8, le=MAX_TOKENS, description="tokens per training sequence")
    packing: bool = Field(True, description="concatenate texts with EOS and cut into full blocks; else pad")
    validation_source: Any = Field(None, description="a separate validation dataset (same forms as source)")
    validation_split: str | None = Field(None, description="a split of the same hub dataset, e.g. 'validation'")
    validation_fraction: float = Field(0.05, ge=0.0, lt=0.5, description="else hold out this fraction of train")
    max_examples: int | None = Field(None, ge=1, description="use only the first N source rows")
    cache_dir: str | None = Field(None, description="tokenized-data cache; default ~/.cache/potstill/data")


DIVERGENCE_NAMES = ("fkl", "rkl", "jsd", "tvd", "skew_fkl", "skew_rkl", "mse", "token_rkl", "soft_ce", "soft_mse",
                    "cos", "logsum", "cakld", "akl", "hinge", "logistic_ranking", "sinkhorn")
DIVERGENCE_LITERAL = Literal["fkl", "rkl", "jsd", "tvd", "skew_fkl", "skew_rkl", "mse", "token_rkl", "soft_ce",
                             "soft_mse", "cos", "logsum", "cakld", "akl", "hinge", "logistic_ranking", "sinkhorn"]


class LogitLossConfig(_Section):
    """Match the student's next-token distribution to the teacher's."""

    weight: float = Field(1.0, ge=0.0, description="weight of the logit term")
    divergence: DIVERGENCE_LITERAL = Field(
        "fkl", description="fkl | rkl | jsd | tvd | skew_fkl | skew_rkl | mse | token_rkl (reverse KL estimated "
                           "on the label token: for on-policy samples) | soft_ce | soft_mse | cos | logsum | cakld | "
                           "akl | hinge | logistic_ranking | sinkhorn (see docs/objectives.md)")
    temperature: float = Field(1.0, gt=0.0, description="divides both models' logits before softmax")
    t2_scaling: bool = Field(False, description="multiply the term by temperature**2 (Hinton et al.)")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="jsd only: 0 = forward KL, 1 = reverse KL")
    alpha: float = Field(0.1, ge=0.0, le=1.0, description="skew_fkl / skew_rkl only: skew mixing weight")
    cakld_confidence: float | None = Field(
        None, ge=0.0, le=1.0, description="cakld only: the teacher's mean probability of the data's tokens, the weight "
                                          "of reverse KL (1 - it weighs forward KL); default: measured on the first "
                                          "cakld_batches train batches and recorded")
    cakld_batches: int = Field(8, ge=1, le=MAX_COUNT, description="cakld only: train batches the confidence is measured on")
    akl_head_mass: float = Field(0.5, gt=0.0, le=1.0, description="akl only: teacher mass of the head (its top tokens "
                                                                    "until this cumulative probability)")
    rank_k: int = Field(16, ge=2, le=4096, description="hinge / logistic_ranking only: the teacher's top tokens whose "
                                                        "order the student learns (a top-k cache ranks its own k)")
    hinge_margin: float | None = Field(None, ge=0.0, description="hinge only: fixed margin between the student's "
                                                                  "probabilities; default: the teacher's own gap")
    logsum_power: float = Field(4.0, gt=0.0, le=16.0, description="logsum only: the power of |z_s - z_t| inside the log")
    sinkhorn_epsilon: float = Field(0.1, gt=0.0, description="sinkhorn only: entropic regularization (> 0; smaller is closer "
                                                      "to the exact transport and slower to converge)")
    sinkhorn_iterations: int = Field(20, ge=1, le=1000, description="sinkhorn only: Sinkhorn normalization rounds")
    sinkhorn_rows: int = Field(64, ge=2, le=4096, description="sinkhorn only: tokens per transport problem (rows "
                                                               "of the cost matrix; memory and time grow as its square)")
    missing_mass: Literal["rest", "renormalize"] = Field(
        "rest", description="teacher.cache top-k: mass outside the k ids as one extra 'rest' outcome, or renormalize "
                            "the teacher's top-k (fkl only)")

    def divergence_params(self, confidence: float | None = None) -> dict:
        """The keyword parameters of ``self.divergence`` for :mod:`potstill.losses` (beyond beta and
        alpha). ``confidence``: the measured CAKLD confidence when ``cakld_confidence`` is unset."""
        name = self.divergence
        if name == "cakld":
            value = self.cakld_confidence if self.cakld_confidence is not None else confidence
            if value is None:
                raise ValueError("cakld needs the teacher's confidence: set loss.logits.cakld_confidence or let the "
                                 "run measure it")
            return {"cakld_confidence": float(value)}
        if name == "akl":
            return {"akl_head_mass": self.akl_head_mass}
        if name == "hinge":
            return {"rank_k": self.rank_k, "hinge_margin": self.hinge_margin}
        if name == "logistic_ranking":
            return {"rank_k": self.rank_k}
        if name == "logsum":
            return {"logsum_power": self.logsum_power}
        if name == "sinkhorn":
            return {"sinkhorn_epsilon": self.sinkhorn_epsilon, "sinkhorn_iterations": self.sinkhorn_iterations,
                    "sinkhorn_rows": self.sinkhorn_rows}
        return {}


class CrossEntropyLossConfig(_Section):
    """Ordinary next-token cross-entropy on the data's labels."""

    weight: float = Field(0.0, ge=0.0, description="weight of hard-label cross-entropy")


LAYER_MAPPINGS = Literal["last", "last_k", "all", "uniform", "uniform_consecutive", "uniform_last", "pairs"]


class _LayerMapping(_Section):
    """Which teacher layer teaches which student layer (see potstill.features.layer_map); layers count from 1."""

    k: int | None = Field(None, ge=1, le=MAX_COUNT, description="mapping last_k: how many final layers")
    pairs: list[tuple[int, int]] | None = Field(
        None, description="mapping pairs: [[teacher_layer, student_layer], ...]; layer i = output of decoder layer i")

    @model_validator(mode="after")
    def _mapping_args(self):
        if self.mapping == "last_k" and self.k is None:
            raise ValueError("mapping last_k needs k (how many final layers to pair)")
        if self.mapping == "pairs" and not self.pairs:
            raise ValueError("mapping pairs needs pairs: [[teacher_layer, student_layer], ...]")
        if self.pairs and self.mapping != "pairs":
            raise ValueError(f"pairs are given but mapping is {self.mapping}: set mapping: pairs to use them")
        return self


class HiddenLossConfig(_LayerMapping):
    """Match the student's intermediate hidden states to the teacher's (any widths, any depths)."""

    weight: float = Field(0.0, ge=0.0, description="weight of the hidden-state term (mean over layer pairs)")
    mapping: LAYER_MAPPINGS = Field(
        "uniform_last", description="last | last_k | all | uniform | uniform_consecutive | uniform_last | pairs")
    loss: Literal["mse", "nmse", "cosine"] = Field("cosine", description="per token: mse | nmse (relative) | cosine (1 - cos)")
    layer_norm: bool = Field(False, description="same as preprocess: layernorm (kept for older configs)")
    preprocess: Literal["none", "layernorm", "standardize", "whitening"] = Field(
        "none", description="before the loss, both sides: none | layernorm (each token's vector, no affine) | "
                            "standardize (each feature by the teacher's mean and std) | whitening (ZCA fitted on the "
                            "teacher's activations); the statistics come from the first fit_batches train batches")
    fit_batches: int = Field(8, ge=1, le=MAX_COUNT, description="standardize / whitening: train batches the teacher's "
                                                                 "statistics are fitted on")

    @model_validator(mode="after")
    def _one_preprocess(self):
        if self.layer_norm and self.preprocess not in ("none", "layernorm"):
            raise ValueError(f"layer_norm: true and preprocess: {self.preprocess} disagree: set preprocess alone")
        if self.layer_norm and self.preprocess != "layernorm":  # (assignment validates the model again)
            self.preprocess = "layernorm"
        return self
    projector: Literal["auto", "identity", "linear", "mlp"] = Field(
        "auto", description="student width -> teacher width, one per pair; auto: identity if equal, else linear")
    projector_init: Literal["default", "orthogonal"] = Field("default", description="initialization of projector weights")


class AttentionLossConfig(_LayerMapping):
    """MiniLMv2 attention relations: KL between query-query, key-key and value-value relations."""

    weight: float = Field(0.0, ge=0.0, description="weight of the attention-relation term (mean over layer pairs)")
    mapping: LAYER_MAPPINGS = Field("last", description="as loss.hidden.mapping; MiniLMv2 uses the last layer")
    relation_heads: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="relation heads (must divide every q/k/v width); default: the student's attention heads")


class CrossTokenizerConfig(_Section):
    """The logit term when teacher and student tokenizers differ (see potstill.losses.aligned):
    both tokenize the same text; a student token and a teacher token that start at the same
    character are an aligned pair. A pair that also ends at the same character and spells the
    same bytes is *exact*: the two distributions are compared on the ids both vocabularies share
    (plus one bucket for the rest) with loss.logits.divergence. Every other pair gets the ULD
    loss (Wasserstein-1 between the sorted probabilities)."""

    mode: Literal["hybrid", "exact", "uld"] = Field(
        "hybrid", description="hybrid: exact pairs by divergence, the other aligned pairs by ULD; exact: exact pairs "
                              "only; uld: ULD on every aligned pair")
    exact_weight: float = Field(1.0, ge=0.0, description="weight of the exact pairs' divergence")
    uld_weight: float = Field(1.0, ge=0.0, description="weight of the ULD distance")
    top_k: int = Field(64, ge=1, le=65536, description="teacher log-probs kept per aligned position (the rest is one "
                                                       "bucket); a cache captured with offsets sets it")


class LossConfig(_Section):
    logits: LogitLossConfig = Field(default_factory=LogitLossConfig)
    cross_tokenizer: CrossTokenizerConfig = Field(default_factory=CrossTokenizerConfig)
    ce: CrossEntropyLossConfig = Field(default_factory=CrossEntropyLossConfig)
    hidden: HiddenLossConfig = Field(default_factory=HiddenLossConfig)
    attention: AttentionLossConfig = Field(default_factory=AttentionLossConfig)
    path: Literal["auto", "chunked", "plain"] = Field(
        "auto", description="chunked: logits a chunk of tokens at a time, never B x T x V (auto: where the models allow)")
    chunk_size: int | None = Field(None, ge=1, le=MAX_COUNT, description="tokens per chunk on the chunked path; default: from memory_budget_mb")
    memory_budget_mb: float = Field(512.0,  # = losses.chunked.DEFAULT_MEMORY_BUDGET_MB
                                      gt=0, description="memory for one chunk's logits on the chunked path")
    balance: Literal["fixed", "gradnorm", "pcgrad"] = Field(
        "fixed", description="how the logit, hidden and attention terms combine: fixed weights | gradnorm (weights "
                             "adapted so each term's gradient norm keeps its share, GradNorm) | pcgrad (conflicting "
                             "gradients projected apart, PCGrad); the last two cost one backward pass per term")
    gradnorm_alpha: float = Field(1.5, ge=0.0, le=10.0, description="gradnorm only: how strongly a term that trains "
                                                                     "slower gets a larger gradient share")
    gradnorm_rate: float = Field(0.1, gt=0.0, le=10.0, description="gradnorm only: step size of the log-weights")
    log_term_gradients: bool = Field(False, description="fixed weights too: log each term's gradient norm and the "
                                                         "cosine between the logit and feature gradients (one "
                                                         "backward pass per term)")

    @model_validator(mode="after")
    def _something_to_learn(self) -> "LossConfig":
        if self.logits.weight == 0 and self.ce.weight == 0 and self.hidden.weight == 0 and self.attention.weight == 0:
            raise ValueError("every loss weight is 0: set loss.logits.weight, loss.ce.weight, loss.hidden.weight "
                             "or loss.attention.weight above 0")
        return self

    @model_validator(mode="after")
    def _balance_terms(self) -> "LossConfig":
        if self.balance != "fixed" and len(self.balanced_terms) < 2:
            raise ValueError(f"loss.balance={self.balance} needs two terms or more among loss.logits (with loss.ce), "
                             "loss.hidden and loss.attention; this run has "
                             f"{', '.join(self.balanced_terms) or 'none'}: use loss.balance=fixed")
        return self

    @property
    def balanced_terms(self) -> list[str]:
        """The terms a balancer weighs: 'logits' (the logit divergence with hard-label CE), 'hidden', 'attention'."""
        terms = []
        if self.logits.weight > 0 or self.ce.weight > 0:
            terms.append("logits")
        if self.hidden.weight > 0:
            terms.append("hidden")
        if self.attention.weight > 0:
            terms.append("attention")
        return terms

    @property
    def uses_features(self) -> bool:
        return self.hidden.weight > 0 or self.attention.weight > 0


class OnPolicyConfig(_Section):
    """Where the completions come from (GKD, Agarwal et al. 2024): for a fraction ``lmbda`` of the
    sequences the current student samples a completion to the data's prompt and the teacher scores
    it; the rest keep the data's completion, or the teacher's own sample (``seq_kd``)."""

    lmbda: float = Field(0.0, ge=0.0, le=1.0, description="fraction of sequences whose completion the current "
                                                          "student samples (0: off-policy, the data's completions)")
    seq_kd: bool = Field(False, description="the other sequences get a completion sampled from the teacher "
                                            "(GKD's seq_kd) instead of the data's")
    per: Literal["step", "sequence"] = Field(
        "step", description="draw on-policy or not once per optimizer step (as TRL's GKD) or per sequence")
    max_new_tokens: int = Field(128, ge=1, le=MAX_TOKENS, description="tokens per sampled completion at most")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="sampling temperature; 0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int | None = Field(None, ge=1, le=MAX_COUNT, description="sample among the k most likely tokens")
    num_completions: int = Field(1, ge=1, le=1024, description="completions per prompt: a micro-batch of B prompts "
                                                             "trains on B x num_completions sequences")

    @property
    def enabled(self) -> bool:
        """Whether any completion is sampled (by the student or, with seq_kd, the teacher)."""
        return self.lmbda > 0 or self.seq_kd


class FSDPConfig(_Section):
    """How ``train.strategy=fsdp`` shards the student and a local teacher (FSDP2, ``fully_shard``)."""

    reshard_after_forward: bool = Field(True, description="free each student layer's gathered weights after its forward "
                                                          "(gathered again for backward): less memory, more communication")
    cpu_offload: bool = Field(False, description="keep the sharded student parameters, gradients and optimizer state in "
                                                 "CPU memory (CUDA only; the step runs on the CPU's copy)")
    mixed_precision: Union[bool, Literal["auto"]] = Field(
        "auto", description="gather and compute in bf16, reduce gradients in fp32, fp32 master weights (FSDP's policy) "
                            "instead of autocast; auto: when train.precision is bf16 (measured 1.6x faster here)")


class TrainConfig(_Section):
    max_steps: int | None = Field(None, ge=1, le=MAX_COUNT, description="optimizer steps; default: from epochs")
    epochs: float = Field(1.0, gt=0.0, le=1e6, description="used when max_steps is not given")
    batch_size: int = Field(8, ge=1, le=MAX_COUNT, description="sequences per micro-batch, per process")
    grad_accum: int = Field(1, ge=1, le=MAX_COUNT, description="micro-batches per optimizer step")
    lr: float = Field(1e-4, gt=0.0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (not on norms and biases)")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    adam_eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon")
    scheduler: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                       "constant_with_warmup", "inverse_sqrt", "warmup_stable_decay"] = Field(
        "cosine", description="learning-rate schedule (transformers.get_scheduler)")
    warmup_steps: int = Field(0, ge=0, le=MAX_COUNT, description="linear warmup steps")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="used when warmup_steps is 0")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="null: no clipping")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the hardware has fast bf16 (CUDA Ampere+, CPU with AMX), else fp32")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="model init, data order, validation split")
    resume: Union[bool, str] = Field(False, description="false | auto (newest intact checkpoint in output.dir) | a checkpoint path; "
                                                   "which settings may change on resume: docs/distill.md, 'Stopping, resuming'")
    checkpoint_every: int | None = Field(500, ge=1, le=MAX_COUNT, description="steps between checkpoints; one is always written at the end")
    keep_checkpoints: int = Field(2, ge=1, le=MAX_COUNT, description="keep only the newest K checkpoints")
    log_every: int = Field(10, ge=1, le=MAX_COUNT, description="steps between metrics.jsonl / TensorBoard records")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with several processes: ddp (each holds whole models) or fsdp (student, gradients, "
                           "optimizer state and a local teacher sharded per layer over the processes)")
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig, description="options of train.strategy=fsdp")

    @model_validator(mode="after")
    def _betas_in_range(self) -> "TrainConfig":
        # torch.optim.AdamW refuses these only when the optimizer is built, after the models load.
        if not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"train.adam_betas {list(self.adam_betas)}: each beta must be in [0, 1), e.g. [0.9, 0.999]")
        return self

    @model_validator(mode="after")
    def _resume_word(self) -> "TrainConfig":
        if self.resume is True:
            self.resume = "auto"
        return self


class EvalConfig(_Section):
    every: int | None = Field(None, ge=1, le=MAX_COUNT, description="steps between evaluations; always evaluated at the end")
    max_batches: int | None = Field(None, ge=1, le=MAX_COUNT, description="cap on validation batches per evaluation")
    batch_size: int | None = Field(None, ge=1, le=MAX_COUNT, description="default: train.batch_size")
    at_start: bool = Field(True, description="also evaluate before the first step: the student-before point of "
                                             "the curves, the report and the model card")
    tasks: list[str] = Field(default_factory=list, description="lm-evaluation-harness tasks run on the student "
                                                               "at the start and the end, e.g. [hellaswag, mmlu] "
                                                               "(needs potstill[eval])")
    task_paths: list[str] = Field(default_factory=list, description="folders of local lm-eval task YAMLs "
                                                                    "(offline tasks on local data files)")
    tasks_every: int | None = Field(None, ge=1, le=MAX_COUNT, description="also run eval.tasks every N steps")
    task_limit: int | None = Field(None, ge=1, le=MAX_COUNT, description="examples per task (default: all)")
    task_fewshot: int | None = Field(None, ge=0, le=1024, description="few-shot examples (default: each task's own)")
    tasks_teacher: bool = Field(True, description="also score the teacher on eval.tasks once, for comparison")

    @model_validator(mode="after")
    def _task_names(self) -> "EvalConfig":
        for name in self.tasks:
            if not name.strip() or "," in name:
                raise ValueError(f"eval.tasks: {name!r} is not one task name: give a list, e.g. [hellaswag, mmlu]")
        if self.tasks_every is not None and not self.tasks:
            raise ValueError("eval.tasks_every is set but eval.tasks is empty: name the tasks to run")
        return self


class OutputConfig(_Section):
    dir: str = Field("runs/potstill", description="run directory: student/, checkpoints/, metrics.jsonl, ...")
    overwrite: bool = Field(False, description="start a fresh run in a folder that holds one of potstill's runs "
                                                   "(deletes only that run's files; never the run's own inputs)")
    tensorboard: bool = Field(True, description="write TensorBoard logs to <dir>/tensorboard")
    report: bool = Field(True, description="at the end: plots and report.md in <dir>/report, the model card "
                                           "<dir>/student/README.md")
    push_to_hub: str | None = Field(None, min_length=1, description="at the end, upload student/ (card included) "
                                                                    "to this Hub repository, e.g. me/tiny-student")
    hub_private: bool = Field(True, description="push_to_hub: create the repository private")


class CacheConfig(_Section):
    """What ``potstill cache-teacher`` captures (the run's teacher, data and loss temperature)."""

    dir: str = Field("runs/teacher-cache", description="cache-teacher: folder for the shards and manifest.json")
    kind: Literal["topk", "sampled"] = Field(
        "topk", description="topk: the k most likely ids and log-probs; sampled: k ids drawn from the teacher")
    k: int = Field(12, ge=1, le=2**16, description="ids stored per token (top-k size or number of samples)")
    value_bits: Literal[8, 16] = Field(8, description="topk: bits per quantized log-probability")
    offsets: bool = Field(False, description="store each teacher token's character span with its row, in the "
                                            "teacher's own tokenization: the cache then trains students with any "
                                            "tokenizer (cross-tokenizer)")
    examples_per_shard: int = Field(256, ge=1, le=MAX_COUNT, description="tokenized examples per shard file")
    batch_size: int | None = Field(None, ge=1, le=MAX_COUNT, description="teacher batch size; default: train.batch_size")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="sampled: seed of the draws (per shard)")
    overwrite: bool = Field(False, description="replace potstill's own cache of other settings (or a damaged one) "
                                                   "in cache.dir; deletes only the files a capture wrote")


class GenerateConfig(_Section):
    """What ``potstill generate`` writes: the teacher's answers to the data's prompts."""

    output: str | None = Field(None, description="generate: .jsonl or .parquet file for the teacher's answers")
    num_generations: int = Field(1, ge=1, le=MAX_COUNT, description="answers per prompt")
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature; 0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int | None = Field(None, ge=1, le=MAX_COUNT, description="sample among the k most likely tokens")
    max_new_tokens: int = Field(256, ge=1, le=MAX_TOKENS, description="tokens per answer at most")
    max_prompt_length: int = Field(1024, ge=1, le=MAX_TOKENS, description="longer prompts are skipped (and counted)")
    batch_size: int = Field(8, ge=1, le=MAX_COUNT, description="prompts per generate call")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="sampling seed (per batch)")
    chat_template: bool = Field(True, description="render prompts with the chat template when there is one")


class DistillConfig(_Section):
    """The whole run. Build it in Python or with :func:`load_config`."""

    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=lambda: StudentConfig(from_teacher={"every": 2}))
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    onpolicy: OnPolicyConfig = Field(default_factory=OnPolicyConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    stages: list[dict[str, Any]] | None = Field(
        None, description="run these in order, each a dict of (dotted) keys over this config, in "
                          "<output.dir>/stage-N, each student starting from the previous stage's")

    @model_validator(mode="after")
    def _cross_checks(self) -> "DistillConfig":
        if self.data.source is None:
            raise ValueError("data.source is required: a hub dataset name, a local file or folder, or a list")
        if self.teacher.cache is not None and self.loss.uses_features:
            raise ValueError("teacher.cache holds the teacher's logits only; loss.hidden / loss.attention need its "
                             "activations: drop teacher.cache, or set loss.hidden.weight=0 and loss.attention.weight=0")
        if self.teacher.server is not None and self.loss.uses_features:
            raise ValueError("teacher.server gives the teacher's log-probs only; loss.hidden / loss.attention need its "
                             "activations: load the teacher in this process, or set loss.hidden.weight=0 and "
                             "loss.attention.weight=0")
        served = self.teacher.server is not None or self.teacher.cache is not None
        needs_teacher = (self.loss.logits.weight > 0 and not served) or self.loss.uses_features
        if needs_teacher and self.teacher.name_or_path is None:
            raise ValueError("teacher.name_or_path is required for logit or feature distillation "
                             "(or set loss.logits.weight=0 and loss.ce.weight>0 to train on labels alone)")
        # Only a student section given here: the default (cut from the teacher) matters to distill alone,
        # and preflight refuses it there; cache-teacher and generate never build a student.
        if self.student.from_teacher is not None and self.teacher.server is not None \
                and "student" in self.model_fields_set:
            raise ValueError("student.from_teacher needs the teacher's weights, which a served teacher keeps in its "
                             "server: give student.name_or_path or student.config")
        self._onpolicy_checks()
        if self.output.push_to_hub and not self.output.report:
            raise ValueError("output.push_to_hub uploads student/ with the model card that output.report writes: "
                             "keep output.report=true")
        if self.eval.tasks and self.train.strategy == "fsdp":
            raise ValueError("eval.tasks runs lm-eval on a whole model in one process, and train.strategy=fsdp keeps "
                             "shards: drop eval.tasks and score the saved student afterwards with "
                             "potstill evaluate RUN --tasks ...")
        if self.student.from_teacher is not None and self.teacher.name_or_path is None and self.teacher.server is None:
            raise ValueError("student.from_teacher needs teacher.name_or_path (a teacher cache holds no weights): "
                             "give student.name_or_path or student.config")
        return self


    def _onpolicy_checks(self) -> None:
        op = self.onpolicy
        if not op.enabled:
            return
        what = "onpolicy.lmbda > 0" if op.lmbda > 0 else "onpolicy.seq_kd"
        if self.teacher.cache is not None:
            raise ValueError(f"{what} samples new completions, but teacher.cache holds the teacher's signal for the "
                             "data's tokens only: load the teacher (teacher.name_or_path) or serve it (teacher.server)")
        if op.seq_kd and self.teacher.server is not None:
            raise ValueError("onpolicy.seq_kd samples from a teacher in this process, and teacher.server is served: "
                             "write the teacher's completions once with potstill generate and train on them")
        if op.seq_kd and self.teacher.name_or_path is None:
            raise ValueError("onpolicy.seq_kd samples completions from the teacher: set teacher.name_or_path")
        if self.loss.logits.weight <= 0:
            raise ValueError(f"{what}: sampled completions have no labels of their own, the teacher's scores are the "
                             "signal: set loss.logits.weight > 0")
        if not self.data.assistant_only_loss:
            raise ValueError(f"{what} needs the prompt part of each example, which data.assistant_only_loss=true "
                             "marks (no loss on it): set data.assistant_only_loss=true")


# ----------------------------------------------------------------------------------------
# Loading: YAML + environment + overrides, with origins for error messages.


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> DistillConfig:
    """Read a YAML file, apply ``POTSTILL_SECTION__KEY`` variables, then ``a.b=c`` overrides."""
    raw: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    if path is not None:
        raw = read_yaml(path)
        for key in _leaf_keys(raw):
            origins[key] = str(path)
    for name, value in sorted((os.environ if env is None else env).items()):
        keys = env_var_keys(name)
        if keys:
            _set_dotted(raw, keys, parse_value(value))
            origins[keys] = f"environment variable {name}"
    for item in overrides:
        keys, value = parse_override(item)
        _set_dotted(raw, keys, value)
        origins[keys] = f"override '{item}'"
    return validate_config(raw, origins)


def validate_config(raw: Mapping[str, Any], origins: Mapping[tuple[str, ...], str] | None = None) -> DistillConfig:
    """Validate a nested dict into a :class:`DistillConfig`, or raise one clear ConfigError."""
    try:
        return DistillConfig.model_validate(dict(raw))
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, origins or {})) from None


def apply_overrides(cfg: DistillConfig, overrides: Sequence[str]) -> DistillConfig:
    """A copy of ``cfg`` with ``a.b=c`` overrides applied and validated again."""
    raw = cfg.model_dump()
    origins = {}
    for item in overrides:
        keys, value = parse_override(item)
        _set_dotted(raw, keys, value)
        origins[keys] = f"override '{item}'"
    return validate_config(raw, origins)


def as_config(config: "DistillConfig | Mapping[str, Any] | str | os.PathLike", overrides: Sequence[str] = ()) -> DistillConfig:
    """A validated config from a DistillConfig, a dict or a YAML path, with dotted overrides applied."""
    if isinstance(config, (str, os.PathLike)):
        return load_config(config, overrides)
    cfg = config if isinstance(config, DistillConfig) else validate_config(config)
    return apply_overrides(cfg, overrides) if overrides else cfg


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (give the path to a YAML file)")
    try:
        data = yaml.safe_load(read_text_file(p, what="config file"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections ({', '.join(SECTIONS)})")
    return data


def read_text_file(path: Path, *, what: str) -> str:
    """The UTF-8 text of a file the user gave, or one ConfigError line naming it: a YAML editor on
    Windows may save Latin-1 or UTF-16, and a folder or unreadable file is not a config."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read the {what} {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8-sig")  # -sig: a byte-order mark is not part of the YAML
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: the {what} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                          f"{err.start}): save it as UTF-8") from None


def parse_value(text: str) -> Any:
    """Turn an override's text into YAML-typed data: '2' -> 2, 'true' -> True, '[0,2]' -> [0, 2]."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' is not of the form section.key=value (e.g. train.lr=3e-4)")
    keys = tuple(part.strip() for part in key.strip().split("."))
    if any(not part for part in keys):
        raise ConfigError(f"override '{item}': empty key segment in '{key}'")
    return keys, parse_value(value)


def env_var_keys(name: str) -> tuple[str, ...] | None:
    """``POTSTILL_TRAIN__LR`` -> ('train', 'lr'); None for variables that are not config."""
    if not name.startswith(ENV_PREFIX) or "__" not in name:
        return None
    keys = tuple(part.lower() for part in name[len(ENV_PREFIX):].split("__"))
    return keys if keys[0] in SECTIONS and all(keys) else None


def _set_dotted(raw: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value


def _leaf_keys(raw: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for key, value in raw.items():
        path = prefix + (str(key),)
        out.append(path)
        if isinstance(value, Mapping):
            out.extend(_leaf_keys(value, path))
    return out


def _model_at(path: Sequence[Any]) -> type[BaseModel] | None:
    """The config class that holds the field at ``path`` (None past a free-form dict)."""
    model: type[BaseModel] = DistillConfig
    for key in path:
        field = model.model_fields.get(str(key))
        if field is None:
            return None
        ann = field.annotation
        nested = [a for a in (getattr(ann, "__args__", None) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def describe_validation_error(err: ValidationError, origins: Mapping[tuple[str, ...], str]) -> str:
    """One line per problem: key, origin, what is wrong, and a suggestion for typos."""
    lines = []
    for problem in err.errors():
        loc = tuple(str(p) for p in problem["loc"] if not isinstance(p, int))
        key = ".".join(loc)
        origin = _origin_of(loc, origins) if loc else None
        where = (f" at {key}" if key else "") + (f" (from {origin})" if origin else "")
        if problem["type"] == "extra_forbidden":
            owner = _model_at(loc[:-1])
            valid = list(owner.model_fields) if owner else []
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            hint = f"did you mean '{'.'.join(loc[:-1] + (close[0],))}'?" if close else f"valid keys here: {', '.join(valid)}"
            lines.append(f"unknown config key '{key}'" + (f" (from {origin})" if origin else "") + f": {hint}")
            continue
        msg = problem["msg"].removeprefix("Value error, ")
        got = problem.get("input")
        shown = "" if isinstance(got, (dict, BaseModel)) or got is None else f" (got {got!r})"
        lines.append(f"config error{where}: {msg}{shown}")
    return "; ".join(lines)


def _origin_of(loc: tuple[str, ...], origins: Mapping[tuple[str, ...], str]) -> str | None:
    for n in range(len(loc), 0, -1):
        if loc[:n] in origins:
            return origins[loc[:n]]
    # An unknown section ('trian') was only recorded with its leaves ('trian', 'lr').
    below = [origin for key, origin in origins.items() if loc and key[: len(loc)] == loc]
    return below[0] if below else None


def config_to_dict(cfg: DistillConfig) -> dict[str, Any]:
    """Plain data for writing: objects passed from Python are shown by their type name."""

    def plain(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return {k: plain(getattr(value, k)) for k in type(value).model_fields}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            if len(value) > 64 and not all(isinstance(v, (int, float)) for v in value):
                return f"<in-memory list of {len(value)} items>"
            return [plain(v) for v in value]
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        return f"<object {type(value).__module__}.{type(value).__qualname__}>"

    return plain(cfg)


def config_to_yaml(cfg: DistillConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def reference_markdown() -> str:
    """The README's config reference, generated from the classes above (a test keeps it current)."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}.{name}" if prefix else name
            nested = _model_at(key.split("."))
            if nested is not None:
                walk(nested, key)
                continue
            default = field.get_default(call_default_factory=True)
            shown = "required" if field.is_required() else ("—" if default is None else f"`{default}`")
            lines.append(f"| `{key}` | {shown} | {field.description or ''} |")

    for section in SECTIONS:
        walk(_model_at([section]), section)
    return "\n".join(lines)
