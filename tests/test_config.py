"""GRPOConfig: TRL 1.16 names and defaults, validation messages, TRL configs accepted unchanged, derived batch values
equal to TRL's, CLI and file round trips."""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings

import pytest

from grpo_fast.config import (
    IGNORED_FIELDS,
    REFUSED_FIELDS,
    GRPOConfig,
    add_config_arguments,
    config_from_args,
)

trl = pytest.importorskip("trl")

OURS_ONLY = {
    "max_prompt_length", "recompute_old_logprobs", "shared_prefix_update", "skip_zero_std_groups", "reward_timeout",
    "max_consecutive_skipped_steps", "estimator", "stop", "log_sampling_logprob_gap", "eval_num_prompts",
}
FIELDS = [f.name for f in dataclasses.fields(GRPOConfig)]


def _trl_config(**kwargs):
    # bf16 (TRL's default) is refused by transformers on a CPU-only machine unless use_cpu is set
    kwargs.setdefault("use_cpu", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trl.GRPOConfig(**kwargs)


@pytest.fixture(scope="module")
def trl_default():
    return _trl_config()


# One invalid value per field: (field named in the message, the kwargs that make it invalid).
INVALID = [
    ("output_dir", {"output_dir": ""}),
    ("fsdp", {"fsdp": "shard_grad_op"}),
    ("learning_rate", {"learning_rate": -1e-6}),
    ("per_device_train_batch_size", {"per_device_train_batch_size": 0}),
    ("gradient_accumulation_steps", {"gradient_accumulation_steps": 0}),
    ("num_train_epochs", {"num_train_epochs": 0}),
    ("max_steps", {"max_steps": 0}),
    ("max_grad_norm", {"max_grad_norm": -1.0}),
    ("weight_decay", {"weight_decay": -0.1}),
    ("adam_beta1", {"adam_beta1": 1.0}),
    ("adam_beta2", {"adam_beta2": 1.5}),
    ("adam_epsilon", {"adam_epsilon": 0.0}),
    ("warmup_steps", {"warmup_steps": -1}),
    ("lr_scheduler_type", {"lr_scheduler_type": "cosin"}),
    ("lr_scheduler_kwargs", {"lr_scheduler_kwargs": "{not json"}),
    ("seed", {"seed": "42"}),
    ("logging_steps", {"logging_steps": 0}),
    ("save_steps", {"save_steps": 1.5}),
    ("save_total_limit", {"save_total_limit": 0}),
    ("eval_steps", {"eval_steps": -5}),
    ("bf16", {"bf16": "yes"}),
    ("gradient_checkpointing", {"gradient_checkpointing": "yes"}),
    ("report_to", {"report_to": "tensorbord"}),
    ("resume_from_checkpoint", {"resume_from_checkpoint": 5}),
    ("model_init_kwargs", {"model_init_kwargs": 3}),
    ("trust_remote_code", {"trust_remote_code": 1}),
    ("disable_dropout", {"disable_dropout": None}),
    ("shuffle_dataset", {"shuffle_dataset": "no"}),
    ("chat_template_kwargs", {"chat_template_kwargs": ["a"]}),
    ("max_prompt_length", {"max_prompt_length": 0}),
    ("num_generations", {"num_generations": 1}),
    ("num_generations_eval", {"num_generations_eval": 0}),
    ("max_completion_length", {"max_completion_length": 0}),
    ("generation_batch_size", {"generation_batch_size": 12}),
    ("steps_per_generation", {"steps_per_generation": 0}),
    ("temperature", {"temperature": 0.0}),
    ("top_p", {"top_p": 1.5}),
    ("top_k", {"top_k": -1}),
    ("min_p", {"min_p": 1.5}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("stop", {"stop": [""]}),
    ("beta", {"beta": -0.1}),
    ("num_iterations", {"num_iterations": 0}),
    ("epsilon", {"epsilon": -0.2}),
    ("epsilon_high", {"epsilon_high": -0.1}),
    ("delta", {"delta": 1.0}),
    ("sapo_temperature_neg", {"sapo_temperature_neg": 0.0}),
    ("sapo_temperature_pos", {"sapo_temperature_pos": -1.0}),
    ("vespo_k_pos", {"vespo_k_pos": -1.0}),
    ("vespo_lambda_pos", {"vespo_lambda_pos": float("nan")}),
    ("vespo_k_neg", {"vespo_k_neg": -0.5}),
    ("vespo_lambda_neg", {"vespo_lambda_neg": -2.0}),
    ("importance_sampling_level", {"importance_sampling_level": "seq"}),
    ("reward_weights", {"reward_weights": []}),
    ("multi_objective_aggregation", {"multi_objective_aggregation": "sum"}),
    ("scale_rewards", {"scale_rewards": "std"}),
    ("loss_type", {"loss_type": "ppo"}),
    ("mask_truncated_completions", {"mask_truncated_completions": "true"}),
    ("top_entropy_quantile", {"top_entropy_quantile": 1.2}),
    ("entropy_coef", {"entropy_coef": -0.1}),
    ("use_adaptive_entropy", {"use_adaptive_entropy": 0}),
    ("entropy_coef_min", {"entropy_coef_min": -0.1}),
    ("entropy_coef_max", {"entropy_coef_min": 0.5, "entropy_coef_max": 0.1}),
    ("entropy_coef_delta", {"entropy_coef_delta": 0.0}),
    ("entropy_target", {"entropy_target": -1.0}),
    ("use_bias_correction_kl", {"use_bias_correction_kl": None}),
    ("estimator", {"estimator": "ppo"}),
    ("recompute_old_logprobs", {"recompute_old_logprobs": "no"}),
    ("shared_prefix_update", {"shared_prefix_update": None}),
    ("skip_zero_std_groups", {"skip_zero_std_groups": 1}),
    ("reward_timeout", {"reward_timeout": 0.0}),
    ("max_consecutive_skipped_steps", {"max_consecutive_skipped_steps": -1}),
    ("log_sampling_logprob_gap", {"log_sampling_logprob_gap": "x"}),
    ("eval_num_prompts", {"eval_num_prompts": 0}),
]
# Values invalid only in combination, or in a second way worth pinning down.
INVALID_MORE = [
    ("num_generations", {"per_device_train_batch_size": 6, "num_generations": 4}),
    ("max_completion_length", {"loss_type": "dr_grpo", "max_completion_length": None}),
    ("warmup_steps", {"warmup_steps": 2.5}),
    ("top_p", {"top_p": 0.0}),
    ("beta", {"beta": float("inf")}),
    ("steps_per_generation", {"generation_batch_size": 16, "steps_per_generation": 3}),
]


def test_invalid_table_covers_every_field():
    assert sorted({name for name, _ in INVALID}) == sorted(FIELDS)


@pytest.mark.parametrize("name, kwargs", INVALID + INVALID_MORE, ids=[n for n, _ in INVALID + INVALID_MORE])
def test_invalid_value_names_field(name, kwargs):
    with pytest.raises(ValueError) as info:
        GRPOConfig(**kwargs)
    message = str(info.value)
    assert f"{name}=" in message, message
    assert "must" in message, message


def test_batch_message_lists_alternatives():
    with pytest.raises(ValueError, match="valid num_generations for this batch: 2, 3, 6") as info:
        GRPOConfig(per_device_train_batch_size=6, num_generations=4)
    assert "per_device_train_batch_size to 4 or 8" in str(info.value)
    for size in (4, 8):  # the listed alternatives are valid
        GRPOConfig(per_device_train_batch_size=size, num_generations=4)


def test_defaults_equal_trl(trl_default):
    ours = GRPOConfig()
    for name in FIELDS:
        if name in OURS_ONLY:
            continue
        expected = getattr(trl_default, name)
        if name == "epsilon_high":  # TRL's trainer resolves None to epsilon; we resolve it in the config
            assert expected is None
            expected = trl_default.epsilon
        expected = getattr(expected, "value", expected)  # transformers' str enums (lr_scheduler_type)
        assert getattr(ours, name) == expected, name
        assert type(getattr(ours, name)) is type(expected), name


def test_every_trl_name_is_classified(trl_default):
    trl_names = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    ours = set(FIELDS)
    assert ours - trl_names == OURS_ONLY
    classified = ours | set(REFUSED_FIELDS) | set(IGNORED_FIELDS) | {"activation_checkpointing"}
    assert trl_names <= classified, sorted(trl_names - classified)
    assert not (set(REFUSED_FIELDS) & set(IGNORED_FIELDS)) and not (ours & (set(REFUSED_FIELDS) | set(IGNORED_FIELDS)))
    for name, (accepted, _) in REFUSED_FIELDS.items():  # TRL's default value is always accepted
        assert getattr(trl_default, name) in accepted, name


def test_trl_config_accepted_unchanged(tmp_path):
    trl_cfg = _trl_config(
        output_dir=str(tmp_path), learning_rate=3e-6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        num_generations=4, beta=0.04, epsilon_high=0.28, loss_type="grpo", scale_rewards=False, temperature=0.7,
        top_p=0.9, top_k=50, max_completion_length=128, num_iterations=2, mask_truncated_completions=True,
        reward_weights=[1.0, 0.5], warmup_steps=0.1, lr_scheduler_type="cosine", max_steps=100, save_steps=20,
        # names we ignore, at non-default values
        logging_first_step=True, log_completions=True, dataloader_num_workers=2, vllm_gpu_memory_utilization=0.5,
        push_to_hub=False, remove_unused_columns=True, ddp_timeout=600, torch_empty_cache_steps=5,
    )
    d = trl_cfg.to_dict()
    ours = GRPOConfig.from_dict(d)
    for name in FIELDS:
        if name not in OURS_ONLY:
            assert getattr(ours, name) == getattr(trl_cfg, name), name
    assert ours.scale_rewards == "none" and ours.steps_per_generation == 2 and ours.generation_batch_size == 8
    # the same dict with the (ignored) eval/save strategies switched off
    d.update(save_strategy="no", eval_strategy="no", eval_steps=5)
    off = GRPOConfig.from_dict(d)
    assert off.save_steps is None and off.eval_steps is None


REFUSED_CASES = {
    "use_vllm": True, "sync_ref_model": True, "off_policy_mask_threshold": 0.5, "router_aux_loss_coef": 0.01,
    "cast_lm_head_to_fp32": True, "generation_kwargs": {"num_beams": 2}, "fp16": True, "optim": "sgd",
    "optim_args": "momentum=0.9", "optim_target_modules": ["q_proj"], "neftune_noise_alpha": 5.0,
    "auto_find_batch_size": True, "average_tokens_across_devices": False,
}


def test_refused_table_complete():
    assert set(REFUSED_CASES) == set(REFUSED_FIELDS)


@pytest.mark.parametrize("name", sorted(REFUSED_CASES))
def test_refused_by_name_with_reason(name):
    value = REFUSED_CASES[name]
    with pytest.raises(ValueError, match=f"^{name}=.* is not supported by grpo_fast: ") as info:
        GRPOConfig.from_dict({name: value, "learning_rate": 1e-6})
    assert REFUSED_FIELDS[name][1] in str(info.value)
    GRPOConfig(**{name: REFUSED_FIELDS[name][0][0]})  # the default is fine


def test_ignored_names_accepted():
    cfg = GRPOConfig(logging_first_step=True, hub_model_id="me/x", vllm_mode="server", log_completions=True,
                     per_device_eval_batch_size=3, **{"dataloader-num-workers": 4})
    assert cfg == GRPOConfig()
    with pytest.warns(UserWarning, match="deepspeed"):
        GRPOConfig(deepspeed="ds.json")
    with pytest.warns(UserWarning, match="mlflow"):
        assert GRPOConfig(report_to=["mlflow"]).report_to == []


@pytest.mark.parametrize("given, suggestion", [
    ("learnig_rate", "learning_rate"), ("num_generation", "num_generations"), ("use_vlm", "use_vllm"),
    ("max-completion-lenght", "max_completion_length"), ("loggin_first_step", "logging_first_step"),
])
def test_unknown_name_suggests_closest(given, suggestion):
    with pytest.raises(ValueError, match=f"unknown config field '{given}'; did you mean '{suggestion}'"):
        GRPOConfig.from_dict({given: 1})
    with pytest.raises(ValueError, match="did you mean"):
        GRPOConfig(**{given: 1})


def test_unknown_choice_suggests_closest():
    with pytest.raises(ValueError, match="did you mean 'dr_grpo'"):
        GRPOConfig(loss_type="dr-grpo")


@pytest.mark.parametrize("loss_type, level, warns", [
    ("luspo", "token", True), ("luspo", "sequence", False), ("vespo", "sequence", True), ("vespo", "token", False),
    ("dapo", "sequence", True), ("bnpo", "sequence", True), ("dr_grpo", "sequence", True), ("cispo", "sequence", True),
    ("grpo", "sequence", False), ("sapo", "sequence", False), ("dapo", "token", False),
])
def test_warning_combinations(loss_type, level, warns):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GRPOConfig(loss_type=loss_type, importance_sampling_level=level)
    assert bool([w for w in caught if issubclass(w.category, UserWarning)]) == warns


BATCHES = [  # (per_device_train_batch_size, gradient_accumulation_steps, num_generations, extra)
    (8, 1, 8, {}),
    (4, 4, 8, {}),
    (6, 2, 3, {"steps_per_generation": 4}),
    (4, 2, 4, {"generation_batch_size": 16}),
    (2, 8, 16, {"num_iterations": 3}),
    (3, 3, 9, {"steps_per_generation": 1}),
]


@pytest.mark.parametrize("per_device, accum, group, extra", BATCHES)
def test_derived_values_match_trl(per_device, accum, group, extra):
    kwargs = dict(per_device_train_batch_size=per_device, gradient_accumulation_steps=accum, num_generations=group,
                  **extra)
    try:
        ref = _trl_config(**kwargs)
    except ValueError:
        with pytest.raises(ValueError):
            GRPOConfig(**kwargs)
        return
    ours = GRPOConfig(**kwargs)
    assert (ours.generation_batch_size, ours.steps_per_generation) == (ref.generation_batch_size,
                                                                     ref.steps_per_generation)
    assert ours.effective_batch_size == per_device * accum * ref.world_size
    assert ours.prompts_per_generation == ref.generation_batch_size // group
    generate_every = ref.steps_per_generation * ref.num_iterations  # TRL's condition for computing old log-probs
    assert ours.needs_old_logprobs == (ref.gradient_accumulation_steps % generate_every != 0)
    again = GRPOConfig.from_dict(ref.to_dict())  # both derived values present and consistent
    assert again.generation_batch_size == ref.generation_batch_size


@pytest.mark.parametrize("kwargs", [
    dict(per_device_train_batch_size=4, generation_batch_size=10, num_generations=2),
    dict(per_device_train_batch_size=4, steps_per_generation=3, num_generations=8),
    dict(per_device_train_batch_size=4, generation_batch_size=8, steps_per_generation=4, num_generations=4),
], ids=["gen-not-multiple-of-batch", "gen-not-multiple-of-group", "gen-and-steps-disagree"])
def test_invalid_batches_rejected_like_trl(kwargs):
    with pytest.raises(ValueError):
        _trl_config(**kwargs)
    with pytest.raises(ValueError, match="generation_batch_size|num_generations"):
        GRPOConfig(**kwargs)


def test_world_size_scales_batches(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = GRPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=3, num_generations=8)
    assert cfg.world_size == 2
    assert (cfg.effective_batch_size, cfg.generation_batch_size, cfg.steps_per_generation) == (24, 24, 3)
    assert cfg.prompts_per_generation == 3
    with pytest.raises(ValueError, match="world_size 2"):
        GRPOConfig(per_device_train_batch_size=3, num_generations=4)


def test_replace_rederives_and_dict_round_trip():
    cfg = GRPOConfig(per_device_train_batch_size=4, num_generations=4, epsilon=0.1)
    bigger = cfg.replace(gradient_accumulation_steps=4, epsilon=0.3)
    assert (bigger.steps_per_generation, bigger.generation_batch_size, bigger.epsilon_high) == (4, 16, 0.3)
    assert GRPOConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert set(GRPOConfig.math_fields()) <= set(FIELDS)
    assert {"loss_type", "num_generations", "beta", "epsilon"} <= set(GRPOConfig.math_fields())
    assert bigger.changed_math_fields(cfg.to_dict()) == {
        "epsilon": (0.1, 0.3), "epsilon_high": (0.1, 0.3), "steps_per_generation": (1, 4),
        "generation_batch_size": (4, 16), "gradient_accumulation_steps": (1, 4)}


def test_scale_rewards_legacy_and_intervals():
    assert GRPOConfig(scale_rewards=True).scale_rewards == "group"
    assert GRPOConfig(scale_rewards=False).scale_rewards == "none"
    cfg = GRPOConfig(logging_steps=0.25, warmup_steps=0.1, save_steps=None)
    assert cfg.resolve_interval("logging_steps", 10) == 3 and cfg.resolve_interval("warmup_steps", 25) == 3
    assert cfg.resolve_interval("save_steps", 10) is None and cfg.resolve_interval("eval_steps", 10) is None


def _argv(cfg: GRPOConfig) -> list[str]:
    """Command-line words for every field of `cfg` that differs from the defaults, alternating '_' and '-'."""
    default, argv = GRPOConfig().to_dict(), []
    for i, (name, value) in enumerate(cfg.to_dict().items()):
        if value == default[name]:
            continue
        flag = "--" + (name.replace("_", "-") if i % 2 else name)
        if value is None:
            text = "none"
        elif isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, dict):
            text = json.dumps(value)
        elif isinstance(value, list):
            text = ",".join(str(v).replace(",", "\\,") for v in value)
        else:
            text = str(value)
        argv += [flag, text]
    return argv


def test_cli_round_trip():
    cfg = GRPOConfig(
        learning_rate=2e-6, per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
        bf16=False, gradient_checkpointing=False, max_grad_norm=None, warmup_steps=0.05, logging_steps=5,
        save_steps=None, eval_steps=50, max_prompt_length=None, max_completion_length=64, min_p=0.05, top_k=20,
        stop=["</answer>", "a,b"], reward_weights=[1.0, 0.25], epsilon_high=0.28, delta=2.0, loss_type="cispo",
        scale_rewards="batch", estimator="rloo", model_init_kwargs={"dtype": "bfloat16"}, reward_timeout=None,
        shared_prefix_update=False, skip_zero_std_groups=True, output_dir="runs/x",
    )
    parser = add_config_arguments(argparse.ArgumentParser())
    ns = parser.parse_args(_argv(cfg))
    assert config_from_args(ns) == cfg
    assert config_from_args(parser.parse_args([])) == GRPOConfig()


def test_cli_forms():
    parser = add_config_arguments(argparse.ArgumentParser())
    parser.add_argument("--model", default="tiny")  # the CLI's own flags live beside the config's
    ns = parser.parse_args(["--stop", "x,y", "--stop", "z", "--use-bias-correction-kl", "false", "--disable_dropout",
                            "--min-p", "none", "--scale_rewards", "false", "--model", "m"])
    cfg = config_from_args(ns)
    assert cfg.stop == ["x", "y", "z"] and cfg.use_bias_correction_kl is False and cfg.disable_dropout is True
    assert cfg.min_p is None and cfg.scale_rewards == "none"
    with pytest.raises(SystemExit):
        parser.parse_args(["--bf16", "maybe"])
    parser.set_defaults(save_steps=0, use_vllm=True)  # what a CLI does with a config file's keys
    with pytest.raises(ValueError, match="use_vllm=True is not supported"):
        config_from_args(parser.parse_args([]))
    parser.set_defaults(use_vllm=False)
    assert config_from_args(parser.parse_args([])).save_steps is None


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_config_file_with_trl_names_then_flags(tmp_path, suffix):
    values = {"learning_rate": 2e-6, "num_generations": 4, "use_vllm": False, "logging_first_step": True,
              "per_device_train_batch_size": 4, "activation_checkpointing": False, "report_to": "none"}
    path = tmp_path / f"cfg.{suffix}"
    if suffix == "yaml":
        yaml = pytest.importorskip("yaml")
        path.write_text(yaml.safe_dump(values))
    else:
        path.write_text(json.dumps(values))
    parser = add_config_arguments(argparse.ArgumentParser())
    cfg = config_from_args(parser.parse_args(["--learning_rate", "5e-6"]), yaml_path=path)
    assert cfg.learning_rate == 5e-6 and cfg.num_generations == 4 and cfg.gradient_checkpointing is False
    path.write_text(json.dumps({"use_vllm": True}) if suffix == "json" else "use_vllm: true\n")
    with pytest.raises(ValueError, match="use_vllm=True is not supported"):
        config_from_args(parser.parse_args([]), yaml_path=path)


@pytest.mark.parametrize("value, expected", [("full_shard", "full_shard"), ("full_shard auto_wrap", "full_shard"),
                                             (["full_shard", "auto_wrap"], "full_shard"), ("", None), (None, None)])
def test_fsdp_spellings(value, expected):
    """transformers' spellings of FSDP full sharding (a string of options or a list) all mean FSDP2 here."""
    assert GRPOConfig(fsdp=value).fsdp == expected
