"""grpo-fast train / sample / eval on a tiny model saved to disk; bad flags end in clear messages."""

import json

import pytest

from grpo_fast.cli import main
from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "tiny"
    tiny_causal_lm(seed=1).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "task.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(3) for b in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_train_from_flags_and_config_file(tmp_path, model_dir, task_file, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"task: {task_file}\nmax_steps: 2\nnum_generations: 4\nper_device_train_batch_size: 8\n"
                      "max_completion_length: 3\nreport_to: []\ngradient_checkpointing: false\n")
    out = tmp_path / "out"
    code = main(["train", "--model", str(model_dir), "--config", str(config), "--output_dir", str(out),
                 "--learning_rate", "1e-3", "--max_steps", "3", "--logging_steps", "1", "--save_steps", "3",
                 "--use_cpu", "true", "--eval_prompts", "2"])  # a flag beats the file
    assert code == 0
    rows = [r for r in json.loads((out / "log_history.json").read_text()) if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (out / "checkpoint-3" / "model.safetensors").exists()
    assert (out / "checkpoint-3" / "trainer_state.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 3 and summary["reward_last5"] is not None
    assert set(summary["eval_after"]) == {"eval_rewards/accuracy_reward/mean", "eval_reward"}
    assert "summary:" in capsys.readouterr().out


def test_unknown_config_key_names_the_closest(tmp_path, model_dir):
    config = tmp_path / "run.yaml"
    config.write_text("num_generation: 4\n")
    with pytest.raises(SystemExit, match="did you mean 'num_generations'"):
        main(["train", "--model", str(model_dir), "--config", str(config), "--output_dir", str(tmp_path)])


def test_sample_prints_the_group(model_dir, capsys):
    assert main(["sample", "--model", str(model_dir), "--prompt", "3+4=", "--chat", "false", "--num_generations",
                 "3", "--max_new_tokens", "4", "--answer", "7"]) == 0
    assert capsys.readouterr().out.count("--- completion") == 3


def test_eval_reports_greedy_accuracy(tmp_path, model_dir, task_file, capsys):
    result = tmp_path / "eval.json"
    assert main(["eval", "--model", str(model_dir), "--task", str(task_file), "--num_prompts", "5",
                 "--max_completion_length", "3", "--json", str(result)]) == 0
    data = json.loads(result.read_text())
    assert data["num_prompts"] == 5 and 0.0 <= data["eval_rewards/accuracy_reward/mean"] <= 1.0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--loss_type", "bogus"], "loss_type"),
        (["--num_generations", "1"], "at least 2 generations"),
        (["--top_p", "1.5"], "top_p"),
        (["--beta", "-1"], "beta"),
    ],
    ids=["loss_type", "num_generations", "top_p", "beta"],
)
def test_bad_flag_values_name_the_field(tmp_path, model_dir, flags, message):
    with pytest.raises((ValueError, SystemExit), match=message):
        main(["train", "--model", str(model_dir), "--output_dir", str(tmp_path), *flags])


def test_unknown_flag_and_missing_model(tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--no_such_flag", "1"])
    with pytest.raises(FileNotFoundError, match="no such local folder"):
        main(["eval", "--model", str(tmp_path / "missing")])


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("where", ["file", "flag", "flag=", "file_and_flag"])
def test_bf16_auto_follows_the_machine(tmp_path, monkeypatch, native, where):
    """``bf16: auto`` (file) or ``--bf16 auto`` (flag) is bf16 where the machine computes it natively, else fp32; a
    flag still overrides the file."""
    import grpo_fast.config as config_mod
    from grpo_fast.cli import _config

    monkeypatch.setattr(config_mod, "native_bf16", lambda: native)
    monkeypatch.setattr(config_mod.torch.cuda, "is_available", lambda: False)  # explicit values stand on any machine
    values = {"output_dir": str(tmp_path)}
    flags = {"file": [], "flag": ["--bf16", "auto"], "flag=": ["--bf16=auto"], "file_and_flag": ["--bf16", "false"]}
    if where in ("file", "file_and_flag"):
        values["bf16"] = "auto"
    config = _config(values, flags[where])
    assert config.bf16 is (native and where != "file_and_flag")
    assert config.use_cpu is native  # what transformers needs for bf16 without a GPU
