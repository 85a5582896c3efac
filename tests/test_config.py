"""Config honesty: every ``GRPOConfig`` field changes what ``grpo_fast.GRPOTrainer`` does, or is listed as launch-only
with a reason — none is accepted and ignored.

The walk (``test_every_field_is_classified``) puts each field in exactly one category; a field a new TRL version adds
fails it until classified:

- OWN: grpo_fast's eight fields, each with a behavioural test below (dynamic sampling's two in
  test_dynamic_sampling.py);
- SEAM: fields TRL reads inside one of the four methods ``FastGRPOTrainer`` replaces (found by parsing TRL's source,
  following ``self.x = args.x`` copies and the fused LM head ``add_fused_lm_head`` installs): each is honoured by our
  override (a test compares it with TRL's method) or routes to TRL's method when set (a test spies on TRL's);
- READ: fields read (``args.x``, ``self.args.x``, ``getattr(args, "x")``) by code we do not replace, in ``SEARCHED``;
- POST_INIT: fields whose only effect is another field set in the config's ``__post_init__`` (checked below);
- LAUNCH_ONLY: fields nothing reads, with the reason.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import importlib
import inspect
import math
import time
import warnings
from unittest.mock import patch

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402

import grpo_fast.integrations.trl as dropin  # noqa: E402
import grpo_fast.integrations.trl_sampler as sampler_mod  # noqa: E402
from grpo_fast.config import OWN_DEFAULTS, GRPOConfig, own_option  # noqa: E402
from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer  # noqa: E402
from grpo_fast.trainer import GRPOTrainer  # noqa: E402

FIELDS = {f.name for f in dataclasses.fields(GRPOConfig)}
TRL = trl.GRPOTrainer
REPLACED = ("_generate_single_turn", "_get_per_token_logps_and_entropies", "_prepare_inputs", "_compute_loss")
SEARCHED = ("trl.trainer.grpo_trainer", "trl.trainer.base_trainer", "trl.trainer.utils", "trl.trainer.callbacks",
            "trl.models.utils", "trl.generation.vllm_generation", "transformers.trainer",
            "transformers.trainer_callback",
            "transformers.trainer_utils", "transformers.trainer_pt_utils", "transformers.trainer_optimizer",
            "transformers.training_args", "transformers.integrations.integration_utils",
            "transformers.integrations.deepspeed", "transformers.integrations.fsdp", "transformers.modelcard")
RECEIVERS = {"args", "self.args", "training_args", "trainer.args", "self.trainer.args", "state.args"}
CONFIG_CLASSES = {"TrainingArguments", "GRPOConfig"}  # their own methods read fields as self.x (not __post_init__)
# calls whose result carries the fields of their arguments (other lower-case calls consume them: create_model(...))
DATA_BUILDERS = {"dict", "list", "tuple", "set", "float", "int", "bool", "str", "len", "min", "max", "getattr",
                 "hasattr", "isinstance"}


# -- static reads ------------------------------------------------------------------------------------------------------
def _loads(node, aliases=None, local=None) -> set[str]:
    """Fields an expression reads: args.x, self.args.x, getattr(args, "x"), and (in TRL's trainer) copies self.y of
    fields and local variables holding them."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load):
            recv = ast.unparse(n.value)
            if n.attr in FIELDS and recv in RECEIVERS:
                out.add(n.attr)
            elif aliases is not None and recv == "self" and n.attr in aliases:
                out |= aliases[n.attr]
        elif isinstance(n, ast.Call) and getattr(n.func, "id", None) == "getattr" and len(n.args) >= 2:
            if ast.unparse(n.args[0]) in RECEIVERS and getattr(n.args[1], "value", None) in FIELDS:
                out.add(n.args[1].value)
        elif local is not None and isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in local:
            out |= local[n.id]
    return out


def _stores(target) -> tuple[set[str], set[str]]:
    """(self attributes, local names) an assignment target writes: ``a.b[c] = ...`` writes a."""
    attrs, names = set(), set()
    for t in target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]:
        while isinstance(t, (ast.Subscript, ast.Starred)) or (
            isinstance(t, ast.Attribute) and ast.unparse(t.value) != "self"
        ):
            t = t.value
        if isinstance(t, ast.Attribute):
            attrs.add(t.attr)
        elif isinstance(t, ast.Name) and t.id not in RECEIVERS:  # args.x[k] = ...: still the field
            names.add(t.id)
    return attrs, names


def _init_flows(init) -> tuple[dict, set]:
    """TRL's ``__init__``: which self attributes carry which fields (``self.y = f(args.x)``), and which fields
    ``__init__`` itself acts on (conditions, calls)."""
    aliases, local, used = collections.defaultdict(set), collections.defaultdict(set), set()

    def visit(stmts):
        for s in stmts:
            if isinstance(s, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and s.value is not None:
                src = _loads(s.value, aliases, local)
                callees = {getattr(c.func, "id", getattr(c.func, "attr", "?"))
                           for c in ast.walk(s.value) if isinstance(c, ast.Call)} - DATA_BUILDERS
                if callees:
                    used.update(src)
                    if any(not c[:1].isupper() for c in callees):  # a class instance carries them on
                        continue
                for target in s.targets if isinstance(s, ast.Assign) else [s.target]:
                    attrs, names = _stores(target)
                    for a in attrs:
                        aliases[a] |= src
                    for n in names:
                        local[n] |= src
                    if not attrs and not names:
                        used.update(src)
            elif isinstance(s, ast.Expr) and isinstance(s.value, ast.Call):
                func = s.value.func
                if getattr(func, "id", None) == "add_fused_lm_head":  # read back by model(..., fused_lm_head=True)
                    aliases["<fused_lm_head>"] |= _loads(s.value, aliases, local)
                elif isinstance(func, ast.Attribute) and getattr(func.value, "id", None) in local:  # kw.update(...)
                    local[func.value.id] |= _loads(s.value, aliases, local)
                else:
                    used.update(_loads(s, aliases, local))
            elif isinstance(s, (ast.If, ast.While)):
                used.update(_loads(s.test, aliases, local))
                visit(s.body), visit(s.orelse)
            elif isinstance(s, ast.For):
                used.update(_loads(s.iter, aliases, local))
                visit(s.body), visit(s.orelse)
            elif isinstance(s, ast.With):
                for item in s.items:
                    used.update(_loads(item.context_expr, aliases, local))
                visit(s.body)
            elif isinstance(s, ast.Try):
                visit(s.body), visit(s.orelse), visit(s.finalbody)
                for h in s.handlers:
                    visit(h.body)
            else:
                used.update(_loads(s, aliases, local))

    visit(init.body)
    return aliases, used


@functools.cache
def static_reads() -> tuple[dict, dict]:
    """(field → functions reading it outside the replaced methods, field → replaced methods reading it)."""
    outside, seam = collections.defaultdict(set), collections.defaultdict(set)
    for mod in SEARCHED:
        tree = ast.parse(inspect.getsource(importlib.import_module(mod)))
        for top in tree.body:
            if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for f in _loads(top):
                    outside[f].add(f"{mod}:{top.name}")
            if not isinstance(top, ast.ClassDef):
                continue
            methods = [m for m in top.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
            if mod == "trl.trainer.grpo_trainer" and top.name == "GRPOTrainer":
                init = next(m for m in methods if m.name == "__init__")
                aliases, used = _init_flows(init)
                for f in used:
                    outside[f].add(f"{mod}:GRPOTrainer.__init__")
                for m in methods:
                    if m is init:
                        continue
                    got = _loads(m, aliases)
                    if any(isinstance(k, ast.keyword) and k.arg == "fused_lm_head" for k in ast.walk(m)):
                        got |= aliases["<fused_lm_head>"]
                    for f in got:
                        (seam[f] if m.name in REPLACED else outside[f]).add(f"{mod}:GRPOTrainer.{m.name}")
                continue
            for m in methods:
                if top.name in CONFIG_CLASSES and m.name == "__post_init__":
                    continue  # validation and defaults; see POST_INIT
                got = _loads(m)
                if top.name in CONFIG_CLASSES:
                    got |= {n.attr for n in ast.walk(m) if isinstance(n, ast.Attribute) and n.attr in FIELDS
                            and isinstance(n.ctx, ast.Load) and ast.unparse(n.value) == "self"}
                for f in got:
                    outside[f].add(f"{mod}:{top.name}.{m.name}")
    return dict(outside), dict(seam)


# -- the categories ----------------------------------------------------------------------------------------------------
OWN = {"use_shared_prefix_sampler", "use_shared_prefix_update", "reward_timeout", "reward_errors",
       "max_consecutive_skipped_steps", "plot",
       # behavioural tests in test_dynamic_sampling.py (replacement on/off; the round limit)
       "skip_zero_std_groups", "max_resample_rounds"}

# SEAM fields our override honours, with the test below that compares it with TRL's method
HONOURED = {
    **dict.fromkeys(["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_completion_length"],
                    "test_sampling_options_match_trl / test_temperature_sets_both_samplers_and_logprobs"),
    "generation_kwargs": "test_generation_kwargs_honoured_or_fall_back",
    "ds3_gather_for_generation": "test_generation_unwrap_options_are_passed",
    "gradient_checkpointing_kwargs": "test_generation_unwrap_options_are_passed",
    "pad_to_multiple_of": "test_pad_to_multiple_of",
    "cast_lm_head_to_fp32": "test_cast_lm_head_to_fp32_logprobs_match_trl",
    **dict.fromkeys(["num_iterations", "steps_per_generation"], "test_generation_schedule_matches_trl"),
    **dict.fromkeys(["loss_type", "epsilon", "epsilon_high", "delta", "beta", "importance_sampling_level",
                     "use_bias_correction_kl", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
                     "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "top_entropy_quantile"],
                    "test_loss_options_match_trl"),
}
# SEAM fields under which our method hands over to TRL's: field → (the trainer state that sends it there)
FALLBACK = {
    "use_vllm": {"use_vllm": True},
    "use_transformers_continuous_batching": {"use_transformers_continuous_batching": True},
    "cache_implementation": {"generation_config.cache_implementation": "static"},
    # read inside TRL's _generate_single_turn only on its vLLM or continuous-batching branch
    **dict.fromkeys(["bf16", "fp16", "transformers_continuous_batching_config"],
                    {"use_transformers_continuous_batching": True}),
    **dict.fromkeys(["per_device_train_batch_size", "trust_remote_code", "vllm_enable_sleep_mode",
                     "vllm_gpu_memory_utilization", "vllm_group_port", "vllm_max_model_length", "vllm_mode",
                     "vllm_model_impl", "vllm_server_base_url", "vllm_server_host", "vllm_server_port",
                     "vllm_server_timeout", "vllm_structured_outputs_regex", "vllm_tensor_parallel_size"],
                    {"use_vllm": True}),
    "off_policy_mask_threshold": {"off_policy_mask_threshold": 0.5},
    "vllm_importance_sampling_correction": {"use_vllm": True, "vllm_importance_sampling_correction": True},
    "router_aux_loss_coef": {"aux_loss_enabled": True},
    "entropy_coef": {"_entropy_bonus_enabled": True},
    **dict.fromkeys(["use_adaptive_entropy", "entropy_coef_delta", "entropy_coef_max", "entropy_coef_min",
                     "entropy_target"], {"_entropy_bonus_enabled": True, "use_adaptive_entropy": True}),
}
# fields whose only effect is set in the config's __post_init__: field → (value, the field it sets, expected)
POST_INIT = {
    "use_transformers_paged": (True, "use_transformers_continuous_batching", True),
    "vllm_importance_sampling_cap": (7.0, "vllm_importance_sampling_clip_max", 7.0),
    "tf32": None,  # TrainingArguments.__post_init__ sets torch's TF32 matmul flags (CUDA only; checked statically)
}
LAUNCH_ONLY = {
    "do_train": "transformers: 'not directly used by Trainer', for the user's own scripts",
    "do_predict": "transformers: 'not directly used by Trainer', for the user's own scripts",
    "local_rank": "set by torch.distributed.launch for the argument parser; the rank comes from the environment",
}


def categories(field: str) -> list[str]:
    outside, seam = static_reads()
    found = []
    if field in OWN:
        found.append("own")
    if field in seam:
        found.append("seam" if field in HONOURED or field in FALLBACK else "seam, but neither HONOURED nor FALLBACK")
    elif field in HONOURED or field in FALLBACK:
        found.append("listed as a seam field, but TRL's replaced methods do not read it")
    if field in POST_INIT:
        found.append("post_init")
    if field in LAUNCH_ONLY:
        found.append("launch_only")
    if field in outside and not found:
        found.append("read")
    return found


def test_every_field_is_classified():
    wrong = {f: categories(f) for f in sorted(FIELDS) if len(categories(f)) != 1 or " " in categories(f)[0]}
    assert not wrong, f"fields not in exactly one category (classify them in this file): {wrong}"
    counts = collections.Counter(categories(f)[0] for f in FIELDS)
    assert sum(counts.values()) == len(FIELDS) > 190


def test_static_reads_find_known_readers():
    outside, seam = static_reads()
    assert "transformers.trainer:Trainer.create_optimizer" in outside["optim"] or outside["optim"]
    assert any("Trainer" in site for site in outside["learning_rate"])
    assert seam["temperature"] >= {f"trl.trainer.grpo_trainer:GRPOTrainer.{m}"
                                   for m in ("_generate_single_turn", "_get_per_token_logps_and_entropies")}
    assert "beta" in seam and "epsilon" in seam and "num_iterations" in seam
    assert not ({"do_train", "local_rank"} & (set(outside) | set(seam)))  # LAUNCH_ONLY is not read


def test_post_init_fields_take_effect():
    for name, effect in POST_INIT.items():
        if effect is None:
            src = inspect.getsource(importlib.import_module("transformers.training_args").TrainingArguments
                                    .__post_init__)
            assert f"self.{name}" in src and "enable_tf32(" in src
            if not torch.cuda.is_available():  # refused by name where it cannot apply
                with pytest.raises(ValueError, match="tf32"):
                    GRPOConfig(output_dir="/tmp/x", tf32=True)
            continue
        value, target, expected = effect
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert getattr(GRPOConfig(output_dir="/tmp/x", **{name: value}), target) == expected, name


# -- trainers ----------------------------------------------------------------------------------------------------------
PROMPTS = ["3+4=", "12+5="]


def reward(completions, **kw):
    return [float(len(c) % 3) for c in completions]


def make(model_path, rewards=(reward,), cls=GRPOTrainer, model=None, **kw):
    args = dict(output_dir=model_path + "-out", report_to="none", per_device_train_batch_size=4, num_generations=2,
                max_completion_length=5, seed=0, plot=False, logging_steps=1)
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = cls(model if model is not None else model_path, list(rewards), args=GRPOConfig(**args),
                train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]), processing_class=tiny_tokenizer())
    t.current_gradient_accumulation_steps = 1
    return t


def prompt_ids(trainer):
    ids = [trainer._tokenizer(p)["input_ids"] for p in PROMPTS]
    return [ids[0], ids[0], ids[1], ids[1]]


def both_generations(trainer):
    ids = prompt_ids(trainer)
    ours, _ = trainer._generate_single_turn(ids, None, {}, 2)
    theirs, _ = TRL._generate_single_turn(trainer, ids, None, {}, 2)
    return ours, theirs


# -- OWN ---------------------------------------------------------------------------------------------------------------
def test_own_fields_have_help_and_trl_configs_get_defaults(model_path):
    for name in OWN:
        assert GRPOConfig.__dataclass_fields__[name].metadata.get("help", "").startswith("grpo_fast:"), name
    assert set(OWN_DEFAULTS) == OWN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.GRPOConfig(output_dir=model_path + "-trl", report_to="none", per_device_train_batch_size=4,
                              num_generations=2, max_completion_length=3, use_cpu=True, bf16=False)
        t = GRPOTrainer(model_path, [reward], args=args, processing_class=tiny_tokenizer(),
                        train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]))
    assert {n: own_option(t.args, n) for n in OWN} == OWN_DEFAULTS
    assert t.use_shared_prefix_sampler and t.use_shared_prefix_update


def test_bf16_default_resolves_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("the CPU default")
    assert GRPOConfig(output_dir="/tmp/x").bf16 is False
    assert GRPOConfig(output_dir="/tmp/x", bf16=True, use_cpu=True).bf16 is True


@pytest.mark.parametrize("on", [True, False])
def test_use_shared_prefix_sampler(model_path, on, spy):
    built = spy(sampler_mod, "SharedPrefixSampler")
    t = make(model_path, use_shared_prefix_sampler=on)
    completions, _ = t._generate_single_turn(prompt_ids(t), None, {}, 2)
    assert len(completions) == 4 and bool(built) == on


@pytest.mark.parametrize("on", [True, False])
def test_use_shared_prefix_update(model_path, on, spy):
    calls = spy(dropin, "shared_prefix_hidden_states")
    t = make(model_path, use_shared_prefix_update=on)
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 9, 8], [4, 6, 7, 10, 11], [4, 6, 7, 11, 12]])
    t._get_per_token_logps_and_entropies(t.model, ids, torch.ones_like(ids), 2)
    assert bool(calls) == on
    assert t._group_shuffle_applies() == on


def _call_rewards(t, n=4):
    comps = ["7", "8", "9", "1"][:n]
    return t._calculate_rewards([{"prompt": p} for p in ["3+4="] * n], ["3+4="] * n, comps, [[3]] * n)


def test_reward_errors(model_path):
    def broken(completions, **kw):
        raise RuntimeError("reward crashed")

    rewards = _call_rewards(make(model_path, rewards=(broken, reward), reward_errors="unscored"))
    assert torch.isnan(rewards[:, 0]).all() and not torch.isnan(rewards[:, 1]).any()
    with pytest.raises(RuntimeError, match="reward crashed"):
        _call_rewards(make(model_path, rewards=(broken,), reward_errors="raise"))
    with pytest.raises(ValueError, match="reward_errors"):
        GRPOConfig(output_dir="/tmp/x", reward_errors="ignore")


def test_reward_timeout(model_path):
    def slow(completions, **kw):
        time.sleep(3)
        return [1.0] * len(completions)

    start = time.perf_counter()
    rewards = _call_rewards(make(model_path, rewards=(slow,), reward_timeout=0.2))
    assert torch.isnan(rewards).all() and time.perf_counter() - start < 2.5


@pytest.mark.parametrize("limit", [0, 2])
def test_max_consecutive_skipped_steps(model_path, limit):
    t = make(model_path, max_consecutive_skipped_steps=limit)
    opt = t.create_optimizer()
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    for p in t.model.parameters():
        p.grad = torch.full_like(p, math.nan)
    for _ in range(limit):
        opt.step()
    with pytest.raises(RuntimeError, match="max_consecutive_skipped_steps"):
        opt.step()  # skip number limit + 1 stops the run
    assert all(torch.equal(p, before[n]) for n, p in t.model.named_parameters())
    assert t._metrics["train"]["skipped_steps"] == [1.0] * (limit + 1)


@pytest.mark.parametrize("on", [True, False])
def test_plot(model_path, on, tmp_path):
    t = make(model_path, plot=on, output_dir=str(tmp_path), disable_tqdm=True)
    t.state.log_history = [{"step": 1, "reward": 0.5, "entropy": 1.0}, {"step": 2, "reward": 0.7, "entropy": 0.9}]
    t.callback_handler.on_train_end(t.args, t.state, t.control)
    assert (tmp_path / "metrics.png").exists() == on


# -- SEAM: fallbacks ---------------------------------------------------------------------------------------------------
def _set(trainer, state):
    for key, value in state.items():
        obj, _, attr = key.rpartition(".")
        setattr(getattr(trainer, obj) if obj else trainer, attr, value)


@pytest.mark.parametrize("state", sorted({repr(s) for s in FALLBACK.values()}))
def test_fallbacks_route_to_trl(model_path, state):
    state = eval(state)  # noqa: S307 - our own repr
    t = make(model_path)
    t.model.train()
    _set(t, state)
    sentinel = RuntimeError("TRL's method")
    seam = "_compute_loss" if any(k in state for k in ("off_policy_mask_threshold", "aux_loss_enabled",
                                                      "_entropy_bonus_enabled", "vllm_importance_sampling_correction"))\
        else "_generate_single_turn"
    with patch.object(TRL, seam, side_effect=sentinel) as theirs, pytest.raises(RuntimeError, match="TRL's method"):
        if seam == "_compute_loss":
            t._compute_loss(t.model, _loss_inputs())
        else:
            t._generate_single_turn(prompt_ids(t), None, {}, 2)
    assert theirs.call_count == 1


# -- SEAM: honoured ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_k=1, repetition_penalty=3.0), dict(min_p=1.0),
                                dict(top_p=1e-9), dict(top_k=1, max_completion_length=2)], ids=repr)
def test_sampling_options_match_trl(model_path, kw):
    """Settings that make sampling deterministic: our sampler's completions equal transformers' generate's."""
    ours, theirs = both_generations(make(model_path, **kw))
    assert ours == theirs
    assert max(map(len, ours)) <= kw.get("max_completion_length", 5)
    free, _ = both_generations(make(model_path, temperature=5.0, seed=3))
    assert len({tuple(c) for c in free}) > 1, "unconstrained sampling should differ across completions"


def test_temperature_sets_both_samplers_and_logprobs(model_path):
    t = make(model_path, temperature=0.7, num_iterations=2, max_completion_length=4)  # sampled log-probs kept
    ids = prompt_ids(t)
    completions, logps = t._generate_single_turn(ids, None, {}, 2)
    t._sampled_logps = None
    for row, (p, c, lp) in enumerate(zip(ids, completions, logps)):
        full = torch.tensor([p + c])
        theirs, _, _ = TRL._get_per_token_logps_and_entropies(t, t.model, full, torch.ones_like(full), len(c))
        ours, _, _ = t._get_per_token_logps_and_entropies(t.model, full, torch.ones_like(full), len(c))
        torch.testing.assert_close(torch.tensor([lp]), theirs, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    t = make(model_path, temperature=1.0)  # the sampled log-probs are those of T = 0.7, not T = 1
    at_one, _, _ = TRL._get_per_token_logps_and_entropies(t, t.model, full, torch.ones_like(full), len(c))
    assert not torch.allclose(torch.tensor([lp]), at_one, atol=1e-3)


def test_generation_kwargs_honoured_or_fall_back(model_path):
    t = make(model_path, generation_kwargs={"max_new_tokens": 2, "top_k": 1})
    with patch.object(TRL, "_generate_single_turn", side_effect=AssertionError("fell back")):
        ours, _ = t._generate_single_turn(prompt_ids(t), None, {}, 2)
    assert max(map(len, ours)) <= 2 and ours[0] == ours[1]
    t = make(model_path, generation_kwargs={"no_repeat_ngram_size": 2})
    with patch.object(TRL, "_generate_single_turn", return_value=([[1]] * 4, None)) as theirs:
        t._generate_single_turn(prompt_ids(t), None, {}, 2)
    assert theirs.call_count == 1


def test_generation_unwrap_options_are_passed(model_path):
    import trl.models

    t = make(model_path, ds3_gather_for_generation=False, gradient_checkpointing_kwargs={"use_reentrant": False})
    with patch.object(trl.models, "unwrap_model_for_generation", wraps=trl.models.unwrap_model_for_generation) as u:
        t._generate_single_turn(prompt_ids(t), None, {}, 2)
    kw = u.call_args.kwargs
    assert kw["gather_deepspeed3_params"] is False
    assert kw["gradient_checkpointing_kwargs"] == t.args.gradient_checkpointing_kwargs


def test_pad_to_multiple_of(model_path):
    t = make(model_path, pad_to_multiple_of=8)
    out = t._generate_and_score_completions([{"prompt": p} for p in ("3+4=", "3+4=", "12+5=", "12+5=")])
    assert out["prompt_ids"].size(1) % 8 == 0 and out["completion_ids"].size(1) % 8 == 0


def test_cast_lm_head_to_fp32_logprobs_match_trl(model_path):
    model = tiny_causal_lm(seed=1).to(torch.bfloat16)
    t = make(model_path, model=model, cast_lm_head_to_fp32=True, bf16=False, use_shared_prefix_update=False)
    assert t.model.lm_head.weight.dtype == torch.float32  # TRL's __init__ cast it
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 9, 8]])
    ours, _, _ = t._get_per_token_logps_and_entropies(t.model, ids, torch.ones_like(ids), 2)
    theirs, _, _ = TRL._get_per_token_logps_and_entropies(t, t.model, ids, torch.ones_like(ids), 2)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_generation_schedule_matches_trl(model_path, monkeypatch):
    """Which steps generate, and which rows each step trains on, as TRL's _prepare_inputs (groups kept whole)."""
    t = make(model_path, steps_per_generation=2, num_iterations=2, per_device_train_batch_size=4,
             gradient_accumulation_steps=2)
    t.model.train()
    calls = []

    def fake(batch):
        calls.append(t._step)
        return {"row": torch.arange(8), "group": torch.arange(8) // 2}

    monkeypatch.setattr(t, "_generate_and_score_completions", fake)
    seen = {}
    for cls in (type(t), TRL):
        calls.clear()
        t._buffered_inputs = None
        rows = []
        for t._step in range(8):
            rows.append(sorted(cls._prepare_inputs(t, None)["row"].tolist()))
        seen[cls] = (list(calls), [len(r) for r in rows], [sorted(sum(rows[i:i + 2], [])) for i in (0, 4)])
    assert seen[type(t)] == seen[TRL] and seen[TRL][0] == [0, 4]


def _loss_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    n, P, L = 4, 4, 5
    completion_mask = torch.ones(n, L, dtype=torch.long)
    completion_mask[1, 3:] = 0
    return {
        "prompt_ids": torch.randint(3, 40, (n, P), generator=g), "prompt_mask": torch.ones(n, P, dtype=torch.long),
        "completion_ids": torch.randint(3, 40, (n, L), generator=g), "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -0.5, 0.25, -0.75]), "num_items_in_batch": completion_mask.sum(),
        "old_per_token_logps": -torch.rand(n, L, generator=g) * 4,
        "ref_per_token_logps": -torch.rand(n, L, generator=g) * 4,
    }


LOSS_CASES = [dict(loss_type=lt) for lt in ("grpo", "bnpo", "dr_grpo", "cispo", "sapo", "luspo", "vespo")] + [
    dict(epsilon=0.05), dict(epsilon_high=3.0), dict(delta=1.1), dict(beta=0.1),
    dict(beta=0.1, use_bias_correction_kl=False),
    dict(importance_sampling_level="sequence"), dict(loss_type="dr_grpo", max_completion_length=9),
    dict(loss_type="sapo", sapo_temperature_pos=2.0), dict(loss_type="sapo", sapo_temperature_neg=0.5),
    dict(loss_type="vespo", vespo_k_pos=1.0), dict(loss_type="vespo", vespo_lambda_pos=1.0),
    dict(loss_type="vespo", vespo_k_neg=1.0), dict(loss_type="vespo", vespo_lambda_neg=1.0),
    dict(top_entropy_quantile=0.5),
]


def test_loss_options_match_trl(model_path):
    """Each loss option, set away from its default: our fused loss equals TRL's, and TRL's loss moved."""
    inputs = _loss_inputs()
    t = make(model_path)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    with torch.no_grad():
        logp, _, _ = t._get_per_token_logps_and_entropies(t.model, ids, torch.ones_like(ids), 5)
    # ratios from e^-1.5 to e^1.5 across the tokens: every clip bound of the cases falls among them
    inputs["old_per_token_logps"] = logp - torch.linspace(-1.5, 1.5, logp.numel()).view_as(logp)

    def losses(**kw):
        t = make(model_path, **kw)
        t.model.train()
        with torch.no_grad():
            return t._compute_loss(t.model, inputs), TRL._compute_loss(t, t.model, inputs)

    covered = set()
    for kw in LOSS_CASES:
        base = {k: v for k, v in kw.items() if k in ("loss_type", "beta")}
        ours, theirs = losses(**kw)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4, msg=lambda m: f"{kw}: {m}")
        if base != kw:
            assert not torch.isclose(theirs, losses(**base)[1]), f"{kw} did not change TRL's loss on these inputs"
        covered |= set(kw)
    assert covered >= {f for f, test in HONOURED.items() if test == "test_loss_options_match_trl"}
    assert covered <= set(HONOURED)
