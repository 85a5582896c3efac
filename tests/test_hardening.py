"""What long runs hit: degenerate batches, broken reward functions, non-finite steps, killed saves, bad input.

Each case runs the real trainer on a tiny model and checks: no NaN in loss, parameters or optimizer state; the
step taken or skipped as documented; the metrics say what happened.
"""

import math
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from grpo_fast.checkpoint import latest_checkpoint
from grpo_fast.config import GRPOConfig
from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer
from grpo_fast.trainer import GRPOTrainer

ROWS = [{"prompt": "3+4=", "answer": "7"}, {"prompt": "12+30=", "answer": "42"}]


def const(value):
    def const_reward(prompts, completions, **kw):
        return [value] * len(completions)

    return const_reward


def alternating(prompts, completions, **kw):
    return [float(i % 2) for i in range(len(completions))]


def _trainer(tmp_path, rewards, rows=ROWS, model=None, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                max_completion_length=3, learning_rate=1e-3, max_steps=1, logging_steps=1, save_steps=0,
                report_to=[], seed=0, gradient_checkpointing=False, warmup_steps=0)
    base.update(kw)
    return GRPOTrainer(model or tiny_causal_lm(), list(rewards), args=GRPOConfig(**base), train_dataset=rows,
                       processing_class=tiny_tokenizer())


def _assert_finite(t: GRPOTrainer):
    for name, p in t.model.named_parameters():
        assert torch.isfinite(p).all(), name
    for state in t.optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                assert torch.isfinite(v).all()


def _run(t):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = t.train()[-1]
    _assert_finite(t)
    return row


@pytest.mark.parametrize("value", [0.0, 1.0, 0.35], ids=["zeros", "ones", "0.35"])
def test_all_rewards_equal_gives_zero_update(tmp_path, value):
    t = _trainer(tmp_path, [const(value)])
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    row = _run(t)
    assert row["frac_reward_zero_std"] == 1.0 and row["skipped_steps"] == 0.0
    assert row["grad_norm"] == 0.0
    # AdamW with zero gradients and no weight decay leaves the weights where they were
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_one_zero_std_group_among_others(tmp_path):
    def first_group_flat(prompts, completions, **kw):
        return [0.5 if i < 4 else float(i % 2) for i in range(len(completions))]

    row = _run(_trainer(tmp_path, [first_group_flat]))
    assert row["frac_reward_zero_std"] == 0.5
    assert row["grad_norm"] > 0


def test_all_truncated_and_masked(tmp_path):
    row = _run(_trainer(tmp_path, [alternating], mask_truncated_completions=True, max_completion_length=1))
    assert row["completions/clipped_ratio"] == 1.0
    assert row["grad_norm"] == 0.0 and row["skipped_steps"] == 0.0


def test_empty_completions(tmp_path):
    model = tiny_causal_lm()
    with torch.no_grad():  # make EOS overwhelmingly likely: every completion ends at its first token
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[1] = 100.0
    row = _run(_trainer(tmp_path, [alternating], model=model))
    assert row["completions/mean_length"] == 1.0  # the EOS token itself, as in TRL


@pytest.mark.parametrize(
    "values, failures",
    [([None], 0), ([float("nan")], 0), ([float("inf")], 0), ([float("-inf")], 0), (["seven"], 1), ([object()], 1)],
    ids=["none", "nan", "inf", "-inf", "string", "object"],
)
def test_unusable_rewards_are_unscored(tmp_path, values, failures):
    def bad(prompts, completions, **kw):
        return values * len(completions)

    row = _run(_trainer(tmp_path, [bad, alternating]))
    assert row["rewards/bad/failures"] == failures * 8
    assert row["grad_norm"] > 0  # the other function still gives signal (TRL's nansum semantics)


def test_reward_function_that_raises_is_counted(tmp_path):
    def boom(prompts, completions, **kw):
        raise RuntimeError("verifier crashed")

    row = _run(_trainer(tmp_path, [boom, alternating]))
    assert row["rewards/boom/failures"] == 8


def test_reward_function_that_hangs_times_out(tmp_path):
    def slow(prompts, completions, **kw):
        time.sleep(5)
        return [1.0] * len(completions)

    t0 = time.perf_counter()
    row = _run(_trainer(tmp_path, [slow, alternating], reward_timeout=0.2))
    assert row["rewards/slow/failures"] == 8
    assert time.perf_counter() - t0 < 4.5


def test_wrong_length_reward_list_raises(tmp_path):
    def short(prompts, completions, **kw):
        return [1.0]

    with pytest.raises(ValueError, match="returned 1 rewards, but 8 were expected"):
        _trainer(tmp_path, [short]).train()


def test_three_functions_one_always_none(tmp_path):
    def never(prompts, completions, **kw):
        return [None] * len(completions)

    def half(prompts, completions, **kw):
        return [0.5] * len(completions)

    row = _run(_trainer(tmp_path, [alternating, never, half]))
    assert row["grad_norm"] > 0
    assert row["rewards/never/mean"] is None  # NaN for the batch, logged as None like TRL
    assert row["rewards/half/mean"] == 0.5 and row["reward"] == 1.0


def test_group_of_two_and_long_prompt(tmp_path):
    rows = [{"prompt": "1+1="}, {"prompt": "12345+67890+11111+22222+33333="}]
    row = _run(_trainer(tmp_path, [alternating], rows=rows, num_generations=2, per_device_train_batch_size=4))
    assert math.isfinite(row["grad_norm"])


def test_prompt_longer_than_max_prompt_length_is_left_truncated(tmp_path):
    t = _trainer(tmp_path, [alternating], rows=[{"prompt": "0123456789="}], max_prompt_length=4)
    with pytest.warns(UserWarning, match="left-truncated"):
        ids = t.encode("0123456789=")
    assert t.tokenizer.decode(ids) == "789="


def test_nonfinite_gradient_skips_step_and_stops_after_k(tmp_path):
    t = _trainer(tmp_path, [alternating], max_steps=5, max_consecutive_skipped_steps=3)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    real = t._minibatch_loss

    def poisoned(*a, **k):
        loss, m = real(*a, **k)
        return loss * float("nan"), m

    t._minibatch_loss = poisoned
    with pytest.raises(RuntimeError, match="3 consecutive optimizer steps had a non-finite"):
        t.train()
    assert not t.optimizer.state, "a skipped step must leave the optimizer state untouched"
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert t.log.history[-1]["skipped_steps"] == 1.0


_SAVE_SCRIPT = """
import sys, warnings
warnings.simplefilter("ignore")
from grpo_fast.config import GRPOConfig
from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer
from grpo_fast.trainer import GRPOTrainer
cfg = GRPOConfig(output_dir=sys.argv[1], per_device_train_batch_size=4, num_generations=4, max_completion_length=2,
                 max_steps=200, save_steps=1, logging_steps=1, report_to=[], gradient_checkpointing=False)
t = GRPOTrainer(tiny_causal_lm(hidden_size=128), [lambda prompts, completions, **kw: [0.0, 1.0] * 2], args=cfg,
                train_dataset=[{"prompt": "1+1="}], processing_class=tiny_tokenizer())
t.train()
"""


def test_kill_during_checkpoint_save_keeps_previous(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_SCRIPT, str(out)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("checkpoint-*"))) < 2:
        time.sleep(0.05)
    time.sleep(0.137)  # land somewhere inside a later save
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = latest_checkpoint(out)
    assert latest is not None
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(latest)  # complete and loadable
    t = _trainer(tmp_path, [alternating], output_dir=str(out), per_device_train_batch_size=4,
                 max_completion_length=2, max_steps=int(latest.name.split("-")[1]) + 1, rows=[{"prompt": "1+1="}],
                 learning_rate=1e-6,
                 model=tiny_causal_lm(hidden_size=128))
    _run_resume = t.train(resume_from_checkpoint=True)
    assert t.step == int(latest.name.split("-")[1]) + 1 and _run_resume


def test_dataset_without_prompt_column(tmp_path):
    with pytest.raises(ValueError, match=r"no 'prompt' column; columns found: \['answer', 'question'\]"):
        _trainer(tmp_path, [alternating], rows=[{"question": "1+1", "answer": "2"}])


def test_chat_prompts_without_chat_template(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = None
    t = GRPOTrainer(tiny_causal_lm(), [alternating], args=GRPOConfig(output_dir=str(tmp_path), report_to=[],
                    per_device_train_batch_size=8, num_generations=4, max_steps=1),
                    train_dataset=[{"prompt": [{"role": "user", "content": "hi"}]}], processing_class=tok)
    with pytest.raises(ValueError, match="no chat_template"):
        t.train()


def test_missing_model_path():
    from grpo_fast.models import load_model

    with pytest.raises(FileNotFoundError, match="no such local folder"):
        load_model("/nonexistent/model")


def test_tokenizer_without_pad_uses_eos(tmp_path):
    tok = tiny_tokenizer()
    tok.pad_token = None
    t = GRPOTrainer(tiny_causal_lm(), [alternating], args=GRPOConfig(output_dir=str(tmp_path), report_to=[],
                    per_device_train_batch_size=8, num_generations=4, max_steps=1), train_dataset=ROWS,
                    processing_class=tok)
    assert t.tokenizer.pad_token == "<eos>"


def test_preflight_warns_when_batch_cannot_fit(tmp_path, monkeypatch):
    import grpo_fast.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)
    t = _trainer(tmp_path, [alternating])
    with pytest.warns(UserWarning, match="lower per_device_train_batch_size"):
        t.train()


def test_dynamic_sampling_replaces_zero_std_groups(tmp_path):
    def by_prompt(prompts, completions, **kw):  # "1+1=" groups always score 0.5: no signal
        return [0.5 if p == "1+1=" else float(i % 2) for i, p in enumerate(prompts)]

    rows = [{"prompt": "1+1="}, {"prompt": "2+2="}, {"prompt": "3+3="}, {"prompt": "1+1="}]
    row = _run(_trainer(tmp_path, [by_prompt], rows=rows, skip_zero_std_groups=True, max_steps=2))
    assert row["frac_reward_zero_std"] == 0.0  # every kept group carries signal

    flat = [{"prompt": "1+1="}]
    row = _run(_trainer(tmp_path / "flat", [by_prompt], rows=flat, skip_zero_std_groups=True))
    assert row["skipped_zero_std_groups"] == 10.0  # 2 groups x (1 + 4 extra rounds), then the batch is filled anyway
    assert row["frac_reward_zero_std"] == 1.0
