"""DAPO's dynamic sampling (``skip_zero_std_groups``) on the TRL base: zero-std groups are replaced, the merged batch
is what TRL's calls returned for the groups kept (re-padded), advantages are TRL's, and the flag off changes nothing.

A reward that is constant for the prompt "1+1=" and alternates 0, 1 over rows otherwise makes exactly the "1+1="
groups zero-std. Each generation call is recorded (its output and TRL's gathered rewards) by wrapping the method the
mixin calls, so the final batch can be traced back, group by group, to the call that produced it.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset, IterableDataset

from grpo_fast import GRPOConfig, GRPOTrainer
from grpo_fast.dynamic_sampling import trl_advantages, zero_std_groups
from grpo_fast.integrations.trl_sampler import SharedPrefixGeneration
from grpo_fast.testing import tiny_tokenizer

G = 4
CONST = "1+1="
DATA = ["1+1=", "22+22=", "1+1=", "333+333=", "5+5="]  # replacements are shorter than the longest batch prompt


def by_prompt(prompts, completions, **kw):
    return [0.5 if p == CONST else float(i % 2) for i, p in enumerate(prompts)]


def by_length(prompts, completions, **kw):
    return [float(len(c) % 3) for c in completions]


def _trainer(tmp_path, model_path, rewards=(by_prompt,), data=DATA, **kw):
    base = {"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none", "per_device_train_batch_size": 12,
            "num_generations": G, "max_completion_length": 6, "seed": 0, "logging_steps": 1, "beta": 0.04,
            "num_iterations": 2, "skip_zero_std_groups": True, "plot": False, "max_steps": 1, "learning_rate": 1e-3}
    base.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = Dataset.from_list([{"prompt": p} for p in data])
        t = GRPOTrainer(model_path, list(rewards), args=GRPOConfig(**base), train_dataset=data,
                        processing_class=tiny_tokenizer())
    t.model.train()
    return t


@pytest.fixture
def calls(monkeypatch):
    """Every TRL generation call: (its output, TRL's gathered rewards ``[N, F]``)."""
    recorded = []
    original = SharedPrefixGeneration._generate_and_score_completions

    def spy(self, inputs):
        out = original(self, inputs)
        recorded.append((out, self._gathered_rewards.clone()))
        return out

    monkeypatch.setattr(SharedPrefixGeneration, "_generate_and_score_completions", spy)
    return recorded


def _batch(*prompts):
    return [{"prompt": p} for p in prompts for _ in range(G)]


def _group_key(out, j):
    """The group's content without padding: its prompt tokens and each row's completion tokens."""
    rows = range(j * G, (j + 1) * G)
    prompt = tuple(out["prompt_ids"][j * G][out["prompt_mask"][j * G].bool()].tolist())
    completions = tuple(tuple(out["completion_ids"][r][out["completion_mask"][r].bool()].tolist()) for r in rows)
    return prompt, completions


def _weights(t):
    return t.reward_weights.to(torch.float32)


def _ds_metrics(t):
    return {k.split("/")[1]: v for k, v in t._metrics["train"].items() if k.startswith("dynamic_sampling/")}


@pytest.mark.parametrize("scale_rewards", ["group", "batch"])
def test_zero_std_groups_are_replaced_and_merged_consistently(tmp_path, model_path, calls, scale_rewards):
    t = _trainer(tmp_path, model_path, scale_rewards=scale_rewards)
    pad = t.processing_class.pad_token_id
    out = t._generate_and_score_completions(_batch(CONST, "4444+4444=", CONST))
    assert len(calls) >= 2  # the first batch and at least one round of fresh prompts
    assert _ds_metrics(t) == {"replaced_groups": [2.0], "zero_std_groups": [0.0], "rounds": [len(calls) - 1.0]}

    sources = {}
    for c, (o, rewards) in enumerate(calls):
        for j in range(o["prompt_ids"].size(0) // G):
            sources.setdefault(_group_key(o, j), (c, j))
    P = out["prompt_ids"].size(1)
    used, final_rewards = [], []
    for j in range(3):
        rows = slice(j * G, (j + 1) * G)
        c, k = sources[_group_key(out, j)]  # every final group is one a call produced
        src, src_rewards = calls[c]
        used.append(c)
        final_rewards.append(src_rewards[k * G : (k + 1) * G])
        srows = slice(k * G, (k + 1) * G)
        # prompts left-padded to the final width, completions right-padded; pads hold the pad token
        sp, sl = src["prompt_ids"].size(1), src["completion_ids"].size(1)
        assert torch.equal(out["prompt_mask"][rows, P - sp :], src["prompt_mask"][srows])
        assert not out["prompt_mask"][rows, : P - sp].any()
        assert torch.equal(out["prompt_ids"][rows, P - sp :], src["prompt_ids"][srows])
        assert (out["prompt_ids"][rows, : P - sp] == pad).all()
        assert torch.equal(out["completion_mask"][rows, :sl], src["completion_mask"][srows])
        assert not out["completion_mask"][rows, sl:].any()
        assert torch.equal(out["completion_ids"][rows, :sl], src["completion_ids"][srows])
        assert (out["completion_ids"][rows, sl:] == pad).all()
        for key in ("old_per_token_logps", "ref_per_token_logps", "sampling_per_token_logps"):
            assert torch.equal(out[key][rows, :sl], src[key][srows]), key
        if scale_rewards == "group":  # a group's advantages are those its own call computed
            torch.testing.assert_close(out["advantages"][rows], src["advantages"][srows], rtol=0, atol=0)
    assert used[1] == 0 and used[0] > 0 and used[2] > 0  # the informative group stayed, the "1+1=" ones did not
    assert "1+1=" not in t.processing_class.batch_decode(out["prompt_ids"], skip_special_tokens=True)
    final_rewards = torch.cat(final_rewards)  # [N, F]
    assert not zero_std_groups(final_rewards, _weights(t), G, "sum_then_normalize").any()
    expected = trl_advantages(final_rewards, _weights(t), G, "sum_then_normalize", scale_rewards)
    torch.testing.assert_close(out["advantages"], expected)
    assert min(calls[c][0]["prompt_ids"].size(1) for c in used) < P  # the re-padding was exercised
    assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum())
    assert set(out) == set(calls[0][0])


@pytest.mark.parametrize("scale_rewards, aggregation", [
    ("group", "sum_then_normalize"), ("batch", "sum_then_normalize"), ("none", "sum_then_normalize"),
    ("group", "normalize_then_sum"),
])
def test_flag_off_is_trls_call_and_advantages_mirror_trl(tmp_path, model_path, calls, scale_rewards, aggregation):
    t = _trainer(tmp_path, model_path, rewards=(by_prompt, by_length), skip_zero_std_groups=False,
                 scale_rewards=scale_rewards, multi_objective_aggregation=aggregation)
    out = t._generate_and_score_completions(_batch(CONST, "22+22=", CONST))
    assert len(calls) == 1 and out is calls[0][0]
    assert not _ds_metrics(t)
    expected = trl_advantages(calls[0][1], _weights(t), G, aggregation, scale_rewards)
    torch.testing.assert_close(out["advantages"], expected)


def test_nothing_to_replace_and_eval_mode_return_trls_batch(tmp_path, model_path, calls):
    t = _trainer(tmp_path, model_path)
    out = t._generate_and_score_completions(_batch("22+22=", "5+5=", "333+333="))
    assert len(calls) == 1 and out is calls[0][0]
    assert _ds_metrics(t) == {"replaced_groups": [0.0], "zero_std_groups": [0.0], "rounds": [0.0]}
    t.model.eval()
    out = t._generate_and_score_completions(_batch(CONST, CONST, CONST))
    assert len(calls) == 2 and out is calls[1][0]
    assert _ds_metrics(t)["rounds"] == [0.0]  # nothing added in eval mode


@pytest.mark.parametrize("rounds", [0, 2])
def test_zero_std_groups_left_after_the_limit_stay(tmp_path, model_path, calls, rounds):
    t = _trainer(tmp_path, model_path, data=[CONST], max_resample_rounds=rounds)  # every fresh group is zero-std
    out = t._generate_and_score_completions(_batch(CONST, "22+22=", "5+5="))
    assert len(calls) == 1 + rounds and out is calls[0][0]
    assert _ds_metrics(t) == {"replaced_groups": [0.0], "zero_std_groups": [1.0], "rounds": [float(rounds)]}
    # each round's "1+1=" group is sampled with seeds of its own (the step's prompt counter continues), so the same
    # prompt drawn again is a new group, not a copy of the one it replaces
    groups = [_group_key(o, 0) for o, _ in calls]
    assert len(set(groups)) == len(groups)


def test_short_training_run(tmp_path, model_path):
    t = _trainer(tmp_path, model_path, max_steps=2, num_iterations=1, per_device_train_batch_size=8)
    before = [p.detach().clone() for p in t.model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.train()
    logged = [row for row in t.state.log_history if "dynamic_sampling/rounds" in row]
    assert len(logged) == 2
    assert all(row["dynamic_sampling/zero_std_groups"] == 0 for row in logged)
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters()))


def test_invalid_setups_are_refused(tmp_path, model_path):
    with pytest.raises(ValueError, match="max_resample_rounds"):
        GRPOConfig(output_dir=str(tmp_path), max_resample_rounds=-1)
    t = _trainer(tmp_path, model_path)
    with pytest.raises(ValueError, match="whole groups"):
        t._generate_and_score_completions([{"prompt": CONST}] * (G + 2))
    stream = IterableDataset.from_generator(lambda: iter([{"prompt": p} for p in DATA]))
    with pytest.raises(ValueError, match="map-style"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GRPOTrainer(model_path, [by_prompt], train_dataset=stream, processing_class=tiny_tokenizer(),
                    args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1,
                                    per_device_train_batch_size=G, num_generations=G, skip_zero_std_groups=True))


def test_two_processes_replace_their_own_groups(tmp_path):
    """Ranks with different numbers of zero-std groups make the same collective calls (no hang, no size mismatch),
    each fills its own slots, and the metrics are summed over ranks."""
    worker = Path(__file__).with_name("dynamic_sampling_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(29500 + os.getpid() % 1000), str(worker), str(tmp_path)]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:
        assert r["metrics"]["dynamic_sampling/replaced_groups"] == [3.0]
        assert r["metrics"]["dynamic_sampling/zero_std_groups"] == [0.0]
        assert CONST not in r["prompts"] and torch.isfinite(r["advantages"]).all()
    assert ranks[0]["metrics"]["dynamic_sampling/rounds"] == ranks[1]["metrics"]["dynamic_sampling/rounds"]
    assert ranks[0]["prompts"][G:] == ["22+22="] * G + ["5+5="] * G  # rank 0's informative groups stay in place
    assert ranks[1]["prompts"][G : 2 * G] == ["333+333="] * G
