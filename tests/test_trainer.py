"""grpo_fast.GRPOTrainer end to end on a tiny random model: it is TRL's trainer (state, metrics, config), it learns,
and grpo_fast's own options work: reward time-outs and crash isolation, skipped non-finite steps, sampling seeds,
the metrics plot. (TRL's own tests run on it in tests/trl_compat; its seams are checked against TRL's math in
test_trl_update.py and test_trl_sampler.py.)"""

import asyncio
import time
import warnings

import pytest
import torch
import trl
from datasets import Dataset

from grpo_fast import GRPOConfig, GRPOTrainer
from grpo_fast.config import OWN_DEFAULTS, own_option
from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer

PROMPTS = Dataset.from_list([{"prompt": "3+4="}, {"prompt": "2+5="}])


def digit_reward(prompts, completions, **kwargs):
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]


def length_reward(prompts, completions, **kwargs):
    return [0.1 * len(c) for c in completions]


def _args(tmp_path, cls=GRPOConfig, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                max_completion_length=3, learning_rate=3e-3, max_steps=2, logging_steps=1, save_strategy="no",
                report_to="none", seed=3, disable_tqdm=True, lr_scheduler_type="constant", gradient_checkpointing=False,
                use_cpu=True)
    base.update(kw)
    return cls(**base)


def _trainer(tmp_path, rewards=(digit_reward,), model=None, dataset=PROMPTS, cls=GRPOTrainer, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model if model is not None else tiny_causal_lm(seed=1), list(rewards), args=_args(tmp_path, **kw),
                   train_dataset=dataset, processing_class=tiny_tokenizer())


def _train(trainer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return [row for row in trainer.state.log_history if "reward" in row]


def test_is_trls_trainer_and_config():
    assert issubclass(GRPOTrainer, trl.GRPOTrainer) and issubclass(GRPOConfig, trl.GRPOConfig)


def test_overfits_one_prompt_within_30_steps(tmp_path):
    t = _trainer(tmp_path, dataset=Dataset.from_list([{"prompt": "3+4="}]), max_steps=20, num_generations=8,
                 max_completion_length=2)
    rewards = [row["reward"] for row in _train(t)]
    assert rewards[0] < 0.5, "the random model should not start at the answer"
    assert sum(rewards[-5:]) / 5 >= 0.9, rewards
    assert t.state.global_step == 20


def test_metric_names_are_trls_plus_ours(tmp_path):
    path = tmp_path / "model"  # TRL builds its reference model (beta > 0) from a path
    tiny_causal_lm(seed=1).save_pretrained(path)
    rewards = (digit_reward, length_reward)
    ours = _train(_trainer(tmp_path / "ours", rewards, model=str(path), max_steps=1, beta=0.04))[-1]
    theirs = _train(_trainer(tmp_path / "trl", rewards, model=str(path), max_steps=1, beta=0.04,
                             cls=trl.GRPOTrainer))[-1]
    assert "kl" in ours
    assert set(theirs) <= set(ours), set(theirs) - set(ours)
    assert set(ours) - set(theirs) == {"skipped_steps", "rewards/digit_reward/failures",
                                       "rewards/length_reward/failures"}


def test_default_args_are_ours_and_trls_config_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = GRPOTrainer(tiny_causal_lm(), digit_reward, train_dataset=PROMPTS, processing_class=tiny_tokenizer())
    assert type(t.args) is GRPOConfig and t.args.output_dir.endswith("-GRPO")
    t = _trainer(tmp_path, cls=GRPOTrainer, **{})  # our config
    theirs = _args(tmp_path, cls=trl.GRPOConfig)  # TRL's config: our options take their defaults
    assert {name: own_option(theirs, name) for name in OWN_DEFAULTS} == OWN_DEFAULTS
    assert t.use_shared_prefix_sampler and t.use_shared_prefix_update


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU default")
def test_bf16_unset_is_fp32_on_cpu_and_explicit_bf16_is_kept(tmp_path):
    assert GRPOConfig(output_dir=str(tmp_path)).bf16 is False
    assert trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True).bf16 is True  # TRL's default, changed on CPUs
    assert GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=True).bf16 is True


@pytest.mark.parametrize("field, value, match", [
    ("reward_errors", "ignore", "reward_errors must be one of unscored, raise"),
    ("reward_timeout", 0, "reward_timeout must be None or a number of seconds > 0"),
    ("max_consecutive_skipped_steps", -1, "max_consecutive_skipped_steps must be an int >= 0"),
])
def test_bad_own_options_are_refused_by_name(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(output_dir=str(tmp_path), **{field: value})


# ---------------------------------------------------------------------------------------------- reward functions
def boom(prompts, completions, **kwargs):
    raise RuntimeError("verifier crashed")


def hang(prompts, completions, **kwargs):
    time.sleep(30)
    return [1.0] * len(prompts)


async def async_boom(prompts, completions, **kwargs):
    raise RuntimeError("async verifier crashed")


async def async_hang(prompts, completions, **kwargs):
    await asyncio.sleep(30)
    return [1.0] * len(prompts)


def not_numbers(prompts, completions, **kwargs):
    return ["high" if i % 2 else 1.0 for i in range(len(prompts))]


@pytest.mark.parametrize("bad, failures", [(boom, 8), (hang, 8), (async_boom, 8), (async_hang, 8),
                                           (not_numbers, 4)])
def test_bad_reward_function_is_unscored_and_counted(tmp_path, bad, failures):
    t = _trainer(tmp_path, rewards=(digit_reward, bad), max_steps=1, reward_timeout=0.3)
    start = time.perf_counter()
    with pytest.warns(UserWarning, match=bad.__name__):
        t.train()
    assert time.perf_counter() - start < 20, "a hanging reward function must be abandoned after reward_timeout"
    row = [r for r in t.state.log_history if "reward" in r][-1]
    assert row[f"rewards/{bad.__name__}/failures"] == failures
    assert row["rewards/digit_reward/failures"] == 0
    assert row["reward"] == pytest.approx(row["rewards/digit_reward/mean"] + (
        0.5 if bad is not_numbers else 0.0))  # the unscored rewards are left out of the sum (nansum)


@pytest.mark.parametrize("bad, error", [(boom, RuntimeError), (hang, TimeoutError)])
def test_reward_errors_raise_is_trls_behaviour(tmp_path, bad, error):
    t = _trainer(tmp_path, rewards=(bad,), max_steps=1, reward_timeout=0.3, reward_errors="raise")
    with pytest.raises(error):
        t.train()


def test_wrong_length_reward_list_still_raises(tmp_path):
    def short(prompts, completions, **kwargs):
        return [1.0]

    with pytest.raises(ValueError, match="returned 1 rewards, but 8 were expected"):
        _trainer(tmp_path, rewards=(short,), max_steps=1).train()


def test_guard_keeps_name_and_async(tmp_path):
    t = _trainer(tmp_path, rewards=(digit_reward, async_boom, boom))
    assert t.reward_func_names == ["digit_reward", "async_boom", "boom"]
    assert [f.__name__ for f in t.reward_funcs] == t.reward_func_names
    assert asyncio.iscoroutinefunction(t.reward_funcs[1]) and not asyncio.iscoroutinefunction(t.reward_funcs[2])


# ---------------------------------------------------------------------------------------------- non-finite steps
def _poison(model, steps: set[int]):
    """NaN in the LM head's gradient on the given backward passes (1-based)."""
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] in steps else grad

    model.lm_head.weight.register_hook(hook)


def test_nonfinite_gradient_skips_the_step(tmp_path):
    model = tiny_causal_lm(seed=1)
    _poison(model, {1})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = _trainer(tmp_path, model=model, max_steps=1)
    rows = _train(t)
    assert rows[-1]["skipped_steps"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items()), "a skipped step changed weights"
    model = tiny_causal_lm(seed=1)
    _poison(model, {1})
    rows = _train(_trainer(tmp_path / "b", model=model, max_steps=3))
    assert [r["skipped_steps"] for r in rows] == [1.0, 0.0, 0.0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    model = tiny_causal_lm(seed=1)
    _poison(model, set(range(1, 100)))
    t = _trainer(tmp_path, model=model, max_steps=10, max_consecutive_skipped_steps=2)
    with pytest.raises(RuntimeError, match=r"3 consecutive optimizer steps had a non-finite gradient"):
        _train(t)
    assert t.state.global_step == 2  # the third skip raised inside step 3


# ---------------------------------------------------------------------------------------------- seeds and plot
def test_sampling_seeds_depend_on_seed_step_and_mode_only(tmp_path):
    t = _trainer(tmp_path)
    t.model.train()
    first = t._prompt_seeds(3)
    torch.manual_seed(123)  # the global RNG does not enter
    assert t._prompt_seeds(3) == first and len(set(first)) == 3
    t.state.global_step = 1
    assert not set(t._prompt_seeds(3)) & set(first)
    t.state.global_step = 0
    t.model.eval()
    assert not set(t._prompt_seeds(3)) & set(first)


def test_sampler_receives_the_seeds(tmp_path, monkeypatch):
    from grpo_fast.sampler import SharedPrefixSampler

    seen = []
    generate = SharedPrefixSampler.generate

    def spy(self, prompts, **kw):
        seen.append(kw["seed"])
        return generate(self, prompts, **kw)

    monkeypatch.setattr(SharedPrefixSampler, "generate", spy)
    t = _trainer(tmp_path, max_steps=1)
    _train(t)
    assert len(seen) == 1 and len(seen[0]) == 2  # two prompts, one seed each
    t.state.global_step = 0
    t.model.train()
    assert seen[0] == t._prompt_seeds(2)


def test_plot_is_written_unless_off(tmp_path):
    pytest.importorskip("matplotlib")
    _train(_trainer(tmp_path / "on", max_steps=2))
    assert (tmp_path / "on" / "out" / "metrics.png").stat().st_size > 1000
    _train(_trainer(tmp_path / "off", max_steps=1, plot=False))
    assert not (tmp_path / "off" / "out" / "metrics.png").exists()
