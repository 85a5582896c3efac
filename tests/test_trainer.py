"""GRPOTrainer end to end on a tiny random model: it learns, logs TRL's metric names, checkpoints and resumes."""

import json

import pytest
import torch

from grpo_fast.config import GRPOConfig
from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer
from grpo_fast.trainer import GRPOTrainer


def starts_with_7(prompts, completions, **kwargs):
    return [1.0 if c.strip().startswith("7") else 0.0 for c in completions]


def digit_reward(prompts, completions, **kwargs):
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]


def alternating(prompts, completions, **kwargs):
    return [float(i % 2) for i in range(len(completions))]


def _config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=3,
        learning_rate=3e-3,
        max_steps=4,
        logging_steps=1,
        save_steps=0,
        report_to=[],
        seed=3,
        warmup_steps=0,
        lr_scheduler_type="constant",
        gradient_checkpointing=False,
    )
    base.update(kw)
    return GRPOConfig(**base)


def _trainer(tmp_path, rewards=(starts_with_7,), model=None, **kw):
    rows = [{"prompt": "3+4="}, {"prompt": "2+5="}]
    return GRPOTrainer(
        model if model is not None else tiny_causal_lm(seed=1),
        list(rewards),
        args=_config(tmp_path, **kw),
        train_dataset=rows,
        processing_class=tiny_tokenizer(),
    )


def test_overfits_one_prompt_within_30_steps(tmp_path):
    t = GRPOTrainer(
        tiny_causal_lm(seed=1),
        [digit_reward],  # the random model answers with a digit ~1 time in 8
        args=_config(tmp_path, max_steps=30, num_generations=8, learning_rate=3e-3, max_completion_length=2),
        train_dataset=[{"prompt": "3+4="}],
        processing_class=tiny_tokenizer(),
    )
    history = t.train()
    rewards = [row["reward"] for row in history]
    assert rewards[0] < 0.5, "the random model should not start at the answer"
    assert rewards[-3:] == [1.0, 1.0, 1.0], rewards


def test_metric_names_match_trl(tmp_path):
    t = _trainer(tmp_path, rewards=(starts_with_7, digit_reward), max_steps=1, beta=0.04)
    row = t.train()[-1]
    expected = {
        "reward", "reward_std", "rewards/starts_with_7/mean", "rewards/starts_with_7/std",
        "rewards/digit_reward/mean", "completions/mean_length", "completions/clipped_ratio", "kl", "entropy",
        "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "frac_reward_zero_std",
        "grad_norm", "learning_rate", "timing/sampling_s", "timing/reward_s", "timing/update_s", "tokens_per_s",
        "completions/distinct_frac", "loss",
    }
    assert expected <= set(row), expected - set(row)
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 1


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("split", [2, 3], ids=["2+2", "3+1-mid-generation"])
def test_resume_is_bit_exact(tmp_path, split):
    full = _trainer(tmp_path / "a", max_steps=4, num_iterations=2)
    full.train()
    ref = _params(full.model)

    first = _trainer(tmp_path / "b", max_steps=split, num_iterations=2, save_steps=split)
    first.train()
    second = _trainer(tmp_path / "b", model=tiny_causal_lm(seed=99), max_steps=4, num_iterations=2, save_steps=split)
    second.train(resume_from_checkpoint=True)
    got = _params(second.model)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_checkpoint_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = _trainer(tmp_path, max_steps=1)
    t.train()
    path = t.save_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    for k, v in _params(t.model).items():
        assert torch.equal(model.state_dict()[k], v), k
    assert tok.eos_token == "<eos>"
    assert (path / "optimizer.pt").exists() and (path / "rng_state.pt").exists()


def test_save_total_limit_keeps_newest(tmp_path):
    t = _trainer(tmp_path, max_steps=3, save_steps=1, save_total_limit=2)
    t.train()
    names = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-2", "checkpoint-3"]


def test_resume_refuses_changed_math(tmp_path):
    t = _trainer(tmp_path, max_steps=1, save_steps=1)
    t.train()
    other = _trainer(tmp_path, max_steps=2, save_steps=1, loss_type="grpo")
    with pytest.raises(ValueError, match="loss_type"):
        other.train(resume_from_checkpoint=True)
    fine = _trainer(tmp_path, max_steps=2, save_steps=1, logging_steps=2)
    fine.train(resume_from_checkpoint=True)
    assert fine.step == 2


def test_reward_signature_checked_at_construction(tmp_path):
    def bad(completions):
        return [0.0] * len(completions)

    with pytest.raises(TypeError, match="f\\(prompts, completions, \\*\\*kwargs\\)"):
        _trainer(tmp_path, rewards=(bad,))


def test_chat_prompts_reach_rewards_as_messages(tmp_path):
    seen = {}

    def spy(prompts, completions, answer, **kwargs):
        seen.update(prompt=prompts[0], completion=completions[0], answer=answer[0], kw=set(kwargs))
        return [0.0] * len(completions)

    rows = [{"prompt": [{"role": "user", "content": "3+4"}], "answer": "7"}]
    t = GRPOTrainer(
        tiny_causal_lm(), [spy], args=_config(tmp_path, max_steps=1, per_device_train_batch_size=4),
        train_dataset=rows, processing_class=tiny_tokenizer(),
    )
    t.train()
    assert seen["prompt"] == rows[0]["prompt"]
    assert seen["completion"][0]["role"] == "assistant"
    assert seen["answer"] == "7"
    assert {"completion_ids", "trainer_state"} <= seen["kw"]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_shared_prefix_update_equals_padded_update(tmp_path, kind):
    """One full optimizer step with each prompt forwarded once per group == the standard padded update.
    (A large adam_epsilon keeps AdamW's first step smooth in the gradient, so fp32 rounding of near-zero gradient
    entries cannot flip a whole ``lr``-sized update.)"""
    results = []
    for shared in (True, False):
        t = _trainer(tmp_path / str(shared), model=tiny_causal_lm(kind, seed=5), max_steps=1, beta=0.04,
                     shared_prefix_update=shared, rewards=(alternating,), adam_epsilon=1e-3)
        row = t.train()[-1]
        results.append((row, _params(t.model)))
    (row_s, p_s), (row_p, p_p) = results
    assert row_s["reward"] == row_p["reward"]  # same completions: sampling does not depend on the update path
    assert row_p["grad_norm"] > 0
    assert abs(row_s["grad_norm"] - row_p["grad_norm"]) <= 1e-4 * max(row_p["grad_norm"], 1e-3)
    for k in p_p:
        torch.testing.assert_close(p_s[k], p_p[k], rtol=1e-5, atol=2e-5, msg=k)


def test_transformers_callbacks_are_called(tmp_path):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.steps, self.logged = [], []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logged.append(logs["reward"])

    rec = Recorder()
    t = GRPOTrainer(tiny_causal_lm(), [digit_reward], args=_config(tmp_path, max_steps=2),
                    processing_class=tiny_tokenizer(), train_dataset=[{"prompt": "3+4="}], callbacks=[rec])
    t.train()
    assert rec.steps == [1, 2] and len(rec.logged) == 2


def test_callback_can_stop_training(tmp_path):
    from transformers import TrainerCallback

    class StopAtTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 2

    t = GRPOTrainer(tiny_causal_lm(), [digit_reward], args=_config(tmp_path, max_steps=5),
                    processing_class=tiny_tokenizer(), train_dataset=[{"prompt": "3+4="}], callbacks=[StopAtTwo()])
    t.train()
    assert t.step == 2


def test_minibatches_that_split_groups():
    """per_device_train_batch_size < num_generations: a minibatch holds part of a group; each of its completions
    carries its own prompt copy, and its log-probs equal those of the same rows forwarded as whole groups."""
    from grpo_fast.forward import completion_logprobs
    from grpo_fast.shared_prefix import PolicyBatch
    from grpo_fast.trainer import Rollout

    g = torch.Generator().manual_seed(0)
    prompts = [[5, 6, 7], [8, 9]]
    ids = torch.randint(3, 40, (8, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[3, 2:] = 0
    batch = PolicyBatch(prompts, ids.masked_fill(mask == 0, 0), mask, 4)
    rollout = Rollout(batch, torch.zeros(8), torch.zeros(8, 5), None, mask.sum())
    model = tiny_causal_lm(seed=2)
    with torch.no_grad():
        whole, _ = completion_logprobs(model, batch, 0, 0.9, False)
        parts = []
        for k in range(4):  # minibatches of 2 rows: half a group each
            mb, rows = rollout.minibatch(k, 4)
            assert mb.group_size == 1 and rows == slice(2 * k, 2 * k + 2)
            assert mb.prompt_ids == [prompts[(2 * k) // 4]] * 2
            parts.append(completion_logprobs(model, mb, 0, 0.9, False)[0])
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-5, rtol=1e-5)


def test_trainer_runs_with_split_groups(tmp_path):
    cfg = _config(tmp_path, per_device_train_batch_size=2, steps_per_generation=4, max_steps=2)
    trainer = GRPOTrainer(tiny_causal_lm(), [alternating], args=cfg, train_dataset=[{"prompt": "3+4="}] * 4,
                          processing_class=tiny_tokenizer())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    history = trainer.train()
    assert [row["step"] for row in history if "loss" in row] == [1, 2]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in history if "loss" in row)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
