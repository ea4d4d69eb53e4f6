"""text-generation end to end on a tiny LLaMA built offline: it learns, the adapter reloads exactly, the run
folder and events match the image trainer's, target modules follow the architecture, bad inputs fail in one line."""

import csv
import json
import logging

import pytest
import torch

from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError, ModelError
from lora_trainer.events import CheckpointSaved, EventBus, Finished, Progress, Started

pytest.importorskip("peft")

from lora_trainer.text.demo import FACTS  # noqa: E402 (after the skip: it is only useful with peft)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and 2-core CI machines are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from lora_trainer.text.demo import write_demo_dataset
    from lora_trainer.text.tiny import save_tiny_causal_lm

    root = tmp_path_factory.mktemp("text")
    save_tiny_causal_lm(root / "tiny-llama", [p + c for p, c in FACTS], "llama", seed=0)
    write_demo_dataset(root / "facts.jsonl")
    return root


def text_config(workdir, **changes) -> TrainConfig:
    values = {"task_type": "text-generation", "base_model": str(workdir / "tiny-llama"),
              "train_data_dir": str(workdir / "facts.jsonl"), "output_dir": str(workdir / "runs"),
              "max_seq_length": 64, "lora_rank": 8, "learning_rate": 2e-2, "batch_size": 6, "max_train_steps": 120,
              "save_steps": 50, "keep_checkpoints": 1, "seed": 0, "device": "cpu"}
    return TrainConfig.from_dict({**values, **changes})


@pytest.fixture(scope="module")
def trained(workdir):
    from lora_trainer.text.runner import run_text_training

    events, bus = [], EventBus()
    bus.subscribe(events.append)
    logger = logging.getLogger("lora_trainer")
    level = logger.level
    logger.setLevel(logging.INFO)  # what the CLI's logging setup does; train.log gets INFO lines
    try:
        result = run_text_training(text_config(workdir, output_name="facts", log_with="tensorboard"), events=bus)
    finally:
        logger.setLevel(level)
    return result, events


def load_base(workdir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(workdir / "tiny-llama"), local_files_only=True)


def test_tiny_model_learns_the_training_lines(workdir, trained):
    from peft import PeftModel

    from lora_trainer.text.model import greedy_generate, load_tokenizer

    result, _ = trained
    with open(result.run_dir / "metrics.csv", newline="") as fh:
        losses = [float(row["loss"]) for row in csv.DictReader(fh)]
    assert len(losses) == 120 and losses[-1] < losses[0] / 2
    assert result.loss_after < result.loss_before / 2

    tokenizer = load_tokenizer(workdir / "tiny-llama")
    base = load_base(workdir)
    before = [greedy_generate(base, tokenizer, prompt, max_new_tokens=12) for prompt, _ in FACTS]
    tuned = PeftModel.from_pretrained(base, str(result.lora_path))
    after = [greedy_generate(tuned, tokenizer, prompt, max_new_tokens=12) for prompt, _ in FACTS]
    for (_, completion), old, new in zip(FACTS, before, after):
        assert not old.startswith(completion)
        assert new == completion


def test_saved_adapter_gives_the_trained_models_logits(workdir, trained):
    from peft import PeftModel

    from lora_trainer.checkpoints import latest_checkpoint, load_checkpoint_state
    from lora_trainer.text.model import attach_lora, lora_parameters

    result, _ = trained
    config = text_config(workdir)
    state = load_checkpoint_state(latest_checkpoint(result.run_dir))
    assert state["step"] == 120
    trained_model = attach_lora(load_base(workdir), config.lora_rank, config.lora_alpha, [], config.seed)
    with torch.no_grad():
        for name, param in lora_parameters(trained_model).items():
            param.copy_(state["lora"][name])  # the LoRA weights exactly as they were at the last step
    reloaded = PeftModel.from_pretrained(load_base(workdir), str(result.lora_path))
    ids = torch.tensor([list(range(3, 40))])
    trained_model.eval()
    with torch.no_grad():
        expected, got = trained_model(input_ids=ids).logits, reloaded(input_ids=ids).logits
        base = load_base(workdir)(input_ids=ids).logits
    assert torch.equal(expected, got)
    assert not torch.allclose(base, got)


def test_run_folder_layout_and_events(trained):
    result, events = trained
    run = result.run_dir
    assert result.lora_path == run / "facts" and not result.stopped and result.steps == 120
    for name in ("config.yaml", "train.log", "metrics.csv", "loss.png", "facts/adapter_model.safetensors",
                 "facts/adapter_config.json", "checkpoints/checkpoint-000120/training_state.pt",
                 "checkpoints/checkpoint-000120/facts/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint-000120"]  # keep_checkpoints: 1
    adapter_config = json.loads((run / "facts" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 8
    assert sorted(adapter_config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    log = (run / "train.log").read_text()
    assert "text data: 6 prompt record(s) -> 6 sequence(s)" in log and "saved the adapter" in log

    assert isinstance(events[0], Started) and events[0].total_steps == 120 and events[0].num_images == 6
    assert isinstance(events[-1], Finished) and events[-1].lora_path == result.lora_path
    assert [e.step for e in events if isinstance(e, Progress)] == list(range(1, 121))
    assert [e.step for e in events if isinstance(e, CheckpointSaved)] == [50, 100, 120]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(run / "tensorboard")).Reload().Scalars("loss/train")
    assert [s.step for s in scalars] == list(range(1, 121))  # log_with: tensorboard works for LLM LoRAs too


def test_target_modules_follow_the_architecture(tmp_path):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from lora_trainer.text.model import attach_lora, default_target_modules, resolve_target_modules
    from lora_trainer.text.tiny import save_tiny_causal_lm

    gpt2 = AutoModelForCausalLM.from_pretrained(str(save_tiny_causal_lm(tmp_path / "gpt2", ["abc"], "gpt2")))
    assert default_target_modules(gpt2) == ["c_attn", "c_proj"]
    adapted = attach_lora(gpt2, 4, None, [], seed=0)
    assert adapted.peft_config["default"].fan_in_fan_out  # GPT-2's Conv1D stores weights transposed
    lora_layers = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in adapted.named_parameters() if "lora_A" in n}
    assert lora_layers == {"c_attn", "c_proj"}

    neox = AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=64))
    # No known projection names: every Linear layer, but not the output head (embed_out for GPT-NeoX).
    assert default_target_modules(neox) == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]

    llama = AutoModelForCausalLM.from_pretrained(str(save_tiny_causal_lm(tmp_path / "llama", ["abc"], "llama")))
    assert default_target_modules(llama) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert resolve_target_modules(llama, ["q_proj", "gate_proj", "mlp.down_proj"]) == [
        "q_proj", "gate_proj", "mlp.down_proj"]
    assert resolve_target_modules(llama, ["q_proj, v_proj", "up_proj"]) == ["q_proj", "v_proj", "up_proj"]
    assert resolve_target_modules(llama, ["all-linear"]) == "all-linear"
    with pytest.raises(ConfigError) as exc:
        resolve_target_modules(llama, ["q_proj", "query"])
    message = str(exc.value)
    assert "\n" not in message and "'query' matches no layer" in message and "gate_proj" in message


def test_model_folder_checks_and_4bit_without_a_gpu(tmp_path):
    from lora_trainer.text.model import check_model_folder, quantization_config

    (tmp_path / "empty").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"")
    for path, expected in [(tmp_path / "nope", "does not exist"), (tmp_path / "empty", "no config.json"),
                           (tmp_path / "model.safetensors", "is a file"), ("", "base_model is not set")]:
        with pytest.raises(ModelError) as exc:
            check_model_folder(str(path))
        assert expected in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ModelError, match="4-bit QLoRA needs a CUDA GPU"):
        quantization_config(torch.device("cpu"))


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing model", "base_model {tmp}/no-such-model does not exist; give a local Hugging Face model folder"),
    ("no config.json", "{tmp}/not-a-model: no config.json, so this is not a Hugging Face model folder"),
    ("empty dataset", "{tmp}/data.jsonl: no training text found (2 empty record(s) skipped)"),
    ("bad line", "{tmp}/data.jsonl:2: not valid JSON"),
    ("all too long", "{tmp}/data.jsonl: all 2 record(s) are longer than max_seq_length=8 tokens"),
    ("beyond the context", "max_seq_length 4096 is longer than this model's context (max_position_embeddings = 512"),
    ("4-bit on the CPU", "4-bit QLoRA needs a CUDA GPU and this run is on the CPU"),
])
def test_bad_inputs_fail_with_one_line_and_write_nothing(workdir, tmp_path, capsys, case, expected):
    from lora_trainer.cli import main

    good = '{"prompt": "Q: x?", "completion": " y"}\n'
    data = {"empty dataset": '{"text": ""}\n{"prompt": "Q", "completion": ""}\n',
            "bad line": good + '{"prompt": "Q: z?" "completion": " w"}\n',
            "all too long": '{"prompt": "Q: What is the capital of Ulmere?", "completion": " Pennyfold."}\n' * 2,
            }.get(case, good)
    model = {"missing model": tmp_path / "no-such-model", "no config.json": tmp_path / "not-a-model"}.get(
        case, workdir / "tiny-llama")
    (tmp_path / "not-a-model").mkdir()
    write(tmp_path / "not-a-model" / "model.safetensors", "")
    argv = ["train", "--task_type", "text-generation", "--base_model", str(model),
            "--train_data_dir", str(write(tmp_path / "data.jsonl", data)), "--output_dir", str(tmp_path / "runs"),
            "--max_seq_length", {"all too long": "8", "beyond the context": "4096"}.get(case, "64"), "--device", "cpu"]
    if case == "4-bit on the CPU":
        argv += ["--load_in_4bit", "true"]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # lines before it: the same message, logged
    assert last.startswith("error: ") and expected.format(tmp=tmp_path) in last
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # nothing left behind by the failed run
